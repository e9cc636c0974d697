"""FC-attention: one layer's two-step attention over regular tokens and bar summaries.

This module owns the attention *computation* of one layer (docs/spec.md section 2):

1. **Summarisation.** Every summary token (one per complete bar) is a query over itself and all
   regular tokens of its bar. Its output ``h`` (heads concatenated, before the output projection) is
   projected by ``key2`` / ``value2`` into the key and value that later bars see for this bar.
2. **Aggregation.** Every regular token is a query over ONE softmax covering the regular tokens of
   its fine bars, BOS, and the ``key2``/``value2`` summaries of its coarse bars.

Summary and regular tokens share the Q/K/V/out weights; each stream has its own Q/K/V biases.

``FCAttention.forward`` is the only place the layer's attention is computed: for training, evaluation,
prompt prefill and every decoding step. With a cache (``cache.LayerCache``) it also stores the new
tokens' regular K/V and the new summaries' key2/value2, and reads the cached slots back (the
model owns its cache, as in gpt-fast).

*Which* query may read *which* key is not decided here: it comes from ``structure.py`` (the rule
``bar_relation`` and the predicate ``may_attend`` built on it). A **backend** computes the two steps:

- ``prepare(layout: BarLayout, pattern) -> state``: once per forward, shared by all layers;
- ``summarise(q_s, k_s, v_s, k_r, v_r, state, dropout_p) -> (B, H, S, Dh)``;
- ``aggregate(q_r, k2, v2, k_r, v_r, state, dropout_p) -> (B, H, T, Dh)`` (k2/v2 may have S = 0);

with q/k/v ``(B, H, L, Dh)``; FCAttention never concatenates summaries and tokens. The backend of a
full forward is chosen by one config string, ``attention_backend``; ``BACKENDS`` lists them:

- ``"dense"``: boolean masks from ``structure.dense_masks`` + ``F.scaled_dot_product_attention``. Exact,
  runs anywhere (CPU training and inference), memory O(T^2) per song: the reference.

- ``"flex"``: the fast path of ``fc_blocks.py`` (block-sparse FlexAttention built from the bar
  boundaries + a segment softmax for summaries). Exact; no attention dropout; no CPU backward.
- ``"chunks"``: the bar-chunk path of ``bar_chunks.py`` (each bar's queries read their keys as
  whole bars, batched by length; coarse summaries in the same softmax). Exact, attention dropout,
  CPU and GPU backward, memory linear in length (the backward recomputes the weights);
  ``"chunks-plain"``: the same through plain ops (autograd keeps O(T x keys per query)).
- ``"auto"``: ``"chunks"`` on CPU; ``"flex"`` on CUDA, ``"dense"`` there when training needs
  attention dropout.

A cached step (a few new tokens per song over the cache's slots) uses ``CachedStepBackend``, the same
interface with mask rows from ``may_attend`` on the slots' tags (``cached_step_masks``); filling an
empty cache (a prompt) runs the model's own backend.

Notation: B batch, T regular tokens, S summary slots, K = S + T keys, D model width, H heads,
Dh = D / H; in a cached step Tq / Sq new tokens / summaries, N / Ns regular / summary slots.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from museformer.bar_chunks import BarChunkBackend, BarChunks, PlainBarChunkBackend
from museformer.fc_blocks import FlexBackend
from museformer.structure import (
    AttentionPattern,
    BarLayout,
    SlotKind,
    dense_masks,
    may_attend,
)


# =============================================================================================
# Inference-time weight layout (a CPU trick that lives with the weights it speeds up)
# =============================================================================================
def transposed_weight(owner: nn.Module, *weights: torch.Tensor) -> torch.Tensor:
    """The ``(out, in)`` weights concatenated along ``out`` and stored transposed ``(in, sum out)``,
    returned as its ``(sum out, in)`` view (column-major), cached on ``owner`` until any of them
    changes (their storage or version counter).

    A decoding step multiplies a few rows by every weight matrix and is bound by reading them; on
    CPU ``addmm`` reads the transposed layout faster than ``F.linear`` reads ``(out, in)`` (about
    12 % here, docs/benchmarks.md), and one fused Q/K/V product reads the input once. ``F.linear``
    of the returned view multiplies by the contiguous transposed matrix (one call, no reshapes).
    Used only without autograd (the cached copy is a constant).
    """
    key = [(w.data_ptr(), w._version, w.dtype) for w in weights]
    cached = owner.__dict__.get("_transposed_cache")
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, torch.cat([w.detach() for w in weights]).t().contiguous().t())
        owner.__dict__["_transposed_cache"] = cached
    return cached[1]


def _use_transposed(x: torch.Tensor) -> bool:
    return not torch.is_grad_enabled() and x.device.type == "cpu"


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state dict) that, without autograd on CPU, multiplies by a
    cached transposed copy of its weight (``transposed_weight``). Hooks and subclasses see an
    ordinary module call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _use_transposed(x):
            return F.linear(x, transposed_weight(self, self.weight), self.bias)
        return super().forward(x)


# =============================================================================================
# Backends: masks for a batch + masked attention
# =============================================================================================
@dataclass(frozen=True)
class DenseStepMask:
    """The dense mask of one attention step, ready for SDPA.

    Rows that may read nothing (padding queries) would give NaN in a softmax; they read every key
    instead (``allowed``) and their output is set to zero (``empty``), so padding never produces NaN
    values or gradients.
    """

    allowed: torch.Tensor  # (B, 1, Q, K) bool, True = may attend; empty rows all True
    empty: torch.Tensor  # (B, 1, Q, 1) bool, True for query rows that may read nothing

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> DenseStepMask:
        """From a ``(B, Q, K)`` mask of ``structure.dense_masks``."""
        empty = ~mask.any(dim=-1, keepdim=True)  # (B, Q, 1)
        return cls((mask | empty)[:, None], empty[:, None])  # add the head axis


@dataclass(frozen=True)
class DenseMasks:
    """The dense backend's masks for one batch; keys are ``[summaries, tokens]``."""

    summary: DenseStepMask  # queries: summary slots (B, 1, S, K)
    regular: DenseStepMask  # queries: regular tokens (B, 1, T, K)


