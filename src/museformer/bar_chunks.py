"""Bar-chunked FC-attention: exact, differentiable, with attention dropout, on any device.

This module owns the ``"chunks"`` attention backend. It computes exactly what the dense reference
(``attention.DenseBackend``, masks of ``structure.may_attend``) computes, forward and backward, but
only over the keys the pattern reads, with plain tensor ops (so autograd gives the backward on every
device) and no ``T x T`` tensor anywhere:

- **Aggregation.** The regular queries of one bar (a *chunk*) read the same key set: their coarse
  summaries (``key2``/``value2``), BOS, the whole fine bars ``b - o`` (contiguous token ranges) and
  their own bar (causally). The keys of every chunk are gathered into one row
  (``[coarse summaries, BOS, fine bars..., own bar]``), chunks of similar query and key length are
  stacked into a *group* (lengths padded up a short ladder), and each group is one batched matmul ->
  masked softmax -> matmul: one softmax over exactly the keys ``may_attend`` allows. The small
  additive mask of a group (key padding, the own bar's causal triangle) is built once per forward
  and shared by all layers. No masked SDPA (masks push it off its fast CPU kernel) and no
  log-sum-exp merge is needed.
- **Summarisation.** A summary reads itself and its bar's tokens: a segment softmax over contiguous
  bars, O(T x D).
- **Attention dropout** is drawn only over the weights of the keys a query reads (O(T x keys per
  query)), and scales the kept weights by 1 / (1 - p), as SDPA does on the dense weights: the same
  distribution as the dense reference's dropout (drop probability p within 2**-33).

Memory per layer is O(T x keys per query), keys per query = fine-bar tokens + coarse summaries (the
pattern reads every coarse summary, so that term is T x S). The ``"full"`` pattern (no bars) runs
causal SDPA.

Notation: B batch, T regular tokens, S summary slots, H heads, Dh head width, C chunks (bars of the
batch, plus one per BOS), G a group of chunks, Lq / Lk a group's padded query / key length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from museformer.structure import AttentionPattern, BarLayout, SlotKind

# lengths are padded up to the next size of this ladder (about x1.25 steps), so chunks of similar
# length share a group and waste little padding
_LADDER = (1, 2, 3, 4, 6, 8, 10, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256)
# a masked score: exp(_MASKED - anything the scores reach) is exactly 0 in float32 and bfloat16,
# and unlike -inf it keeps rows without any key (no coarse summary yet) free of NaN
_MASKED = -1e30


def _padded(n: torch.Tensor) -> torch.Tensor:
    """Round lengths up the ladder (then to multiples of 64 beyond it). Shapes: ``(N,)`` -> ``(N,)``."""
    ladder = torch.tensor(_LADDER, device=n.device)
    on_ladder = ladder[torch.searchsorted(ladder, n.clamp(max=_LADDER[-1]))]
    return torch.where(n > _LADDER[-1], (n + 63) // 64 * 64, on_ladder)


# =============================================================================================
# The per-batch state: chunks and groups
# =============================================================================================
@dataclass(frozen=True)
class ChunkGroup:
    """Chunks of similar length, stacked: ``n`` chunks of ``query_len`` queries x ``key_len`` keys."""

    query_rows: torch.Tensor  # (n * Lq,) flat token index (b * T + t) of every query row
    key_rows: torch.Tensor  # (n * Lk,) index into [B * T token keys, B * S summary keys, one zero key]
    bias: torch.Tensor  # (n, 1, Lq, Lk) float: 0 where the query reads the key, _MASKED elsewhere
    query_len: int  # Lq
    key_len: int  # Lk


@dataclass(frozen=True)
class BarChunks:
    """What both attention steps need for one batch, built once per forward (``prepare``)."""

    layout: BarLayout
    pattern: AttentionPattern
    groups: tuple[ChunkGroup, ...]  # the aggregation, group by group (empty for the full pattern)
    query_rows: torch.Tensor | None  # all groups' query_rows, concatenated (one gather per layer)
    key_rows: torch.Tensor | None  # all groups' key_rows, concatenated
    token_row: torch.Tensor | None  # (B * T,) row of each token in the groups' concatenated query rows
    summary_segment: torch.Tensor | None  # (B * T,) flat summary slot (b * S + j) a token belongs to; B * S = none


def build_chunks(layout: BarLayout, pattern: AttentionPattern) -> BarChunks:
    """Chunks, groups and masks of a batch from its bar boundaries (vectorised; no Python loop over bars).

    A chunk is one bar of one song (its regular tokens) or one song's BOS. Its keys are
    ``[its coarse summaries, BOS, bar b - o for each fine offset o (largest first), own bar]``;
    only the own bar needs a (causal) mask.
    """
    kind, bar = layout.token_kind, layout.token_bar  # (B, T)
    batch, length = kind.shape
    device = kind.device
    summaries = layout.num_summaries
    regular = kind == SlotKind.REGULAR

    # summarisation: the summary slot of every token of a complete bar
    summary_segment = None
    if summaries:
        slot = (bar - 1).clamp(0, summaries - 1)
        closed = regular & (bar >= 1) & (bar <= summaries)
        closed = closed & (layout.summary_kind.gather(1, slot) == SlotKind.SUMMARY)
        base = torch.arange(batch, device=device)[:, None] * summaries
        summary_segment = torch.where(closed, base + slot, batch * summaries).reshape(-1)

    if pattern.kind == "full":
        return BarChunks(layout, pattern, (), None, None, None, summary_segment)

    # ---- bars of every song: start and length (bar 0 = the BOS chunk) ----------------------------
    num_bars = int(bar[regular].max()) if bool(regular.any()) else 0
    width = num_bars + 1
    positions = torch.arange(length, device=device).expand(batch, length)
    has_bos = kind[:, 0] == SlotKind.PREFIX  # (B,)
    bar_of = torch.where(regular, bar, torch.zeros_like(bar))
    flat = (torch.arange(batch, device=device)[:, None] * width + bar_of).reshape(-1)  # (B * T,)
    counts = torch.zeros(batch * width, dtype=torch.long, device=device)
    counts.index_add_(0, flat, regular.reshape(-1).long())
    starts = torch.full((batch * width,), length, dtype=torch.long, device=device)
    starts.scatter_reduce_(0, flat, torch.where(regular, positions, length).reshape(-1), "amin")
    counts, starts = counts.view(batch, width), starts.view(batch, width)
    counts[:, 0] = has_bos.long()  # the BOS chunk: one query, position 0
    starts[:, 0] = 0

    # ---- chunks and their key segments ---------------------------------------------------------
    song, chunk_bar = (counts > 0).nonzero(as_tuple=True)  # (C,)
    offsets = torch.tensor(sorted(pattern.fine_offsets, reverse=True), dtype=torch.long, device=device)
    is_bos_chunk = chunk_bar == 0
    fine_bar = chunk_bar[:, None] - offsets  # (C, F)
    fine_ok = (fine_bar >= 1) & ~is_bos_chunk[:, None]
    fine_bar = fine_bar.clamp(min=0)
    bos_len = torch.where(is_bos_chunk, 1, has_bos[song].long())  # every regular query reads BOS
    own_len = torch.where(is_bos_chunk, 0, counts[song, chunk_bar])
    seg_len = torch.cat([bos_len[:, None], torch.where(fine_ok, counts[song[:, None], fine_bar], 0),
                         own_len[:, None]], dim=1)  # (C, F + 2)
    seg_start = torch.cat([torch.zeros_like(bos_len)[:, None], starts[song[:, None], fine_bar],
                           starts[song, chunk_bar][:, None]], dim=1)  # (C, F + 2)
    query_len, query_start = counts[song, chunk_bar], starts[song, chunk_bar]  # (C,)

    # coarse summaries of each chunk, in slot order: slot j (bar j + 1) of an earlier, non-fine bar
    if summaries and pattern.has_summaries:
        distance = chunk_bar[:, None] - torch.arange(1, summaries + 1, device=device)  # (C, S)
        fine = distance == 0
        for o in pattern.fine_offsets:
            fine = fine | (distance == o)
        coarse = (distance > 0) & ~fine & (layout.summary_kind[song] == SlotKind.SUMMARY)  # (C, S)
        coarse_len = coarse.sum(1)  # (C,)
        coarse_slot = torch.sort((~coarse).to(torch.int8), dim=1, stable=True).indices  # read slots first
        coarse_key = batch * length + song[:, None] * summaries + coarse_slot  # (C, S)
    else:
        coarse_len = torch.zeros_like(query_len)
        coarse_key = torch.zeros(len(song), 0, dtype=torch.long, device=device)
    key_len = coarse_len + seg_len.sum(1)  # (C,)
    no_key = batch * length + batch * summaries  # the zero key row

    # ---- groups of chunks with the same padded lengths -------------------------------------------
    lq, lk = _padded(query_len), _padded(key_len)
    group_keys, group_of = torch.unique(torch.stack([lq, lk], 1), dim=0, return_inverse=True)
    order = torch.argsort(group_of, stable=True)
    sizes = torch.bincount(group_of, minlength=len(group_keys)).tolist()
    groups, token_row, row_offset = [], torch.full((batch * length,), -1, dtype=torch.long, device=device), 0
    for (glq, glk), members in zip(group_keys.tolist(), torch.split(order, sizes)):
        n = members.numel()
        b, qs, ql, cl = song[members], query_start[members], query_len[members], coarse_len[members]
        sl, ss = seg_len[members], seg_start[members]  # (n, F + 2)
        # query rows
        i = torch.arange(glq, device=device)
        q_ok = i < ql[:, None]  # (n, Lq)
        q_flat = b[:, None] * length + qs[:, None] + i  # (n, Lq)
        token_row[q_flat[q_ok]] = row_offset + torch.arange(n * glq, device=device).view(n, glq)[q_ok]
        row_offset += n * glq
        # key columns: first the coarse summaries, then token segments: column j lies in the
        # segment whose [start, end) of the running sum holds it
        j = torch.arange(glk, device=device)
        jt = (j - cl[:, None]).clamp(min=0)  # (n, Lk) column among the token keys
        ends = sl.cumsum(1)  # (n, F + 2)
        seg = torch.searchsorted(ends, jt.contiguous(), right=True).clamp(max=sl.shape[1] - 1)
        within = jt - (ends - sl).gather(1, seg)  # (n, Lk) index inside its segment
        token_key = b[:, None] * length + ss.gather(1, seg) + within
        is_coarse = j < cl[:, None]
        k_ok = j < key_len[members][:, None]
        keys = token_key
        if coarse_key.shape[1]:
            summary_key = coarse_key[members].gather(1, j.clamp(max=summaries - 1).expand(n, glk))
            keys = torch.where(is_coarse, summary_key, token_key)
        is_own = ~is_coarse & (seg == sl.shape[1] - 1)
        # (n, Lq, Lk): the key exists, and inside the own bar it is not after the query
        reads = k_ok[:, None, :] & (~is_own[:, None, :] | (within[:, None, :] <= i[None, :, None]))
        reads = reads & q_ok[..., None]
        reads[:, :, 0] |= ~q_ok  # padding query rows read column 0, so their softmax stays finite
        bias = torch.zeros(reads.shape, dtype=torch.float32, device=device).masked_fill_(~reads, _MASKED)
        groups.append(ChunkGroup(
            torch.where(q_ok, q_flat, 0).reshape(-1),  # padding rows repeat token 0; their output is dropped
            torch.where(k_ok, keys, no_key).reshape(-1),
            bias[:, None], glq, glk,
        ))
    token_row = torch.where(token_row >= 0, token_row, row_offset)  # tokens of no chunk (PAD) -> a zero row
    query_rows = torch.cat([g.query_rows for g in groups])
    key_rows = torch.cat([g.key_rows for g in groups])
    return BarChunks(layout, pattern, tuple(groups), query_rows, key_rows, token_row, summary_segment)


# =============================================================================================
# The two attention steps
# =============================================================================================
def _rows(x: torch.Tensor) -> torch.Tensor:
    """``(B, H, L, Dh)`` -> ``(B * L, H, Dh)`` rows (a view when x came from ``FCAttention._heads``)."""
    batch, heads, length, dim = x.shape
    return x.transpose(1, 2).reshape(batch * length, heads, dim)


def _dropout(weights: torch.Tensor, p: float) -> torch.Tensor:
    """Attention dropout on weights: keep each with probability 1 - p, scale kept ones by 1 / (1 - p).

    Each weight gets its own uniform 32-bit integer (two per ``random_`` 64-bit draw, about 2x
    cheaper than ``bernoulli_`` on CPU); it is dropped below ``round(p * 2**32)`` of the 2**32
    values, so the drop probability is p within 2**-33, finer than a float32 uniform.
    """
    if p <= 0:
        return weights
    count = weights.numel()
    bits = torch.empty((count + 1) // 2, dtype=torch.int64, device=weights.device).random_(-2**63, None)
    bits = bits.view(torch.int32)[:count].view(weights.shape)
    keep = bits >= round(p * 2**32) - 2**31
    return weights * keep.to(weights.dtype).mul_(1.0 / (1.0 - p))


def aggregate(q: torch.Tensor, k2: torch.Tensor, v2: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              chunks: BarChunks, dropout_p: float = 0.0) -> torch.Tensor:
    """Regular queries over fine-bar tokens, BOS and coarse summaries, one softmax per chunk row.

    Shapes: q/k/v ``(B, H, T, Dh)``, k2/v2 ``(B, H, S, Dh)`` (S may be 0) -> ``(B, H, T, Dh)``;
    rows of PAD tokens are zeros.
    """
    batch, heads, length, dim = q.shape
    if chunks.pattern.kind == "full":
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        return out.masked_fill((chunks.layout.token_kind == SlotKind.PAD)[:, None, :, None], 0.0)
    scale = dim**-0.5
    q_rows = _rows(q)  # (B * T, H, Dh)
    zero = q.new_zeros(1, heads, dim)
    k_rows = torch.cat([_rows(k), _rows(k2), zero])  # (B * T + B * S + 1, H, Dh): every key there is
    v_rows = torch.cat([_rows(v), _rows(v2), zero])
    # one gather per tensor for all groups (one scatter in the backward), then a view per group
    q_sizes = [g.query_rows.numel() for g in chunks.groups]
    k_sizes = [g.key_rows.numel() for g in chunks.groups]
    q_groups = q_rows.index_select(0, chunks.query_rows).split(q_sizes)
    k_groups = k_rows.index_select(0, chunks.key_rows).split(k_sizes)
    v_groups = v_rows.index_select(0, chunks.key_rows).split(k_sizes)
    outs = []
    for g, qg, kg, vg in zip(chunks.groups, q_groups, k_groups, v_groups):
        n = g.query_rows.numel() // g.query_len
        qg = qg.view(n, g.query_len, heads, dim).transpose(1, 2)  # (n, H, Lq, Dh)
        kg = kg.view(n, g.key_len, heads, dim).transpose(1, 2)  # (n, H, Lk, Dh)
        vg = vg.view(n, g.key_len, heads, dim).transpose(1, 2)
        # scores in at least float32 (the float32 bias promotes them)
        scores = torch.matmul(qg, kg.transpose(-1, -2)).mul_(scale) + g.bias  # (n, H, Lq, Lk)
        weights = _dropout(torch.softmax(scores, dim=-1).to(vg.dtype), dropout_p)
        outs.append(torch.matmul(weights, vg).transpose(1, 2).reshape(n * g.query_len, heads, dim))
    out = torch.cat(outs + [zero.to(outs[0].dtype)]).index_select(0, chunks.token_row)  # (B * T, H, Dh)
    return out.view(batch, length, heads, dim).transpose(1, 2)  # (B, H, T, Dh)


def summarise(q_s: torch.Tensor, k_s: torch.Tensor, v_s: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              chunks: BarChunks, dropout_p: float = 0.0) -> torch.Tensor:
    """Each summary reads itself and every regular token of its bar (a segment softmax, O(T x D)).

    Computed in at least float32. Shapes: q_s/k_s/v_s ``(B, H, S, Dh)``, k/v ``(B, H, T, Dh)`` ->
    ``(B, H, S, Dh)``; rows of PAD summary slots are zeros.
    """
    batch, heads, summaries, dim = q_s.shape
    if summaries == 0:
        return q_s.new_zeros(q_s.shape)
    scale = dim**-0.5
    dtype = q_s.dtype
    work = torch.promote_types(dtype, torch.float32)
    seg = chunks.summary_segment  # (B * T,) in [0, B * S]
    def rows_and_zero(x):  # (B, H, S, Dh) -> (B * S + 1, H, Dh), the last row for tokens of no bar
        rows = _rows(x.to(work))
        return torch.cat([rows, rows.new_zeros(1, heads, dim)])

    sq, sk, sv = (rows_and_zero(x) for x in (q_s, k_s, v_s))  # (B * S + 1, H, Dh)
    tk, tv = (_rows(x.to(work)) for x in (k, v))  # (B * T, H, Dh)
    token_scores = (sq.index_select(0, seg) * tk).sum(-1) * scale  # (B * T, H)
    self_scores = (sq * sk).sum(-1) * scale  # (B * S + 1, H)
    # the per-bar maximum only stabilises exp(); the softmax does not depend on it (no gradient)
    top = self_scores.detach().scatter_reduce(0, seg[:, None].expand(-1, heads), token_scores.detach(), "amax")
    token_w = torch.exp(token_scores - top.index_select(0, seg))  # (B * T, H)
    self_w = torch.exp(self_scores - top)  # (B * S + 1, H)
    total = self_w.index_add(0, seg, token_w)  # (B * S + 1, H)
    token_w, self_w = _dropout(token_w, dropout_p), _dropout(self_w, dropout_p)
    weighted = (self_w[..., None] * sv).index_add(0, seg, token_w[..., None] * tv)  # (B * S + 1, H, Dh)
    out = (weighted / total[..., None])[:-1].view(batch, summaries, heads, dim).transpose(1, 2)  # (B, H, S, Dh)
    is_summary = (chunks.layout.summary_kind == SlotKind.SUMMARY)[:, None, :, None]
    return torch.where(is_summary, out, torch.zeros_like(out)).to(dtype)


# =============================================================================================
# The backend object attention.py dispatches to
# =============================================================================================
class BarChunkBackend:
    """Exact FC-attention by bar chunks: forward, backward and attention dropout on every device.

    ``prepare`` builds the chunks once per forward; ``summarise`` / ``aggregate`` are the two steps
    (q/k/v ``(B, H, L, Dh)``, as ``FCAttention`` projects them).
    """

    name = "chunks"

    def prepare(self, layout: BarLayout, pattern: AttentionPattern) -> BarChunks:
        """The chunks and masks of the batch, shared by all layers."""
        return build_chunks(layout, pattern)

    def summarise(self, q_s, k_s, v_s, k_r, v_r, state: BarChunks, dropout_p: float) -> torch.Tensor:
        """Summary queries over themselves + all regular tokens of their bar -> ``(B, H, S, Dh)``."""
        return summarise(q_s, k_s, v_s, k_r, v_r, state, dropout_p)

    def aggregate(self, q_r, k2, v2, k_r, v_r, state: BarChunks, dropout_p: float) -> torch.Tensor:
        """Regular queries over fine-bar tokens, BOS and coarse summaries -> ``(B, H, T, Dh)``."""
        return aggregate(q_r, k2, v2, k_r, v_r, state, dropout_p)
