"""Token-level NLL and perplexity: of one batch, of a corpus, of a checkpoint on a prepared split.

This module owns how a model is scored on prepared songs: ``batch_nll`` (the summed next-token
NLL of one collated batch, the quantity training minimises and evaluation accumulates),
``corpus_nll`` (over songs of a split, in deterministic length-sorted batches),
``evaluate_perplexity`` (the paper's perplexity at several truncation lengths) and
``unigram_perplexity`` (the baseline a sequence model must beat) and ``repeat_bar_nll`` (how well
the model predicts bars that repeat an earlier bar: whether it learnt to copy through its fine
attention, without sampling a single song). The loss itself is
``museformer.model.lm_loss``; batches come from ``museformer.data``. It knows nothing about MIDI or
about training (no optimiser, no schedule).
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any

import numpy as np
import torch

from museformer.data import corpus_batch, evaluation_batches, input_lengths, open_split
from museformer.errors import MuseformerError, ParameterError
from museformer.model import lm_loss
from museformer.vocab import EOS_ID, PAD_ID

DEFAULT_MAX_LENS = (1024, 5120, 10240)  # the paper's evaluation lengths
DEFAULT_BATCH_TOKENS = 16_384


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


def autocast(device: torch.device, precision: str):
    """bf16 autocast where ``uses_bf16``; otherwise float32 (no-op)."""
    if uses_bf16(device, precision):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _logits(model, batch: dict[str, torch.Tensor], device: torch.device, precision: str
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logits ``(B, T, V)`` on a collated batch (moved to ``device``) and its targets ``(B, T)``."""
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    with autocast(device, precision):
        logits = model(batch["input_ids"], bar_ids=batch["bar_ids"], onset_ids=batch["onset_ids"])  # (B, T, V)
    return logits, batch["target_ids"]


