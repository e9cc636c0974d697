"""File output: a file a user keeps is either the old one or the complete new one, and never a lie.

Every writer in the package goes through ``atomic_path`` (or the helpers built on it): it hands out a
temporary path in the target's folder (same filesystem, so the final ``os.replace`` is atomic), and
on success fsyncs the temporary file, **checks that it holds what was written**, gives it ordinary
permissions (0644; ``mkstemp`` makes 0600) and moves it into place. On any error, or when the process
is killed, the target is untouched and the temporary file is removed (or, after SIGKILL, left as a
hidden ``.name.*.tmp`` file that nothing reads).

The size check matters on a full disk: a writer that drops ``ENOSPC`` (symusic's ``dump_midi`` does)
leaves a short or empty file and reports success. ``atomic_path(path, size=N)`` refuses a temporary
file that is not exactly ``N`` bytes, and without ``size`` an empty one; the helpers know the size
(``write_bytes_atomic``, ``write_midi_atomic`` serialise in memory first; ``atomic_open`` counts what
went through the file object). Failures are a ``WriteError`` naming the file, on one line.

Also here: ``check_output_path`` (an output that is an existing file or folder of the wrong kind is
refused before any work) and ``publish_new`` (move a finished file to the first free name of a
numbered series with an exclusive create, so concurrent runs into one folder never overwrite).
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from museformer.errors import WriteError


def _describe(e: OSError) -> str:
    return e.strerror or str(e) or type(e).__name__


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, size: int | Callable[[], int] | None = None,
                check: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield a temporary path to write; on a clean exit it replaces ``path`` atomically.

    Args:
        path: the final file.
        size: the exact number of bytes the file must hold (or a function returning it, called after
            the block); None = the file must not be empty.
        check: an extra verification of the finished temporary file (raise ``WriteError`` to refuse).

    Raises:
        WriteError: the folder cannot be created, the write or fsync failed (e.g. ``ENOSPC``), or the
            file is short; ``path`` is left as it was.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise WriteError(f"cannot write {path}: {_describe(e)}") from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            yield tmp
        except OSError as e:
            raise WriteError(f"cannot write {path}: {_describe(e)}") from None
        try:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            written = tmp.stat().st_size
        except OSError as e:
            raise WriteError(f"cannot write {path}: {_describe(e)}") from None
        expected = size() if callable(size) else size
        if expected is None and written == 0:
            raise WriteError(f"cannot write {path}: the writer produced an empty file (disk full?)")
        if expected is not None and written != expected:
            raise WriteError(
                f"cannot write {path}: only {written} of {expected} bytes reached the disk (disk full?)"
            )
        if check is not None:
            check(tmp)
        try:
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except OSError as e:
            raise WriteError(f"cannot write {path}: {_describe(e)}") from None
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


class _CountingFile:
    """A binary file wrapper that counts the bytes written through it (for the size check)."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.count = 0

    def write(self, data) -> int:
        n = self._f.write(data)
        self.count += len(memoryview(data).cast("B")) if n is None else n
        return n

    def __getattr__(self, name):
        return getattr(self._f, name)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Yield a binary file to write; it replaces ``path`` only if every byte written reached the disk."""
    counter: list[_CountingFile] = []
    with atomic_path(path, size=lambda: counter[0].count) as tmp, open(tmp, "wb") as f:
        counting = _CountingFile(f)
        counter.append(counting)
        yield counting  # type: ignore[misc]


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (renames) to disk; a no-op where the platform cannot."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a UTF-8 text file atomically (its size is checked)."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write a binary file atomically (its size is checked)."""
    with atomic_path(path, size=len(data)) as tmp:
        tmp.write_bytes(data)


def midi_bytes(score) -> bytes:
    """A ``symusic.Score`` as Standard MIDI File bytes (serialised in memory, so the size is known)."""
    return bytes(score.dumps_midi())


