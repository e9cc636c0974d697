"""The one exception type for errors a user can cause (a bad file, option or checkpoint).

The CLI prints its message on one line and exits with status 1, without a traceback. Library code
raises it (or a subclass) with a message that names the offending input.
"""


class MuseformerError(Exception):
    """A user-facing error: bad input file, bad option, bad checkpoint. The message names the input."""


class WriteError(MuseformerError):
    """An output could not be written completely (disk full, short write, a path of the wrong kind).

    The message names the file; the file that was there before (if any) is left as it was.
    """
class ParameterError(MuseformerError):
    """A bad value of one named parameter of a library function.

    ``str(e)`` is ``"<parameter>: <message>"``; a front end (the CLI) that knows which of its own
    options fed ``parameter`` prints that option's name instead (``e.message`` is the rest).
    """

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(f"{parameter}: {message}")
        self.parameter = parameter
        self.message = message
