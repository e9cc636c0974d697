"""Which program a note belongs to, by the official encoder's MIDI reading rule.

The official encoder (btyu/MidiProcessor) reads MIDI with miditoolkit 1.0.1. Its parser keeps the
current program of each channel per track (0 until a program change), pairs a note-off with the
oldest open note of that channel and pitch (first in, first out), and files the closed note under
the program in force *at the note-off*, in an instrument keyed by (program, channel, track);
instruments are numbered in the order they are first needed. symusic, which this package reads
MIDI with, files a note under the program in force *at its note-on*. The two agree unless a
program change falls between a note's on and its off (including a change at the same tick, after
the note-on or before the note-off in file order).

This module owns that difference and nothing else: ``may_differ`` is a cheap byte scan that says
when a file cannot have such a program change (then symusic's notes are used as they are), and
``read_notes`` walks the note and program-change events of a file that may, to give every note the
official program. symusic exposes no program-change events, hence this small event walker; it
skips every other event (meta, sysex, controllers) by its length, as mido does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DRUM_CHANNEL = 9  # MIDI channel 10
# data bytes of the channel messages by status high nibble (mido's message lengths minus 1)
_DATA_BYTES = {0x80: 2, 0x90: 2, 0xA0: 2, 0xB0: 2, 0xC0: 1, 0xD0: 1, 0xE0: 2}
# system common / real-time messages mido accepts inside a track, and their data bytes
_SYSTEM_DATA_BYTES = {0xF1: 1, 0xF2: 2, 0xF3: 1, 0xF6: 0, 0xF8: 0, 0xFA: 0, 0xFB: 0, 0xFC: 0, 0xFE: 0}


@dataclass(frozen=True)
class RawNotes:
    """Notes read by the official rule, as flat int64 arrays of equal length.

    ``group`` numbers the (program, channel, track) instruments in the order miditoolkit creates
    them (the order of ``MidiFile.instruments``).
    """

    start: np.ndarray
    end: np.ndarray
    pitch: np.ndarray
    velocity: np.ndarray
    program: np.ndarray
    is_drum: np.ndarray  # bool
    group: np.ndarray


def _track_chunks(data: bytes) -> list[tuple[int, int]]:
    """(start, end) byte offsets of the MTrk chunks the header announces; ValueError if malformed."""
    if data[:4] != b"MThd" or len(data) < 14:
        raise ValueError("no MThd header")
    header_size = int.from_bytes(data[4:8], "big")
    n_tracks = int.from_bytes(data[10:12], "big")
    pos = 8 + header_size
    chunks = []
    for _ in range(n_tracks):
        if data[pos : pos + 4] != b"MTrk":
            raise ValueError("no MTrk header at start of track")
        size = int.from_bytes(data[pos + 4 : pos + 8], "big")
        chunks.append((pos + 8, min(pos + 8 + size, len(data))))
        pos += 8 + size
    return chunks


def may_differ(data: bytes) -> bool:
    """Whether some track of this MIDI file may change a channel's program after a note-on on it.

    Conservative: every byte 0xCn after the first byte 0x9n of a track counts as a program change
    of channel n following a note-on (the byte can also be a delta-time or text byte). A real
    first note-on of a channel carries its status byte, and a program change before it applies to
    the on and the off of that channel's notes alike, so a ``False`` answer means symusic's
    programs are the official ones. An unparsable header answers ``False`` (symusic then decides
    whether the file is readable).
    """
    try:
        chunks = _track_chunks(data)
    except ValueError:
        return False
    if not chunks:
        return False
    b = np.frombuffer(data, dtype=np.uint8, count=chunks[-1][1])[chunks[0][0] :]
    starts = np.zeros(len(b), dtype=np.int64)
    starts[[s - chunks[0][0] for s, _ in chunks[1:]]] = 1
    # key of a byte: track * 16 + the channel it would address (chunk headers count for the track
    # before them, which can only add candidates)
    key = np.cumsum(starts) * 16 + (b & 0x0F)
    kind = b >> 4
    on = np.flatnonzero(kind == 0x9)
    if len(on) == 0:
        return False
    first_on = np.full(16 * len(chunks), len(b))
    np.minimum.at(first_on, key[on], on)  # first 0x9n byte of each track and channel
    change = np.flatnonzero(kind == 0xC)
    return bool((change > first_on[key[change]]).any())


def read_notes(data: bytes) -> RawNotes | None:
    """Every note of a MIDI file with its program by the official rule; None if mido would fail.

    One Python step per event; used only for files where ``may_differ`` is True.
    """
    try:
        chunks = _track_chunks(data)
        rows: list[tuple[int, int, int, int, int]] = []  # start, end, pitch, velocity, group
        groups: dict[tuple[int, int, int], int] = {}  # (program, channel, track) -> creation index
        for track, (p, end) in enumerate(chunks):
            tick, status = 0, -1
            program = [0] * 16
            group = [-1] * 16  # the current instrument of each channel, looked up lazily
            open_notes: dict[int, list[tuple[int, int]]] = {}  # channel * 128 + pitch -> FIFO
            while p < end:
                b = data[p]
                p += 1
                delta = b & 0x7F
                while b & 0x80:
                    b = data[p]
                    p += 1
                    delta = (delta << 7) | (b & 0x7F)
                tick += delta
                st = data[p]
                if st & 0x80:
                    p += 1
                    if st != 0xFF:  # meta events keep the running status (mido)
                        status = st
                elif status < 0:
                    return None  # running status without a status
                else:
                    st = status
                kind = st & 0xF0
                if kind == 0x90 or kind == 0x80:
                    pitch, velocity = data[p], data[p + 1]
                    p += 2
                    if (pitch | velocity) & 0x80:
                        return None
                    key = (st & 0x0F) * 128 + pitch
                    if kind == 0x90 and velocity:
                        fifo = open_notes.get(key)
                        if fifo is None:
                            open_notes[key] = [(tick, velocity)]
                        else:
                            fifo.append((tick, velocity))
                        continue
                    fifo = open_notes.get(key)  # note-off, or note-on with velocity 0
                    if fifo is None:
                        continue  # a note-off without an open note is ignored
                    start, velocity = fifo.pop(0)
                    if not fifo:
                        del open_notes[key]
                    channel = st & 0x0F
                    g = group[channel]
                    if g < 0:
                        g = group[channel] = groups.setdefault((program[channel], channel, track), len(groups))
                    rows.append((start, tick, pitch, velocity, g))
                elif kind == 0xC0:
                    if data[p] & 0x80:
                        return None
                    program[st & 0x0F] = data[p]
                    group[st & 0x0F] = -1
                    p += 1
                elif kind < 0xF0:  # other channel messages: skip their data bytes
                    p += _DATA_BYTES[kind]
                elif st == 0xFF or st == 0xF0 or st == 0xF7:  # meta (type byte first) or sysex
                    if st == 0xFF:
                        p += 1
                    b = data[p]
                    p += 1
                    length = b & 0x7F
                    while b & 0x80:
                        b = data[p]
                        p += 1
                        length = (length << 7) | (b & 0x7F)
                    p += length
                elif st in _SYSTEM_DATA_BYTES:
                    p += _SYSTEM_DATA_BYTES[st]
                else:
                    return None  # undefined status byte (mido raises)
    except (IndexError, ValueError):
        return None
    keys = list(groups)  # creation order
    a = np.array(rows, dtype=np.int64).reshape(-1, 5)  # (N, 5)
    group = a[:, 4]
    program = np.array([k[0] for k in keys], dtype=np.int64)[group] if keys else group.copy()
    is_drum = np.array([k[1] == DRUM_CHANNEL for k in keys], dtype=bool)[group] if keys else group.astype(bool)
    return RawNotes(a[:, 0], a[:, 1], a[:, 2], a[:, 3], program, is_drum, group)
