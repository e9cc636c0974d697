"""Tests of corpus preparation (museformer.data.prepare) and loading (Corpus, Song)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import symusic

from museformer import structure
from museformer.cli import main
from museformer.data import SPLITS, Corpus, find_midi_files, hash_split, prepare
from museformer.errors import MuseformerError
from museformer.tokenizer import Tokenizer
from museformer.vocab import BOS_ID, EOS_ID

DATA = Path(__file__).parent / "data"
GOOD = ["a/bach_bwv269.mid", "a/b/bach_bwv40_8.MID", "bach_bwv66_6.midi", "synthetic_multitrack.mid"]
BAD = ["bad/corrupt.mid", "bad/empty.mid", "bad/no_notes.mid"]
SHARD_FILES = [f"{s}.{x}" for s in SPLITS for x in ("tokens.bin", "offsets.npy", "songs.json")] + ["failed.tsv"]


class CountingEncoder:
    """Wraps ``Tokenizer.encode_file`` and counts calls (in-process, workers=1)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer, self.calls = tokenizer, []

    def __call__(self, path: Path) -> np.ndarray:
        self.calls.append(Path(path).name)
        return self.tokenizer.encode_file(path, as_ids=True)


@pytest.fixture()
def midi_dir(tmp_path: Path) -> Path:
    """Four good MIDI files (nested folders, mixed-case suffixes), three bad ones, one non-MIDI."""
    root = tmp_path / "in"
    sources = ["bach_bwv269.mid", "bach_bwv40_8.mid", "bach_bwv66_6.mid", "synthetic_multitrack.mid"]
    for rel, src in zip(GOOD, sources):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(DATA / src, root / rel)
    (root / "bad").mkdir()
    (root / "bad/corrupt.mid").write_bytes(b"MThd\x00\x00\x00\x06garbage" + bytes(range(256)))
    (root / "bad/empty.mid").write_bytes(b"")
    silent = symusic.Score(480)
    silent.tracks.append(symusic.Track("empty", 0, False))
    silent.dump_midi(root / "bad/no_notes.mid")
    (root / "notes.txt").write_text("not a MIDI file")
    return root


def read_shards(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in SHARD_FILES}


def test_find_midi_files_recursive_case_insensitive_sorted(midi_dir: Path) -> None:
    """All .mid/.midi files in any case and folder depth are found, sorted by relative path."""
    assert find_midi_files(midi_dir) == sorted(GOOD + BAD)


def test_prepare_reports_bad_files_and_loader_matches_tokenizer(midi_dir: Path, tmp_path: Path) -> None:
    """Bad files are reported and skipped; every stored song equals tok.encode_file of its file."""
    tok = Tokenizer()
    out = tmp_path / "out"
    report = prepare(midi_dir, out, tok, progress=False)
    assert sorted(rel for rel, _ in report.failed) == sorted(BAD)
    assert all(reason for _, reason in report.failed)
    failed_lines = (out / "failed.tsv").read_text().splitlines()
    assert [line.split("\t")[0] for line in failed_lines] == sorted(BAD)
    assert sum(report.songs.values()) == len(GOOD)
    assert "4 ok" in report.summary() and "3 failed" in report.summary()
    meta = json.loads((out / "meta.json").read_text())
    assert meta["failed"] == 3 and meta["vocab"] == "general" and meta["tokenizer"] == tok.config.to_dict()
    assert Tokenizer.load(out / "tokenizer.json").config == tok.config

    seen = []
    for split in SPLITS:
        corpus = Corpus(out, split)
        assert len(corpus) == report.songs[split]
        assert corpus.lengths.sum() == report.tokens[split]
        for i, song in enumerate(corpus):
            seen.append(song.name)
            assert hash_split(song.name) == split
            expected = tok.encode_file(midi_dir / song.name, as_ids=True)
            np.testing.assert_array_equal(song.ids, expected)
            assert song.ids.dtype == np.int64 and corpus.lengths[i] == len(expected)
    assert sorted(seen) == sorted(GOOD)


