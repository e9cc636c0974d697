"""Bar-chunked FC-attention: exact, differentiable, with attention dropout, on any device.

This module owns the ``"chunks"`` attention backend (and ``"chunks-plain"``, the same through plain
ops). It computes exactly what the dense reference (``attention.DenseBackend``, masks of
``structure.may_attend``) computes, forward and backward, but only over the keys the pattern reads,
on every device, with no ``T x T`` tensor anywhere:

- **Aggregation.** The regular queries of one bar (a *chunk*) read the same key set: their coarse
  summaries (``key2``/``value2``), BOS, the whole fine bars ``b - o`` (contiguous token ranges) and
  their own bar (causally). The keys of every chunk are gathered into one row
  (``[coarse summaries, BOS, fine bars..., own bar]``), chunks of similar query and key length are
  stacked into a *group* (lengths padded up a short ladder), and groups are cut into *pieces* of
  bounded size (``_PIECE_ELEMENTS``); each piece is one batched matmul -> masked softmax -> matmul:
  one softmax over exactly the keys ``may_attend`` allows. A piece's mask (key padding, the own
  bar's causal triangle) is built on the fly from three numbers per chunk. No masked SDPA (masks
  push it off its fast CPU kernel) and no log-sum-exp merge of parts is needed.
- **Backward (flash-attention style).** ``_ChunkAttention`` keeps q, k, v, key2/value2 and the
  output; its backward recomputes each piece's scores and softmax (the same kernel on the same
  inputs gives the same weights) and scatters dQ / dK / dV back with ``index_add_``.
- **Summarisation.** A summary reads itself and its bar's tokens: a segment softmax over contiguous
  bars through plain ops; autograd keeps O(T x D) (per-token scores, weights and masks are T x H).
- **Attention dropout** is drawn only over the weights of the keys a query reads, and scales the
  kept weights by 1 / (1 - p), as SDPA does on the dense weights: the same distribution as the dense
  reference's dropout (drop probability p within 2**-33). In the aggregation each piece's mask comes
  from its own ``torch.Generator``, seeded from one seed per forward (``draw_seed``: from the default
  generator, so ``torch.manual_seed`` fixes it); the backward redraws the same mask.

**Memory.** What autograd keeps per layer is O(T x H x Dh): q, k, v, key2/value2 and the output
(no score, weight or dropout mask);
transients are one piece at a time (<= 2**22 elements per score tensor, about five such in a
piece's backward: ~80 MB in float32). The per-batch index state is ``query_rows`` (O(T)) and
``key_rows``: one entry per key column of each chunk, C x (fine-bar tokens + coarse summaries),
i.e. O(T x fine keys per query / bar length + C x S). The C x S term grows as (T / bar length)**2,
8 bytes each: at 32,768 tokens in bars of ~100 that is ~1 MB against 64 MB for one float32
(T, 8 x 64) tensor, so it passes a float tensor only beyond ~2.5 M tokens. The plain-ops path
(``recompute=False``) keeps every piece's scores, weights and masks: O(T x keys per query), with
keys per query including every coarse summary (T x S). The ``"full"`` pattern (no bars) runs
causal SDPA.

Notation: B batch, T regular tokens, S summary slots, H heads, Dh head width, C chunks (bars of the
batch, plus one per BOS), G a group of chunks, Lq / Lk a group's padded query / key length.
"""

from __future__ import annotations

import math
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
    """Chunks of similar length, stacked: ``n`` chunks of ``query_len`` queries x ``key_len`` keys.

    Which key a query reads is not stored (that would be ``n x Lq x Lk``): it follows from three
    numbers per chunk (``reads``), so the group's state is O(n x (Lq + Lk)).
    """

    query_rows: torch.Tensor  # (n * Lq,) flat token index (b * T + t) of every query row; padding rows -> B * T
    key_rows: torch.Tensor  # (n * Lk,) index into [B * T token keys, B * S summary keys, one zero key]
    query_count: torch.Tensor  # (n,) real queries of each chunk (rows past it are padding)
    key_count: torch.Tensor  # (n,) real keys of each chunk (columns past it are padding)
    own_start: torch.Tensor  # (n,) column where the chunk's own bar starts (the last key segment)
    query_len: int  # Lq
    key_len: int  # Lk

    def reads(self, lo: int, hi: int) -> torch.Tensor:
        """Which keys the queries of chunks ``lo:hi`` read. Shape ``(hi - lo, 1, Lq, Lk)`` bool.

        A real query i reads the real columns before its own bar and, inside it, columns up to
        itself (causal); a padding query row reads column 0 only, so its softmax stays finite.
        """
        device = self.query_count.device
        i = torch.arange(self.query_len, device=device)[None, :, None]  # (1, Lq, 1)
        j = torch.arange(self.key_len, device=device)[None, None, :]  # (1, 1, Lk)
        padding_row = i >= self.query_count[lo:hi, None, None]  # (m, Lq, 1)
        real = (j < self.key_count[lo:hi, None, None]) & (j - self.own_start[lo:hi, None, None] <= i)
        return torch.where(padding_row, j == 0, real)[:, None]  # (m, 1, Lq, Lk)


