"""Turning a song into something to look at and listen to: a piano-roll PNG and a WAV file.

This module owns presentation only; it knows symusic Scores, not tokens or models.

- ``piano_roll(score, path)``: one coloured lane of notes per track over time in bars, written as PNG
  (matplotlib, an optional dependency: ``pip install matplotlib``).
- ``render_audio(score, path)``: synthesises a WAV with the FluidSynth program and a General MIDI
  soundfont found on disk (Debian: ``apt-get install fluidsynth fluid-soundfont-gm`` or
  ``timgm6mb-soundfont``), or the one given by ``soundfont=`` / ``$MUSEFORMER_SOUNDFONT``. When either
  is missing it raises ``MuseformerError`` saying what to install (both, when both are missing).
- ``render_file(midi, png=True, wav=True)``: both for any MIDI file on disk (``museformer render``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import symusic

from museformer.errors import MuseformerError, WriteError
from museformer.files import atomic_open, atomic_path, check_output_path, midi_bytes, write_bytes_atomic

SOUNDFONT_CANDIDATES = (
    "/usr/share/sounds/sf2/FluidR3_GM.sf2",
    "/usr/share/sounds/sf2/default-GM.sf2",
    "/usr/share/sounds/sf2/TimGM6mb.sf2",
    "/usr/share/sounds/sf3/default-GM.sf3",
    "/usr/share/soundfonts/default.sf2",
    "/usr/share/soundfonts/FluidR3_GM.sf2",
)
FLUIDSYNTH_HELP = (
    "rendering audio needs the FluidSynth program: install it (Debian/Ubuntu: `apt-get install "
    "fluidsynth fluid-soundfont-gm`, macOS: `brew install fluid-synth`)"
)
SOUNDFONT_HELP = (
    "no General MIDI soundfont found: install one (Debian/Ubuntu: `apt-get install fluid-soundfont-gm` "
    "or `timgm6mb-soundfont`) or pass --soundfont FILE.sf2 (or set MUSEFORMER_SOUNDFONT)"
)


def find_soundfont(soundfont: str | os.PathLike | None = None) -> Path | None:
    """The soundfont to use: the argument, else ``$MUSEFORMER_SOUNDFONT``, else a system GM font."""
    if soundfont is not None:
        if not Path(soundfont).is_file():
            raise MuseformerError(f"soundfont {soundfont} does not exist")
        return Path(soundfont)
    for candidate in (os.environ.get("MUSEFORMER_SOUNDFONT"), *SOUNDFONT_CANDIDATES):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def find_fluidsynth() -> str | None:
    """The FluidSynth program on ``PATH`` (None when it is not installed)."""
    return shutil.which("fluidsynth")


def _check_wav(path: Path, target: Path) -> None:
    """Refuse a WAV file whose RIFF header promises more bytes than the file holds (a short write)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        header = f.read(12)
    if len(header) < 12 or header[:4] != b"RIFF" or header[8:12] != b"WAVE":
        raise WriteError(f"cannot write {target}: fluidsynth did not produce a WAV file")
    declared = int.from_bytes(header[4:8], "little") + 8
    if declared > size:
        raise WriteError(f"cannot write {target}: only {size} of {declared} bytes reached the disk (disk full?)")


def render_audio(
    score: symusic.Score, path: str | os.PathLike, soundfont: str | os.PathLike | None = None,
    sample_rate: int = 44100,
) -> Path:
    """Synthesise ``score`` to a 16-bit stereo WAV at ``path`` (written atomically, its length checked).

    Raises:
        MuseformerError: the soundfont given does not exist, FluidSynth or a soundfont is missing
            (one message naming everything that is missing), or FluidSynth failed.
    """
    # the soundfont the user named is checked first: a wrong path is their mistake to fix, and the
    # message names it whether or not FluidSynth is installed
    font = find_soundfont(soundfont)
    fluidsynth = find_fluidsynth()
    missing = ([] if fluidsynth is not None else [FLUIDSYNTH_HELP]) + ([] if font is not None else [SOUNDFONT_HELP])
    if missing:
        raise MuseformerError("; ".join(missing))
    path = Path(path)
    with atomic_path(path, check=lambda tmp: _check_wav(tmp, path)) as tmp:
        midi = tmp.with_suffix(".mid")
        try:
            write_bytes_atomic(midi, midi_bytes(score))
            # -n: no MIDI input, -i: no shell, -F: render to this file, -T: as WAV
            done = subprocess.run(
                [fluidsynth, "-ni", "-q", "-r", str(sample_rate), "-T", "wav", "-F", str(tmp), str(font), str(midi)],
                capture_output=True, text=True, timeout=600,
            )
        finally:
            midi.unlink(missing_ok=True)
        if done.returncode != 0 or tmp.stat().st_size == 0:
            raise MuseformerError(f"fluidsynth failed to render {path}: {done.stderr.strip()[-300:]}")
    return path


