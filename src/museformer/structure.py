"""Musical structure of a token sequence: bars, onsets and the FC-attention pattern.

This module owns everything that is derived from *where the bars are*:

- ``bar_ids``: the 1-based bar number of every token (a bar ends right after its ``b-1``; a leading
  BOS is a pure prefix with bar 0);
- ``onset_ids``: the "beat id" of every token (``o-k`` sets it to k+1, following note tokens inherit
  it, tempo / time-signature / bar / special tokens get 0, and it resets at every bar);
- ``complete_bars``: how many bars are closed by a ``b-1`` (only those get a summary token);
- ``BarTracker``: the same bar and onset ids, computed chunk by chunk (what a decoder needs);
- the FC-attention pattern: ``AttentionPattern`` (the pattern as data), ``bar_relation`` (the ONE
  rule: which earlier bars a bar reads finely or coarsely), ``may_attend`` (the predicate "may this
  slot attend to that one?", built on it), ``bar_layout`` (the attention slots of a batch)
  and ``dense_masks`` / ``attention_masks`` (the boolean masks of both attention steps);
- ``toy_song`` and ``render_pattern``: a picture of the pattern for the docs and the CLI.

It knows nothing about the network: attention.py and model.py consume the layout and the masks.

All functions work on a single song ``(T,)`` or a batch ``(B, T)`` of token ids (torch tensors;
numpy arrays are accepted and converted). Padding (``PAD_ID``) gets bar id 0 and onset id 0 and is
never counted as a bar.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

import numpy as np
import torch

from museformer.errors import MuseformerError
from museformer.vocab import BOS_ID, PAD_ID, TokenKind, Vocab


# token kinds that inherit the onset id of the last o-* of their bar
_INHERITS_ONSET = (TokenKind.ONSET, TokenKind.INSTRUMENT, TokenKind.PITCH, TokenKind.DURATION, TokenKind.VELOCITY)


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
    inherits = torch.zeros_like(kinds, dtype=torch.bool)
    for kind in _INHERITS_ONSET:
        inherits = inherits | (kinds == kind)
    return torch.where(has_onset & inherits, onset, torch.zeros_like(onset))


def complete_bars(ids, vocab: Vocab) -> torch.Tensor:
    """Number of bars closed by a ``b-1`` in each sequence. Shapes: ``(..., T)`` -> ``(...)``."""
    ids = _as_tensor(ids)
    return (ids == vocab.bar_id).sum(dim=-1)


class BarTracker:
    """``bar_ids`` and ``onset_ids`` computed incrementally, chunk by chunk, for a batch of songs.

    The state per song is what the next chunk needs to know of everything before it: the tokens
    read so far (the next position), the bars closed so far, and the onset id in force (0 after a
    ``b-1`` or before the first ``o-*`` of a bar). ``advance`` reads the next chunk of every song
    (right-padded with ``PAD_ID``; a chunk may be a whole prompt or one token) with vectorised ops
    only, so concatenating the chunks gives exactly ``bar_ids`` / ``onset_ids`` of the whole songs
    (tested). Padding gets bar 0 and onset 0 and moves no state.

    Shapes: state tensors ``(B,)`` int64.
    """

    def __init__(self, vocab: Vocab, batch: int, device: torch.device | str = "cpu") -> None:
        self.vocab = vocab
        self.kinds = torch.as_tensor(np.asarray(vocab.kinds, dtype=np.int64), device=device)  # (V,)
        self.values = torch.as_tensor(np.asarray(vocab.values, dtype=np.int64), device=device)  # (V,)
        inherits = torch.zeros_like(self.kinds, dtype=torch.bool)
        for kind in _INHERITS_ONSET:
            inherits |= self.kinds == kind
        self.inherits = inherits  # (V,)
        self._step_table = self._one_token_table()  # (V, 4)
        zeros = torch.zeros(batch, dtype=torch.long, device=device)
        self.next_pos, self.closed, self.onset = zeros, zeros.clone(), zeros.clone()
        self.all_started = False  # every song has read a token (then one-token chunks take the short path)

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these songs (indices into the batch), in this order."""
        self.next_pos, self.closed, self.onset = (x.index_select(0, rows) for x in (self.next_pos, self.closed, self.onset))

    def advance(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Read the next chunk of every song; returns its ``(bars, onsets, positions)``.

        Shapes: ids ``(B, Tq)`` -> three ``(B, Tq)`` int64 tensors (position = index in the song).
        """
        batch, length = ids.shape
        if length == 1 and self.all_started:
            return self._advance_one(ids[:, 0])
        real = ids != PAD_ID
        kind = self.kinds[ids]  # (B, Tq)
        at = torch.arange(length, device=ids.device).expand(batch, length)  # (B, Tq)
        positions = self.next_pos[:, None] + at
        is_end = (kind == TokenKind.BAR) & real
        ends_before = torch.cumsum(is_end.long(), dim=-1) - is_end.long()  # b-1 strictly before, in the chunk
        bars = self.closed[:, None] + ends_before + 1
        prefix = (positions == 0) & (ids == BOS_ID)
        bars = torch.where(prefix | ~real, torch.zeros_like(bars), bars)
        # the onset in force at each token: the last o-* of its bar in the chunk, else (no b-1
        # before it in the chunk) the one carried in, else none
        minus_one = torch.full_like(at, -1)
        last_onset = torch.cummax(torch.where(kind == TokenKind.ONSET, at, minus_one), dim=-1).values
        last_end = torch.cummax(torch.where(is_end, at, minus_one), dim=-1).values  # b-1 at or before
        end_before = torch.cat([minus_one[:, :1], last_end[:, :-1]], dim=-1)  # b-1 strictly before
        from_chunk = last_onset > end_before
        onset_value = self.values[ids.gather(1, last_onset.clamp(min=0))] + 1
        carried = torch.where(end_before < 0, self.onset[:, None], torch.zeros_like(bars))
        in_force = torch.where(from_chunk, onset_value, carried)  # (B, Tq)
        onsets = torch.where(self.inherits[ids] & real, in_force, torch.zeros_like(in_force))
        # state after the chunk: what is in force after each song's last real token
        count = real.sum(dim=1)  # (B,)
        last = (count - 1).clamp(min=0)[:, None]
        after = torch.where(is_end.gather(1, last), 0, in_force.gather(1, last))[:, 0]
        self.onset = torch.where(count > 0, after, self.onset)
        self.closed = self.closed + is_end.sum(dim=1)
        self.next_pos = self.next_pos + count
        self.all_started = bool((self.next_pos > 0).all())
        return bars, onsets, positions

    def _advance_one(self, token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``advance`` for one token per song after the first (a decoding step): the same rules
        from one lookup in a per-vocabulary table, in a third of the tensor ops.
        Shapes: token ``(B,)`` -> three ``(B, 1)``."""
        real, sets, inherits, keeps = self._step_table[token].unbind(1)  # (B,) each
        in_force = torch.where(sets > 0, sets, self.onset)  # PAD sets nothing: its onset is carried
        onsets = in_force * inherits  # PAD inherits nothing
        bars = (self.closed + 1) * real
        positions = self.next_pos
        self.onset = in_force * keeps  # a b-1 resets the onset
        self.closed = self.closed + (1 - keeps)
        self.next_pos = self.next_pos + real
        return bars[:, None], onsets[:, None], positions[:, None]

    def _one_token_table(self) -> torch.Tensor:
        """``(V, 4)`` int64 per token id: is it real (not PAD), the onset id it sets (``o-k``:
        k + 1, else 0), does it inherit the onset in force, does it keep the onset (0 for ``b-1``)."""
        real = torch.ones_like(self.kinds)
        real[PAD_ID] = 0
        sets = torch.where(self.kinds == TokenKind.ONSET, self.values + 1, 0)
        sets[PAD_ID] = 0
        inherits = self.inherits.long()
        inherits[PAD_ID] = 0
        keeps = (self.kinds != TokenKind.BAR).long()
        keeps[PAD_ID] = 1
        return torch.stack([real, sets, inherits, keeps], dim=1)


# =============================================================================================
# The FC-attention pattern
# =============================================================================================
#
# Every attention step sees two kinds of *slots*: the regular tokens of the song (led by BOS) and
# one summary token per complete bar. A slot is described by (kind, bar, position):
#
#   kind      SlotKind below (PAD slots never attend and are never attended to)
#   bar       1-based bar number (0 for BOS and padding); a summary carries the bar it summarises
#   position  index of a regular token in the sequence; a summary sits at the position of the
#             ``b-1`` that closes its bar (the moment the bar becomes summarisable)
#
# ``may_attend`` below is the single source of truth for who may attend to whom; the dense masks,
# the fast backend's block layout and the decoder's mask rows are all derived from it.


class SlotKind(IntEnum):
    """What an attention slot is. Stored per slot in ``BarLayout`` (int64)."""

    PAD = 0  # padding (right padding of a batch, or a summary slot of a song with fewer bars)
    PREFIX = 1  # the leading BOS: a pure prefix that belongs to no bar
    REGULAR = 2  # a token of the song
    SUMMARY = 3  # the summary token of one complete bar


PATTERN_KINDS = ("fc", "full")


@dataclass(frozen=True)
class AttentionPattern:
    """Which bars a token sees in full (fine) and which only through their summary (coarse).

    Attributes:
        fine_offsets: distances (in bars, > 0) of the earlier bars a regular token sees token by
            token; its own bar (distance 0, causal) is always fine. The paper's choice
            ``(1, 2, 4, 8, 12, 16, 24, 32)`` follows the peaks of the bar-similarity statistic.
        summary_tokens: summary tokens per complete bar: 1 (the paper) or 0 (fine attention only:
            earlier bars that are not fine are not seen at all).
        kind: ``"fc"`` (fine- and coarse-grained attention) or ``"full"`` (plain causal attention
            over all regular tokens: the dense baseline; needs ``fine_offsets=()`` and
            ``summary_tokens=0``, see ``AttentionPattern.full()``).
    """

    fine_offsets: tuple[int, ...] = (1, 2, 4, 8, 12, 16, 24, 32)
    summary_tokens: int = 1
    kind: str = "fc"

    def __post_init__(self) -> None:
        offsets = tuple(self.fine_offsets)
        if not all(isinstance(o, int) and not isinstance(o, bool) and o > 0 for o in offsets):
            raise ValueError(f"fine_offsets must be positive integers, got {self.fine_offsets!r}")
        if len(set(offsets)) != len(offsets):
            raise ValueError(f"fine_offsets has duplicates: {self.fine_offsets!r}")
        object.__setattr__(self, "fine_offsets", tuple(sorted(offsets)))
        if self.summary_tokens not in (0, 1):
            # The official code allows several summary tokens per bar; the paper (and this
            # implementation) uses one. 0 turns coarse attention off.
            raise ValueError(f"summary_tokens must be 0 or 1, got {self.summary_tokens!r}")
        if self.kind not in PATTERN_KINDS:
            raise ValueError(f"pattern kind must be one of {PATTERN_KINDS}, got {self.kind!r}")
        if self.kind == "full" and (self.fine_offsets or self.summary_tokens):
            raise ValueError("a 'full' pattern has no fine offsets and no summary tokens; use AttentionPattern.full()")

    @classmethod
    def full(cls) -> AttentionPattern:
        """Plain causal attention over all regular tokens (the dense baseline)."""
        return cls(fine_offsets=(), summary_tokens=0, kind="full")

    @property
    def has_summaries(self) -> bool:
        """Whether summary tokens (and so the summarisation step and coarse attention) exist."""
        return self.kind == "fc" and self.summary_tokens > 0

    @property
    def fine_distances(self) -> tuple[int, ...]:
        """Bar distances read token by token: 0 (the own bar, causal) and every fine offset."""
        return (0, *self.fine_offsets) if self.kind == "fc" else ()

    @property
    def first_coarse_distance(self) -> int | None:
        """The smallest bar distance that is coarse (3 for the paper's offsets); None without summaries.

        A bar's summary is first read by the tokens of the bar this many bars later.
        """
        if not self.has_summaries:
            return None
        return next(d for d in range(1, len(self.fine_distances) + 1) if d not in self.fine_distances)

    @property
    def horizon(self) -> int | None:
        """The farthest fine distance: a regular token of bar j is read only by bars j .. j + horizon,
        so a cache may evict it once the current bar is past that (None for ``"full"``: never)."""
        return max(self.fine_distances) if self.kind == "fc" else None

    def to_dict(self) -> dict:
        """JSON-native form (lists, ints, strings)."""
        return {"fine_offsets": list(self.fine_offsets), "summary_tokens": self.summary_tokens, "kind": self.kind}

    @classmethod
    def from_dict(cls, d: dict) -> AttentionPattern:
        """Inverse of ``to_dict``; unknown keys are an error."""
        unknown = set(d) - {"fine_offsets", "summary_tokens", "kind"}
        if unknown:
            raise ValueError(f"unknown attention pattern keys: {sorted(unknown)}")
        d = dict(d)
        if "fine_offsets" in d:
            d["fine_offsets"] = tuple(d["fine_offsets"])
        return cls(**d)


def bar_relation(distance, pattern: AttentionPattern) -> tuple[torch.Tensor, torch.Tensor]:
    """THE rule of the FC pattern: how a regular query of bar b reads the bar b - ``distance``.

    Returns ``(fine, coarse)`` bool tensors (elementwise over ``distance``, any shape):

    - ``fine``: read token by token (distance 0, the own bar, or a fine offset);
    - ``coarse``: read only through that bar's summary (any other earlier bar, when the pattern has
      summaries); a bar that is neither is not read at all.

    Everything else derives from it: ``may_attend`` (and so the dense masks and the decode-time mask
    rows of the cache), the flex backend's ``mask_mod`` and block classification (which walk
    ``pattern.fine_distances``, the distances where ``fine`` holds), and the cache's eviction
    horizon (``pattern.horizon``). A chain of ``==`` (no ``torch.isin``) keeps it usable inside
    FlexAttention's ``mask_mod``.
    """
    distance = torch.as_tensor(distance)
    fine = distance == 0
    for offset in pattern.fine_offsets:
        fine = fine | (distance == offset)
    coarse = (distance > 0) & ~fine if pattern.has_summaries else torch.zeros_like(fine)
    return fine, coarse


def may_attend(
    q_kind: torch.Tensor,
    q_bar: torch.Tensor,
    q_pos: torch.Tensor,
    k_kind: torch.Tensor,
    k_bar: torch.Tensor,
    k_pos: torch.Tensor,
    pattern: AttentionPattern,
) -> torch.Tensor:
    """May a query slot attend to a key slot? Elementwise over broadcast tensors; True = may attend.

    The rules (docs/spec.md section 2; BOS is a pure prefix):

    - a **summary** of bar i attends to itself and to *all* regular tokens of bar i (no causal
      restriction: only later bars ever read the summary);
    - a **regular** token of bar b at position p attends to (``bar_relation`` of the distance)
        * BOS,
        * regular tokens of its fine bars: its own bar up to p (causal) and bars b - o for every o in
          ``pattern.fine_offsets``,
        * the summaries of its coarse bars (every other earlier bar; every earlier bar is complete),
          once they exist (a summary sits at its ``b-1``, so it is read strictly after it);
      with ``kind="full"`` it attends to BOS and every regular token up to p instead;
    - **BOS** attends only to itself; **padding** attends to nothing and is never attended to.

    Shapes: all arguments broadcast together (any shape, ints or int64 tensors) -> a bool tensor.

    Decoding with a KV cache (``cache.FCCache``; the same rules): regular K/V of every token are
    cached per layer as tokens arrive and never change (regular queries are causal). The forward
    that reads the ``b-1`` closing bar i also computes bar i's summary through all layers (in layer
    l it reads its own key plus layer l's cached regular K/V of bar i) and caches its key2/value2.
    It is first read by bar i + ``pattern.first_coarse_distance`` (3 with the default offsets).
    Regular K/V of bar j are read only by bars up to j + ``pattern.horizon``, then may be evicted.
    A new query's mask row is this predicate evaluated for (REGULAR, its bar, its position) against
    the cached slots' tags.
    """
    q_kind, q_bar, q_pos, k_kind, k_bar, k_pos = (
        torch.as_tensor(x) for x in (q_kind, q_bar, q_pos, k_kind, k_bar, k_pos)
    )
    causal = k_pos <= q_pos
    to_prefix = k_kind == SlotKind.PREFIX
    if pattern.kind == "full":
        regular = (q_kind == SlotKind.REGULAR) & (to_prefix | ((k_kind == SlotKind.REGULAR) & causal))
        return regular | ((q_kind == SlotKind.PREFIX) & to_prefix & (k_pos == q_pos))

    fine, coarse = bar_relation(q_bar - k_bar, pattern)
    reads = to_prefix | ((k_kind == SlotKind.REGULAR) & fine & causal)
    if pattern.has_summaries:
        reads = reads | ((k_kind == SlotKind.SUMMARY) & coarse & (k_pos < q_pos))
    regular = (q_kind == SlotKind.REGULAR) & reads
    summary = (
        (q_kind == SlotKind.SUMMARY)
        & (k_bar == q_bar)
        & ((k_kind == SlotKind.REGULAR) | (k_kind == SlotKind.SUMMARY))
    )
    prefix = (q_kind == SlotKind.PREFIX) & to_prefix & (k_pos == q_pos)
    return regular | summary | prefix


# =============================================================================================
# Per-batch layout of slots, and the dense masks
# =============================================================================================
@dataclass(frozen=True)
class BarLayout:
    """The attention slots of a batch: regular tokens ``(B, T)`` and summary slots ``(B, S)``.

    Summary slot j of a song is the summary of its bar j+1; S is the largest number of complete
    bars in the batch (0 when the pattern has no summaries), so songs with fewer complete bars have
    PAD summary slots. Keys of both attention steps are ordered ``[summary slots, regular tokens]``
    (``key_*``, length S + T).
    """

    token_kind: torch.Tensor  # (B, T)  SlotKind
    token_bar: torch.Tensor  # (B, T)
    token_pos: torch.Tensor  # (B, T)
    summary_kind: torch.Tensor  # (B, S)  SUMMARY or PAD
    summary_bar: torch.Tensor  # (B, S)
    summary_pos: torch.Tensor  # (B, S)  position of the b-1 closing the bar; -1 for PAD

    @property
    def num_summaries(self) -> int:
        """S, the number of summary slots per song."""
        return self.summary_kind.shape[-1]

    @property
    def key_kind(self) -> torch.Tensor:
        """``(B, S + T)``"""
        return torch.cat([self.summary_kind, self.token_kind], dim=-1)

    @property
    def key_bar(self) -> torch.Tensor:
        """``(B, S + T)``"""
        return torch.cat([self.summary_bar, self.token_bar], dim=-1)

    @property
    def key_pos(self) -> torch.Tensor:
        """``(B, S + T)``"""
        return torch.cat([self.summary_pos, self.token_pos], dim=-1)


def bar_layout(token_ids, vocab: Vocab, pattern: AttentionPattern) -> BarLayout:
    """The slots of a right-padded batch of songs (each song with its own bars).

    A leading BOS (position 0) is the PREFIX slot, ``PAD_ID`` tokens are PAD, all others REGULAR.

    Shapes: token_ids ``(B, T)`` (or ``(T,)``, treated as B = 1) -> a ``BarLayout``.
    """
    ids = _as_tensor(token_ids)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2:
        raise ValueError(f"token ids must have shape (B, T) or (T,), got {tuple(ids.shape)}")
    batch, length = ids.shape
    device = ids.device
    positions = torch.arange(length, device=device).expand(batch, length)  # (B, T)
    kind = torch.full_like(ids, SlotKind.REGULAR)
    kind = torch.where((positions == 0) & (ids == BOS_ID), torch.full_like(ids, SlotKind.PREFIX), kind)
    kind = torch.where(ids == PAD_ID, torch.full_like(ids, SlotKind.PAD), kind)
    bars = bar_ids(ids, vocab)  # (B, T)

    n_summaries = int(complete_bars(ids, vocab).max()) if pattern.has_summaries and length else 0
    summary_pos = torch.full((batch, n_summaries), -1, dtype=torch.long, device=device)  # (B, S)
    if n_summaries:
        is_end = ids == vocab.bar_id
        rows, cols = is_end.nonzero(as_tuple=True)
        slot = (torch.cumsum(is_end.long(), dim=-1) - 1)[rows, cols]  # which bar each b-1 closes (0-based)
        summary_pos[rows, slot] = cols
    summary_kind = torch.where(summary_pos >= 0, SlotKind.SUMMARY, SlotKind.PAD).long()
    summary_bar = torch.where(
        summary_pos >= 0, torch.arange(1, n_summaries + 1, device=device).expand(batch, n_summaries), 0
    ).long()
    return BarLayout(kind, bars, positions.clone(), summary_kind, summary_bar, summary_pos)


def dense_masks(layout: BarLayout, pattern: AttentionPattern) -> tuple[torch.Tensor, torch.Tensor]:
    """The two boolean masks of one FC-attention layer, from ``may_attend`` (True = may attend).

    Returns:
        summary_mask ``(B, S, S + T)``: summary queries (summarisation step);
        regular_mask ``(B, T, S + T)``: regular-token queries (aggregation step).
        Keys are ``[summary slots, regular tokens]``. Rows of PAD queries are all False.
    """
    k_kind, k_bar, k_pos = (x[:, None, :] for x in (layout.key_kind, layout.key_bar, layout.key_pos))  # (B, 1, K)

    def rows(kind, bar, pos):  # (B, Q) -> (B, Q, K)
        return may_attend(kind[..., None], bar[..., None], pos[..., None], k_kind, k_bar, k_pos, pattern)

    summary_mask = rows(layout.summary_kind, layout.summary_bar, layout.summary_pos)
    regular_mask = rows(layout.token_kind, layout.token_bar, layout.token_pos)
    return summary_mask, regular_mask


def attention_masks(token_ids, config, vocab: Vocab | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense boolean masks of both attention steps for a right-padded batch of songs.

    Args:
        token_ids: ``(B, T)`` or ``(T,)`` ids, BOS first, ``PAD_ID`` right padding.
        config: a ``MuseformerConfig`` (its ``pattern`` and ``vocab``) or an ``AttentionPattern``.
        vocab: the vocabulary that finds the bar ends; defaults to the config's built-in one
            (``lmd6remi`` for a bare pattern).

    Returns:
        ``(summary_mask (B, S, S + T), regular_mask (B, T, S + T))``, True = may attend; keys are
        ``[summaries of the complete bars in bar order, then the regular tokens]``; S is the most
        complete bars of any song in the batch (0 without summaries).
    """
    pattern = config if isinstance(config, AttentionPattern) else config.pattern
    if vocab is None:
        vocab = Vocab.builtin(getattr(config, "vocab", "lmd6remi"))
    return dense_masks(bar_layout(token_ids, vocab, pattern), pattern)


# =============================================================================================
# Pictures of the pattern
# =============================================================================================
def toy_song(n_bars: int, vocab: Vocab, *, seed: int = 0, min_notes: int = 1, max_notes: int = 3,
             incomplete_last: bool = False) -> torch.Tensor:
    """A made-up song of ``n_bars`` bars with random lengths, for pictures and tests.

    Every bar is ``o-0`` then 1..3 notes (``p d v``) then ``b-1``; BOS comes first. With
    ``incomplete_last`` one more bar without ``b-1`` is appended.

    Shapes: -> ``(T,)`` int64.
    """
    rng = np.random.default_rng(seed)
    onset, bar_end = vocab.token_to_id("o-0"), vocab.bar_id
    ids = [BOS_ID]
    for bar in range(n_bars + int(incomplete_last)):
        ids.append(onset)
        for _ in range(int(rng.integers(min_notes, max_notes + 1))):
            ids += [vocab.id_of(TokenKind.PITCH, int(rng.integers(48, 84))), vocab.id_of(TokenKind.DURATION, 6),
                    vocab.id_of(TokenKind.VELOCITY, 20)]
        if bar < n_bars:
            ids.append(bar_end)
    return torch.tensor(ids, dtype=torch.long)


# colour codes of render_pattern
_NONE, _OWN_BAR, _FINE_BAR, _PREFIX, _COARSE, _SUMMARISE = range(6)


def pattern_picture(token_ids, pattern: AttentionPattern, vocab: Vocab) -> tuple[np.ndarray, BarLayout]:
    """Who attends to whom, as one ``(S + T, S + T)`` array of codes for one song.

    Rows are queries and columns keys, both ordered ``[summaries, regular tokens]``. Codes: 0 none,
    1 own bar (causal), 2 an earlier fine bar, 3 BOS, 4 a coarse bar's summary, 5 summarisation
    (a summary reading its bar).
    """
    layout = bar_layout(token_ids, vocab, pattern)
    if layout.token_kind.shape[0] != 1:
        raise ValueError("pattern_picture draws one song; pass token ids of shape (T,)")
    summary_mask, regular_mask = dense_masks(layout, pattern)
    allowed = torch.cat([summary_mask, regular_mask], dim=1)[0]  # (S + T, S + T)
    q_kind = torch.cat([layout.summary_kind, layout.token_kind], dim=-1)[0][:, None]  # (Q, 1)
    q_bar = torch.cat([layout.summary_bar, layout.token_bar], dim=-1)[0][:, None]
    k_kind, k_bar = layout.key_kind[0][None], layout.key_bar[0][None]  # (1, K)
    code = torch.full(allowed.shape, _FINE_BAR, dtype=torch.uint8)
    code[((k_bar == q_bar) & (k_kind == SlotKind.REGULAR)).expand_as(code)] = _OWN_BAR
    code[(k_kind == SlotKind.PREFIX).expand_as(code)] = _PREFIX
    code[(k_kind == SlotKind.SUMMARY).expand_as(code)] = _COARSE
    code[(q_kind == SlotKind.SUMMARY).expand_as(code)] = _SUMMARISE
    code[~allowed] = _NONE
    return code.numpy(), layout


def render_pattern(token_ids, pattern: AttentionPattern, vocab: Vocab, path: str | Path, *,
                   title: str | None = None) -> Path:
    """Draw the attention pattern of one song as a PNG (needs matplotlib).

    Summary slots come first and are set off from the regular tokens by black lines; thin grey lines
    mark bar ends. Returns the path written.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import ListedColormap
        from matplotlib.patches import Patch
    except ImportError:  # pragma: no cover - matplotlib is a declared extra
        raise MuseformerError("drawing the pattern needs matplotlib: pip install matplotlib") from None
    code, layout = pattern_picture(token_ids, pattern, vocab)
    n_summaries = layout.num_summaries
    colours = ["#ffffff", "#1f5fa8", "#7fb1e3", "#7f7f7f", "#f28e2b", "#59a14f"]
    labels = ["", "own bar (causal)", "fine bar", "BOS", "coarse bar summary", "summary reads its bar"]
    size = code.shape[0]
    fig, ax = plt.subplots(figsize=(11, 8.2))
    ax.imshow(code, cmap=ListedColormap(colours), vmin=0, vmax=len(colours) - 1, interpolation="nearest")
    # bar ends (a bar's b-1 is its last token) among the regular tokens, as thin lines
    ends = (layout.summary_pos[0][layout.summary_kind[0] == SlotKind.SUMMARY] + n_summaries + 0.5).tolist()
    if not n_summaries:
        ends = (torch.nonzero(torch.as_tensor(_as_tensor(token_ids)).flatten() == vocab.bar_id).flatten() + 0.5).tolist()
    for e in ends:
        ax.axhline(e, color="#cccccc", lw=0.4)
        ax.axvline(e, color="#cccccc", lw=0.4)
    if n_summaries:
        ax.axhline(n_summaries - 0.5, color="black", lw=1.2)
        ax.axvline(n_summaries - 0.5, color="black", lw=1.2)
    ax.set_xlim(-0.5, size - 0.5)
    ax.set_ylim(size - 0.5, -0.5)
    ax.set_xlabel(f"key: {n_summaries} summaries | {size - n_summaries} regular tokens")
    ax.set_ylabel("query: summaries | regular tokens")
    ax.set_title(title or f"FC-attention pattern, fine offsets {list(pattern.fine_offsets)}")
    used = sorted(set(np.unique(code).tolist()) - {_NONE})
    ax.legend(handles=[Patch(color=colours[c], label=labels[c]) for c in used], loc="upper left",
              bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path
