"""Training and perplexity evaluation: ``train(cfg)`` and ``evaluate_perplexity(...)``.

This module owns the training recipe (the paper's, SPEC.md section 4, as the default), the order in
which songs are batched, the loop (single process or DDP under ``torchrun``), resumable training
checkpoints and the token-level perplexity of a checkpoint. It knows nothing about MIDI: it reads
prepared corpora through ``museformer.data`` and builds models through ``museformer.model``.

Sections: config -> schedule -> batches -> loss -> distributed -> checkpoints -> train -> evaluate.

Exactness of ``--resume``. The whole micro-batch sequence is a pure function of ``(seed, epoch)``
(one shuffled plan per epoch), so the data position is one integer: the number of micro-batches
consumed. Dropout randomness is re-seeded at every update from ``(seed, step, rank)``, so no RNG
snapshot has to be carried over and every rank of a resumed DDP run draws the same masks as it
would have without the interruption. Together with the weights and the optimizer state this makes a
resumed run repeat the losses of an uninterrupted one exactly.

Loss normalisation (as fairseq): every update minimises the summed token NLL of its global batch
divided by the number of target tokens in that batch, whatever the number of processes and
accumulation steps. One process with ``grad_accum = W * A`` therefore takes the same updates as
``W`` processes with ``grad_accum = A``.
"""

from __future__ import annotations

import ast
import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import shutil
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from museformer.errors import MuseformerError
from museformer.files import fsync_dir, write_bytes_atomic
from museformer.model import Museformer, MuseformerConfig
from museformer.vocab import EOS_ID, PAD_ID

STATE_FILE = "train_state.pt"
CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.csv"
CHECKPOINTS = "checkpoints"
FINAL_MODEL = "model"
METRIC_COLUMNS = (
    "step", "epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "val_loss", "val_ppl", "elapsed_s",
)


