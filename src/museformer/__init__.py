"""museformer: fine- and coarse-grained attention for long, structured multi-track music.

Public API (imported lazily, so ``import museformer`` stays cheap):

- ``Tokenizer``: MIDI <-> REMIGEN2/REMIGEN tokens (``museformer.tokenizer``)
- ``Vocab``: the official vocabularies (``museformer.vocab``)
- ``MuseformerConfig``, ``Museformer``: the model (``museformer.model``)
- ``load``: a checkpoint directory -> model and tokenizer (``museformer.checkpoint``)

Generation: ``from museformer.generate import generate`` (a submodule, so that name stays a module).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "Tokenizer": "museformer.tokenizer",
    "Vocab": "museformer.vocab",
    "MuseformerConfig": "museformer.model",
    "Museformer": "museformer.model",
    "load": "museformer.checkpoint",
    "MuseformerError": "museformer.errors",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'museformer' has no attribute {name!r}")
