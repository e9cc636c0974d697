"""Token-level NLL and perplexity: of one batch, of a corpus, of a checkpoint on a prepared split.

This module owns how a model is scored on prepared songs: ``batch_nll`` (the summed next-token
NLL of one collated batch, the quantity training minimises and evaluation accumulates),
``corpus_nll`` (over songs of a split, in deterministic length-sorted batches),
``evaluate_perplexity`` (the paper's perplexity at several truncation lengths) and
``unigram_perplexity`` (the baseline a sequence model must beat). The loss itself is
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


def batch_nll(model, batch: dict[str, torch.Tensor], device: torch.device, precision: str = "fp32"
              ) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL (nats, float32) over the non-padding targets of a batch, and their count."""
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    with autocast(device, precision):
        logits = model(batch["input_ids"], bar_ids=batch["bar_ids"], onset_ids=batch["onset_ids"])  # (B, T, V)
    targets = batch["target_ids"]
    return lm_loss(logits, targets, reduction="sum"), int((targets != PAD_ID).sum())


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


def evaluate_perplexity(
    checkpoint_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    split: str = "test",
    max_lens: tuple[int, ...] | list[int] = DEFAULT_MAX_LENS,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    device: str | None = None,
    progress: bool = False,
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

    Returns:
        ``{"checkpoint", "data_dir", "split", "songs", "results": [{"max_len", "tokens",
        "mean_nll", "perplexity", "unigram_perplexity"}, ...]}`` (one result per length, in the
        order given); ``unigram_perplexity`` is the baseline of ``unigram_perplexity``.

    Raises:
        MuseformerError: naming the parameter (``max_lens``, ``batch_tokens``, ``split``, ...).
    """
    from museformer.checkpoint import load, resolve_checkpoint
    from museformer.train import resolve_device

    if not max_lens or any(int(L) < 2 for L in max_lens):
        raise ParameterError("max_lens", f"values must be >= 2, got {list(max_lens)}")
    if batch_tokens < 1:
        raise ParameterError("batch_tokens", f"must be >= 1, got {batch_tokens}")
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
    results = []
    try:
        for max_len in max_lens:
            bar.set_postfix(max_len=int(max_len), refresh=False)
            total, count = corpus_nll(model, corpus, int(max_len), batch_tokens, dev, "fp32", on_batch=bar.update)
            mean = total / count
            results.append({"max_len": int(max_len), "tokens": count, "mean_nll": mean,
                            "perplexity": math.exp(mean) if mean < 700 else math.inf,
                            "unigram_perplexity": unigram_perplexity(train_split, corpus, int(max_len))})
    finally:
        bar.close()
    return {"checkpoint": str(checkpoint_dir), "data_dir": str(data_dir), "split": split, "songs": len(corpus),
            "results": results}
