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

``Decoder`` runs the model's own modules (embeddings, LayerNorms, projections, FFN, output): it
adds no weights. A step computes the mask row once for all layers; when the new token may read only a
small part of the slots (long songs: 9 fine bars out of a 33-bar window, plus summaries), it gathers
just those slots, so the attention work per token stays bounded as the song grows. ``prefill`` reads the prompts of a batch in one pass; ``step`` adds one token per
song; ``keep`` drops finished songs from the batch.

Notation: L layers, B songs, C slot capacity, N slots in use (max over songs), H heads, Dh head
width, D model width, T prompt tokens, S summaries of a prompt, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

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

    # -- bookkeeping ------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return 0 if self.cache is None else self.cache.kind.shape[0]

    def keep(self, rows) -> None:
        """Keep only these songs (indices into the current batch), in this order."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        self.cache = self.cache.select(rows)
        for name in ("next_pos", "closed", "onset"):
            setattr(self, name, getattr(self, name).index_select(0, rows))

    def _make_room(self, extra: int) -> None:
        """Ensure every song has ``extra`` free slots: evict dead slots first, grow if still tight."""
        cache = self.cache
        if int(cache.used.max()) + extra <= cache.capacity:
            return
        if self.farthest_fine is not None:
            self.evicted += cache.evict(self.closed + 1, self.farthest_fine)
        need = int(cache.used.max()) + extra
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
        self.next_pos = lengths.clone()
        self.closed = (ids == self.bar_token).sum(dim=1)
        last = (lengths - 1).clamp(min=0)
        self.onset = self._onset_state(ids, lengths)
        x = self.model.embed.regular(ids, bars, onsets)  # (B, T, D)
        s = self.model.embed.summaries(layout.summary_bar) if S else None  # (B, S, D)
        x = self._layers(
            x, (layout.token_kind, layout.token_bar, layout.token_pos), token_slot,
            s, (layout.summary_kind, layout.summary_bar, layout.summary_pos), summary_slot,
        )
        self.cache.used = lengths + (layout.summary_kind == SlotKind.SUMMARY).sum(dim=1)
        x_last = x[torch.arange(B, device=self.device), last]  # (B, D)
        return self.model.output(self.model.final_norm(x_last))  # (B, V)

    @torch.no_grad()
    def step(self, next_ids: torch.Tensor) -> torch.Tensor:
        """Append one token to every song; returns the logits for the token after it ``(B, V)``."""
        ids = torch.as_tensor(next_ids, dtype=torch.long, device=self.device).reshape(-1)  # (B,)
        B = ids.shape[0]
        if B != self.batch_size:
            raise ValueError(f"step got {B} tokens for a batch of {self.batch_size} songs")
        self._make_room(2)  # the token, and the summary of the bar it may close
        cache = self.cache
        kind = self.kinds[ids]
        closes = ids == self.bar_token  # (B,)
        bar = self.closed + 1  # a b-1 belongs to the bar it closes
        self.onset = torch.where(kind == TokenKind.ONSET, self.values[ids] + 1, self.onset)
        onset = torch.where(self.inherits[ids], self.onset, 0)
        pos = self.next_pos
        slot = cache.used  # (B,)
        regular = torch.full_like(ids, int(SlotKind.REGULAR))
        x = self.model.embed.regular(ids[:, None], bar[:, None], onset[:, None])  # (B, 1, D)
        s, s_meta, s_slot = None, None, None
        if self.pattern.has_summaries and bool(closes.any()):
            s_kind = torch.where(closes, int(SlotKind.SUMMARY), int(SlotKind.PAD))[:, None]  # (B, 1)
            s_bar = torch.where(closes, bar, 0)[:, None]
            s_pos = torch.where(closes, pos, -1)[:, None]
            s = self.model.embed.summaries(s_bar)  # (B, 1, D)
            s_meta, s_slot = (s_kind, s_bar, s_pos), (slot + 1)[:, None]
        x = self._layers(x, (regular[:, None], bar[:, None], pos[:, None]), slot[:, None], s, s_meta, s_slot)
        cache.used = slot + 1 + (closes.long() if s is not None else 0)
        self.next_pos = pos + 1
        self.closed = self.closed + closes.long()
        self.onset = torch.where(closes, 0, self.onset)
        return self.model.output(self.model.final_norm(x[:, 0]))  # (B, V)

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
    B, N = allowed.shape
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