def batch_nll(model, batch: dict[str, torch.Tensor], device: torch.device, precision: str = "fp32"
              ) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL (nats, float32) over the non-padding targets of a batch, and their count."""
    logits, targets = _logits(model, batch, device, precision)
    return lm_loss(logits, targets, reduction="sum"), int((targets != PAD_ID).sum())


def token_nll(model, batch: dict[str, torch.Tensor], device: torch.device, precision: str = "fp32") -> torch.Tensor:
    """Next-token NLL (nats, float32) of every target of a collated batch, 0 at padding: ``(B, T)``."""
    logits, targets = _logits(model, batch, device, precision)
    return lm_loss(logits, targets, reduction="none").view(targets.shape)


@torch.no_grad()
def corpus_nll(model, corpus, max_len: int, batch_tokens: int, device: torch.device, precision: str = "fp32",
               songs: np.ndarray | None = None, on_batch=None) -> tuple[float, int]:
    """Summed NLL and target-token count of ``songs`` (default: all) truncated to ``max_len``.

    ``on_batch(n_songs)`` is called after each batch (a progress hook).
    """
    songs = np.arange(len(corpus)) if songs is None else songs
    lengths = input_lengths(corpus, max_len)[songs]
    total, count = 0.0, 0
    for picked in evaluation_batches(lengths, batch_tokens):
        nll, n = batch_nll(model, corpus_batch(corpus, songs[picked], max_len), device, precision)
        total += float(nll)
        count += n
        if on_batch is not None:
            on_batch(len(picked))
    return total, count


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


def repeated_bars(input_ids: np.ndarray, bar_ids: np.ndarray, interval: int) -> np.ndarray:
    """Which target positions lie in a bar that repeats, token for token, the bar ``interval`` bars earlier.

    ``input_ids`` / ``bar_ids`` are one song's model inputs (``Song.model_inputs``, PAD-free); target
    ``t`` is input ``t + 1``, so it belongs to bar ``bar_ids[t + 1]`` (the last target, EOS or the
    cut, to the last bar). A bar is compared whole (its ``b-1`` included), so a bar cut by
    ``max_len`` does not count as repeated. Bar 0 (BOS) never repeats. Shapes: ``(T,)`` -> ``(T,)`` bool.
    """
    if interval < 1:
        raise ParameterError("intervals", f"values must be >= 1, got {interval}")
    bars = np.asarray(bar_ids)
    ids = np.asarray(input_ids)
    numbers = np.unique(bars)
    content = {int(b): ids[bars == b].tobytes() for b in numbers if b >= 1}
    repeats = {b for b, tokens in content.items() if content.get(b - interval) == tokens}
    target_bar = np.concatenate([bars[1:], bars[-1:]])
    return np.isin(target_bar, list(repeats)) if repeats else np.zeros(len(bars), dtype=bool)


@torch.no_grad()
def repeat_bar_nll(model, corpus, max_len: int, intervals, batch_tokens: int, device: torch.device,
                   songs: np.ndarray | None = None, on_batch=None) -> dict[str, Any]:
    """Mean NLL of the targets in bars that repeat an earlier bar exactly, and of all other targets.

    A model that copies a strain through its fine attention predicts a repeated bar almost surely
    (NLL near 0); one that does not scores it like any other bar. Each interval ``k`` gets the
    targets of bars equal to bar ``b - k`` (``repeated_bars``); ``"other"`` gets the targets of bars
    that repeat at none of the intervals; ``"all"`` gets every target, so its mean equals
    ``corpus_nll``'s (``evaluate_perplexity`` takes that length's perplexity from it: one pass).
    ``on_batch(n_songs)`` is called after each batch (a progress hook).

    Returns:
        ``{"max_len", "repeat": {k: {"tokens", "mean_nll"}}, "other": {...}, "all": {...}}``.
    """
    intervals = [int(k) for k in intervals]
    for k in intervals:
        if k < 1:
            raise ParameterError("intervals", f"values must be >= 1, got {k}")
    songs = np.arange(len(corpus)) if songs is None else songs
    lengths = input_lengths(corpus, max_len)[songs]
    sums = {k: [0.0, 0] for k in intervals}
    other, every = [0.0, 0], [0.0, 0]
    for picked in evaluation_batches(lengths, batch_tokens):
        batch = corpus_batch(corpus, songs[picked], max_len)
        nll = token_nll(model, batch, device).cpu().numpy()  # (B, T)
        for row, length in enumerate(lengths[picked]):
            ids, bars, row_nll = batch["input_ids"][row, :length].numpy(), batch["bar_ids"][row, :length].numpy(), nll[row, :length]
            in_any = np.zeros(length, dtype=bool)
            for k in intervals:
                mask = repeated_bars(ids, bars, k)
                sums[k][0] += float(row_nll[mask].sum())
                sums[k][1] += int(mask.sum())
                in_any |= mask
            other[0] += float(row_nll[~in_any].sum())
            other[1] += int((~in_any).sum())
            every[0] += float(row_nll.sum())
            every[1] += int(length)
        if on_batch is not None:
            on_batch(len(picked))

    def entry(total_count):
        total, count = total_count
        return {"tokens": count, "mean_nll": total / count if count else math.nan}

    return {"max_len": int(max_len), "repeat": {k: entry(v) for k, v in sums.items()}, "other": entry(other),
            "all": entry(every)}


def evaluate_perplexity(
    checkpoint_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    split: str = "test",
    max_lens: tuple[int, ...] | list[int] = DEFAULT_MAX_LENS,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    device: str | None = None,
    progress: bool = False,
    repeat_intervals: tuple[int, ...] | list[int] = (),
) -> dict[str, Any]:
    """Token-level perplexity of a checkpoint on a prepared split, songs truncated to each length.

    As the paper: for each ``L`` every song is cut to its first ``L`` input tokens (BOS included)
    and perplexity = ``exp(total NLL / total target tokens)`` over the whole split (EOS counts as
    a target when the song fits). Computed in float32 on every device.

    Args:
        checkpoint_dir: a model folder (``config.json`` + ``model.safetensors`` + ``tokenizer.json``), or a
            training run folder (its ``model/``, else its newest ``checkpoints/step-N``).
        data_dir: a prepared corpus (``museformer prepare``).
        split: ``"train"``, ``"valid"`` or ``"test"``.
        max_lens: truncation lengths, each >= 2.
        batch_tokens: token budget of one batch (songs x longest song), >= 1.
        device: ``"auto"`` / None (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        progress: show a tqdm bar (songs scored, over all lengths).
        repeat_intervals: also score bars that repeat the bar k earlier, for each k given
            (``repeat_bar_nll``, at the longest ``max_lens``); none by default.

    Returns:
        ``{"checkpoint", "data_dir", "split", "songs", "results": [{"max_len", "tokens",
        "mean_nll", "perplexity", "unigram_perplexity"}, ...]}`` (one result per length, in the
        order given); ``unigram_perplexity`` is the baseline of ``unigram_perplexity``. With
        ``repeat_intervals``, also ``"repeat_bars"``: ``repeat_bar_nll``'s result.

    Raises:
        MuseformerError: naming the parameter (``max_lens``, ``batch_tokens``, ``split``, ...).
    """
    from museformer.checkpoint import load, resolve_checkpoint
    from museformer.train import resolve_device

    if not max_lens or any(int(L) < 2 for L in max_lens):
        raise ParameterError("max_lens", f"values must be >= 2, got {list(max_lens)}")
    if batch_tokens < 1:
        raise ParameterError("batch_tokens", f"must be >= 1, got {batch_tokens}")
    if any(int(k) < 1 for k in repeat_intervals):
        raise ParameterError("repeat_intervals", f"values must be >= 1, got {list(repeat_intervals)}")
    dev = resolve_device(device or "auto")
    checkpoint_dir = resolve_checkpoint(checkpoint_dir)
    model, tokenizer = load(checkpoint_dir)
    corpus = open_split(data_dir, split)
    if len(corpus) == 0:
        raise MuseformerError(f"split {split!r} of {data_dir} has no songs")
    if corpus.vocab.symbols != tokenizer.vocab.symbols:
        raise MuseformerError(
            f"checkpoint {checkpoint_dir} uses vocabulary {tokenizer.vocab.name!r} ({len(tokenizer.vocab)} ids) "
            f"but {data_dir} was prepared with {corpus.vocab.name!r} ({len(corpus.vocab)} ids)"
        )
    model = model.to(dev).eval()
    train_split = open_split(data_dir, "train")
    from tqdm.auto import tqdm

    bar = tqdm(total=len(corpus) * len(max_lens), unit="song", desc="perplexity", disable=not progress)
    results, repeats = [], None
    longest = max(int(L) for L in max_lens)
    try:
        for max_len in max_lens:
            bar.set_postfix(max_len=int(max_len), refresh=False)
            if repeat_intervals and repeats is None and int(max_len) == longest:  # one pass gives both
                repeats = repeat_bar_nll(model, corpus, longest, repeat_intervals, batch_tokens, dev,
                                         on_batch=bar.update)
                count, mean = repeats["all"]["tokens"], repeats["all"]["mean_nll"]
            else:
                total, count = corpus_nll(model, corpus, int(max_len), batch_tokens, dev, "fp32", on_batch=bar.update)
                mean = total / count
            results.append({"max_len": int(max_len), "tokens": count, "mean_nll": mean,
                            "perplexity": math.exp(mean) if mean < 700 else math.inf,
                            "unigram_perplexity": unigram_perplexity(train_split, corpus, int(max_len))})
    finally:
        bar.close()
    report = {"checkpoint": str(checkpoint_dir), "data_dir": str(data_dir), "split": split, "songs": len(corpus),
              "results": results}
    if repeats is not None:
        report["repeat_bars"] = repeats
    return report
