"""Piano-roll pictures and audio rendering: files are written, and missing tools give clear errors."""

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
    """Without FluidSynth (PATH holds nothing), rendering fails with one message saying what to install."""
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MuseformerError, match="apt-get install fluidsynth"):
        render_audio(_song(), tmp_path / "song.wav")


def test_named_soundfont_is_checked_before_the_program(tmp_path, no_fluidsynth):
    """A --soundfont that does not exist is named even where FluidSynth is missing too."""
    with pytest.raises(MuseformerError, match="nope.sf2"):
        render_audio(_song(), tmp_path / "song.wav", soundfont=tmp_path / "nope.sf2")


def test_missing_program_and_soundfont_are_both_named(tmp_path, no_fluidsynth, monkeypatch):
    """With neither FluidSynth nor a soundfont, one message says to install both."""
    import museformer.render

    monkeypatch.delenv("MUSEFORMER_SOUNDFONT", raising=False)
    monkeypatch.setattr(museformer.render, "SOUNDFONT_CANDIDATES", ())
    with pytest.raises(MuseformerError, match="FluidSynth program.*no General MIDI soundfont"):
        render_audio(_song(), tmp_path / "song.wav")


def test_audio_renders_wav(tmp_path, fake_fluidsynth):
    """With FluidSynth and a soundfont (simulated), a WAV file is written, no temporary files left."""
    out = render_audio(_song(), tmp_path / "song.wav", sample_rate=22050)
    data = out.read_bytes()
    assert data[:4] == b"RIFF" and data[8:12] == b"WAVE" and len(data) > 100_000
    assert [p.name for p in tmp_path.iterdir()] == ["song.wav"]


def test_cut_wav_never_replaces_a_good_one(tmp_path, fake_fluidsynth, monkeypatch):
    """A WAV that reaches the disk short (its header promises more) is refused; the old file stays."""
    from museformer.errors import WriteError

    good = render_audio(_song(), tmp_path / "song.wav").read_bytes()
    monkeypatch.setenv("FAKE_FLUIDSYNTH_SHORT", "1")
    with pytest.raises(WriteError, match=r"song\.wav: only \d+ of \d+ bytes"):
        render_audio(_song(), tmp_path / "song.wav")
    assert (tmp_path / "song.wav").read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["song.wav"]


def test_short_png_write_is_refused(tmp_path, monkeypatch):
    """A piano roll whose bytes do not all reach the disk is an error and leaves no file."""
    pytest.importorskip("matplotlib")
    import museformer.files
    from museformer.errors import WriteError

    real = museformer.files._CountingFile.write

    def dropping(self, data):  # a full disk that says nothing: half of every write is lost
        n = real(self, data)
        self._f.truncate(max(self._f.tell() - len(data) // 2, 0))
        self._f.seek(0, 2)
        return n

    monkeypatch.setattr(museformer.files._CountingFile, "write", dropping)
    with pytest.raises(WriteError, match="roll.png"):
        piano_roll(_song(), tmp_path / "roll.png")
    assert list(tmp_path.iterdir()) == []


def test_render_file_and_cli(tmp_path, no_fluidsynth, capsys):
    """`museformer render SONG.mid` draws any MIDI file; a missing FluidSynth costs only the WAV."""
    pytest.importorskip("matplotlib")
    from museformer.cli import main
    from museformer.render import render_file

    midi = tmp_path / "tune.mid"
    _song().dump_midi(str(midi))
    done = render_file(midi, png=True)
    assert done == {"png": tmp_path / "tune.png"} and (tmp_path / "tune.png").read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "tune.png").unlink()
    assert main(["render", str(midi), "--png", "-o", str(tmp_path / "pics")]) == 0
    assert (tmp_path / "pics" / "tune.png").exists() and "wrote" in capsys.readouterr().out
    assert main(["render", str(midi)]) == 1  # both asked: the PNG is written, the WAV cannot be
    captured = capsys.readouterr()
    assert (tmp_path / "tune.png").exists() and "wav:" in captured.err and "fluidsynth" in captured.err
    assert len(captured.err.strip().splitlines()) == 1
    assert main(["render", str(tmp_path / "missing.mid"), "--png"]) == 1
    assert "missing.mid" in capsys.readouterr().err


def test_render_file_with_fake_fluidsynth(tmp_path, fake_fluidsynth):
    """With FluidSynth present (simulated) render_file writes the WAV too."""
    from museformer.render import render_file

    midi = tmp_path / "tune.mid"
    _song().dump_midi(str(midi))
    done = render_file(midi, wav=tmp_path / "out" / "t.wav")
    assert done == {"wav": tmp_path / "out" / "t.wav"}
