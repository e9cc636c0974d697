"""The bundled real corpus: scores that ship inside the ``music21`` package, exported to MIDI.

This module owns turning music21's corpus (MusicXML / Humdrum files, offline) into MIDI files that
``museformer.data.prepare`` encodes like any folder. It knows nothing about tokens.

Corpora (``CORPORA``):

- ``bach``: the Bach chorales (``music21.corpus.getComposer("bach")``, about 410 scores). When a
  score has parts named Soprano, Alto, Tenor and Bass, only those four are kept (instrumental
  doublings such as horns or oboes are dropped), so every chorale is the same four voices.
- ``folk``: every ABC tune of ``museformer.folk.FOLK_COLLECTIONS`` (4,435 tunes: O'Neill's 1850,
  Ryan's Mammoth Collection, Aird's Airs, ...), repeats and endings played out, the
  melody as lead (80) plus, where the tune has chord symbols, a piano (0) track of block chords;
  see ``museformer.folk``. One MIDI file per tune: ``COLLECTION/BOOK/NNNN.mid`` (NNNN = the tune's
  place in its book).
- ``essen``: the 8,514 songs of the Essen folksong collection, the same way (they have no repeats).
- ``music21-all``: every multi-part score of ``MULTI_PART_COMPOSERS`` (Bach plus Beethoven string
  quartets, Haydn, Mozart, Palestrina masses, Monteverdi madrigals, Trecento pieces, ...).

Instruments: each part gets a General MIDI program from the six "6tracks" families of the paper's
LMD setting, so the MIDI encodes with either preset and the tracks stay distinct: the top part
(soprano) is *lead* (80), the bottom part (bass) is *bass* (43, contrabass), the middle parts in
order are *strings* (48), *piano* (0), *guitar* (25) (a sixth or later middle part shares these, in
turn). Tempo marks and time signatures are those music21 writes from the score. A pickup (anacrusis)
measure is padded with rest at the start so that bar lines fall where the score has them.

``music21`` is an optional dependency (``pip install music21``); it is imported only here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from museformer.errors import MuseformerError, ParameterError
from museformer.files import write_midi_atomic, write_text_atomic
from museformer.folk import ESSEN_COLLECTIONS, FOLK_COLLECTIONS, FolkTune, export_tune, folk_tunes, read_abc_text

LEAD, STRINGS, PIANO, GUITAR, BASS = 80, 48, 0, 25, 43
MIDDLE_PROGRAMS = (STRINGS, PIANO, GUITAR)
CHORALE_VOICES = ("soprano", "alto", "tenor", "bass")
SCORE_SUFFIXES = (".mxl", ".xml", ".musicxml", ".krn")  # .rntxt analyses and .abc tunes are skipped
MULTI_PART_COMPOSERS = (
    "bach", "beethoven", "haydn", "mozart", "palestrina", "monteverdi", "trecento", "handel",
    "corelli", "cpebach", "schubert", "verdi", "weber", "ciconia", "luca",
)
CORPORA = {"bach": ("bach",), "music21-all": MULTI_PART_COMPOSERS, "folk": FOLK_COLLECTIONS,
           "essen": ESSEN_COLLECTIONS}
ABC_CORPORA = ("folk", "essen")
FAILED_LIST = "export-failed.tsv"  # in the MIDI folder: sources that failed, not retried on re-runs


def _music21():
    try:
        import music21
    except ImportError:
        raise MuseformerError("the bundled corpus needs music21: pip install music21") from None
    return music21


def part_programs(n_parts: int) -> list[int]:
    """GM programs for ``n_parts`` parts listed top to bottom (see the module docstring)."""
    if n_parts < 1:
        return []
    if n_parts == 1:
        return [LEAD]
    middle = [MIDDLE_PROGRAMS[i % len(MIDDLE_PROGRAMS)] for i in range(n_parts - 2)]
    return [LEAD, *middle, BASS]


def corpus_sources(name: str, limit: int | None = None) -> list[tuple[str, Path | FolkTune]]:
    """(relative MIDI name, score path or ABC tune) of every piece of corpus ``name``, sorted by name."""
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ParameterError("limit", f"must be a number of scores >= 1, got {limit!r}")
    if name not in CORPORA:
        raise MuseformerError(f"unknown corpus {name!r}; choose from {', '.join(CORPORA)}")
    music21 = _music21()
    root = Path(music21.common.getCorpusFilePath())
    if name in ABC_CORPORA:
        return _folk_sources(music21, root, CORPORA[name], limit)
    sources: list[tuple[str, Path]] = []
    for composer in CORPORA[name]:
        for path in music21.corpus.getComposer(composer):
            path = Path(path)
            if path.suffix.lower() not in SCORE_SUFFIXES:
                continue
            try:
                rel = path.relative_to(root).with_suffix(".mid").as_posix()
            except ValueError:
                rel = f"{composer}/{path.stem}.mid"
            sources.append((rel, path))
    # a few pieces ship in two formats (bwv277.krn and bwv277.mxl): keep one, by SCORE_SUFFIXES order
    best: dict[str, Path] = {}
    for rel, path in sorted(sources, key=lambda s: SCORE_SUFFIXES.index(s[1].suffix.lower())):
        best.setdefault(rel, path)
    sources = sorted(best.items())
    return sources[:limit] if limit is not None else sources


def _folk_sources(music21, root: Path, collections: Sequence[str], limit: int | None) -> list[tuple[str, FolkTune]]:
    """Every tune of every ABC book of ``collections``, named COLLECTION/BOOK/NNNN.mid."""
    sources: list[tuple[str, FolkTune]] = []
    for path in sorted(Path(p) for p in music21.corpus.getPaths(fileExtensions=("abc",))):
        try:
            rel = path.relative_to(root)
        except ValueError:
            continue
        if rel.parts[0] not in collections:
            continue
        book = rel.with_suffix("").as_posix()
        for i, tune in enumerate(folk_tunes(read_abc_text(path), rel.as_posix())):
            sources.append((f"{book}/{i + 1:04d}.mid", tune))
            if limit is not None and len(sources) >= limit:
                return sources
    return sources


def export_score(source: str | Path, dest: str | Path, *, chorale_voices: bool = True) -> None:
    """Export one music21 corpus score to a MIDI file (written atomically).

    Raises:
        MuseformerError: the score cannot be parsed, has fewer than two parts, or no notes.
    """
    music21 = _music21()
    from music21 import instrument, midi, stream
    from symusic import Score

    source, dest = Path(source), Path(dest)
    try:
        score = music21.converter.parse(source)
    except Exception as e:  # noqa: BLE001 - music21 raises many types for unreadable scores
        raise MuseformerError(f"{source}: music21 cannot parse it ({type(e).__name__}: {e})") from None
    if not isinstance(score, stream.Score):
        raise MuseformerError(f"{source}: not a single score (an opus or a fragment)")
    parts = list(score.parts)
    if chorale_voices:
        named = {(p.partName or "").strip().lower(): p for p in parts}
        if all(v in named for v in CHORALE_VOICES):
            keep = [named[v] for v in CHORALE_VOICES]
            for p in parts:
                if p not in keep:
                    score.remove(p)
            parts = keep
    if len(parts) < 2:
        raise MuseformerError(f"{source}: fewer than two parts")
    for part, program in zip(parts, part_programs(len(parts))):
        for old in list(part.recurse().getElementsByClass(instrument.Instrument)):
            old.activeSite.remove(old)
        inst = instrument.Instrument()
        inst.midiProgram = program
        inst.partName = part.partName
        part.insert(0, inst)
    first = parts[0].getElementsByClass(stream.Measure).first()
    pickup_pad = float(first.paddingLeft) if first is not None else 0.0
    try:
        data = midi.translate.music21ObjectToMidiFile(score).writestr()
    except Exception as e:  # noqa: BLE001
        raise MuseformerError(f"{source}: music21 cannot export it to MIDI ({type(e).__name__}: {e})") from None

    midi_score = Score.from_midi(data)
    if pickup_pad > 0:
        # shift the music right by the missing part of the pickup bar; meta events stay at 0
        shift = round(pickup_pad * midi_score.ticks_per_quarter)
        midi_score = midi_score.shift_time(shift)
        for events in (midi_score.tempos, midi_score.time_signatures, midi_score.key_signatures):
            for event in events:
                if event.time == shift:
                    event.time = 0
    # music21 leaves an empty conductor track and repeats each part's time signatures
    midi_score.tracks = [t for t in midi_score.tracks if t.note_num() > 0]
    seen, signatures = set(), []
    for ts in midi_score.time_signatures:
        if (ts.time, ts.numerator, ts.denominator) not in seen:
            seen.add((ts.time, ts.numerator, ts.denominator))
            signatures.append(ts)
    midi_score.time_signatures = signatures
    if midi_score.note_num() == 0:
        raise MuseformerError(f"{source}: no notes")
    write_midi_atomic(midi_score, dest)


def _export_many(jobs: Sequence[tuple[str | FolkTune, str, bool]]) -> list[tuple[str, str]]:
    """Export (source, dest, chorale_voices) jobs; returns (dest, error) for the failures."""
    failed = []
    for source, dest, voices in jobs:
        try:
            if isinstance(source, FolkTune):
                export_tune(source, dest)
            else:
                export_score(source, dest, chorale_voices=voices)
        except MuseformerError as e:
            failed.append((dest, str(e)))
        except Exception as e:  # noqa: BLE001 - one bad score must not stop the corpus
            failed.append((dest, f"{source}: {type(e).__name__}: {e}"))
    return failed


@dataclass(frozen=True)
class ExportReport:
    """What ``export_corpus`` did: MIDI files written now, already present, and failures."""

    midi_dir: Path
    written: int
    existing: int
    failed: tuple[tuple[str, str], ...]  # (relative MIDI name, reason), this run's and earlier runs'
    failed_before: int = 0  # how many of ``failed`` an earlier run recorded (not retried)

    @property
    def failed_list(self) -> Path:
        return self.midi_dir / FAILED_LIST


def read_failed_list(midi_dir: Path) -> dict[str, str]:
    """The failures an earlier export recorded in ``midi_dir/FAILED_LIST`` (relative name -> reason)."""
    path = Path(midi_dir) / FAILED_LIST
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        rel, _, why = line.partition("\t")
        if rel:
            out[rel] = why
    return out


def export_corpus(
    name: str,
    midi_dir: str | Path,
    *,
    workers: int = 1,
    limit: int | None = None,
    progress: bool = True,
) -> ExportReport:
    """Export corpus ``name`` to ``midi_dir`` (one ``.mid`` per piece, mirroring music21's folders).

    Files already present are kept (exports are atomic, so a present file is complete), which makes
    re-running cheap and keeps their modification times, so ``prepare`` reuses their encodings.
    Pieces that fail are listed in ``midi_dir/export-failed.tsv`` (name, reason) and not tried again
    by a re-run (delete the list to retry them); they are reported either way.

    Args:
        name: a key of ``CORPORA``.
        midi_dir: output folder.
        workers: worker processes (1 exports in this process).
        limit: export only the first ``limit`` pieces in name order (tests, quick tries).
        progress: show a tqdm progress bar.
    """
    from tqdm.auto import tqdm

    from museformer.files import check_output_path

    midi_dir = check_output_path(Path(midi_dir), "dir", what="MIDI folder")
    sources = corpus_sources(name, limit)
    known_failed = read_failed_list(midi_dir)
    voices = name == "bach"
    jobs = [(src, str(midi_dir / rel), voices) for rel, src in sources
            if rel not in known_failed and not (midi_dir / rel).exists()]
    before = {rel: known_failed[rel] for rel, _ in sources if rel in known_failed}
    existing = len(sources) - len(jobs) - len(before)
    chunks = [jobs[i : i + 8] for i in range(0, len(jobs), 8)]
    failed: list[tuple[str, str]] = []
    try:
        with tqdm(total=len(jobs), unit="piece", desc=f"exporting {name}", disable=not progress or not jobs) as bar:
            if workers == 1:
                results = map(_export_many, chunks)
            else:
                from museformer.workers import process_pool

                pool = process_pool(workers)  # its workers exit when this process dies
                results = pool.map(_export_many, chunks)
            try:
                for chunk, chunk_failed in zip(chunks, results):
                    failed.extend(chunk_failed)
                    bar.update(len(chunk))
            finally:
                if workers != 1:
                    pool.shutdown(wait=True, cancel_futures=True)
    finally:  # record what failed so far, also when interrupted
        new = {Path(d).relative_to(midi_dir).as_posix(): why.replace("\n", " ") for d, why in failed}
        if new:
            merged = {**known_failed, **new}
            write_text_atomic(midi_dir / FAILED_LIST, "".join(f"{r}\t{w}\n" for r, w in sorted(merged.items())))
    failed_rel = tuple(sorted({**before, **new}.items()))
    return ExportReport(midi_dir, len(jobs) - len(failed), existing, failed_rel, len(before))
