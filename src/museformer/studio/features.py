"""Optional library features the studio offers only when the installed museformer has them.

Form plans (``generate(..., form="A8 A8 B8 A8")``) and bar infilling (``museformer.infill``) are
found by inspection, not by version numbers, so the page shows the form-plan field and the
"regenerate selected bars" button exactly when the functions exist:

- ``form_supported()``: ``museformer.generate.generate`` takes a ``form`` argument;
- ``infill_supported()``: ``museformer.infill`` imports and has a callable ``infill``.

``run_infill`` is the one place that calls ``infill``. The contract it assumes (the issue's
``museformer infill SONG.mid --bars 9-12``, as a Python call)::

    infill(ids, bars=(first, last), model=..., tokenizer=..., config=SampleConfig, progress=callback)
        -> Song | list[Song]

with ``ids`` the song's tokens (no BOS), bars numbered from 1 and inclusive; keyword arguments the
function does not take are not passed, so a smaller signature works too.
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
    """Regenerate bars ``first..last`` (1-based, inclusive) of a song; returns the new songs.

    Raises:
        MuseformerError: whatever ``infill`` raises for bad bars (the server shows it).
        RuntimeError: infilling is not available (the server checks ``infill_supported`` first).
    """
    function = infill_function()
    if function is None:
        raise RuntimeError("museformer.infill is not available")
    parameters = inspect.signature(function).parameters
    offered = {"bars": (first, last), "model": model, "tokenizer": tokenizer, "config": config,
               "progress": progress}
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    kwargs = {k: v for k, v in offered.items() if accepts_any or k in parameters}
    result = function(list(ids), **kwargs)
    return list(result) if isinstance(result, (list, tuple)) else [result]
