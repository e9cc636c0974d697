"""FC-attention: one layer's two-step attention over regular tokens and bar summaries.

This module owns the attention *computation* of one layer (SPEC.md section 2):

1. **Summarisation.** Every summary token (one per complete bar) is a query over itself and all
   regular tokens of its bar. Its output ``h`` (heads concatenated, before the output projection) is
   projected by ``key2`` / ``value2`` into the key and value that later bars see for this bar.
2. **Aggregation.** Every regular token is a query over ONE softmax covering the regular tokens of
   its fine bars, BOS, and the ``key2``/``value2`` summaries of its coarse bars.

Summary and regular tokens share the Q/K/V/out weights; each stream has its own Q/K/V biases.

The pieces are separate methods (``project_regular``, ``project_summary``, ``summary_keys_values``,
``summarise``, ``aggregate``) so that a KV-cache decoder can call them step by step and store regular
K/V and summary key2/value2 per layer.

*Which* query may read *which* key is not decided here: it comes from ``structure.py`` (the
``may_attend`` predicate, turned into masks for a batch's ``BarLayout``). A **backend** turns a layout
into whatever it needs once per forward (``prepare``) and computes masked attention (``attend``). The
backend is chosen by one config string, ``attention_backend``; ``BACKENDS`` lists them:

- ``"dense"``: boolean masks from ``structure.dense_masks`` + ``F.scaled_dot_product_attention``. Exact,
  runs anywhere (CPU training and inference), memory O(T^2) per song: the reference.

- ``"flex"``: the fast path of ``fc_blocks.py`` (block-sparse FlexAttention built from the bar
  boundaries + a segment softmax for summaries). Exact; no attention dropout; no CPU backward.
- ``"chunks"``: the bar-chunk path of ``bar_chunks.py`` (each bar's queries read their keys as
  whole bars, batched by length; coarse summaries in the same softmax). Exact, attention dropout,
  CPU and GPU backward, memory linear in length.
- ``"auto"``: ``"chunks"`` on CPU; ``"flex"`` on CUDA, ``"dense"`` there when training needs
  attention dropout.

Notation: B batch, T regular tokens, S summary slots, K = S + T keys, D model width, H heads,
Dh = D / H.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from museformer.bar_chunks import BarChunkBackend, BarChunks
from museformer.fc_blocks import FlexBackend
from museformer.structure import AttentionPattern, BarLayout, dense_masks


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

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: DenseStepMask,
               dropout_p: float) -> torch.Tensor:
        """Masked softmax attention, one softmax per query row over the keys it may read.

        Shapes: q ``(B, H, Q, Dh)``, k/v ``(B, H, K, Dh)``, mask ``(B, 1, Q, K)`` -> ``(B, H, Q, Dh)``.
        """
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.allowed, dropout_p=dropout_p)
        return out.masked_fill(mask.empty, 0.0)


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

    def choose(self, on_cuda: bool, grad: bool, tokens: int):
        """The backend for a batch of ``tokens`` tokens per song."""
        if on_cuda:
            return self.dense if grad and self.attention_dropout > 0 else self.flex
        return self.chunks

    def prepare(self, layout: BarLayout, pattern: AttentionPattern):
        """The per-batch state of whichever backend ``choose`` picks."""
        backend = self.choose(layout.token_kind.is_cuda, torch.is_grad_enabled(), layout.token_kind.shape[-1])
        return backend.prepare(layout, pattern)

    def _masked(self, q, k, v, mask, dropout_p):
        backend = self.dense if isinstance(mask, DenseStepMask) else self.flex
        return backend.attend(q, k, v, mask, dropout_p)

    def summarise(self, q_s, k_s, v_s, k_r, v_r, state, dropout_p: float) -> torch.Tensor:
        """Step 1 by whichever backend prepared ``state`` -> ``(B, H, S, Dh)``."""
        if isinstance(state, BarChunks):
            return self.chunks.summarise(q_s, k_s, v_s, k_r, v_r, state, dropout_p)
        return self._masked(q_s, torch.cat([k_s, k_r], 2), torch.cat([v_s, v_r], 2), state, dropout_p)

    def aggregate(self, q_r, k2, v2, k_r, v_r, state, dropout_p: float) -> torch.Tensor:
        """Step 2 by whichever backend prepared ``state`` -> ``(B, H, T, Dh)``."""
        if isinstance(state, BarChunks):
            return self.chunks.aggregate(q_r, k2, v2, k_r, v_r, state, dropout_p)
        return self._masked(q_r, torch.cat([k2, k_r], 2), torch.cat([v2, v_r], 2), state, dropout_p)


BACKENDS = {"dense": DenseBackend, "flex": FlexBackend, "chunks": BarChunkBackend, "auto": AutoBackend}


def get_backend(name: str, attention_dropout: float = 0.0):
    """A backend instance by its config name (``MuseformerConfig.attention_backend``).

    ``attention_dropout`` lets ``"auto"`` keep the dense path where training needs dropout.
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from {sorted(BACKENDS)}")
    return AutoBackend(attention_dropout) if name == "auto" else BACKENDS[name]()


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
        self.out_proj = nn.Linear(d_model, d_model)  # one bias, shared by both streams
        self.regular_bias = nn.Parameter(torch.zeros(3, d_model))  # q, k, v biases of regular tokens
        if has_summaries:
            self.summary_bias = nn.Parameter(torch.zeros(3, d_model))  # q, k, v biases of summaries
            # what later bars read of a bar: its summarisation output, projected (no bias, as released)
            self.key2 = nn.Linear(d_model, d_model, bias=False)
            self.value2 = nn.Linear(d_model, d_model, bias=False)

    # -- projections (what a KV cache stores) ----------------------------------------------------
    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        return x.view(B, L, self.n_heads, self.d_head).transpose(1, 2)  # (B, L, D) -> (B, H, L, Dh)

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        B, _, L, _ = x.shape
        return x.transpose(1, 2).reshape(B, L, self.d_model)  # (B, H, L, Dh) -> (B, L, D)

    def _project(self, x: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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

    # -- the two attention steps ---------------------------------------------------------------
    def summarise(self, q_s, k_s, v_s, k_r, v_r, mask) -> torch.Tensor:
        """Step 1: summaries read themselves + their bar's regular tokens.

        Shapes: q_s/k_s/v_s ``(B, H, S, Dh)``, k_r/v_r ``(B, H, T, Dh)``, mask as the backend's
        summary mask -> h ``(B, S, D)`` (heads merged, before out_proj).
        """
        if hasattr(self.backend, "summarise"):  # a backend with its own steps (bar_chunks.py)
            return self._merge(self.backend.summarise(q_s, k_s, v_s, k_r, v_r, mask, self._dropout_p()))
        k = torch.cat([k_s, k_r], dim=2)  # (B, H, K, Dh), keys ordered [summaries, tokens]
        v = torch.cat([v_s, v_r], dim=2)  # (B, H, K, Dh)
        return self._merge(self.backend.attend(q_s, k, v, mask, self._dropout_p()))

    def aggregate(self, q_r, k2, v2, k_r, v_r, mask) -> torch.Tensor:
        """Step 2: regular tokens read fine-bar tokens, BOS and coarse-bar summaries in ONE softmax.

        Shapes: q_r/k_r/v_r ``(B, H, T, Dh)``, k2/v2 ``(B, H, S, Dh)``, mask as the backend's
        regular mask -> ``(B, T, D)`` (heads merged, before out_proj).
        """
        if hasattr(self.backend, "aggregate"):  # a backend with its own steps (bar_chunks.py)
            return self._merge(self.backend.aggregate(q_r, k2, v2, k_r, v_r, mask, self._dropout_p()))
        k = torch.cat([k2, k_r], dim=2)  # (B, H, K, Dh)
        v = torch.cat([v2, v_r], dim=2)  # (B, H, K, Dh)
        return self._merge(self.backend.attend(q_r, k, v, mask, self._dropout_p()))

    def _dropout_p(self) -> float:
        return self.attention_dropout if self.training else 0.0

    def forward(self, x: torch.Tensor, s: torch.Tensor | None, masks) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Both steps for a whole batch.

        Args:
            x: normalised regular stream ``(B, T, D)``.
            s: normalised summary stream ``(B, S, D)``, or None when the pattern has no summaries.
            masks: what the backend's ``prepare`` returned for this batch.

        Returns:
            ``(regular output (B, T, D), summary output (B, S, D) or None)``, both after out_proj.
        """
        q_r, k_r, v_r = self.project_regular(x)  # 3 x (B, H, T, Dh)
        if s is None or s.shape[1] == 0:
            # no summary tokens (fine-only / full pattern, or no complete bar yet): no summary keys
            empty = k_r[:, :, :0]  # (B, H, 0, Dh)
            return self.out_proj(self.aggregate(q_r, empty, empty, k_r, v_r, masks.regular)), s
        q_s, k_s, v_s = self.project_summary(s)  # 3 x (B, H, S, Dh)
        h = self.summarise(q_s, k_s, v_s, k_r, v_r, masks.summary)  # (B, S, D)
        k2, v2 = self.summary_keys_values(h)  # 2 x (B, H, S, Dh)
        a = self.aggregate(q_r, k2, v2, k_r, v_r, masks.regular)  # (B, T, D)
        return self.out_proj(a), self.out_proj(h)

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