# =============================================================================================
# config
# =============================================================================================
def _default_model() -> MuseformerConfig:
    return MuseformerConfig.preset("paper")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; JSON-serialisable; the defaults are the paper's recipe.

    Attributes (the CLI's ``--set`` keys; ``model.<key>`` addresses the model config):
        data_dir, out_dir: prepared corpus (``museformer prepare``) and the run folder.
        model: the ``MuseformerConfig`` to train (``--preset`` picks one; vocab size follows the data).
        seed: seeds the weights, the song order and dropout.
        max_steps: optimizer updates in the whole run.
        lr, warmup_steps: peak learning rate of the inverse-square-root schedule and its warm-up.
        betas, eps, weight_decay: Adam with decoupled weight decay on all weights (fairseq's Adam).
        clip_norm: gradient-norm clip (0 = no clipping; the norm is still logged).
        max_len: training songs are truncated to this many tokens (BOS included).
        random_crop: train on a random bar-aligned window of each longer song instead of its start.
        val_max_len: validation songs are truncated to this many tokens.
        batch_tokens: token budget of one micro-batch (songs x longest song, padding included);
            a song longer than the budget forms a micro-batch of its own.
        grad_accum: micro-batches per process per update; the global batch is
            ``world_size * grad_accum`` micro-batches.
        eval_every, save_every, log_every: in updates (0 = only at the end; logging: never 0).
        val_max_songs: evaluate on the first N validation songs only (None = all).
        keep_checkpoints: how many resumable checkpoints to keep (the newest).
        device: "auto" (CUDA when available), "cpu", "cuda" or "cuda:N".
        precision: "auto" (bf16 autocast on CUDA and on CPUs with native bf16, else float32), "bf16" or "fp32".
        compile: wrap the model in ``torch.compile``.
        tensorboard: also write TensorBoard events when the ``tensorboard`` package is installed.
        progress: show a progress bar (rank 0 only).
    """

    data_dir: str
    out_dir: str
    model: MuseformerConfig = field(default_factory=_default_model)
    seed: int = 0
    max_steps: int = 100_000
    lr: float = 5e-4
    warmup_steps: int = 16_000
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-9
    weight_decay: float = 0.01
    clip_norm: float = 25.0
    max_len: int = 15_360
    random_crop: bool = False
    val_max_len: int = 10_240
    batch_tokens: int = 15_360
    grad_accum: int = 1
    eval_every: int = 1_000
    val_max_songs: int | None = None
    save_every: int = 5_000
    keep_checkpoints: int = 2
    log_every: int = 10
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    tensorboard: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(TrainConfig)
        for f in dataclasses.fields(self):
            if f.name != "model":
                object.__setattr__(self, f.name, _coerce(f.name, getattr(self, f.name), hints[f.name]))
        if isinstance(self.model, dict):
            object.__setattr__(self, "model", _model_from_dict(self.model))
        if not isinstance(self.model, MuseformerConfig):
            raise MuseformerError(f"training option 'model' must be a MuseformerConfig, got {type(self.model).__name__}")
        positive = ("max_steps", "max_len", "val_max_len", "batch_tokens", "grad_accum", "log_every", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) < 1:
                raise MuseformerError(f"training option {name!r} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "save_every", "weight_decay", "clip_norm"):
            if getattr(self, name) < 0:
                raise MuseformerError(f"training option {name!r} must be >= 0, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise MuseformerError(f"training option 'lr' must be a positive number, got {self.lr}")
        if not self.eps > 0 or not all(0 <= b < 1 for b in self.betas):
            raise MuseformerError(f"training options need eps > 0 and 0 <= betas < 1, got {self.eps}, {self.betas}")
        if self.max_len < 2 or self.val_max_len < 2:
            raise MuseformerError("training options 'max_len' and 'val_max_len' must be >= 2 (BOS + a token)")
        if self.val_max_songs is not None and self.val_max_songs < 1:
            raise MuseformerError(f"training option 'val_max_songs' must be >= 1 or None, got {self.val_max_songs}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise MuseformerError(f"training option 'precision' must be auto, bf16 or fp32, got {self.precision!r}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise MuseformerError(f"training option 'device' must be auto, cpu, cuda or cuda:N, got {self.device!r}")

    # -- (de)serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-native dict (the model config nested under ``"model"``)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["model"] = self.model.to_dict()
        out["betas"] = list(self.betas)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of ``to_dict``; unknown keys raise ``MuseformerError`` naming them."""
        valid = option_names()
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise MuseformerError(f"unknown training option(s) {unknown}; valid options: {', '.join(valid)}")
        return cls(**d)


def option_names() -> list[str]:
    """The top-level training option names (``model`` holds the model config)."""
    return [f.name for f in dataclasses.fields(TrainConfig)]


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against a field's type hint (JSON-native types only); ints pass as floats."""
    args = typing.get_args(hint)
    if type(None) in args:  # X | None
        if value is None:
            return None
        (hint,) = [a for a in args if a is not type(None)]
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, str):
        return value
    if typing.get_origin(hint) is tuple and isinstance(value, (list, tuple)):
        inner = typing.get_args(hint)
        if len(value) == len(inner):
            return tuple(_coerce(name, v, t) for v, t in zip(value, inner))
    shown = getattr(hint, "__name__", str(hint))
    raise MuseformerError(f"training option {name!r} must be {shown}, got {value!r}")


def _model_from_dict(d: dict[str, Any]) -> MuseformerConfig:
    try:
        return MuseformerConfig.from_dict(d)
    except MuseformerError:
        raise
    except (TypeError, ValueError, KeyError) as e:
        raise MuseformerError(f"invalid model config: {e}") from None


def parse_override(text: str) -> tuple[str, Any]:
    """``"key=value"`` -> ``(key, value)``; the value is a Python literal, else the bare string."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise MuseformerError(f"--set expects key=value, got {text!r}")
    try:
        value = ast.literal_eval(raw.strip())
    except (ValueError, SyntaxError):
        value = raw.strip()  # bare words such as device=cpu
    return key, value


def apply_overrides(cfg: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """A copy of ``cfg`` with dotted-key overrides (``"lr"``, ``"model.d_model"``) applied and validated."""
    top = cfg.to_dict()
    for key, value in overrides.items():
        path = key.split(".")
        node = top
        for depth, part in enumerate(path):
            if not isinstance(node, dict) or part not in node:
                under = f" under {'.'.join(path[:depth])!r}" if depth else ""
                valid = ", ".join(sorted(node)) if isinstance(node, dict) else "(none: not a group of options)"
                raise MuseformerError(f"unknown training option {key!r}; valid keys{under}: {valid}")
            if depth == len(path) - 1:
                node[part] = value
            else:
                node = node[part]
    return TrainConfig.from_dict(top)


def build_train_config(
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    preset: str | None = None,
    config_file: str | os.PathLike | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    resume: bool = False,
) -> TrainConfig:
    """The CLI's config: preset (default "paper") or JSON file, then ``key=value`` overrides.

    With ``resume`` and neither a preset nor a config file, the run's saved ``train_config.json``
    is the base, so ``museformer train DATA OUT --resume`` continues with the same options.
    """
    saved = Path(out_dir) / CONFIG_FILE
    if config_file is not None:
        try:
            loaded = json.loads(Path(config_file).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise MuseformerError(f"cannot read config file {config_file}: {e}") from None
        if not isinstance(loaded, dict):
            raise MuseformerError(f"config file {config_file} must hold a JSON object")
        model = _preset(preset or "paper").to_dict()
        if isinstance(loaded.get("model"), dict):  # a partial model dict updates the preset
            model.update(loaded["model"])
        base = {**loaded, "model": model, "data_dir": str(data_dir), "out_dir": str(out_dir)}
        cfg = TrainConfig.from_dict(base)
    elif resume and preset is None and saved.exists():
        base = json.loads(saved.read_text(encoding="utf-8"))
        cfg = TrainConfig.from_dict({**base, "data_dir": str(data_dir), "out_dir": str(out_dir)})
    else:
        cfg = TrainConfig(str(data_dir), str(out_dir), model=_preset(preset or "paper"))
    return apply_overrides(cfg, dict(parse_override(s) for s in overrides))


def _preset(name: str) -> MuseformerConfig:
    try:
        return MuseformerConfig.preset(name)
    except (KeyError, ValueError) as e:
        raise MuseformerError(f"unknown model preset {name!r}: {e}") from None


# =============================================================================================
# schedule
# =============================================================================================
def lr_at(step: int, *, peak_lr: float, warmup_steps: int) -> float:
    """Learning rate of update ``step`` (0-based): linear warm-up, then inverse square root.

    ``peak * min((step+1)/warmup, sqrt(warmup/(step+1)))``, i.e. fairseq's ``inverse_sqrt`` with a
    zero initial lr, shifted by one so the first update does not have lr 0. It equals ``peak`` at
    ``step + 1 == warmup``. With ``warmup_steps = 0``: ``peak / sqrt(step+1)``.
    """
    n = step + 1
    if warmup_steps == 0:
        return peak_lr / math.sqrt(n)
    return peak_lr * min(n / warmup_steps, math.sqrt(warmup_steps / n))


# =============================================================================================
# batches
# =============================================================================================
def plan_epoch(lengths: np.ndarray, batch_tokens: int, seed: int, epoch: int, pool: int = 1024) -> list[np.ndarray]:
    """Song indices of every micro-batch of one epoch, shuffled; a pure function of its arguments.

    Songs are shuffled, cut into pools of ``pool`` songs, sorted by length inside each pool (so a
    batch holds songs of similar length and little padding) and packed greedily while
    ``songs * longest <= batch_tokens``; then the batch order is shuffled.

    Args:
        lengths: per song, the number of input tokens it will have (after truncation).
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    batches: list[np.ndarray] = []
    for start in range(0, len(order), pool):
        chunk = order[start:start + pool]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        current: list[int] = []
        for i in chunk:  # ascending length, so the newcomer is the longest
            if current and int(lengths[i]) * (len(current) + 1) > batch_tokens:
                batches.append(np.array(current, dtype=np.int64))
                current = []
            current.append(int(i))
        if current:
            batches.append(np.array(current, dtype=np.int64))
    return [batches[k] for k in rng.permutation(len(batches))]


class BatchOrder:
    """The endless sequence of micro-batches over epochs: ``order[g] -> (epoch, song indices)``."""

    def __init__(self, lengths: np.ndarray, batch_tokens: int, seed: int) -> None:
        if len(lengths) == 0:
            raise MuseformerError("the training split has no songs")
        self.lengths, self.batch_tokens, self.seed = lengths, batch_tokens, seed
        self._epoch, self._start, self._plan = 0, 0, plan_epoch(lengths, batch_tokens, seed, 0)

    def __getitem__(self, index: int) -> tuple[int, np.ndarray]:
        if index < self._start:  # rewind (rare): replay the plans from epoch 0
            self._epoch, self._start = 0, 0
            self._plan = plan_epoch(self.lengths, self.batch_tokens, self.seed, 0)
        while index >= self._start + len(self._plan):
            self._start += len(self._plan)
            self._epoch += 1
            self._plan = plan_epoch(self.lengths, self.batch_tokens, self.seed, self._epoch)
        return self._epoch, self._plan[index - self._start]


def _input_lengths(corpus, max_len: int) -> np.ndarray:
    """Input tokens per song after truncation: BOS + song tokens, at most ``max_len``."""
    return np.minimum(np.asarray(corpus.lengths, dtype=np.int64) + 1, max_len)


def _song_inputs(song, max_len: int, vocab, crop_rng: np.random.Generator | None) -> dict[str, np.ndarray]:
    """Model inputs of one song truncated to ``max_len``; with ``crop_rng``, a random bar-aligned window."""
    ids = np.asarray(song.ids)
    if crop_rng is None or len(ids) + 1 <= max_len:
        return song.model_inputs(max_len=max_len)
    from museformer.structure import bar_ids, onset_ids

    # windows start at a bar start and are full length: start <= len(ids) - (max_len - 1)
    starts = np.concatenate([[0], np.flatnonzero(ids == vocab.bar_id) + 1])
    starts = starts[starts <= len(ids) - (max_len - 1)]
    s = int(starts[crop_rng.integers(len(starts))])
    window = ids[s:s + max_len]  # max_len - 1 inputs after BOS, plus the next token as last target
    inputs = np.concatenate([[EOS_ID], window[: max_len - 1]]).astype(np.int64)
    targets = window if len(window) == max_len else np.concatenate([window, [EOS_ID]])
    return {
        "input_ids": inputs,
        "target_ids": np.asarray(targets[:max_len], dtype=np.int64),
        "bar_ids": bar_ids(inputs, vocab).numpy(),
        "onset_ids": onset_ids(inputs, vocab).numpy(),
    }


def collate(examples: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Right-pad songs to the longest: ids and targets with ``PAD_ID``, bar and onset ids with 0."""
    longest = max(len(e["input_ids"]) for e in examples)
    out = {}
    for key, fill in (("input_ids", PAD_ID), ("target_ids", PAD_ID), ("bar_ids", 0), ("onset_ids", 0)):
        batch = np.full((len(examples), longest), fill, dtype=np.int64)
        for row, e in enumerate(examples):
            batch[row, : len(e[key])] = e[key]
        out[key] = torch.from_numpy(batch)
    return out


def _length_sorted_batches(lengths: np.ndarray, batch_tokens: int) -> Iterator[np.ndarray]:
    """Deterministic batches for evaluation: songs sorted by length, packed under the budget."""
    current: list[int] = []
    for i in np.argsort(lengths, kind="stable"):
        if current and int(lengths[i]) * (len(current) + 1) > batch_tokens:
            yield np.array(current)
            current = []
        current.append(int(i))
    if current:
        yield np.array(current)


# =============================================================================================
# loss
# =============================================================================================
def uses_bf16(device: torch.device, precision: str) -> bool:
    """Whether ``precision`` means bf16 autocast on ``device``.

    ``"auto"`` picks bf16 where the hardware computes it natively: CUDA, and CPUs with AMX or
    AVX512-BF16. Elsewhere (e.g. an AVX2-only CPU) bf16 matmuls are emulated, far slower than
    float32 (docs/benchmarks.md), so ``"auto"`` stays float32 there.
    """
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return True
    return device.type == "cpu" and (torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def _autocast(device: torch.device, precision: str):
    if uses_bf16(device, precision):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def batch_nll(model, batch: dict[str, torch.Tensor], device: torch.device, precision: str = "fp32") -> tuple[torch.Tensor, int]:
    """Summed next-token NLL (nats, float32) over the non-padding targets of a batch, and their count."""
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    with _autocast(device, precision):
        logits = model(batch["input_ids"], bar_ids=batch["bar_ids"], onset_ids=batch["onset_ids"])  # (B, T, V)
    targets = batch["target_ids"]
    nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=PAD_ID, reduction="sum")
    return nll, int((targets != PAD_ID).sum())


@torch.no_grad()
def corpus_nll(model, corpus, max_len: int, batch_tokens: int, device: torch.device, precision: str = "fp32",
               songs: np.ndarray | None = None) -> tuple[float, int]:
    """Summed NLL and target-token count of ``songs`` (default: all) truncated to ``max_len``."""
    songs = np.arange(len(corpus)) if songs is None else songs
    lengths = _input_lengths(corpus, max_len)[songs]
    total, count = 0.0, 0
    for picked in _length_sorted_batches(lengths, batch_tokens):
        batch = collate([corpus[int(songs[i])].model_inputs(max_len=max_len) for i in picked])
        nll, n = batch_nll(model, batch, device, precision)
        total += float(nll)
        count += n
    return total, count


# =============================================================================================
# distributed
# =============================================================================================
@dataclass(frozen=True)
class _Dist:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def _resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MuseformerError(f"device {name!r} was requested but CUDA is not available")
    return torch.device(name)


def _init_distributed(device_name: str) -> _Dist:
    """Single process, or DDP when launched by torchrun (WORLD_SIZE > 1): gloo on CPU, nccl on GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return _Dist(0, 1, _resolve_device(device_name))
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = _resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return _Dist(rank, world, device)


def _all_reduce_sum(values: list[float], d: _Dist) -> list[float]:
    if d.world == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.tolist()


def _step_seed(seed: int, step: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


# =============================================================================================
# checkpoints
# =============================================================================================
def _checkpoint_dirs(out_dir: Path) -> list[tuple[int, Path]]:
    """Complete resumable checkpoints (``checkpoints/step-N``), oldest first."""
    root = out_dir / CHECKPOINTS
    found = []
    for p in root.glob("step-*") if root.is_dir() else ():
        if p.name[5:].isdigit() and (p / STATE_FILE).exists():
            found.append((int(p.name[5:]), p))
    return sorted(found)


def _save_training_checkpoint(out_dir: Path, step: int, model, tokenizer, state: dict, keep: int) -> Path:
    """Write ``checkpoints/step-N`` (model dir + train_state.pt) atomically, refresh ``model/``, prune."""
    from museformer.checkpoint import save_checkpoint

    root = out_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_checkpoint(tmp, model, tokenizer)
    buf = io.BytesIO()
    torch.save(state, buf)
    write_bytes_atomic(tmp / STATE_FILE, buf.getvalue())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    fsync_dir(root)
    save_checkpoint(out_dir / FINAL_MODEL, model, tokenizer)  # the newest weights at a stable path
    for _, old in _checkpoint_dirs(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _load_training_checkpoint(path: Path, model, optimizer) -> dict:
    from museformer.checkpoint import load

    saved_model, _ = load(path)
    if saved_model.config != model.config:
        raise MuseformerError(
            f"checkpoint {path} holds a different model config than this run's; resume with the run's own "
            f"options (omit --preset/--config) or start a new out_dir"
        )
    model.load_state_dict(saved_model.state_dict())
    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a bad checkpoint to the user
        raise MuseformerError(f"cannot read training state {path / STATE_FILE}: {e}") from None
    optimizer.load_state_dict(state["optimizer"])
    return state


class _MetricsLog:
    """``metrics.csv`` (and TensorBoard when installed); rank 0 only; rows after a resumed step dropped."""

    def __init__(self, out_dir: Path, resume_step: int, tensorboard: bool) -> None:
        self.path = out_dir / METRICS_FILE
        rows = []
        if resume_step and self.path.exists():
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) <= resume_step]
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=METRIC_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
        write_bytes_atomic(self.path, text.getvalue().encode())
        self.file = open(self.path, "a", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=METRIC_COLUMNS)
        self.tb = None
        if tensorboard:
            with contextlib.suppress(ImportError):
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=resume_step + 1)

    def write(self, row: dict[str, Any]) -> None:
        self.writer.writerow({k: _fmt(row.get(k)) for k in METRIC_COLUMNS})
        self.file.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k not in ("step", "epoch") and isinstance(v, float):
                    self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)  # full precision, so resumed and uninterrupted runs compare exactly
    return str(v)


