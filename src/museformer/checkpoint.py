"""Model checkpoints: a directory of open formats, written atomically, read without unpickling.

A checkpoint directory holds

- ``config.json``: ``{"format": "museformer-model", "museformer_version": ..., "model": {...}}``, the
  ``MuseformerConfig`` as a dict (unknown keys are an error when loading);
- ``model.safetensors``: the weights of the plain (unwrapped, uncompiled) module;
- ``tokenizer.json``: the tokenizer (``Tokenizer.to_dict()``).

``save_checkpoint(dir, model, tokenizer)`` writes the three files to temporary files in the same
folder, fsyncs them, then moves each into place (``files.atomic_path``); other files in the folder (for
example a trainer's resume state) are left alone. ``load(dir)`` returns ``(model, tokenizer)``, and
every problem a user can cause (missing, truncated or mismatched file) is a ``MuseformerError``
naming the file and, for weights, the tensor and the shapes.

Training state for resuming (optimizer, step) is not this module's business.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import nn

from museformer import __version__
from museformer.errors import MuseformerError
from museformer.files import atomic_path
from museformer.model import Museformer, MuseformerConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
FORMAT = "museformer-model"
_TOP_LEVEL_KEYS = {"format", "museformer_version", "model"}


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside ``torch.compile`` (``_orig_mod``) and DDP / FSDP-style (``module``) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None and not isinstance(model, Museformer):
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


# =============================================================================================
# Save
# =============================================================================================
def save_checkpoint(directory: str | Path, model: nn.Module, tokenizer) -> Path:
    """Write ``config.json``, ``model.safetensors`` and ``tokenizer.json`` into ``directory``.

    Args:
        directory: created if missing; existing checkpoint files in it are replaced atomically.
        model: a ``Museformer``, possibly wrapped by ``torch.compile`` or DDP (the plain module's
            ``state_dict`` is saved, so loading never has to strip prefixes).
        tokenizer: the ``Tokenizer`` the model was trained with (anything with ``to_dict()`` and a
            ``vocab`` of the model's size).

    Returns:
        The checkpoint directory.
    """
    from safetensors.torch import save_file

    model = unwrap(model)
    if not isinstance(model, Museformer):
        raise TypeError(f"save_checkpoint expects a Museformer, got {type(model).__name__}")
    vocab = getattr(tokenizer, "vocab", None)
    if vocab is not None and len(vocab) != model.config.vocab_size:
        raise MuseformerError(
            f"tokenizer vocabulary {vocab.name!r} has {len(vocab)} ids, the model {model.config.vocab_size}"
        )
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MuseformerError(f"cannot create checkpoint directory {directory}: {e.strerror}") from None

    config = {"format": FORMAT, "museformer_version": __version__, "model": model.config.to_dict()}
    # plain CPU tensors that own their memory (safetensors refuses views that share storage)
    state = {name: t.detach().to("cpu").contiguous().clone() for name, t in model.state_dict().items()}
    texts = {
        CONFIG_FILE: json.dumps(config, indent=2) + "\n",
        TOKENIZER_FILE: json.dumps(tokenizer.to_dict(), indent=2) + "\n",
    }
    try:
        # Each file goes to a temp file first and is moved into place when its block closes;
        # ExitStack closes in reverse order, so config.json lands last: a reader never sees a
        # config without its weights.
        with contextlib.ExitStack() as stack:
            config_tmp = stack.enter_context(atomic_path(directory / CONFIG_FILE))
            tokenizer_tmp = stack.enter_context(atomic_path(directory / TOKENIZER_FILE))
            weights_tmp = stack.enter_context(atomic_path(directory / WEIGHTS_FILE))
            save_file(state, str(weights_tmp), metadata={"format": "pt", "museformer_version": __version__})
            tokenizer_tmp.write_text(texts[TOKENIZER_FILE], encoding="utf-8")
            config_tmp.write_text(texts[CONFIG_FILE], encoding="utf-8")
    except OSError as e:
        raise MuseformerError(f"cannot write checkpoint {directory}: {e.strerror or e}") from None
    return directory


# =============================================================================================
# Load
# =============================================================================================
def load_config(directory: str | Path) -> MuseformerConfig:
    """The ``MuseformerConfig`` of a checkpoint directory (``MuseformerError`` naming any problem)."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise MuseformerError(f"{path}: missing (not a museformer checkpoint directory?)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MuseformerError(f"{path}: cannot read ({e})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT or not isinstance(raw.get("model"), dict):
        raise MuseformerError(f"{path}: not a museformer model config (expected format {FORMAT!r} and a 'model' entry)")
    unknown = set(raw) - _TOP_LEVEL_KEYS
    if unknown:
        raise MuseformerError(f"{path}: unknown keys {sorted(unknown)}")
    try:
        return MuseformerConfig.from_dict(raw["model"])
    except (TypeError, ValueError) as e:
        raise MuseformerError(f"{path}: bad model config: {e}") from None


def _read_weights(path: Path, device: str | torch.device) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise MuseformerError(f"{path}: missing")
    try:
        return load_file(str(path), device=str(device))
    except Exception as e:  # safetensors raises SafetensorError / OSError for truncated or foreign files
        raise MuseformerError(f"{path}: cannot read weights, the file is truncated or not safetensors ({e})") from None


def _check_state(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], path: Path) -> None:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise MuseformerError(f"{path}: missing tensor(s) {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    if unexpected:
        raise MuseformerError(
            f"{path}: unexpected tensor(s) {', '.join(unexpected[:5])}" + (" ..." if len(unexpected) > 5 else "")
        )
    for name, tensor in expected.items():
        if state[name].shape != tensor.shape:
            raise MuseformerError(
                f"{path}: tensor {name} has shape {tuple(state[name].shape)} but config.json expects "
                f"{tuple(tensor.shape)}"
            )


def load(path: str | Path, device: str | torch.device = "cpu"):
    """Load a checkpoint directory written by ``save_checkpoint``.

    Args:
        path: the checkpoint directory.
        device: where to put the weights.

    Returns:
        ``(model, tokenizer)``: a ``Museformer`` in eval mode and its ``Tokenizer``.

    Raises:
        MuseformerError: a file is missing, truncated or does not match the config (the message
        names the file, and for weights the tensor and both shapes).
    """
    from museformer.tokenizer import Tokenizer

    directory = Path(path)
    if not directory.is_dir():
        raise MuseformerError(f"{directory}: no such checkpoint directory")
    config = load_config(directory)
    tokenizer_path = directory / TOKENIZER_FILE
    if not tokenizer_path.is_file():
        raise MuseformerError(f"{tokenizer_path}: missing")
    tokenizer = Tokenizer.load(tokenizer_path)
    try:
        model = Museformer(config, vocab=tokenizer.vocab)
    except ValueError as e:
        raise MuseformerError(f"{directory}: {CONFIG_FILE} and {TOKENIZER_FILE} disagree: {e}") from None
    weights_path = directory / WEIGHTS_FILE
    state = _read_weights(weights_path, device)
    _check_state(state, model.state_dict(), weights_path)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), tokenizer
