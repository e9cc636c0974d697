"""Training: ``TrainConfig`` and ``train(cfg)``.

This module owns the training recipe (the paper's, docs/training.md, as the default), the learning
rate schedule, the loop (single process or DDP under ``torchrun``), resumable training checkpoints
and the metrics log. It knows nothing about MIDI, nor how options reach it (the CLI builds the
config). Batches come from ``museformer.data`` (``BatchOrder``, ``corpus_batch``), the loss from
``museformer.evaluate.batch_nll`` (``model.lm_loss`` summed), models from ``museformer.model``.

Sections: config -> schedule -> distributed -> checkpoints -> train.

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
from typing import Any

import numpy as np
import torch

from museformer.data import BatchOrder, corpus_batch, input_lengths, open_split
from museformer.errors import MuseformerError, ParameterError
from museformer.evaluate import batch_nll, corpus_nll
from museformer.files import fsync_dir, write_bytes_atomic
from museformer.model import Museformer, MuseformerConfig

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
        if self.seed < 0:
            raise MuseformerError(f"training option 'seed' must be >= 0, got {self.seed}")
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


def saved_config(out_dir: str | os.PathLike) -> TrainConfig | None:
    """The ``train_config.json`` of a run folder (None when there is none)."""
    path = Path(out_dir) / CONFIG_FILE
    if not path.exists():
        return None
    try:
        return TrainConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError) as e:
        raise MuseformerError(f"cannot read the run's saved options {path}: {e}") from None


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


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """A torch device from ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``."""
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
        return _Dist(0, 1, resolve_device(device_name))
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
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


def _barrier(d: _Dist) -> None:
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()


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

    def write(self, row: dict[str, Any], bar=None) -> None:
        """Append a row (and show it on the progress bar; a validation row also as one line)."""
        self.writer.writerow({k: _fmt(row.get(k)) for k in METRIC_COLUMNS})
        self.file.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k not in ("step", "epoch") and isinstance(v, float):
                    self.tb.add_scalar(k, v, row["step"])
        if bar is not None:
            bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}",
                            refresh=False)
        if row["val_loss"] is not None:
            msg = (f"step {row['step']}: train loss {row['loss']:.4f}, valid loss {row['val_loss']:.4f}, "
                   f"valid ppl {row['val_ppl']:.2f}")
            (bar.write if bar is not None else print)(msg)

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


def _train(cfg: TrainConfig, d: _Dist, resume: bool) -> Path:
    # ---- setup: data, model, optimizer, resumed state ----------------------------------------------
    out_dir = Path(cfg.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ParameterError("out_dir", f"{out_dir} is a file; give a run folder (new or earlier)")
    existing = _checkpoint_dirs(out_dir)
    if existing and not resume:
        raise MuseformerError(f"{out_dir} already holds checkpoints; pass --resume to continue, or pick a new folder")
    corpus = open_split(cfg.data_dir, "train")
    valid = open_split(cfg.data_dir, "valid")
    vocab = corpus.vocab
    if (cfg.model.vocab, cfg.model.vocab_size) != (vocab.name, len(vocab)):  # the data decides the vocabulary
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab=vocab.name, vocab_size=len(vocab)))
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    model = Museformer(cfg.model, vocab=vocab).to(d.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                  weight_decay=cfg.weight_decay)
    step, consumed, elapsed_before, last_saved = 0, 0, 0.0, None
    if resume and existing:
        last_saved = existing[-1][1]
        state = _load_training_checkpoint(last_saved, model, optimizer)
        step, consumed, elapsed_before = int(state["step"]), int(state["micro_batches"]), float(state.get("elapsed_s", 0))
        if d.main:
            print(f"resuming from {last_saved} (step {step})", file=sys.stderr)
    if d.main:  # after the checkpoint check, so a mismatched resume leaves the run folder untouched
        _start_run_folder(out_dir, cfg)
    runner = model
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        runner = DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    if cfg.compile:
        runner = torch.compile(runner)
    lengths = input_lengths(corpus, cfg.max_len)
    order = BatchOrder(lengths, cfg.batch_tokens, cfg.seed)
    per_step = d.world * cfg.grad_accum
    log = _MetricsLog(out_dir, step, cfg.tensorboard) if d.main else None
    bar = _progress_bar(cfg, step) if d.main and cfg.progress else None

    # ---- loop: one optimizer update per iteration ----------------------------------------------------
    model.train()
    started = time.perf_counter()
    window_tokens, window_time = 0.0, 0.0  # tokens/s counts update time only (not eval, not saving)
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
            for a in range(cfg.grad_accum):  # this rank's micro-batches of the global batch
                g = consumed + d.rank * cfg.grad_accum + a
                crop = np.random.default_rng([cfg.seed, 1, g]) if cfg.random_crop else None
                with contextlib.nullcontext() if d.world == 1 or a == cfg.grad_accum - 1 else runner.no_sync():
                    nll, _ = batch_nll(runner, corpus_batch(corpus, order[g][1], cfg.max_len, crop), d.device,
                                       cfg.precision)
                    (nll * (d.world / global_tokens)).backward()  # DDP averages over ranks
                local_nll += float(nll.detach())
            loss = _all_reduce_sum([local_nll], d)[0] / global_tokens
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm or float("inf")))
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

            # ---- evaluate / log / checkpoint ---------------------------------------------------------
            last = step == cfg.max_steps
            val = _validate(model, valid, cfg, d) if last or (cfg.eval_every and step % cfg.eval_every == 0) else None
            save = last or (cfg.save_every and step % cfg.save_every == 0)
            elapsed = elapsed_before + time.perf_counter() - started
            if (step % cfg.log_every == 0 or val is not None or save) and d.main:
                log.write({
                    "step": step, "epoch": epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                    "tokens": int(global_tokens), "tokens_per_s": round(window_tokens / max(window_time, 1e-9), 1),
                    "val_loss": val[0] if val else None, "val_ppl": val[1] if val else None,
                    "elapsed_s": round(elapsed, 2),
                }, bar)
            if step % cfg.log_every == 0 or val is not None or save:
                window_tokens, window_time = 0.0, 0.0
            if save:
                if d.main:
                    state = {"step": step, "micro_batches": consumed, "world_size": d.world, "elapsed_s": elapsed,
                             "optimizer": optimizer.state_dict(), "train_config": json.dumps(cfg.to_dict())}
                    last_saved = _save_training_checkpoint(out_dir, step, model, corpus.tokenizer, state,
                                                           cfg.keep_checkpoints)
                _barrier(d)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
    return out_dir / FINAL_MODEL


def _start_run_folder(out_dir: Path, cfg: TrainConfig) -> None:
    """Create the run folder, write its options, clear what a run killed while saving left behind."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(out_dir / CONFIG_FILE, (json.dumps(cfg.to_dict(), indent=2) + "\n").encode())
    for stale in (out_dir / CHECKPOINTS).glob(".tmp-*") if (out_dir / CHECKPOINTS).is_dir() else ():
        shutil.rmtree(stale, ignore_errors=True)


def _progress_bar(cfg: TrainConfig, step: int):
    from tqdm.auto import tqdm

    return tqdm(total=cfg.max_steps, initial=step, desc="train", unit="step", dynamic_ncols=True, mininterval=1.0)


def _validate(model, valid, cfg: TrainConfig, d: _Dist) -> tuple[float, float] | None:
    """(mean NLL, perplexity) on the validation split, sharded over ranks; None without one."""
    if len(valid) == 0:
        return None
    model.eval()
    n = len(valid) if cfg.val_max_songs is None else min(cfg.val_max_songs, len(valid))
    mine = np.arange(n)[d.rank::d.world]
    total, count = corpus_nll(model, valid, cfg.val_max_len, cfg.batch_tokens, d.device, cfg.precision, mine)
    total, count = _all_reduce_sum([total, float(count)], d)
    model.train()
    mean = total / max(count, 1.0)
    return mean, math.exp(min(mean, 700.0))
