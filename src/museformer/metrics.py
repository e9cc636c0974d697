"""Objective metrics of music as token sequences: bar similarity, Similarity Error and friends.

This module owns the *definitions* of the structure metrics. Every function here is pure: it takes
token texts, token ids (with their ``Vocab``) or the note arrays derived from them, and returns
numbers. It reads no files and knows nothing about models (perplexity lives with training);
``museformer.analysis`` walks folders and corpora and writes reports on top of it.

Reading a song (REMIGEN2 or REMIGEN tokens):

- a **bar** is the run of tokens up to and including its ``b-1``; tokens after the last ``b-1``
  form an incomplete bar, which is dropped (a truncated or unfinished generation has no last bar);
- a **note** is a ``p-*`` token directly followed by a ``d-*`` token; its onset is the value of the
  last ``o-*`` inside the same bar and its instrument that of the last ``i-*`` (a pitch without a
  following duration, or before any onset of its bar, is not a note); velocities are ignored;
- pitches ``>= 128`` are drum notes (the vocabularies store drums as 128 + drum pitch).

Bar similarity (Museformer, section 3.1 and its rebuttal page): two bars' similarity is the Jaccard
index ``|A ∩ B| / |A ∪ B|`` of their note *sets*, a note being ``(onset in the bar, pitch,
duration)`` (instrument and velocity do not count; a note repeated in two instruments counts once).
**Pairs of two empty bars are skipped** (0/0 is undefined: scoring them 1 would make songs with
long rests look repetitive, scoring them 0 would make them look random); a pair of one empty and
one non-empty bar has similarity 0 and counts.

Similarity curve: per song, ``L_song(k)`` = mean similarity of all (non-skipped) bar pairs
``(i, i + k)``; per corpus, ``L(k)`` = mean of ``L_song(k)`` over the songs that have at least one
such pair (every song weighs the same, as in the paper's statistic).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from museformer.vocab import TokenKind, Vocab, parse_token

DRUM_PITCH_OFFSET = 128  # p-128.. are drum notes in both vocabularies
POSITIONS_PER_BAR = 48  # a 4/4 bar at 12 positions per quarter note
DEFAULT_MAX_INTERVAL = 64


# =============================================================================================
# Songs as note arrays
# =============================================================================================
@dataclass(frozen=True, eq=False)
class SongNotes:
    """The notes of one song, one entry per note, in token order.

    Attributes:
        num_bars: number of complete bars (closed by ``b-1``), empty bars included.
        bar: 0-based bar of each note, int64 ``(N,)``.
        onset: onset position inside the bar (12 per quarter note), int64 ``(N,)``.
        instrument: MIDI program (128 = drums; -1 when no ``i-*`` came before), int64 ``(N,)``.
        pitch: 0..127, or 128 + drum pitch for drums, int64 ``(N,)``.
        duration: the duration token's value (a bin index, not ticks), int64 ``(N,)``.
    """

    num_bars: int
    bar: np.ndarray
    onset: np.ndarray
    instrument: np.ndarray
    pitch: np.ndarray
    duration: np.ndarray

    def __len__(self) -> int:
        return len(self.pitch)

    @property
    def is_drum(self) -> np.ndarray:
        """Bool ``(N,)``: drum notes (pitch >= 128)."""
        return self.pitch >= DRUM_PITCH_OFFSET


def notes_from_kinds(kinds: np.ndarray, values: np.ndarray) -> SongNotes:
    """The notes of a song given each token's ``TokenKind`` and value (``p-60`` -> PITCH, 60).

    Vectorised: forward-filling the last onset / instrument by index, no per-token Python loop.

    Shapes: kinds, values ``(T,)`` -> ``SongNotes``.
    """
    kinds = np.asarray(kinds, dtype=np.int64)
    values = np.asarray(values, dtype=np.int64)
    n = len(kinds)
    positions = np.arange(n)
    is_bar_end = kinds == TokenKind.BAR
    num_bars = int(is_bar_end.sum())
    # 0-based bar of every token: b-1 belongs to the bar it closes
    bar = np.cumsum(is_bar_end) - is_bar_end
    # first position of each token's bar
    bar_start = np.maximum.accumulate(np.where(is_bar_end, positions + 1, 0))
    bar_start = np.concatenate([[0], bar_start[:-1]]) if n else bar_start

    def last_of(kind: TokenKind) -> np.ndarray:  # index of the latest token of `kind` at or before each position
        return np.maximum.accumulate(np.where(kinds == kind, positions, -1)) if n else positions

    last_onset, last_instrument = last_of(TokenKind.ONSET), last_of(TokenKind.INSTRUMENT)
    next_is_duration = np.zeros(n, dtype=bool)
    next_is_duration[:-1] = kinds[1:] == TokenKind.DURATION
    is_note = (
        (kinds == TokenKind.PITCH)
        & next_is_duration
        & (last_onset >= bar_start)  # an onset of this bar came before the pitch
        & (bar < num_bars)  # inside a complete bar
    )
    idx = np.flatnonzero(is_note)
    instrument = np.where(last_instrument[idx] >= 0, values[np.maximum(last_instrument[idx], 0)], -1)
    return SongNotes(
        num_bars=num_bars,
        bar=bar[idx].astype(np.int64),
        onset=values[last_onset[idx]],
        instrument=instrument.astype(np.int64),
        pitch=values[idx],
        duration=values[idx + 1],
    )


def notes_from_ids(ids: Sequence[int] | np.ndarray, vocab: Vocab) -> SongNotes:
    """The notes of a song given as token ids of ``vocab`` (specials such as BOS/EOS/PAD are ignored)."""
    ids = np.asarray(ids, dtype=np.int64)
    inside = (ids >= 0) & (ids < len(vocab))
    safe = np.where(inside, ids, 0)
    kinds = np.where(inside, vocab.kinds[safe], TokenKind.OTHER)
    values = np.where(inside, vocab.values[safe], -1)
    return notes_from_kinds(kinds, values)


def notes_from_tokens(tokens: Sequence[str] | str) -> SongNotes:
    """The notes of a song given as token texts (a list, or one space-separated line)."""
    if isinstance(tokens, str):
        tokens = tokens.split()
    if len(tokens) == 0:
        return notes_from_kinds(np.zeros(0, np.int64), np.zeros(0, np.int64))
    unique, inverse = np.unique(np.asarray(tokens, dtype=object).astype(str), return_inverse=True)
    parsed = [parse_token(t) for t in unique]  # parse each distinct token once
    kinds = np.array([k for k, _ in parsed], dtype=np.int64)[inverse]
    values = np.array([v for _, v in parsed], dtype=np.int64)[inverse]
    return notes_from_kinds(kinds, values)


# =============================================================================================
# Bar similarity
# =============================================================================================
def note_codes(song: SongNotes) -> np.ndarray:
    """One integer per note for the identity ``(onset, pitch, duration)``; int64 ``(N,)``.

    The fields are packed into disjoint bit ranges (20 bits each), so equal codes mean equal notes.
    """
    return (song.onset << 40) | (song.pitch << 20) | song.duration


def bar_incidence(song: SongNotes) -> np.ndarray:
    """The bar x distinct-note incidence matrix: ``M[b, c] = 1`` when bar b holds note c.

    Shapes: -> int32 ``(num_bars, distinct notes)`` (a note repeated in a bar counts once).
    """
    codes = note_codes(song)
    distinct, column = np.unique(codes, return_inverse=True)
    matrix = np.zeros((song.num_bars, len(distinct)), dtype=np.int32)
    matrix[song.bar, column.reshape(-1)] = 1
    return matrix


def self_similarity(song: SongNotes) -> np.ndarray:
    """The song's bar x bar Jaccard similarity matrix; NaN where both bars are empty.

    Intersections are one matrix product of the incidence matrix with itself, restricted to the
    notes that occur in two bars or more (the others only add to the bars' sizes). The product is
    an integer one: exact, and it never starts BLAS threads, which oversubscribe the cores when
    ``analyze`` runs one worker process per core.

    Shapes: -> float64 ``(num_bars, num_bars)``, symmetric, 1 on the diagonal of non-empty bars.
    """
    m = bar_incidence(song)
    size = m.sum(axis=1)  # (bars,) |A|
    shared = m[:, m.sum(axis=0) >= 2]  # (bars, notes in >= 2 bars)
    common = shared @ shared.T  # (bars, bars) |A ∩ B| off the diagonal
    np.fill_diagonal(common, size)
    union = size[:, None] + size[None, :] - common
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, common / np.where(union > 0, union, 1.0), np.nan)


def bar_similarity(a: Iterable[tuple[int, int, int]], b: Iterable[tuple[int, int, int]]) -> float:
    """Jaccard similarity of two bars given as collections of ``(onset, pitch, duration)`` notes.

    Returns NaN for two empty bars (such pairs are skipped by the statistics).
    """
    a, b = set(a), set(b)
    union = len(a | b)
    return len(a & b) / union if union else math.nan


@dataclass(frozen=True, eq=False)
class IntervalStats:
    """Bar-similarity statistics per interval k = 1..K (index k - 1).

    For one song: ``total[k-1]`` = sum of the similarities of its counted pairs at interval k,
    ``pairs[k-1]`` = how many pairs were counted. For a corpus (``combine``): ``song_total`` sums
    each song's mean, ``songs`` counts the songs with at least one pair; ``total``/``pairs`` sum over
    all pairs of all songs.
    """

    total: np.ndarray  # float64 (K,)
    pairs: np.ndarray  # int64 (K,)
    song_total: np.ndarray  # float64 (K,)
    songs: np.ndarray  # int64 (K,)

    @property
    def max_interval(self) -> int:
        """K."""
        return len(self.pairs)

    @property
    def curve(self) -> np.ndarray:
        """``L(k)``: mean over songs of each song's mean pair similarity; NaN where no song has a pair."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.songs > 0, self.song_total / np.maximum(self.songs, 1), np.nan)

    @property
    def pair_curve(self) -> np.ndarray:
        """Mean over all pairs of all songs (long songs weigh more); NaN where there is no pair."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.pairs > 0, self.total / np.maximum(self.pairs, 1), np.nan)


def interval_stats(similarity: np.ndarray, max_interval: int = DEFAULT_MAX_INTERVAL) -> IntervalStats:
    """Per-interval statistics of one song's self-similarity matrix (NaN entries are skipped)."""
    if max_interval < 1:
        raise ValueError(f"max_interval must be at least 1, got {max_interval}")
    total = np.zeros(max_interval)
    pairs = np.zeros(max_interval, dtype=np.int64)
    for k in range(1, min(max_interval, len(similarity) - 1) + 1):  # one diagonal per interval
        diagonal = np.diagonal(similarity, offset=k)
        counted = ~np.isnan(diagonal)
        total[k - 1] = diagonal[counted].sum()
        pairs[k - 1] = counted.sum()
    songs = (pairs > 0).astype(np.int64)
    song_total = np.where(pairs > 0, total / np.maximum(pairs, 1), 0.0)
    return IntervalStats(total, pairs, song_total, songs)


def song_interval_stats(song: SongNotes, max_interval: int = DEFAULT_MAX_INTERVAL) -> IntervalStats:
    """``interval_stats(self_similarity(song))``."""
    return interval_stats(self_similarity(song), max_interval)


def combine(stats: Iterable[IntervalStats], max_interval: int = DEFAULT_MAX_INTERVAL) -> IntervalStats:
    """Sum per-song (or per-chunk) statistics into corpus statistics (all with the same K)."""
    total = np.zeros(max_interval)
    pairs = np.zeros(max_interval, dtype=np.int64)
    song_total = np.zeros(max_interval)
    songs = np.zeros(max_interval, dtype=np.int64)
    for s in stats:
        if s.max_interval != max_interval:
            raise ValueError(f"cannot combine statistics over {s.max_interval} and {max_interval} intervals")
        total += s.total
        pairs += s.pairs
        song_total += s.song_total
        songs += s.songs
    return IntervalStats(total, pairs, song_total, songs)


def similarity_curve(songs: Iterable[SongNotes], max_interval: int = DEFAULT_MAX_INTERVAL) -> np.ndarray:
    """``L(k)`` for k = 1..max_interval of a set of songs (index k - 1; NaN where undefined)."""
    return combine((song_interval_stats(s, max_interval) for s in songs), max_interval).curve


def similarity_error(generated: np.ndarray, reference: np.ndarray, intervals: int | None = None) -> float:
    """Similarity Error: ``SE = (1/N) * sum_{k=1..N} |L_gen(k) - L_ref(k)|``.

    ``L`` are the per-interval curves (``IntervalStats.curve`` / ``similarity_curve``) of the
    generated and the reference songs; N = ``intervals`` (default: the curves' common length, 64 with
    the defaults). Intervals where either curve is undefined (no bar pair that far apart) are left
    out and N counts only the others. Returns NaN when no interval is defined in both.
    """
    generated, reference = np.asarray(generated, float), np.asarray(reference, float)
    n = min(len(generated), len(reference)) if intervals is None else intervals
    if n < 1 or n > min(len(generated), len(reference)):
        raise ValueError(f"SE over {n} intervals needs curves at least that long "
                         f"(got {len(generated)} and {len(reference)})")
    diff = np.abs(generated[:n] - reference[:n])
    defined = ~np.isnan(diff)
    return float(diff[defined].mean()) if defined.any() else math.nan


def top_intervals(curve: np.ndarray, count: int = 10) -> list[int]:
    """The ``count`` intervals with the highest similarity, best first (undefined ones left out)."""
    curve = np.asarray(curve, float)
    defined = np.flatnonzero(~np.isnan(curve))
    order = defined[np.argsort(-curve[defined], kind="stable")]
    return [int(i) + 1 for i in order[:count]]


def suggest_fine_offsets(curve: np.ndarray, count: int = 8) -> tuple[int, ...]:
    """Fine-attention bar offsets suggested by the peaks of a similarity curve.

    Rule: interval 1 (the previous bar) always; plus every interval k >= 2 that is a local peak,
    i.e. more similar than both neighbours k - 1 and k + 1 (only k - 1 for the last interval);
    of these the ``count`` most similar are kept, returned in increasing order.
    """
    curve = np.asarray(curve, float)
    filled = np.where(np.isnan(curve), -np.inf, curve)
    candidates = [1] if len(curve) and not np.isnan(curve[0]) else []
    for k in range(2, len(curve) + 1):
        here = filled[k - 1]
        right = filled[k] if k < len(curve) else -np.inf
        if np.isfinite(here) and here > filled[k - 2] and here > right:
            candidates.append(k)
    ranked = sorted(candidates, key=lambda k: (-filled[k - 1], k))[:count]
    if candidates and 1 not in ranked:
        ranked = [1] + ranked[: count - 1]
    return tuple(sorted(ranked))


# =============================================================================================
# Other per-song metrics
# =============================================================================================
def pitch_class_entropy(song: SongNotes) -> float:
    """Shannon entropy (bits) of the pitch-class histogram of the song's non-drum notes.

    ``H = -sum_c p_c log2 p_c`` over the 12 pitch classes, p_c = share of notes with pitch % 12 == c
    (0 for one pitch class, log2(12) ~ 3.585 for a uniform chromatic spread). NaN without pitched notes.
    """
    pitches = song.pitch[~song.is_drum]
    if len(pitches) == 0:
        return math.nan
    p = np.bincount(pitches % 12, minlength=12) / len(pitches)
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum()) + 0.0  # + 0.0 turns -0.0 into 0.0


