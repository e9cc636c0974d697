"""Corpus preparation and loading: a folder of MIDI files -> compact token shards -> songs.

This module owns the on-disk corpus format and the path from MIDI files to model inputs:

- ``prepare``: encode every MIDI file under a folder in parallel worker processes, resumably, and
  write one shard per split (train / valid / test);
- ``Corpus`` / ``Song``: open a prepared folder (memory-mapped, cheap) and turn a song (or a
  bar-aligned window of it) into the model's inputs (``input_ids``, ``target_ids``, ``bar_ids``,
  ``onset_ids``);
- batches: ``plan_epoch`` / ``BatchOrder`` (the seeded order of training micro-batches),
  ``evaluation_batches``, both packed by ``pack_by_length``, and ``collate`` / ``corpus_batch``.

It does not know how MIDI becomes tokens (``museformer.tokenizer``) nor what the model does with them.

Layout of a prepared folder ``OUT_DIR``::

    meta.json               options, counts, versions, vocabulary (written last: the commit marker)
    tokenizer.json          the tokenizer that produced the ids
    {split}.tokens.bin      uint16 token ids of all songs of the split, concatenated (little-endian)
    {split}.offsets.npy     int64, (songs + 1,): song i is tokens[offsets[i]:offsets[i + 1]]
    {split}.songs.json      the songs' relative paths, in shard order
    failed.tsv              relative path <TAB> reason, one line per file that could not be encoded
    work/<fingerprint>/     per-chunk encoded results, the resume cache (safe to delete)

Songs are ordered by relative path (POSIX form), so the shards depend only on the files and the
options, never on worker scheduling or on how often a run was interrupted. Token ids carry no
BOS/EOS; ``Song.model_inputs`` adds them.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from museformer.errors import MuseformerError
from museformer.files import atomic_open, check_output_path, write_text_atomic
from museformer.vocab import BOS_ID, EOS_ID, PAD_ID, UNK_ID

SPLITS = ("train", "valid", "test")
ON_UNKNOWN = ("keep", "skip", "fail")  # what prepare does with a song holding <unk> ids
MIDI_SUFFIXES = (".mid", ".midi")
FORMAT = "museformer-corpus"
FORMAT_VERSION = 1
TOKEN_DTYPE = np.dtype("<u2")  # both official vocabularies have far fewer than 65,536 ids

if TYPE_CHECKING:
    import torch

EncodeFn = Callable[[Path], np.ndarray]


# ---------------------------------------------------------------------------------------------
# finding files, splitting them
# ---------------------------------------------------------------------------------------------
def find_midi_files(root: str | Path) -> list[str]:
    """Relative POSIX paths of all ``*.mid`` / ``*.midi`` files under ``root`` (any case), sorted."""
    root = Path(root)
    if not root.is_dir():
        raise MuseformerError(f"input folder {root} does not exist or is not a folder")
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for name in filenames:
            if name.lower().endswith(MIDI_SUFFIXES):
                found.append((Path(dirpath) / name).relative_to(root).as_posix())
    return sorted(found)


def hash_split(relpath: str, valid_fraction: float = 0.1, test_fraction: float = 0.1) -> str:
    """The split of a file, decided by a hash of its relative path alone.

    ``u`` = the first 8 bytes of SHA-1(relpath as UTF-8), big-endian, divided by 2**64, lies in
    [0, 1): ``u < test_fraction`` -> test, ``u < test_fraction + valid_fraction`` -> valid, else
    train. Adding or removing other files never moves a file to another split.
    """
    u = int.from_bytes(hashlib.sha1(relpath.encode("utf-8")).digest()[:8], "big") / 2.0**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + valid_fraction:
        return "valid"
    return "train"


def _list_key(name: str) -> str:
    """A name from a split list or a relative path, without a MIDI extension, POSIX slashes."""
    name = name.strip().replace("\\", "/")
    if name.lower().endswith(MIDI_SUFFIXES):
        name = name.rsplit(".", 1)[0]
    return name


def read_split_lists(folder: str | Path) -> dict[str, str]:
    """Read ``train.txt``, ``valid.txt``, ``test.txt`` (one file name per line, with or without
    extension, as the official ``meta/`` lists) -> {name without extension: split}."""
    folder = Path(folder)
    lists: dict[str, str] = {}
    found_any = False
    for split in SPLITS:
        path = folder / f"{split}.txt"
        if not path.is_file():
            continue
        found_any = True
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            key = _list_key(line)
            if lists.get(key, split) != split:
                raise MuseformerError(f"{path}: {line.strip()!r} is also listed in {lists[key]}.txt")
            lists[key] = split
    if not found_any:
        raise MuseformerError(f"split-list folder {folder} has none of train.txt, valid.txt, test.txt")
    return lists


def _listed_split(relpath: str, lists: dict[str, str]) -> str | None:
    """A file matches a list entry by its relative path or by its bare name (both sans extension)."""
    key = _list_key(relpath)
    return lists.get(key) or lists.get(key.rsplit("/", 1)[-1])


# ---------------------------------------------------------------------------------------------
# encoding in worker processes
# ---------------------------------------------------------------------------------------------
def _encode_chunk(encode: EncodeFn, root: str, relpaths: Sequence[str]) -> list[tuple[str, np.ndarray | None, str]]:
    """Encode files; returns (relpath, uint16 ids or None, error reason) per file. Runs in a worker."""
    out = []
    for rel in relpaths:
        try:
            ids = np.asarray(encode(Path(root) / rel))
            if ids.ndim != 1 or ids.size == 0:
                raise MuseformerError("no tokens (the file has no notes)")
            if ids.min() < 0 or ids.max() > np.iinfo(TOKEN_DTYPE).max:
                raise MuseformerError("token ids outside 0..65535")
            out.append((rel, ids.astype(TOKEN_DTYPE), ""))
        except MuseformerError as e:
            out.append((rel, None, str(e).replace("\t", " ").replace("\n", " ")))
        except Exception as e:  # noqa: BLE001 - one broken file must not stop a corpus
            out.append((rel, None, f"{type(e).__name__}: {e}".replace("\t", " ").replace("\n", " ")))
    return out


def _file_key(root: Path, rel: str) -> str:
    """Identity of one input file's content for the resume cache: path, size, modification time."""
    st = (root / rel).stat()
    return f"{rel}\t{st.st_size}\t{st.st_mtime_ns}"