def test_model_inputs_follow_official_shift_and_structure(midi_dir: Path, tmp_path: Path) -> None:
    """input = BOS + ids, target = ids + EOS (cut to max_len); bar/onset ids equal structure's."""
    out = tmp_path / "out"
    prepare(midi_dir, out, Tokenizer(), progress=False, valid_fraction=0, test_fraction=0)
    corpus = Corpus(out, "train")
    song = corpus[0]
    full = song.model_inputs()
    n = len(song.ids)
    assert {k: v.shape for k, v in full.items()} == {k: (n + 1,) for k in full}
    assert all(v.dtype == np.int64 for v in full.values())
    np.testing.assert_array_equal(full["input_ids"], np.concatenate([[BOS_ID], song.ids]))
    np.testing.assert_array_equal(full["target_ids"], np.concatenate([song.ids, [EOS_ID]]))
    np.testing.assert_array_equal(full["bar_ids"], structure.bar_ids(full["input_ids"], corpus.vocab).numpy())
    np.testing.assert_array_equal(full["onset_ids"], structure.onset_ids(full["input_ids"], corpus.vocab).numpy())
    assert full["bar_ids"][0] == 0 and full["bar_ids"][-1] == structure.complete_bars(song.ids, corpus.vocab)

    cut = song.model_inputs(max_len=100)
    for key in full:
        np.testing.assert_array_equal(cut[key], full[key][:100])
    np.testing.assert_array_equal(cut["target_ids"][:-1], cut["input_ids"][1:])
    assert cut["target_ids"][-1] == song.ids[99]  # a truncated song ends on a real token, not EOS


def test_rerun_reuses_encoded_files(midi_dir: Path, tmp_path: Path) -> None:
    """A second run encodes nothing; a changed file (size/mtime) is encoded again, alone."""
    tok = Tokenizer()
    out = tmp_path / "out"
    first = CountingEncoder(tok)
    prepare(midi_dir, out, tok, progress=False, encode_fn=first)
    assert len(first.calls) == len(GOOD) + len(BAD)
    shards = read_shards(out)

    again = CountingEncoder(tok)
    report = prepare(midi_dir, out, tok, progress=False, encode_fn=again)
    assert again.calls == [] and report.reused == len(GOOD) + len(BAD) and report.encoded == 0
    assert read_shards(out) == shards

    changed = midi_dir / GOOD[0]
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    third = CountingEncoder(tok)
    prepare(midi_dir, out, tok, progress=False, encode_fn=third)
    assert third.calls == [changed.name]
    assert read_shards(out) == shards


def test_interrupted_run_resumes_to_identical_shards(midi_dir: Path, tmp_path: Path) -> None:
    """Stopped after 2 of 4 chunks, a re-run encodes only the rest and writes identical shards."""
    tok = Tokenizer()
    prepare(midi_dir, tmp_path / "clean", tok, progress=False, chunk_size=2)

    def stop_after_two(done: int) -> None:
        if done == 2:
            raise KeyboardInterrupt

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        prepare(midi_dir, out, tok, progress=False, chunk_size=2, on_chunk=stop_after_two)
    assert not (out / "meta.json").exists()
    with pytest.raises(MuseformerError, match="not a prepared corpus"):
        Corpus(out)
    rest = CountingEncoder(tok)
    report = prepare(midi_dir, out, tok, progress=False, chunk_size=2, encode_fn=rest)
    assert len(rest.calls) == len(GOOD) + len(BAD) - 4 and report.reused == 4
    assert read_shards(out) == read_shards(tmp_path / "clean")