# =============================================================================================
# train
# =============================================================================================
def train(cfg: TrainConfig, *, resume: bool = False) -> Path:
    """Train a model as ``cfg`` says; returns the folder of the final model (``OUT_DIR/model``).

    Launched plainly it runs one process; under ``torchrun --nproc_per_node N`` it runs DDP with the
    data sharded by rank (only rank 0 writes files). ``resume`` continues from the newest checkpoint
    in ``cfg.out_dir`` (and starts fresh when there is none).

    Raises:
        MuseformerError: bad data folder or options, a checkpoint that does not match, or a
            non-finite loss (the last good checkpoint is kept).
    """
    d = _init_distributed(cfg.device)
    try:
        return _train(cfg, d, resume)
    finally:
        if d.world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def _open_corpus(data_dir: str, split: str):
    from museformer.data import Corpus

    try:
        return Corpus(data_dir, split=split)
    except MuseformerError:
        raise
    except (OSError, ValueError, KeyError) as e:
        raise MuseformerError(f"cannot read split {split!r} of prepared data {data_dir}: {e}") from None


def _open_validation(data_dir: str):
    """The ``valid`` split, or None when the data has none (then training runs without validation)."""
    corpus = _open_corpus(data_dir, "valid")
    return corpus if len(corpus) else None


