"""The REMIGEN2 / REMIGEN token grammar: which token may come next, and is a sequence well formed.

This module owns the *syntax* of a token sequence (docs/tokenizer.md) as one state machine over
token ids, so that generation only produces sequences the tokenizer decodes without skipping a
token, and so that prompts and token files can be checked with a clear message. One bar::

    REMIGEN2:  [s-*] t-*  ( o-*      ( i-* (p-* d-* v-*)+ )+ )*  b-1
    REMIGEN:   [s-*]      ( o-* t-*  ( i-* (p-* d-* v-*)+ )+ )*  b-1

A song is BOS, one or more bars, EOS. Beyond the shape, the machine enforces what the official
encoder guarantees: onsets strictly increase inside a bar and stay inside it (48 positions for 4/4,
or the length the ``s-*`` token gives); instruments strictly follow the sort order inside an onset;
notes of one instrument at one onset are non-increasing in (pitch, duration, velocity) (ties are
allowed: the encoder emits duplicates); drums (``i-128``) use pitches ``p-128..p-255``, others
``p-0..p-127``; only ``b-1`` closes a bar; durations use the encoder's 96 bins.
``GrammarConstraints`` narrows it further (instruments, tempo and tempo changes, time signature,
bars, minimum tokens, notes per instrument and onset).

The machine: ``_Tables`` (frozen per-id facts: kind, value, comparison key, the kinds each phase
accepts), ``Cursor`` (one sequence's state as ints), ``Grammar._bounds`` (per kind, the range the
next token's key must fall in: every rule beyond the shape is one line there), ``_allows`` and
``_step``. ``validate``, ``prefill`` and ``advance`` all run these; ``allowed`` looks up the
``(V,)`` mask of each sequence's *situation* (phase, bounds of the kinds that phase accepts,
partner instrument), computed once per grammar and device. Messages: ``museformer.grammar_messages``;
the numbers of the token format: ``museformer.remigen``. It knows nothing about MIDI or the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple

import numpy as np
import torch

from museformer.errors import MuseformerError
from museformer.grammar_messages import token_text, why
from museformer.remigen import (
    BAR_POSITIONS_4_4, DRUMS, ENCODINGS, INSTRUMENT_ORDERS, N_DURATION_BINS, SIX_TRACK_RANK,
    TIME_SIGNATURES, bar_length, tempo_bin,
)
from museformer.vocab import BOS_ID, EOS_ID, PAD_ID, TokenKind, Vocab

_BIG = 1 << 30  # "no bound"
K = TokenKind


class Phase(IntEnum):
    """What the last consumed token was, i.e. where in the bar grammar a sequence stands."""

    BAR_START = 0  # after BOS or b-1
    AFTER_TIME_SIG = 1  # after the bar's s-*
    AFTER_BAR_TEMPO = 2  # REMIGEN2: after the bar's t-*
    AFTER_ONSET = 3  # after o-*
    AFTER_ONSET_TEMPO = 4  # REMIGEN: after o-* t-*
    AFTER_INSTRUMENT = 5
    AFTER_PITCH = 6
    AFTER_DURATION = 7
    AFTER_VELOCITY = 8
    ENDED = 9  # after EOS: only padding (or EOS again) follows


# ------------------------------------------------------------------------------------------------
# constraints
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GrammarConstraints:
    """Extra rules on top of the grammar, for steering generation.

    Attributes:
        instruments: MIDI programs that may play (128 = drums); None = every one the vocabulary and
            sort order know.
        tempo_bpm: fix every ``t-*`` to this tempo's token; None = any tempo.
        tempo_changes: False = every ``t-*`` repeats the previous one, so a song keeps the tempo it
            starts with (as nearly all training songs do); True = any tempo at any bar / onset.
        time_signature: ``(numerator, denominator)`` fixing every ``s-*`` (only when time signatures
            are encoded); None = any.
        min_bars: EOS is allowed only after at least this many bars.
        max_bars: after this many bars only EOS may follow; ``min_bars == max_bars`` fixes the
            length in bars. This rule wins over ``min_tokens``.
        min_tokens: EOS is allowed only after this many tokens (BOS not counted); the paper
            generates with 1,024.
        max_notes_per_instrument: most notes one instrument may start at one onset (the grammar
            allows repeated equal notes, so this bounds degenerate loops); None = no limit.
        bar_positions: onset positions per bar when no ``s-*`` tokens are encoded (ignore_ts);
            48 = 4/4. The tokenizer keeps each file's own bar lengths under ignore_ts, so token
            files of other meters need more (at most 96, two whole notes); capped at the
            vocabulary's onset tokens.
    """

    instruments: tuple[int, ...] | None = None
    tempo_bpm: float | None = None
    tempo_changes: bool = True
    time_signature: tuple[int, int] | None = None
    min_bars: int = 1
    max_bars: int | None = None
    min_tokens: int = 0
    max_notes_per_instrument: int | None = None
    bar_positions: int = BAR_POSITIONS_4_4

    def __post_init__(self) -> None:
        def bad(name: str, need: str) -> MuseformerError:
            return MuseformerError(f"constraint {name}={getattr(self, name)!r}: {need}")

        def is_int(x) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        if self.instruments is not None:
            programs = tuple(sorted({int(p) for p in self.instruments}))
            if not programs or programs[0] < 0 or programs[-1] > DRUMS:
                raise bad("instruments", "give one or more programs in 0..128 (128 = drums)")
            object.__setattr__(self, "instruments", programs)
        if self.tempo_bpm is not None and not (isinstance(self.tempo_bpm, (int, float)) and self.tempo_bpm > 0):
            raise bad("tempo_bpm", "give a positive beats-per-minute value")
        if not isinstance(self.tempo_changes, bool):
            raise bad("tempo_changes", "must be True or False")
        if self.time_signature is not None:
            ts = tuple(int(x) for x in self.time_signature)
            if ts not in TIME_SIGNATURES:
                raise bad("time_signature", "need (n, 2^e) with e in 0..6, n in 1..2*2^e")
            object.__setattr__(self, "time_signature", ts)
        if not is_int(self.min_bars) or self.min_bars < 1:
            raise bad("min_bars", "must be an integer >= 1")
        if self.max_bars is not None and (not is_int(self.max_bars) or self.max_bars < self.min_bars):
            raise bad("max_bars", f"must be an integer >= min_bars ({self.min_bars})")
        if not is_int(self.min_tokens) or self.min_tokens < 0:
            raise bad("min_tokens", "must be an integer >= 0")
        m = self.max_notes_per_instrument
        if m is not None and (not is_int(m) or m < 1):
            raise bad("max_notes_per_instrument", "must be an integer >= 1")
        if not is_int(self.bar_positions) or not 1 <= self.bar_positions <= 2 * BAR_POSITIONS_4_4:
            raise bad("bar_positions", f"must be an integer in 1..{2 * BAR_POSITIONS_4_4}")


# ------------------------------------------------------------------------------------------------
# state
# ------------------------------------------------------------------------------------------------
class Cursor(NamedTuple):
    """One sequence's grammar state. ``inst_key`` is the sort key of the last instrument at this
    onset (2 rank, +1 for the second member of a shared rank); ``inst_partner`` the id of the one
    instrument that may still follow at the *same* rank (-1: none); ``last_*`` the previous note of
    the current instrument at this onset (2**30 = none yet); ``cur_*`` the note being written."""

    phase: int = Phase.BAR_START
    bars: int = 0  # bars closed by b-1
    length: int = 0  # tokens consumed after BOS, EOS and padding not counted
    bar_len: int = BAR_POSITIONS_4_4  # onset positions in the current bar
    onset: int = -1  # last onset in this bar, -1 = none
    inst_key: int = -1
    inst_partner: int = -1
    drum: bool = False  # the current instrument is i-128
    notes: int = 0  # notes of the current instrument at this onset
    cur_pitch: int = -1
    cur_duration: int = -1
    last_pitch: int = _BIG
    last_duration: int = _BIG
    last_velocity: int = _BIG
    tempo: int = -1  # value of the last t-*, -1 = none yet
    violated: bool = False  # forced through a token the grammar did not allow


@dataclass(frozen=True)
class GrammarState:
    """The grammar state of a batch of sequences: one ``Cursor`` per row, and the masks' device."""

    rows: tuple[Cursor, ...]
    device: torch.device

    @property
    def batch_size(self) -> int:
        """Number of sequences."""
        return len(self.rows)

    def select(self, rows: torch.Tensor | list[int]) -> GrammarState:
        """The states of some rows (reorder, repeat or drop sequences, e.g. for beams)."""
        picked = torch.as_tensor(rows, dtype=torch.long).reshape(-1).tolist()
        return GrammarState(tuple(self.rows[i] for i in picked), self.device)

    def _column(self, name: str, dtype=torch.long) -> torch.Tensor:
        return torch.tensor([getattr(c, name) for c in self.rows], dtype=dtype, device=self.device)

    phase = property(lambda self: self._column("phase"), doc="Long ``(B,)``: each row's ``Phase``.")
    bars = property(lambda self: self._column("bars"), doc="Long ``(B,)``: bars closed.")
    length = property(lambda self: self._column("length"), doc="Long ``(B,)``: tokens after BOS.")
    violated = property(lambda self: self._column("violated", torch.bool), doc="Bool ``(B,)``: forced.")
    finished = property(lambda self: self.phase == Phase.ENDED, doc="Bool ``(B,)``: EOS consumed.")


