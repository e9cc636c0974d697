"""The Museformer language model: config, embeddings, layers, and the loss.

Reads top to bottom: ``MuseformerConfig`` (with presets) -> ``sinusoid`` -> ``Embeddings`` ->
``FeedForward`` -> ``Layer`` -> ``Museformer`` -> ``lm_loss``. The attention itself lives in
``attention.py``; which token may read which lives in ``structure.py``.

Notation used in shape comments:

    B   batch (songs)                      D   model width (d_model)
    T   regular tokens per song (BOS first, right padding with PAD_ID)
    S   summary slots per song (= most complete bars of any song in the batch)
    K   keys of one attention step (= S + T; summaries first)
    H   attention heads                    Dh  head width (D / H)
    F   feed-forward width (d_ff)          V   vocabulary size

Two streams flow through every layer: the regular stream ``x (B, T, D)`` and the summary stream
``s (B, S, D)``; they share the LayerNorms, the FFN and the attention weights. After the last layer
the summary stream is dropped and the regular stream is normalised and projected to the vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from museformer.attention import BACKENDS, CACHED_STEP, FCAttention, Linear, cached_step_masks, get_backend
from museformer.structure import AttentionPattern, bar_layout
from museformer.structure import bar_ids as compute_bar_ids
from museformer.structure import onset_ids as compute_onset_ids
from museformer.vocab import BUILTIN_VOCABS, PAD_ID, Vocab


# =============================================================================================
# Config
# =============================================================================================
@dataclass(frozen=True)
class MuseformerConfig:
    """Everything that decides the network's shape and behaviour (saved as ``config.json``).

    Attributes:
        vocab: name of the vocabulary (``"lmd6remi"`` or ``"general"``, or a custom vocabulary's
            name when the model is built with ``Museformer(config, vocab=...)``); the model uses it
            to find bar ends (``b-1``) and onsets (``o-k``).
        vocab_size: V, ids in that vocabulary (560 for lmd6remi).
        d_model, n_layers, n_heads, d_ff: width, depth, heads, feed-forward width.
        dropout: after the embedding projections, the attention output and the FFN.
        attention_dropout: on the attention weights.
        bar_embedding_dim: width of the sinusoidal bar-index embedding (paper: 256).
        onset_embedding_dim: width of the sinusoidal onset-id embedding (paper: 128).
        pattern: the attention pattern (fine offsets, summary tokens, fc / full).
        attention_backend: which attention backend computes the attention (``"auto"``: the fastest
            exact one per device, see ``attention.AutoBackend``).
    """

    vocab: str = "lmd6remi"
    vocab_size: int = 560
    d_model: int = 512
    n_layers: int = 4
    n_heads: int = 8
    d_ff: int = 2048
    dropout: float = 0.1
    attention_dropout: float = 0.1
    bar_embedding_dim: int = 256
    onset_embedding_dim: int = 128
    pattern: AttentionPattern = field(default_factory=AttentionPattern)
    attention_backend: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.pattern, dict):
            object.__setattr__(self, "pattern", AttentionPattern.from_dict(self.pattern))
        if not isinstance(self.pattern, AttentionPattern):
            raise ValueError(f"pattern must be an AttentionPattern, got {type(self.pattern).__name__}")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.vocab_size < 4:
            raise ValueError(f"vocab_size must be at least 4 (the special symbols), got {self.vocab_size}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} must be divisible by n_heads {self.n_heads}")
        for name in ("bar_embedding_dim", "onset_embedding_dim"):
            value = getattr(self, name)
            # sinusoids split the width into sin and cos halves of at least 2 frequencies each
            if not isinstance(value, int) or value < 4 or value % 2:
                raise ValueError(f"{name} must be an even integer >= 4, got {value!r}")
        for name in ("dropout", "attention_dropout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        if self.attention_backend not in BACKENDS:
            raise ValueError(f"unknown attention_backend {self.attention_backend!r}; choose from {sorted(BACKENDS)}")
        if not isinstance(self.vocab, str) or not self.vocab:
            raise ValueError(f"vocab must be a vocabulary name, got {self.vocab!r}")

    # -- presets ---------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides) -> MuseformerConfig:
        """A named configuration, with optional field overrides.

        - ``paper``: the released "museformer_lm_v2s1" (4 x 512, 8 heads, FFN 2048; ~16.1 M
          parameters with the LMD vocabulary);
        - ``small``: 4 x 256, 4 heads, FFN 1024 (trains on a CPU);
        - ``tiny``: 2 x 32, 2 heads, no dropout (tests).

        ``vocab="general"`` (an override) also sets ``vocab_size`` to that vocabulary's size.
        """
        presets = {
            "paper": {},
            "small": dict(d_model=256, n_heads=4, d_ff=1024, bar_embedding_dim=128, onset_embedding_dim=64),
            "tiny": dict(d_model=32, n_layers=2, n_heads=2, d_ff=64, bar_embedding_dim=16, onset_embedding_dim=8,
                         dropout=0.0, attention_dropout=0.0),
        }
        if name not in presets:
            raise ValueError(f"unknown model preset {name!r}; choose from {sorted(presets)}")
        values = {**presets[name], **overrides}
        vocab = values.get("vocab", "lmd6remi")
        if "vocab_size" not in values and vocab in BUILTIN_VOCABS:
            values["vocab_size"] = len(Vocab.builtin(vocab))
        return cls(**values)

    # -- serialisation ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """JSON-native form; ``from_dict(to_dict())`` gives an equal config."""
        d = dataclasses.asdict(self)
        d["pattern"] = self.pattern.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> MuseformerConfig:
        """Inverse of ``to_dict``; unknown keys are an error (ValueError naming them)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**d)

    def replace(self, **changes) -> MuseformerConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