def write_midi_atomic(score, path: str | os.PathLike) -> Path:
    """Write a ``symusic.Score`` as a MIDI file atomically, checking that every byte reached the disk.

    symusic's own ``dump_midi`` returns without error when the disk is full; this serialises in
    memory and writes with Python, whose writes raise, then checks the size.
    """
    write_bytes_atomic(path, midi_bytes(score))
    return Path(path)


# ---------------------------------------------------------------------------------------------
# output paths
# ---------------------------------------------------------------------------------------------
def check_output_path(path: str | os.PathLike, kind: str, *, what: str = "output") -> Path:
    """Refuse an output path that cannot be written as ``kind`` (``"file"`` or ``"dir"``), before any work.

    A ``"file"`` output must not be an existing folder; a ``"dir"`` output must not be an existing
    file; and no existing ancestor of either may be a file. Nothing is created.

    Raises:
        WriteError: one line naming the path and what is wrong with it.
    """
    if kind not in ("file", "dir"):
        raise ValueError(f"kind must be 'file' or 'dir', got {kind!r}")
    path = Path(path)
    if kind == "file" and path.is_dir():
        raise WriteError(f"{what} {path} is an existing folder; give a file name")
    if kind == "dir" and path.exists() and not path.is_dir():
        raise WriteError(f"{what} {path} is an existing file; give a folder")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise WriteError(f"{what} {path}: {parent} is a file, not a folder")
            break
    return path


# ---------------------------------------------------------------------------------------------
# numbered outputs written concurrently
# ---------------------------------------------------------------------------------------------
def write_bytes_new(data: bytes, name_for: Callable[[int], Path], start: int = 0) -> tuple[int, Path]:
    """Write ``data`` to the first free name ``name_for(n)``, ``n >= start``, never replacing a file.

    The bytes go to a hidden temporary file first (fsynced, size checked), then ``publish_new``
    claims the name: a reader never sees a partial file under a final name, and concurrent writers
    into one folder never take the same name.

    Raises:
        WriteError: the write failed or was short (nothing is left under any final name).
    """
    first = Path(name_for(start))
    try:
        first.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=first.parent, prefix=f".{first.name}.", suffix=".tmp")
    except OSError as e:
        raise WriteError(f"cannot write {first}: {_describe(e)}") from None
    tmp = Path(tmp_name)
    try:
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            written = tmp.stat().st_size
        except OSError as e:
            raise WriteError(f"cannot write {first}: {_describe(e)}") from None
        if written != len(data):
            raise WriteError(f"cannot write {first}: only {written} of {len(data)} bytes reached the disk (disk full?)")
        os.chmod(tmp, 0o644)
        return publish_new(tmp, name_for, start)
    finally:
        tmp.unlink(missing_ok=True)


def publish_new(tmp: str | os.PathLike, name_for: Callable[[int], Path], start: int = 0,
                limit: int = 1_000_000) -> tuple[int, Path]:
    """Move the finished file ``tmp`` to ``name_for(n)`` for the first ``n >= start`` not yet taken.

    Each name is claimed with an exclusive create (a hard link, which fails when the name exists;
    where the filesystem has no hard links, an ``O_EXCL`` create then a rename over the claimed
    name), so two processes publishing into one folder at once never take the same name.

    Returns:
        ``(n, path)`` of the name taken; ``tmp`` is gone afterwards.
    """
    tmp = Path(tmp)
    for n in range(start, start + limit):
        target = Path(name_for(n))
        try:
            os.link(tmp, target)
        except FileExistsError:
            continue
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS):
                raise WriteError(f"cannot write {target}: {_describe(e)}") from None
            try:  # no hard links here: claim the name with O_EXCL, then move the file over it
                os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            except FileExistsError:
                continue
            except OSError as e2:
                raise WriteError(f"cannot write {target}: {_describe(e2)}") from None
            os.replace(tmp, target)
        else:
            tmp.unlink(missing_ok=True)
        fsync_dir(target.parent)
        return n, target
    raise WriteError(f"no free name among {name_for(start)} .. {name_for(start + limit - 1)}")