# ------------------------------------------------------------------------------------------------
# tables
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Tables:
    """Per-id facts of one vocabulary under one grammar (numpy for masks, lists for stepping)."""

    kinds: np.ndarray  # (V,) TokenKind
    key: np.ndarray  # (V,) what bounds compare: the value; sort key for i-*; the id for specials
    phase_mask: np.ndarray  # (phases, V) kinds each phase accepts, minus excluded tokens
    phase_kinds: dict  # Phase -> kinds it accepts
    excluded: dict  # id -> why the grammar never emits it
    kind_of: list
    value_of: list
    key_of: list
    bar_len_of: list  # bar length an s-* sets
    partner_of: list  # the allowed instrument sharing a rank with each i-* (-1: none)
    accepts: list  # phase_mask as lists
    program_of_key: dict
    has_partners: bool
    default_bar_len: int


def _phase_kinds(encoding: str, ignore_ts: bool) -> dict:
    remigen2 = encoding == "remigen2"
    bar_body = [K.ONSET, K.BAR]
    first = [K.TIME_SIG] if not ignore_ts else ([K.TEMPO] if remigen2 else bar_body)
    return {
        Phase.BAR_START: [K.SPECIAL] + first,
        Phase.AFTER_TIME_SIG: [K.TEMPO] if remigen2 else bar_body,
        Phase.AFTER_BAR_TEMPO: bar_body,
        Phase.AFTER_ONSET: [K.INSTRUMENT] if remigen2 else [K.TEMPO],
        Phase.AFTER_ONSET_TEMPO: [K.INSTRUMENT],
        Phase.AFTER_INSTRUMENT: [K.PITCH],
        Phase.AFTER_PITCH: [K.DURATION],
        Phase.AFTER_DURATION: [K.VELOCITY],
        Phase.AFTER_VELOCITY: [K.PITCH, K.INSTRUMENT, K.ONSET, K.BAR],
        Phase.ENDED: [K.SPECIAL],
    }


