"""Shared test fixtures."""

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).resolve().parents[1]


def benchmark_module(name: str):
    """Yield ``benchmarks/NAME.py`` imported as a module (for the benchmark scripts' tests), then forget it."""
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def prepared_copies(root: Path, tokenizer) -> Path:
    """The test MIDI files (Bach chorales and synthetic songs) copied into 4 folders under ``root`` and
    prepared with ``tokenizer`` (20% valid, 20% test, so that every split has songs)."""
    from museformer.data import prepare

    for copy in "abcd":
        (root / "midi" / copy).mkdir(parents=True)
        for f in DATA.glob("*.mid"):
            shutil.copy(f, root / "midi" / copy / f.name)
    prepare(root / "midi", root / "prep", tokenizer, progress=False, valid_fraction=0.2, test_fraction=0.2)
    return root / "prep"


@pytest.fixture(scope="session")
def lmd6_copies(tmp_path_factory) -> Path:
    """``prepared_copies`` with the LMD preset (train, valid and test all non-empty)."""
    from museformer.data import open_split
    from museformer.tokenizer import Tokenizer

    prep = prepared_copies(tmp_path_factory.mktemp("lmd6_copies"), Tokenizer.preset("lmd6"))
    assert all(len(open_split(prep, s)) for s in ("train", "valid", "test"))
    return prep


@pytest.fixture
def one_thread():
    """Run a test with one PyTorch thread, then restore the setting.

    Tiny per-step tensors gain nothing from intra-op threads, and on a busy 2-core machine OpenMP
    spin-waiting makes two threads 10-100x slower than one.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# optional programs, simulated: no test depends on whether FluidSynth is installed
# ---------------------------------------------------------------------------------------------
FAKE_FLUIDSYNTH = '''#!{python}
"""A stand-in for FluidSynth: writes a short valid WAV (or, with FAKE_FLUIDSYNTH_SHORT, a cut one) to -F."""
import os, sys, wave
out = sys.argv[sys.argv.index("-F") + 1]
with wave.open(out, "wb") as w:
    w.setnchannels(2); w.setsampwidth(2); w.setframerate(22050)
    w.writeframes(bytes(range(256)) * 400)
if os.environ.get("FAKE_FLUIDSYNTH_SHORT"):
    with open(out, "r+b") as f:
        f.truncate(os.path.getsize(out) // 2)
'''


@pytest.fixture
def no_fluidsynth(monkeypatch):
    """FluidSynth is not installed (whatever this machine has)."""
    import museformer.render

    monkeypatch.setattr(museformer.render, "find_fluidsynth", lambda: None)


@pytest.fixture
def fake_fluidsynth(monkeypatch, tmp_path_factory):
    """FluidSynth and a soundfont are installed: a small script that writes a valid WAV, and an empty .sf2."""
    import sys

    import museformer.render

    folder = tmp_path_factory.mktemp("fake-fluidsynth")
    program = folder / "fluidsynth"
    program.write_text(FAKE_FLUIDSYNTH.replace("{python}", sys.executable))
    program.chmod(0o755)
    font = folder / "fake.sf2"
    font.write_bytes(b"sfbk")
    monkeypatch.setattr(museformer.render, "find_fluidsynth", lambda: str(program))
    monkeypatch.setenv("MUSEFORMER_SOUNDFONT", str(font))
    monkeypatch.setattr(museformer.render, "SOUNDFONT_CANDIDATES", ())
    return program
