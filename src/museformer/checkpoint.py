"""Model checkpoints: a directory of open formats, written atomically, read without unpickling.

A checkpoint directory holds

- ``config.json``: ``{"format": "museformer-model", "museformer_version": ..., "model": {...}}``, the
  ``MuseformerConfig`` as a dict (unknown keys are an error when loading);
- ``model.safetensors``: the weights of the plain (unwrapped, uncompiled) module, floating point and
  finite; its metadata holds ``museformer_model_config``, the model config the weights were saved
  with (canonical JSON), so a ``config.json`` that does not belong to the weights is detected (same
  shapes, other ``n_heads``, say). The header is written in a canonical order (sorted keys), so the
  same weights always give the same bytes and the same sha256;
- ``tokenizer.json``: the tokenizer (``Tokenizer.to_dict()``).

``save_checkpoint(dir, model, tokenizer)`` writes the three files to temporary files in the same
folder, fsyncs them, checks their sizes, then moves each into place (``files.atomic_path``); other
files in the folder (for example a trainer's resume state) are left alone. ``load(dir)`` returns
``(model, tokenizer)``, and every problem a user can cause (missing, truncated or mismatched file,
weights that are not finite floats) is a ``MuseformerError`` naming the file and, for weights, the
tensor. Checkpoints written before the config was stored in the weights still load (nothing to
compare them with). ``resolve_checkpoint(path)`` accepts a checkpoint folder or a training run
folder (its ``model/``, else its newest ``checkpoints/step-N``).

Training state for resuming (optimizer, step) is not this module's business.
"""

from __future__ import annotations

import contextlib
import json
import os
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
CONFIG_METADATA_KEY = "museformer_model_config"  # in the safetensors metadata: the config the weights belong to
RUN_MODEL_DIR = "model"  # a training run's newest weights (museformer.train.FINAL_MODEL)
RUN_CHECKPOINTS_DIR = "checkpoints"  # a training run's resumable checkpoints, step-N


def canonical_json(data) -> str:
    """One JSON text per value: sorted keys, no spaces (for digests and byte-stable files)."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def safetensors_bytes(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """``state`` as a safetensors file whose header is in canonical order (same tensors -> same bytes).

    safetensors writes its metadata map in hash order, which changes between runs; the format
    allows any key order and pads the header with spaces to a multiple of 8 bytes, so the header is
    re-written with sorted keys and the tensor data (whose offsets are relative to the end of the
    header) is kept byte for byte.
    """
    from safetensors.torch import save

    raw = save(state, metadata=metadata)
    n = int.from_bytes(raw[:8], "little")
    header = canonical_json(json.loads(raw[8 : 8 + n])).encode("utf-8")
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + raw[8 + n :]


def _check_weights_usable(state: dict[str, torch.Tensor], where: str) -> None:
    """Every tensor floating point and finite (NaN/Inf or integer weights make a model that lies)."""
    for name, t in state.items():
        if not torch.is_floating_point(t):
            raise MuseformerError(f"{where}: tensor {name} is {str(t.dtype).removeprefix('torch.')}, not floating point")
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise MuseformerError(f"{where}: tensor {name} has {bad} non-finite value(s) (NaN or Inf)")


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
    state = {name: t.detach().to("cpu").contiguous().clone() for name, t in sorted(model.state_dict().items())}
    _check_weights_usable(state, f"not saving {directory}")
    metadata = {"format": "pt", "museformer_version": __version__,
                CONFIG_METADATA_KEY: canonical_json(config["model"])}
    weights = safetensors_bytes(state, metadata)
    texts = {
        CONFIG_FILE: json.dumps(config, indent=2) + "\n",
        TOKENIZER_FILE: json.dumps(tokenizer.to_dict(), indent=2) + "\n",
    }
    try:
        # Each file goes to a temp file first and is moved into place when its block closes;
        # ExitStack closes in reverse order, so config.json lands last: a reader never sees a
        # config without its weights.
        with contextlib.ExitStack() as stack:
            encoded = {name: text.encode("utf-8") for name, text in texts.items()}
            config_tmp = stack.enter_context(atomic_path(directory / CONFIG_FILE, size=len(encoded[CONFIG_FILE])))
            tokenizer_tmp = stack.enter_context(
                atomic_path(directory / TOKENIZER_FILE, size=len(encoded[TOKENIZER_FILE])))
            weights_tmp = stack.enter_context(atomic_path(directory / WEIGHTS_FILE, size=len(weights)))
            weights_tmp.write_bytes(weights)
            tokenizer_tmp.write_bytes(encoded[TOKENIZER_FILE])
            config_tmp.write_bytes(encoded[CONFIG_FILE])
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


def _read_weights(path: Path, device: str | torch.device) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the metadata of a safetensors file."""
    from safetensors import safe_open

    if not path.is_file():
        raise MuseformerError(f"{path}: missing")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            return {name: f.get_tensor(name) for name in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # safetensors raises SafetensorError / OSError for truncated or foreign files
        raise MuseformerError(f"{path}: cannot read weights, the file is truncated or not safetensors ({e})") from None


def _read_raw_model_config(directory: Path) -> dict:
    return json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))["model"]