def _build_tables(vocab: Vocab, encoding: str, ignore_ts: bool, sort_insts: str, c: GrammarConstraints) -> _Tables:
    kinds, values = vocab.kinds.astype(np.int64), vocab.values.astype(np.int64)
    V = len(kinds)
    onsets = values[kinds == K.ONSET]
    n_onsets = int(onsets.max() + 1) if len(onsets) else 0  # longer bars are capped to this
    key = values.copy()
    key[kinds == K.SPECIAL] = np.flatnonzero(kinds == K.SPECIAL)  # EOS and PAD bounded apart
    inst = kinds == K.INSTRUMENT
    if sort_insts == "6tracks":  # 2 rank (+1 for the second program of a shared rank)
        key[inst] = [2 * SIX_TRACK_RANK[p] + (p == 32) if p in SIX_TRACK_RANK else -1 for p in values[inst]]
    else:
        key[inst] = 2 * values[inst]
    tempo = None if c.tempo_bpm is None else tempo_bin(c.tempo_bpm)
    fixed_ts = None if c.time_signature is None else TIME_SIGNATURES.index(c.time_signature)
    excluded = {}
    for i in range(V):
        k, v = int(kinds[i]), int(values[i])
        reason = {
            K.OTHER: "is not part of the REMIGEN grammar",
            K.SPECIAL: None if i in (EOS_ID, PAD_ID) else "is never generated",
            K.BAR: None if v == 1 else "is never produced (bars end with b-1)",
            K.DURATION: None if v < N_DURATION_BINS else f"is beyond the {N_DURATION_BINS} duration bins",
        }.get(k)
        if k == K.TIME_SIG:
            if ignore_ts:
                reason = "is not used: time signatures are ignored"
            elif v >= len(TIME_SIGNATURES):
                reason = f"is outside the {len(TIME_SIGNATURES)} time signatures"
            elif fixed_ts is not None and v != fixed_ts:
                reason = f"differs from the required time signature s-{fixed_ts} {c.time_signature}"
        elif k == K.TEMPO and tempo is not None and v != tempo:
            reason = f"differs from the required tempo t-{tempo} ({c.tempo_bpm} BPM)"
        elif k == K.INSTRUMENT and key[i] < 0:
            reason = f"is not an instrument of sort order {sort_insts!r}"
        elif k == K.INSTRUMENT and c.instruments is not None and v not in c.instruments:
            reason = f"is not among the allowed instruments {list(c.instruments)}"
        if reason is not None:
            excluded[i] = reason
    ok = np.array([i not in excluded for i in range(V)])
    if not (inst & ok).any():
        raise MuseformerError(
            f"no instrument left: constraint instruments={c.instruments} with vocabulary "
            f"{vocab.name!r} and sort order {sort_insts!r}"
        )
    phase_kinds = _phase_kinds(encoding, ignore_ts)
    phase_mask = np.stack([np.isin(kinds, phase_kinds[ph]) & ok for ph in Phase])
    bar_len = np.zeros(V, dtype=np.int64)
    for i in np.flatnonzero((kinds == K.TIME_SIG) & (values < len(TIME_SIGNATURES))):
        bar_len[i] = min(bar_length(TIME_SIGNATURES[values[i]]), n_onsets)
    allowed_inst = np.flatnonzero(inst & ok)
    partner = np.full(V, -1, dtype=np.int64)  # only 43 <-> 32 in "6tracks"
    for i in allowed_inst:
        for j in allowed_inst:
            if i != j and key[i] // 2 == key[j] // 2:
                partner[i] = j
    for array in (kinds, key, phase_mask):
        array.flags.writeable = False
    return _Tables(
        kinds=kinds, key=key, phase_mask=phase_mask, phase_kinds=phase_kinds, excluded=excluded,
        kind_of=kinds.tolist(), value_of=values.tolist(), key_of=key.tolist(), bar_len_of=bar_len.tolist(),
        partner_of=partner.tolist(), accepts=[row.tolist() for row in phase_mask],
        program_of_key={int(key[i]): int(values[i]) for i in allowed_inst},
        has_partners=bool((partner >= 0).any()),
        default_bar_len=min(c.bar_positions if ignore_ts else BAR_POSITIONS_4_4, n_onsets),
    )