def test_sigkill_midway_then_resume_is_identical(midi_dir: Path, tmp_path: Path) -> None:
    """A process SIGKILLed after one chunk leaves no partial output; resuming gives identical shards."""
    out = tmp_path / "out"
    script = (
        "import os, signal, sys\n"
        "from museformer.data import prepare\n"
        "from museformer.tokenizer import Tokenizer\n"
        "def kill(done):\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "prepare(sys.argv[1], sys.argv[2], Tokenizer(), progress=False, chunk_size=3, on_chunk=kill)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(midi_dir), str(out)], capture_output=True)
    assert proc.returncode == -9
    assert not (out / "meta.json").exists() and not any(out.glob("*.bin"))
    assert not list(out.rglob(".*tmp*"))  # no temp file left where a reader could trip on it
    tok = Tokenizer()
    rest = CountingEncoder(tok)
    prepare(midi_dir, out, tok, progress=False, chunk_size=3, encode_fn=rest)
    assert len(rest.calls) == len(GOOD) + len(BAD) - 3
    prepare(midi_dir, tmp_path / "clean", tok, progress=False)
    assert read_shards(out) == read_shards(tmp_path / "clean")


def test_two_workers_write_the_same_shards_as_one(midi_dir: Path, tmp_path: Path) -> None:
    """Parallel encoding (2 worker processes) gives byte-identical shards to serial encoding."""
    tok = Tokenizer()
    prepare(midi_dir, tmp_path / "one", tok, progress=False, workers=1)
    prepare(midi_dir, tmp_path / "two", tok, progress=False, workers=2, chunk_size=1)
    assert read_shards(tmp_path / "one") == read_shards(tmp_path / "two")


def test_split_lists_with_and_without_extensions(midi_dir: Path, tmp_path: Path) -> None:
    """Official-style lists place files by name (extension optional); unlisted files are left out."""
    lists = tmp_path / "meta"
    lists.mkdir()
    (lists / "train.txt").write_text("bach_bwv269.mid\nbach_bwv40_8\n")
    (lists / "valid.txt").write_text("bach_bwv66_6\n\n")
    (lists / "test.txt").write_text("bad/corrupt.mid\n")
    out = tmp_path / "out"
    report = prepare(midi_dir, out, Tokenizer(), progress=False, split_lists=lists)
    assert Corpus(out, "train").names == ["a/b/bach_bwv40_8.MID", "a/bach_bwv269.mid"]
    assert Corpus(out, "valid").names == ["bach_bwv66_6.midi"]
    assert len(Corpus(out, "test")) == 0 and Corpus(out, "test").lengths.size == 0
    assert report.unlisted == 1  # synthetic_multitrack.mid
    assert json.loads((out / "meta.json").read_text())["split_rule"] == {"kind": "lists"}


def test_hash_split_is_deterministic_and_respects_fractions() -> None:
    """The split depends only on the relative path; fractions of 0 / 1 empty / fill a split."""
    names = [f"song{i}.mid" for i in range(2000)]
    splits = [hash_split(n) for n in names]
    assert splits == [hash_split(n) for n in names]
    assert 100 < splits.count("valid") < 300 and 100 < splits.count("test") < 300
    assert {hash_split(n, 0.0, 0.0) for n in names} == {"train"}
    assert {hash_split(n, 0.0, 1.0) for n in names} == {"test"}


def test_corpus_detects_shards_out_of_step_with_meta(midi_dir: Path, tmp_path: Path) -> None:
    """A shard that does not match meta.json (e.g. a run killed between renames) is an error."""
    out = tmp_path / "out"
    prepare(midi_dir, out, Tokenizer(), progress=False, valid_fraction=0, test_fraction=0)
    with (out / "train.tokens.bin").open("ab") as f:
        f.write(b"\x00\x00")
    with pytest.raises(MuseformerError, match="does not match meta.json"):
        Corpus(out, "train")
    with pytest.raises(MuseformerError, match="unknown split"):
        Corpus(out, "dev")


