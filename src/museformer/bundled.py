"""The models shipped inside the package, by name (``museformer generate --model NAME``).

This module owns which bundled models exist, which one is the default, and where each lives:
``museformer/pretrained/NAME/`` holds a checkpoint (``config.json``, ``model.safetensors``,
``tokenizer.json``, see ``museformer.checkpoint``) and, optionally, ``sample.json``: the sampling
defaults that suit the model (for example ``{"max_bars": 64}`` for the folk model, whose songs are
then 64 bars long unless the caller asks for another length). How each model was trained is in
``docs/pretrained.md``.

- ``folk``: trained on the folk corpus (``prepare --corpus folk``: dance tunes and airs with their
  repeats played out), melody plus chord accompaniment.
- ``chorales``: trained on the Bach chorales (``prepare --corpus bach``), four voices.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from museformer.errors import MuseformerError

BUNDLED_MODELS = ("folk", "chorales")
DEFAULT_MODEL = "folk"  # the one whose samples show the clearest form (docs/pretrained.md)
SAMPLE_DEFAULTS_FILE = "sample.json"
SAMPLE_DEFAULT_KEYS = ("max_bars", "min_tokens", "max_tokens", "top_k", "temperature", "top_p")


def pretrained_root() -> Path:
    """The package's ``pretrained/`` folder."""
    from importlib import resources

    return Path(str(resources.files("museformer") / "pretrained"))


def bundled_checkpoint(name: str | None = None) -> Path:
    """The checkpoint folder of bundled model ``name`` (None = ``DEFAULT_MODEL``).

    Raises:
        MuseformerError: ``name`` is not a bundled model, or this install lacks its weights.
    """
    if name is None:
        name = DEFAULT_MODEL
    if name not in BUNDLED_MODELS:
        raise MuseformerError(f"unknown model {name!r}: the bundled models are {', '.join(BUNDLED_MODELS)} "
                              "(or pass --checkpoint DIR)")
    path = pretrained_root() / name
    if not (path / "model.safetensors").is_file():
        raise MuseformerError(f"no bundled model {name!r} in this install; pass --checkpoint DIR")
    return path


def sample_defaults(directory: str | os.PathLike) -> dict[str, Any]:
    """The sampling defaults a checkpoint folder recommends (its ``sample.json``; {} if none).

    Raises:
        MuseformerError: the file is not a JSON object of ``SAMPLE_DEFAULT_KEYS``.
    """
    path = Path(directory) / SAMPLE_DEFAULTS_FILE
    if not path.is_file():
        return {}
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise MuseformerError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(loaded, dict) or not set(loaded) <= set(SAMPLE_DEFAULT_KEYS):
        raise MuseformerError(f"{path}: expected an object with keys among {', '.join(SAMPLE_DEFAULT_KEYS)}")
    return loaded
