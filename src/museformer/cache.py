"""The decoding cache: regular K/V and summary key2/value2 slots per layer, their tags, eviction.

This module owns *state only*; it computes no layer. The network (embeddings, norms, projections,
attention, FFN, logits) is computed by ``Museformer.forward(ids, cache=cache)`` alone, for a prompt
and for every decoding step alike (the model owns its cache, as in gpt-fast); that forward asks the
cache for the tags of the new tokens (``begin``) and hands each layer its ``LayerCache``, which
stores the layer's new K/V and returns the slots its queries read.

``FCCache`` keeps, for a batch of songs:

- **regular slots** ``(L, B, H, C, Dh)``: the key and value of every token (regular biases), with
  tags ``kind``/``bar``/``pos`` ``(B, C)`` exactly as in ``structure.may_attend``;
- **summary slots** ``(L, B, H, Cs, Dh)``: the ``key2`` / ``value2`` of every complete bar (what its
  coarse readers see), tagged ``summary_kind``/``summary_bar``/``summary_pos`` (the position of the
  ``b-1`` that closed the bar);
- both live in one **joint** buffer per layer, ``(B, H, Cs + C, Dh)``, summary slots first (the
  attributes above are views of it, and of the joint tags ``(3, B, Cs + C)``), so a cached step's
  regular queries read summaries and tokens as one key set: one score product, one softmax, one
  value product per layer (``attention.CachedStepBackend``);
- a ``structure.BarTracker``: the bar and onset ids of the next tokens, chunk by chunk.

``select`` keeps some songs (in place); ``fork`` copies some songs into a new cache (K candidate
bars of one song, ``museformer.bar_candidates``), leaving the original as it was.

Slots are ordered by arrival; order never matters to attention (the masks come from the tags).

Rules (the pattern's, see ``structure.bar_relation`` / ``may_attend``):

- regular slots never change once written (regular queries are causal);
- the forward that reads the ``b-1`` closing bar i computes bar i's summary in every layer and
  appends its key2/value2; it is first read by bar ``i + pattern.first_coarse_distance``;
- a regular slot of bar j is never read once the current bar is past ``j + pattern.horizon``;
  when the slots are full such slots are dropped (``evict``) before the buffer grows (to a new,
  larger static capacity: shapes change only then).

``Decoder`` is the small driver ``generate.stream`` and the tests use: ``prefill`` a batch of
prompts, ``step`` one token per song, ``keep`` some songs. ``RecomputeDecoder`` re-runs the whole
prefix instead (the official code's strategy), for comparison.

Notation: L layers, B songs, C / Cs regular / summary slot capacity, N / Ns slots in use (max over
songs), H heads, Dh head width, Tq / Sq new tokens / summaries of one forward, V vocabulary.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from museformer.structure import BarLayout, BarTracker, SlotKind, bar_layout
from museformer.vocab import PAD_ID

MIN_CAPACITY = 16

Tags = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (kind, bar, pos), each (B, L)


@dataclass(frozen=True)
class CacheStep:
    """What one forward with a cache needs to know of its new tokens (from ``FCCache.begin``).

    Attributes:
        bars, onsets: ``(B, Tq)`` embedding indices of the new tokens (``BarTracker``).
        summary_bar: ``(B, Sq)`` (cached steps: ``(R, Sq)``) bar of each new summary (0 = a PAD row:
            that song closes fewer bars).
        layout: the chunk's ``BarLayout`` when it fills an empty cache (the forward then runs its
            ordinary backend), else None.
        query, summary_query: tags of the new tokens / summaries (cached steps; None otherwise or
            when no bar closes).
        slots: tags ``(B, Cs + N)`` of the joint slots the queries read (cached steps): the
            summary slots, then N regular slots.
        same_bar: one token per song, each in the same bar as the previous step's (a cached
            step whose mask rows are the previous ones plus the new slots: ``masks`` holds them;
            ``slots`` is then None, the rows need no tags).
        new_slots: ``(B * H,)`` flat ``(b * H + h) * W + Cs + slot`` of each song's new slot in the
            joint buffer (cached steps of one token per song).
        width: Cs + N, the joint slots the queries read (cached steps).
        summary_songs: ``(R,)`` the songs whose bars close in a cached step; the summary stream
            (``summary_bar``, ``summary_query``: ``(R, Sq)``) has rows for them only.
    """

    bars: torch.Tensor
    onsets: torch.Tensor
    summary_bar: torch.Tensor
    layout: BarLayout | None = None
    query: Tags | None = None
    summary_query: Tags | None = None
    slots: Tags | None = None
    same_bar: bool = False
    new_slots: torch.Tensor | None = None
    summary_songs: torch.Tensor | None = None
    width: int = 0


class LayerCache:
    """One layer's view of an ``FCCache`` during a forward (what ``FCAttention.forward`` calls).

    In a cached step every slot (summaries and regular tokens) comes back as one joint key set,
    ``(B * H, Cs + N, Dh)`` views of the layer's joint buffer (what ``attention.CachedStepBackend``
    reads), and the separate summary key set is empty; filling an empty cache returns the
    forward's own ``(B, H, Tq, Dh)`` tensors to the model's backend.
    """

    def __init__(self, cache: FCCache, index: int) -> None:
        self.cache, self.index = cache, index

    def update_regular(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new tokens' K/V; returns what the queries read.

        Shapes: k/v ``(B, H, Tq, Dh)`` -> ``(B, H, Tq, Dh)`` (filling an empty cache: the forward's
        own) or ``(B * H, Cs + N, Dh)`` (a cached step: all joint slots up to N regular ones, a view).
        """
        c = self.cache
        if c._filling:
            L = k.shape[2]
            c.keys[self.index][:, :, :L], c.values[self.index][:, :, :L] = k, v
            return k, v
        return c._write(c._joint_views[self.index], k, v, c._slots, c._width)

    def update_summary(self, k2: torch.Tensor, v2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new summaries' key2/value2; returns the separate summary keys the regular
        queries read: the forward's own when filling, none in a cached step (``(B * H, 0, Dh)``:
        they are part of the joint slots ``update_regular`` returned)."""
        c = self.cache
        if c._filling:
            S = k2.shape[2]
            c.summary_keys[self.index][:, :, :S], c.summary_values[self.index][:, :, :S] = k2, v2
            return k2, v2
        return c._write(c._joint_views[self.index], k2, v2, c._summary_slots, 0)

    def summaries(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The separate summary keys when this forward adds none: ``(B, H, 0, Dh)`` when filling
        (no bar is complete before the prompt), ``(B * H, 0, Dh)`` in a cached step (the summaries
        are part of the joint slots)."""
        c = self.cache
        if c._filling:
            return c.summary_keys[self.index][:, :, :0], c.summary_values[self.index][:, :, :0]
        keys, values, _, _ = c._joint_views[self.index]
        return keys[:, :0], values[:, :0]


