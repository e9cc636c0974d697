"""Checked atomic writes, output-path checks and exclusive names (museformer.files)."""

import errno
import os
import threading
from pathlib import Path

import pytest
import symusic

from museformer import files
from museformer.errors import MuseformerError, WriteError


def test_short_or_empty_writes_never_replace_a_good_file(tmp_path):
    """A temp file shorter than promised, or empty, is refused; the old file and no temp file remain."""
    target = tmp_path / "out.bin"
    target.write_bytes(b"good")
    with pytest.raises(WriteError, match=r"out\.bin: only 2 of 5 bytes reached the disk"):
        with files.atomic_path(target, size=5) as tmp:
            tmp.write_bytes(b"ab")
    with pytest.raises(WriteError, match=r"out\.bin: the writer produced an empty file"):
        with files.atomic_path(target):
            pass  # a writer that "succeeded" without writing (symusic on a full disk)
    assert target.read_bytes() == b"good" and [p.name for p in tmp_path.iterdir()] == ["out.bin"]
    files.write_bytes_atomic(target, b"")  # an empty file is fine when it is what was meant
    assert target.read_bytes() == b""


def test_enospc_is_one_line_naming_the_file(tmp_path):
    """An OSError inside the block (disk full) becomes a WriteError naming the target."""
    target = tmp_path / "song.mid"
    with pytest.raises(WriteError, match=r"cannot write .*song\.mid: No space left on device"):
        with files.atomic_path(target):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert not target.exists()
    assert issubclass(WriteError, MuseformerError)


def test_midi_written_by_python_with_its_size_checked(tmp_path, monkeypatch):
    """write_midi_atomic writes symusic's bytes; a write that loses bytes is caught before the rename."""
    score = symusic.Score(480)
    track = symusic.Track(program=0)
    track.notes.append(symusic.Note(0, 480, 60, 80))
    score.tracks.append(track)
    path = files.write_midi_atomic(score, tmp_path / "a.mid")
    assert symusic.Score(str(path)).note_num() == 1
    good = path.read_bytes()
    real = Path.write_bytes
    monkeypatch.setattr(Path, "write_bytes", lambda self, data: real(self, data[:-3]))
    with pytest.raises(WriteError, match=r"a\.mid: only \d+ of \d+ bytes"):
        files.write_midi_atomic(score, path)
    assert path.read_bytes() == good


def test_check_output_path(tmp_path):
    """A file output may not be a folder, a folder output may not be a file, no ancestor may be a file."""
    (tmp_path / "f").write_text("x")
    (tmp_path / "d").mkdir()
    assert files.check_output_path(tmp_path / "new" / "deeper", "dir") == tmp_path / "new" / "deeper"
    assert files.check_output_path(tmp_path / "f", "file") == tmp_path / "f"  # replaced atomically later
    with pytest.raises(WriteError, match=r"output .*d is an existing folder"):
        files.check_output_path(tmp_path / "d", "file")
    with pytest.raises(WriteError, match=r"report folder .*f is an existing file"):
        files.check_output_path(tmp_path / "f", "dir", what="report folder")
    with pytest.raises(WriteError, match=r"f is a file, not a folder"):
        files.check_output_path(tmp_path / "f" / "x" / "y.png", "file")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("links", [True, False])
def test_write_bytes_new_never_takes_a_taken_name(tmp_path, monkeypatch, links):
    """Numbered names are claimed exclusively (hard link, or O_EXCL where links are unsupported)."""
    if not links:
        def no_link(src, dst):
            raise OSError(errno.EPERM, "Operation not permitted")

        monkeypatch.setattr(files.os, "link", no_link)
    (tmp_path / "n_001").write_bytes(b"taken")
    name = lambda n: tmp_path / f"n_{n:03d}"  # noqa: E731
    taken = []
    lock = threading.Lock()

    def writer(k):
        n, path = files.write_bytes_new(f"song {k}".encode(), name, start=0)
        with lock:
            taken.append((n, path.read_bytes()))

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(n for n, _ in taken) == [0, 2, 3, 4, 5, 6, 7, 8]
    assert sorted(data for _, data in taken) == sorted(f"song {k}".encode() for k in range(8))
    assert (tmp_path / "n_001").read_bytes() == b"taken"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert oct(os.stat(tmp_path / "n_000").st_mode & 0o777) == "0o644"
