"""Tests of the structure metrics (museformer.metrics) and of analyze / evaluate --structure."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from museformer import metrics
from museformer.metrics import SongNotes

DATA = Path(__file__).parent / "data"


# ---------------------------------------------------------------------------------------------
# helpers: songs built in code
# ---------------------------------------------------------------------------------------------
def bar_tokens(notes: list[tuple[int, int, int]], instrument: int = 0) -> list[str]:
    """One REMIGEN2 bar from (onset, pitch, duration) notes, grouped by onset."""
    tokens = ["t-38"]
    for onset in sorted({n[0] for n in notes}):
        tokens += [f"o-{onset}", f"i-{instrument}"]
        for _, pitch, duration in sorted((n for n in notes if n[0] == onset), reverse=True):
            tokens += [f"p-{pitch}", f"d-{duration}", "v-20"]
    return tokens + ["b-1"]


def song_tokens(bars: list[list[tuple[int, int, int]]]) -> list[str]:
    return [t for bar in bars for t in bar_tokens(bar)]


def repeating_song(period: int, repeats: int, seed: int = 0) -> list[list[tuple[int, int, int]]]:
    """``period`` bars with pairwise disjoint random notes, repeated ``repeats`` times exactly."""
    rng = np.random.default_rng(seed)
    motifs = []
    for b in range(period):
        onsets = rng.choice(48, size=6, replace=False)
        motifs.append([(int(o), 40 + 10 * b + int(rng.integers(10)), int(rng.integers(1, 12))) for o in onsets])
    return motifs * repeats


def shuffle_bars(song: SongNotes, fraction: float, rng: np.random.Generator) -> SongNotes:
    """The song with a random ``fraction`` of its bars moved to random other places."""
    order = np.arange(song.num_bars)
    moved = rng.choice(song.num_bars, size=int(round(fraction * song.num_bars)), replace=False)
    order[moved] = rng.permutation(moved)
    return SongNotes(song.num_bars, order[song.bar], song.onset, song.instrument, song.pitch, song.duration)


# ---------------------------------------------------------------------------------------------
# reading tokens
# ---------------------------------------------------------------------------------------------
def test_notes_from_tokens_reads_bars_onsets_and_drops_incomplete_bar():
    """Notes get their bar, onset, instrument, pitch, duration; broken notes and an unfinished bar are dropped."""
    tokens = ("t-38 o-0 i-0 p-60 d-6 v-13 p-55 d-6 v-13 o-12 i-128 p-164 d-1 v-1 p-70 b-1 "
              "b-1 p-61 d-3 v-2 o-24 i-33 p-40 d-24 v-10 b-1 o-0 i-0 p-72 d-6 v-1").split()
    song = metrics.notes_from_tokens(tokens)
    assert song.num_bars == 3
    assert song.bar.tolist() == [0, 0, 0, 2]  # p-70 has no d-, p-61 comes before any onset of bar 3
    assert song.onset.tolist() == [0, 0, 12, 24]
    assert song.instrument.tolist() == [0, 0, 128, 33]
    assert song.pitch.tolist() == [60, 55, 164, 40]
    assert song.duration.tolist() == [6, 6, 1, 24]
    assert song.is_drum.tolist() == [False, False, True, False]


def test_notes_from_ids_equals_notes_from_tokens():
    """Reading ids through a vocabulary gives the same notes as reading the token texts (specials ignored)."""
    from museformer.vocab import BOS_ID, EOS_ID, Vocab

    vocab = Vocab.builtin("general")
    tokens = song_tokens(repeating_song(3, 2))
    ids = np.concatenate([[BOS_ID], vocab.encode(tokens), [EOS_ID]])
    a, b = metrics.notes_from_tokens(tokens), metrics.notes_from_ids(ids, vocab)
    assert a.num_bars == b.num_bars == 6
    for field in ("bar", "onset", "instrument", "pitch", "duration"):
        assert getattr(a, field).tolist() == getattr(b, field).tolist()


# ---------------------------------------------------------------------------------------------
# bar similarity
# ---------------------------------------------------------------------------------------------
def test_bar_similarity_by_hand():
    """Jaccard of note sets: 1 common of 3 distinct notes = 1/3; duplicates count once; two empty bars are NaN."""
    a = [(0, 60, 6), (12, 62, 6)]
    b = [(0, 60, 6), (24, 64, 6), (24, 64, 6)]
    assert metrics.bar_similarity(a, b) == pytest.approx(1 / 3)
    assert metrics.bar_similarity(a, [(0, 60, 7)]) == 0.0  # another duration is another note
    assert metrics.bar_similarity([], a) == 0.0
    assert math.isnan(metrics.bar_similarity([], []))


def test_self_similarity_matrix_by_hand():
    """The vectorised matrix matches hand values; a pair of empty bars is NaN, empty vs non-empty is 0."""
    bars = [[(0, 60, 6), (0, 55, 6), (12, 62, 6)], [(0, 60, 6)], [], [(0, 60, 6)], []]
    sim = metrics.self_similarity(metrics.notes_from_tokens(song_tokens(bars)))
    third, nan = 1 / 3, np.nan
    expected = np.array([
        [1, third, 0, third, 0],
        [third, 1, 0, 1, 0],
        [0, 0, nan, 0, nan],
        [third, 1, 0, 1, 0],
        [0, 0, nan, 0, nan],
    ])
    np.testing.assert_allclose(sim, expected, equal_nan=True)
    stats = metrics.interval_stats(sim, max_interval=5)
    # interval 2: pairs (0,2)=0, (1,3)=1, (2,4) skipped -> 2 pairs, mean 1/2
    assert stats.pairs.tolist() == [4, 2, 2, 1, 0]
    np.testing.assert_allclose(stats.curve, [(third + 0 + 0 + 0) / 4, 0.5, third / 2, 0.0, nan], equal_nan=True)


def test_self_similarity_equals_pairwise_definition():
    """On a random song the matrix product equals bar_similarity evaluated pair by pair."""
    rng = np.random.default_rng(3)
    bars = [[(int(rng.integers(4)) * 12, int(rng.integers(58, 62)), int(rng.integers(1, 3))) for _ in range(rng.integers(0, 4))]
            for _ in range(12)]
    sim = metrics.self_similarity(metrics.notes_from_tokens(song_tokens(bars)))
    for i in range(12):
        for j in range(12):
            np.testing.assert_equal(sim[i, j], metrics.bar_similarity(bars[i], bars[j]))


def test_exact_four_bar_repeat_peaks_at_multiples_of_four():
    """A song repeating 4 disjoint bars has similarity 1 at intervals 4, 8, ... and 0 elsewhere."""
    song = metrics.notes_from_tokens(song_tokens(repeating_song(4, 10)))
    curve = metrics.song_interval_stats(song, 16).curve
    expected = np.array([1.0 if k % 4 == 0 else 0.0 for k in range(1, 17)])
    np.testing.assert_array_equal(curve, expected)
    assert set(metrics.top_intervals(curve, 4)) == {4, 8, 12, 16}


def test_corpus_curve_weighs_songs_equally():
    """The corpus curve is the mean of per-song means; pair_curve weighs every pair equally."""
    long_song = metrics.notes_from_tokens(song_tokens(repeating_song(1, 11)))  # 10 pairs at k=1, all 1
    short_song = metrics.notes_from_tokens(song_tokens(repeating_song(2, 1)))  # 1 pair at k=1, similarity 0
    stats = metrics.combine([metrics.song_interval_stats(s, 2) for s in (long_song, short_song)], 2)
    assert stats.curve[0] == pytest.approx(0.5)
    assert stats.pair_curve[0] == pytest.approx(10 / 11)
    assert stats.songs.tolist() == [2, 1] and stats.pairs.tolist() == [11, 9]


def test_similarity_error_formula():
    """SE = mean |L_gen(k) - L_ref(k)| over the intervals defined in both curves."""
    gen, ref = np.array([0.5, np.nan, 0.2, 0.0]), np.array([0.1, 0.3, 0.2, 0.3])
    assert metrics.similarity_error(gen, ref) == pytest.approx((0.4 + 0.0 + 0.3) / 3)
    assert metrics.similarity_error(gen, ref, intervals=1) == pytest.approx(0.4)
    assert math.isnan(metrics.similarity_error([np.nan], [0.1]))
    with pytest.raises(ValueError):
        metrics.similarity_error(gen, ref, intervals=5)


def test_similarity_error_zero_on_itself_and_grows_as_bars_are_shuffled():
    """SE of a set against itself is 0, and it grows as more bars of each song are shuffled."""
    songs = [metrics.notes_from_tokens(song_tokens(repeating_song(p, 32 // p, seed=s)))
             for s, p in enumerate((2, 4, 4, 8) * 3)]
    reference = metrics.similarity_curve(songs, 16)
    assert metrics.similarity_error(reference, reference) == 0.0
    errors = []
    for fraction in (0.25, 0.5, 1.0):
        rng = np.random.default_rng(0)
        shuffled = [shuffle_bars(s, fraction, rng) for s in songs]
        errors.append(metrics.similarity_error(metrics.similarity_curve(shuffled, 16), reference))
    assert 0 < errors[0] < errors[1] < errors[2]


def test_suggest_fine_offsets_rule():
    """Interval 1 always, then the most similar local peaks, at most `count`, in increasing order."""
    curve = np.array([0.3, 0.4, 0.1, 0.6, 0.2, 0.25, 0.2, 0.5, np.nan, 0.1, 0.35])
    assert metrics.suggest_fine_offsets(curve) == (1, 2, 4, 6, 8, 11)
    assert metrics.suggest_fine_offsets(curve, count=3) == (1, 4, 8)
    assert metrics.top_intervals(curve, 3) == [4, 8, 2]


# ---------------------------------------------------------------------------------------------
# other metrics
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def small_song() -> SongNotes:
    # bar 1: C4 E4 at 0, G4 at 12; bar 2: empty; bar 3: C5 at 0, a drum at 24
    bars = [[(0, 60, 6), (0, 64, 6), (12, 67, 6)], [], [(0, 72, 6), (24, 164, 2)]]
    return metrics.notes_from_tokens(song_tokens(bars))


def test_pitch_class_entropy_and_range_by_hand(small_song):
    """Classes C, E, G, C -> p = (1/2, 1/4, 1/4), H = 1.5 bits; range 72 - 60; drums ignored."""
    assert metrics.pitch_class_entropy(small_song) == pytest.approx(1.5)
    assert metrics.pitch_range(small_song) == 12.0
    drums_only = metrics.notes_from_tokens(song_tokens([[(0, 164, 2)]]))
    assert math.isnan(metrics.pitch_class_entropy(drums_only)) and math.isnan(metrics.pitch_range(drums_only))


def test_groove_density_empty_bars_by_hand(small_song):
    """Groove: hamming({0,12}, {}) = 2 and ({}, {0,24}) = 2 over 48 positions; 5 notes in 3 bars; 1 of 3 empty."""
    assert metrics.groove_consistency(small_song) == pytest.approx(1 - (2 + 2) / 2 / 48)
    assert metrics.note_density(small_song) == pytest.approx(5 / 3)
    assert metrics.empty_bar_ratio(small_song) == pytest.approx(1 / 3)
    values = metrics.song_metrics(small_song)
    assert values["bars"] == 3 and values["notes"] == 5


def test_validity_rate_with_the_decoder():
    """Validity = share of sequences whose decoding skips no token."""
    from museformer.tokenizer import Tokenizer

    tokenizer = Tokenizer()
    good = song_tokens(repeating_song(2, 2))
    bad = good[:3] + ["d-3"] + good[3:]  # a duration that follows no pitch
    skipped = [tokenizer.decode_with_report(t)[1].skipped for t in (good, bad, good, good)]
    assert skipped[0] == 0 and skipped[1] > 0
    assert metrics.validity_rate(skipped) == 0.75
    assert math.isnan(metrics.validity_rate([]))


def test_mean_metrics_ignore_undefined_songs():
    """A metric undefined for a song (NaN) is left out of that metric's mean only."""
    means = metrics.mean_metrics([{"a": 1.0, "b": math.nan}, {"a": 3.0, "b": 4.0}])
    assert means == {"a": 2.0, "b": 4.0}