# ---------------------------------------------------------------------------------------------
# atomic files
# ---------------------------------------------------------------------------------------------
def _atomic_write(path: Path, write: Callable) -> None:
    """Write through ``write(binary_file)`` atomically, every byte checked (``files.atomic_open``)."""
    with atomic_open(path) as f:
        write(f)


# ---------------------------------------------------------------------------------------------
# the resume cache: work/<fingerprint>/chunk-<hash>.{tokens.npy,json}
# ---------------------------------------------------------------------------------------------
class _WorkCache:
    """Encoded results of earlier (possibly interrupted) runs, one pair of files per chunk.

    A chunk's ``.tokens.npy`` is written first and its ``.json`` index second, both atomically, so
    the index is the commit marker: a chunk without its index is ignored. Entries are keyed by
    ``_file_key``; a file that changed (size or mtime) simply misses the cache.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.entries: dict[str, tuple[Path, int, int, str]] = {}  # key -> (npy, start, end, error)
        for index in sorted(folder.glob("chunk-*.json")):
            npy = index.with_name(index.name.removesuffix(".json") + ".tokens.npy")
            try:
                info = json.loads(index.read_text(encoding="utf-8"))
                start = 0
                for key, length, error in zip(info["keys"], info["lengths"], info["errors"]):
                    self.entries[key] = (npy, start, start + max(length, 0), error)
                    start += max(length, 0)
            except (OSError, ValueError, KeyError, TypeError):
                continue  # unreadable index: those files are encoded again

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def add_chunk(self, keys: list[str], results: list[tuple[str, np.ndarray | None, str]]) -> None:
        name = "chunk-" + hashlib.sha1("\n".join(keys).encode("utf-8")).hexdigest()[:20]
        npy, index = self.folder / f"{name}.tokens.npy", self.folder / f"{name}.json"
        arrays = [ids for _, ids, _ in results if ids is not None]
        tokens = np.concatenate(arrays) if arrays else np.zeros(0, TOKEN_DTYPE)
        _atomic_write(npy, lambda f: np.save(f, tokens))
        info = {
            "keys": keys,
            "lengths": [-1 if ids is None else len(ids) for _, ids, _ in results],
            "errors": [err for _, _, err in results],
        }
        write_text_atomic(index, json.dumps(info))
        start = 0
        for key, (_, ids, err) in zip(keys, results):
            n = 0 if ids is None else len(ids)
            self.entries[key] = (npy, start, start + n, err)
            start += n

    def result(self, key: str, opened: dict) -> tuple[np.ndarray | None, str]:
        npy, start, end, error = self.entries[key]
        if error:
            return None, error
        if npy not in opened:
            opened[npy] = np.load(npy, mmap_mode="r")
        return opened[npy][start:end], ""


# ---------------------------------------------------------------------------------------------
# prepare
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PrepareReport:
    """What ``prepare`` did. ``failed`` holds (relative path, reason) pairs."""

    out_dir: Path
    songs: dict[str, int]
    tokens: dict[str, int]
    failed: tuple[tuple[str, str], ...]
    encoded: int  # files encoded by this run
    reused: int  # files taken from the resume cache
    unlisted: int = 0  # files in no split list (only with split lists)
    unknown: tuple[tuple[str, int], ...] = ()  # (relative path, <unk> ids) of songs holding any
    on_unknown: str = "keep"  # what was done with those songs: kept, or skipped (in ``failed``)

    def summary(self) -> str:
        ok = sum(self.songs.values())
        per = ", ".join(f"{s} {self.songs[s]}" for s in SPLITS)
        line = (
            f"{ok} ok ({per}), {len(self.failed)} failed, {sum(self.tokens.values()):,} tokens "
            f"-> {self.out_dir} (encoded {self.encoded}, reused {self.reused})"
        )
        if self.unlisted:
            line += f", {self.unlisted} in no split list"
        if self.unknown:
            done = "kept" if self.on_unknown == "keep" else "skipped"
            songs, total = len(self.unknown), sum(n for _, n in self.unknown)
            line += (f", {songs} song{'s' * (songs != 1)} with {total:,} token{'s' * (total != 1)} not in "
                     f"the vocabulary ({done}; see meta.json)")
        return line


def _fingerprint(tokenizer) -> str:
    """Hash of the tokenizer options: the resume cache of other options is never reused."""
    spec = {"config": tokenizer.config.to_dict(), "vocab": tokenizer.vocab.name, "size": len(tokenizer.vocab)}
    return hashlib.sha1(json.dumps(spec, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    from museformer import __version__

    out = {"museformer": __version__, "python": sys.version.split()[0], "numpy": np.__version__}
    try:
        out["symusic"] = version("symusic")
    except PackageNotFoundError:
        pass
    return out


def prepare(
    input_dir: str | Path,
    out_dir: str | Path,
    tokenizer,
    *,
    workers: int = 1,
    split_lists: str | Path | None = None,
    valid_fraction: float = 0.1,
    test_fraction: float = 0.1,
    chunk_size: int = 16,
    progress: bool = True,
    encode_fn: EncodeFn | None = None,
    on_chunk: Callable[[int], None] | None = None,
    on_unknown: str = "keep",
) -> PrepareReport:
    """Encode every MIDI file under ``input_dir`` and write train/valid/test shards to ``out_dir``.

    Re-running resumes: files already encoded (same relative path, size and mtime, same tokenizer
    options) are taken from ``out_dir/work`` instead of being encoded again, and the shards come
    out byte-identical to those of an uninterrupted run. Final files are written under temporary
    names and renamed, so an interruption (even SIGKILL) never leaves a half-written file.

    Args:
        input_dir: folder searched recursively for ``*.mid`` / ``*.midi`` (any case).
        out_dir: output folder (created).
        tokenizer: a ``museformer.tokenizer.Tokenizer`` (its options decide the ids).
        workers: worker processes; 1 encodes in this process.
        split_lists: a folder with ``train.txt`` / ``valid.txt`` / ``test.txt`` (file names, one per
            line, with or without extension); files in no list are left out. Without it, the split
            comes from ``hash_split`` of the relative path.
        valid_fraction, test_fraction: shares of the hash split.
        chunk_size: files per unit of work (and per resume-cache file).
        progress: show a tqdm progress bar.
        encode_fn: ``path -> ids``; defaults to ``tokenizer.encode_file(path, as_ids=True)`` (tests
            inject counters).
            Must be picklable when ``workers > 1``.
        on_chunk: called with the number of chunks finished after each one is safely on disk
            (a hook for tests and callers that want to stop early by raising).
        on_unknown: a song with tokens the vocabulary lacks (``<unk>`` ids, e.g. ``o-66`` of a
            12/8 bar with ``lmd6remi``): ``"keep"`` it, ``"skip"`` it (listed in ``failed.tsv``),
            or ``"fail"``: raise before any shard is written (the encoded files stay cached).
            Either way the counts per song go to ``meta.json`` and the summary line.

    Returns:
        A ``PrepareReport``.
    """
    input_dir, out_dir = Path(input_dir), Path(out_dir)
    if workers < 1:
        raise MuseformerError(f"--workers must be at least 1, got {workers}")
    if on_unknown not in ON_UNKNOWN:
        raise MuseformerError(f"on_unknown must be one of {', '.join(ON_UNKNOWN)}, got {on_unknown!r}")
    if not (0 <= valid_fraction <= 1 and 0 <= test_fraction <= 1 and valid_fraction + test_fraction <= 1):
        raise MuseformerError(
            f"split fractions must lie in [0, 1] and sum to at most 1, got valid {valid_fraction}, "
            f"test {test_fraction}"
        )
    check_output_path(out_dir, "dir", what="output folder")
    lists = read_split_lists(split_lists) if split_lists is not None else None
    relpaths = find_midi_files(input_dir)
    if not relpaths:
        raise MuseformerError(f"input folder {input_dir} holds no MIDI files (*.mid, *.midi); nothing to prepare")
    out_dir.mkdir(parents=True, exist_ok=True)
    encode = encode_fn if encode_fn is not None else partial(tokenizer.encode_file, as_ids=True)

    cache = _WorkCache(out_dir / "work" / _fingerprint(tokenizer))
    keys = {rel: _file_key(input_dir, rel) for rel in relpaths}
    todo = [rel for rel in relpaths if keys[rel] not in cache]
    reused = len(relpaths) - len(todo)
    chunks = [todo[i : i + chunk_size] for i in range(0, len(todo), chunk_size)]
    _encode_all(chunks, encode, input_dir, keys, cache, workers, progress, len(relpaths), reused, on_chunk)
    return _write_shards(input_dir, out_dir, tokenizer, relpaths, keys, cache, lists,
                         valid_fraction, test_fraction, encoded=len(todo), reused=reused, on_unknown=on_unknown)


def _encode_all(chunks, encode, root, keys, cache, workers, progress, total, reused, on_chunk) -> None:
    """Encode the chunks (in this process or a pool), saving each to the cache as it finishes."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=reused, unit="file", desc="encoding", disable=not progress or not chunks)
    done = 0

    def finish(chunk, results):
        nonlocal done
        cache.add_chunk([keys[rel] for rel in chunk], results)
        done += 1
        bar.update(len(chunk))
        if on_chunk is not None:
            on_chunk(done)

    try:
        if min(workers, len(chunks)) <= 1:  # starting processes would cost more than it saves
            for chunk in chunks:
                finish(chunk, _encode_chunk(encode, str(root), chunk))
            return
        from museformer.workers import process_pool

        # spawn: workers never inherit the parent's threads (torch, OpenMP) or locks; they exit
        # when this process dies, even by SIGKILL
        with process_pool(workers) as pool:
            pending: dict = {}
            queue = iter(chunks)
            try:
                while True:
                    # a bounded number of chunks in flight keeps memory flat for huge folders
                    for chunk in queue:
                        pending[pool.submit(_encode_chunk, encode, str(root), chunk)] = chunk
                        if len(pending) >= 4 * workers:
                            break
                    if not pending:
                        break
                    finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for future in finished:
                        finish(pending.pop(future), future.result())
            except BrokenProcessPool:
                raise MuseformerError(
                    "a worker process died while encoding (a file crashed the MIDI reader); "
                    "re-run with --workers 1 to find it; finished files are kept and reused"
                ) from None
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
    finally:
        bar.close()