class DenseBackend:
    """Reference backend: boolean masks + ``torch.nn.functional.scaled_dot_product_attention``."""

    name = "dense"

    def prepare(self, layout: BarLayout, pattern: AttentionPattern) -> DenseMasks:
        """Both steps' masks for the batch, built once per forward and shared by all layers."""
        summary_mask, regular_mask = dense_masks(layout, pattern)  # (B, S, K), (B, T, K)
        return DenseMasks(DenseStepMask.from_mask(summary_mask), DenseStepMask.from_mask(regular_mask))

    @staticmethod
    def _attend(q, k, v, mask: DenseStepMask, dropout_p: float) -> torch.Tensor:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.allowed, dropout_p=dropout_p)
        return out.masked_fill(mask.empty, 0.0)

    def summarise(self, q_s, k_s, v_s, k_r, v_r, state: DenseMasks, dropout_p: float) -> torch.Tensor:
        """Summary queries over themselves + their bar's regular tokens (the dense mask's keys are
        ``[summaries, tokens]``, so this backend concatenates them for SDPA).

        Shapes: q_s/k_s/v_s ``(B, H, S, Dh)``, k_r/v_r ``(B, H, T, Dh)`` -> ``(B, H, S, Dh)``.
        """
        return self._attend(q_s, torch.cat([k_s, k_r], 2), torch.cat([v_s, v_r], 2), state.summary, dropout_p)

    def aggregate(self, q_r, k2, v2, k_r, v_r, state: DenseMasks, dropout_p: float) -> torch.Tensor:
        """Regular queries over fine-bar tokens, BOS and coarse summaries, one softmax per query.

        Shapes: q_r/k_r/v_r ``(B, H, T, Dh)``, k2/v2 ``(B, H, S, Dh)`` (S may be 0) -> ``(B, H, T, Dh)``.
        """
        return self._attend(q_r, torch.cat([k2, k_r], 2), torch.cat([v2, v_r], 2), state.regular, dropout_p)


@dataclass(frozen=True)
class AutoState:
    """What ``AutoBackend.prepare`` chose for a batch: the backend and its state."""

    backend: object
    state: object