# =============================================================================================
# Embeddings
# =============================================================================================
def sinusoid(index: torch.Tensor, dim: int) -> torch.Tensor:
    """Fixed sinusoidal embedding of integer indices; index 0 ("none") gives the zero vector.

    Half the dims are sines, half cosines (concatenated), frequencies exp(-k ln(10000) / (dim/2 - 1)).

    Shapes: ``(...)`` int -> ``(..., dim)`` float32.
    """
    half = dim // 2
    freq = torch.exp(torch.arange(half, device=index.device, dtype=torch.float32) * (-math.log(10000.0) / (half - 1)))
    angle = index.float()[..., None] * freq  # (..., half)
    emb = torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1)  # (..., dim)
    return emb.masked_fill((index == 0)[..., None], 0.0)


class Embeddings(nn.Module):
    """Inputs of both streams; there is no token-position embedding at all.

    regular token: concat(token_emb * sqrt(D), sinusoid(bar index), sinusoid(onset id)) -> Linear -> D
    summary token: concat(summary_emb * sqrt(D), sinusoid(bar index it summarises))     -> Linear -> D
    followed by dropout.
    """

    def __init__(self, config: MuseformerConfig) -> None:
        super().__init__()
        c = config
        self.d_model, self.bar_dim, self.onset_dim = c.d_model, c.bar_embedding_dim, c.onset_embedding_dim
        self.token = nn.Embedding(c.vocab_size, c.d_model, padding_idx=PAD_ID)
        self.regular_proj = Linear(c.d_model + c.bar_embedding_dim + c.onset_embedding_dim, c.d_model)
        if c.pattern.has_summaries:
            self.summary = nn.Embedding(c.pattern.summary_tokens, c.d_model)
            self.summary_proj = nn.Linear(c.d_model + c.bar_embedding_dim, c.d_model)
        self.dropout = nn.Dropout(c.dropout)

    def regular(self, ids: torch.Tensor, bars: torch.Tensor, onsets: torch.Tensor) -> torch.Tensor:
        """Shapes: ids, bars, onsets ``(B, T)`` -> ``(B, T, D)``.

        A decoding step (no autograd, few tokens) reads the same sum from tables instead (see
        ``_tables``); a hook on ``regular_proj`` does not see those calls.
        """
        if not torch.is_grad_enabled() and not self.training and ids.numel() <= 256:
            token_rows, bar_rows, onset_rows = self._tables(int(bars.max()), int(onsets.max()))
            return token_rows[ids] + bar_rows[bars] + onset_rows[onsets]  # (B, T, D)
        token = self.token(ids) * math.sqrt(self.d_model)  # (B, T, D)
        x = torch.cat(
            [token, sinusoid(bars, self.bar_dim).to(token.dtype), sinusoid(onsets, self.onset_dim).to(token.dtype)],
            dim=-1,
        )  # (B, T, D + bar_dim + onset_dim)
        return self.dropout(self.regular_proj(x))

    def _tables(self, max_bar: int, max_onset: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``regular_proj`` of the concatenation is a sum of three products, one per part: the token
        part (with the bias) as a table over the vocabulary, the bar and onset parts as tables over
        bar / onset ids (grown on demand). Sums are reordered only (equal within float rounding).
        Cached until a weight changes."""
        W, b = self.regular_proj.weight, self.regular_proj.bias
        key = tuple((t.data_ptr(), t._version) for t in (self.token.weight, W, b))
        cached = self.__dict__.get("_table_cache")
        if cached is None or cached[0] != key or cached[2].shape[0] <= max_bar or cached[3].shape[0] <= max_onset:
            D, bar_dim = self.d_model, self.bar_dim
            n_bars = 1 << max(max_bar + 1, 64).bit_length()
            n_onsets = 1 << max(max_onset + 1, 64).bit_length()
            with torch.no_grad():
                token_rows = F.linear(self.token.weight * math.sqrt(D), W[:, :D], b)  # (V, D)
                index = torch.arange(max(n_bars, n_onsets), device=W.device)
                bar_rows = F.linear(sinusoid(index[:n_bars], bar_dim).to(W.dtype), W[:, D : D + bar_dim])
                onset_rows = F.linear(sinusoid(index[:n_onsets], self.onset_dim).to(W.dtype), W[:, D + bar_dim :])
            cached = (key, token_rows, bar_rows, onset_rows)
            self.__dict__["_table_cache"] = cached
        return cached[1], cached[2], cached[3]

    def summaries(self, bars: torch.Tensor) -> torch.Tensor:
        """Shapes: bar index of each summary slot ``(B, S)`` (0 = padding) -> ``(B, S, D)``."""
        token = self.summary.weight[0] * math.sqrt(self.d_model)  # (D,)  one summary token per bar
        x = torch.cat([token.expand(*bars.shape, -1), sinusoid(bars, self.bar_dim).to(token.dtype)], dim=-1)  # (B, S, D + bar_dim)
        return self.dropout(self.summary_proj(x))


# =============================================================================================
# Layers
# =============================================================================================
class FeedForward(nn.Module):
    """Linear(D -> F), GELU, Linear(F -> D)."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.fc1 = Linear(d_model, d_ff)  # nn.Linear with a faster CPU inference layout
        self.fc2 = Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class Layer(nn.Module):
    """One pre-LN layer over both streams (shared LayerNorms, attention weights and FFN)."""

    def __init__(self, config: MuseformerConfig, backend) -> None:
        super().__init__()
        c = config
        self.attention_norm = nn.LayerNorm(c.d_model)
        self.attention = FCAttention(c.d_model, c.n_heads, c.attention_dropout, c.pattern.has_summaries, backend)
        self.ffn_norm = nn.LayerNorm(c.d_model)
        self.ffn = FeedForward(c.d_model, c.d_ff)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, x: torch.Tensor, s: torch.Tensor | None, state, cache=None,
                backend=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Shapes: x ``(B, T, D)``, s ``(B, S, D)`` or None -> the same.

        ``state``/``backend``: the attention backend's per-forward state (and the backend of a
        cached step); ``cache``: this layer's ``cache.LayerCache`` (see ``FCAttention.forward``).
        """
        a_x, a_s = self.attention(self.attention_norm(x), None if s is None else self.attention_norm(s), state,
                                  cache, backend)
        # dropout is the identity in eval mode: its module is called only in training (a decoding
        # step saves 8 module calls)
        drop = self.dropout if self.training else _identity
        x = x + drop(a_x)
        x = x + drop(self.ffn(self.ffn_norm(x)))
        if s is not None:
            s = s + drop(a_s)
            s = s + drop(self.ffn(self.ffn_norm(s)))
        return x, s


# =============================================================================================
# The language model
# =============================================================================================
class Museformer(nn.Module):
    """Museformer: a decoder-only language model over REMIGEN tokens with FC-attention.

    Args:
        config: the model config.
        vocab: the vocabulary whose ``b-1`` / ``o-k`` ids give bar and onset ids; defaults to the
            built-in vocabulary named by ``config.vocab``. Its size must equal ``config.vocab_size``.
    """

    def __init__(self, config: MuseformerConfig, vocab: Vocab | None = None) -> None:
        super().__init__()
        if vocab is None:
            if config.vocab not in BUILTIN_VOCABS:
                raise ValueError(f"vocabulary {config.vocab!r} is not built in; pass vocab= to Museformer")
            vocab = Vocab.builtin(config.vocab)
        if len(vocab) != config.vocab_size:
            raise ValueError(f"vocabulary {vocab.name!r} has {len(vocab)} ids but config.vocab_size is {config.vocab_size}")
        self.config = config
        self.vocab = vocab
        self.backend = get_backend(config.attention_backend, config.attention_dropout)
        self.embed = Embeddings(config)
        self.layers = nn.ModuleList(Layer(config, self.backend) for _ in range(config.n_layers))
        self.final_norm = nn.LayerNorm(config.d_model)
        self.output = Linear(config.d_model, config.vocab_size, bias=False)  # not tied to the input embedding
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every tensor as the paper's released model does.

        - token embedding ``embed.token``: N(0, 1), the PAD row 0 (PyTorch ``nn.Embedding``, as released);
        - summary embedding ``embed.summary``: N(0, 1);
        - embedding projections ``embed.regular_proj`` / ``embed.summary_proj``: PyTorch ``nn.Linear``
          default (Kaiming-uniform a=sqrt(5), bias U(+-1/sqrt(fan_in))), as released;
        - attention ``q_proj``/``k_proj``/``v_proj``/``key2``/``value2``: Xavier-uniform, gain 1/sqrt(2);
          the six Q/K/V biases (``regular_bias``, ``summary_bias``): 0;
        - attention ``out_proj``: Xavier-uniform, bias 0;
        - FFN ``fc1``/``fc2``: PyTorch ``nn.Linear`` default (as fairseq's layers);
        - LayerNorms: weight 1, bias 0;
        - output projection ``output``: N(0, D^-0.5), no bias.
        """
        nn.init.normal_(self.embed.token.weight, 0.0, 1.0)
        self.embed.token.weight[PAD_ID].zero_()
        self.embed.regular_proj.reset_parameters()
        if self.config.pattern.has_summaries:
            nn.init.normal_(self.embed.summary.weight, 0.0, 1.0)
            self.embed.summary_proj.reset_parameters()
        for layer in self.layers:
            layer.attention.init_weights()
            layer.ffn.fc1.reset_parameters()
            layer.ffn.fc2.reset_parameters()
            for norm in (layer.attention_norm, layer.ffn_norm):
                norm.reset_parameters()
        self.final_norm.reset_parameters()
        nn.init.normal_(self.output.weight, 0.0, self.config.d_model**-0.5)

    def num_parameters(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def forward(self, input_ids: torch.Tensor, bar_ids: torch.Tensor | None = None,
                onset_ids: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        """Next-token logits for a right-padded batch of songs, or for the next tokens of cached songs.

        The one forward pass: training, evaluation, prompt prefill and every decoding step.

        Args:
            input_ids: ``(B, T)`` int64, BOS first, ``PAD_ID`` right padding; every song has its own
                bar structure (found from its ``b-1`` tokens). With a ``cache``: the next ``T``
                tokens of every song (a prompt when the cache is empty, then one token per step).
            bar_ids, onset_ids: ``(B, T)`` embedding indices, computed from ``input_ids`` when None
                (pass them to save that work; they must equal what ``structure.py`` computes).
                With a cache they come from its ``BarTracker`` and must be None.
            cache: an ``FCCache`` (``cache.py``) for this batch. The forward appends the tokens'
                regular K/V (and the key2/value2 of every bar they close) to it, and reads what the
                pattern lets the new tokens see from it. An empty cache is filled by an ordinary
                forward through the configured backend; later forwards are cached steps.

        Returns:
            logits ``(B, T, V)``; logits at padding positions are meaningless (and finite).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (B, T), got {tuple(input_ids.shape)}")
        pattern = self.config.pattern
        backend = self.backend
        if cache is None:
            layout = bar_layout(input_ids, self.vocab, pattern)  # slots of both streams
            state = backend.prepare(layout, pattern)  # built once, shared by every layer
            summary_bar = layout.summary_bar  # (B, S)
            if bar_ids is None:
                bar_ids = compute_bar_ids(input_ids, self.vocab)  # (B, T)
            if onset_ids is None:
                onset_ids = compute_onset_ids(input_ids, self.vocab)  # (B, T)
        else:
            if bar_ids is not None or onset_ids is not None:
                raise ValueError("with a cache, bar_ids and onset_ids come from the cache's tracker; pass None")
            step = cache.begin(input_ids)  # tags and slots of the new tokens and summaries
            bar_ids, onset_ids, summary_bar = step.bars, step.onsets, step.summary_bar
            if step.layout is not None:  # an empty cache: an ordinary forward that also fills it
                state = backend.prepare(step.layout, pattern)
            else:  # a cached step: mask rows from the one predicate on the slots' tags
                if step.same_bar:  # inside a bar: the previous rows plus the new slots
                    state = cache.masks.extended(step.new_slots, step.width)
                else:
                    state = cached_step_masks(step.query, step.summary_query, step.slots, pattern,
                                              self.config.n_heads, cache.joint_capacity, step.summary_songs,
                                              cache.dtype)
                cache.masks = state
                backend = CACHED_STEP

        x = self.embed.regular(input_ids, bar_ids, onset_ids)  # (B, T, D)
        s = self.embed.summaries(summary_bar) if pattern.has_summaries and summary_bar.shape[1] else None  # (B, S, D)
        for i, layer in enumerate(self.layers):
            x, s = layer(x, s, state, None if cache is None else cache.layer(i), backend)
        return self.output(self.final_norm(x))  # (B, T, V); the summary stream is dropped


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = PAD_ID,
            reduction: str = "mean") -> torch.Tensor:
    """Token-level cross entropy over the non-padding targets, computed in float32.

    ``reduction="mean"`` averages over those targets; ``"sum"`` gives the summed NLL in nats (what
    training and perplexity evaluation accumulate, dividing by their own token counts).

    Shapes: logits ``(B, T, V)``, targets ``(B, T)`` -> scalar.
    """
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=ignore_index,
                           reduction=reduction)