def _check_config_belongs(metadata: dict[str, str], config_dict: dict, weights_path: Path, config_path: Path) -> None:
    """The config the weights were saved with must be the one in config.json (old files: nothing stored)."""
    stored = metadata.get(CONFIG_METADATA_KEY)
    if stored is None:
        return
    try:
        saved = json.loads(stored)
    except json.JSONDecodeError:
        raise MuseformerError(f"{weights_path}: unreadable {CONFIG_METADATA_KEY} metadata") from None
    if canonical_json(saved) == canonical_json(config_dict):
        return
    keys = sorted(set(saved) | set(config_dict))
    differ = [k for k in keys if canonical_json(saved.get(k)) != canonical_json(config_dict.get(k))]
    shown = ", ".join(f"{k}: {saved.get(k)!r} in the weights, {config_dict.get(k)!r} in {CONFIG_FILE}" for k in differ[:3])
    raise MuseformerError(
        f"{config_path} does not belong to {weights_path} ({shown}{' ...' if len(differ) > 3 else ''})"
    )


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
    _check_weights_usable(state, str(path))


def load(path: str | Path, device: str | torch.device = "cpu"):
    """Load a checkpoint directory written by ``save_checkpoint``.

    Args:
        path: the checkpoint directory.
        device: where to put the weights.

    Returns:
        ``(model, tokenizer)``: a ``Museformer`` in eval mode and its ``Tokenizer``.

    Raises:
        MuseformerError: a file is missing, truncated or does not match the config (the message
        names the file, and for weights the tensor and both shapes), the config is not the one
        the weights were saved with, or a tensor is not finite floating point.
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
    state, metadata = _read_weights(weights_path, device)
    _check_state(state, model.state_dict(), weights_path)  # shapes first: that message names the tensor
    _check_config_belongs(metadata, _read_raw_model_config(directory), weights_path, directory / CONFIG_FILE)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), tokenizer


# =============================================================================================
# Finding the checkpoint of a run
# =============================================================================================
def is_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a checkpoint directory (it has ``config.json`` and ``model.safetensors``)."""
    path = Path(path)
    return (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint directory meant by ``path``: a checkpoint itself, or a training run folder.

    For a run folder (``museformer train OUT_DIR``) that is ``OUT_DIR/model`` (the newest weights,
    refreshed at every save), else the newest complete ``OUT_DIR/checkpoints/step-N``.

    Raises:
        MuseformerError: ``path`` does not exist or holds no checkpoint (the message says what was tried).
    """
    path = Path(path)
    if not path.exists():
        raise MuseformerError(f"{path}: no such checkpoint directory")
    if not path.is_dir():
        raise MuseformerError(f"{path}: is a file; give a checkpoint directory or a training run folder")
    if is_checkpoint(path):
        return path
    if is_checkpoint(path / RUN_MODEL_DIR):
        return path / RUN_MODEL_DIR
    steps = []
    root = path / RUN_CHECKPOINTS_DIR
    for p in root.glob("step-*") if root.is_dir() else ():
        if p.name[5:].isdigit() and is_checkpoint(p):
            steps.append((int(p.name[5:]), p))
    if steps:
        return max(steps)[1]
    raise MuseformerError(
        f"{path}: not a checkpoint directory ({CONFIG_FILE} + {WEIGHTS_FILE}) and not a training run "
        f"folder (no {RUN_MODEL_DIR}/ or {RUN_CHECKPOINTS_DIR}/step-N inside)"
    )