def pitch_range(song: SongNotes) -> float:
    """Highest minus lowest pitch (semitones) of the non-drum notes; NaN without pitched notes."""
    pitches = song.pitch[~song.is_drum]
    return float(pitches.max() - pitches.min()) if len(pitches) else math.nan


def groove_consistency(song: SongNotes, positions_per_bar: int = POSITIONS_PER_BAR) -> float:
    """Groove consistency (Wu & Yang 2020, as in MusPy): how alike the onset patterns of adjacent bars are.

    Each bar's groove is a binary vector g of Q positions (1 where any note, drums included, starts);
    ``GC = 1 - (1 / (B - 1)) * sum_{i=1..B-1} hamming(g_i, g_{i+1}) / Q`` over the song's B bars
    (empty bars included). Q = ``positions_per_bar`` (48 = a 4/4 bar), enlarged to the largest
    onset + 1 when a bar is longer. NaN for fewer than 2 bars.
    """
    if song.num_bars < 2:
        return math.nan
    q = max(positions_per_bar, int(song.onset.max()) + 1 if len(song) else 0)
    groove = np.zeros((song.num_bars, q), dtype=bool)
    groove[song.bar, song.onset] = True
    hamming = (groove[1:] != groove[:-1]).sum(axis=1)
    return float(1.0 - hamming.mean() / q)


