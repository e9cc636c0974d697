"""The bundled models by name (museformer.bundled): --model resolution, errors, recommended lengths."""

import json
from pathlib import Path

import pytest
import torch

from museformer import bundled
from museformer.bundled import BUNDLED_MODELS, DEFAULT_MODEL, SAMPLE_DEFAULTS_FILE, bundled_checkpoint
from museformer.checkpoint import save_checkpoint
from museformer.cli import main
from museformer.errors import MuseformerError
from museformer.generate import generate
from museformer.model import Museformer, MuseformerConfig
from museformer.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fake_pretrained(tmp_path_factory) -> Path:
    """A pretrained/ folder with a tiny model under each bundled name; folk recommends 3 bars."""
    root = tmp_path_factory.mktemp("pretrained")
    for k, name in enumerate(BUNDLED_MODELS):
        torch.manual_seed(k)
        save_checkpoint(root / name, Museformer(MuseformerConfig.preset("tiny")).eval(), Tokenizer.preset("lmd6"))
    (root / "folk" / SAMPLE_DEFAULTS_FILE).write_text(json.dumps({"max_bars": 3}))
    return root


def test_every_bundled_model_ships_and_loads() -> None:
    """Each name in BUNDLED_MODELS has its own folder in the package, and the default is one of them."""
    assert DEFAULT_MODEL in BUNDLED_MODELS
    for name in BUNDLED_MODELS:
        try:
            path = bundled_checkpoint(name)
        except MuseformerError as e:  # an install without that model's weights says so
            assert "no bundled model" in str(e) and name in str(e)
            continue
        assert path.name == name and (path / "model.safetensors").is_file()
    if (bundled.pretrained_root() / DEFAULT_MODEL / "model.safetensors").is_file():
        assert bundled_checkpoint(None) == bundled_checkpoint(DEFAULT_MODEL)


def test_bad_model_name_is_one_clear_error(capsys, tmp_path) -> None:
    """An unknown --model name is a one-line error that lists the bundled names."""
    with pytest.raises(MuseformerError, match="unknown model 'jazz'.*folk, chorales"):
        bundled_checkpoint("jazz")
    assert main(["generate", "--model", "jazz", "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert "unknown model 'jazz'" in err and "\n" not in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_model_flag_picks_its_folder_and_recommended_length(fake_pretrained, monkeypatch, tmp_path) -> None:
    """--model NAME loads pretrained/NAME; folk's sample.json makes songs 3 bars unless a length is given."""
    monkeypatch.setattr(bundled, "pretrained_root", lambda: fake_pretrained)
    for name in BUNDLED_MODELS:
        out = tmp_path / name
        assert main(["generate", "--model", name, "--seed", "1", "--max-tokens", "60", "-o", str(out), "--quiet"]) == 0
        meta = json.loads((out / "song_000.json").read_text())
        assert Path(meta["checkpoint"]) == fake_pretrained / name
    out = tmp_path / "folk-default"
    assert main(["generate", "--model", "folk", "--seed", "1", "-o", str(out), "--quiet"]) == 0
    meta = json.loads((out / "song_000.json").read_text())
    assert meta["options"]["max_bars"] == 3 and meta["bars"] == 3
    out = tmp_path / "folk-bars"
    assert main(["generate", "--model", "folk", "--seed", "1", "--bars", "2", "-o", str(out), "--quiet"]) == 0
    assert json.loads((out / "song_000.json").read_text())["bars"] == 2


def test_python_generate_takes_a_model_name(fake_pretrained, monkeypatch) -> None:
    """generate(model="folk") uses the bundled folk model and its length; explicit options win."""
    monkeypatch.setattr(bundled, "pretrained_root", lambda: fake_pretrained)
    (song,) = generate(model="folk", seed=2)
    assert song.bars == 3 and song.finish == "bars"
    (song,) = generate(model="folk", seed=2, max_bars=2)
    assert song.bars == 2
    (song,) = generate(model="chorales", seed=2, max_tokens=40)
    assert song.num_tokens <= 40 and song.finish != "bars"  # no sample.json: no bar limit
    with pytest.raises(MuseformerError, match="not both"):
        generate(fake_pretrained / "folk", model="folk")


def test_broken_sample_defaults_are_named(fake_pretrained, tmp_path) -> None:
    """A sample.json with unknown keys is an error naming the file."""
    (tmp_path / SAMPLE_DEFAULTS_FILE).write_text(json.dumps({"bars": 3}))
    with pytest.raises(MuseformerError, match="sample.json"):
        bundled.sample_defaults(tmp_path)
    assert bundled.sample_defaults(fake_pretrained / "chorales") == {}


def test_recommended_sampling_options_apply_one_by_one(tmp_path) -> None:
    """A sample.json's top_k / temperature apply unless the caller chose that very option; lengths go
    together (choosing --max-tokens drops the recommended --bars)."""
    from museformer.cli import build_parser, chosen_sample_options, sample_config_from_args
    from museformer.generate import with_model_defaults

    (tmp_path / SAMPLE_DEFAULTS_FILE).write_text(json.dumps({"max_bars": 64, "top_k": 0, "temperature": 1.1}))
    parser = build_parser()

    def config(*flags):  # what `museformer generate FLAGS` decodes with (the CLI's own path)
        args = parser.parse_args(["generate", *flags])
        return with_model_defaults(sample_config_from_args(args), tmp_path, chosen_sample_options(args))

    plain = config()
    assert (plain.max_bars, plain.top_k, plain.temperature) == (64, 0, 1.1)
    chosen = config("--top-k", "8", "--max-tokens", "500")
    assert (chosen.max_bars, chosen.max_tokens, chosen.top_k, chosen.temperature) == (None, 500, 8, 1.1)
