"""Tests of the folk corpus (museformer.folk + corpora "folk"): ABC tunes played out as MIDI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import symusic

pytest.importorskip("music21")

from museformer import corpora, folk  # noqa: E402
from museformer.cli import main  # noqa: E402
from museformer.folk import FolkTune, expand_melody, folk_tunes, lay_out, parse_tune, play_order, tune_score  # noqa: E402
from museformer.tokenizer import Tokenizer  # noqa: E402

# AABB: two 8-bar strains, each repeated, with a one-beat pickup; the A strain has 1st/2nd endings
# on its 8th bar, so the A strain is played 7 shared bars + ending 1, 7 shared bars + ending 2.
A_SHARED = "|:G2B2 d2B2|A2F2 D2F2|G2B2 d2g2|f2a2 g4|e2g2 e2c2|d2B2 G2B2|A2c2 B2G2"
AABB = f"""X:7
T:Strains
M:4/4
L:1/8
Q:1/4=96
K:G
D2{A_SHARED}|1"D"A2F2 E2D2:|2"G"G2B2 G2z2||
|:"C"c2e2 g2e2|"G"d2B2 G2B2|c2e2 g2e2|d4 B4|c2e2 g2e2|d2B2 G2B2|A2F2 D2F2|"G"G6:|
"""
# a tune music21 reads but whose bars have no notes at all
EMPTY = "X:1\nT:Silence\nM:4/4\nL:1/4\nK:C\nz4|z4|\n"


def bar_pitches(score: symusic.Score, bar_ticks: int, n_bars: int) -> list[tuple]:
    """The melody's (onset in bar, pitch, duration) per bar."""
    bars: list[list] = [[] for _ in range(n_bars)]
    for n in score.tracks[0].notes:
        bars[n.time // bar_ticks].append((n.time % bar_ticks, n.pitch, n.duration))
    return [tuple(sorted(b)) for b in bars]


def test_aabb_with_endings_expands_as_played() -> None:
    """|:A:|:B:| with 1st/2nd endings plays 1 pickup + 8+8 + 8+8 bars; strains repeat exactly 8 bars on."""
    tune = FolkTune("test.abc #1", AABB)
    played = lay_out(expand_melody(tune), tune)
    assert len(played.bar_starts) - 1 == 33  # pickup bar, A (8) twice, B (8) twice
    assert set(np.diff(played.bar_starts)) == {4.0}  # every bar a full 4/4 bar
    assert played.qpm == 96.0 and played.time_signatures == ((0.0, 4, 4),)
    score = tune_score(played)
    bars = bar_pitches(score, 4 * score.ticks_per_quarter, 33)
    assert bars[0] == ((3 * 480, 62, 480),)  # the pickup is the last beat of bar 1
    a1, a2, b1, b2 = bars[1:9], bars[9:17], bars[17:25], bars[25:33]
    assert a1[:7] == a2[:7] and a1[7] != a2[7]  # the shared bars, then ending 1 / ending 2
    assert b1 == b2 and b1 != a1
    # the B strain's last bar is the half bar that completes the pickup: padded at its end
    assert bars[24] == ((0, 67, 3 * 480),) and bars[32] == bars[24]


def test_pickup_inside_the_repeat_completes_the_half_bar() -> None:
    """|:pickup| 7 bars | half bar :| plays the half bar + pickup as one bar: period 8, 17 bars, no gap."""
    tune = FolkTune("t.abc #1", "X:2\nT:Inside\nM:4/4\nL:1/8\nK:D\n"
                    "|:A2|d2f2 a2f2|g2e2 c2e2|d2f2 a2f2|g2e2 e4|d2f2 a2f2|g2e2 c2e2|f2d2 e2c2|d6:|\n")
    played = lay_out(expand_melody(tune), tune)
    assert len(played.bar_starts) - 1 == 17 and set(np.diff(played.bar_starts)) == {4.0}
    score = tune_score(played)
    bars = bar_pitches(score, 4 * score.ticks_per_quarter, 17)
    assert bars[1:8] == bars[9:16]  # the strain repeats exactly 8 bars on
    assert bars[8] == ((0, 74, 3 * 480), (3 * 480, 69, 480))  # half bar + the pickup, no rest between
    assert bars[0] == ((3 * 480, 69, 480),) and bars[16] == ((0, 74, 3 * 480),)


def test_play_order_is_music21s_expansion_without_the_copies() -> None:
    """On |: :| repeats with endings, the bar order equals music21's Stream.expandRepeats."""
    from music21 import stream

    part = parse_tune(FolkTune("test.abc #1", AABB)).parts[0]
    measures = list(part.getElementsByClass(stream.Measure))
    reference = [m.number for m in part.expandRepeats().getElementsByClass(stream.Measure)]
    assert [measures[k].number for k in play_order(part)] == reference


def test_repeat_without_start_goes_back_to_the_last_repeat_end() -> None:
    """A :| with no |: before it repeats from the start, or from the bar after the previous :|."""
    tune = FolkTune("t.abc #1", "X:1\nT:Two\nM:2/4\nL:1/4\nK:C\nC D|E F:|G A|B c:|\n")
    part = parse_tune(tune).parts[0]
    assert play_order(part) == [0, 1, 0, 1, 2, 3, 2, 3]  # A A B B (music21 plays A A B A A B)


def test_chord_symbols_become_block_chords_restruck_each_bar() -> None:
    """Chord symbols give a piano track: each symbol's pitches, struck again at every bar line."""
    tune = FolkTune("test.abc #1", AABB)
    score = tune_score(lay_out(expand_melody(tune), tune))
    assert [t.program for t in score.tracks] == [folk.MELODY_PROGRAM, folk.CHORD_PROGRAM]
    chords = score.tracks[1].notes
    bar = 4 * score.ticks_per_quarter
    # "C" starts the B strain (bar 18, time 17 bars) and lasts until "G" two bars later: two strikes
    c_major = sorted((n.time, n.pitch) for n in chords if 17 * bar <= n.time < 18 * bar)
    assert [p for _, p in c_major] == [48, 52, 55] and {t for t, _ in c_major} == {17 * bar}
    assert all(n.time % bar == 0 and n.duration == bar for n in chords if 17 * bar <= n.time < 19 * bar)


def test_folk_tunes_split_a_book_with_its_header() -> None:
    """A book is split at X: lines, in order, each tune with the book's header fields first."""
    book = "%comment\nA:Somewhere\n\n" + AABB + "\n" + EMPTY
    tunes = folk_tunes(book, "book.abc")
    assert [t.label for t in tunes] == ["book.abc #1", "book.abc #2"]
    assert [t.title for t in tunes] == ["Strains", "Silence"]
    assert all(t.text.startswith("A:Somewhere\nX:") for t in tunes)


def test_encoded_folk_tune_has_bar_per_bar(tmp_path: Path) -> None:
    """The exported MIDI encodes (LMD preset) to one bar token per played bar."""
    dest = tmp_path / "t.mid"
    folk.export_tune(FolkTune("test.abc #1", AABB), dest)
    tok = Tokenizer.preset("lmd6")
    tokens = tok.encode_file(dest)
    assert sum(1 for t in tokens if t == "b-1") == 33


def fake_sources(name: str, limit=None):
    """A two-tune corpus: one good tune and one with no notes."""
    return [("book/0001.mid", FolkTune("book.abc #1", AABB)), ("book/0002.mid", FolkTune("book.abc #2", EMPTY))]


def test_export_reports_failures_and_reuses_its_cache(tmp_path: Path, monkeypatch) -> None:
    """A tune that fails is reported (name + reason), not fatal; a re-run parses nothing again."""
    monkeypatch.setattr(corpora, "corpus_sources", fake_sources)
    first = corpora.export_corpus("folk", tmp_path, progress=False)
    assert first.written == 1 and first.existing == 0 and first.failed_before == 0
    assert [rel for rel, _ in first.failed] == ["book/0002.mid"]
    assert "'Silence'" in first.failed[0][1] and "no notes" in first.failed[0][1]
    assert (tmp_path / "book/0001.mid").is_file() and not (tmp_path / "book/0002.mid").exists()

    def no_parse(*args, **kwargs):
        raise AssertionError("a cached tune was parsed again")

    monkeypatch.setattr(corpora, "export_tune", no_parse)
    again = corpora.export_corpus("folk", tmp_path, progress=False)
    assert again.written == 0 and again.existing == 1 and again.failed_before == 1
    assert again.failed == first.failed


def test_cli_prepare_folk_reports_failures(tmp_path: Path, monkeypatch, capsys) -> None:
    """`prepare --corpus folk OUT` exports, says which tunes were skipped and why, and prepares the rest."""
    monkeypatch.setattr(corpora, "corpus_sources", fake_sources)
    out = tmp_path / "folk"
    assert main(["prepare", "--corpus", "folk", str(out), "--workers", "1", "--quiet",
                 "--tokenizer-preset", "lmd6", "--valid-fraction", "0", "--test-fraction", "0"]) == 0
    err = capsys.readouterr().err
    assert "skipped book/0002.mid" in err and "no notes" in err
    assert (out / "midi" / corpora.FAILED_LIST).is_file()
