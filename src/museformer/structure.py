"""Musical structure of a token sequence: bars, onsets and the FC-attention pattern.

This module owns everything that is derived from *where the bars are*:

- ``bar_ids``: the 1-based bar number of every token (a bar ends right after its ``b-1``; a leading
  BOS is a pure prefix with bar 0);
- ``onset_ids``: the "beat id" of every token (``o-k`` sets it to k+1, following note tokens inherit
  it, tempo / time-signature / bar / special tokens get 0, and it resets at every bar);
- ``complete_bars``: how many bars are closed by a ``b-1`` (only those get a summary token).

All functions work on a single song ``(T,)`` or a batch ``(B, T)`` of token ids (torch tensors;
numpy arrays are accepted and converted). Padding (``PAD_ID``) gets bar id 0 and onset id 0 and is
never counted as a bar.
"""

from __future__ import annotations

import numpy as np
import torch

from museformer.vocab import BOS_ID, PAD_ID, TokenKind, Vocab


def _as_tensor(ids) -> torch.Tensor:
    if isinstance(ids, np.ndarray):
        return torch.from_numpy(ids.astype(np.int64, copy=False))
    if isinstance(ids, torch.Tensor):
        return ids.long()
    return torch.as_tensor(ids, dtype=torch.long)


def _lookup(table: np.ndarray, ids: torch.Tensor) -> torch.Tensor:
    """Per-id table lookup (kinds / values) that tolerates out-of-range ids (they map to -1)."""
    t = torch.from_numpy(np.asarray(table, dtype=np.int64)).to(ids.device)
    inside = (ids >= 0) & (ids < t.numel())
    return torch.where(inside, t[ids.clamp(0, t.numel() - 1)], torch.full_like(ids, -1))


def bar_ids(ids, vocab: Vocab) -> torch.Tensor:
    """1-based bar number of every token; 0 for a leading BOS and for padding.

    A bar ends right after its ``b-1`` token, so ``b-1`` belongs to the bar it closes.

    Shapes: ids ``(..., T)`` -> ``(..., T)`` int64.
    """
    ids = _as_tensor(ids)
    is_bar_end = ids == vocab.bar_id
    # bars closed strictly before each position
    closed_before = torch.cumsum(is_bar_end.long(), dim=-1) - is_bar_end.long()
    bars = closed_before + 1
    positions = torch.arange(ids.shape[-1], device=ids.device)
    is_prefix = (positions == 0) & (ids == BOS_ID)
    return torch.where(is_prefix | (ids == PAD_ID), torch.zeros_like(bars), bars)


def onset_ids(ids, vocab: Vocab) -> torch.Tensor:
    """Onset ("beat") id of every token: ``o-k`` -> k+1, inherited by the notes that follow it.

    Tempo, time-signature, bar and special tokens get 0; the id resets at every bar, so tokens of a
    new bar before its first ``o-*`` (only its ``t-*``/``s-*`` in practice) get 0.

    Shapes: ids ``(..., T)`` -> ``(..., T)`` int64.
    """
    ids = _as_tensor(ids)
    kinds = _lookup(vocab.kinds, ids)
    values = _lookup(vocab.values, ids)
    positions = torch.arange(ids.shape[-1], device=ids.device).expand_as(ids)
    minus_one = torch.full_like(ids, -1)
    last_onset = torch.cummax(torch.where(kinds == TokenKind.ONSET, positions, minus_one), dim=-1).values
    # the first position of the current bar = one after the last b-1 strictly before
    after_bar_end = torch.where(kinds == TokenKind.BAR, positions + 1, minus_one)
    bar_start = torch.cummax(after_bar_end, dim=-1).values
    bar_start = torch.cat([torch.zeros_like(bar_start[..., :1]), bar_start[..., :-1]], dim=-1).clamp(min=0)
    has_onset = (last_onset >= bar_start) & (last_onset >= 0)
    onset = torch.gather(values, -1, last_onset.clamp(min=0)) + 1
    inherits = (
        (kinds == TokenKind.ONSET)
        | (kinds == TokenKind.INSTRUMENT)
        | (kinds == TokenKind.PITCH)
        | (kinds == TokenKind.DURATION)
        | (kinds == TokenKind.VELOCITY)
    )
    return torch.where(has_onset & inherits, onset, torch.zeros_like(onset))


def complete_bars(ids, vocab: Vocab) -> torch.Tensor:
    """Number of bars closed by a ``b-1`` in each sequence. Shapes: ``(..., T)`` -> ``(...)``."""
    ids = _as_tensor(ids)
    return (ids == vocab.bar_id).sum(dim=-1)