def test_cli_prepare(midi_dir: Path, tmp_path: Path, capsys) -> None:
    """`museformer prepare IN OUT` prints a summary; bad arguments exit 1 with one message."""
    out = tmp_path / "out"
    assert main(["prepare", str(midi_dir), str(out), "--workers", "1", "--quiet", "--preset", "lmd6"]) == 0
    assert "4 ok" in capsys.readouterr().out
    assert Corpus(out).tokenizer.config == Tokenizer.preset("lmd6").config
    assert main(["prepare", str(tmp_path / "missing"), str(out), "--quiet"]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["prepare", str(out)]) == 1


# ---------------------------------------------------------------------------------------------
# workers, inputs that are not songs, outputs that cannot be written
# ---------------------------------------------------------------------------------------------
WORKER_SCRIPT = '''
import os, sys, time
from pathlib import Path

from museformer.data import prepare
from museformer.tokenizer import Tokenizer


def slow_encode(path):
    Path(os.environ["PIDS_DIR"], str(os.getpid())).touch()
    time.sleep(120)


if __name__ == "__main__":
    prepare(sys.argv[1], sys.argv[2], Tokenizer(), progress=False, workers=2, chunk_size=1, encode_fn=slow_encode)
'''


def _alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie (a reaped or exited worker is not alive)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigkill_of_prepare_takes_its_workers_with_it(midi_dir: Path, tmp_path: Path) -> None:
    """`kill -9` of a prepare with 2 workers: the workers are gone within a few seconds."""
    import signal
    import time

    script = tmp_path / "run_prepare.py"
    script.write_text(WORKER_SCRIPT)
    pids_dir = tmp_path / "pids"
    pids_dir.mkdir()
    proc = subprocess.Popen([sys.executable, str(script), str(midi_dir), str(tmp_path / "out")],
                            env={**os.environ, "PIDS_DIR": str(pids_dir)})
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while len(pids) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
            pids = [int(p.name) for p in pids_dir.iterdir()]
        assert len(pids) == 2, "the two workers did not start"
        assert all(_alive(pid) for pid in pids)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 5
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in pids if _alive(pid)], "workers outlived their parent"
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in pids:  # only the workers this test started
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_prepare_of_a_folder_without_midi_fails_clearly(tmp_path: Path, capsys) -> None:
    """`prepare docs/ out/` (no MIDI files) exits 1 naming the folder, instead of "0 ok"."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "notes.md").write_text("# not music\n")
    assert main(["prepare", str(docs), str(tmp_path / "out"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "holds no MIDI files" in err and str(docs) in err
    assert not (tmp_path / "out").exists()


def test_prepare_output_that_is_a_file_is_refused_before_work(midi_dir: Path, tmp_path: Path, capsys) -> None:
    """An OUT_DIR that is an existing file is one line naming it; nothing is encoded."""
    (tmp_path / "out").write_text("keep")
    assert main(["prepare", str(midi_dir), str(tmp_path / "out"), "--quiet"]) == 1
    assert "out is an existing file" in capsys.readouterr().err
    assert (tmp_path / "out").read_text() == "keep"


def test_short_shard_write_keeps_the_previous_shards(midi_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """A shard whose bytes do not all reach the disk is a WriteError; the previous shards stay."""
    import museformer.files
    from museformer.errors import WriteError

    out = tmp_path / "out"
    prepare(midi_dir, out, Tokenizer(), progress=False)
    before = read_shards(out)
    real = museformer.files._CountingFile.write

    def dropping(self, data):  # a full disk that says nothing: the last half of every write is lost
        n = real(self, data)
        self._f.truncate(max(self._f.tell() - len(memoryview(data).cast("B")) // 2, 0))
        self._f.seek(0, 2)
        return n

    monkeypatch.setattr(museformer.files._CountingFile, "write", dropping)
    with pytest.raises(WriteError, match=r"tokens\.bin: only \d+ of \d+ bytes reached the disk"):
        prepare(midi_dir, out, Tokenizer(), progress=False)
    monkeypatch.undo()
    assert read_shards(out) == before and not list(out.glob(".*tmp"))
