"""The folk corpus: ABC tunes that ship inside ``music21``, played out as a performer plays them.

This module owns turning one ABC tune (from O'Neill's 1850, Ryan's Mammoth Collection, Aird's Airs,
the Nottingham sample and two miscellaneous folk books: ``FOLK_COLLECTIONS``; or from the Essen
folksong collection, ``ESSEN_COLLECTIONS``, a corpus of its own because it has no repeat signs to
play out) into a MIDI file. ``museformer.corpora`` lists the tunes and runs the export; this module knows nothing
about tokens.

An ABC *book* holds many tunes (each starts with an ``X:`` line). ``folk_tunes`` splits a book's
text itself, so each tune is parsed on its own (fast, and one tune music21 cannot read does not
lose the book); the book's header lines (before the first ``X:``) are prepended to every tune.

What a tune becomes (``export_tune``):

- Repeats and 1st/2nd endings are expanded as a performer plays them (``play_order``, which gives
  the bar order of music21's ``Stream.expandRepeats`` on ordinary tunes but without copying every
  bar, about twice as fast, and in linear time on tunes such as Aird's "Yanky Doodle" where
  music21's expander runs for minutes): ``|: A :|: B :|`` becomes A A B B, so the strains repeat
  exactly 8 and 16 bars apart.
- Bar lines fall where the score has them: the opening pickup (anacrusis) bar is padded with rest
  at its start; a short bar followed by a short bar that completes it (the half bar before a repeat
  sign, then the pickup written inside the repeat) is played as one bar, as a performer plays it;
  any other short bar is padded with rest at its end. So every bar of the MIDI is a full bar of the
  time signature, and a strain with its pickup inside the repeat still repeats every 8 bars.
- The melody is the lead track (GM program 80, as the chorales' top part). Where a tune writes chord
  symbols (``"G"``, ``"Am"``, ``"D7"``), they are realised as a second track of block chords on the
  piano (program 0), music21's voicing of each symbol, struck at the symbol and again at each bar
  line until the next symbol. Tunes without chord symbols are one track.
- Tempo: the tune's ``Q:`` field (as quarter notes per minute), else 120; grace notes are dropped,
  tied notes merged.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from museformer.errors import MuseformerError

# the collections that write their tunes with repeat signs (dance tunes and airs: about 4,400 tunes)
FOLK_COLLECTIONS = ("airdsAirs", "miscFolk", "nottingham-dataset", "oneills1850", "ryansMammoth")
# the Essen folksong collection (8,514 songs) writes every song out in full: not one repeat sign
ESSEN_COLLECTIONS = ("essenFolksong",)
MELODY_PROGRAM, CHORD_PROGRAM = 80, 0
MELODY_VELOCITY, CHORD_VELOCITY = 90, 64
DEFAULT_QPM = 120.0
TICKS_PER_QUARTER = 480
_TUNE_START = re.compile(r"^X:", re.MULTILINE)
_TITLE = re.compile(r"^T:\s*(.*?)\s*$", re.MULTILINE)
_CHORD_FIGURE = re.compile(r"^[A-G][#b]?")


@dataclass(frozen=True)
class FolkTune:
    """One ABC tune: where it comes from (``label``, e.g. ``oneills1850/0001-0050.abc #3``) and its text."""

    label: str
    text: str

    @property
    def title(self) -> str:
        found = _TITLE.search(self.text)
        return found.group(1) if found else "(untitled)"


def read_abc_text(path: str | Path) -> str:
    """An ABC file's text (UTF-8, else Latin-1, as the older books are)."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def folk_tunes(text: str, label: str) -> list[FolkTune]:
    """The tunes of one ABC book's ``text``, in book order; ``label`` names the book."""
    starts = [m.start() for m in _TUNE_START.finditer(text)]
    if not starts:
        return []
    header = text[: starts[0]]
    header = "\n".join(line for line in header.splitlines() if line and line[1:2] == ":" and line[0] != "%")
    bounds = [*starts, len(text)]
    return [
        FolkTune(f"{label} #{i + 1}", (header + "\n" if header else "") + text[a:b].strip() + "\n")
        for i, (a, b) in enumerate(zip(bounds, bounds[1:]))
    ]


def _fail(tune: FolkTune, why: str) -> MuseformerError:
    return MuseformerError(f"{tune.label} ({tune.title!r}): {why}")


def parse_tune(tune: FolkTune):
    """The tune as a music21 ``Score`` (not expanded).

    Raises:
        MuseformerError: music21 cannot parse it.
    """
    from music21 import abcFormat, stream
    from music21.abcFormat import translate

    try:
        handler = abcFormat.ABCHandler()
        handler.process(tune.text)
        score = stream.Score()
        translate.abcToStreamScore(handler, score)
    except Exception as e:  # noqa: BLE001 - music21 raises many types for unreadable tunes
        raise _fail(tune, f"music21 cannot parse it ({type(e).__name__}: {e})") from None
    return score


def play_order(part) -> list[int]:
    """Indexes into ``part``'s measures in the order a performer plays them.

    Rules: ``:|`` (played ``times`` times in all, default 2) jumps back to the last ``|:``, or, when
    there is none since the previous ``:|``, to the start of the piece or to the bar after that
    ``:|``; a bar under an ending bracket (1st/2nd ending) is played only on the passes its numbers
    name; after the last ending of a group, the next repeat counts from 1 again.
    """
    from music21 import bar, spanner, stream

    measures = list(part.getElementsByClass(stream.Measure))
    index = {id(m): k for k, m in enumerate(measures)}
    n = len(measures)
    starts, ends = [False] * n, [0] * n  # ends[k] = how many times bars up to k are played (0 = no repeat)
    for k, m in enumerate(measures):
        for line, side in ((m.leftBarline, "left"), (m.rightBarline, "right")):
            if not isinstance(line, bar.Repeat):
                continue
            if line.direction == "start":
                starts[k if side == "left" else min(k + 1, n - 1)] = True
            elif line.direction == "end":
                ends[k] = max(2, int(line.times or 2))
    endings: dict[int, set[int]] = {}
    for bracket in part.spannerBundle.getByClass(spanner.RepeatBracket):
        numbers = set(_ending_numbers(bracket.number))
        for m in bracket.getSpannedElements():
            if id(m) in index:
                endings.setdefault(index[id(m)], set()).update(numbers)
    order: list[int] = []
    start, passno, k = 0, 1, 0
    while k < n:
        if starts[k] and k != start:
            start, passno = k, 1
        numbers = endings.get(k)
        if numbers is not None and passno not in numbers:
            k += 1
            continue
        order.append(k)
        if len(order) > 16 * n:
            raise ValueError("the repeats do not end")
        if ends[k] and passno < ends[k]:
            passno += 1
            k = start
            continue
        if ends[k] or (numbers is not None and k + 1 not in endings):
            start, passno = k + 1, 1
        k += 1
    return order


def _ending_numbers(text) -> list[int]:
    """The passes an ending bracket's number names: "1", "2", "1,2", "1-3" (else [1])."""
    out: list[int] = []
    for piece in str(text or "1").replace(" ", "").split(","):
        a, _, b = piece.partition("-")
        if a.isdigit() and (not b or b.isdigit()):
            out.extend(range(int(a), int(b or a) + 1))
    return out or [1]


def expand_melody(tune: FolkTune) -> list:
    """The melody's bars (music21 ``Measure`` objects, not copied) in the order they are played.

    Raises:
        MuseformerError: it cannot be parsed, has no bars, or its repeats cannot be played out.
    """
    from music21 import stream

    score = parse_tune(tune)
    parts = list(score.parts)
    if not parts or parts[0].getElementsByClass(stream.Measure).first() is None:
        raise _fail(tune, "no bars")
    melody = parts[0]
    measures = list(melody.getElementsByClass(stream.Measure))
    try:
        return [measures[k] for k in play_order(melody)]
    except Exception as e:  # noqa: BLE001 - inconsistent repeat marks
        raise _fail(tune, f"cannot play out its repeats ({type(e).__name__}: {e})") from None


@dataclass(frozen=True)
class PlayedTune:
    """A tune laid out on full bars, in quarter notes: what ``tune_score`` turns into MIDI."""

    bar_starts: tuple[float, ...]  # start of each bar, plus the end of the last one
    time_signatures: tuple[tuple[float, int, int], ...]  # (time, numerator, denominator) at changes
    notes: tuple[tuple[float, float, int], ...]  # melody (start, end, pitch)
    chords: tuple[tuple[float, tuple[int, ...]], ...]  # chord symbols (time, MIDI pitches)
    qpm: float


def lay_out(measures, tune: FolkTune | None = None) -> PlayedTune:
    """Lay the played ``measures`` (``expand_melody``) out on full bars (see the module docstring)."""
    from music21 import harmony, meter, tempo

    ts = meter.TimeSignature("4/4")
    marks = [mark for m in measures[:2] for mark in m.recurse().getElementsByClass(tempo.MetronomeMark)]
    qpm = DEFAULT_QPM
    if marks:
        try:
            qpm = float(marks[0].getQuarterBPM()) or DEFAULT_QPM
        except Exception:  # noqa: BLE001 - a mark without a number
            qpm = DEFAULT_QPM
    bar_starts, signatures, notes, chords = [], [], [], []
    open_ties: dict[int, int] = {}  # MIDI pitch -> index in notes of a note whose tie continues
    time = 0.0
    k = 0
    while k < len(measures):
        measure = measures[k]
        if measure.timeSignature is not None:
            ts = measure.timeSignature
        bar = float(ts.barDuration.quarterLength)
        content = float(measure.duration.quarterLength)
        pieces = [(measure, 0.0)]  # (measure, where its music starts in this bar)
        nxt = measures[k + 1] if k + 1 < len(measures) else None
        same_meter = nxt is not None and (nxt.timeSignature is None or nxt.timeSignature.ratioString == ts.ratioString)
        if (k > 0 and content < bar and same_meter
                and abs(content + float(nxt.duration.quarterLength) - bar) < 1e-6):
            pieces.append((nxt, content))  # a half bar and the pickup after it are one bar, as played
            k += 1
        elif k == 0 and content < bar:
            pieces = [(measure, bar - content)]  # the opening pickup's music ends its bar
        filled = sum(float(m.duration.quarterLength) for m, _ in pieces)
        length = bar if filled <= bar + 1e-9 else bar * math.ceil(filled / bar - 1e-9)
        if not signatures or signatures[-1][1:] != (ts.numerator, ts.denominator):
            signatures.append((time, ts.numerator, ts.denominator))
        bar_starts.append(time)
        for piece, pad in pieces:
            for el in piece.flatten().notes:
                at = time + pad + float(el.offset)
                if isinstance(el, harmony.ChordSymbol):
                    pitches = _chord_pitches(el)
                    if pitches:
                        chords.append((at, pitches))
                    continue
                if el.duration.isGrace or el.duration.quarterLength <= 0:
                    continue
                _add_note(notes, open_ties, el, at)
        time += length
        k += 1
    bar_starts.append(time)
    if not notes and tune is not None:
        raise _fail(tune, "no notes")
    return PlayedTune(tuple(bar_starts), tuple(signatures), tuple(tuple(n) for n in notes), tuple(chords), qpm)


def _add_note(notes: list, open_ties: dict[int, int], el, at: float) -> None:
    """Append note/chord ``el`` at ``at`` to ``notes`` ([start, end, pitch]); a tied note extends its start."""
    end = at + float(el.duration.quarterLength)
    tie = el.tie.type if el.tie is not None else None
    for p in el.pitches:
        midi = int(p.midi)
        held = open_ties.get(midi)
        if held is not None and tie in ("stop", "continue") and abs(notes[held][1] - at) < 1e-6:
            notes[held][1] = end
        else:
            held = len(notes)
            notes.append([at, end, midi])
        if tie in ("start", "continue"):
            open_ties[midi] = held
        else:
            open_ties.pop(midi, None)


def _chord_pitches(symbol) -> tuple[int, ...]:
    """MIDI pitches of a chord symbol in music21's voicing; () for no-chord or text that is no chord."""
    if not _CHORD_FIGURE.match(symbol.figure or ""):
        return ()
    try:
        return tuple(sorted({int(p.midi) for p in symbol.pitches}))
    except Exception:  # noqa: BLE001 - an unreadable figure
        return ()


def chord_notes(played: PlayedTune) -> list[tuple[float, float, int]]:
    """Block chords (start, end, pitch): each symbol until the next one, struck again at each bar line."""
    out = []
    bars = played.bar_starts
    for k, (at, pitches) in enumerate(played.chords):
        until = played.chords[k + 1][0] if k + 1 < len(played.chords) else bars[-1]
        cuts = [at, *(b for b in bars if at < b < until), until]
        for a, b in zip(cuts, cuts[1:]):
            if b - a > 1e-6:
                out.extend((a, b, p) for p in pitches)
    return out


def tune_score(played: PlayedTune, title: str = ""):
    """The laid-out tune as a ``symusic.Score`` (ticks): melody track, then chords if any."""
    from symusic import Note, Score, Tempo, TimeSignature, Track

    tpq = TICKS_PER_QUARTER
    score = Score(tpq)
    score.tempos.append(Tempo(0, played.qpm))
    for at, num, den in played.time_signatures:
        score.time_signatures.append(TimeSignature(round(at * tpq), num, den))

    def track(name: str, program: int, notes, velocity: int):
        t = Track(name=name, program=program)
        for start, end, pitch in sorted(notes):
            a, b = round(start * tpq), round(end * tpq)
            if b > a and 0 <= pitch <= 127:
                t.notes.append(Note(a, b - a, pitch, velocity))
        return t

    score.tracks.append(track(title or "Melody", MELODY_PROGRAM, played.notes, MELODY_VELOCITY))
    if played.chords:
        score.tracks.append(track("Chords", CHORD_PROGRAM, chord_notes(played), CHORD_VELOCITY))
    return score


def export_tune(tune: FolkTune, dest: str | Path) -> None:
    """Export one tune, repeats played out, to a MIDI file (written atomically).

    Raises:
        MuseformerError: the tune cannot be parsed or expanded, or has no notes.
    """
    from museformer.files import write_midi_atomic

    played = lay_out(expand_melody(tune), tune)
    write_midi_atomic(tune_score(played, "Melody"), dest)
