"""A song as note JSON: what the page's piano roll draws and its in-browser synthesizer plays.

This module owns the translation from a ``symusic.Score`` (ticks, tempo changes, time signatures)
to plain lists the browser needs without any MIDI parsing of its own: every note in ticks *and*
seconds (the tempo map applied here, once, with numpy), and the bar lines (from the time
signatures) in both units. It knows nothing about models or HTTP.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import symusic

DEFAULT_QPM = 120.0  # MIDI's default tempo when a file has none


def seconds_at(ticks: np.ndarray, score: symusic.Score) -> np.ndarray:
    """Seconds of tick positions under the score's tempo map (piecewise constant tempo).

    Shapes: ``ticks (N,)`` -> ``(N,)`` float64.
    """
    ticks = np.asarray(ticks, dtype=np.float64)
    tpq = float(score.ticks_per_quarter)
    changes = sorted((int(t.time), float(t.qpm)) for t in score.tempos)
    if not changes or changes[0][0] > 0:
        changes.insert(0, (0, changes[0][1] if changes else DEFAULT_QPM))
    starts = np.array([t for t, _ in changes], dtype=np.float64)  # (C,)
    per_tick = np.array([60.0 / (q * tpq) for _, q in changes])  # seconds per tick in each segment
    # seconds at each segment start: cumulative length of the segments before it
    offsets = np.concatenate([[0.0], np.cumsum(np.diff(starts) * per_tick[:-1])])  # (C,)
    segment = np.clip(np.searchsorted(starts, ticks, side="right") - 1, 0, None)  # (N,)
    return offsets[segment] + (ticks - starts[segment]) * per_tick[segment]


def bar_starts(score: symusic.Score, min_bars: int = 0) -> list[int]:
    """Tick of every bar start (time signatures applied; 4/4 before the first), covering the song.

    The song's bars are at least ``min_bars`` and reach the last note onset (a note held past the
    song's last bar does not add bars: the roll and the synthesizer cut it there). The list has one
    more entry than bars: it ends at the end of the last bar, so bar ``i`` spans
    ``[starts[i], starts[i + 1])``.
    """
    tpq = score.ticks_per_quarter
    signatures = sorted((int(ts.time), ts.numerator, ts.denominator) for ts in score.time_signatures)
    end = 1 + max((int(t.notes.numpy()["time"].max()) for t in score.tracks if len(t.notes)), default=-1)
    starts = [0]
    k = 0
    numerator, denominator = 4, 4
    while True:
        tick = starts[-1]
        while k < len(signatures) and signatures[k][0] <= tick:
            _, numerator, denominator = signatures[k]
            k += 1
        length = max(int(round(tpq * 4 * numerator / denominator)), 1)
        starts.append(tick + length)
        if starts[-1] >= end and len(starts) - 1 >= min_bars:
            return starts


def score_notes(score: symusic.Score, bars: int = 0) -> dict[str, Any]:
    """Everything the page draws and plays, as JSON-native lists.

    Args:
        score: the song.
        bars: complete bars the song has (the sidecar's count); the bar lines cover at least these.

    Returns:
        ``{"tpq", "duration", "bars": [{"tick", "time"}...], "tracks": [{"program", "drum", "name",
        "notes": [[tick, duration_ticks, pitch, velocity, time, duration_seconds], ...]}]}``; times in
        seconds; tracks without notes are left out.
    """
    score = score.to("tick")
    starts = bar_starts(score, bars)
    bar_seconds = seconds_at(np.array(starts), score)
    tracks = []
    last = starts[-1]
    for track in score.tracks:
        if not len(track.notes):
            continue
        notes = track.notes.numpy()
        onset = notes["time"].astype(np.int64)
        length = np.clip(notes["duration"].astype(np.int64), 1, np.maximum(last - onset, 1))
        begin = seconds_at(onset, score)
        finish = seconds_at(onset + length, score)
        rows = np.stack([onset, length, notes["pitch"], notes["velocity"]], 1).tolist()  # (N, 4) ints
        tracks.append({
            "program": int(track.program),
            "drum": bool(track.is_drum),
            "name": str(track.name),
            "notes": [r + [round(float(b), 4), round(float(f - b), 4)] for r, b, f in zip(rows, begin, finish)],
        })
    return {
        "tpq": int(score.ticks_per_quarter),
        "duration": round(float(bar_seconds[-1]), 4),
        "bars": [{"tick": int(t), "time": round(float(s), 4)} for t, s in zip(starts, bar_seconds)],
        "tracks": tracks,
    }
