"""The ``museformer`` command: argument parsing only; every subcommand calls a library function.

Each subcommand is one ``add_<name>(subparsers)`` function that declares its arguments and sets
``handler`` to a small function taking the parsed ``args``. Errors a user can cause arrive as
``MuseformerError`` and are printed on one line (exit status 1), never as a traceback.
"""

from __future__ import annotations

import argparse
import sys

from museformer import __version__
from museformer.errors import MuseformerError


# ---------------------------------------------------------------------------------------------
# encode / decode (tokenizer)
# ---------------------------------------------------------------------------------------------
def add_encode(sub) -> None:
    p = sub.add_parser("encode", help="MIDI file -> REMIGEN token line")
    p.set_defaults(handler=_not_yet("encode"))


def add_decode(sub) -> None:
    p = sub.add_parser("decode", help="token text file -> MIDI file")
    p.set_defaults(handler=_not_yet("decode"))


# ---------------------------------------------------------------------------------------------
# prepare (corpus preparation)
# ---------------------------------------------------------------------------------------------
def add_prepare(sub) -> None:
    p = sub.add_parser("prepare", help="encode a folder of MIDI (or a bundled corpus) into shards")
    p.set_defaults(handler=_not_yet("prepare"))


# ---------------------------------------------------------------------------------------------
# pattern (attention pattern picture)
# ---------------------------------------------------------------------------------------------
def add_pattern(sub) -> None:
    p = sub.add_parser("pattern", help="draw the fine/coarse attention pattern of a song")
    p.set_defaults(handler=_not_yet("pattern"))


# ---------------------------------------------------------------------------------------------
# train / evaluate
# ---------------------------------------------------------------------------------------------
def add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model on prepared data")
    p.set_defaults(handler=_not_yet("train"))


def add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="perplexity of a checkpoint, or structure metrics of songs")
    p.set_defaults(handler=_not_yet("evaluate"))


# ---------------------------------------------------------------------------------------------
# analyze (bar-similarity statistics)
# ---------------------------------------------------------------------------------------------
def add_analyze(sub) -> None:
    p = sub.add_parser("analyze", help="bar-similarity statistics of a corpus")
    p.set_defaults(handler=_not_yet("analyze"))


# ---------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------
def add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate songs with a trained (by default the bundled) model")
    p.add_argument("-o", "--output", default="songs", help="output folder")
    p.set_defaults(handler=_not_yet("generate"))


# ---------------------------------------------------------------------------------------------
def _not_yet(name: str):
    def handler(args) -> int:
        raise MuseformerError(f"'museformer {name}' is not available in this version yet (no model yet)")

    return handler


COMMANDS = (add_encode, add_decode, add_prepare, add_pattern, add_train, add_evaluate, add_analyze, add_generate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="museformer",
        description="Museformer: long, structured multi-track music generation with fine- and "
        "coarse-grained attention.",
    )
    parser.add_argument("--version", action="version", version=f"museformer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except MuseformerError as e:
        print(f"museformer {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"museformer {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