def note_density(song: SongNotes) -> float:
    """Notes per bar (all notes, drums included); NaN for a song without bars."""
    return len(song) / song.num_bars if song.num_bars else math.nan


def empty_bar_ratio(song: SongNotes) -> float:
    """Share of the song's bars that hold no note; NaN for a song without bars."""
    if not song.num_bars:
        return math.nan
    return 1.0 - len(np.unique(song.bar)) / song.num_bars


def validity_rate(skipped_counts: Iterable[int]) -> float:
    """Share of token sequences that decode with zero skipped tokens.

    Args:
        skipped_counts: per sequence, how many tokens the decoder skipped
            (``len(tokenizer.decode_with_report(tokens)[1].skipped)``).

    Returns NaN for no sequences.
    """
    counts = np.asarray(list(skipped_counts), dtype=np.int64)
    return float((counts == 0).mean()) if len(counts) else math.nan


SONG_METRICS = {
    "pitch_class_entropy": pitch_class_entropy,
    "pitch_range": pitch_range,
    "groove_consistency": groove_consistency,
    "note_density": note_density,
    "empty_bar_ratio": empty_bar_ratio,
}


def song_metrics(song: SongNotes) -> dict[str, float]:
    """Every per-song metric of ``SONG_METRICS``, plus ``bars`` and ``notes``."""
    values = {name: fn(song) for name, fn in SONG_METRICS.items()}
    return {"bars": float(song.num_bars), "notes": float(len(song)), **values}


def mean_metrics(per_song: Sequence[dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over songs, ignoring songs where it is undefined (NaN)."""
    names = per_song[0].keys() if per_song else SONG_METRICS.keys()
    means = {}
    for name in names:
        values = np.array([m[name] for m in per_song], dtype=float)
        values = values[~np.isnan(values)]
        means[name] = float(values.mean()) if len(values) else math.nan
    return means