# ------------------------------------------------------------------------------------------------
# the grammar
# ------------------------------------------------------------------------------------------------
class Grammar:
    """REMIGEN2 / REMIGEN next-token masks and validity checks for one vocabulary and encoding.

    Args:
        vocab: the vocabulary (``Vocab.builtin("lmd6remi")`` or ``"general"``) or its name.
        encoding: ``"remigen2"`` or ``"remigen"``.
        ignore_ts: no ``s-*`` tokens; every bar has ``constraints.bar_positions`` positions.
        sort_insts: instrument order inside an onset, ``"id"`` or ``"6tracks"``.
        constraints: extra rules (``GrammarConstraints``).
    """

    _MASKS_MAX = 1 << 14  # distinct situations remembered (a few thousand in a long song)

    def __init__(
        self,
        vocab: Vocab | str,
        encoding: str = "remigen2",
        ignore_ts: bool = True,
        sort_insts: str = "id",
        constraints: GrammarConstraints | None = None,
    ) -> None:
        if isinstance(vocab, str):
            try:
                vocab = Vocab.builtin(vocab)
            except ValueError as e:
                raise MuseformerError(str(e)) from None
        encoding = encoding.lower()
        if encoding not in ENCODINGS:
            raise MuseformerError(f"grammar encoding {encoding!r}: choose from {ENCODINGS}")
        if sort_insts not in INSTRUMENT_ORDERS:
            raise MuseformerError(f"grammar sort_insts {sort_insts!r}: choose from {INSTRUMENT_ORDERS}")
        if not ignore_ts and not (vocab.kinds == K.TIME_SIG).any():
            raise MuseformerError(
                f"vocabulary {vocab.name!r} has no time-signature tokens (s-*): use ignore_ts=True with it"
            )
        self.vocab, self.encoding, self.ignore_ts, self.sort_insts = vocab, encoding, bool(ignore_ts), sort_insts
        self.constraints = constraints or GrammarConstraints()
        self._t = _build_tables(vocab, encoding, self.ignore_ts, sort_insts, self.constraints)
        self._masks: dict[tuple, torch.Tensor] = {}  # (device, situation) -> (V,) bool

    @classmethod
    def for_tokenizer(cls, tokenizer, constraints: GrammarConstraints | None = None) -> Grammar:
        """The grammar of a ``museformer.tokenizer.Tokenizer`` (its encoding, options and vocabulary)."""
        cfg = tokenizer.config
        vocab = getattr(tokenizer, "vocab", None) or cfg.vocab
        return cls(vocab, cfg.encoding, cfg.ignore_ts, cfg.sort_insts, constraints)

    def __repr__(self) -> str:
        return (
            f"Grammar(vocab={self.vocab.name!r}, encoding={self.encoding!r}, ignore_ts={self.ignore_ts}, "
            f"sort_insts={self.sort_insts!r}, constraints={self.constraints!r})"
        )

    # -- the rules -------------------------------------------------------------------------------
    def _bounds(self, cur: Cursor, kind: int) -> tuple[int, int]:
        """Inclusive [low, high] on the key of the next token when it is of ``kind``."""
        c = self.constraints
        if kind == K.SPECIAL:
            if cur.phase == Phase.ENDED:
                return PAD_ID, EOS_ID
            at_end = cur.phase == Phase.BAR_START
            eos_ok = at_end and cur.bars >= c.min_bars and cur.length >= c.min_tokens
            eos_ok = eos_ok or (at_end and c.max_bars is not None and cur.bars >= c.max_bars)
            return (EOS_ID if eos_ok else _BIG), EOS_ID
        if c.max_bars is not None and cur.phase == Phase.BAR_START and cur.bars >= c.max_bars:
            return _BIG, _BIG  # the song is full: only EOS
        if kind == K.ONSET:
            return cur.onset + 1, cur.bar_len - 1
        if kind == K.TEMPO and not c.tempo_changes and cur.tempo >= 0:
            return cur.tempo, cur.tempo
        if kind == K.INSTRUMENT:  # the next rank up: keys are 2 rank (+1)
            return (0 if cur.inst_key < 0 else (cur.inst_key // 2 + 1) * 2), _BIG
        if kind == K.PITCH:
            if c.max_notes_per_instrument is not None and cur.notes >= c.max_notes_per_instrument:
                return 0, -1
            lo, hi = (128, 255) if cur.drum else (0, 127)
            return lo, min(hi, cur.last_pitch)
        if kind == K.DURATION:
            return 0, (cur.last_duration if cur.cur_pitch == cur.last_pitch else _BIG)
        if kind == K.VELOCITY:
            tie = cur.cur_pitch == cur.last_pitch and cur.cur_duration == cur.last_duration
            return 0, (cur.last_velocity if tie else _BIG)
        return 0, _BIG

    def _allows(self, cur: Cursor, tok: int) -> bool:
        t = self._t
        if not 0 <= tok < len(t.kind_of) or not t.accepts[cur.phase][tok]:
            return False
        lo, hi = self._bounds(cur, t.kind_of[tok])
        return lo <= t.key_of[tok] <= hi or tok == cur.inst_partner

    def _step(self, cur: Cursor, tok: int) -> Cursor:
        """The state after ``tok`` (assumes nothing about its validity)."""
        t = self._t
        if not 0 <= tok < len(t.kind_of):
            return cur
        if tok == EOS_ID:
            return cur._replace(phase=Phase.ENDED)
        kind, value = t.kind_of[tok], t.value_of[tok]
        if cur.phase == Phase.ENDED or kind in (K.SPECIAL, K.OTHER):
            return cur
        length = cur.length + 1
        if kind == K.BAR:
            return cur._replace(phase=Phase.BAR_START, length=length, bars=cur.bars + 1, onset=-1,
                                inst_key=-1, inst_partner=-1)
        if kind == K.TIME_SIG:
            return cur._replace(phase=Phase.AFTER_TIME_SIG, length=length, bar_len=t.bar_len_of[tok])
        if kind == K.TEMPO:
            phase = Phase.AFTER_ONSET_TEMPO if cur.phase == Phase.AFTER_ONSET else Phase.AFTER_BAR_TEMPO
            return cur._replace(phase=phase, length=length, tempo=value)
        if kind == K.ONSET:
            return cur._replace(phase=Phase.AFTER_ONSET, length=length, onset=value, inst_key=-1, inst_partner=-1)
        if kind == K.INSTRUMENT:
            key = t.key_of[tok]
            same_rank = cur.inst_key >= 0 and cur.inst_key // 2 == key // 2  # a pair closes
            return cur._replace(phase=Phase.AFTER_INSTRUMENT, length=length, inst_key=key,
                                inst_partner=-1 if same_rank else t.partner_of[tok], drum=value == DRUMS,
                                notes=0, last_pitch=_BIG, last_duration=_BIG, last_velocity=_BIG)
        if kind == K.PITCH:
            return cur._replace(phase=Phase.AFTER_PITCH, length=length, cur_pitch=value)
        if kind == K.DURATION:
            return cur._replace(phase=Phase.AFTER_DURATION, length=length, cur_duration=value)
        return cur._replace(phase=Phase.AFTER_VELOCITY, length=length, notes=cur.notes + 1,  # velocity
                            last_pitch=cur.cur_pitch, last_duration=cur.cur_duration, last_velocity=value)

    def _consume(self, cur: Cursor, tok: int, where=None) -> Cursor:
        """``_step``, flagging a token the grammar forbids, or raising when ``where`` is given: a
        function of the token's text that says where the token stands, for the message."""
        if self._allows(cur, tok):
            return self._step(cur, tok)
        if where is not None:
            raise MuseformerError(f"{where(token_text(self.vocab, tok))}: {why(self, cur, tok)}")
        return self._step(cur, tok)._replace(violated=True)

    # -- masks -------------------------------------------------------------------------------------
    def _mask(self, cur: Cursor, device: torch.device) -> torch.Tensor:
        """Bool ``(V,)`` of the tokens allowed after ``cur``, shared by equal situations."""
        t = self._t
        kinds = t.phase_kinds[cur.phase]
        bounds = tuple(self._bounds(cur, k) for k in kinds)
        partner = cur.inst_partner if t.has_partners else -1
        situation = (device, cur.phase, partner, bounds)
        mask = self._masks.get(situation)
        if mask is None:
            if len(self._masks) >= self._MASKS_MAX:
                self._masks.clear()
            low = np.zeros(len(K), dtype=np.int64)
            high = np.full(len(K), _BIG, dtype=np.int64)
            for k, (lo, hi) in zip(kinds, bounds):
                low[k], high[k] = lo, hi
            in_bounds = (t.key >= low[t.kinds]) & (t.key <= high[t.kinds])  # (V,)
            if partner >= 0:  # the second bass (32 / 43) at the same rank
                in_bounds[partner] = True
            mask = torch.from_numpy(t.phase_mask[cur.phase] & in_bounds).to(device)
            self._masks[situation] = mask
        return mask

    # -- batch API ---------------------------------------------------------------------------------
    def start(self, batch_size: int, device: torch.device | str = "cpu") -> GrammarState:
        """The state of ``batch_size`` sequences right after BOS."""
        return GrammarState((Cursor(bar_len=self._t.default_bar_len),) * batch_size, torch.device(device))

    def allowed(self, state: GrammarState) -> torch.Tensor:
        """Bool ``(B, V)``: the tokens each sequence may take next. Every row has at least one."""
        return torch.stack([self._mask(cur, state.device) for cur in state.rows])

    def is_allowed(self, state: GrammarState, token_ids: torch.Tensor) -> torch.Tensor:
        """Bool ``(B,)``: whether each sequence may take its given next token."""
        toks = torch.as_tensor(token_ids).reshape(-1).tolist()
        ok = [self._allows(cur, int(tok)) for cur, tok in zip(state.rows, toks)]
        return torch.tensor(ok, dtype=torch.bool, device=state.device)

    def advance(
        self,
        state: GrammarState,
        token_ids: torch.Tensor,
        strict: bool = False,
        active: torch.Tensor | None = None,
    ) -> GrammarState:
        """The state after each sequence takes its token; the input state is not modified.

        Args:
            state: the current state.
            token_ids: ``(B,)`` the next token of each sequence.
            strict: raise ``MuseformerError`` when a token is not allowed; otherwise such rows get
                ``violated`` set and a best-effort transition.
            active: optional bool ``(B,)``; rows where it is False keep their state (e.g. padding).
        """
        toks = torch.as_tensor(token_ids).reshape(-1).tolist()
        live = [True] * len(toks) if active is None else torch.as_tensor(active).reshape(-1).tolist()
        rows = tuple(
            self._consume(cur, int(tok), (lambda text, b=b: f"sequence {b}: token {text} is not allowed") if strict
                          else None) if on else cur
            for b, (cur, tok, on) in enumerate(zip(state.rows, toks, live))
        )
        return GrammarState(rows, state.device)

    def prefill(self, state: GrammarState, prompt_ids, strict: bool = True) -> GrammarState:
        """The state after each sequence reads its prompt (tokens after BOS).

        Args:
            state: the states to start from (usually ``start(B)``).
            prompt_ids: ``(B, T)`` ids, or a list of B id lists of any lengths; ``PAD_ID`` entries
                are skipped (so left or right padding both work) and an optional leading BOS is
                ignored.
            strict: raise ``MuseformerError`` naming the prompt, position and token of the first
                token the grammar does not allow; False only flags ``violated``.
        """
        if isinstance(prompt_ids, (torch.Tensor, np.ndarray)) and np.ndim(prompt_ids) == 1:
            prompt_ids = [prompt_ids]
        prompts = [self._as_ids(r) for r in prompt_ids]
        if len(prompts) != state.batch_size:
            raise MuseformerError(f"prefill: {len(prompts)} prompts for a batch of {state.batch_size} sequences")
        rows = []
        for b, (cur, ids) in enumerate(zip(state.rows, prompts)):
            ids = [t for t in ids if t != PAD_ID]
            if ids and ids[0] == BOS_ID and cur.length == 0 and cur.phase == Phase.BAR_START:
                ids = ids[1:]
            for pos, tok in enumerate(ids):
                where = (lambda text, b=b, pos=pos: f"prompt {b} breaks the {self.encoding.upper()} grammar "
                         f"at token {pos} ({text})") if strict else None
                cur = self._consume(cur, tok, where)
            rows.append(cur)
        return GrammarState(tuple(rows), state.device)

    def state_of(self, tokens, device: torch.device | str = "cpu") -> GrammarState:
        """The state (batch of one) after a token sequence, e.g. to resume; violations only flag."""
        return self.prefill(self.start(1, device), [self._as_ids(tokens)], strict=False)

    # -- whole sequences ---------------------------------------------------------------------------
    def validate(self, tokens, complete: bool = True, max_problems: int = 20) -> list[str]:
        """The grammar problems of one token sequence; an empty list means it is valid.

        Args:
            tokens: ids (list, array or tensor), token texts, or one space-separated string. A
                leading BOS and a trailing EOS (then padding) are optional.
            complete: also require the end to be a place where the song may end (after ``b-1``,
                with the constraints' minimum bars and tokens); False accepts any valid prefix.
            max_problems: stop after this many (later problems often follow from the first).

        Returns:
            Messages like ``"position 7 ('p-60'): after i-* comes p-*"`` (position 0 = first token
            after an optional BOS).
        """
        ids = self._as_ids(tokens)
        if ids and ids[0] == BOS_ID:  # at position 0 EOS is never allowed, so this is BOS
            ids = ids[1:]
        problems: list[str] = []
        cur = self.start(1).rows[0]
        for pos, tok in enumerate(ids):
            if not self._allows(cur, tok):
                problems.append(f"position {pos} ({token_text(self.vocab, tok)}): {why(self, cur, tok)}")
                if len(problems) >= max_problems:
                    return problems
            cur = self._step(cur, tok)
        if complete and cur.phase != Phase.ENDED and not self._allows(cur, EOS_ID):
            problems.append(f"end of sequence after {len(ids)} tokens: {why(self, cur, EOS_ID)}")
        return problems

    def is_valid(self, tokens, complete: bool = True) -> bool:
        """True when ``validate`` finds no problem."""
        return not self.validate(tokens, complete=complete, max_problems=1)

    def _as_ids(self, tokens) -> list[int]:
        if isinstance(tokens, str):
            tokens = tokens.split()
        if isinstance(tokens, (torch.Tensor, np.ndarray)):
            return tokens.reshape(-1).tolist()
        tokens = list(tokens)
        if tokens and isinstance(tokens[0], str):
            unknown = [t for t in tokens if t not in self.vocab]
            if unknown:
                raise MuseformerError(f"token(s) not in vocabulary {self.vocab.name!r}: {unknown[:5]}")
            return self.vocab.encode(tokens).tolist()
        return [int(t) for t in tokens]


__all__ = ["Cursor", "Grammar", "GrammarConstraints", "GrammarState", "Phase"]