class FCCache:
    """Per-layer slot buffers of a batch of songs, the tags of every slot, and the bar tracker.

    Create with ``FCCache(model, batch)``; pass to ``model(ids, cache=cache)``.
    Attributes ``keys``/``values`` ``(L, B, H, C, Dh)``, ``kind``/``bar``/``pos`` ``(B, C)``,
    ``used`` ``(B,)`` (slots in use per song), and the same with ``summary_`` for summary slots
    (``(L, B, H, Cs, Dh)``, ``(B, Cs)``); all but ``used`` are views of the joint buffers
    ``joint_keys``/``joint_values`` ``(L, B, H, Cs + C, Dh)`` and tags ``joint_tags`` ``(3, B, Cs + C)``
    (kind, bar, pos), summary slots first. Writing into a view writes into the joint buffer.
    """

    def __init__(self, model, batch: int, capacity: int = 2048, summary_capacity: int = 16) -> None:
        c = model.config
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.shape = (c.n_layers, batch, c.n_heads, c.d_model // c.n_heads)
        self.pattern, self.vocab = c.pattern, model.vocab
        self.horizon = c.pattern.horizon  # regular slots older than this many bars are dead
        self.tracker = BarTracker(model.vocab, batch, self.device)
        self.evicted = 0  # regular slots dropped so far (they were never going to be read again)
        self.started = False
        self._filling = False
        self._slots = self._summary_slots = None
        self._n = 0  # regular slots in use (max over songs; a host-side upper bound in a bar)
        self._width = 0  # joint slots a cached step reads: Cs + N
        self.masks = None  # the last cached step's mask rows (reused inside a bar)
        self._last_bars: torch.Tensor | None = None
        summary_capacity = max(summary_capacity, 1) if c.pattern.has_summaries else 0
        self.used = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.summary_used = torch.zeros_like(self.used)
        self._allocate(max(capacity, MIN_CAPACITY), summary_capacity)
        self._layers = [LayerCache(self, i) for i in range(c.n_layers)]

    # -- storage --------------------------------------------------------------------------------
    def _allocate(self, capacity: int, summary_capacity: int) -> tuple:
        """New empty joint buffers and tags (the old ones returned, for copying), and their views."""
        L, B, H, Dh = self.shape
        old = getattr(self, "joint_keys", None), getattr(self, "joint_values", None), getattr(self, "joint_tags", None)
        width = summary_capacity + capacity
        self.joint_keys = torch.zeros(L, B, H, width, Dh, device=self.device, dtype=self.dtype)
        self.joint_values = torch.zeros_like(self.joint_keys)
        self.joint_tags = torch.zeros(3, B, width, dtype=torch.long, device=self.device)  # kind, bar, pos
        self.joint_tags[0] = int(SlotKind.PAD)
        self.joint_tags[2] = -1
        self._summary_capacity = summary_capacity
        self._views()
        return old

    def _views(self) -> None:
        """Views and indices a step reuses until the buffers are replaced (grow, select): the
        regular and summary parts of the joint buffers and tags, per layer the joint buffers as
        ``(B * H, W, Dh)`` (what attention reads) and ``(B * H * W, Dh)`` rows (what a write
        fills), W = Cs + C, the tags flat ``(3, B * W)``, and the flat index bases."""
        _, B, H, Dh = self.shape
        Cs, W = self._summary_capacity, self.joint_tags.shape[-1]
        self.summary_keys, self.keys = self.joint_keys[..., :Cs, :], self.joint_keys[..., Cs:, :]
        self.summary_values, self.values = self.joint_values[..., :Cs, :], self.joint_values[..., Cs:, :]
        self.summary_kind, self.summary_bar, self.summary_pos = self.joint_tags[:, :, :Cs]
        self.kind, self.bar, self.pos = self.joint_tags[:, :, Cs:]
        self._joint_views = [(k.view(B * H, W, Dh), v.view(B * H, W, Dh), k.view(B * H * W, Dh), v.view(B * H * W, Dh))
                             for k, v in zip(self.joint_keys, self.joint_values)]
        self._tags_flat = self.joint_tags.view(3, B * W)  # kind, bar, pos of every joint slot
        songs = torch.arange(B, device=self.device)
        self._row_base = songs * W + Cs  # (B,)  flat tag index of each song's regular slot 0
        self._head_base = (songs[:, None] * H + torch.arange(H, device=self.device)) * W + Cs  # (B, H)

    @property
    def capacity(self) -> int:
        """C, regular slots per song (static until the cache grows)."""
        return self.joint_tags.shape[-1] - self._summary_capacity

    @property
    def joint_capacity(self) -> int:
        """W = Cs + C, slots per song of the joint buffers."""
        return self.joint_tags.shape[-1]

    @property
    def summary_capacity(self) -> int:
        """Cs, summary slots per song (static until the cache grows)."""
        return self._summary_capacity

    @property
    def batch_size(self) -> int:
        return self.joint_tags.shape[1]

    def layer(self, index: int) -> LayerCache:
        """The view ``FCAttention`` of layer ``index`` reads and writes."""
        return self._layers[index]

    def _joint_slot_tags(self) -> Tags:
        """Tags ``(B, Cs + N)`` of the joint slots a cached step reads."""
        return tuple(self.joint_tags[:, :, : self._width])

    # -- one forward ----------------------------------------------------------------------------
    def begin(self, ids: torch.Tensor) -> CacheStep:
        """Tag the next tokens of every song (and the summaries of the bars they close), give them
        slots, and return what the forward needs. Called by ``Museformer.forward``.

        Shapes: ids ``(B, Tq)`` (right-padded with ``PAD_ID``).
        """
        B, Tq = ids.shape
        if B != self.batch_size:
            raise ValueError(f"the cache holds {self.batch_size} songs, got ids for {B}")
        if self.started and Tq == 1:
            step = self._begin_one(ids)
            if step is not None:
                return step
        real = ids != PAD_ID
        is_end = (ids == self.vocab.bar_id) & real if self.pattern.has_summaries else torch.zeros_like(real)
        closes = is_end.sum(dim=1)  # (B,)
        Sq = int(closes.max()) if Tq else 0
        self._reserve(Tq, Sq)
        bars, onsets, positions = self.tracker.advance(ids)  # (B, Tq) each
        if not self.started:  # fill the empty cache: an ordinary forward over the whole chunk
            self.started = self._filling = True
            layout = bar_layout(ids, self.vocab, self.pattern)
            S = layout.num_summaries
            self.kind[:, :Tq], self.bar[:, :Tq], self.pos[:, :Tq] = layout.token_kind, layout.token_bar, layout.token_pos
            self.summary_kind[:, :S], self.summary_bar[:, :S] = layout.summary_kind, layout.summary_bar
            self.summary_pos[:, :S] = layout.summary_pos
            self._slots = self._summary_slots = None
            self._n = Tq
            self.used = real.sum(dim=1)
            self.summary_used = (layout.summary_kind == SlotKind.SUMMARY).sum(dim=1)
            return CacheStep(bars, onsets, layout.summary_bar, layout=layout)

        self._filling = False
        Cs = self._summary_capacity
        rows = torch.arange(B, device=ids.device)[:, None]  # (B, 1)
        kind = torch.where(real, int(SlotKind.REGULAR), int(SlotKind.PAD))
        query = (kind, bars, positions)
        slots = self.used[:, None] + torch.arange(Tq, device=ids.device)  # (B, Tq)
        self._slots = self._flat(slots + Cs)
        self._n = int(self.used.max()) + Tq
        self._width = Cs + self._n
        self.kind[rows, slots], self.bar[rows, slots], self.pos[rows, slots] = query
        summary_query = summary_songs = None
        summary_bar = bars[:, :0]  # (B, 0)
        if Sq:
            # the j-th b-1 of a song in this chunk closes its j-th new summary
            r, t = is_end.nonzero(as_tuple=True)
            j = (torch.cumsum(is_end.long(), dim=1) - 1)[r, t]
            s_kind = torch.full((B, Sq), int(SlotKind.PAD), dtype=torch.long, device=ids.device)
            summary_bar, s_pos = torch.zeros_like(s_kind), torch.full_like(s_kind, -1)
            s_kind[r, j], summary_bar[r, j], s_pos[r, j] = int(SlotKind.SUMMARY), bars[r, t], positions[r, t]
            s = self.summary_used[:, None] + torch.arange(Sq, device=ids.device)  # (B, Sq)
            self.summary_kind[rows, s], self.summary_bar[rows, s], self.summary_pos[rows, s] = s_kind, summary_bar, s_pos
            # only the songs that close a bar carry a summary stream (R songs): at batch 64 some
            # song closes a bar at almost every step, and 64 rows of summaries would double the work
            summary_songs = (closes > 0).nonzero()[:, 0]  # (R,)
            summary_query = tuple(x.index_select(0, summary_songs) for x in (s_kind, summary_bar, s_pos))  # (R, Sq)
            summary_bar = summary_query[1]
            self._summary_slots = self._flat(s.index_select(0, summary_songs), summary_songs)
        self.used = self.used + real.sum(dim=1)
        self.summary_used = self.summary_used + closes
        same_bar = (Tq == 1 and not Sq and self.masks is not None and self._last_bars is not None
                    and torch.equal(bars, self._last_bars))
        self._last_bars = bars if Tq == 1 else None
        new_slots = self._slots if Tq == 1 else None
        return CacheStep(bars, onsets, summary_bar, None, query, summary_query, self._joint_slot_tags(), same_bar,
                         new_slots, summary_songs, self._width)

    def _begin_one(self, ids: torch.Tensor) -> CacheStep | None:
        """``begin`` for one token per song that closes no bar and fits (a decoding step inside
        a bar, the common case): the same tags and slots in a few vectorised ops, with the width
        ``N`` kept on the host (an upper bound of the slots in use: slots past a song's own are
        PAD and masked). Returns None where the general path is needed."""
        token = ids[:, 0]  # (B,)
        if self.pattern.has_summaries and bool((token == self.vocab.bar_id).any()):
            return None  # a bar closes: summaries to add
        if self._n + 1 > self.capacity:
            return None  # room to make (evict / grow)
        self._filling = False
        bars, onsets, positions = self.tracker.advance(ids)  # (B, 1) each
        real = token != PAD_ID
        kind = torch.where(real, int(SlotKind.REGULAR), int(SlotKind.PAD))  # (B,)
        used = self.used
        self._slots = (self._head_base + used[:, None]).view(-1)  # (B * H,) rows of the joint K/V buffers
        rows = self._row_base + used  # (B,) flat tag slots
        self._tags_flat.index_copy_(1, rows, torch.stack([kind, bars[:, 0], positions[:, 0]]))  # (3, B) tags
        self.used = used + real
        self._n += 1
        self._width = self._summary_capacity + self._n
        same_bar = self.masks is not None and self._last_bars is not None and torch.equal(bars, self._last_bars)
        self._last_bars = bars
        slots = None if same_bar else self._joint_slot_tags()
        return CacheStep(bars, onsets, bars[:, :0], None, (kind[:, None], bars, positions), None, slots,
                         same_bar, self._slots, None, self._width)

    @staticmethod
    def _write(views, k, v, slots, n):
        """Write new K/V ``(B, H, L, Dh)`` into a layer's joint buffers; return the first ``n``
        joint slots, ``(B * H, n, Dh)`` views.

        ``slots`` are flat row indices into the buffer seen as ``(B * H * W, Dh)`` (``_flat``), so
        a write is one ``index_copy_`` (the same indices serve every layer of the forward).
        """
        keys, values, key_rows, value_rows = views
        Dh = k.shape[-1]
        key_rows.index_copy_(0, slots, k.reshape(-1, Dh))  # (B * H * L, Dh) rows
        value_rows.index_copy_(0, slots, v.reshape(-1, Dh))
        return keys[:, :n], values[:, :n]

    def _flat(self, slots: torch.Tensor, songs: torch.Tensor | None = None) -> torch.Tensor:
        """Flat rows ``(R * H * L,)`` of joint slots ``(R, L)`` (regular slot i is joint slot
        ``Cs + i``) of some songs (default: all, in order) in a ``(B, H, W, Dh)`` buffer, in the
        order of an ``(R, H, L, Dh)`` tensor's rows."""
        R, L = slots.shape
        H, W = self.shape[2], self.joint_tags.shape[-1]
        songs = torch.arange(R, device=slots.device) if songs is None else songs
        base = (songs[:, None] * H + torch.arange(H, device=slots.device)) * W  # (R, H)
        return (base[..., None] + slots[:, None, :]).reshape(-1)

    # -- room -----------------------------------------------------------------------------------
    def _reserve(self, tokens: int, summaries: int) -> None:
        """Room for ``tokens`` more regular and ``summaries`` more summary slots per song: evict dead
        regular slots first, and grow (a new static capacity) only when still tight."""
        need = int(self.used.max()) + tokens
        capacity = summary_capacity = None
        if need > self.capacity:
            if self.horizon is not None and self.started:
                self.evicted += self.evict(self.tracker.closed + 1)
                need = int(self.used.max()) + tokens
            if need > self.capacity * 3 // 4:  # keep headroom so eviction stays rare
                capacity = max(2 * self.capacity, need + MIN_CAPACITY)
        need_s = int(self.summary_used.max()) + summaries
        if need_s > self._summary_capacity:
            summary_capacity = max(2 * self._summary_capacity, need_s + MIN_CAPACITY)
        if capacity is not None or summary_capacity is not None:
            self._grow(capacity or self.capacity, summary_capacity or self._summary_capacity)

    def _grow(self, capacity: int, summary_capacity: int) -> None:
        """Move every slot into new joint buffers with these capacities (shapes change only here)."""
        self.masks = None  # slots move
        n, ns = self.capacity, self._summary_capacity
        keys, values, tags = self._allocate(capacity, summary_capacity)
        self.summary_keys[..., :ns, :], self.keys[..., :n, :] = keys[..., :ns, :], keys[..., ns:, :]
        self.summary_values[..., :ns, :], self.values[..., :n, :] = values[..., :ns, :], values[..., ns:, :]
        self.joint_tags[:, :, :ns], self.joint_tags[:, :, summary_capacity:summary_capacity + n] = tags[:, :, :ns], tags[:, :, ns:]
        self._width = 0

    def evict(self, current_bar: torch.Tensor) -> int:
        """Drop regular slots no query will read again, packing the rest to the front (in order).

        A regular slot of bar j is read only by bars j .. j + ``pattern.horizon``; BOS and the
        summary slots are read until the end. ``current_bar``: ``(B,)`` the bar of each song's next
        token. Returns the number of slots dropped (over all songs).
        """
        if self.horizon is None:
            return 0
        dead = (self.kind == SlotKind.REGULAR) & (self.bar < (current_bar - self.horizon)[:, None])
        live = (self.kind != SlotKind.PAD) & ~dead  # (B, C)
        dropped = int(dead.sum())
        if not dropped:
            return 0
        self.masks = None  # slots move
        # a stable sort puts the live slots first, in their original order
        order = torch.sort((~live).to(torch.uint8), dim=1, stable=True).indices  # (B, C)
        gather = order[None, :, None, :, None].expand_as(self.keys)  # (L, B, H, C, Dh)
        self.keys.copy_(torch.gather(self.keys, 3, gather))  # in place: the regular part of the joint buffer
        self.values.copy_(torch.gather(self.values, 3, gather))
        self.used = live.sum(dim=1)
        in_use = torch.arange(self.capacity, device=self.kind.device)[None] < self.used[:, None]
        self.kind.copy_(torch.where(in_use, self.kind.gather(1, order), int(SlotKind.PAD)))
        self.bar.copy_(torch.where(in_use, self.bar.gather(1, order), 0))
        self.pos.copy_(torch.where(in_use, self.pos.gather(1, order), -1))
        self._n = int(self.used.max())
        self._width = 0
        return dropped

    def select(self, rows: torch.Tensor) -> None:
        """Keep only some songs (indices into the batch, in this order), e.g. without finished ones."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.device).reshape(-1)
        self.masks, self._last_bars = None, None
        self.joint_keys = self.joint_keys.index_select(1, rows)
        self.joint_values = self.joint_values.index_select(1, rows)
        self.joint_tags = self.joint_tags.index_select(1, rows)
        self.used, self.summary_used = self.used.index_select(0, rows), self.summary_used.index_select(0, rows)
        self.tracker.select(rows)
        L, _, H, Dh = self.shape
        self.shape = (L, rows.numel(), H, Dh)
        self._views()

    def fork(self, rows) -> FCCache:
        """A new cache holding copies of some songs (indices into the batch; repeats allowed, e.g.
        ``[0] * K`` for K candidate continuations of one song). This cache is left unchanged.

        Every tensor of the new cache is a fresh ``index_select`` copy (``select``), so decoding
        either cache never touches the other; the frozen per-vocabulary tables are shared.
        """
        child = copy.copy(self)
        child.tracker = copy.copy(self.tracker)
        child._layers = [LayerCache(child, i) for i in range(len(self._layers))]
        child.select(rows)
        return child


# =============================================================================================
# Drivers
# =============================================================================================
class Decoder:
    """Next-token logits for a batch of songs, one token at a time, through ``model(ids, cache=...)``.

    Args:
        model: a ``Museformer`` in eval mode (dropout would break exactness).
        capacity: initial regular slots per song; the cache evicts and grows on its own when full.

    Usage: ``logits = dec.prefill(prompts)`` (each prompt BOS first), then repeatedly
    ``logits = dec.step(next_ids)``; ``dec.keep(rows)`` drops songs from the batch.
    """

    def __init__(self, model, capacity: int = 2048) -> None:
        if model.training:
            raise ValueError("Decoder needs the model in eval mode (model.eval()): dropout would break exactness")
        self.model = model
        self.initial_capacity = max(int(capacity), MIN_CAPACITY)
        self.device = next(model.parameters()).device
        self.cache: FCCache | None = None

    @property
    def batch_size(self) -> int:
        return 0 if self.cache is None else self.cache.batch_size

    @property
    def evicted(self) -> int:
        """Regular slots dropped so far."""
        return 0 if self.cache is None else self.cache.evicted

    def prefill(self, prompts) -> torch.Tensor:
        """Read a batch of prompts in one forward; returns the logits after each one ``(B, V)``.

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
        # the cache and every step live in inference mode (cheaper per op); the logits handed out
        # are ordinary tensors (a copy) that callers may modify in place
        with torch.inference_mode():
            self.cache = FCCache(self.model, B, capacity=max(self.initial_capacity, T + MIN_CAPACITY))
            logits = self.model(ids, cache=self.cache)  # (B, T, V)
            last = ((ids != PAD_ID).sum(dim=1) - 1).clamp(min=0)  # (B,)  prompts are right-padded
            logits = logits[torch.arange(B, device=self.device), last]  # (B, V)
        return logits.clone()

    def step(self, next_ids: torch.Tensor) -> torch.Tensor:
        """Append one token to every song; returns the logits for the token after it ``(B, V)``."""
        ids = torch.as_tensor(next_ids, dtype=torch.long, device=self.device).reshape(-1, 1)  # (B, 1)
        if ids.shape[0] != self.batch_size:
            raise ValueError(f"step got {ids.shape[0]} tokens for a batch of {self.batch_size} songs")
        with torch.inference_mode():
            logits = self.model(ids, cache=self.cache)[:, 0]  # (B, V)
        return logits.clone()

    @torch.inference_mode()
    def keep(self, rows) -> None:
        """Keep only these songs (indices into the current batch), in this order."""
        self.cache.select(rows)


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