@dataclass(frozen=True)
class BarChunks:
    """What both attention steps need for one batch, built once per forward (``prepare``)."""

    layout: BarLayout
    pattern: AttentionPattern
    groups: tuple[ChunkGroup, ...]  # the aggregation, group by group (empty for the full pattern)
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
        return BarChunks(layout, pattern, (), summary_segment)

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
    groups = []
    for (glq, glk), members in zip(group_keys.tolist(), torch.split(order, sizes)):
        n = members.numel()
        b, qs, ql, cl, kl = song[members], query_start[members], query_len[members], coarse_len[members], key_len[members]
        sl, ss = seg_len[members], seg_start[members]  # (n, F + 2)
        # query rows
        i = torch.arange(glq, device=device)
        q_ok = i < ql[:, None]  # (n, Lq)
        q_flat = b[:, None] * length + qs[:, None] + i  # (n, Lq)
        # key columns: first the coarse summaries, then token segments: column j lies in the
        # segment whose [start, end) of the running sum holds it
        j = torch.arange(glk, device=device)
        jt = (j - cl[:, None]).clamp(min=0)  # (n, Lk) column among the token keys
        ends = sl.cumsum(1)  # (n, F + 2)
        seg = torch.searchsorted(ends, jt.contiguous(), right=True).clamp(max=sl.shape[1] - 1)
        within = jt - (ends - sl).gather(1, seg)  # (n, Lk) index inside its segment
        keys = b[:, None] * length + ss.gather(1, seg) + within
        if coarse_key.shape[1]:
            summary_key = coarse_key[members].gather(1, j.clamp(max=summaries - 1).expand(n, glk))
            keys = torch.where(j < cl[:, None], summary_key, keys)
        groups.append(ChunkGroup(
            torch.where(q_ok, q_flat, batch * length).reshape(-1),  # padding rows read (and write) a zero row
            torch.where(j < kl[:, None], keys, no_key).reshape(-1),
            ql, kl, kl - sl[:, -1], glq, glk,
        ))
    return BarChunks(layout, pattern, tuple(groups), summary_segment)


# =============================================================================================
# The two attention steps
# =============================================================================================
def _rows(x: torch.Tensor) -> torch.Tensor:
    """``(B, H, L, Dh)`` -> ``(B * L, H, Dh)`` rows (a view when x came from ``FCAttention._heads``)."""
    batch, heads, length, dim = x.shape
    return x.transpose(1, 2).reshape(batch * length, heads, dim)


def _dropout(weights: torch.Tensor, p: float) -> torch.Tensor:
    """Attention dropout on weights (default generator): kept ones scaled by 1 / (1 - p), the others 0."""
    if p <= 0:
        return weights
    return weights * dropout_keep(weights.shape, p, None, weights.device).to(weights.dtype).mul_(1.0 / (1.0 - p))