def _write_shards(input_dir, out_dir, tokenizer, relpaths, keys, cache, lists, valid_fraction,
                  test_fraction, *, encoded, reused, on_unknown="keep") -> PrepareReport:
    """Assemble the shards from the cache in relative-path order; meta.json is written last."""
    members: dict[str, list[str]] = {s: [] for s in SPLITS}
    failed: list[tuple[str, str]] = []
    unlisted = 0
    opened: dict = {}
    unknown: list[tuple[str, int]] = []
    for rel in relpaths:
        ids, error = cache.result(keys[rel], opened)
        if error:
            failed.append((rel, error))
            continue
        n_unknown = int(np.count_nonzero(ids == UNK_ID))
        if n_unknown:
            unknown.append((rel, n_unknown))
            why = f"{n_unknown} of {len(ids)} tokens are not in the vocabulary {tokenizer.vocab.name}"
            if on_unknown == "fail":
                raise MuseformerError(f"{input_dir / rel}: {why} (on_unknown='fail'; nothing written, "
                                      "encoded files are kept for the next run)")
            if on_unknown == "skip":
                failed.append((rel, f"{why} (on_unknown='skip')"))
                continue
        split = _listed_split(rel, lists) if lists is not None else hash_split(rel, valid_fraction, test_fraction)
        if split is None:
            unlisted += 1
            continue
        members[split].append(rel)

    counts, tokens = {}, {}
    for split in SPLITS:
        offsets = [0]

        def write_tokens(f, names=members[split], offsets=offsets):
            for rel in names:
                ids, _ = cache.result(keys[rel], opened)
                f.write(np.ascontiguousarray(ids, dtype=TOKEN_DTYPE).tobytes())
                offsets.append(offsets[-1] + len(ids))

        _atomic_write(out_dir / f"{split}.tokens.bin", write_tokens)
        _atomic_write(out_dir / f"{split}.offsets.npy", lambda f: np.save(f, np.asarray(offsets, np.int64)))
        write_text_atomic(out_dir / f"{split}.songs.json", json.dumps(members[split], indent=0) + "\n")
        counts[split], tokens[split] = len(members[split]), offsets[-1]

    write_text_atomic(out_dir / "failed.tsv", "".join(f"{rel}\t{why}\n" for rel, why in failed))
    tokenizer.save(out_dir / "tokenizer.json")  # atomic
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "token_dtype": "uint16",
        "vocab": tokenizer.vocab.name,
        "vocab_size": len(tokenizer.vocab),
        "tokenizer": tokenizer.config.to_dict(),
        "split_rule": {"kind": "lists"} if lists is not None
        else {"kind": "hash", "valid_fraction": valid_fraction, "test_fraction": test_fraction},
        "files": len(relpaths),
        "failed": len(failed),
        "unlisted": unlisted,
        "unknown_tokens": {"on_unknown": on_unknown, "songs": len(unknown),
                           "tokens": sum(n for _, n in unknown), "per_song": dict(unknown)},
        "splits": {s: {"songs": counts[s], "tokens": tokens[s]} for s in SPLITS},
        "versions": _versions(),
    }
    write_text_atomic(out_dir / "meta.json", json.dumps(meta, indent=2) + "\n")
    return PrepareReport(out_dir, counts, tokens, tuple(failed), encoded, reused, unlisted, tuple(unknown), on_unknown)


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Song:
    """One prepared song: its relative path and its token ids (int64, no BOS/EOS)."""

    name: str
    ids: np.ndarray
    vocab: object = field(repr=False)

    def __len__(self) -> int:
        return len(self.ids)

    def model_inputs(self, max_len: int | None = None, start: int = 0) -> dict[str, np.ndarray]:
        """The model's inputs for this song (or a window of it), as the official training did.

        ``input_ids = [BOS] + ids[start:]`` and ``target_ids = ids[start:] + [EOS]`` (next-token
        targets), both cut to their first ``max_len`` positions. A truncated song therefore ends
        with a real token as its last target, not EOS (as in the official training, which truncated
        whole songs to their first 15,360 tokens). ``bar_ids`` / ``onset_ids`` come from
        ``museformer.structure`` on ``input_ids`` (BOS has bar 0 and onset 0). ``start`` > 0 is a
        window for random cropping (``crop_start``): bars are then counted from the window's start.

        Returns:
            dict of int64 arrays, all of shape ``(T,)`` with ``T = min(len(ids) - start + 1, max_len)``:
            ``input_ids``, ``target_ids``, ``bar_ids``, ``onset_ids``.
        """
        from museformer.structure import bar_ids, onset_ids

        if max_len is not None and max_len < 1:
            raise ValueError(f"max_len must be at least 1, got {max_len}")
        if not 0 <= start < max(len(self.ids), 1):
            raise ValueError(f"start must lie in 0..{len(self.ids) - 1}, got {start}")
        ids = np.asarray(self.ids[start:], dtype=np.int64)
        inputs = np.concatenate([[BOS_ID], ids])[:max_len]
        targets = np.concatenate([ids, [EOS_ID]])[:max_len]
        return {
            "input_ids": inputs,
            "target_ids": targets,
            "bar_ids": bar_ids(inputs, self.vocab).numpy(),
            "onset_ids": onset_ids(inputs, self.vocab).numpy(),
        }

    def crop_start(self, max_len: int, rng: np.random.Generator) -> int:
        """A random bar start from which ``max_len`` inputs fit inside the song (0 if it fits whole).

        Windows are full length: ``start <= len(ids) - (max_len - 1)``, so the window's last target
        is the song's next token (or EOS at the very end).
        """
        ids = np.asarray(self.ids)
        if len(ids) + 1 <= max_len:
            return 0
        starts = np.concatenate([[0], np.flatnonzero(ids == self.vocab.bar_id) + 1])
        starts = starts[starts <= len(ids) - (max_len - 1)]
        return int(starts[rng.integers(len(starts))])