def _train(cfg: TrainConfig, d: _Dist, resume: bool) -> Path:
    # ---- setup ---------------------------------------------------------------------------------
    out_dir = Path(cfg.out_dir)
    existing = _checkpoint_dirs(out_dir)
    if existing and not resume:
        raise MuseformerError(f"{out_dir} already holds checkpoints; pass --resume to continue, or pick a new folder")
    corpus = _open_corpus(cfg.data_dir, "train")
    valid = _open_validation(cfg.data_dir)
    tokenizer = corpus.tokenizer
    vocab = tokenizer.vocab
    model_cfg = cfg.model
    if (model_cfg.vocab, model_cfg.vocab_size) != (vocab.name, len(vocab)):  # the data decides the vocabulary
        model_cfg = dataclasses.replace(model_cfg, vocab=vocab.name, vocab_size=len(vocab))
        cfg = dataclasses.replace(cfg, model=model_cfg)

    # ---- model / optimizer ---------------------------------------------------------------------
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    model = Museformer(model_cfg, vocab=vocab).to(d.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                  weight_decay=cfg.weight_decay)
    step, consumed, elapsed_before = 0, 0, 0.0
    if resume and existing:
        state = _load_training_checkpoint(existing[-1][1], model, optimizer)
        step, consumed = int(state["step"]), int(state["micro_batches"])
        elapsed_before = float(state.get("elapsed_s", 0.0))
        if d.main:
            print(f"resuming from {existing[-1][1]} (step {step})", file=sys.stderr)
    if d.main:  # after the checkpoint check, so a mismatched resume leaves the run folder untouched
        out_dir.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(out_dir / CONFIG_FILE, (json.dumps(cfg.to_dict(), indent=2) + "\n").encode())
        for stale in (out_dir / CHECKPOINTS).glob(".tmp-*") if (out_dir / CHECKPOINTS).is_dir() else ():
            shutil.rmtree(stale, ignore_errors=True)  # left by a run killed while saving
    runner = model
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        runner = DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    if cfg.compile:
        runner = torch.compile(runner)

    # ---- data ----------------------------------------------------------------------------------
    lengths = _input_lengths(corpus, cfg.max_len)
    order = BatchOrder(lengths, cfg.batch_tokens, cfg.seed)
    per_step = d.world * cfg.grad_accum
    precision = cfg.precision

    def micro_batch(g: int) -> dict[str, torch.Tensor]:
        _, songs = order[g]
        crop = np.random.default_rng([cfg.seed, 1, g]) if cfg.random_crop else None
        return collate([_song_inputs(corpus[int(i)], cfg.max_len, vocab, crop) for i in songs])

    def validate() -> tuple[float, float] | None:
        if valid is None:
            return None
        model.eval()
        n = len(valid) if cfg.val_max_songs is None else min(cfg.val_max_songs, len(valid))
        mine = np.arange(n)[d.rank::d.world]
        total, count = corpus_nll(model, valid, cfg.val_max_len, cfg.batch_tokens, d.device, precision, mine)
        total, count = _all_reduce_sum([total, float(count)], d)
        model.train()
        mean = total / max(count, 1.0)
        return mean, math.exp(min(mean, 700.0))

    # ---- loop ----------------------------------------------------------------------------------
    log = _MetricsLog(out_dir, step, cfg.tensorboard) if d.main else None
    bar = None
    if d.main and cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_steps, initial=step, desc="train", unit="step", dynamic_ncols=True, mininterval=1.0)
    model.train()
    started = time.perf_counter()
    window_tokens, window_time = 0.0, 0.0  # tokens/s counts update time only (not eval, not saving)
    last_saved = existing[-1][1] if (resume and existing) else None
    try:
        while step < cfg.max_steps:
            step_start = time.perf_counter()
            lr = lr_at(step, peak_lr=cfg.lr, warmup_steps=cfg.warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            torch.manual_seed(_step_seed(cfg.seed, step, d.rank))  # dropout masks: pure in (seed, step, rank)
            step_batches = [order[g] for g in range(consumed, consumed + per_step)]
            epoch = step_batches[-1][0]
            global_tokens = float(sum(int(lengths[songs].sum()) for _, songs in step_batches))
            local_nll = 0.0
            for a in range(cfg.grad_accum):
                g = consumed + d.rank * cfg.grad_accum + a
                sync = d.world == 1 or a == cfg.grad_accum - 1
                with contextlib.nullcontext() if sync else runner.no_sync():
                    nll, _ = batch_nll(runner, micro_batch(g), d.device, precision)
                    (nll * (d.world / global_tokens)).backward()  # DDP averages over ranks
                local_nll += float(nll.detach())
            (total_nll,) = _all_reduce_sum([local_nll], d)
            loss = total_nll / global_tokens
            max_norm = cfg.clip_norm if cfg.clip_norm > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                kept = f"the last good checkpoint is {last_saved}" if last_saved else "no checkpoint was written yet"
                raise MuseformerError(
                    f"non-finite loss at step {step + 1} (loss {loss}, grad norm {grad_norm}); training stopped, "
                    f"{kept}; try a lower lr (now {cfg.lr}) or a longer warm-up"
                )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            consumed += per_step
            window_tokens += global_tokens
            window_time += time.perf_counter() - step_start

            # ---- eval / log / checkpoint ---------------------------------------------------------
            last = step == cfg.max_steps
            val = validate() if (last or (cfg.eval_every and step % cfg.eval_every == 0)) else None
            save = last or (cfg.save_every and step % cfg.save_every == 0)
            if step % cfg.log_every == 0 or val is not None or save:
                now = time.perf_counter()
                speed = window_tokens / max(window_time, 1e-9)
                window_tokens, window_time = 0.0, 0.0
                if d.main:
                    log.write({
                        "step": step, "epoch": epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                        "tokens": int(global_tokens), "tokens_per_s": round(speed, 1),
                        "val_loss": val[0] if val else None, "val_ppl": val[1] if val else None,
                        "elapsed_s": round(elapsed_before + now - started, 2),
                    })
                    if bar is not None:
                        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{speed:.0f}", refresh=False)
                    if val is not None:
                        msg = f"step {step}: train loss {loss:.4f}, valid loss {val[0]:.4f}, valid ppl {val[1]:.2f}"
                        (bar.write if bar is not None else print)(msg)
            if save:
                if d.main:
                    state = {"step": step, "micro_batches": consumed, "world_size": d.world,
                             "optimizer": optimizer.state_dict(), "train_config": json.dumps(cfg.to_dict()),
                             "elapsed_s": elapsed_before + time.perf_counter() - started}
                    last_saved = _save_training_checkpoint(out_dir, step, model, tokenizer, state, cfg.keep_checkpoints)
                if d.world > 1:
                    import torch.distributed as dist

                    dist.barrier()
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
    return out_dir / FINAL_MODEL


# =============================================================================================
# evaluate
# =============================================================================================
def unigram_perplexity(train_corpus, eval_corpus, max_len: int) -> float:
    """Perplexity of the add-one-smoothed unigram model of ``train_corpus`` on ``eval_corpus``.

    The baseline a sequence model must beat: token frequencies of the training songs (EOS counted
    once per song), scored on exactly the targets ``evaluate_perplexity`` scores at ``max_len``.
    """
    size = len(train_corpus.vocab)
    counts = np.ones(size, dtype=np.float64)  # add-one smoothing
    for i in range(len(train_corpus)):
        counts += np.bincount(train_corpus[i].ids, minlength=size)[:size]
    counts[EOS_ID] += len(train_corpus)
    log_prob = np.log(counts / counts.sum())
    nll, n = 0.0, 0
    for i in range(len(eval_corpus)):
        targets = eval_corpus[i].model_inputs(max_len)["target_ids"]
        nll -= float(log_prob[targets].sum())
        n += len(targets)
    return math.exp(nll / max(n, 1))


def evaluate_perplexity(
    checkpoint_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    split: str = "test",
    max_lens: tuple[int, ...] | list[int] = (1024, 5120, 10240),
    batch_tokens: int = 16_384,
    device: str | None = None,
) -> dict[str, Any]:
    """Token-level perplexity of a checkpoint on a prepared split, songs truncated to each length.

    As the paper: for each ``L`` every song is cut to its first ``L`` input tokens (BOS included)
    and perplexity = ``exp(total NLL / total target tokens)`` over the whole split (EOS counts as
    a target when the song fits). Computed in float32 on every device.

    Returns:
        ``{"checkpoint", "data_dir", "split", "songs", "results": [{"max_len", "tokens",
        "mean_nll", "perplexity", "unigram_perplexity"}, ...]}`` (one result per length, in the
        order given); ``unigram_perplexity`` is the baseline of ``unigram_perplexity``.
    """
    from museformer.checkpoint import load

    if not max_lens or any(int(L) < 2 for L in max_lens):
        raise MuseformerError(f"--max-len values must be >= 2, got {list(max_lens)}")
    if batch_tokens < 1:
        raise MuseformerError(f"batch_tokens must be >= 1, got {batch_tokens}")
    dev = _resolve_device(device or "auto")
    model, tokenizer = load(checkpoint_dir)
    corpus = _open_corpus(str(data_dir), split)
    if len(corpus) == 0:
        raise MuseformerError(f"split {split!r} of {data_dir} has no songs")
    if corpus.vocab.symbols != tokenizer.vocab.symbols:
        raise MuseformerError(
            f"checkpoint {checkpoint_dir} uses vocabulary {tokenizer.vocab.name!r} ({len(tokenizer.vocab)} ids) "
            f"but {data_dir} was prepared with {corpus.vocab.name!r} ({len(corpus.vocab)} ids)"
        )
    model = model.to(dev).eval()
    train_split = _open_corpus(str(data_dir), "train")
    results = []
    for max_len in max_lens:
        total, count = corpus_nll(model, corpus, int(max_len), batch_tokens, dev, "fp32")  # exact, also on GPU
        mean = total / count
        results.append({"max_len": int(max_len), "tokens": count, "mean_nll": mean,
                        "perplexity": math.exp(mean) if mean < 700 else math.inf,
                        "unigram_perplexity": unigram_perplexity(train_split, corpus, int(max_len))})
    return {"checkpoint": str(checkpoint_dir), "data_dir": str(data_dir), "split": split, "songs": len(corpus),
            "results": results}
