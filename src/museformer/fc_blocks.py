"""The fast FC-attention path: a bar-aligned block-sparse layout, FlexAttention, segment softmax.

This module owns the ``"flex"`` attention backend. It computes exactly what the dense reference in
``attention.py`` computes (the masks of ``structure.may_attend``), with work proportional to what
the pattern reads instead of ``T x (S + T)``:

- **Aggregation** (regular queries; keys = key2/value2 summaries + regular tokens) runs through
  ``flex_attention`` on a *bar-aligned* copy of the sequence: every bar (and BOS) starts at a
  multiple of ``block_size``, padding the gap. A query block then lies in exactly one bar, and a key
  block in exactly one bar, so whole blocks are either read in full (a fine bar, an earlier block of
  the own bar, a run of coarse summaries) or not at all; only the own bar's diagonal block, the last
  (padded) block of a bar and the summary blocks next to fine bars need the element-wise
  ``mask_mod``. The block tables are built from the bar lengths in O(number of blocks) with
  vectorised torch ops; no dense mask, not even a dense block mask, is ever evaluated.
- **Summarisation** (a summary attends to itself and all regular tokens of its bar) is a segment
  softmax over contiguous bars: O(T x D) with scatter ops, exact, differentiable on every device.

The ``mask_mod`` calls ``structure.may_attend`` itself, so the predicate stays the single source of
truth; tests hold the effective block mask and the outputs equal to the dense masks.

It knows nothing about projections, layers or the model; ``attention.py`` calls ``flex_layout``
once per forward and ``summarise`` / ``aggregate`` in every layer.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from museformer.structure import AttentionPattern, BarLayout, SlotKind, bar_relation

DEFAULT_BLOCK_SIZE = 128


@functools.cache
def _compiled_flex():
    # flex_attention is only fast (and on CPU only implemented) when compiled; compile it once per
    # process, independently of whether the model itself is compiled.
    return torch.compile(flex_attention, dynamic=False)


# =============================================================================================
# The bar-aligned layout and its block tables
# =============================================================================================
@dataclass(frozen=True)
class FlexLayout:
    """Everything the flex backend needs for one batch, built once per forward.

    Regular tokens are moved to ``slot`` in a padded sequence of length ``P`` (a multiple of
    ``block_size``) in which every bar starts on a block boundary; keys of the aggregation are
    ``[S_pad summary slots, P regular slots]`` with ``S_pad`` the summary count rounded up to whole
    blocks (0 without summaries).
    """

    block_size: int
    slot: torch.Tensor  # (B, T) int64: padded position of every token; -1 for PAD tokens
    padded_length: int  # P
    summary_slots: int  # S_pad
    block_mask: BlockMask  # queries (P) x keys (S_pad + P)


def _exclusive_cumsum(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return torch.cumsum(x, dim=dim) - x


def _rows_from_entries(row: torch.Tensor, col: torch.Tensor, num_rows: int, width: int, grouped: bool = False):
    """Per-row index lists from unique (row, col) entries: ``(num (R,), indices (R, width))`` int32.

    ``grouped``: entries already come row by row (then no sort: O(entries)); otherwise they are
    sorted (O(entries log entries)). ``width`` columns, as BlockMask expects.
    """
    if not grouped:
        order = torch.argsort(row * width + col)
        row, col = row[order], col[order]
    num = torch.bincount(row, minlength=num_rows)
    place = torch.arange(row.numel(), device=row.device) - _exclusive_cumsum(num)[row]
    indices = torch.zeros(num_rows, width, dtype=torch.int32, device=row.device)
    indices[row, place] = col.to(torch.int32)
    return num.to(torch.int32), indices


def _expand_ranges(start: torch.Tensor, count: torch.Tensor):
    """Flatten ranges ``[start, start + count)`` given per (row, range) into (row, value) entries."""
    rows, ranges = start.shape
    count = count.clamp(min=0).reshape(-1)
    which = torch.repeat_interleave(torch.arange(count.numel(), device=count.device), count)
    within = torch.arange(which.numel(), device=count.device) - _exclusive_cumsum(count)[which]
    return which // ranges, start.reshape(-1)[which] + within


def _bucket(n: int) -> int:
    """Round up to a number with at most 3 significant bits (<= 12.5% more), so that varying song
    lengths compile only a few kernel shapes (``flex_attention`` is compiled for static shapes)."""
    if n <= 8:
        return n
    shift = n.bit_length() - 3
    return -(-n >> shift) << shift


def flex_layout(
    layout: BarLayout,
    pattern: AttentionPattern,
    block_size: int = DEFAULT_BLOCK_SIZE,
    *,
    min_query_blocks: int = 0,
    min_summary_blocks: int = 0,
) -> FlexLayout:
    """Build the bar-aligned layout and its ``BlockMask`` from the bar boundaries of a batch.

    Cost: O(T) to count bar lengths and place tokens, O(query blocks x (fine offsets + summary
    blocks)) to classify blocks, O(visited blocks) to list them. Full blocks (read without
    ``mask_mod``) are separated from partial ones.

    Args:
        layout: the slots of the batch (``structure.bar_layout``).
        pattern: the FC pattern (kind ``"fc"``; the ``"full"`` pattern is plain causal attention).
        block_size: tokens per block for queries and keys (the flex kernel's tile must divide it).
        min_query_blocks, min_summary_blocks: pad the layout to at least this many blocks (fixed
            shapes for benchmarks, tests and CUDA graphs); sizes are bucketed in any case.
    """
    if pattern.kind != "fc":
        raise ValueError("flex_layout builds the FC pattern; a 'full' pattern is plain causal attention")
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    kind, bar = layout.token_kind, layout.token_bar  # (B, T)
    device = kind.device
    batch, length = kind.shape
    bs = block_size

    # ---- segments: 0 = BOS, b = bar b; PAD tokens belong to none --------------------------------
    valid = (kind == SlotKind.REGULAR) | (kind == SlotKind.PREFIX)
    segment = torch.where(valid, bar, torch.zeros_like(bar))  # PREFIX has bar 0 already
    num_segments = int(segment.max()) + 1 if length else 1
    seg_len = torch.zeros(batch, num_segments, dtype=torch.long, device=device)
    seg_len.scatter_add_(1, segment, valid.long())  # (B, NS) tokens per segment
    seg_blocks = (seg_len + bs - 1) // bs  # (B, NS)
    seg_first_block = _exclusive_cumsum(seg_blocks)  # (B, NS)
    blocks_used = seg_blocks.sum(-1)  # (B,)
    num_q_blocks = _bucket(max(int(blocks_used.max()) if batch else 0, 1, min_query_blocks))
    padded = num_q_blocks * bs

    # rank of a token inside its segment: valid tokens before it minus those of earlier segments
    # (bars are contiguous and ordered, so this is robust even to stray padding)
    valid_before = _exclusive_cumsum(valid.long())
    rank = valid_before - torch.gather(_exclusive_cumsum(seg_len), 1, segment)
    slot = torch.gather(seg_first_block, 1, segment) * bs + rank
    slot = torch.where(valid, slot, torch.full_like(slot, -1))  # (B, T)

    # ---- the mask_mod: one int32 table, the bar of every slot (-1 in gaps, 0 for BOS) -------------
    slot_bar = torch.full((batch, padded + 1), -1, dtype=torch.int32, device=device)
    slot_bar.scatter_(1, torch.where(valid, slot, padded), segment.to(torch.int32))
    slot_bar = slot_bar[:, :padded]
    summaries = layout.num_summaries if pattern.has_summaries else 0
    summary_blocks = (summaries + bs - 1) // bs
    if summary_blocks or min_summary_blocks:
        summary_blocks = _bucket(max(summary_blocks, min_summary_blocks))
    summary_slots = summary_blocks * bs
    mask_mod = _fc_mask_mod(slot_bar, summaries, summary_slots, pattern)

    # ---- what every query block reads ------------------------------------------------------------
    # A query block lies in one segment (its bar, 0 = BOS) at block `r` inside it; blocks past the
    # song's last one are padding and read nothing.
    block = torch.arange(num_q_blocks, device=device).expand(batch, num_q_blocks)  # (B, NQ)
    q_seg = torch.searchsorted(torch.cumsum(seg_blocks, -1), block.contiguous(), right=True)  # (B, NQ)
    is_real = block < blocks_used[:, None]
    q_seg = torch.where(is_real, q_seg, torch.zeros_like(q_seg))
    r = block - torch.gather(seg_first_block, 1, q_seg)
    is_regular = is_real & (q_seg >= 1)

    def seg_info(seg: torch.Tensor):  # (B, NQ, C) -> first block, blocks, tail partial?
        flat = seg.clamp(0, num_segments - 1).reshape(batch, -1)
        first = torch.gather(seg_first_block, 1, flat).view_as(seg)
        n = torch.gather(seg_blocks, 1, flat).view_as(seg)
        ragged = (torch.gather(seg_len, 1, flat) % bs != 0).view_as(seg)
        return first, n, ragged

    # Regular key ranges, one per candidate segment: own bar, the other fine bars, BOS. The fine
    # distances are where structure.bar_relation says "fine" (0 = the own bar, handled apart).
    offsets = torch.tensor([d for d in pattern.fine_distances if d > 0], dtype=torch.long, device=device)
    fine_seg = q_seg[..., None] - offsets  # (B, NQ, F)
    fine_ok = is_regular[..., None] & (fine_seg >= 1)
    bos_seg = torch.zeros_like(q_seg)[..., None]
    bos_ok = is_regular[..., None] & (seg_len[:, :1] > 0)[:, None, :]
    cand_seg = torch.cat([q_seg[..., None], fine_seg, bos_seg], dim=-1)  # (B, NQ, C)
    cand_ok = torch.cat([is_real[..., None], fine_ok, bos_ok], dim=-1)
    first, n, ragged = seg_info(cand_seg)
    own = torch.zeros_like(cand_ok)
    own[..., 0] = True
    # own bar: blocks before the query block are full, the diagonal block is causal (partial);
    # other bars: all blocks full except a ragged (padded) last block.
    full_count = torch.where(own, r[..., None], n - ragged.long())
    partial_block = torch.where(own, first + r[..., None], first + n - 1)
    has_partial = own | ragged
    full_count = torch.where(cand_ok, full_count, torch.zeros_like(full_count))
    has_partial = cand_ok & has_partial
    full_start = first + summary_blocks  # key blocks: summaries first
    partial_block = partial_block + summary_blocks

    # Summary key blocks: block k holds the summaries of bars lo..hi. The coarse bars of bar b are
    # 1..b-1 minus the fine ones; count how many of lo..hi are coarse to classify the block.
    k = torch.arange(summary_blocks, device=device)
    lo = k * bs + 1
    hi = torch.clamp((k + 1) * bs, max=summaries)
    b = q_seg[..., None]  # (B, NQ, 1)
    top = torch.minimum(hi, b - 1)  # (B, NQ, K)
    earlier = (top - lo + 1).clamp(min=0)
    fine_bars = b[..., None] - offsets  # (B, NQ, 1, F)
    fine_inside = ((fine_bars >= lo[:, None]) & (fine_bars <= top[..., None])).sum(-1)
    coarse = torch.where(is_regular[..., None], earlier - fine_inside, torch.zeros_like(earlier))
    summary_full = coarse == (hi - lo + 1)  # every summary in the block is read (hi < S_pad: pads never)
    summary_full = summary_full & (coarse > 0) & ((k + 1) * bs <= summaries)
    summary_partial = (coarse > 0) & ~summary_full

    # ---- list the blocks --------------------------------------------------------------------------
    rows = batch * num_q_blocks
    num_kv_blocks = summary_blocks + num_q_blocks
    ks = k.expand(batch, num_q_blocks, summary_blocks)
    full_row, full_col = _expand_ranges(
        torch.cat([full_start, ks], -1).reshape(rows, -1),
        torch.cat([full_count, summary_full.long()], -1).reshape(rows, -1),
    )
    part_ok = torch.cat([has_partial, summary_partial], -1).reshape(rows, -1)
    part_val = torch.cat([partial_block, ks], -1).reshape(rows, -1)
    part_row, part_idx = part_ok.nonzero(as_tuple=True)
    part_col = part_val[part_row, part_idx]

    # both lists come row by row (row-major ranges and nonzero); order inside a row is free
    kv_num, kv_idx = _rows_from_entries(part_row, part_col, rows, num_kv_blocks, grouped=True)
    full_num, full_idx = _rows_from_entries(full_row, full_col, rows, num_kv_blocks, grouped=True)
    q_num, q_idx = _transpose(part_row, part_col, batch, num_q_blocks, num_kv_blocks)
    fq_num, fq_idx = _transpose(full_row, full_col, batch, num_q_blocks, num_kv_blocks)

    def shaped(x: torch.Tensor, *tail: int) -> torch.Tensor:
        return x.view(batch, 1, *tail)  # one head dimension: the pattern is the same for every head

    block_mask = BlockMask(
        seq_lengths=(padded, summary_slots + padded),
        kv_num_blocks=shaped(kv_num, num_q_blocks),
        kv_indices=shaped(kv_idx, num_q_blocks, num_kv_blocks),
        full_kv_num_blocks=shaped(full_num, num_q_blocks),
        full_kv_indices=shaped(full_idx, num_q_blocks, num_kv_blocks),
        q_num_blocks=shaped(q_num, num_kv_blocks),
        q_indices=shaped(q_idx, num_kv_blocks, num_q_blocks),
        full_q_num_blocks=shaped(fq_num, num_kv_blocks),
        full_q_indices=shaped(fq_idx, num_kv_blocks, num_q_blocks),
        BLOCK_SIZE=(bs, bs),
        mask_mod=mask_mod,
    )
    return FlexLayout(bs, slot, padded, summary_slots, block_mask)


def _fc_mask_mod(slot_bar: torch.Tensor, summaries: int, summary_slots: int, pattern: AttentionPattern):
    """``structure.may_attend`` for regular queries in the bar-aligned layout, on ``bar_relation``.

    Keys ``[0, summary_slots)`` are summary slots (slot j = bar j + 1; slots from ``summaries`` on
    are padding), the rest regular slots. Within a bar, slot order is token order, so "causal"
    compares slots. Only two int32 loads per query/key (the generic predicate needs six), and no
    ``IntEnum`` constants: FlexAttention's tracing mis-compiles ``tensor == SlotKind.X`` (torch
    2.13; tests hold this equal to the predicate).
    """

    def mask_mod(b, h, q_idx, kv_idx):
        q_bar = slot_bar[b, q_idx]
        is_summary = kv_idx < summary_slots
        # coarse: the summary of a coarse bar (earlier bars are all complete)
        _, coarse = bar_relation(q_bar - (kv_idx + 1), pattern)
        coarse = (kv_idx < summaries) & (q_bar >= 1) & coarse
        key_slot = (kv_idx - summary_slots).clamp(min=0)
        k_bar = slot_bar[b, key_slot]
        distance = q_bar - k_bar
        fine, _ = bar_relation(distance, pattern)
        causal = (distance != 0) | (key_slot <= q_idx)
        reads = (k_bar == 0) | ((k_bar >= 1) & fine & causal)  # BOS, own bar (causal), fine bars
        regular = ~is_summary & (q_bar >= 0) & (k_bar >= 0) & reads
        return coarse | regular

    return mask_mod


def _transpose(row: torch.Tensor, col: torch.Tensor, batch: int, num_q_blocks: int, num_kv_blocks: int):
    """The same blocks listed per key block (what the backward pass walks), in O(entries)."""
    b, q = row // num_q_blocks, row % num_q_blocks
    return _rows_from_entries(b * num_kv_blocks + col, q, batch * num_kv_blocks, num_q_blocks)


def effective_mask(fl: FlexLayout) -> torch.Tensor:
    """The element mask the flex kernel applies, ``(B, P, S_pad + P)`` bool (for tests and docs).

    Full blocks read everything, partial blocks read where ``mask_mod`` is True, others nothing.
    """
    bm = fl.block_mask
    batch = bm.kv_num_blocks.shape[0]
    nq, nkv = bm.kv_indices.shape[-2:]
    bs = fl.block_size

    def dense(num, idx):
        cols = torch.arange(nkv, device=idx.device)
        listed = cols < num[..., None]  # (B, 1, NQ, NKV) which list entries are used
        out = torch.zeros(batch, nq, nkv + 1, dtype=torch.bool, device=idx.device)
        target = torch.where(listed, idx.long(), nkv)[:, 0]
        out.scatter_(2, target, True)
        return out[..., :nkv].repeat_interleave(bs, 1).repeat_interleave(bs, 2)

    full = dense(bm.full_kv_num_blocks, bm.full_kv_indices)
    partial = dense(bm.kv_num_blocks, bm.kv_indices)
    b = torch.arange(batch)[:, None, None]
    q = torch.arange(nq * bs)[None, :, None]
    kv = torch.arange(nkv * bs)[None, None, :]
    return full | (partial & bm.mask_mod(b, 0, q, kv))


# =============================================================================================
# The two attention steps
# =============================================================================================
def _to_slots(x: torch.Tensor, fl: FlexLayout) -> torch.Tensor:
    """``(B, H, T, D)`` token-ordered -> ``(B, H, P, D)`` bar-aligned (zeros in the gaps)."""
    batch, heads, length, dim = x.shape
    flat = _flat_slot(fl, batch)
    rows = x.transpose(1, 2).reshape(batch * length, heads, dim)
    out = x.new_zeros(batch * fl.padded_length + 1, heads, dim).index_copy(0, flat, rows)
    return out[:-1].view(batch, fl.padded_length, heads, dim).transpose(1, 2).contiguous()


def _from_slots(x: torch.Tensor, fl: FlexLayout, length: int) -> torch.Tensor:
    """``(B, H, P, D)`` bar-aligned -> ``(B, H, T, D)`` token-ordered (PAD tokens get zeros)."""
    batch, heads, _, dim = x.shape
    flat = _flat_slot(fl, batch)
    rows = F.pad(x.transpose(1, 2).reshape(batch * fl.padded_length, heads, dim), (0, 0, 0, 0, 0, 1))
    return rows.index_select(0, flat).view(batch, length, heads, dim).transpose(1, 2)


def _flat_slot(fl: FlexLayout, batch: int) -> torch.Tensor:
    base = torch.arange(batch, device=fl.slot.device)[:, None] * fl.padded_length
    dump = batch * fl.padded_length  # PAD tokens go to (and come from) one extra, discarded row
    return torch.where(fl.slot >= 0, fl.slot + base, dump).reshape(-1)


def aggregate(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    summary_key: torch.Tensor | None,
    summary_value: torch.Tensor | None,
    fl: FlexLayout,
    scale: float | None = None,
) -> torch.Tensor:
    """Aggregation step: regular queries over ``[key2/value2 summaries, regular tokens]``.

    Shapes: query/key/value ``(B, H, T, D)``; summary_key/value ``(B, H, S, D)`` (or None without
    summaries) -> ``(B, H, T, D)``. Rows of PAD tokens are zeros.
    """
    length = query.shape[2]
    q, k, v = (_to_slots(x, fl) for x in (query, key, value))
    if fl.summary_slots:
        extra = fl.summary_slots - summary_key.shape[2]
        k = torch.cat([F.pad(summary_key, (0, 0, 0, extra)), k], dim=2)
        v = torch.cat([F.pad(summary_value, (0, 0, 0, extra)), v], dim=2)
    kernel_options = None
    if query.is_cuda and fl.block_size < DEFAULT_BLOCK_SIZE:
        # the default GPU tiles are 128 wide; a smaller sparse block needs tiles that divide it
        kernel_options = {"BLOCK_M": fl.block_size, "BLOCK_N": fl.block_size}
    out = _compiled_flex()(q, k, v, block_mask=fl.block_mask, scale=scale, kernel_options=kernel_options)
    return _from_slots(out, fl, length)


def summarise(
    summary_query: torch.Tensor,
    summary_key: torch.Tensor,
    summary_value: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: BarLayout,
    scale: float | None = None,
) -> torch.Tensor:
    """Summarisation step: each summary attends to itself and all regular tokens of its bar.

    A softmax per bar over contiguous segments (scatter ops, computed in at least float32): O(T x D)
    work.

    Shapes: summary_* ``(B, H, S, D)``; key/value ``(B, H, T, D)`` -> ``(B, H, S, D)``. Rows of PAD
    summary slots are zeros.
    """
    batch, heads, summaries, dim = summary_query.shape
    if summaries == 0:
        return summary_query.new_zeros(summary_query.shape)
    scale = dim**-0.5 if scale is None else scale
    dtype = summary_query.dtype
    work_dtype = torch.promote_types(dtype, torch.float32)
    sq, sk, sv, k, v = (x.to(work_dtype) for x in (summary_query, summary_key, summary_value, key, value))
    # summary slot of each token; tokens of no complete bar (BOS, PAD, an open last bar) go to a
    # dump slot S that is cut off at the end
    in_bar = (layout.token_kind == SlotKind.REGULAR) & (layout.token_bar <= summaries)
    seg = torch.where(in_bar, layout.token_bar - 1, summaries)  # (B, T)
    seg4 = seg[:, None, :, None].expand(batch, heads, -1, dim)
    sq = F.pad(sq, (0, 0, 0, 1))
    token_scores = (sq.gather(2, seg4) * k).sum(-1) * scale  # (B, H, T)
    token_scores = token_scores.masked_fill(~in_bar[:, None, :], float("-inf"))
    self_scores = F.pad((sq[:, :, :-1] * sk).sum(-1) * scale, (0, 1))  # (B, H, S + 1)
    seg3 = seg[:, None, :].expand(batch, heads, -1)
    # the per-bar maximum only stabilises exp(); softmax does not depend on it, so no gradient
    top = self_scores.detach().scatter_reduce(2, seg3, token_scores.detach(), "amax", include_self=True)
    token_w = torch.exp(token_scores - top.gather(2, seg3))  # (B, H, T)
    self_w = torch.exp(self_scores - top)  # (B, H, S + 1)
    total = self_w.scatter_add(2, seg3, token_w)
    weighted = (self_w[..., None] * F.pad(sv, (0, 0, 0, 1))).scatter_add(2, seg4, token_w[..., None] * v)
    out = (weighted / total[..., None])[:, :, :-1]
    is_summary = layout.summary_kind[:, None, :summaries, None] == SlotKind.SUMMARY
    return torch.where(is_summary, out, torch.zeros_like(out)).to(dtype)


# =============================================================================================
# The backend object attention.py dispatches to (same interface as its DenseBackend)
# =============================================================================================
@dataclass(frozen=True)
class FlexState:
    """The flex backend's per-batch data, shared by every layer: the bars themselves (for the
    summarisation) and the block layout (None for the plain causal 'full' pattern)."""

    layout: BarLayout
    blocks: FlexLayout | None


class FlexBackend:
    """Fast backend: block-sparse FlexAttention (aggregation) + segment softmax (summarisation).

    Exact (same masks as ``"dense"``). No attention dropout: the steps refuse ``dropout_p > 0``.
    FlexAttention has no CPU backward; on CPU use it for inference only.
    """

    name = "flex"

    def __init__(self, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        self.block_size = block_size

    def prepare(self, layout: BarLayout, pattern: AttentionPattern) -> FlexState:
        """The block layout of the batch, built once per forward from the bar boundaries."""
        blocks = flex_layout(layout, pattern, self.block_size) if pattern.kind == "fc" else None
        return FlexState(layout, blocks)

    @staticmethod
    def _no_dropout(dropout_p: float) -> None:
        if dropout_p > 0:
            raise ValueError(
                "the 'flex' attention backend has no attention dropout; train with attention_dropout=0 "
                "or with attention_backend='dense'"
            )

    def summarise(self, q_s, k_s, v_s, k_r, v_r, state: FlexState, dropout_p: float) -> torch.Tensor:
        """Segment softmax per bar. Shapes: q_s/k_s/v_s ``(B, H, S, Dh)``, k_r/v_r ``(B, H, T, Dh)``
        -> ``(B, H, S, Dh)``; rows of PAD summary slots are zeros."""
        self._no_dropout(dropout_p)
        return summarise(q_s, k_s, v_s, k_r, v_r, state.layout)

    def aggregate(self, q_r, k2, v2, k_r, v_r, state: FlexState, dropout_p: float) -> torch.Tensor:
        """Block-sparse flex attention. Shapes: q_r/k_r/v_r ``(B, H, T, Dh)``, k2/v2 ``(B, H, S, Dh)``
        -> ``(B, H, T, Dh)``; rows of PAD queries are zeros."""
        self._no_dropout(dropout_p)
        if state.blocks is None:  # the 'full' pattern: plain causal attention (no summaries)
            out = F.scaled_dot_product_attention(q_r, k_r, v_r, is_causal=True)
            is_pad = (state.layout.token_kind == SlotKind.PAD)[:, None, :, None]
            return out.masked_fill(is_pad, 0.0)
        return aggregate(q_r, k_r, v_r, k2, v2, state.blocks)