def dropout_keep(shape, p: float, generator: torch.Generator | None, device) -> torch.Tensor:
    """The keep mask of attention dropout (bool, each True with probability 1 - p); kept weights
    are then scaled by 1 / (1 - p).

    Each weight gets its own uniform 32-bit integer (two per ``random_`` 64-bit draw, about 2x
    cheaper than ``bernoulli_`` on CPU); it is dropped below ``round(p * 2**32)`` of the 2**32
    values, so the drop probability is p within 2**-33, finer than a float32 uniform. The same
    ``generator`` state gives the same mask (the aggregation's backward redraws it, never stores it).
    """
    count = math.prod(shape)
    bits = torch.empty((count + 1) // 2, dtype=torch.int64, device=device).random_(-2**63, None, generator=generator)
    return bits.view(torch.int32)[:count].view(shape) >= round(p * 2**32) - 2**31


# =============================================================================================
# Aggregation: pieces of groups, forward + recomputing backward (flash-attention style)
# =============================================================================================
# at most this many elements per piece in H x Lk x (Lq + 2 Dh), i.e. the scores (float32: 16 MB)
# plus the gathered keys and values; a piece's backward holds about five such tensors
_PIECE_ELEMENTS = 2**22


def pieces(chunks: BarChunks, heads: int, dim: int) -> list[tuple[ChunkGroup, int, int]]:
    """The groups cut into pieces ``(group, first chunk, end chunk)`` of bounded transient size.

    The order is fixed by the chunks (and H, Dh), so forward and backward walk the same pieces,
    and the i-th piece's dropout mask comes from ``piece_generator(seed, i)``.
    """
    out = []
    for g in chunks.groups:
        n = g.query_count.numel()
        step = max(1, _PIECE_ELEMENTS // (heads * g.key_len * (g.query_len + 2 * dim)))
        out += [(g, lo, min(lo + step, n)) for lo in range(0, n, step)]
    return out


def piece_generator(seed: int, index: int, device) -> torch.Generator:
    """The generator of piece ``index``'s dropout mask in the forward with ``seed``."""
    return torch.Generator(device=device).manual_seed((seed + index) % 2**63)


def draw_seed() -> int:
    """A dropout seed for one aggregation, from the default generator (``torch.manual_seed`` fixes it)."""
    return int(torch.randint(2**62, ()))


def _gather(rows: torch.Tensor, index: torch.Tensor, n: int, length: int) -> torch.Tensor:
    """Rows ``(R, H, Dh)`` picked by ``index`` ``(n * L,)`` -> ``(n, H, L, Dh)``, contiguous (so the
    products that read it twice do not copy it twice)."""
    return rows.index_select(0, index).view(n, length, *rows.shape[1:]).transpose(1, 2).contiguous()


def _key_rows(x: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """Token and summary keys (or values) as rows ``(B * T + B * S + 1, H, Dh)``, the last one zero."""
    return torch.cat([_rows(x), _rows(x2), x.new_zeros(1, *x.shape[1:2], x.shape[3])])


def _query_rows(x: torch.Tensor) -> torch.Tensor:
    """Token rows ``(B * T + 1, H, Dh)``, the last one zero (what padding query rows read)."""
    return torch.cat([_rows(x), x.new_zeros(1, x.shape[1], x.shape[3])])


def _piece_rows(g: ChunkGroup, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Query and key row indices of chunks ``lo:hi`` of a group: ``(m * Lq,)``, ``(m * Lk,)``."""
    return g.query_rows[lo * g.query_len:hi * g.query_len], g.key_rows[lo * g.key_len:hi * g.key_len]


def _scores(qg: torch.Tensor, kg: torch.Tensor, reads: torch.Tensor, work) -> torch.Tensor:
    """Scores (the queries come scaled by Dh**-0.5) in ``work`` precision, ``_MASKED`` where a query
    does not read a key: ``(m, H, Lq, Lk)``."""
    bias = torch.where(reads, 0.0, _MASKED).to(work)  # (m, 1, Lq, Lk): an in-place add beats masked_fill_
    return torch.matmul(qg, kg.transpose(-1, -2)).to(work).add_(bias)


class _ChunkAttention(torch.autograd.Function):
    """The aggregation with a recomputing backward: saves O(T x H x Dh), never a score or a mask.

    Forward per piece: scores -> softmax -> dropout -> weights @ V. Backward per piece: the same
    scores and softmax again (the same kernel on the same inputs: the same weights, so no
    log-sum-exp needs keeping), the dropout mask again from its generator, then dV = Pd^T dO,
    dS = P * (dO V^T * mask - rowsum(dO * O)), dQ = dS K, dK = dS^T Q, scattered into the rows
    with ``index_add_``.
    """

    @staticmethod
    def forward(ctx, q, k, v, k2, v2, chunks: BarChunks, dropout_p: float, seed: int):
        batch, heads, length, dim = q.shape
        dtype, work = q.dtype, torch.promote_types(q.dtype, torch.float32)
        with torch.autocast(q.device.type, enabled=False):
            q_rows, k_rows, v_rows = _query_rows(q).mul_(dim**-0.5), _key_rows(k, k2), _key_rows(v, v2)  # scaled q
            out = q.new_zeros(batch * length + 1, heads, dim)  # the last row: what padding rows write
            for index, (g, lo, hi) in enumerate(pieces(chunks, heads, dim)):
                m, lq, lk = hi - lo, g.query_len, g.key_len
                q_at, k_at = _piece_rows(g, lo, hi)
                vg = _gather(v_rows, k_at, m, lk)  # (m, H, Lk, Dh)
                weights = torch.softmax(_scores(_gather(q_rows, q_at, m, lq), _gather(k_rows, k_at, m, lk),
                                                g.reads(lo, hi), work), dim=-1)  # (m, H, Lq, Lk)
                if dropout_p > 0:  # drop weights; the 1 / (1 - p) scale goes on the (smaller) output
                    weights.mul_(dropout_keep(weights.shape, dropout_p, piece_generator(seed, index, q.device), q.device))
                rows = torch.matmul(weights.to(dtype), vg)  # (m, H, Lq, Dh)
                if dropout_p > 0:
                    rows.mul_(1.0 / (1.0 - dropout_p))
                rows = rows.transpose(1, 2).reshape(m * lq, heads, dim)
                out.index_copy_(0, q_at, rows)
        out = out[:-1].view(batch, length, heads, dim).transpose(1, 2)  # (B, H, T, Dh)
        ctx.save_for_backward(q, k, v, k2, v2, out)
        ctx.chunks, ctx.dropout_p, ctx.seed = chunks, dropout_p, seed
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, k2, v2, out = ctx.saved_tensors
        chunks, dropout_p, seed = ctx.chunks, ctx.dropout_p, ctx.seed
        batch, heads, length, dim = q.shape
        tokens, scale = batch * length, dim**-0.5
        dtype, work = q.dtype, torch.promote_types(q.dtype, torch.float32)
        with torch.autocast(q.device.type, enabled=False):
            q_rows, k_rows, v_rows = _query_rows(q).mul_(scale), _key_rows(k, k2), _key_rows(v, v2)  # scaled q
            d_out = _query_rows(grad.to(dtype))  # (B * T + 1, H, Dh); padding rows read the zero row
            d_dot = (d_out.to(work) * _query_rows(out).to(work)).sum(-1)  # (B * T + 1, H): rowsum(dO * O)
            d_q = torch.zeros(q_rows.shape, dtype=work, device=q.device)
            d_k = torch.zeros(k_rows.shape, dtype=work, device=q.device)
            d_v = torch.zeros(k_rows.shape, dtype=work, device=q.device)
            for index, (g, lo, hi) in enumerate(pieces(chunks, heads, dim)):
                m, lq, lk = hi - lo, g.query_len, g.key_len
                q_at, k_at = _piece_rows(g, lo, hi)
                qg, kg, vg = _gather(q_rows, q_at, m, lq), _gather(k_rows, k_at, m, lk), _gather(v_rows, k_at, m, lk)
                dog = _gather(d_out, q_at, m, lq)  # (m, H, Lq, Dh)
                if dropout_p > 0:  # the kept weights' 1 / (1 - p), applied to dO once (both uses need it)
                    dog = dog * (1.0 / (1.0 - dropout_p))
                d_dot_g = _gather(d_dot[..., None], q_at, m, lq)  # (m, H, Lq, 1)
                weights = torch.softmax(_scores(qg, kg, g.reads(lo, hi), work), dim=-1)  # P, as in the forward
                dropped = weights
                if dropout_p > 0:
                    keep = dropout_keep(weights.shape, dropout_p, piece_generator(seed, index, q.device), q.device)
                    dropped = weights * keep
                d_v.index_add_(0, k_at, torch.matmul(dropped.to(dtype).transpose(-1, -2), dog)
                               .transpose(1, 2).reshape(m * lk, heads, dim).to(work))
                d_weights = torch.matmul(dog, vg.transpose(-1, -2)).to(work)  # (m, H, Lq, Lk)
                if dropout_p > 0:
                    d_weights.mul_(keep)
                d_scores = d_weights.sub_(d_dot_g).mul_(weights).to(dtype)  # dS (scores of the scaled q)
                d_q.index_add_(0, q_at, torch.matmul(d_scores, kg).transpose(1, 2).reshape(m * lq, heads, dim).to(work))
                d_k.index_add_(0, k_at, torch.matmul(d_scores.transpose(-1, -2), qg)
                               .transpose(1, 2).reshape(m * lk, heads, dim).to(work))
        summaries = k2.shape[2]

        def back(rows, lo, n):  # rows lo:lo + n of a row gradient -> (B, H, n / B, Dh)
            return rows[lo:lo + n].to(dtype).view(batch, n // batch, heads, dim).transpose(1, 2)

        d_k_all = (back(d_k, 0, tokens), back(d_k, tokens, batch * summaries))
        d_v_all = (back(d_v, 0, tokens), back(d_v, tokens, batch * summaries))
        grads = (back(d_q.mul_(scale), 0, tokens), d_k_all[0], d_v_all[0], d_k_all[1], d_v_all[1])
        return (*(g if need else None for g, need in zip(grads, ctx.needs_input_grad)), None, None, None)


def _aggregate_autograd(q, k2, v2, k, v, chunks: BarChunks, dropout_p: float, seed: int) -> torch.Tensor:
    """The same pieces and dropout masks through plain ops (autograd saves every piece's scores,
    weights and masks: O(T x keys per query)); the reference of the recomputing backward."""
    batch, heads, length, dim = q.shape
    work = torch.promote_types(q.dtype, torch.float32)
    q_rows, k_rows, v_rows = _query_rows(q) * dim**-0.5, _key_rows(k, k2), _key_rows(v, v2)  # scaled q
    outs, at = [], []
    for index, (g, lo, hi) in enumerate(pieces(chunks, heads, dim)):
        m, lq, lk = hi - lo, g.query_len, g.key_len
        q_at, k_at = _piece_rows(g, lo, hi)
        scores = _scores(_gather(q_rows, q_at, m, lq), _gather(k_rows, k_at, m, lk), g.reads(lo, hi), work)
        weights = torch.softmax(scores, dim=-1)
        if dropout_p > 0:
            keep = dropout_keep(weights.shape, dropout_p, piece_generator(seed, index, q.device), q.device)
            weights = weights * keep.to(work).mul_(1.0 / (1.0 - dropout_p))
        outs.append(torch.matmul(weights.to(q.dtype), _gather(v_rows, k_at, m, lk)).transpose(1, 2).reshape(m * lq, heads, dim))
        at.append(q_at)
    out = q.new_zeros(batch * length + 1, heads, dim).index_copy(0, torch.cat(at), torch.cat(outs))
    return out[:-1].view(batch, length, heads, dim).transpose(1, 2)  # (B, H, T, Dh)


def aggregate(q: torch.Tensor, k2: torch.Tensor, v2: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              chunks: BarChunks, dropout_p: float = 0.0, *, seed: int | None = None,
              recompute: bool = True) -> torch.Tensor:
    """Regular queries over fine-bar tokens, BOS and coarse summaries, one softmax per chunk row.

    Shapes: q/k/v ``(B, H, T, Dh)``, k2/v2 ``(B, H, S, Dh)`` (S may be 0) -> ``(B, H, T, Dh)``;
    rows of PAD tokens are zeros. ``seed`` fixes the dropout masks (default: ``draw_seed()``).
    ``recompute=False`` runs the plain-ops path (same result and masks; autograd keeps
    O(T x keys per query)).
    """
    if chunks.pattern.kind == "full":
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        return out.masked_fill((chunks.layout.token_kind == SlotKind.PAD)[:, None, :, None], 0.0)
    if dropout_p > 0 and seed is None:
        seed = draw_seed()
    seed = 0 if seed is None else seed
    if recompute:
        return _ChunkAttention.apply(q, k, v, k2, v2, chunks, dropout_p, seed)
    return _aggregate_autograd(q, k2, v2, k, v, chunks, dropout_p, seed)


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
    (q/k/v ``(B, H, L, Dh)``, as ``FCAttention`` projects them). ``recompute=False`` selects the
    plain-ops aggregation (autograd keeps O(T x keys per query); kept for measurements and tests).
    """

    name = "chunks"

    def __init__(self, recompute: bool = True) -> None:
        self.recompute = recompute

    def prepare(self, layout: BarLayout, pattern: AttentionPattern) -> BarChunks:
        """The chunks and masks of the batch, shared by all layers."""
        return build_chunks(layout, pattern)

    def summarise(self, q_s, k_s, v_s, k_r, v_r, state: BarChunks, dropout_p: float) -> torch.Tensor:
        """Summary queries over themselves + all regular tokens of their bar -> ``(B, H, S, Dh)``."""
        return summarise(q_s, k_s, v_s, k_r, v_r, state, dropout_p)

    def aggregate(self, q_r, k2, v2, k_r, v_r, state: BarChunks, dropout_p: float) -> torch.Tensor:
        """Regular queries over fine-bar tokens, BOS and coarse summaries -> ``(B, H, T, Dh)``."""
        return aggregate(q_r, k2, v2, k_r, v_r, state, dropout_p, recompute=self.recompute)


class PlainBarChunkBackend(BarChunkBackend):
    """``"chunks-plain"``: the bar chunks with the plain-ops aggregation (same results and dropout
    masks; autograd keeps O(T x keys per query), so memory is not linear in length)."""

    name = "chunks-plain"

    def __init__(self) -> None:
        super().__init__(recompute=False)
