"""Structure analysis of song collections: the ``analyze`` and ``evaluate --structure`` commands.

This module owns reading songs from wherever they are (a folder of MIDI files, token text files in
the official dump format, a prepared corpus), running the pure metrics of ``museformer.metrics`` over
them in parallel worker processes, and writing reports (CSV, PNG plots, JSON). The definitions of
the metrics live in ``museformer.metrics``; this module only gathers and presents them.

Inputs (``find_songs``):

- a prepared corpus folder (it has ``meta.json``): the songs of one split, or of all splits;
- a folder: every ``*.mid`` / ``*.midi`` (encoded with the tokenizer preset, ``lmd6`` by default)
  or every ``*.txt`` token dump (one song per line, tokens separated by spaces) under it,
  recursively; a ``.txt`` file is a song file only when every line is a REMIGEN token stream
  (``is_token_song``), and a folder holding both kinds needs ``only="midi"`` or ``"tokens"``;
- a single MIDI or ``.txt`` file.

Validity (decodes with zero skipped tokens) is measured for token inputs only; MIDI files are
music already, so it is reported as undefined (``null``) for them.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from museformer import metrics
from museformer.errors import MuseformerError
from museformer.files import atomic_open, check_output_path, write_text_atomic

MIDI_SUFFIXES = (".mid", ".midi")
TOKEN_SUFFIXES = (".txt",)
PAPER_FINE_OFFSETS = (1, 2, 4, 8, 12, 16, 24, 32)
TOKENIZER_PRESETS = ("lmd6", "general")  # "general": Tokenizer() defaults (REMIGEN2, general vocab, no normalisation)
CHUNK_SONGS = 16
MIN_SONG_SHARE = 0.1  # top intervals / suggestions use only intervals that >= 10% of the songs reach


# ---------------------------------------------------------------------------------------------
# finding songs
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SongSource:
    """Where one song comes from. ``kind``: ``"midi"`` (``path``), ``"tokens"`` (``text``: one
    dump line) or ``"corpus"`` (``path`` = prepared folder, ``split``, ``index``)."""

    kind: str
    name: str
    path: str = ""
    text: str = ""
    split: str = ""
    index: int = -1


TOKEN_RE = re.compile(r"[sobtipdv]-\d+")  # the REMIGEN token kinds: s-, o-, b-, t-, i-, p-, d-, v-
SONG_KINDS = ("midi", "tokens")


def is_token_song(tokens: Sequence[str]) -> bool:
    """Whether one line of a ``.txt`` file is a song: REMIGEN tokens only, at least one bar and one pitch."""
    return (
        bool(tokens)
        and all(TOKEN_RE.fullmatch(t) for t in tokens)
        and "b-1" in tokens
        and any(t.startswith("p-") for t in tokens)
    )


def _token_file_songs(f: Path, name: str) -> list[SongSource] | None:
    """The songs of a token dump, or None when the file is not one (vocabulary lists, egg-info, notes)."""
    from museformer.tokenizer import read_token_lines

    try:
        lines = read_token_lines(f)
    except MuseformerError:
        return None
    if not lines or not all(is_token_song(t) for t in lines):
        return None
    return [SongSource("tokens", f"{name}:{i + 1}", text=" ".join(t)) for i, t in enumerate(lines)]


def find_songs(path: str | Path, split: str = "all", only: str | None = None) -> list[SongSource]:
    """Every song under ``path`` (see the module docstring), in a stable (sorted) order.

    Only songs are read: MIDI files by extension (they are parsed later, and a file that does not
    parse is reported as failed), and ``.txt`` files whose every line is a REMIGEN token stream (at
    least one ``b-1`` and one pitch); other ``.txt`` files (vocabularies, package metadata, notes)
    are not songs and are passed over.

    Args:
        path: a folder, a MIDI or token file, or a prepared corpus folder.
        split: with a prepared corpus, ``"all"`` or one split.
        only: ``"midi"`` or ``"tokens"``: read only that kind. A folder that holds both kinds (for
            example MIDI files next to token dumps of the same songs) needs it, so that no song is
            counted twice without the user choosing.

    Raises:
        MuseformerError: ``path`` does not exist, holds no songs, or holds both kinds without ``only``.
    """
    if only is not None and only not in SONG_KINDS:
        raise MuseformerError(f"only must be one of {', '.join(SONG_KINDS)}, got {only!r}")
    path = Path(path)
    if not path.exists():
        raise MuseformerError(f"{path} does not exist")
    if path.is_dir() and (path / "meta.json").exists():
        return _corpus_songs(path, split)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    found: dict[str, list[SongSource]] = {"midi": [], "tokens": []}
    passed_over = 0
    for f in files:
        name = f.name if f == path else f.relative_to(path).as_posix()
        suffix = f.suffix.lower()
        if suffix in MIDI_SUFFIXES and only in (None, "midi"):
            found["midi"].append(SongSource("midi", name, path=str(f)))
        elif suffix in TOKEN_SUFFIXES and only in (None, "tokens"):
            songs = _token_file_songs(f, name)
            if songs is None:
                passed_over += 1
            else:
                found["tokens"].extend(songs)
    if found["midi"] and found["tokens"]:
        raise MuseformerError(
            f"{path} holds both MIDI files ({len(found['midi'])}) and token songs ({len(found['tokens'])}); "
            "choose one kind with --only midi or --only tokens"
        )
    sources = found["midi"] or found["tokens"]
    if not sources:
        kinds = {"midi": "MIDI (.mid/.midi)", "tokens": "token (.txt)"}
        wanted = kinds[only] if only else "MIDI (.mid/.midi) or token (.txt)"
        extra = f" ({passed_over} .txt file(s) are not token songs)" if passed_over else ""
        raise MuseformerError(f"{path}: no {wanted} songs found{extra}, and not a prepared corpus")
    return sources


def _corpus_songs(path: Path, split: str) -> list[SongSource]:
    from museformer.data import SPLITS, Corpus

    if split != "all" and split not in SPLITS:
        raise MuseformerError(f"unknown split {split!r}; choose from all, {', '.join(SPLITS)}")
    sources = []
    for s in SPLITS if split == "all" else (split,):
        corpus = Corpus(path, s)
        sources.extend(SongSource("corpus", f"{s}/{n}", path=str(path), split=s, index=i)
                       for i, n in enumerate(corpus.names))
    if not sources:
        raise MuseformerError(f"{path}: the prepared corpus has no songs in split {split!r}")
    return sources


# ---------------------------------------------------------------------------------------------
# per-song work (runs in worker processes)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class SongResult:
    """What one song gave: its interval statistics and metrics, or why it failed."""

    name: str
    stats: metrics.IntervalStats | None = None
    values: dict | None = None
    skipped: int | None = None  # tokens the decoder skipped (token inputs only)
    error: str | None = None


def make_tokenizer(preset: str):
    """The tokenizer that encodes MIDI inputs: ``"lmd6"`` (the paper's LMD setting) or ``"general"``."""
    from museformer.tokenizer import Tokenizer

    if preset not in TOKENIZER_PRESETS:
        raise MuseformerError(f"unknown tokenizer preset {preset!r}; choose from {', '.join(TOKENIZER_PRESETS)}")
    return Tokenizer() if preset == "general" else Tokenizer.preset(preset)


def load_song(source: SongSource, tokenizer, corpora: dict) -> tuple[metrics.SongNotes, int | None]:
    """The notes of one song and, for token inputs, how many tokens its decoding skips."""
    if source.kind == "midi":
        return metrics.notes_from_tokens(tokenizer.encode_file(source.path)), None
    if source.kind == "tokens":
        tokens = source.text.split()
        return metrics.notes_from_tokens(tokens), tokenizer.decode_with_report(tokens)[1].skipped
    if source.kind == "corpus":
        from museformer.data import Corpus

        key = (source.path, source.split)
        if key not in corpora:
            corpora[key] = Corpus(source.path, source.split)
        corpus = corpora[key]
        ids = corpus[source.index].ids
        return metrics.notes_from_ids(ids, corpus.vocab), corpus.tokenizer.decode_with_report(ids)[1].skipped
    raise ValueError(f"unknown song source kind {source.kind!r}")


def _analyze_chunk(sources: Sequence[SongSource], max_interval: int, preset: str) -> list[SongResult]:
    tokenizer = make_tokenizer(preset)
    corpora: dict = {}  # prepared corpora opened by this chunk
    results = []
    for source in sources:
        try:
            song, skipped = load_song(source, tokenizer, corpora)
        except (MuseformerError, ValueError, OSError) as e:
            results.append(SongResult(source.name, error=str(e)))
            continue
        results.append(SongResult(source.name, metrics.song_interval_stats(song, max_interval),
                                  metrics.song_metrics(song), skipped))
    return results


def analyze_songs(
    sources: Sequence[SongSource],
    *,
    max_interval: int = metrics.DEFAULT_MAX_INTERVAL,
    workers: int = 1,
    preset: str = "lmd6",
    progress: bool = True,
    desc: str = "analyzing",
) -> list[SongResult]:
    """Statistics of every song, in the order of ``sources`` (workers > 1: that many processes)."""
    from tqdm.auto import tqdm

    if max_interval < 1:
        raise MuseformerError(f"--max-interval must be at least 1, got {max_interval}")
    if workers < 1:
        raise MuseformerError(f"--workers must be at least 1, got {workers}")
    make_tokenizer(preset)  # fail early on a bad preset
    chunks = [sources[i : i + CHUNK_SONGS] for i in range(0, len(sources), CHUNK_SONGS)]
    results: list[SongResult] = []
    with tqdm(total=len(sources), unit="song", desc=desc, disable=not progress) as bar:
        if workers == 1 or len(chunks) == 1:
            for chunk in chunks:
                results.extend(_analyze_chunk(chunk, max_interval, preset))
                bar.update(len(chunk))
        else:
            from museformer.workers import process_pool

            with process_pool(workers) as pool:  # its workers exit when this process dies
                # map keeps the input order, so the report does not depend on scheduling
                for chunk, done in zip(chunks, pool.map(_analyze_chunk, chunks, [max_interval] * len(chunks),
                                                        [preset] * len(chunks))):
                    results.extend(done)
                    bar.update(len(chunk))
    return results


# ---------------------------------------------------------------------------------------------
# summaries of a set of songs
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class SetSummary:
    """A set of songs: interval statistics summed over songs, mean metrics, validity, failures."""

    path: str
    songs: int
    stats: metrics.IntervalStats
    means: dict
    validity_rate: float  # NaN when no song was given as tokens
    failed: tuple[tuple[str, str], ...]

    def to_dict(self) -> dict:
        """JSON-ready (NaN -> None)."""
        return _clean({
            "path": self.path,
            "songs": self.songs,
            "failed": [{"song": n, "reason": r} for n, r in self.failed],
            "metrics": self.means,
            "validity_rate": self.validity_rate,
            "similarity_curve": self.stats.curve.tolist(),
            "songs_per_interval": self.stats.songs.tolist(),
            "pairs_per_interval": self.stats.pairs.tolist(),
        })


def summarize(path: str | Path, results: Sequence[SongResult], max_interval: int) -> SetSummary:
    """Combine per-song results; ``MuseformerError`` when no song could be read."""
    ok = [r for r in results if r.error is None]
    failed = tuple((r.name, r.error) for r in results if r.error is not None)
    if not ok:
        first = f" (first: {failed[0][0]}: {failed[0][1]})" if failed else ""
        raise MuseformerError(f"{path}: none of the {len(results)} songs could be read{first}")
    skipped = [r.skipped for r in ok if r.skipped is not None]
    return SetSummary(
        path=str(path),
        songs=len(ok),
        stats=metrics.combine((r.stats for r in ok), max_interval),
        means=metrics.mean_metrics([r.values for r in ok]),
        validity_rate=metrics.validity_rate(skipped),
        failed=failed,
    )


# ---------------------------------------------------------------------------------------------
# analyze
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class AnalysisReport:
    """What ``analyze`` found and wrote."""

    summary: SetSummary
    top_intervals: list[tuple[int, float]]
    suggested_fine_offsets: tuple[int, ...]
    files: tuple[str, ...]

    def text(self) -> str:
        """A few lines for the terminal."""
        s = self.summary
        top = ", ".join(f"{k} ({v:.3f})" for k, v in self.top_intervals)
        lines = [
            f"{s.songs} songs analysed ({len(s.failed)} failed) from {s.path}",
            f"most similar intervals (bars): {top}",
            f"suggested fine_offsets: {list(self.suggested_fine_offsets)} (the paper: {list(PAPER_FINE_OFFSETS)})",
            "wrote " + ", ".join(self.files),
        ]
        return "\n".join(lines)


def analyze(
    input_path: str | Path,
    out_dir: str | Path,
    *,
    max_interval: int = metrics.DEFAULT_MAX_INTERVAL,
    heatmaps: int = 0,
    workers: int = 1,
    preset: str = "lmd6",
    split: str = "all",
    progress: bool = True,
    only: str | None = None,
) -> AnalysisReport:
    """Bar-similarity analysis of a collection; writes its report into ``out_dir``.

    Files: ``similarity.csv`` (interval, similarity = L(k), songs, pairs, pair_mean),
    ``similarity.png`` (the curve, the paper's fine offsets marked), ``report.json`` (curve, top
    intervals, suggested fine offsets, mean metrics, failures) and, with ``heatmaps`` = N, the
    self-similarity matrices of the first N songs as ``heatmaps/NNN_<song>.png``.
    """
    if heatmaps < 0:
        raise MuseformerError(f"--heatmaps must be >= 0, got {heatmaps}")
    check_output_path(out_dir, "dir", what="report folder")
    sources = find_songs(input_path, split, only)
    results = analyze_songs(sources, max_interval=max_interval, workers=workers, preset=preset, progress=progress)
    summary = summarize(input_path, results, max_interval)
    curve = summary.stats.curve
    # intervals longer than most songs rest on a handful of songs: rank only well-supported ones
    min_songs = max(1, math.ceil(MIN_SONG_SHARE * summary.songs))
    supported = np.where(summary.stats.songs >= min_songs, curve, np.nan)
    top = [(k, float(curve[k - 1])) for k in metrics.top_intervals(supported, 10)]
    suggested = metrics.suggest_fine_offsets(supported)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = [write_curve_csv(out / "similarity.csv", summary.stats)]
    files.append(plot_curve(out / "similarity.png", {summary.path: curve}, title=f"Bar similarity ({summary.songs} songs)",
                            songs=summary.stats.songs))
    if heatmaps:
        tokenizer, corpora = make_tokenizer(preset), {}
        ok = [s for s, r in zip(sources, results) if r.error is None][:heatmaps]
        for i, source in enumerate(ok):
            song, _ = load_song(source, tokenizer, corpora)
            safe = re.sub(r"[^A-Za-z0-9._-]+", "_", source.name)[-80:]
            files.append(plot_heatmap(out / "heatmaps" / f"{i:03d}_{safe}.png", metrics.self_similarity(song), source.name))
    report = {
        "input": str(input_path),
        "max_interval": max_interval,
        "midi_tokenizer_preset": preset,
        "top_intervals": [{"interval": k, "similarity": v} for k, v in top],
        "suggested_fine_offsets": list(suggested),
        "suggestion_rule": "interval 1, plus the most similar local peaks (L(k) > L(k-1) and L(k) > L(k+1)), 8 at most",
        "min_songs_per_ranked_interval": min_songs,
        "paper_fine_offsets": list(PAPER_FINE_OFFSETS),
        **summary.to_dict(),
    }
    files.append(write_json(out / "report.json", report))
    return AnalysisReport(summary, top, suggested, tuple(files))


# ---------------------------------------------------------------------------------------------
# evaluate --structure
# ---------------------------------------------------------------------------------------------
TABLE_ROWS = (
    ("songs", "songs"),
    ("bars", "bars per song"),
    ("notes", "notes per song"),
    ("pitch_class_entropy", "pitch-class entropy (bits)"),
    ("pitch_range", "pitch range (semitones)"),
    ("groove_consistency", "groove consistency"),
    ("note_density", "note density (notes/bar)"),
    ("empty_bar_ratio", "empty-bar ratio"),
    ("validity_rate", "validity rate"),
)


def evaluate_structure(
    generated: str | Path,
    reference: str | Path,
    *,
    max_interval: int = metrics.DEFAULT_MAX_INTERVAL,
    workers: int = 1,
    preset: str = "lmd6",
    progress: bool = True,
    only: str | None = None,
) -> dict:
    """Objective metrics of generated songs next to a reference set, and their Similarity Error.

    Returns a JSON-ready dict: ``generated`` and ``reference`` (``SetSummary.to_dict``),
    ``similarity_error`` (``metrics.similarity_error`` over intervals 1..``max_interval``) and
    ``intervals``.
    """
    summaries = []
    for label, path in (("generated", generated), ("reference", reference)):
        results = analyze_songs(find_songs(path, only=only), max_interval=max_interval, workers=workers, preset=preset,
                                progress=progress, desc=label)
        summaries.append(summarize(path, results, max_interval))
    gen, ref = summaries
    se = metrics.similarity_error(gen.stats.curve, ref.stats.curve, max_interval)
    return _clean({"generated": gen.to_dict(), "reference": ref.to_dict(), "similarity_error": se,
                   "intervals": max_interval, "midi_tokenizer_preset": preset})


def format_table(report: dict) -> str:
    """The evaluation as a plain-text table (metric, generated, reference)."""
    gen, ref = report["generated"], report["reference"]

    def value(side: dict, key: str) -> str:
        v = side["songs"] if key == "songs" else side["validity_rate"] if key == "validity_rate" else side["metrics"][key]
        if v is None:
            return "n/a"
        return f"{v:d}" if isinstance(v, int) else f"{v:.4f}"

    width = max(len(label) for _, label in TABLE_ROWS) + 2
    lines = [f"{'metric':<{width}}{'generated':>12}{'reference':>12}", "-" * (width + 24)]
    lines += [f"{label:<{width}}{value(gen, key):>12}{value(ref, key):>12}" for key, label in TABLE_ROWS]
    se = report["similarity_error"]
    se_text = "n/a" if se is None else f"{se:.4f}"
    lines.append(f"{'similarity error (SE), k=1..' + str(report['intervals']):<{width}}{se_text:>12}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# writing files (atomically: temp file in the same folder, fsync, rename)
# ---------------------------------------------------------------------------------------------
def _atomic(path: Path, write: Callable) -> str:
    """Write through ``write(binary_file)``; every byte is checked before the file replaces ``path``."""
    with atomic_open(path) as f:
        write(f)
    return str(path)


def _clean(obj):
    """NaN -> None and numpy scalars -> Python numbers, recursively (strict JSON)."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return None if math.isnan(obj) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def write_json(path: str | Path, data: dict) -> str:
    """Write ``data`` as indented strict JSON (NaN written as null)."""
    text = json.dumps(_clean(data), indent=2, allow_nan=False) + "\n"
    write_text_atomic(path, text)
    return str(path)


def write_curve_csv(path: str | Path, stats: metrics.IntervalStats) -> str:
    """``interval,similarity,songs,pairs,pair_mean`` per interval (empty cells where undefined)."""
    def cell(v: float) -> str:
        return "" if math.isnan(v) else f"{v:.6f}"

    rows = ["interval,similarity,songs,pairs,pair_mean"]
    for k, (c, n, p, pm) in enumerate(zip(stats.curve, stats.songs, stats.pairs, stats.pair_curve), 1):
        rows.append(f"{k},{cell(c)},{n},{p},{cell(pm)}")
    text = "\n".join(rows) + "\n"
    write_text_atomic(path, text)
    return str(path)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MuseformerError("plots need matplotlib: pip install matplotlib") from None
    return plt


def plot_curve(path: str | Path, curves: dict[str, np.ndarray], title: str = "Bar similarity",
               songs: np.ndarray | None = None) -> str:
    """Plot similarity curves L(k) against the interval k; the paper's fine offsets are marked.

    ``songs`` (songs per interval), when given, is drawn as grey bars on a second axis.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4), dpi=120)
    if songs is not None:
        counts = ax.twinx()
        counts.bar(np.arange(1, len(songs) + 1), songs, color="0.6", alpha=0.25, width=0.8)
        counts.set_ylabel("songs with a pair at k", color="0.45")
        ax.set_zorder(counts.get_zorder() + 1)  # the curve above the count bars
        ax.patch.set_visible(False)
    for k in PAPER_FINE_OFFSETS:
        ax.axvline(k, color="0.85", lw=1, zorder=0)
    for label, curve in curves.items():
        x = np.arange(1, len(curve) + 1)
        ax.plot(x, curve, marker="o", ms=3, lw=1.2, label=label)
    n = max(len(c) for c in curves.values())
    ax.set_xticks([1] + list(range(4, n + 1, 4)))
    ax.set_xlim(0.5, n + 0.5)
    ax.set_xlabel("interval (bars); grey lines: the paper's fine offsets 1, 2, 4, 8, 12, 16, 24, 32")
    ax.set_ylabel("mean bar similarity L(k)")
    ax.set_title(title)
    if len(curves) > 1:
        ax.legend()
    fig.tight_layout()
    try:
        return _atomic(Path(path), lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)


def plot_heatmap(path: str | Path, similarity: np.ndarray, title: str) -> str:
    """Plot a song's bar x bar self-similarity matrix (blank where both bars are empty)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.8), dpi=120)
    from matplotlib.ticker import MaxNLocator

    n = len(similarity)
    image = ax.imshow(similarity, vmin=0, vmax=1, cmap="magma", origin="upper", interpolation="nearest",
                      extent=(0.5, n + 0.5, n + 0.5, 0.5))  # bars numbered from 1
    fig.colorbar(image, ax=ax, label="similarity (blank: both bars empty)")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("bar")
    ax.set_ylabel("bar")
    ax.set_title(title[-60:], fontsize=9)
    fig.tight_layout()
    try:
        return _atomic(Path(path), lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