class AutoBackend:
    """The fastest exact backend per device, grad mode and length (decided per batch).

    From the measurements in docs/benchmarks.md: on CPU ``"chunks"`` (exact forward and backward,
    with attention dropout, linear memory; faster than the dense masks at every length measured);
    on CUDA ``"flex"``, except for training with attention dropout (flex has none), which keeps
    ``"dense"`` there (the bar chunks are not measured on a GPU yet).
    """

    name = "auto"

    def __init__(self, attention_dropout: float = 0.0) -> None:
        self.dense, self.flex, self.chunks = DenseBackend(), FlexBackend(), BarChunkBackend()
        self.attention_dropout = attention_dropout

    def choose(self, on_cuda: bool, grad: bool):
        """The backend for a batch on this device and grad mode (the chunks win at every CPU length measured)."""
        if on_cuda:
            return self.dense if grad and self.attention_dropout > 0 else self.flex
        return self.chunks

    def prepare(self, layout: BarLayout, pattern: AttentionPattern) -> AutoState:
        """The state of whichever backend ``choose`` picks for this batch."""
        backend = self.choose(layout.token_kind.is_cuda, torch.is_grad_enabled())
        return AutoState(backend, backend.prepare(layout, pattern))

    def summarise(self, q_s, k_s, v_s, k_r, v_r, state: AutoState, dropout_p: float) -> torch.Tensor:
        """The chosen backend's summarisation step."""
        return state.backend.summarise(q_s, k_s, v_s, k_r, v_r, state.state, dropout_p)

    def aggregate(self, q_r, k2, v2, k_r, v_r, state: AutoState, dropout_p: float) -> torch.Tensor:
        """The chosen backend's aggregation step."""
        return state.backend.aggregate(q_r, k2, v2, k_r, v_r, state.state, dropout_p)


BACKENDS = {"dense": DenseBackend, "flex": FlexBackend, "chunks": BarChunkBackend, "chunks-plain": PlainBarChunkBackend,
            "auto": AutoBackend}


