"""The facts of the REMIGEN / REMIGEN2 token vocabulary, written once.

This module owns the numbers that the official MidiProcessor encoder fixes and that both the
tokenizer (MIDI <-> tokens) and the grammar (which token may follow) rely on: positions per
quarter, the tempo bins and their bounds, the duration bins, the time-signature list and the bar
length of each, the instrument sort orders and the six-track ranks. It imports nothing from the
package, so every other module can import it.
"""

from __future__ import annotations

import math

import numpy as np

ENCODINGS = ("remigen2", "remigen")  # tempo once per bar / tempo at every onset
INSTRUMENT_ORDERS = ("id", "6tracks")  # instrument order inside one onset
DRUMS = 128  # the instrument id of drums (i-128; pitches p-128..p-255)

# -- time ---------------------------------------------------------------------------------------
POSITIONS_PER_QUARTER = 12
BAR_POSITIONS_4_4 = 4 * POSITIONS_PER_QUARTER  # 48: bar length when time signatures are ignored
MAX_TS_DENOMINATOR = 64  # x/1 .. x/64
MAX_WHOLE_NOTES_PER_BAR = 2
# time signature id: (n, 2**e) for e = 0..6, n = 1..2*2**e, in that order (254 values)
TIME_SIGNATURES = tuple((n, 2**e) for e in range(7) for n in range(1, 2 ** (e + 1) + 1))
TIME_SIGNATURE_IDS = {ts: i for i, ts in enumerate(TIME_SIGNATURES)}


def bar_length(ts: tuple[int, int]) -> int:
    """Onset positions in one bar of time signature ``(numerator, denominator)``, at least one.

    At least one position, so bars always advance (the official code asserts on bars such as 1/64).
    """
    return max(ts[0] * 4 * POSITIONS_PER_QUARTER // ts[1], 1)


# -- tempo --------------------------------------------------------------------------------------
MIN_TEMPO, MAX_TEMPO = 16.0, 256.0  # BPM; tempos outside are clipped
N_TEMPO_BINS = round(12 * math.log2(MAX_TEMPO / MIN_TEMPO)) + 1  # 49: t-0 .. t-48


def tempo_bin(bpm):
    """The ``t-k`` value of a tempo (float or array): k = round(12 log2(BPM / 16)), BPM in [16, 256].

    Rounds half to even (numpy's ``rint``, as Python's ``round`` in the official code).
    """
    x = np.clip(np.asarray(bpm, dtype=np.float64), MIN_TEMPO, MAX_TEMPO) / MIN_TEMPO
    k = np.rint(np.log2(x) * 12).astype(np.int64)
    return int(k) if k.ndim == 0 else k


# -- duration -----------------------------------------------------------------------------------
def _duration_tables() -> tuple[np.ndarray, np.ndarray]:
    """Duration bins: 8 groups of 12 bins, bin width 2**group (in positions)."""
    widths = np.repeat(2 ** np.arange(8), POSITIONS_PER_QUARTER)  # (96,)
    starts = np.concatenate([[0], np.cumsum(widths)[:-1]])  # bin start = decoded duration
    encode = np.repeat(np.arange(len(widths)), widths)  # duration -> bin, for durations < sum
    return encode, starts


DURATION_TO_BIN, BIN_TO_DURATION = _duration_tables()
N_DURATION_BINS = len(BIN_TO_DURATION)  # 96: d-0..d-95; the encoder never emits d-96 and above

# -- instruments --------------------------------------------------------------------------------
# "6tracks" rank of the official LMD setting (MidiProcessor inst_sorting, customisation 1): lead,
# drums, bass, guitar, piano, strings. Program 32 is accepted as bass like 43, so the two share a
# rank (the encoder then keeps track order between them).
SIX_TRACK_RANK = {80: 0, DRUMS: 1, 32: 2, 43: 2, 25: 3, 0: 4, 48: 5}
