"""Piano-roll pictures and audio rendering: files are written, and missing tools give clear errors."""

import shutil

import pytest
import symusic

from museformer.errors import MuseformerError
from museformer.render import find_soundfont, piano_roll, render_audio


def _song() -> symusic.Score:
    score = symusic.Score(480)
    piano = symusic.Track(program=0)
    drums = symusic.Track(program=0, is_drum=True)
    for i in range(16):
        piano.notes.append(symusic.Note(i * 240, 240, 60 + (i * 5) % 12, 80))
        drums.notes.append(symusic.Note(i * 240, 60, 36, 90))
    score.tracks.append(piano)
    score.tracks.append(drums)
    return score


def test_piano_roll_writes_png(tmp_path):
    """A piano roll is a PNG file written at the requested path, with no temp files left behind."""
    pytest.importorskip("matplotlib")
    out = piano_roll(_song(), tmp_path / "roll.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["roll.png"]


def test_piano_roll_empty_score(tmp_path):
    """An empty score still draws (an empty roll), it does not crash."""
    pytest.importorskip("matplotlib")
    assert piano_roll(symusic.Score(480), tmp_path / "empty.png").exists()


def test_missing_soundfont_names_it(tmp_path):
    """A soundfont path that does not exist is reported by name."""
    with pytest.raises(MuseformerError, match="nope.sf2"):
        find_soundfont(tmp_path / "nope.sf2")


def test_audio_without_fluidsynth_says_what_to_install(tmp_path, monkeypatch):
    """Without FluidSynth, rendering fails with one message saying what to install."""
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MuseformerError, match="apt-get install fluidsynth"):
        render_audio(_song(), tmp_path / "song.wav")


@pytest.mark.skipif(shutil.which("fluidsynth") is None or find_soundfont() is None,
                    reason="FluidSynth and a GM soundfont are not installed")
def test_audio_renders_wav(tmp_path):
    """With FluidSynth and a soundfont, a non-silent WAV file is written."""
    out = render_audio(_song(), tmp_path / "song.wav", sample_rate=22050)
    data = out.read_bytes()
    assert data[:4] == b"RIFF" and data[8:12] == b"WAVE"
    assert len(data) > 22050  # more than a quarter second of 16-bit stereo
    assert any(b != 0 for b in data[1000:5000])