def get_backend(name: str, attention_dropout: float = 0.0):
    """A backend instance by its config name (``MuseformerConfig.attention_backend``).

    ``attention_dropout`` lets ``"auto"`` keep the dense path where training needs dropout.
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from {sorted(BACKENDS)}")
    return AutoBackend(attention_dropout) if name == "auto" else BACKENDS[name]()


# =============================================================================================
# Cached steps: a few new queries per song over the cache's slots
# =============================================================================================
@dataclass(frozen=True)
class CachedStepMasks:
    """The mask rows of a cached forward, from ``structure.may_attend`` on the slots' tags.

    The cache's slots come as one joint key set (``cache.FCCache``: the summary slots' key2/value2,
    then the regular slots' K/V), so a new token's row covers both in one softmax. Additive float
    masks (0 = may attend, -inf = may not), one row per song, head and query (the ``(B * H)`` axis
    of the attention's ``bmm``), so a step folds them into its score products; rows that may read
    nothing read everything instead and their output is zeroed (``*_empty``, None when there are
    none), as in ``DenseStepMask``. ``regular`` is a view of ``regular_row`` ``(B * H, Tq, W)``, as
    wide as the cache's joint buffer, so that ``extended`` can add a slot.
    """

    regular: torch.Tensor  # (B * H, Tq, Cs + N): new regular tokens over the joint slots
    regular_empty: torch.Tensor | None  # (B, 1, Tq, 1)
    summary_to_summary: torch.Tensor | None  # (R * H, Sq, Sq): the new summaries among themselves
    summary_to_slots: torch.Tensor | None  # (R * H, Sq, Cs + N): the new summaries over the joint slots
    summary_empty: torch.Tensor | None  # (R, 1, Sq, 1)
    regular_row: torch.Tensor | None = None  # (B * H, Tq, W)
    summary_songs: torch.Tensor | None = None  # (R,) the songs the Sq summary rows belong to

    def extended(self, new_slots: torch.Tensor, width: int) -> CachedStepMasks:
        """The rows of the next token of the same bar (one query per song, no new summary).

        ``may_attend`` gives it the previous token's row plus its own new slot: every earlier slot
        has the same bar relation (same bar) and an earlier position, and summaries are read only
        strictly after their ``b-1``, which would have started a new bar. So the predicate need not
        run again inside a bar (the cache decides when this holds; the tests compare the logits).

        Args:
            new_slots: ``(B * H,)`` flat indices ``(b * H + h) * W + slot`` of each song's new
                joint slot (the cache's K/V write indices, which address ``regular_row`` alike).
            width: joint slots read after this step (Cs + N).
        """
        self.regular_row.view(-1).index_fill_(0, new_slots, 0.0)
        return dataclasses.replace(self, regular=self.regular_row[..., :width])


def _bias(heads: int, dtype: torch.dtype, *allowed: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Additive masks ``(B * H, Q, K_i)`` of ``dtype`` from bool masks ``(B, Q, K_i)`` that together
    form each query's row, and the ``(B, 1, Q, 1)`` rows that may read nothing (None when there are none)."""
    empty = ~torch.stack([a.any(dim=-1) for a in allowed]).any(dim=0)[..., None]  # (B, Q, 1)
    has_empty = bool(empty.any())
    biases = []
    for a in allowed:
        if has_empty:
            a = a | empty
        B, Q, K = a.shape
        bias = torch.zeros((B, heads, Q, K), dtype=dtype, device=a.device)
        biases.append(bias.masked_fill_(~a[:, None], float("-inf")).view(B * heads, Q, K))
    return biases, (empty[:, None] if has_empty else None)


def cached_step_masks(query, summary_query, slots, pattern: AttentionPattern, heads: int,
                      capacity: int = 0, summary_songs: torch.Tensor | None = None,
                      dtype: torch.dtype = torch.float32) -> CachedStepMasks:
    """The mask rows of one cached forward, all from ``may_attend``.

    Args:
        query: ``(kind, bar, pos)`` of the new regular tokens, each ``(B, Tq)``.
        summary_query: the same for the new summaries ``(R, Sq)`` (None when no bar closes).
        slots: the tags of the cache's joint slots (summary slots, then regular), each ``(B, Cs + N)``.
        heads: H, attention heads (the masks have one row per song and head).
        capacity: W, the width of the cache's joint buffer (the width of ``regular_row``; 0 = Cs + N).
        summary_songs: ``(R,)`` the songs of the summary rows (None: all B songs).
        dtype: of the additive masks: the dtype of the scores they are added to (the cache's).
    """
    def rows(q, k):  # (B, Q) x (B, K) -> (B, Q, K)
        return may_attend(*(x[..., None] for x in q), *(x[:, None, :] for x in k), pattern)

    (to_slots,), empty = _bias(heads, dtype, rows(query, slots))
    BH, Tq, n = to_slots.shape
    row = torch.full((BH, Tq, max(capacity, n)), float("-inf"), dtype=dtype, device=to_slots.device)
    row[..., :n] = to_slots
    if summary_query is None:
        return CachedStepMasks(row[..., :n], empty, None, None, None, row)
    song_slots = slots if summary_songs is None else tuple(x.index_select(0, summary_songs) for x in slots)
    # a new summary reads its own fresh key (summary_to_summary), never a summary slot: its own
    # slot gets its key2 only after this step's summarisation
    regular_slots = (song_slots[0] != int(SlotKind.SUMMARY))[:, None, :]  # (R, 1, Cs + N)
    (s_to_s, s_to_r), s_empty = _bias(heads, dtype, rows(summary_query, summary_query),
                                      rows(summary_query, song_slots) & regular_slots)
    return CachedStepMasks(row[..., :n], empty, s_to_s, s_to_r, s_empty, row, summary_songs)


def _flat_heads(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(0, -3)  # (B, H, L, Dh) -> (B * H, L, Dh); (B * H, L, Dh) stays


def _attend_slots(q, k, v, bias, empty) -> torch.Tensor:
    """Masked softmax attention of a few queries over cache slots: scale, score product and mask
    in one ``baddbmm``, then a softmax and one ``bmm``.

    Keys and values come as ``(B * H, N, Dh)``: the cache hands out such views of its buffers
    (``bmm`` reads them in place; ``torch.matmul`` on 4-d views of the buffers copied the whole
    slice every call: 10x slower at batch 64).

    Shapes: q ``(B, H, Q, Dh)``, k/v ``(B * H, N, Dh)``, bias ``(B * H, Q, N)`` -> ``(B, H, Q, Dh)``.
    """
    B, H, Q, Dh = q.shape
    scores = torch.baddbmm(bias, q.reshape(B * H, Q, Dh), k.transpose(1, 2), alpha=Dh**-0.5)  # (B * H, Q, N)
    out = torch.bmm(torch.softmax(scores, dim=-1), v).view(B, H, Q, Dh)
    return out if empty is None else out.masked_fill(empty, 0.0)


def _two_part_attend(q, k_a, v_a, bias_a, k_b, v_b, bias_b, empty) -> torch.Tensor:
    """One softmax over two key sets without concatenating them (the second is a cache buffer).

    Keys and values come as ``(B * H, L, Dh)`` views or ``(B, H, L, Dh)`` tensors (flattened here),
    as in ``_attend_slots``.

    Shapes: q ``(B, H, Q, Dh)``, k/v ``(B * H, A|N, Dh)``, bias ``(B * H, Q, A|N)`` -> ``(B, H, Q, Dh)``.
    """
    B, H, Q, Dh = q.shape
    q = q.reshape(B * H, Q, Dh)
    k_a, v_a, k_b, v_b = (_flat_heads(x) for x in (k_a, v_a, k_b, v_b))  # (B * H, L, Dh)
    scale = Dh**-0.5
    scores_a = torch.baddbmm(bias_a, q, k_a.transpose(1, 2), alpha=scale)  # (B * H, Q, A)
    scores_b = torch.baddbmm(bias_b, q, k_b.transpose(1, 2), alpha=scale)  # (B * H, Q, N)
    width = k_a.shape[1]
    weights = torch.softmax(torch.cat([scores_a, scores_b], dim=-1), dim=-1)  # (B * H, Q, A + N)
    out = torch.baddbmm(torch.bmm(weights[..., :width], v_a), weights[..., width:], v_b).view(B, H, Q, Dh)
    return out if empty is None else out.masked_fill(empty, 0.0)


class CachedStepBackend:
    """The attention steps of a cached forward: new queries over the cache's joint slots, masked by
    ``CachedStepMasks``. Same ``summarise`` / ``aggregate`` interface as the backends above, except
    that the cache's slots come as ``(B * H, Cs + N, Dh)`` views of its joint buffers (summary
    slots, then regular slots: ``cache.LayerCache``) and the separate summary keys are empty; no
    dropout (decoding is in eval mode)."""

    name = "cached"

    def summarise(self, q_s, k_s, v_s, k_r, v_r, state: CachedStepMasks, dropout_p: float = 0.0) -> torch.Tensor:
        """New summaries over themselves + the cached regular slots of their bar (only the songs
        that close a bar: ``state.summary_songs``); one softmax over their own keys and the slots."""
        if state.summary_songs is not None:
            H = q_s.shape[1]
            k_r, v_r = (x.unflatten(0, (-1, H)).index_select(0, state.summary_songs) for x in (k_r, v_r))
        return _two_part_attend(q_s, k_s, v_s, state.summary_to_summary, k_r, v_r, state.summary_to_slots,
                                state.summary_empty)

    def aggregate(self, q_r, k2, v2, k_r, v_r, state: CachedStepMasks, dropout_p: float = 0.0) -> torch.Tensor:
        """New regular tokens over the joint slots (key2/value2 of the summaries and the regular
        K/V, one key set); ``k2``/``v2`` are empty (the summaries are part of the joint slots)."""
        return _attend_slots(q_r, k_r, v_r, state.regular, state.regular_empty)


CACHED_STEP = CachedStepBackend()


# =============================================================================================
# The attention module of one layer
# =============================================================================================
class FCAttention(nn.Module):
    """Fine- and coarse-grained attention of one layer (weights shared by both streams).

    Args:
        d_model: model width D.
        n_heads: heads H (D must be divisible by H).
        attention_dropout: dropout on the attention weights (training only).
        has_summaries: whether the pattern has summary tokens; without them there is no summary
            bias, no key2/value2 and no summarisation step.
        backend: the backend object computing masked attention (see ``get_backend``).
    """

    def __init__(self, d_model: int, n_heads: int, attention_dropout: float, has_summaries: bool, backend) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.d_model, self.n_heads, self.d_head = d_model, n_heads, d_model // n_heads
        self.attention_dropout = attention_dropout
        self.has_summaries = has_summaries
        self.backend = backend
        # shared projections; the biases live per stream below
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.out_proj = Linear(d_model, d_model)  # one bias, shared by both streams
        self.regular_bias = nn.Parameter(torch.zeros(3, d_model))  # q, k, v biases of regular tokens
        if has_summaries:
            self.summary_bias = nn.Parameter(torch.zeros(3, d_model))  # q, k, v biases of summaries
            # what later bars read of a bar: its summarisation output, projected (no bias, as released)
            self.key2 = Linear(d_model, d_model, bias=False)
            self.value2 = Linear(d_model, d_model, bias=False)

    # -- projections (what a KV cache stores) ----------------------------------------------------
    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        return x.view(B, L, self.n_heads, self.d_head).transpose(1, 2)  # (B, L, D) -> (B, H, L, Dh)

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        B, _, L, _ = x.shape
        return x.transpose(1, 2).reshape(B, L, self.d_model)  # (B, H, L, Dh) -> (B, L, D)

    def _project(self, x: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if _use_transposed(x):  # one fused Q/K/V product over a cached transposed weight
            B, L, _ = x.shape
            w = transposed_weight(self, self.q_proj.weight, self.k_proj.weight, self.v_proj.weight)  # (3D, D)
            qkv = F.linear(x, w, bias.view(-1)).view(B, L, 3, self.n_heads, self.d_head)
            return tuple(t.transpose(1, 2) for t in qkv.unbind(2))  # 3 x (B, H, L, Dh)
        q = self._heads(F.linear(x, self.q_proj.weight, bias[0]))  # (B, L, D) -> (B, H, L, Dh)
        k = self._heads(F.linear(x, self.k_proj.weight, bias[1]))
        v = self._heads(F.linear(x, self.v_proj.weight, bias[2]))
        return q, k, v

    def project_regular(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Q, K, V of regular tokens. Shapes: ``(B, T, D)`` -> 3 x ``(B, H, T, Dh)``."""
        return self._project(x, self.regular_bias)

    def project_summary(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Q, K, V of summary tokens (for the summarisation step). ``(B, S, D)`` -> 3 x ``(B, H, S, Dh)``."""
        return self._project(s, self.summary_bias)

    def summary_keys_values(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """key2 / value2: what regular tokens of coarse bars read of each bar.

        Shapes: h (summarisation output, heads merged, before out_proj) ``(B, S, D)`` -> 2 x ``(B, H, S, Dh)``.
        """
        return self._heads(self.key2(h)), self._heads(self.value2(h))

    # -- both steps -----------------------------------------------------------------------------
    def _dropout_p(self) -> float:
        return self.attention_dropout if self.training else 0.0

    def forward(self, x: torch.Tensor, s: torch.Tensor | None, state, cache=None,
                backend=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Summarisation then aggregation, for a whole batch or a cached step.

        Args:
            x: normalised regular stream ``(B, T, D)`` (with a cache: this forward's new tokens).
            s: normalised summary stream ``(B, S, D)``, or None (no summaries in this forward).
            state: what the backend prepared for this forward (shared by all layers).
            cache: this layer's ``cache.LayerCache`` or None. It stores the new tokens' K/V and
                the new summaries' key2/value2 and returns what the steps read: the forward's own
                K/V when it fills an empty cache, the cache's slots in a cached step.
            backend: the backend computing the steps (default: the model's; a cached step passes
                ``CACHED_STEP``).

        Returns:
            ``(regular output (B, T, D), summary output (B, S, D) or None)``, both after out_proj.
        """
        backend = self.backend if backend is None else backend
        p = self._dropout_p()
        q_r, k_r, v_r = self.project_regular(x)  # 3 x (B, H, T, Dh)
        if cache is not None:
            k_r, v_r = cache.update_regular(k_r, v_r)  # (B, H, N, Dh): what the queries may read
        h = None
        if s is not None and s.shape[1]:
            q_s, k_s, v_s = self.project_summary(s)  # 3 x (B, H, S, Dh)
            h = self._merge(backend.summarise(q_s, k_s, v_s, k_r, v_r, state, p))  # (B, S, D)
            k2, v2 = self.summary_keys_values(h)  # 2 x (B, H, S, Dh)
            if cache is not None:
                k2, v2 = cache.update_summary(k2, v2)
        elif cache is not None:
            k2, v2 = cache.summaries()  # (B, H, Ns, Dh), Ns may be 0
        else:  # no summary tokens (fine-only / full pattern, or no complete bar yet)
            k2 = v2 = q_r[:, :, :0]  # (B, H, 0, Dh)
        a = self._merge(backend.aggregate(q_r, k2, v2, k_r, v_r, state, p))  # (B, T, D)
        return self.out_proj(a), None if h is None else self.out_proj(h)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Q/K/V/key2/value2: Xavier-uniform, gain 1/sqrt(2); all biases 0; out_proj Xavier-uniform."""
        for linear in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.xavier_uniform_(linear.weight, gain=1 / math.sqrt(2))
        self.regular_bias.zero_()
        if self.has_summaries:
            self.summary_bias.zero_()
            nn.init.xavier_uniform_(self.key2.weight, gain=1 / math.sqrt(2))
            nn.init.xavier_uniform_(self.value2.weight, gain=1 / math.sqrt(2))
        nn.init.xavier_uniform_(self.out_proj.weight)
        self.out_proj.bias.zero_()
