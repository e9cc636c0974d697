"""The REMIGEN2 / REMIGEN token grammar: which token may come next, and is a sequence well formed.

This module owns the *syntax* of a token sequence (SPEC section 1) as a small state machine over
token ids, so that generation can only produce sequences the tokenizer decodes without skipping a
token, and so that prompts and token files can be checked with a clear message.

REMIGEN2 (LMD setting), one bar::

    [s-*] t-*  ( o-*  ( i-*  (p-* d-* v-*)+ )+ )*  b-1

REMIGEN (general use), one bar::

    [s-*]  ( o-* t-*  ( i-*  (p-* d-* v-*)+ )+ )*  b-1

A song is BOS, one or more bars, EOS. Beyond the shape, the machine enforces what the official
encoder guarantees: onsets strictly increase inside a bar and stay inside it (48 positions for 4/4,
or the length the ``s-*`` token gives); instruments strictly follow the sort order inside an onset;
notes of one instrument at one onset are non-increasing in (pitch, duration, velocity) (the encoder
sorts them descending and emits duplicates, so ties are allowed); drums (``i-128``) use pitches
``p-128..p-255`` and other instruments ``p-0..p-127``; only ``b-1`` closes a bar and durations use
the 96 bins the encoder produces. ``GrammarConstraints`` narrows it further (instruments, tempo,
time signature, number of bars, minimum tokens before EOS, notes per instrument and onset).

Two implementations of one machine, held equal by the tests:

- a batched one on torch tensors (``start`` / ``allowed`` / ``advance``), which runs next to the
  model at every decoding step: one ``(phase, V)`` table lookup plus per-sequence lower/upper bounds
  per token kind, compared against a per-id key (the value, or the sort rank for instruments);
- a scalar one on Python ints (``validate``, ``prefill``), fast for long single sequences and able
  to say *why* a token is wrong.

For a batch of one (generating one song), ``allowed`` / ``advance`` take the scalar machine's
path: ``advance`` steps a Python cursor, and ``allowed`` looks up the mask of the cursor's situation
(phase, the bounds of the kinds that phase accepts, partner instrument), computed once by the
tensor machine; same results, a few tensor ops per token instead of ~100.

It knows nothing about MIDI or the model; ids and kinds come from ``museformer.vocab``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from enum import IntEnum

import numpy as np
import torch

from museformer.errors import MuseformerError
from museformer.vocab import BOS_ID, EOS_ID, PAD_ID, TokenKind, Vocab

POSITIONS_PER_QUARTER = 12
BAR_POSITIONS_4_4 = 4 * POSITIONS_PER_QUARTER  # bar length when time signatures are ignored
DURATION_BINS = 96  # d-0..d-95: 8 groups of 12 bins; the encoder never emits d-96 and above
MIN_BPM, MAX_BPM = 16.0, 256.0
DRUM_PROGRAM = 128

ENCODINGS = ("remigen2", "remigen")
# Rank of each program inside one onset. "id": ascending program number (drums 128 last).
# "6tracks": the official LMD order (lead, drums, bass, guitar, piano, strings); program 32 is
# accepted as bass like 43, as in the official sorter, so the two share a rank and may follow each
# other in either order at one onset (the encoder keeps track order there), but not repeat.
SIX_TRACKS_RANK = {80: 0, 128: 1, 43: 2, 32: 2, 25: 3, 0: 4, 48: 5}
SORT_ORDERS = ("id", "6tracks")

_BIG = 1 << 30  # "no bound"
_N_KINDS = len(TokenKind)


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


_PHASE_TEXT = {
    Phase.BAR_START: "the start of a bar",
    Phase.AFTER_TIME_SIG: "s-*",
    Phase.AFTER_BAR_TEMPO: "the bar's t-*",
    Phase.AFTER_ONSET: "o-*",
    Phase.AFTER_ONSET_TEMPO: "o-* t-*",
    Phase.AFTER_INSTRUMENT: "i-*",
    Phase.AFTER_PITCH: "p-*",
    Phase.AFTER_DURATION: "d-*",
    Phase.AFTER_VELOCITY: "v-*",
    Phase.ENDED: "EOS",
}
_KIND_TEXT = {
    TokenKind.SPECIAL: "EOS",
    TokenKind.BAR: "b-1",
    TokenKind.ONSET: "o-*",
    TokenKind.TEMPO: "t-*",
    TokenKind.TIME_SIG: "s-*",
    TokenKind.INSTRUMENT: "i-*",
    TokenKind.PITCH: "p-*",
    TokenKind.DURATION: "d-*",
    TokenKind.VELOCITY: "v-*",
}


def tempo_token_value(bpm: float) -> int:
    """The ``t-k`` value of a tempo: BPM clipped to [16, 256], k = round(12·log2(BPM/16))."""
    bpm = min(max(float(bpm), MIN_BPM), MAX_BPM)
    return round(12 * math.log2(bpm / MIN_BPM))


def time_signatures() -> list[tuple[int, int]]:
    """All time signatures in ``s-k`` order: (n, 2^e) for e = 0..6, n = 1..2·2^e (254 in all)."""
    return [(n, 2**e) for e in range(7) for n in range(1, 2 * 2**e + 1)]


def bar_positions(numerator: int, denominator: int) -> int:
    """Onset positions in one bar of ``numerator/denominator`` (12 per quarter, rounded down, >= 1).

    At least one, as in the tokenizer (the official code asserts on zero-length bars such as 1/64).
    """
    return max(4 * POSITIONS_PER_QUARTER * numerator // denominator, 1)


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
    time_signature: tuple[int, int] | None = None
    min_bars: int = 1
    max_bars: int | None = None
    min_tokens: int = 0
    max_notes_per_instrument: int | None = None
    bar_positions: int = BAR_POSITIONS_4_4

    def __post_init__(self) -> None:
        if self.instruments is not None:
            programs = tuple(sorted({int(p) for p in self.instruments}))
            if not programs or programs[0] < 0 or programs[-1] > DRUM_PROGRAM:
                raise MuseformerError(
                    f"constraint instruments={self.instruments!r}: give one or more programs in 0..128 (128 = drums)"
                )
            object.__setattr__(self, "instruments", programs)
        if self.tempo_bpm is not None and not (isinstance(self.tempo_bpm, (int, float)) and self.tempo_bpm > 0):
            raise MuseformerError(f"constraint tempo_bpm={self.tempo_bpm!r}: give a positive beats-per-minute value")
        if self.time_signature is not None:
            ts = tuple(int(x) for x in self.time_signature)
            if ts not in time_signatures():
                raise MuseformerError(
                    f"constraint time_signature={self.time_signature!r}: need (n, 2^e) with e in 0..6, n in 1..2*2^e"
                )
            object.__setattr__(self, "time_signature", ts)
        if not isinstance(self.min_bars, int) or self.min_bars < 1:
            raise MuseformerError(f"constraint min_bars={self.min_bars!r}: must be an integer >= 1")
        if self.max_bars is not None and (not isinstance(self.max_bars, int) or self.max_bars < self.min_bars):
            raise MuseformerError(
                f"constraint max_bars={self.max_bars!r}: must be an integer >= min_bars ({self.min_bars})"
            )
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise MuseformerError(f"constraint min_tokens={self.min_tokens!r}: must be an integer >= 0")
        m = self.max_notes_per_instrument
        if m is not None and (not isinstance(m, int) or m < 1):
            raise MuseformerError(f"constraint max_notes_per_instrument={m!r}: must be an integer >= 1")
        if not isinstance(self.bar_positions, int) or not 1 <= self.bar_positions <= 2 * BAR_POSITIONS_4_4:
            raise MuseformerError(f"constraint bar_positions={self.bar_positions!r}: must be an integer in 1..96")

    def to_dict(self) -> dict:
        """JSON-native dict (tuples as lists)."""
        d = asdict(self)
        for key in ("instruments", "time_signature"):
            if d[key] is not None:
                d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> GrammarConstraints:
        """Inverse of ``to_dict``; unknown keys are errors."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise MuseformerError(f"unknown grammar constraint(s) {unknown}; known: {sorted(known)}")
        d = dict(d)
        for key in ("instruments", "time_signature"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        return cls(**d)


# ------------------------------------------------------------------------------------------------
# state
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GrammarState:
    """The grammar state of a batch of sequences; every field is a ``(B,)`` tensor.

    ``inst_key`` is the sort key of the last instrument at this onset (2·rank, +1 for program 32
    so that it can share bass rank with 43); ``inst_partner`` the id of the one instrument that may
    still follow at the *same* rank (-1: none). ``last_*`` describe the previous note of the current
    instrument at the current onset (``2**30`` = none yet); ``cur_pitch`` / ``cur_duration`` the
    note being written.
    ``violated`` flags rows that were forced through a token the grammar did not allow.
    """

    phase: torch.Tensor
    bars: torch.Tensor  # bars closed by b-1
    length: torch.Tensor  # tokens consumed after BOS, EOS and padding not counted
    bar_len: torch.Tensor  # onset positions in the current bar
    onset: torch.Tensor  # last onset in this bar, -1 = none
    inst_key: torch.Tensor  # sort key of the last instrument at this onset, -1 = none
    inst_partner: torch.Tensor  # id of an instrument allowed at the same rank next, -1 = none
    drum: torch.Tensor  # bool: current instrument is i-128
    notes: torch.Tensor  # notes of the current instrument at this onset
    cur_pitch: torch.Tensor
    cur_duration: torch.Tensor
    last_pitch: torch.Tensor
    last_duration: torch.Tensor
    last_velocity: torch.Tensor
    violated: torch.Tensor  # bool

    @property
    def batch_size(self) -> int:
        """Number of sequences."""
        return self.phase.shape[0]

    def select(self, rows: torch.Tensor | list[int]) -> GrammarState:
        """The states of some rows (reorder, repeat or drop sequences, e.g. for beams)."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.phase.device)
        return GrammarState(**{f.name: getattr(self, f.name).index_select(0, rows) for f in fields(self)})

    @property
    def finished(self) -> torch.Tensor:
        """Bool ``(B,)``: EOS consumed."""
        return self.phase == Phase.ENDED


@dataclass
class _Cursor:
    """One sequence's state as Python ints (the scalar machine used by validate and prefill)."""

    phase: int = Phase.BAR_START
    bars: int = 0
    length: int = 0
    bar_len: int = BAR_POSITIONS_4_4
    onset: int = -1
    inst_key: int = -1
    inst_partner: int = -1
    drum: bool = False
    notes: int = 0
    cur_pitch: int = -1
    cur_duration: int = -1
    last_pitch: int = _BIG
    last_duration: int = _BIG
    last_velocity: int = _BIG
    violated: bool = False


# ------------------------------------------------------------------------------------------------
# the grammar
# ------------------------------------------------------------------------------------------------
class Grammar:
    """REMIGEN2 / REMIGEN next-token masks and validity checks for one vocabulary and encoding.

    Args:
        vocab: the vocabulary (``Vocab.builtin("lmd6remi")`` or ``"general"``) or its name.
        encoding: ``"remigen2"`` or ``"remigen"``.
        ignore_ts: no ``s-*`` tokens; every bar has 48 positions (4/4).
        sort_insts: instrument order inside an onset, ``"id"`` or ``"6tracks"``.
        constraints: extra rules (``GrammarConstraints``).
    """

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
        if sort_insts not in SORT_ORDERS:
            raise MuseformerError(f"grammar sort_insts {sort_insts!r}: choose from {SORT_ORDERS}")
        constraints = constraints or GrammarConstraints()
        kinds = vocab.kinds.astype(np.int64)
        values = vocab.values.astype(np.int64)
        if not ignore_ts and not (kinds == TokenKind.TIME_SIG).any():
            raise MuseformerError(
                f"vocabulary {vocab.name!r} has no time-signature tokens (s-*): use ignore_ts=True with it"
            )
        self.vocab = vocab
        self.encoding = encoding
        self.ignore_ts = bool(ignore_ts)
        self.sort_insts = sort_insts
        self.constraints = constraints
        self._build_tables(kinds, values)
        self._device_tables: dict[torch.device, dict[str, torch.Tensor]] = {}
        # one-sequence fast path (generating one song): allowed masks by what decides them, and the
        # last state seen with its cursor (states are immutable, so identity is a safe key)
        self._one_masks: dict[tuple, torch.Tensor] = {}
        self._one_last: tuple[GrammarState, _Cursor] | None = None
        self._state_fields = tuple(f.name for f in fields(GrammarState))

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

    # -- tables ----------------------------------------------------------------------------------
    def _inst_key(self, program: int) -> int:
        """2·rank in the sort order (+1 for program 32, bass's second member); -1 if unknown."""
        if self.sort_insts == "id":
            return 2 * program
        if program not in SIX_TRACKS_RANK:
            return -1
        return 2 * SIX_TRACKS_RANK[program] + (program == 32)

    def _build_tables(self, kinds: np.ndarray, values: np.ndarray) -> None:
        """Per-id key, static "ever allowed" mask, and the (phase, V) mask of allowed kinds."""
        c = self.constraints
        V = len(kinds)
        n_onsets = int((kinds == TokenKind.ONSET).sum() and values[kinds == TokenKind.ONSET].max() + 1)
        self._onset_cap = n_onsets  # bars longer than the vocabulary's onsets are capped to it

        # key: what the per-sequence bounds compare against (the value; sort rank for instruments;
        # the id itself for specials, so that EOS = 2 and PAD = 1 can be bounded separately)
        key = values.copy()
        special = kinds == TokenKind.SPECIAL
        key[special] = np.arange(V)[special]
        inst = kinds == TokenKind.INSTRUMENT
        key[inst] = [self._inst_key(int(p)) for p in values[inst]]

        # ok: tokens this grammar can ever emit, with the reason for the others (for messages)
        ok = np.zeros(V, dtype=bool)
        self._excluded_why: dict[int, str] = {}
        tempo = None if c.tempo_bpm is None else tempo_token_value(c.tempo_bpm)
        ts_all = time_signatures()
        fixed_ts = None if c.time_signature is None else ts_all.index(c.time_signature)
        for i in range(V):
            k, v = int(kinds[i]), int(values[i])
            why = None
            if k == TokenKind.OTHER:
                why = "is not part of the REMIGEN grammar"
            elif k == TokenKind.SPECIAL:
                why = None if i in (EOS_ID, PAD_ID) else "is never generated"
            elif k == TokenKind.BAR:
                why = None if v == 1 else "is never produced (bars end with b-1)"
            elif k == TokenKind.TIME_SIG:
                if self.ignore_ts:
                    why = "is not used: time signatures are ignored"
                elif v >= len(ts_all):
                    why = "is outside the 254 time signatures"
                elif fixed_ts is not None and v != fixed_ts:
                    why = f"differs from the required time signature s-{fixed_ts} {c.time_signature}"
            elif k == TokenKind.TEMPO:
                if tempo is not None and v != tempo:
                    why = f"differs from the required tempo t-{tempo} ({c.tempo_bpm} BPM)"
            elif k == TokenKind.INSTRUMENT:
                if key[i] < 0:
                    why = f"is not an instrument of sort order {self.sort_insts!r}"
                elif c.instruments is not None and v not in c.instruments:
                    why = f"is not among the allowed instruments {list(c.instruments)}"
            elif k == TokenKind.DURATION:
                why = None if v < DURATION_BINS else f"is beyond the {DURATION_BINS} duration bins"
            ok[i] = why is None
            if why is not None:
                self._excluded_why[i] = why
        if not any(ok[i] for i in np.flatnonzero(inst)):
            raise MuseformerError(
                f"no instrument left: constraint instruments={c.instruments} with vocabulary "
                f"{self.vocab.name!r} and sort order {self.sort_insts!r}"
            )

        # which kinds each phase accepts (EOS is bounded per sequence in _bounds)
        K = TokenKind
        bar_start = [K.SPECIAL] + (
            [K.TIME_SIG]
            if not self.ignore_ts
            else ([K.TEMPO] if self.encoding == "remigen2" else [K.ONSET, K.BAR])
        )
        remigen2 = self.encoding == "remigen2"
        phase_kinds = {
            Phase.BAR_START: bar_start,
            Phase.AFTER_TIME_SIG: [K.TEMPO] if remigen2 else [K.ONSET, K.BAR],
            Phase.AFTER_BAR_TEMPO: [K.ONSET, K.BAR],
            Phase.AFTER_ONSET: [K.INSTRUMENT] if remigen2 else [K.TEMPO],
            Phase.AFTER_ONSET_TEMPO: [K.INSTRUMENT],
            Phase.AFTER_INSTRUMENT: [K.PITCH],
            Phase.AFTER_PITCH: [K.DURATION],
            Phase.AFTER_DURATION: [K.VELOCITY],
            Phase.AFTER_VELOCITY: [K.PITCH, K.INSTRUMENT, K.ONSET, K.BAR],
            Phase.ENDED: [K.SPECIAL],
        }
        self._phase_kinds = phase_kinds
        phase_mask = np.zeros((len(Phase), V), dtype=bool)
        for ph, ks in phase_kinds.items():
            phase_mask[ph] = np.isin(kinds, ks) & ok

        # bar length set by each s-* token
        bar_len = np.zeros(V, dtype=np.int64)
        ts_ids = np.flatnonzero((kinds == TokenKind.TIME_SIG) & (values < len(ts_all)))
        for i in ts_ids:
            bar_len[i] = min(bar_positions(*ts_all[values[i]]), n_onsets)

        # program of each instrument rank, for messages
        self._program_of_key = {int(key[i]): int(values[i]) for i in np.flatnonzero(inst & ok)}
        # the allowed instrument sharing a rank with each instrument (only 43 <-> 32 in "6tracks")
        partner = np.full(V, -1, dtype=np.int64)
        allowed_inst = np.flatnonzero(inst & ok)
        for i in allowed_inst:
            for j in allowed_inst:
                if i != j and key[i] // 2 == key[j] // 2:
                    partner[i] = j
        self._has_partners = bool((partner >= 0).any())
        self._default_bar_len = min(c.bar_positions if self.ignore_ts else BAR_POSITIONS_4_4, n_onsets)
        self._tempo = tempo

        self._np = {
            "kinds": kinds,
            "values": values,
            "key": key,
            "phase_mask": phase_mask,
            "bar_len": bar_len,
            "partner": partner,
            "ids": np.arange(V, dtype=np.int64),
        }
        # phase each kind moves to (-1: handled separately)
        phase_of_kind = np.full(_N_KINDS, -1, dtype=np.int64)
        phase_of_kind[K.BAR] = Phase.BAR_START
        phase_of_kind[K.TIME_SIG] = Phase.AFTER_TIME_SIG
        phase_of_kind[K.ONSET] = Phase.AFTER_ONSET
        phase_of_kind[K.INSTRUMENT] = Phase.AFTER_INSTRUMENT
        phase_of_kind[K.PITCH] = Phase.AFTER_PITCH
        phase_of_kind[K.DURATION] = Phase.AFTER_DURATION
        phase_of_kind[K.VELOCITY] = Phase.AFTER_VELOCITY
        self._np["phase_of_kind"] = phase_of_kind
        # python lists for the scalar machine (indexing numpy per token is slower)
        self._py_kinds = kinds.tolist()
        self._py_values = values.tolist()
        self._py_key = key.tolist()
        self._py_bar_len = bar_len.tolist()
        self._py_partner = partner.tolist()
        self._py_phase_mask = [row.tolist() for row in phase_mask]

    def _tables(self, device: torch.device) -> dict[str, torch.Tensor]:
        device = torch.device(device)
        if device not in self._device_tables:
            self._device_tables[device] = {k: torch.as_tensor(v, device=device) for k, v in self._np.items()}
        return self._device_tables[device]

    # -- batched machine -------------------------------------------------------------------------
    def start(self, batch_size: int, device: torch.device | str = "cpu") -> GrammarState:
        """The state of ``batch_size`` sequences right after BOS."""

        def full(value, dtype=torch.long):
            return torch.full((batch_size,), value, dtype=dtype, device=device)

        return GrammarState(
            phase=full(Phase.BAR_START),
            bars=full(0),
            length=full(0),
            bar_len=full(self._default_bar_len),
            onset=full(-1),
            inst_key=full(-1),
            inst_partner=full(-1),
            drum=full(False, torch.bool),
            notes=full(0),
            cur_pitch=full(-1),
            cur_duration=full(-1),
            last_pitch=full(_BIG),
            last_duration=full(_BIG),
            last_velocity=full(_BIG),
            violated=full(False, torch.bool),
        )

    def _bounds(self, s: GrammarState) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sequence inclusive [low, high] on the key of each token kind: two ``(B, K)`` tensors."""
        c = self.constraints
        B = s.phase.shape[0]
        dev = s.phase.device
        zero = torch.zeros(B, dtype=torch.long, device=dev)
        big = torch.full_like(zero, _BIG)
        at_bar_end = s.phase == Phase.BAR_START
        ended = s.phase == Phase.ENDED
        # EOS: at a bar end, after min bars and min tokens (or once max bars are reached)
        eos_ok = at_bar_end & (s.bars >= c.min_bars) & (s.length >= c.min_tokens)
        if c.max_bars is not None:
            eos_ok = eos_ok | (at_bar_end & (s.bars >= c.max_bars))
        special_lo = torch.where(ended, zero + PAD_ID, torch.where(eos_ok, zero + EOS_ID, big))
        special_hi = zero + EOS_ID
        # pitch: the instrument's range, non-increasing after the previous note
        pitch_lo = torch.where(s.drum, zero + 128, zero)
        pitch_hi = torch.minimum(torch.where(s.drum, zero + 255, zero + 127), s.last_pitch)
        if c.max_notes_per_instrument is not None:
            pitch_hi = torch.where(s.notes >= c.max_notes_per_instrument, zero - 1, pitch_hi)
        same_pitch = s.cur_pitch == s.last_pitch
        dur_hi = torch.where(same_pitch, s.last_duration, big)
        vel_hi = torch.where(same_pitch & (s.cur_duration == s.last_duration), s.last_velocity, big)
        lo = [zero] * _N_KINDS
        hi = [big] * _N_KINDS
        lo[TokenKind.SPECIAL], hi[TokenKind.SPECIAL] = special_lo, special_hi
        lo[TokenKind.ONSET], hi[TokenKind.ONSET] = s.onset + 1, s.bar_len - 1
        # the next rank up: keys are 2·rank (+1), so round up past the current rank's pair
        lo[TokenKind.INSTRUMENT] = torch.where(s.inst_key < 0, zero, (s.inst_key // 2 + 1) * 2)
        lo[TokenKind.PITCH], hi[TokenKind.PITCH] = pitch_lo, pitch_hi
        hi[TokenKind.DURATION] = dur_hi
        hi[TokenKind.VELOCITY] = vel_hi
        low, high = torch.stack(lo, dim=1), torch.stack(hi, dim=1)  # (B, K)
        if c.max_bars is not None:
            # after the last bar nothing but EOS: close every other kind
            full_song = (at_bar_end & (s.bars >= c.max_bars))[:, None]
            not_special = torch.ones(_N_KINDS, dtype=torch.bool, device=dev)
            not_special[TokenKind.SPECIAL] = False
            low = torch.where(full_song & not_special, _BIG, low)
        return low, high

    def allowed(self, state: GrammarState) -> torch.Tensor:
        """Bool ``(B, V)``: the tokens each sequence may take next. Every row has at least one."""
        if state.phase.shape[0] == 1:
            return self._allowed_one(state)
        return self._allowed_batch(state)

    # -- one sequence: Python ints and a mask per distinct situation --------------------------
    # Generating one song calls allowed/advance once per token; on a batch of one, the tensor
    # machine's ~100 tiny ops cost more than the scalar machine (which the tests hold equal to it).
    _ONE_MASKS_MAX = 1 << 14  # distinct situations remembered (a few thousand in a long song)

    def _cursor_one(self, state: GrammarState) -> _Cursor:
        last = self._one_last
        if last is not None and last[0] is state:
            return last[1]
        cur = self._cursor_of(state, 0)
        self._one_last = (state, cur)
        return cur

    def _allowed_one(self, state: GrammarState) -> torch.Tensor:
        cur = self._cursor_one(state)
        # the mask depends only on the phase, the bounds of the kinds that phase accepts, and the
        # partner instrument; equal situations share one mask
        kinds = self._phase_kinds[Phase(cur.phase)]
        bounds = tuple(self._cursor_bounds(cur, k) for k in kinds)
        partner = cur.inst_partner if self._has_partners else -1
        key = (state.phase.device, cur.phase, partner, bounds)
        mask = self._one_masks.get(key)
        if mask is None:
            if len(self._one_masks) >= self._ONE_MASKS_MAX:
                self._one_masks.clear()
            # allowed()'s formula on numpy with the cursor's bounds (kinds outside the phase are
            # masked by the phase anyway)
            t = self._np
            low = np.zeros(_N_KINDS, dtype=np.int64)
            high = np.full(_N_KINDS, _BIG, dtype=np.int64)
            for k, (lo, hi) in zip(kinds, bounds):
                low[k], high[k] = lo, hi
            in_phase = t["phase_mask"][cur.phase]
            in_bounds = (t["key"] >= low[t["kinds"]]) & (t["key"] <= high[t["kinds"]])
            if partner >= 0:
                in_bounds[partner] = True
            mask = torch.from_numpy(in_phase & in_bounds)[None].to(state.phase.device)
            self._one_masks[key] = mask
        return mask.clone()

    def _advance_one(self, state: GrammarState, token: int, strict: bool, active: bool) -> GrammarState:
        cur = self._cursor_one(state)
        if not active:
            return state
        ok = self._cursor_allows(cur, token)
        if strict and not ok:
            raise MuseformerError(
                f"sequence 0: token {self._text(token)} is not allowed: {self._why(cur, token)}"
            )
        new = _Cursor(**cur.__dict__)
        self._cursor_step(new, token)
        new.violated = cur.violated or not ok
        # one tensor for all fields (views of it): a handful of ops instead of one per field
        names = self._state_fields
        packed = torch.tensor([int(getattr(new, n)) for n in names], device=state.phase.device).view(-1, 1).unbind(0)
        columns = dict(zip(names, packed))
        columns["drum"], columns["violated"] = columns["drum"].bool(), columns["violated"].bool()
        out = GrammarState(**columns)
        self._one_last = (out, new)
        return out

    def _allowed_batch(self, state: GrammarState) -> torch.Tensor:
        t = self._tables(state.phase.device)
        low, high = self._bounds(state)
        kinds, key = t["kinds"], t["key"]
        in_phase = t["phase_mask"][state.phase]  # (B, V)
        in_bounds = (key >= low[:, kinds]) & (key <= high[:, kinds])  # (B, V)
        if self._has_partners:  # the second bass (32 / 43) at the same rank
            in_bounds |= t["ids"] == state.inst_partner[:, None]
        return in_phase & in_bounds

    def is_allowed(self, state: GrammarState, token_ids: torch.Tensor) -> torch.Tensor:
        """Bool ``(B,)``: whether each sequence may take its given next token (cheaper than ``allowed``)."""
        t = self._tables(state.phase.device)
        tok = token_ids.to(state.phase.device).long().clamp(0, t["kinds"].numel() - 1)
        low, high = self._bounds(state)
        kind = t["kinds"][tok][:, None]
        key = t["key"][tok]
        inside = (token_ids >= 0) & (token_ids < t["kinds"].numel())
        in_phase = inside & t["phase_mask"][state.phase, tok]
        in_bounds = (key >= low.gather(1, kind)[:, 0]) & (key <= high.gather(1, kind)[:, 0])
        return in_phase & (in_bounds | (tok == state.inst_partner))

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
        tok = torch.as_tensor(token_ids, device=state.phase.device).long().reshape(-1)
        if tok.shape[0] == 1 and state.phase.shape[0] == 1:
            return self._advance_one(state, int(tok[0]), strict, active is None or bool(active.reshape(-1)[0]))
        t = self._tables(state.phase.device)
        ok = self.is_allowed(state, tok)
        if active is not None:
            ok = ok | ~active
        if strict and not bool(ok.all()):
            row = int(torch.nonzero(~ok)[0, 0])
            raise MuseformerError(
                f"sequence {row}: token {self._text(int(tok[row]))} is not allowed: "
                f"{self._why(self._cursor_of(state, row), int(tok[row]))}"
            )
        V = t["kinds"].numel()
        tok_c = tok.clamp(0, V - 1)
        K = TokenKind
        ended = state.phase == Phase.ENDED
        kind = torch.where((tok >= 0) & (tok < V), t["kinds"][tok_c], torch.full_like(tok, int(K.OTHER)))
        # after EOS nothing moves the state; specials and unknown symbols never do
        kind = torch.where(ended, torch.full_like(kind, int(K.OTHER)), kind)
        value = t["values"][tok_c]
        is_bar, is_onset = kind == K.BAR, kind == K.ONSET
        is_inst, is_vel = kind == K.INSTRUMENT, kind == K.VELOCITY
        is_eos = tok == EOS_ID

        phase = t["phase_of_kind"][kind]
        phase = torch.where(
            kind == K.TEMPO,
            torch.where(state.phase == Phase.AFTER_ONSET, Phase.AFTER_ONSET_TEMPO, Phase.AFTER_BAR_TEMPO),
            phase,
        )
        phase = torch.where(is_eos, Phase.ENDED, phase)
        phase = torch.where(phase < 0, state.phase, phase)  # padding / unknown symbols: stay
        counts = (kind != K.SPECIAL) & (kind != K.OTHER)
        new_inst = is_inst
        # a second instrument at the same rank closes the pair; a first one opens it
        same_rank = (state.inst_key >= 0) & (state.inst_key // 2 == t["key"][tok_c] // 2)
        partner = torch.where(same_rank, -1, t["partner"][tok_c])
        new = GrammarState(
            phase=phase,
            bars=state.bars + is_bar.long(),
            length=state.length + counts.long(),
            bar_len=torch.where(kind == K.TIME_SIG, t["bar_len"][tok_c], state.bar_len),
            onset=torch.where(is_bar, -1, torch.where(is_onset, value, state.onset)),
            inst_key=torch.where(is_bar | is_onset, -1, torch.where(new_inst, t["key"][tok_c], state.inst_key)),
            inst_partner=torch.where(is_bar | is_onset, -1, torch.where(new_inst, partner, state.inst_partner)),
            drum=torch.where(new_inst, value == DRUM_PROGRAM, state.drum),
            notes=torch.where(new_inst, 0, state.notes + is_vel.long()),
            cur_pitch=torch.where(kind == K.PITCH, value, state.cur_pitch),
            cur_duration=torch.where(kind == K.DURATION, value, state.cur_duration),
            last_pitch=torch.where(new_inst, _BIG, torch.where(is_vel, state.cur_pitch, state.last_pitch)),
            last_duration=torch.where(new_inst, _BIG, torch.where(is_vel, state.cur_duration, state.last_duration)),
            last_velocity=torch.where(new_inst, _BIG, torch.where(is_vel, value, state.last_velocity)),
            violated=state.violated | ~ok,
        )
        if active is not None:
            keep = ~active.to(tok.device)
            new = GrammarState(
                **{f.name: torch.where(keep, getattr(state, f.name), getattr(new, f.name)) for f in fields(new)}
            )
        return new

    # -- scalar machine --------------------------------------------------------------------------
    def _cursor_bounds(self, cur: _Cursor, kind: int) -> tuple[int, int]:
        """Inclusive [low, high] on the key of a token of ``kind`` (mirrors ``_bounds``)."""
        c = self.constraints
        K = TokenKind
        if kind == K.SPECIAL:
            if cur.phase == Phase.ENDED:
                return PAD_ID, EOS_ID
            at_end = cur.phase == Phase.BAR_START
            eos_ok = at_end and cur.bars >= c.min_bars and cur.length >= c.min_tokens
            eos_ok = eos_ok or (at_end and c.max_bars is not None and cur.bars >= c.max_bars)
            return (EOS_ID if eos_ok else _BIG), EOS_ID
        if c.max_bars is not None and cur.phase == Phase.BAR_START and cur.bars >= c.max_bars:
            return _BIG, _BIG
        if kind == K.ONSET:
            return cur.onset + 1, cur.bar_len - 1
        if kind == K.INSTRUMENT:
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

    def _cursor_allows(self, cur: _Cursor, tok: int) -> bool:
        if not 0 <= tok < len(self._py_kinds) or not self._py_phase_mask[cur.phase][tok]:
            return False
        lo, hi = self._cursor_bounds(cur, self._py_kinds[tok])
        return lo <= self._py_key[tok] <= hi or tok == cur.inst_partner

    def _cursor_step(self, cur: _Cursor, tok: int) -> None:
        """Move one sequence's cursor over a token (mirrors ``advance``; assumes nothing about validity)."""
        K = TokenKind
        ended = cur.phase == Phase.ENDED
        if not 0 <= tok < len(self._py_kinds):
            return
        kind, value = self._py_kinds[tok], self._py_values[tok]
        if tok == EOS_ID:
            cur.phase = Phase.ENDED
            return
        if ended or kind in (K.SPECIAL, K.OTHER):
            return
        cur.length += 1
        if kind == K.BAR:
            cur.phase, cur.bars, cur.onset, cur.inst_key, cur.inst_partner = Phase.BAR_START, cur.bars + 1, -1, -1, -1
        elif kind == K.TIME_SIG:
            cur.phase, cur.bar_len = Phase.AFTER_TIME_SIG, self._py_bar_len[tok]
        elif kind == K.TEMPO:
            cur.phase = Phase.AFTER_ONSET_TEMPO if cur.phase == Phase.AFTER_ONSET else Phase.AFTER_BAR_TEMPO
        elif kind == K.ONSET:
            cur.phase, cur.onset, cur.inst_key, cur.inst_partner = Phase.AFTER_ONSET, value, -1, -1
        elif kind == K.INSTRUMENT:
            key = self._py_key[tok]
            same_rank = cur.inst_key >= 0 and cur.inst_key // 2 == key // 2
            cur.inst_partner = -1 if same_rank else self._py_partner[tok]
            cur.phase, cur.inst_key, cur.drum, cur.notes = Phase.AFTER_INSTRUMENT, key, value == 128, 0
            cur.last_pitch = cur.last_duration = cur.last_velocity = _BIG
        elif kind == K.PITCH:
            cur.phase, cur.cur_pitch = Phase.AFTER_PITCH, value
        elif kind == K.DURATION:
            cur.phase, cur.cur_duration = Phase.AFTER_DURATION, value
        elif kind == K.VELOCITY:
            cur.phase, cur.notes = Phase.AFTER_VELOCITY, cur.notes + 1
            cur.last_pitch, cur.last_duration, cur.last_velocity = cur.cur_pitch, cur.cur_duration, value

    def _cursor_of(self, state: GrammarState, row: int) -> _Cursor:
        return _Cursor(**{f.name: getattr(state, f.name)[row].item() for f in fields(state)})

    def _stack(self, cursors: list[_Cursor], device: torch.device | str = "cpu") -> GrammarState:
        def col(name, dtype=torch.long):
            return torch.tensor([getattr(c, name) for c in cursors], dtype=dtype, device=device)

        flags = ("drum", "violated")
        return GrammarState(
            **{f.name: col(f.name, torch.bool if f.name in flags else torch.long) for f in fields(GrammarState)}
        )

    def _text(self, tok: int) -> str:
        return repr(self.vocab.symbols[tok]) if 0 <= tok < len(self.vocab) else f"id {tok} (outside the vocabulary)"

    def _why(self, cur: _Cursor, tok: int) -> str:
        """A sentence saying why ``tok`` may not follow the state ``cur``."""
        if not 0 <= tok < len(self._py_kinds):
            return f"ids run from 0 to {len(self._py_kinds) - 1}"
        c = self.constraints
        K = TokenKind
        kind, value = self._py_kinds[tok], self._py_values[tok]
        if tok in self._excluded_why:
            return f"{self.vocab.symbols[tok]} {self._excluded_why[tok]}"
        if cur.phase == Phase.ENDED:
            return "nothing but padding may follow EOS"
        if c.max_bars is not None and cur.phase == Phase.BAR_START and cur.bars >= c.max_bars and tok != EOS_ID:
            return f"the song already has max_bars={c.max_bars} bars; only EOS may follow"
        if not self._py_phase_mask[cur.phase][tok]:
            expected = [_KIND_TEXT[k] for k in self._phase_kinds[Phase(cur.phase)] if k != K.SPECIAL]
            if cur.phase == Phase.BAR_START:
                expected.append("EOS")
            return f"after {_PHASE_TEXT[Phase(cur.phase)]} comes {' or '.join(expected)}"
        if tok == EOS_ID:
            if cur.bars < c.min_bars:
                return f"EOS needs at least {c.min_bars} complete bar(s), got {cur.bars}"
            return f"EOS needs at least {c.min_tokens} tokens, got {cur.length}"
        lo, hi = self._cursor_bounds(cur, kind)
        if kind == K.ONSET:
            if value <= cur.onset:
                return f"onsets must increase inside a bar (previous o-{cur.onset})"
            return f"the bar has {cur.bar_len} onset positions (o-0..o-{cur.bar_len - 1})"
        if kind == K.INSTRUMENT:
            prev = self._program_of_key.get(cur.inst_key, cur.inst_key)
            return f"instruments at one onset follow sort order {self.sort_insts!r} strictly (previous i-{prev})"
        if kind == K.PITCH:
            if c.max_notes_per_instrument is not None and cur.notes >= c.max_notes_per_instrument:
                return f"at most {c.max_notes_per_instrument} notes per instrument and onset"
            if cur.drum and value < 128:
                return "drum (i-128) pitches are p-128..p-255"
            if not cur.drum and value > 127:
                return "non-drum pitches are p-0..p-127 (p-128 and up are drums)"
            return f"notes of one instrument at one onset go down in pitch (previous p-{cur.last_pitch})"
        if kind == K.DURATION:
            return f"equal pitches go down in duration (previous note p-{cur.last_pitch} d-{cur.last_duration})"
        if kind == K.VELOCITY:
            return (
                f"equal notes go down in velocity (previous note p-{cur.last_pitch} d-{cur.last_duration} "
                f"v-{cur.last_velocity})"
            )
        return f"key {self._py_key[tok]} outside [{lo}, {hi}]"  # unreachable with the kinds above

    def _as_ids(self, tokens) -> list[int]:
        if isinstance(tokens, str):
            tokens = tokens.split()
        if isinstance(tokens, torch.Tensor):
            return tokens.reshape(-1).tolist()
        if isinstance(tokens, np.ndarray):
            return tokens.reshape(-1).tolist()
        tokens = list(tokens)
        if tokens and isinstance(tokens[0], str):
            unknown = [t for t in tokens if t not in self.vocab]
            if unknown:
                raise MuseformerError(f"token(s) not in vocabulary {self.vocab.name!r}: {unknown[:5]}")
            return self.vocab.encode(tokens).tolist()
        return [int(t) for t in tokens]

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
        cur = _Cursor(bar_len=self._default_bar_len)
        for pos, tok in enumerate(ids):
            if not self._cursor_allows(cur, tok):
                problems.append(f"position {pos} ({self._text(tok)}): {self._why(cur, tok)}")
                if len(problems) >= max_problems:
                    return problems
            self._cursor_step(cur, tok)
        if complete and cur.phase != Phase.ENDED and not self._cursor_allows(cur, EOS_ID):
            problems.append(f"end of sequence after {len(ids)} tokens: {self._why(cur, EOS_ID)}")
        return problems

    def is_valid(self, tokens, complete: bool = True) -> bool:
        """True when ``validate`` finds no problem."""
        return not self.validate(tokens, complete=complete, max_problems=1)

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
        rows = [self._as_ids(r) for r in prompt_ids]
        if len(rows) != state.batch_size:
            raise MuseformerError(f"prefill: {len(rows)} prompts for a batch of {state.batch_size} sequences")
        cursors = []
        for b, ids in enumerate(rows):
            ids = [t for t in ids if t != PAD_ID]
            if ids and ids[0] == BOS_ID and state.length[b].item() == 0 and state.phase[b].item() == Phase.BAR_START:
                ids = ids[1:]
            cur = self._cursor_of(state, b)
            for pos, tok in enumerate(ids):
                if not self._cursor_allows(cur, tok):
                    if strict:
                        raise MuseformerError(
                            f"prompt {b} breaks the {self.encoding.upper()} grammar at token {pos} "
                            f"({self._text(tok)}): {self._why(cur, tok)}"
                        )
                    cur.violated = True
                self._cursor_step(cur, tok)
            cursors.append(cur)
        return self._stack(cursors, device=state.phase.device)

    def state_of(self, tokens, device: torch.device | str = "cpu") -> GrammarState:
        """The state (batch of one) after a token sequence, e.g. to resume; violations only flag."""
        return self.prefill(self.start(1, device), [self._as_ids(tokens)], strict=False)


__all__ = [
    "Grammar",
    "GrammarConstraints",
    "GrammarState",
    "Phase",
    "bar_positions",
    "tempo_token_value",
    "time_signatures",
]