# ---------------------------------------------------------------------------------------------
# analyze / evaluate through the CLI
# ---------------------------------------------------------------------------------------------
def write_token_folder(folder: Path, songs: list[list[str]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "songs.txt").write_text("".join(" ".join(s) + "\n" for s in songs), encoding="utf-8")
    return folder


def test_cli_analyze_writes_curve_csv_plot_json(tmp_path):
    """`museformer analyze` on token files writes the curve (CSV, PNG), heatmaps and the report."""
    from museformer.cli import main

    songs = [song_tokens(repeating_song(4, 6, seed=s)) for s in range(3)]
    folder = write_token_folder(tmp_path / "songs", songs)
    out = tmp_path / "report"
    assert main(["analyze", str(folder), "-o", str(out), "--max-interval", "12", "--heatmaps", "2",
                 "--workers", "1", "--quiet"]) == 0
    rows = (out / "similarity.csv").read_text().splitlines()
    assert rows[0] == "interval,similarity,songs,pairs,pair_mean"
    assert rows[4] == "4,1.000000,3,60,1.000000" and rows[1] == "1,0.000000,3,69,0.000000"
    report = json.loads((out / "report.json").read_text())
    assert report["songs"] == 3 and report["validity_rate"] == 1.0
    assert [t["interval"] for t in report["top_intervals"][:3]] == [4, 8, 12]
    assert report["suggested_fine_offsets"] == [1, 4, 8, 12]
    assert (out / "similarity.png").stat().st_size > 0
    assert len(list((out / "heatmaps").glob("*.png"))) == 2


def test_cli_analyze_midi_folder_equals_prepared_corpus(tmp_path):
    """MIDI files and the same files prepared into shards give the same curve (2 worker processes)."""
    from museformer.analysis import analyze
    from museformer.data import prepare
    from museformer.tokenizer import Tokenizer

    midi = tmp_path / "midi"
    midi.mkdir()
    for name in ("bach_bwv269.mid", "bach_bwv40_8.mid", "bach_bwv66_6.mid"):
        shutil.copy(DATA / name, midi / name)
    prepare(midi, tmp_path / "prepared", Tokenizer(), progress=False)
    a = analyze(midi, tmp_path / "a", max_interval=8, preset="general", workers=2, progress=False)
    b = analyze(tmp_path / "prepared", tmp_path / "b", max_interval=8, progress=False)
    assert a.summary.songs == b.summary.songs == 3
    np.testing.assert_allclose(a.summary.stats.curve, b.summary.stats.curve)
    assert math.isnan(a.summary.validity_rate) and b.summary.validity_rate == 1.0


def test_worker_processes_give_the_same_results_in_order(tmp_path):
    """Analysing in 2 worker processes gives the same per-song results, in input order, as 1 process."""
    from museformer.analysis import CHUNK_SONGS, analyze_songs, find_songs

    songs = [song_tokens(repeating_song(1 + s % 5, 3, seed=s)) for s in range(CHUNK_SONGS + 5)]
    sources = find_songs(write_token_folder(tmp_path / "songs", songs))
    one = analyze_songs(sources, max_interval=6, workers=1, progress=False)
    two = analyze_songs(sources, max_interval=6, workers=2, progress=False)
    assert [r.name for r in two] == [r.name for r in one] == [f"songs.txt:{i + 1}" for i in range(len(songs))]
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a.stats.curve, b.stats.curve)
        assert a.values == pytest.approx(b.values, nan_ok=True)