class Corpus:
    """One split of a prepared folder: ``len(corpus)``, ``corpus[i] -> Song``, ``corpus.lengths``.

    Tokens are memory-mapped, so opening is cheap and songs are read on access.
    """

    def __init__(self, out_dir: str | Path, split: str = "train") -> None:
        self.path = Path(out_dir)
        if split not in SPLITS:
            raise MuseformerError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
        self.split = split
        try:
            self.meta = json.loads((self.path / "meta.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise MuseformerError(f"{self.path} is not a prepared corpus (no readable meta.json); "
                                  "run 'museformer prepare' first") from None
        if self.meta.get("format") != FORMAT or self.meta.get("format_version") != FORMAT_VERSION:
            raise MuseformerError(f"{self.path}: unsupported corpus format {self.meta.get('format')!r} "
                                  f"version {self.meta.get('format_version')!r}")
        expected = self.meta["splits"][split]
        try:
            self.offsets = np.load(self.path / f"{split}.offsets.npy")
            self.names = json.loads((self.path / f"{split}.songs.json").read_text(encoding="utf-8"))
            size = (self.path / f"{split}.tokens.bin").stat().st_size
        except (OSError, ValueError) as e:
            raise MuseformerError(f"{self.path}: cannot read the {split} shard ({e})") from None
        # files are replaced one by one; a run killed between two renames is caught here
        if (len(self.names) != expected["songs"] or len(self.offsets) != expected["songs"] + 1
                or int(self.offsets[-1]) != expected["tokens"] or size != expected["tokens"] * TOKEN_DTYPE.itemsize):
            raise MuseformerError(f"{self.path}: the {split} shard does not match meta.json "
                                  "(an interrupted prepare?); run 'museformer prepare' again")
        self.tokens = (np.memmap(self.path / f"{split}.tokens.bin", dtype=TOKEN_DTYPE, mode="r")
                       if size else np.zeros(0, TOKEN_DTYPE))

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> Song:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"song {i} outside the {self.split} split ({n} songs)")
        i %= n
        ids = np.asarray(self.tokens[self.offsets[i] : self.offsets[i + 1]], dtype=np.int64)
        return Song(self.names[i], ids, self.vocab)

    def __iter__(self) -> Iterator[Song]:
        return (self[i] for i in range(len(self)))

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per song (int64, no BOS/EOS)."""
        return np.diff(self.offsets)

    @cached_property
    def tokenizer(self):
        """The tokenizer that produced this corpus (from ``tokenizer.json``)."""
        from museformer.tokenizer import Tokenizer

        return Tokenizer.load(self.path / "tokenizer.json")

    @property
    def vocab(self):
        """The vocabulary of the ids."""
        return self.tokenizer.vocab

    def __repr__(self) -> str:
        return f"Corpus({str(self.path)!r}, split={self.split!r}: {len(self)} songs, {int(self.offsets[-1]):,} tokens)"


def default_workers() -> int:
    """Worker processes the CLI uses by default: the CPU cores, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


