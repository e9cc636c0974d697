"""MIDI <-> REMIGEN / REMIGEN2 tokens, identical to the official MidiProcessor encoder.

This module owns the conversion between music (a ``symusic.Score`` or a MIDI file) and the token
sequences Museformer reads: ``TokenizerConfig`` (the options), ``Tokenizer`` (encode / decode,
save / load) and the official text dump format (``read_token_lines`` / ``write_token_lines``).
It knows nothing about the model; ids come from ``museformer.vocab``.

The encoder reproduces btyu/MidiProcessor 0.1.5 (``MidiEncoder('REMIGEN2'|'REMIGEN')``, which reads
MIDI with miditoolkit), token for token, but works on symusic's note arrays with numpy instead of a
Python loop per note and per position (docs/spec.md section 1; docs/tokenizer.md lists every rule):

- positions: ``round(tick * 12 / ticks_per_quarter)`` (round half to even, as Python's ``round``);
  duration = rounded end - rounded start, binned into 96 duration bins;
- the song spans positions ``0 .. last onset``; time-signature and tempo changes at or after the
  position after the last onset are ignored; the last change at a position wins; a change inside a
  bar takes effect at the next bar start (time signature) or the next bar / onset token (tempo);
- notes at one position are grouped by instrument (``128`` = drums; all tracks of one instrument
  are merged) in instrument sort order, and inside a group sorted by the ids of
  (pitch, duration, velocity), descending;
- pitch normalisation: plain pitch-class counts of the non-drum notes, correlated with 24 +-1 scale
  templates; the official code keeps the first two maximal keys (a major key always ties with its
  relative minor), picks the minor one when its tonic is more frequent, and shifts to C major /
  A minor, then by octaves until every pitch fits 0..127;
- ``remove_empty_bars`` drops the bars before the bar of the first note (the song already ends
  with the bar of the last onset).

Where miditoolkit and symusic disagree (see docs/tokenizer.md) this module follows what the
official encoder produces on the same file: ``encode_file`` files each note under the program in
force at its note-off, as miditoolkit does (``museformer.midi_programs``). Zero-length notes, which crash the official encoder,
are encoded with duration bin 0.

Instrument order ``"6tracks"`` (the LMD setting) ranks lead (80), drums (128), bass (43 and 32),
guitar (25), piano (0), strings (48). The official code crashes on any other program; here other
programs are first mapped to the nearest of those six families (``six_track_program``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import symusic

from museformer import __version__
from museformer.errors import MuseformerError
from museformer import midi_programs
from museformer.files import write_midi_atomic, write_text_atomic
from museformer.remigen import (
    BIN_TO_DURATION, DRUMS, DURATION_TO_BIN, ENCODINGS, INSTRUMENT_ORDERS, MAX_TS_DENOMINATOR,
    MAX_WHOLE_NOTES_PER_BAR, MIN_TEMPO, N_DURATION_BINS, N_TEMPO_BINS, POSITIONS_PER_QUARTER,
    SIX_TRACK_RANK, TIME_SIGNATURE_IDS, TIME_SIGNATURES,
)
from museformer.remigen import bar_length as _bar_length, tempo_bin as _tempo_bin
from museformer.vocab import SPECIAL_SYMBOLS, Vocab

# ---------------------------------------------------------------------------------------------
# Quantisation tables (MidiProcessor's VocabManager defaults; shared with the grammar)
# ---------------------------------------------------------------------------------------------
DECODE_TICKS_PER_QUARTER = 480
DEFAULT_TEMPO = 120.0
DEFAULT_TIME_SIGNATURE = (4, 4)
DEFAULT_VELOCITY = 96

# Token text of every (kind, value) the encoder can produce, in one flat table so a whole song is
# turned into text with one numpy take. Kind order here is private to this module.
_PREFIXES = ("b", "s", "t", "o", "i", "p", "d", "v")
_SIZES = (2, len(TIME_SIGNATURES), N_TEMPO_BINS, 128, 129, 256, 128, 32)
_BASE = dict(zip(_PREFIXES, np.concatenate([[0], np.cumsum(_SIZES)[:-1]]).tolist()))
_SIZE_OF = dict(zip(_PREFIXES, _SIZES))  # valid values of each kind: 0 .. size - 1
_TEXT = np.array([f"{p}-{v}" for p, n in zip(_PREFIXES, _SIZES) for v in range(n)], dtype=object)


def six_track_program(program: int, is_drum: bool) -> int:
    """The "6tracks" instrument of a MIDI program: one of 0, 25, 32, 43, 48, 80, 128.

    The six (and 32, which the official code also accepts as bass) map to themselves. Others go to
    the nearest family: pianos 0-7 -> 0, guitars 24-31 -> 25, basses 33-39 -> 43, strings and
    ensembles 40-55 -> 48, drums (channel 10) -> 128, everything else (organs, brass, reeds, pipes,
    synths, ethnic, percussive, effects) -> lead 80.
    """
    if is_drum:
        return DRUMS
    if program in SIX_TRACK_RANK:
        return program
    if program < 8:
        return 0
    if 24 <= program < 32:
        return 25
    if 32 <= program < 40:
        return 43
    if 40 <= program < 56:
        return 48
    return 80


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenizerConfig:
    """Options of the official encoder.

    Attributes:
        encoding: ``"remigen2"`` (tempo once per bar; the LMD setting) or ``"remigen"`` (tempo at
            every onset).
        normalize_pitch: transpose non-drum notes to C major / A minor.
        remove_empty_bars: drop the empty bars before the first note.
        ignore_ts: emit no time-signature tokens (bars still follow the file's time signatures).
        sort_insts: instrument order inside an onset: ``"id"`` (program number, drums last) or
            ``"6tracks"`` (lead, drums, bass, guitar, piano, strings; other programs mapped).
        vocab: ``"general"`` or ``"lmd6remi"``: the id space of ``as_ids`` and ``decode``.
    """

    encoding: str = "remigen2"
    normalize_pitch: bool = False
    remove_empty_bars: bool = False
    ignore_ts: bool = False
    sort_insts: str = "id"
    vocab: str = "general"

    def __post_init__(self) -> None:
        if self.encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {ENCODINGS}, got {self.encoding!r}")
        if self.sort_insts not in INSTRUMENT_ORDERS:
            raise ValueError(f"sort_insts must be one of {INSTRUMENT_ORDERS}, got {self.sort_insts!r}")
        if self.vocab not in ("general", "lmd6remi"):
            raise ValueError(f"vocab must be 'general' or 'lmd6remi', got {self.vocab!r}")
        for name in ("normalize_pitch", "remove_empty_bars", "ignore_ts"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the options."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TokenizerConfig:
        """Inverse of ``to_dict``; unknown keys are an error."""
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown TokenizerConfig keys: {sorted(unknown)}")
        return cls(**d)


PRESETS = {
    "general": TokenizerConfig(),  # the defaults: REMIGEN2 with time signatures, general vocabulary
    # the paper's LMD preprocessing; the lmd6remi vocabulary of the released model
    "lmd6": TokenizerConfig(
        encoding="remigen2",
        normalize_pitch=True,
        remove_empty_bars=True,
        ignore_ts=True,
        sort_insts="6tracks",
        vocab="lmd6remi",
    ),
}


@dataclass
class DecodeReport:
    """What ``decode`` could not use.

    Attributes:
        skipped: number of tokens (or ids) that were skipped.
        reasons: how many were skipped for each reason (e.g. ``"unknown token"``).
    """

    skipped: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped += n
        self.reasons[reason] = self.reasons.get(reason, 0) + n


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------
class Tokenizer:
    """MIDI <-> REMIGEN(2) tokens with the options of ``TokenizerConfig``.

    ``Tokenizer(**options)`` or ``Tokenizer(config=...)``; ``Tokenizer.preset("lmd6")``.
    """

    def __init__(self, config: TokenizerConfig | None = None, **options: Any) -> None:
        if config is not None and options:
            raise ValueError("give either a TokenizerConfig or keyword options, not both")
        self.config = config if config is not None else TokenizerConfig(**options)
        self.vocab = Vocab.builtin(self.config.vocab)
        # flat token table index -> vocabulary id (UNK where the vocabulary lacks the token)
        self._text_to_id = self.vocab.encode(list(_TEXT))
        # The official 6tracks order accepts program 32 as bass, but the lmd6remi vocabulary has no
        # i-32: with it, program 32 joins the bass the vocabulary has (43) instead of becoming <unk>.
        self._keep_program_32 = "i-32" in self.vocab

    @classmethod
    def preset(cls, name: str) -> Tokenizer:
        """A named configuration; ``"lmd6"`` is the paper's LMD setting."""
        if name not in PRESETS:
            raise ValueError(f"unknown tokenizer preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(PRESETS[name])

    def __repr__(self) -> str:
        return f"Tokenizer({self.config!r})"

    # -- encode ---------------------------------------------------------------------------------
    def encode_file(self, path: str | Path, as_ids: bool = False) -> list[str] | np.ndarray:
        """Encode a MIDI file; raises ``MuseformerError`` naming it if it is unreadable or empty."""
        path = Path(path)
        try:
            data = path.read_bytes()
            score = symusic.Score.from_midi(data)
        except Exception as e:  # symusic raises several types for corrupt files
            raise MuseformerError(f"cannot read MIDI file {path}: {e}") from None
        # the official reader files a note under the program at its note-off; symusic, at its
        # note-on: where a program change may fall in between, take the programs from the events
        raw = midi_programs.read_notes(data) if midi_programs.may_differ(data) else None
        codes = self._encode_codes(score, str(path), raw)
        return self._text_to_id[codes] if as_ids else _TEXT[codes].tolist()

    def encode(self, score: symusic.Score, as_ids: bool = False, name: str = "score") -> list[str] | np.ndarray:
        """Encode a score: token texts, or int64 vocabulary ids (no BOS/EOS) with ``as_ids``."""
        codes = self._encode_codes(score, name)
        if as_ids:
            return self._text_to_id[codes]
        return _TEXT[codes].tolist()

    def _encode_codes(self, score: symusic.Score, name: str, raw: midi_programs.RawNotes | None = None) -> np.ndarray:
        cfg = self.config
        if score.ticks_per_quarter <= 0:
            raise MuseformerError(f"{name}: invalid ticks per quarter {score.ticks_per_quarter}")
        tpq = score.ticks_per_quarter
        if raw is None:
            raw = _score_notes(score)
        starts, ends, pitches, velocities, tracks = raw.start, raw.end, raw.pitch, raw.velocity, raw.group
        insts = _instruments(raw.program, raw.is_drum, cfg.sort_insts == "6tracks", self._keep_program_32)
        if len(starts) == 0:
            raise MuseformerError(f"{name}: the MIDI file has no notes")
        if starts.min() < 0:
            raise MuseformerError(f"{name}: the MIDI file has notes at negative times")

        onset = _to_pos(starts, tpq)
        duration = _to_pos(ends, tpq) - onset
        n_pos = int(onset.max()) + 1  # the song covers positions 0 .. last onset

        ts_pos, ts_val = _changes_in_song(score.time_signatures, tpq, n_pos, _time_signature_values)
        if len(ts_pos) == 0 or ts_pos[0] != 0:
            ts_pos = np.concatenate([[0], ts_pos])
            ts_val = np.concatenate([[TIME_SIGNATURE_IDS[DEFAULT_TIME_SIGNATURE]], ts_val])
        tempo_pos, tempo_val = _changes_in_song(score.tempos, tpq, n_pos, _tempo_values)
        if len(tempo_pos) == 0 or tempo_pos[0] != 0:
            tempo_pos = np.concatenate([[0], tempo_pos])
            tempo_val = np.concatenate([[_tempo_bin(np.array([DEFAULT_TEMPO]))[0]], tempo_val])

        bar_starts, bar_ts = _bar_starts(ts_pos, ts_val, n_pos)

        is_drum = insts == DRUMS
        if cfg.normalize_pitch:
            pitches = pitches + np.where(is_drum, 0, _pitch_shift(pitches[~is_drum]))
        pitch_id = np.where(is_drum, pitches + 128, pitches)
        dur_id = DURATION_TO_BIN[np.clip(duration, 0, len(DURATION_TO_BIN) - 1)]
        vel_id = velocities // 4

        note_bar = np.searchsorted(bar_starts, onset, side="right") - 1
        local = onset - bar_starts[note_bar]
        if cfg.sort_insts == "6tracks":
            rank = np.vectorize(SIX_TRACK_RANK.__getitem__, otypes=[np.int64])(insts)
            # 32 and 43 share a rank; the official stable sort then keeps the order in which the
            # instruments first appear at that onset, i.e. the earliest track with a note there
            tie = _first_track_at_onset(onset, insts, tracks)
        else:
            rank, tie = insts, insts
        # official order: onset, instrument, then (pitch, duration, velocity) ids descending
        order = np.lexsort((-vel_id, -dur_id, -pitch_id, insts, tie, rank, onset))
        onset, note_bar, local, insts = onset[order], note_bar[order], local[order], insts[order]
        pitch_id, dur_id, vel_id = pitch_id[order], dur_id[order], vel_id[order]

        first_bar = int(note_bar[0]) if cfg.remove_empty_bars else 0
        n_bars = len(bar_starts)
        return _layout(
            cfg, first_bar, n_bars, bar_starts, bar_ts, tempo_pos, tempo_val,
            onset, note_bar, local, insts, pitch_id, dur_id, vel_id,
        )  # fmt: skip

    # -- decode ---------------------------------------------------------------------------------
    def decode(self, tokens: Sequence[str] | Sequence[int] | np.ndarray) -> symusic.Score:
        """Tokens (texts or ids) -> score at 480 ticks per quarter; invalid tokens are skipped."""
        return self.decode_with_report(tokens)[0]

    def decode_with_report(self, tokens: Sequence[str] | Sequence[int] | np.ndarray) -> tuple[symusic.Score, DecodeReport]:
        """Like ``decode``, also returning how many tokens were skipped and why.

        Follows the official decoder: ``b`` closes a bar (bar length from the current time
        signature, 4/4 until an ``s`` token), ``o`` sets the position inside the bar, ``s`` / ``t``
        change the time signature / tempo (at the bar start / current position) when their value
        changes, ``i`` selects the instrument (piano until the first ``i``) and ``p d v`` makes a
        note. Defaults: 120 BPM and 4/4 at tick 0 when the tokens set none. Skipped: unknown text,
        ids outside the vocabulary, ``<unk>``, out-of-range values, ``d`` not after ``p``, ``v``
        not after ``d``, and a ``p`` or ``p d`` left without its velocity. ``<s>``, ``<pad>`` and
        ``</s>`` are ignored without counting.
        """
        report = DecodeReport()
        texts = self._as_texts(tokens, report)
        scale = DECODE_TICKS_PER_QUARTER // POSITIONS_PER_QUARTER  # 40 ticks per position
        bar_start, pos = 0, 0
        bar_len = _bar_length(DEFAULT_TIME_SIGNATURE)
        cur_ts_id = cur_tempo_id = None
        inst, pitch, dur = 0, 0, 1
        pending = 0  # tokens of the note being read: 1 after p, 2 after p d
        tempos: list[tuple[int, float]] = []
        sigs: list[tuple[int, tuple[int, int]]] = []
        notes: dict[int, list[tuple[int, int, int, int]]] = {}
        for text in texts:
            if text in SPECIAL_SYMBOLS and text != "<unk>":
                continue
            prefix, sep, value = text.partition("-")
            if not sep or not value.isdigit() or prefix not in _SIZE_OF:
                report.skip("unknown token")
                continue
            v = int(value)
            if v >= _SIZE_OF[prefix]:
                report.skip("value out of range")
                continue
            if prefix == "d":
                if pending != 1:
                    report.skip("'d' not after 'p'")
                    continue
                dur, pending = max(int(BIN_TO_DURATION[min(v, N_DURATION_BINS - 1)]), 1), 2
                continue
            if prefix == "v":
                if pending != 2:
                    report.skip("'v' not after 'd'")
                    continue
                notes.setdefault(inst, []).append((pos * scale, dur * scale, pitch, 4 * v + 2))
                pending = 0
                continue
            if pending:  # the note being read has no velocity: drop its tokens
                report.skip("note without velocity", pending)
                pending = 0
            if prefix == "p":
                pitch, pending = (v - 128 if v >= 128 else v), 1
            elif prefix == "b":
                bar_start += bar_len
                pos = bar_start
            elif prefix == "s":
                if v != cur_ts_id:
                    cur_ts_id = v
                    bar_len = _bar_length(TIME_SIGNATURES[v])
                    sigs.append((bar_start * scale, TIME_SIGNATURES[v]))
            elif prefix == "t":
                if v != cur_tempo_id:
                    cur_tempo_id = v
                    tempos.append((pos * scale, MIN_TEMPO * 2 ** (v / 12)))
            elif prefix == "o":
                pos = bar_start + v
            elif prefix == "i":
                inst = v
        if pending:
            report.skip("note without velocity", pending)
        return _build_score(notes, tempos, sigs), report

    def _as_texts(self, tokens, report: DecodeReport) -> list[str]:
        if isinstance(tokens, np.ndarray) or (len(tokens) and not isinstance(tokens[0], str)):
            ids = np.asarray(tokens).astype(np.int64, copy=False).ravel()
            inside = (ids >= 0) & (ids < len(self.vocab))
            if not inside.all():
                report.skip("id outside the vocabulary", int((~inside).sum()))
            return [self.vocab.symbols[i] for i in ids[inside].tolist()]
        return [str(t) for t in tokens]

    # -- persistence ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The configuration, stamped with the package and symusic versions."""
        return {
            "config": self.config.to_dict(),
            "museformer_version": __version__,
            "symusic_version": getattr(symusic, "__version__", "unknown"),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Tokenizer:
        """Inverse of ``to_dict`` (version stamps are informative only)."""
        unknown = set(d) - {"config", "museformer_version", "symusic_version"}
        if unknown or "config" not in d:
            raise ValueError(f"not a tokenizer dict (keys {sorted(d)})")
        return cls(TokenizerConfig.from_dict(d["config"]))

    def save(self, path: str | Path) -> None:
        """Write ``tokenizer.json`` (atomically)."""
        write_text_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Read a file written by ``save``; ``MuseformerError`` naming it when it is not one."""
        try:
            return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError) as e:
            raise MuseformerError(f"cannot load tokenizer from {path}: {e}") from None


# ---------------------------------------------------------------------------------------------
# Encoding helpers (all vectorised over notes; loops only over bars or tracks)
# ---------------------------------------------------------------------------------------------
def _to_pos(ticks: np.ndarray, tpq: int) -> np.ndarray:
    # same float expression as the official round(t * 12 / tpq); np.rint rounds half to even too
    return np.rint(ticks.astype(np.int64) * POSITIONS_PER_QUARTER / tpq).astype(np.int64)


def _score_notes(score: symusic.Score) -> midi_programs.RawNotes:
    """All notes of all tracks as flat arrays; ``group`` is the track index."""
    cols: list[list[np.ndarray]] = [[], [], [], [], [], [], []]
    for index, track in enumerate(score.tracks):
        n = len(track.notes)
        if n == 0:
            continue
        a = track.notes.numpy()
        start = a["time"].astype(np.int64)
        cols[0].append(start)
        cols[1].append(start + a["duration"].astype(np.int64))
        cols[2].append(a["pitch"].astype(np.int64))
        cols[3].append(a["velocity"].astype(np.int64))
        cols[4].append(np.full(n, int(track.program), dtype=np.int64))
        cols[5].append(np.full(n, bool(track.is_drum)))
        cols[6].append(np.full(n, index, dtype=np.int64))
    if not cols[0]:
        empty = np.zeros(0, dtype=np.int64)
        return midi_programs.RawNotes(empty, empty, empty, empty, empty, empty.astype(bool), empty)
    return midi_programs.RawNotes(*(np.concatenate(c) for c in cols))


def _instruments(program: np.ndarray, is_drum: np.ndarray, six_tracks: bool, keep_program_32: bool = True) -> np.ndarray:
    """Instrument id of every note: the program, 128 for drums, mapped to 6tracks if asked."""
    insts = np.where(is_drum, DRUMS, program).astype(np.int64)
    if six_tracks:
        table = np.array([six_track_program(p, False) for p in range(128)] + [DRUMS], dtype=np.int64)
        if not keep_program_32:
            table[32] = 43
        insts = table[insts]
    return insts


def _first_track_at_onset(onset: np.ndarray, insts: np.ndarray, tracks: np.ndarray) -> np.ndarray:
    """Per note: the lowest track index among the notes of its (onset, instrument) group."""
    order = np.lexsort((tracks, insts, onset))
    o, i = onset[order], insts[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = (o[1:] != o[:-1]) | (i[1:] != i[:-1])
    group = np.cumsum(first) - 1
    out = np.empty(len(order), dtype=np.int64)
    out[order] = tracks[order][first][group]
    return out


def _time_signature_values(changes) -> tuple[np.ndarray, np.ndarray]:
    """Time-signature ids of symusic time signatures; unusable ones (not in the table) dropped."""
    a = changes.numpy()
    keep, ids = [], []
    for k, (n, d) in enumerate(zip(a["numerator"].tolist(), a["denominator"].tolist())):
        ts = _reduce_time_signature(n, d) if n > 0 and d > 0 else None
        if ts in TIME_SIGNATURE_IDS:
            keep.append(k)
            ids.append(TIME_SIGNATURE_IDS[ts])
    return a["time"][keep].astype(np.int64), np.array(ids, dtype=np.int64)


def _tempo_values(changes) -> tuple[np.ndarray, np.ndarray]:
    a = changes.numpy()
    # miditoolkit reads BPM as 60e6 / microseconds-per-quarter: the same float here
    bpm = 60_000_000.0 / a["mspq"].astype(np.float64)
    return a["time"].astype(np.int64), _tempo_bin(bpm)


def _changes_in_song(changes, tpq: int, n_pos: int, values) -> tuple[np.ndarray, np.ndarray]:
    """(position, value id) of meta changes inside the song, sorted, the last one per position."""
    if len(changes) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    times, ids = values(changes)
    pos = _to_pos(times, tpq)
    inside = pos < n_pos
    pos, ids = pos[inside], ids[inside]
    order = np.argsort(pos, kind="stable")  # stable: file order decides among equal positions
    pos, ids = pos[order], ids[order]
    last = np.ones(len(pos), dtype=bool)
    last[:-1] = pos[1:] != pos[:-1]
    return pos[last], ids[last]


def _reduce_time_signature(n: int, d: int) -> tuple[int, int]:
    while d > MAX_TS_DENOMINATOR and d % 2 == 0 and n % 2 == 0:
        d //= 2
        n //= 2
    while n > MAX_WHOLE_NOTES_PER_BAR * d:  # bars longer than two whole notes: divide n
        n //= next(i for i in range(2, n + 1) if n % i == 0)
    return n, d


def _bar_starts(ts_pos: np.ndarray, ts_val: np.ndarray, n_pos: int) -> tuple[np.ndarray, np.ndarray]:
    """Start position and time-signature id of every bar covering positions 0 .. n_pos - 1.

    A time-signature change takes effect at the first bar start at or after it. One Python step
    per run of equal bars (not per bar or note).
    """
    starts, sigs = [], []
    start, k = 0, 0
    while start < n_pos:
        while k + 1 < len(ts_pos) and ts_pos[k + 1] <= start:
            k += 1
        length = _bar_length(TIME_SIGNATURES[int(ts_val[k])])
        # bars of this length until the next change (or the end of the song)
        stop = ts_pos[k + 1] if k + 1 < len(ts_pos) else n_pos
        count = max(1, -(-(int(stop) - start) // length))
        starts.append(start + length * np.arange(count, dtype=np.int64))
        sigs.append(np.full(count, ts_val[k], dtype=np.int64))
        start += length * count
    return np.concatenate(starts), np.concatenate(sigs)


def _pitch_shift(pitches: np.ndarray) -> int:
    """Transposition to C major / A minor of the non-drum pitches (see the module docstring)."""
    if len(pitches) == 0:
        return 0
    lo, hi = int(pitches.min()), int(pitches.max())
    # the official histogram: density, then renormalised; same float operations for equal ties
    hist, _ = np.histogram(pitches % 12, bins=np.arange(13), weights=np.ones(len(pitches)), density=True)
    total = hist.sum()
    hist /= total + (total == 0)
    scores = np.dot(_KEY_TEMPLATES, hist)
    best = np.flatnonzero(scores == scores.max())
    major, minor = int(best[0]), int(best[1])  # a major key always ties with its relative minor
    key = minor if hist[major] < hist[minor % 12] else major
    shift = -key if key <= 11 else 21 - key
    while shift + lo < 0:
        shift += 12
    while shift + hi >= 128:
        shift -= 12
    return shift if shift + lo >= 0 else 0


def _key_templates() -> np.ndarray:
    """24 x 12 scale templates (+1 in scale, -1 out): 12 major tonics, then 12 natural minor."""
    major, minor = (0, 2, 4, 5, 7, 9, 11), (0, 2, 3, 5, 7, 8, 10)
    pcs = np.arange(12)
    rows = [np.where(np.isin((pcs - t) % 12, scale), 1.0, -1.0) for scale in (major, minor) for t in range(12)]
    return np.stack(rows)


_KEY_TEMPLATES = _key_templates()


def _layout(cfg, first_bar, n_bars, bar_starts, bar_ts, tempo_pos, tempo_val,
            onset, note_bar, local, insts, pitch_id, dur_id, vel_id) -> np.ndarray:  # fmt: skip
    """Place every token of the song in one preallocated array of flat-table codes.

    Per bar: header (``s`` unless ignore_ts; REMIGEN2 also ``t``), then per onset ``o`` (REMIGEN
    also ``t``), per instrument group ``i``, per note ``p d v``; the bar ends with ``b-1``.
    """
    remigen2 = cfg.encoding == "remigen2"
    header = (0 if cfg.ignore_ts else 1) + (1 if remigen2 else 0)
    per_onset = 1 if remigen2 else 2
    new_onset = np.ones(len(onset), dtype=bool)
    new_onset[1:] = onset[1:] != onset[:-1]
    new_group = new_onset.copy()
    new_group[1:] |= insts[1:] != insts[:-1]

    bars = np.arange(first_bar, n_bars)
    note_bar = note_bar - first_bar  # no note lies before first_bar: it is the first note's bar
    pre = new_onset * per_onset + new_group  # tokens before the note's p d v
    length = pre + 3
    note_start = np.cumsum(length) - length + (note_bar + 1) * header + note_bar  # bar headers/ends
    notes_before_bar = np.searchsorted(note_bar, np.arange(len(bars)), side="left")
    cum = np.concatenate([[0], np.cumsum(length)])
    bar_start_tok = cum[notes_before_bar] + np.arange(len(bars)) * (header + 1)
    total = int(cum[-1]) + len(bars) * (header + 1)
    out = np.empty(total, dtype=np.int64)

    # bar headers and ends
    if not cfg.ignore_ts:
        out[bar_start_tok] = _BASE["s"] + bar_ts[bars]
    if remigen2:
        tempo_at_bar = tempo_val[np.searchsorted(tempo_pos, bar_starts[bars], side="right") - 1]
        out[bar_start_tok + header - 1] = _BASE["t"] + tempo_at_bar
    bar_end_tok = np.concatenate([bar_start_tok[1:], [total]]) - 1
    out[bar_end_tok] = _BASE["b"] + 1

    # onset, tempo, instrument, note tokens
    s = note_start[new_onset]
    out[s] = _BASE["o"] + local[new_onset]
    if not remigen2:
        tempo_at_onset = tempo_val[np.searchsorted(tempo_pos, onset[new_onset], side="right") - 1]
        out[s + 1] = _BASE["t"] + tempo_at_onset
    out[(note_start + pre - 1)[new_group]] = _BASE["i"] + insts[new_group]
    p = note_start + pre
    out[p] = _BASE["p"] + pitch_id
    out[p + 1] = _BASE["d"] + dur_id
    out[p + 2] = _BASE["v"] + vel_id
    return out


# ---------------------------------------------------------------------------------------------
# Decoding helper
# ---------------------------------------------------------------------------------------------
def _build_score(notes, tempos, sigs) -> symusic.Score:
    score = symusic.Score(DECODE_TICKS_PER_QUARTER)
    for time, bpm in tempos or [(0, DEFAULT_TEMPO)]:
        score.tempos.append(symusic.Tempo(time, bpm))
    for time, (n, d) in sigs or [(0, DEFAULT_TIME_SIGNATURE)]:
        score.time_signatures.append(symusic.TimeSignature(time, n, d))
    for inst in sorted(notes):
        a = np.array(notes[inst], dtype=np.int64)  # (N, 4): time, duration, pitch, velocity
        # MIDI readers close the oldest open note of a pitch first, and a writer emits note-ons of
        # one tick in list order: notes that start together must come shortest first, or a
        # reader swaps their durations (and so their velocities)
        a = a[np.lexsort((a[:, 1], a[:, 0]))]
        for layer in _fifo_layers(a):
            track = symusic.Track(str(inst), 0 if inst == DRUMS else inst, inst == DRUMS)
            track.notes = symusic.Note.from_numpy(
                layer[:, 0].astype(np.int32), layer[:, 1].astype(np.int32),
                layer[:, 2].astype(np.int8), layer[:, 3].astype(np.int8),
            )  # fmt: skip
            score.tracks.append(track)
    return score


def _fifo_layers(a: np.ndarray) -> list[np.ndarray]:
    """Split one instrument's notes (sorted by onset, then duration) into tracks a reader recovers.

    A note of a pitch that starts while an earlier one of that pitch sounds and ends before it
    (nested, e.g. two voices of one instrument in unison) would be paired first-in first-out with
    the wrong note-off. Each such note goes to the first extra track of the same instrument where
    the notes of its pitch end in onset order; the encoder merges the tracks of an instrument again.
    Most songs need one track.
    """
    ends = a[:, 0] + a[:, 1]
    layer_of = np.zeros(len(a), dtype=np.int64)
    last_end: list[dict[int, int]] = [{}]  # per layer: pitch -> end of its latest note
    for k, (pitch, end) in enumerate(zip(a[:, 2].tolist(), ends.tolist())):
        layer = 0
        while last_end[layer].get(pitch, end) > end:
            layer += 1
            if layer == len(last_end):
                last_end.append({})
        last_end[layer][pitch] = end
        layer_of[k] = layer
    return [a[layer_of == i] for i in range(len(last_end))]


# ---------------------------------------------------------------------------------------------
# Token text files
# ---------------------------------------------------------------------------------------------
def read_token_lines(path: str | Path) -> list[list[str]]:
    """Read an official token dump: one song per line, tokens separated by spaces."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MuseformerError(f"cannot read token file {path}: {e}") from None
    return [line.split() for line in text.splitlines() if line.strip()]


def write_token_lines(path: str | Path, songs: Sequence[Sequence[str]]) -> None:
    """Write songs in the official dump format (atomically)."""
    write_text_atomic(path, "".join(" ".join(song) + "\n" for song in songs))


def write_midi(score: symusic.Score, path: str | Path) -> None:
    """Write a score as a MIDI file atomically, every byte checked (``files.write_midi_atomic``);
    one error naming the file on failure (a full disk included)."""
    write_midi_atomic(score, path)