def test_cli_evaluate_structure_table_and_json(tmp_path, capsys):
    """`evaluate --structure` prints a table and writes JSON; SE is 0 against itself, > 0 against shuffled songs."""
    from museformer.cli import main

    songs = [song_tokens(repeating_song(4, 6, seed=s)) for s in range(3)]
    reference = write_token_folder(tmp_path / "ref", songs)
    rng = np.random.default_rng(0)
    shuffled = [[t for i in rng.permutation(24) for t in bar_tokens(repeating_song(4, 6, seed=s)[i])] for s in range(3)]
    generated = write_token_folder(tmp_path / "gen", shuffled)
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--structure", str(reference), "--reference", str(reference), "--max-interval", "8",
                 "--workers", "1", "--quiet", "-o", str(out)]) == 0
    table = capsys.readouterr().out
    assert "similarity error (SE), k=1..8" in table and "pitch-class entropy" in table
    assert json.loads(out.read_text())["similarity_error"] == 0.0
    assert main(["evaluate", "--structure", str(generated), "--reference", str(reference), "--max-interval", "8",
                 "--workers", "1", "--quiet", "-o", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["similarity_error"] > 0.1
    assert report["generated"]["metrics"]["pitch_class_entropy"] == pytest.approx(
        report["reference"]["metrics"]["pitch_class_entropy"])  # same notes, other bar order


def test_cli_evaluate_errors(tmp_path, capsys):
    """Bad uses of `evaluate` exit 1 with one line naming the problem."""
    from museformer.cli import main

    (tmp_path / "empty").mkdir()
    assert main(["evaluate", "--structure", str(tmp_path / "empty"), "--reference", str(tmp_path)]) == 1
    assert "no MIDI" in capsys.readouterr().err
    assert main(["evaluate", "--structure", str(tmp_path)]) == 1
    assert "--reference" in capsys.readouterr().err
    assert main(["analyze", str(tmp_path / "missing"), "-o", str(tmp_path / "r")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "ckpt"), str(tmp_path / "data")]) == 1
    assert "ckpt" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# inputs that are not songs, outputs of the wrong kind
# ---------------------------------------------------------------------------------------------
def test_only_token_files_that_are_songs_are_read(tmp_path, capsys):
    """Vocabulary lists, egg-info and notes (.txt files that are not token streams) are not songs."""
    import museformer
    from museformer.analysis import find_songs
    from museformer.cli import main
    from museformer.errors import MuseformerError

    songs = [song_tokens(repeating_song(4, 6, seed=s)) for s in range(2)]
    folder = write_token_folder(tmp_path / "gen", songs)
    shutil.copytree(Path(museformer.__file__).parent / "vocabs", folder / "vocabs")
    (folder / "museformer.egg-info").mkdir()
    (folder / "museformer.egg-info" / "SOURCES.txt").write_text("src/museformer/cli.py\nsrc/museformer/data.py\n")
    (folder / "notes.txt").write_text("b-1 p-60 but then words\n")
    assert [s.name for s in find_songs(folder)] == ["songs.txt:1", "songs.txt:2"]
    # a folder of only such files has no songs: a clear error, not an empty table
    (folder / "songs.txt").unlink()
    with pytest.raises(MuseformerError, match=r"no MIDI .* songs found \(4 \.txt file\(s\) are not token songs\)"):
        find_songs(folder)
    assert main(["evaluate-structure", str(folder), "--reference", str(folder), "--quiet"]) == 1
    assert "not token songs" in capsys.readouterr().err


def test_folder_with_midi_and_token_dumps_needs_a_choice(tmp_path, capsys):
    """tests/data (MIDI files next to token dumps of the same songs) is refused unless --only picks a kind."""
    from museformer.cli import main

    midi_files = len([p for p in DATA.rglob("*") if p.suffix.lower() in (".mid", ".midi")])
    assert main(["analyze", str(DATA), "-o", str(tmp_path / "r"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert f"holds both MIDI files ({midi_files})" in err and "--only midi" in err
    assert main(["analyze", str(DATA), "-o", str(tmp_path / "r"), "--quiet", "--only", "midi",
                 "--max-interval", "4"]) == 0
    assert json.loads((tmp_path / "r" / "report.json").read_text())["songs"] == midi_files


def test_output_paths_of_the_wrong_kind_are_refused_before_work(tmp_path, capsys, monkeypatch):
    """analyze -o FILE, evaluate -o DIR, encode -o DIR, decode -o DIR: one line naming the path, no work."""
    import museformer.analysis
    from museformer.cli import main

    songs = write_token_folder(tmp_path / "songs", [song_tokens(repeating_song(4, 6, seed=0))])
    (tmp_path / "file").write_text("keep")
    (tmp_path / "dir").mkdir()
    monkeypatch.setattr(museformer.analysis, "analyze_songs", lambda *a, **k: pytest.fail("did the work"))
    for args, message in (
        (["analyze", str(songs), "-o", str(tmp_path / "file")], "file is an existing file"),
        (["analyze", str(songs), "-o", str(tmp_path / "file" / "sub")], "file is a file, not a folder"),
        (["evaluate-structure", str(songs), "--reference", str(songs), "-o", str(tmp_path / "dir")],
         "dir is an existing folder"),
        (["encode", str(DATA / "bach_bwv269.mid"), "-o", str(tmp_path / "dir")], "dir is an existing folder"),
        (["decode", str(songs / "songs.txt"), "-o", str(tmp_path / "dir")], "dir is an existing folder"),
    ):
        assert main(args) == 1, args
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (args, err)
    assert (tmp_path / "file").read_text() == "keep"


def test_decode_on_a_full_disk_keeps_the_good_file(tmp_path, capsys, monkeypatch):
    """`decode -o` whose write is cut says so in one line (exit 1) and leaves the old MIDI file as it was."""
    from museformer.cli import main

    songs = write_token_folder(tmp_path / "songs", [song_tokens(repeating_song(4, 6, seed=0))])
    out = tmp_path / "song.mid"
    assert main(["decode", str(songs / "songs.txt"), "-o", str(out)]) == 0
    good = out.read_bytes()
    real = Path.write_bytes
    monkeypatch.setattr(Path, "write_bytes", lambda self, data: real(self, data[:10]))
    assert main(["decode", str(songs / "songs.txt"), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "song.mid: only 10 of" in err and len(err.strip().splitlines()) == 1
    monkeypatch.undo()
    assert out.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == ["song.mid", "songs"]