def open_split(data_dir: str | Path, split: str) -> Corpus:
    """``Corpus(data_dir, split)``, with any unreadable file reported as one ``MuseformerError``."""
    try:
        return Corpus(data_dir, split=split)
    except MuseformerError:
        raise
    except (OSError, ValueError, KeyError) as e:
        raise MuseformerError(f"cannot read split {split!r} of prepared data {data_dir}: {e}") from None


# ---------------------------------------------------------------------------------------------
# batches: songs -> micro-batches of similar length under a token budget
# ---------------------------------------------------------------------------------------------
def input_lengths(corpus: Corpus, max_len: int) -> np.ndarray:
    """Input tokens per song after truncation: BOS + song tokens, at most ``max_len``."""
    return np.minimum(np.asarray(corpus.lengths, dtype=np.int64) + 1, max_len)


def pack_by_length(songs: np.ndarray, lengths: np.ndarray, batch_tokens: int) -> list[np.ndarray]:
    """Greedy packing of ``songs`` (already in ascending length) while ``songs * longest <= batch_tokens``.

    A song longer than the budget forms a batch of its own.
    """
    batches: list[np.ndarray] = []
    current: list[int] = []
    for i in songs:  # ascending length, so the newcomer is the longest
        if current and int(lengths[i]) * (len(current) + 1) > batch_tokens:
            batches.append(np.array(current, dtype=np.int64))
            current = []
        current.append(int(i))
    if current:
        batches.append(np.array(current, dtype=np.int64))
    return batches


