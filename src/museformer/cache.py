"""Exact incremental decoding for Museformer: the key/value + summary cache and the decoder.

This module owns the *incremental forward pass*: given a model, it computes the next-token logits of
a batch of songs one token at a time, with the same result as ``Museformer.forward`` on the whole
prefix (tested at every step), but reading each earlier token's keys and values from a cache.

The cache (``FCCache``) keeps, per layer, one buffer of **slots**. A slot is either

- a regular token (its key and value, projected with the regular biases), or
- the summary of a complete bar (its ``key2`` / ``value2``: what coarse bars read),

each described by ``(kind, bar, position)`` exactly as in ``structure.may_attend``, so the mask row
of a new query is that predicate evaluated against the slots (one source of truth). Slots are
ordered by arrival; the order never matters to attention.

Rules (the pattern's own rules, see ``structure.may_attend``):

- regular keys/values never change once written (regular queries are causal);
- when the ``b-1`` closing bar i arrives, bar i's summary is computed through all layers once: in
  layer l it reads its own key plus layer l's regular slots of bar i. Its own key/value are parked
  in the summary's slot for that step and then overwritten by its ``key2`` / ``value2``. The slot's
  position is that of the ``b-1``, so the first reader is bar ``i + pattern.first_coarse_distance``;
- a regular slot of bar j is never read once the current bar is past ``j + max(fine_offsets)``;
  when the buffer is full such slots are dropped (``evict``) before the buffer grows.

``Decoder`` computes with the model's own weights and adds none. ``prefill`` runs the model's
modules; ``step`` (one token per song, the hot path) reads them through ``_StepWeights``, built once
per decoder: Q/K/V fused into one matrix, every matrix stored transposed (a one-row product reads
that layout ~1.5x faster on CPU; a step is bound by reading ~51 MB of weights), and the regular
embedding split into exact per-token / per-onset / per-bar tables (sums reordered only, so equal to
the model within float rounding; this copy costs about the model's size in memory). A step's mask
row is computed once for all layers, and only when a song's bar changes (inside a bar it just gains
the new slot, see ``_MaskRow``); when the new token may read only a small part of the slots (long
songs: 9 fine bars out of a 33-bar window, plus summaries), it gathers just those slots, so the
attention work per token stays bounded as the song grows. ``prefill`` reads the prompts of a batch
in one pass; ``step`` adds one token per song; ``keep`` drops finished songs from the batch.

Notation: L layers, B songs, C slot capacity, N slots in use (max over songs), H heads, Dh head
width, D model width, T prompt tokens, S summaries of a prompt, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from museformer.model import sinusoid
from museformer.structure import SlotKind, bar_layout, may_attend
from museformer.structure import bar_ids as compute_bar_ids
from museformer.structure import onset_ids as compute_onset_ids
from museformer.vocab import PAD_ID, TokenKind

MIN_CAPACITY = 16
GATHER_BELOW = 3  # a step gathers the slots it reads when they are fewer than 1/3 of those in use
# token kinds that inherit the onset id of the last o-* in their bar (structure.onset_ids)
_INHERITS_ONSET = (TokenKind.ONSET, TokenKind.INSTRUMENT, TokenKind.PITCH, TokenKind.DURATION, TokenKind.VELOCITY)


# =============================================================================================
# The cache: slot buffers + what each slot is
# =============================================================================================
@dataclass
class FCCache:
    """Per-layer slot buffers of a batch of songs, and the structure of every slot.

    Attributes:
        keys, values: ``(L, B, C, H, Dh)``; slot ``c`` of song ``b`` in layer ``l`` (slot-major, so
            a new token is one contiguous write and a step can gather just the slots it reads).
        kind: ``(B, C)`` ``SlotKind`` of every slot (PAD = empty or dropped).
        bar: ``(B, C)`` bar of every slot (0 for BOS).
        pos: ``(B, C)`` position of every slot (a summary: the position of its bar's ``b-1``).
        used: ``(B,)`` slots in use per song (slots ``>= used`` are free).
    """

    keys: torch.Tensor
    values: torch.Tensor
    kind: torch.Tensor
    bar: torch.Tensor
    pos: torch.Tensor
    used: torch.Tensor

    @classmethod
    def empty(cls, n_layers: int, batch: int, n_heads: int, d_head: int, capacity: int,
              device: torch.device, dtype: torch.dtype) -> FCCache:
        """An empty cache of ``capacity`` slots per song."""
        kv = (n_layers, batch, capacity, n_heads, d_head)
        meta = dict(dtype=torch.long, device=device)
        return cls(
            keys=torch.zeros(kv, device=device, dtype=dtype),
            values=torch.zeros(kv, device=device, dtype=dtype),
            kind=torch.full((batch, capacity), int(SlotKind.PAD), **meta),
            bar=torch.zeros((batch, capacity), **meta),
            pos=torch.full((batch, capacity), -1, **meta),
            used=torch.zeros(batch, **meta),
        )

    @property
    def capacity(self) -> int:
        return self.kind.shape[1]

    def select(self, rows: torch.Tensor) -> FCCache:
        """The cache of some songs only (e.g. without the finished ones)."""
        return FCCache(
            self.keys.index_select(1, rows), self.values.index_select(1, rows), self.kind.index_select(0, rows),
            self.bar.index_select(0, rows), self.pos.index_select(0, rows), self.used.index_select(0, rows),
        )

    def resized(self, capacity: int) -> FCCache:
        """A copy with room for ``capacity`` slots per song (at least the slots in use)."""
        n = self.capacity
        if capacity < n:
            raise ValueError(f"cannot shrink a cache of {n} slots to {capacity}")
        L, B, _, H, Dh = self.keys.shape
        bigger = FCCache.empty(L, B, H, Dh, capacity, self.keys.device, self.keys.dtype)
        bigger.keys[:, :, :n] = self.keys
        bigger.values[:, :, :n] = self.values
        bigger.kind[:, :n], bigger.bar[:, :n], bigger.pos[:, :n] = self.kind, self.bar, self.pos
        bigger.used = self.used.clone()
        return bigger

    def evict(self, current_bar: torch.Tensor, farthest_fine: int) -> int:
        """Drop regular slots that no query will read again, packing the rest to the front.

        A regular slot of bar j is read only by bars j .. j + ``farthest_fine``; summaries and BOS
        are read until the end. ``current_bar``: ``(B,)`` the bar of each song's next token.
        Returns the number of slots dropped (over all songs).
        """
        dead = (self.kind == SlotKind.REGULAR) & (self.bar < (current_bar - farthest_fine)[:, None])
        live = (self.kind != SlotKind.PAD) & ~dead  # (B, C)
        dropped = int(dead.sum())
        if not dropped:
            return 0
        # a stable sort puts the live slots first, in their original order
        order = torch.sort((~live).to(torch.uint8), dim=1, stable=True).indices  # (B, C)
        gather = order[None, :, :, None, None].expand_as(self.keys)
        self.keys = torch.gather(self.keys, 2, gather)
        self.values = torch.gather(self.values, 2, gather)
        self.used = live.sum(dim=1)
        in_use = torch.arange(self.capacity, device=self.kind.device)[None] < self.used[:, None]
        self.kind = torch.where(in_use, self.kind.gather(1, order), int(SlotKind.PAD))
        self.bar = torch.where(in_use, self.bar.gather(1, order), 0)
        self.pos = torch.where(in_use, self.pos.gather(1, order), -1)
        return dropped


# =============================================================================================
# The decoder
# =============================================================================================
class Decoder:
    """Incremental, exact next-token logits for a batch of songs, with an ``FCCache``.

    Args:
        model: a ``Museformer`` (put in eval mode by the caller; dropout must be off).
        capacity: initial slots per song; the cache evicts and grows on its own when full.
        gather_below: a step gathers the slots it reads (instead of streaming all slots in use,
            masked) when they are fewer than ``1 / gather_below`` of them; 0 = always gather.

    Usage: ``logits = dec.prefill(prompts)`` (each prompt BOS first), then repeatedly
    ``logits = dec.step(next_ids)``; ``dec.keep(rows)`` drops songs from the batch.
    """

    def __init__(self, model, capacity: int = 2048, gather_below: float = GATHER_BELOW) -> None:
        if model.training:
            raise ValueError("Decoder needs the model in eval mode (model.eval()): dropout would break exactness")
        self.model = model
        self.config = model.config
        self.pattern = model.config.pattern
        self.vocab = model.vocab
        self.initial_capacity = max(int(capacity), MIN_CAPACITY)
        self.gather_below = gather_below
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.kinds = torch.as_tensor(self.vocab.kinds.astype("int64"), device=self.device)  # (V,)
        self.values = torch.as_tensor(self.vocab.values.astype("int64"), device=self.device)  # (V,)
        self.inherits = torch.zeros_like(self.kinds, dtype=torch.bool)
        for kind in _INHERITS_ONSET:
            self.inherits |= self.kinds == kind
        self.bar_token = self.vocab.bar_id
        # slots of regular tokens older than this many bars are never read again (fc patterns only)
        fc = self.pattern.kind == "fc"
        self.farthest_fine = max(self.pattern.fine_offsets, default=0) if fc else None
        self.cache: FCCache | None = None
        self.evicted = 0  # regular slots dropped so far (they were never going to be read again)
        self.weights = _StepWeights(model)
        # per-step bookkeeping as Python ints (one entry per song): a step for one song is mostly
        # Python, so ints avoid dozens of tiny tensor ops
        self._py_kinds = self.vocab.kinds.astype("int64").tolist()
        self._py_values = self.vocab.values.astype("int64").tolist()
        self._py_inherits = self.inherits.tolist()
        self._used: list[int] = []  # mirror of cache.used
        self._row: _MaskRow | None = None  # the regular query's mask row, reused inside a bar

    # -- bookkeeping ------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return 0 if self.cache is None else self.cache.kind.shape[0]

    @torch.inference_mode()
    def keep(self, rows) -> None:
        """Keep only these songs (indices into the current batch), in this order."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.device).reshape(-1)
        self.cache = self.cache.select(rows)
        picked = rows.tolist()
        for name in ("next_pos", "closed", "onset", "_used"):
            values = getattr(self, name)
            setattr(self, name, [values[r] for r in picked])
        self._row = None

    def _make_room(self, extra: int) -> None:
        """Ensure every song has ``extra`` free slots: evict dead slots first, grow if still tight."""
        cache = self.cache
        if max(self._used) + extra <= cache.capacity:
            return
        self._row = None  # slots move
        if self.farthest_fine is not None:
            current_bar = torch.tensor(self.closed, device=self.device) + 1
            self.evicted += cache.evict(current_bar, self.farthest_fine)
            self._used = cache.used.tolist()
        need = max(self._used) + extra
        if need > cache.capacity * 3 // 4:  # keep headroom so eviction stays rare
            self.cache = cache.resized(max(2 * cache.capacity, need + MIN_CAPACITY))

    # -- public steps ---------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, prompts) -> torch.Tensor:
        """Read a batch of prompts in one pass; returns the logits after each one ``(B, V)``.

        Args:
            prompts: a list of B id sequences, each starting with BOS (any lengths), or a
                right-padded ``(B, T)`` tensor (``PAD_ID``).
        """
        if isinstance(prompts, torch.Tensor):
            ids = prompts.to(self.device).long()
            if ids.dim() == 1:
                ids = ids[None]
        else:
            rows = [torch.as_tensor(p, dtype=torch.long) for p in prompts]
            if not rows or any(r.numel() == 0 for r in rows):
                raise ValueError("every prompt needs at least its BOS token")
            ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=PAD_ID).to(self.device)
        B, T = ids.shape
        lengths = (ids != PAD_ID).sum(dim=1)  # (B,)  prompts are right-padded
        layout = bar_layout(ids, self.vocab, self.pattern)
        S = layout.num_summaries
        self.cache = FCCache.empty(self.config.n_layers, B, self.config.n_heads, self.config.d_model // self.config.n_heads,
                                   max(self.initial_capacity, T + S + MIN_CAPACITY), self.device, self.dtype)
        bars = compute_bar_ids(ids, self.vocab)  # (B, T)
        onsets = compute_onset_ids(ids, self.vocab)  # (B, T)
        ar = torch.arange(T, device=self.device)
        token_slot = ar[None].expand(B, T)  # (B, T)  token t goes to slot t
        # a song's summaries go right after its own tokens
        summary_slot = lengths[:, None] + torch.arange(S, device=self.device)[None]  # (B, S)
        self.next_pos = lengths.tolist()
        self.closed = (ids == self.bar_token).sum(dim=1).tolist()
        last = (lengths - 1).clamp(min=0)
        self.onset = self._onset_state(ids, lengths).tolist()
        self._row = None
        x = self.model.embed.regular(ids, bars, onsets)  # (B, T, D)
        s = self.model.embed.summaries(layout.summary_bar) if S else None  # (B, S, D)
        x = self._layers(
            x, (layout.token_kind, layout.token_bar, layout.token_pos), token_slot,
            s, (layout.summary_kind, layout.summary_bar, layout.summary_pos), summary_slot,
        )
        self.cache.used = lengths + (layout.summary_kind == SlotKind.SUMMARY).sum(dim=1)
        self._used = self.cache.used.tolist()
        x_last = x[torch.arange(B, device=self.device), last]  # (B, D)
        return self.model.output(self.model.final_norm(x_last))  # (B, V)

    @torch.no_grad()
    def step(self, next_ids: torch.Tensor) -> torch.Tensor:
        """Append one token to every song; returns the logits for the token after it ``(B, V)``."""
        # the work runs in inference mode (cheaper per op); the logits are computed outside it so
        # that callers get ordinary tensors they may modify in place
        return self.weights.logits(self._step(next_ids))  # (B, V)

    @torch.inference_mode()
    def _step(self, next_ids: torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(next_ids, dtype=torch.long, device=self.device).reshape(-1)  # (B,)
        B = ids.shape[0]
        if B != self.batch_size:
            raise ValueError(f"step got {B} tokens for a batch of {self.batch_size} songs")
        self._make_room(2)  # the token, and the summary of the bar it may close
        tokens = ids.tolist()
        bars, onsets, closes = [], [], []
        for b, token in enumerate(tokens):
            kind = self._py_kinds[token]
            if kind == TokenKind.ONSET:
                self.onset[b] = self._py_values[token] + 1
            bars.append(self.closed[b] + 1)  # a b-1 belongs to the bar it closes
            onsets.append(self.onset[b] if self._py_inherits[token] else 0)
            closes.append(token == self.bar_token)
        x = self.weights.embed(ids, tokens, bars, onsets)  # (B, D)
        summaries = self.pattern.has_summaries and any(closes)
        x = self._step_layers(x, bars, closes if summaries else None)
        for b in range(B):
            self._used[b] += 1 + (closes[b] and summaries)
            self.next_pos[b] += 1
            if closes[b]:
                self.closed[b] += 1
                self.onset[b] = 0
        self.cache.used = torch.tensor(self._used, device=self.device)
        return x  # (B, D)

    def _step_layers(self, x: torch.Tensor, bars: list[int], closes: list[bool] | None) -> torch.Tensor:
        """All layers for one new regular token per song ``x (B, D)`` (and the summaries of the bars
        closed by this step's ``b-1`` tokens, ``closes`` not None).

        The regular query's mask row is ``may_attend`` against the slots; inside a bar it only gains
        the token's own slot (earlier slots keep their answer: same bars, all earlier positions),
        so it is evaluated in full only when a song's bar changes or slots moved.
        Returns the final regular stream ``(B, D)`` (before the final LayerNorm).
        """
        cache, w = self.cache, self.weights
        B, C = x.shape[0], cache.capacity
        slots, positions = list(self._used), list(self.next_pos)
        one = B == 1
        if one:
            cache.kind[0, slots[0]], cache.bar[0, slots[0]], cache.pos[0, slots[0]] = SlotKind.REGULAR, bars[0], positions[0]
        else:
            rows = torch.arange(B, device=self.device)
            q_slot = torch.tensor(slots, device=self.device)
            cache.kind[rows, q_slot] = int(SlotKind.REGULAR)
            cache.bar[rows, q_slot] = torch.tensor(bars, device=self.device)
            cache.pos[rows, q_slot] = torch.tensor(positions, device=self.device)
        nq = max(slots) + 1  # slots a regular query may read
        row = self._row
        if row is None or row.bars != bars:
            row = self._row = _MaskRow.build(self, bars, positions, nq)
        else:
            row.append(slots)
        read, read_mask = row.reads(nq)

        s = s_slot = summary_mask = summary_empty = None
        if closes is not None:
            s_bar = [bar if c else 0 for bar, c in zip(bars, closes)]
            meta = (
                torch.tensor([int(SlotKind.SUMMARY if c else SlotKind.PAD) for c in closes], device=self.device),
                torch.tensor(s_bar, device=self.device),
                torch.tensor([p if c else -1 for p, c in zip(positions, closes)], device=self.device),
            )
            s_rows = torch.arange(B, device=self.device)
            s_slot = torch.tensor(slots, device=self.device) + 1
            cache.kind[s_rows, s_slot], cache.bar[s_rows, s_slot], cache.pos[s_rows, s_slot] = meta
            n = max(slots) + 2
            k_meta = (m[:, None, :n] for m in (cache.kind, cache.bar, cache.pos))
            summary_mask, summary_empty = _step_mask(may_attend(*(m[:, None, None] for m in meta), *k_meta, self.pattern))
            s = self.model.embed.summaries(torch.tensor(s_bar, device=self.device)[:, None])  # (B, 1, D)
            s_rows = s_rows[:, None]
            s_slot = s_slot[:, None]

        H, Dh = w.n_heads, w.d_head
        for l, layer in enumerate(w.layers):
            keys, values = cache.keys[l], cache.values[l]  # (B, C, H, Dh)
            q, k, v = _linear(F.layer_norm(x, w.shape, *layer.attention_norm), *layer.qkv).view(B, 3, H, Dh).unbind(1)
            if one:
                keys[0, slots[0]] = k[0]
                values[0, slots[0]] = v[0]
            else:
                keys[rows, q_slot] = k
                values[rows, q_slot] = v
            if s is not None:
                attn = self.model.layers[l].attention
                qkv_s = _linear(F.layer_norm(s, w.shape, *layer.attention_norm), layer.qkv[0], layer.summary_bias)
                q_s, k_s, v_s = qkv_s.view(B, 3, H, Dh).unbind(1)  # 3 x (B, H, Dh)
                q_s = q_s[:, :, None]  # (B, H, 1, Dh)
                # park the summary's own key/value in its slot while it reads its bar
                keys[s_rows, s_slot] = k_s[:, None]
                values[s_rows, s_slot] = v_s[:, None]
                n = max(slots) + 2
                h = _merge(_attend(q_s, _heads_first(keys, n), _heads_first(values, n), summary_mask, summary_empty))
                k2, v2 = attn.summary_keys_values(h)  # 2 x (B, H, 1, Dh)
                keys[s_rows, s_slot] = k2.transpose(1, 2)  # what later (coarse) bars read
                values[s_rows, s_slot] = v2.transpose(1, 2)
                s = s + _linear(h, *layer.out)
                s = s + w.ffn(layer, s)
            q = q[:, :, None]  # (B, H, 1, Dh)
            if read is None:  # stream all slots in use, masked
                a = F.scaled_dot_product_attention(q, _heads_first(keys, nq), _heads_first(values, nq), attn_mask=read_mask)
            else:  # gather only the slots each song may read (fine bars, summaries, BOS)
                k_read = keys.view(B * C, H, Dh).index_select(0, read).view(B, -1, H, Dh).transpose(1, 2)
                v_read = values.view(B * C, H, Dh).index_select(0, read).view(B, -1, H, Dh).transpose(1, 2)
                a = F.scaled_dot_product_attention(q, k_read, v_read, attn_mask=read_mask)
            x = x + _linear(a.reshape(B, H * Dh), *layer.out)
            x = x + w.ffn(layer, x)
        return x

    # -- the layers -----------------------------------------------------------------------------
    def _onset_state(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Onset id in force after each prompt (0 after a ``b-1`` or before any ``o-*`` of the bar)."""
        state = torch.zeros(ids.shape[0], dtype=torch.long, device=self.device)
        for b in range(ids.shape[0]):
            for t in range(int(lengths[b]) - 1, -1, -1):
                k = int(self.kinds[ids[b, t]])
                if k == TokenKind.BAR:
                    break
                if k == TokenKind.ONSET:
                    state[b] = int(self.values[ids[b, t]]) + 1
                    break
        return state

    def _layers(self, x, q_meta, q_slot, s, s_meta, s_slot) -> torch.Tensor:
        """Run all layers for new regular tokens ``x (B, Tq, D)`` (and new summaries ``s (B, S, D)``).

        Writes their K/V (and the summaries' key2/value2) into the cache slots ``q_slot (B, Tq)``
        (``s_slot (B, S)``); ``*_meta`` are ``(kind, bar, pos)`` triples of ``(B, Tq)`` / ``(B, S)``.
        Returns the final regular stream ``(B, Tq, D)`` (before the final LayerNorm).
        """
        cache = self.cache
        B = x.shape[0]
        rows = torch.arange(B, device=self.device)[:, None]  # (B, 1)
        # write the slots' structure first: the masks below read it
        cache.kind[rows, q_slot], cache.bar[rows, q_slot], cache.pos[rows, q_slot] = q_meta
        if s is not None:
            cache.kind[rows, s_slot], cache.bar[rows, s_slot], cache.pos[rows, s_slot] = s_meta
        n = int(torch.maximum(q_slot.max(), s_slot.max() if s is not None else q_slot.max())) + 1  # slots to read
        k_kind, k_bar, k_pos = (m[:, None, :n] for m in (cache.kind, cache.bar, cache.pos))  # (B, 1, N)
        q_kind, q_bar, q_pos = (m[..., None] for m in q_meta)  # (B, Tq, 1)
        regular_mask, regular_empty = _step_mask(may_attend(q_kind, q_bar, q_pos, k_kind, k_bar, k_pos, self.pattern))
        if s is not None:
            sk, sb, sp = (m[..., None] for m in s_meta)
            summary_mask, summary_empty = _step_mask(may_attend(sk, sb, sp, k_kind, k_bar, k_pos, self.pattern))
        read, read_mask = None, None
        if x.shape[1] == 1 and regular_empty is None:
            allowed = regular_mask[:, 0, 0]  # (B, N)
            # gathering costs a copy: worth it only when a step reads a small part of the slots
            # (long songs: 9 fine bars of a 33-bar window); otherwise stream all slots, masked
            if int(allowed.sum(dim=1).max()) * self.gather_below < n:
                read, read_mask = _readable_slots(allowed, cache.capacity)
        for l, layer in enumerate(self.model.layers):
            attn = layer.attention
            keys, values = cache.keys[l], cache.values[l]  # (B, C, H, Dh)
            q, k, v = attn.project_regular(layer.attention_norm(x))  # 3 x (B, H, Tq, Dh)
            keys[rows, q_slot] = k.transpose(1, 2)  # (B, Tq, H, Dh) into slots
            values[rows, q_slot] = v.transpose(1, 2)
            if s is not None:
                q_s, k_s, v_s = attn.project_summary(layer.attention_norm(s))  # 3 x (B, H, S, Dh)
                # park the summary's own key/value in its slot while it reads its bar
                keys[rows, s_slot] = k_s.transpose(1, 2)
                values[rows, s_slot] = v_s.transpose(1, 2)
                h = _merge(_attend(q_s, _heads_first(keys, n), _heads_first(values, n), summary_mask, summary_empty))
                k2, v2 = attn.summary_keys_values(h)  # 2 x (B, H, S, Dh)
                keys[rows, s_slot] = k2.transpose(1, 2)  # what later (coarse) bars read
                values[rows, s_slot] = v2.transpose(1, 2)
                s = s + attn.out_proj(h)
                s = s + layer.ffn(layer.ffn_norm(s))
            if read is None:  # prefill, or a step that reads most slots: stream all slots in use, masked
                a = _merge(_attend(q, _heads_first(keys, n), _heads_first(values, n), regular_mask, regular_empty))
            else:  # one query per song: gather only the slots it may read (fine bars, summaries, BOS)
                k_read = keys.view(-1, *keys.shape[2:]).index_select(0, read).view(B, -1, *keys.shape[2:])
                v_read = values.view(-1, *values.shape[2:]).index_select(0, read).view(B, -1, *values.shape[2:])
                a = _merge(_attend(q, k_read.transpose(1, 2), v_read.transpose(1, 2), read_mask, None))  # (B, 1, D)
            x = x + attn.out_proj(a)
            x = x + layer.ffn(layer.ffn_norm(x))
        return x


def _transposed(weight: torch.Tensor) -> torch.Tensor:
    """A ``Linear`` weight ``(out, in)`` stored as ``(in, out)``, for ``_linear``."""
    return weight.detach().t().contiguous()


def _linear(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with a transposed weight (``_transposed``). A decoding step multiplies a few
    rows by every weight matrix and is bound by reading the weights; on CPU this layout reads them
    about 1.5x faster than ``F.linear``'s (measured, docs/benchmarks.md). Shapes: ``(..., in)`` -> ``(..., out)``.
    """
    rows = x.reshape(-1, x.shape[-1])
    y = torch.mm(rows, weight_t) if bias is None else torch.addmm(bias, rows, weight_t)
    return y.view(*x.shape[:-1], weight_t.shape[1])


def _norm(norm) -> tuple:
    """A LayerNorm as ``F.layer_norm``'s (weight, bias, eps)."""
    return norm.weight.detach(), norm.bias.detach(), norm.eps


class _LayerWeights:
    """One layer's tensors as a decoding step uses them (the model's own: Q/K/V fused, transposed)."""

    def __init__(self, layer) -> None:
        attn = layer.attention
        self.attention_norm, self.ffn_norm = _norm(layer.attention_norm), _norm(layer.ffn_norm)
        # one (D, 3D) product instead of three: a step is bound by reading weights
        self.qkv = (
            _transposed(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])),
            attn.regular_bias.detach().reshape(-1),
        )
        self.summary_bias = attn.summary_bias.detach().reshape(-1) if attn.has_summaries else None
        self.out = (_transposed(attn.out_proj.weight), attn.out_proj.bias.detach())
        self.fc1 = (_transposed(layer.ffn.fc1.weight), layer.ffn.fc1.bias.detach())
        self.fc2 = (_transposed(layer.ffn.fc2.weight), layer.ffn.fc2.bias.detach())


class _StepWeights:
    """What ``Decoder.step`` reads of the model, prepared once when the decoder is created.

    The regular embedding ``regular_proj(concat(token * sqrt(D), sinusoid(bar), sinusoid(onset)))``
    is a sum of three products, one per part: the token part (with the bias) is a table over the
    vocabulary, the onset part a table over onset ids, and the bar part is computed once per bar.
    This reorders float sums only (equal to the model's embedding within float rounding). A
    decoder snapshots these tables: create a new one after changing the model's weights.
    """

    def __init__(self, model) -> None:
        c, embed = model.config, model.embed
        D = c.d_model
        self.shape, self.n_heads, self.d_head = (D,), c.n_heads, D // c.n_heads
        self.bar_dim, self.onset_dim = c.bar_embedding_dim, c.onset_embedding_dim
        with torch.no_grad():
            W, bias = embed.regular_proj.weight.detach(), embed.regular_proj.bias.detach()
            self.token_rows = F.linear(embed.token.weight * math.sqrt(D), W[:, :D], bias)  # (V, D)
            self.bar_weight = W[:, D : D + self.bar_dim]  # (D, bar_dim)
            kinds, values = model.vocab.kinds, model.vocab.values
            onset_values = values[kinds == TokenKind.ONSET]
            n_onsets = int(onset_values.max()) + 2 if len(onset_values) else 1  # ids 0 (none) .. max + 1
            onset_ids = torch.arange(n_onsets, device=W.device)
            self.onset_rows = F.linear(sinusoid(onset_ids, self.onset_dim).to(W.dtype), W[:, D + self.bar_dim :])
        self._bar_rows: dict[int, torch.Tensor] = {}
        self.layers = [_LayerWeights(layer) for layer in model.layers]
        self.final_norm = _norm(model.final_norm)
        self.output = _transposed(model.output.weight)

    def _bar_row(self, bar: int) -> torch.Tensor:
        row = self._bar_rows.get(bar)
        if row is None:
            index = torch.tensor(bar, device=self.bar_weight.device)
            row = self._bar_rows[bar] = F.linear(sinusoid(index, self.bar_dim).to(self.bar_weight.dtype), self.bar_weight)
        return row

    def embed(self, ids: torch.Tensor, tokens: list[int], bars: list[int], onsets: list[int]) -> torch.Tensor:
        """Regular-token embeddings ``(B, D)`` of one new token per song."""
        if len(tokens) == 1:
            return (self.token_rows[tokens[0]] + self._bar_row(bars[0]) + self.onset_rows[onsets[0]])[None]
        bar_rows = torch.stack([self._bar_row(b) for b in bars])
        onset_rows = self.onset_rows.index_select(0, torch.tensor(onsets, device=ids.device))
        return self.token_rows.index_select(0, ids) + bar_rows + onset_rows

    def ffn(self, layer: _LayerWeights, x: torch.Tensor) -> torch.Tensor:
        """The layer's pre-LN feed-forward branch."""
        return _linear(F.gelu(_linear(F.layer_norm(x, self.shape, *layer.ffn_norm), *layer.fc1)), *layer.fc2)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final LayerNorm and output projection: ``(B, D)`` -> ``(B, V)``."""
        return _linear(F.layer_norm(x, self.shape, *self.final_norm), self.output)


class _MaskRow:
    """The mask row of each song's one regular query over its slots, reused across a bar's steps.

    Within a bar a new token's row equals the previous token's row plus its own slot (earlier
    slots: same bars, all at earlier positions), so ``may_attend`` runs once per bar, not per step.
    """

    def __init__(self, bars: list[int], allowed: torch.Tensor, gather: bool) -> None:
        self.bars = list(bars)
        self.allowed = allowed  # (B, C) bool
        self.gather = gather
        self.count = 0
        self.read = None
        if gather and allowed.shape[0] == 1:  # one song: its readable slots, appended in place
            found = allowed[0].nonzero()[:, 0]
            self.read = torch.empty(allowed.shape[1], dtype=torch.long, device=allowed.device)
            self.count = found.numel()
            self.read[: self.count] = found

    @classmethod
    def build(cls, decoder: Decoder, bars: list[int], positions: list[int], nq: int) -> _MaskRow:
        cache = decoder.cache
        B, C = cache.kind.shape
        dev = cache.kind.device
        allowed = torch.zeros(B, C, dtype=torch.bool, device=dev)
        q_bar, q_pos = torch.tensor(bars, device=dev)[:, None], torch.tensor(positions, device=dev)[:, None]
        allowed[:, :nq] = may_attend(int(SlotKind.REGULAR), q_bar, q_pos, cache.kind[:, :nq], cache.bar[:, :nq],
                                     cache.pos[:, :nq], decoder.pattern)
        # gathering costs a copy: worth it only when a step reads a small part of the slots
        # (long songs: 9 fine bars of a 33-bar window); otherwise stream all slots, masked
        gather = int(allowed.sum(dim=1).max()) * decoder.gather_below < nq
        return cls(bars, allowed, gather)

    def append(self, slots: list[int]) -> None:
        """Each song's new token reads itself."""
        for b, slot in enumerate(slots):
            self.allowed[b, slot] = True
        if self.read is not None:
            self.read[self.count] = slots[0]
            self.count += 1

    def reads(self, nq: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(flat slot indices to gather or None, SDPA mask or None) for the first ``nq`` slots."""
        if not self.gather:
            return None, self.allowed[:, None, None, :nq]
        if self.read is not None:
            return self.read[: self.count], None
        return _readable_slots(self.allowed[:, :nq], self.allowed.shape[1])


def _step_mask(allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SDPA mask ``(B, 1, Q, N)`` from a ``(B, Q, N)`` predicate, and the rows that may read nothing.

    Empty rows (padding queries; summaries of songs that close no bar this step) would be NaN in a
    softmax: they read every slot instead and their output is zeroed (None when there are none).
    """
    empty = ~allowed.any(dim=-1, keepdim=True)  # (B, Q, 1)
    if not bool(empty.any()):
        return allowed[:, None], None
    return (allowed | empty)[:, None], empty[:, None]


def _attend(q, k, v, mask, empty) -> torch.Tensor:
    """Masked softmax attention. Shapes: q ``(B, H, Q, Dh)``, k/v ``(B, H, N, Dh)`` -> ``(B, H, Q, Dh)``."""
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out if empty is None else out.masked_fill(empty, 0.0)


def _readable_slots(allowed: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Flat indices (into ``(B * C)`` slots) of the slots each song's one query may read.

    Shapes: allowed ``(B, N)`` -> indices ``(B * R,)`` and an SDPA mask ``(B, 1, 1, R)`` for songs
    that read fewer than R slots (None when every song reads exactly R), R = most slots read.
    """
    B = allowed.shape[0]
    counts = allowed.sum(dim=1)  # (B,)
    R = int(counts.max())
    # a stable sort brings each song's readable slots to the front, in slot order
    order = torch.sort((~allowed).to(torch.uint8), dim=1, stable=True).indices[:, :R]  # (B, R)
    flat = (order + capacity * torch.arange(B, device=allowed.device)[:, None]).reshape(-1)
    if bool((counts == R).all()):
        return flat, None
    valid = torch.arange(R, device=allowed.device)[None] < counts[:, None]  # (B, R)
    return flat, valid[:, None, None]


def _heads_first(buffer: torch.Tensor, n: int) -> torch.Tensor:
    """The first n slots of a ``(B, C, H, Dh)`` buffer as ``(B, H, n, Dh)`` (a view)."""
    return buffer[:, :n].transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    B, H, L, Dh = x.shape
    return x.transpose(1, 2).reshape(B, L, H * Dh)  # (B, H, L, Dh) -> (B, L, D)


class RecomputeDecoder:
    """The official decoder's strategy, for comparison: every step re-runs the whole prefix.

    Same interface as ``Decoder`` (``prefill`` / ``step`` / ``keep``); exact by construction, and
    quadratic (or worse) in the song length. Used by the tests and ``benchmarks/generate.py``.
    """

    def __init__(self, model, capacity: int = 0) -> None:
        if model.training:
            raise ValueError("RecomputeDecoder needs the model in eval mode (model.eval())")
        self.model = model
        self.device = next(model.parameters()).device
        self.songs: list[list[int]] = []

    @property
    def batch_size(self) -> int:
        return len(self.songs)

    @torch.no_grad()
    def _logits(self) -> torch.Tensor:
        rows = [torch.as_tensor(s, dtype=torch.long) for s in self.songs]
        ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=PAD_ID).to(self.device)
        last = torch.tensor([len(s) - 1 for s in self.songs], device=self.device)
        return self.model(ids)[torch.arange(len(rows), device=self.device), last]  # (B, V)

    def prefill(self, prompts) -> torch.Tensor:
        self.songs = [[int(t) for t in p if int(t) != PAD_ID] for p in prompts]
        return self._logits()

    def step(self, next_ids: torch.Tensor) -> torch.Tensor:
        for song, token in zip(self.songs, torch.as_tensor(next_ids).reshape(-1).tolist()):
            song.append(token)
        return self._logits()

    def keep(self, rows) -> None:
        self.songs = [self.songs[int(r)] for r in torch.as_tensor(rows).reshape(-1).tolist()]
