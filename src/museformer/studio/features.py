"""Optional library features the studio offers only when the installed museformer has them.

Form plans (``generate(..., form="A8 A8 B8 A8")``) and bar infilling (``museformer.infill``) are
found by inspection, not by version numbers, so the page shows the form-plan field and the
"regenerate selected bars" button exactly when the functions exist:

- ``form_supported()``: ``museformer.generate.generate`` takes a ``form`` argument;
- ``infill_supported()``: ``museformer.infill`` imports and has a callable ``infill``.

``run_infill`` is the one place that calls ``infill``::

    infill(ids, [(first, last)], model=..., tokenizer=..., config=SampleConfig, progress=callback)
        -> museformer.infill.InfillResult

with ``ids`` the song's tokens (no BOS) and bars numbered from 1, inclusive. The result becomes a
``museformer.generate.Song`` (the whole new song, finish ``"infill"``) so the studio saves and lists
it like any generated song.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Sequence
from typing import Any


def form_supported() -> bool:
    """Whether ``generate`` accepts a form plan (``form=``)."""
    from museformer.generate import generate

    return "form" in inspect.signature(generate).parameters


def infill_function() -> Callable | None:
    """``museformer.infill.infill`` when the installed package has it, else None."""
    try:
        module = importlib.import_module("museformer.infill")
    except ImportError:
        return None
    function = getattr(module, "infill", None)
    return function if callable(function) else None


def infill_supported() -> bool:
    """Whether bar infilling is available."""
    return infill_function() is not None


def features() -> dict[str, bool]:
    """What the page may show: ``{"form": ..., "infill": ...}``."""
    return {"form": form_supported(), "infill": infill_supported()}


def run_infill(ids: Sequence[int], first: int, last: int, *, model, tokenizer, config, progress=None) -> list[Any]:
    """Regenerate bars ``first..last`` (1-based, inclusive) of a song; returns the new song (a list of one).

    Raises:
        MuseformerError: whatever ``infill`` raises for bad bars (the server shows it).
        RuntimeError: infilling is not available (the server checks ``infill_supported`` first).
    """
    from museformer.generate import Song

    function = infill_function()
    if function is None:
        raise RuntimeError("museformer.infill is not available")
    result = function(list(ids), [(first, last)], model=model, tokenizer=tokenizer, config=config,
                      progress=progress)
    return [Song(ids=list(result.ids), prompt_length=0, finish="infill", seed=result.seed, score=result.score,
                 bars=result.bars, skipped=result.skipped)]