def plan_epoch(lengths: np.ndarray, batch_tokens: int, seed: int, epoch: int, pool: int = 1024) -> list[np.ndarray]:
    """Song indices of every micro-batch of one epoch, shuffled; a pure function of its arguments.

    Songs are shuffled, cut into pools of ``pool`` songs, sorted by length inside each pool (so a
    batch holds songs of similar length and little padding) and packed (``pack_by_length``); then
    the batch order is shuffled.

    Args:
        lengths: per song, the number of input tokens it will have (after truncation).
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    batches: list[np.ndarray] = []
    for start in range(0, len(order), pool):
        chunk = order[start:start + pool]
        batches += pack_by_length(chunk[np.argsort(lengths[chunk], kind="stable")], lengths, batch_tokens)
    return [batches[k] for k in rng.permutation(len(batches))]


def evaluation_batches(lengths: np.ndarray, batch_tokens: int) -> list[np.ndarray]:
    """Deterministic batches for evaluation: all songs sorted by length, packed under the budget."""
    return pack_by_length(np.argsort(lengths, kind="stable"), lengths, batch_tokens)


class BatchOrder:
    """The endless sequence of micro-batches over epochs: ``order[g] -> (epoch, song indices)``."""

    def __init__(self, lengths: np.ndarray, batch_tokens: int, seed: int) -> None:
        if len(lengths) == 0:
            raise MuseformerError("the training split has no songs")
        self.lengths, self.batch_tokens, self.seed = lengths, batch_tokens, seed
        self._epoch, self._start, self._plan = 0, 0, plan_epoch(lengths, batch_tokens, seed, 0)

    def __getitem__(self, index: int) -> tuple[int, np.ndarray]:
        if index < self._start:  # rewind (rare): replay the plans from epoch 0
            self._epoch, self._start = 0, 0
            self._plan = plan_epoch(self.lengths, self.batch_tokens, self.seed, 0)
        while index >= self._start + len(self._plan):
            self._start += len(self._plan)
            self._epoch += 1
            self._plan = plan_epoch(self.lengths, self.batch_tokens, self.seed, self._epoch)
        return self._epoch, self._plan[index - self._start]


def collate(examples: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Right-pad songs to the longest: ids and targets with ``PAD_ID``, bar and onset ids with 0.

    Shapes: each value ``(B, T)`` int64, ``T`` = the longest example.
    """
    import torch  # here, so that prepare's worker processes never import torch

    longest = max(len(e["input_ids"]) for e in examples)
    out = {}
    for key, fill in (("input_ids", PAD_ID), ("target_ids", PAD_ID), ("bar_ids", 0), ("onset_ids", 0)):
        batch = np.full((len(examples), longest), fill, dtype=np.int64)
        for row, e in enumerate(examples):
            batch[row, : len(e[key])] = e[key]
        out[key] = torch.from_numpy(batch)
    return out


def corpus_batch(corpus: Corpus, songs: np.ndarray, max_len: int, crop_rng: np.random.Generator | None = None
                 ) -> dict[str, torch.Tensor]:
    """One collated batch of ``corpus`` songs cut to ``max_len`` inputs; with ``crop_rng`` each longer
    song is a random bar-aligned window (``Song.crop_start``) instead of its beginning."""
    examples = []
    for i in songs:
        song = corpus[int(i)]
        start = 0 if crop_rng is None else song.crop_start(max_len, crop_rng)
        examples.append(song.model_inputs(max_len, start))
    return collate(examples)