def render_file(
    midi: str | os.PathLike, *, png: str | os.PathLike | bool | None = None,
    wav: str | os.PathLike | bool | None = None, soundfont: str | os.PathLike | None = None,
) -> dict[str, Path | str]:
    """Render any MIDI file: a piano-roll PNG and/or a WAV next to it (or at the paths given).

    Args:
        midi: the MIDI file.
        png, wav: True = ``SONG.png`` / ``SONG.wav`` next to the MIDI file; a path = there;
            None/False = not this one. At least one must be asked for.
        soundfont: General MIDI soundfont for the WAV (default: ``find_soundfont``).

    Returns:
        ``{"png": path, "wav": path}`` for what was written and ``{"png_error": ..., ...}`` for what
        could not be (one failing output never costs the other).

    Raises:
        MuseformerError: the MIDI file cannot be read, or neither output was asked for.
    """
    midi = Path(midi)
    if not png and not wav:
        raise MuseformerError("render: ask for --png and/or --wav")
    targets = {what: (midi.with_suffix(f".{what}") if value is True else Path(value))
               for what, value in (("png", png), ("wav", wav)) if value}
    for target in targets.values():
        check_output_path(target, "file")
    if not midi.is_file():
        raise MuseformerError(f"{midi}: no such MIDI file")
    try:
        score = symusic.Score(str(midi))
    except Exception as e:  # symusic raises RuntimeError / ValueError for files that are not MIDI
        raise MuseformerError(f"{midi}: cannot read as MIDI ({e})") from None
    done: dict[str, Path | str] = {}
    for what, target in targets.items():
        try:
            if what == "png":
                done["png"] = piano_roll(score, target, title=midi.name)
            else:
                done["wav"] = render_audio(score, target, soundfont=soundfont)
        except MuseformerError as e:
            done[f"{what}_error"] = str(e)
    return done


def _track_label(track: symusic.core.TrackTick) -> str:
    return "drums" if track.is_drum else f"program {track.program}"


def piano_roll(score: symusic.Score, path: str | os.PathLike, title: str | None = None) -> Path:
    """Draw ``score`` as a piano roll (time in bars, one colour per track) and save it as PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.collections import PolyCollection
    except ImportError:
        raise MuseformerError("drawing a piano roll needs matplotlib: pip install matplotlib") from None
    score = score.to("tick")
    tpq = score.ticks_per_quarter
    # bar length from the first time signature (4/4 when none): enough for a readable x axis
    ts = score.time_signatures[0] if len(score.time_signatures) else None
    bar_ticks = tpq * 4 * (ts.numerator / ts.denominator if ts else 1.0)
    fig, ax = plt.subplots(figsize=(14, 5), dpi=100)
    colours = plt.get_cmap("tab10")
    handles, low, high = [], 127, 0
    for index, track in enumerate(t for t in score.tracks if len(t.notes)):
        notes = track.notes.numpy()
        x0 = notes["time"] / bar_ticks
        x1 = (notes["time"] + np.maximum(notes["duration"], 1)) / bar_ticks
        y = notes["pitch"].astype(float)
        low, high = min(low, int(y.min())), max(high, int(y.max()))
        boxes = np.stack(
            [np.stack([x0, y - 0.4], 1), np.stack([x1, y - 0.4], 1),
             np.stack([x1, y + 0.4], 1), np.stack([x0, y + 0.4], 1)], axis=1
        )
        colour = colours(index % 10)
        ax.add_collection(PolyCollection(boxes, facecolors=colour, edgecolors="none", alpha=0.85))
        handles.append(plt.Line2D([], [], color=colour, lw=6, label=_track_label(track)))
    end = max(score.end() / bar_ticks, 1.0)
    ax.set_xlim(0, end)
    ax.set_ylim(max(low - 3, 0), min(high + 3, 128)) if high >= low else ax.set_ylim(0, 128)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("bar")
    ax.set_ylabel("pitch")
    for bar in range(int(end) + 1):
        ax.axvline(bar, color="0.85", lw=0.5, zorder=0)
    if handles:
        ax.legend(handles=handles, loc="upper right", fontsize=8)
    ax.set_title(title or f"{score.note_num()} notes, {len(score.tracks)} tracks")
    fig.tight_layout()
    path = Path(path)
    try:
        with atomic_open(path) as f:
            fig.savefig(f, format="png")
    finally:
        plt.close(fig)
    return path
