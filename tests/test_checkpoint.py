"""Tests of checkpoint.py: save -> load round trip, atomic writes, and clear errors for bad files."""

from __future__ import annotations

import json

import pytest
import torch

import museformer
from museformer import Museformer, MuseformerConfig
from museformer.checkpoint import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, load, save_checkpoint
from museformer.errors import MuseformerError
from museformer.structure import toy_song
from museformer.tokenizer import Tokenizer


@pytest.fixture()
def saved(tmp_path):
    torch.manual_seed(0)
    model = Museformer(MuseformerConfig.preset("tiny")).eval()
    tokenizer = Tokenizer.preset("lmd6")
    save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    return tmp_path / "ckpt", model, tokenizer


def test_save_load_gives_identical_logits(saved):
    """save_checkpoint -> museformer.load restores config, tokenizer and exactly the same logits."""
    directory, model, tokenizer = saved
    assert sorted(p.name for p in directory.iterdir()) == sorted([CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE])
    loaded, loaded_tokenizer = museformer.load(directory)
    assert loaded.config == model.config and not loaded.training
    assert loaded_tokenizer.to_dict() == tokenizer.to_dict()
    ids = toy_song(6, model.vocab, seed=1, incomplete_last=True)[None]
    assert torch.equal(loaded(ids), model(ids))
    config = json.loads((directory / CONFIG_FILE).read_text())
    assert config["museformer_version"] == museformer.__version__ and config["model"]["d_model"] == 32


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # raised inside torch while importing dynamo
def test_save_unwraps_compiled_and_wrapped_modules(tmp_path):
    """A torch.compile'd or DDP-style wrapped model is saved as the plain module (no prefixes)."""
    torch.manual_seed(0)
    model = Museformer(MuseformerConfig.preset("tiny"))

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    save_checkpoint(tmp_path / "c", Wrapper(torch.compile(model)), Tokenizer.preset("lmd6"))
    loaded, _ = load(tmp_path / "c")
    assert set(loaded.state_dict()) == set(model.state_dict())
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_overwrite_is_atomic_and_keeps_other_files(saved):
    """Saving over a checkpoint replaces its files, leaves no temporary files and keeps unrelated files."""
    directory, model, tokenizer = saved
    (directory / "train_state.pt").write_bytes(b"resume")
    with torch.no_grad():
        model.output.weight.add_(1.0)
    save_checkpoint(directory, model, tokenizer)
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        [CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, "train_state.pt"])
    loaded, _ = load(directory)
    assert torch.equal(loaded.output.weight, model.output.weight)


def test_truncated_weights_name_the_file(saved):
    """A truncated model.safetensors gives a MuseformerError naming the file."""
    directory, _, _ = saved
    path = directory / WEIGHTS_FILE
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(MuseformerError, match="model.safetensors.*truncated"):
        load(directory)


def test_wrong_shapes_name_the_tensor(saved):
    """Weights that do not fit the config give a MuseformerError naming the tensor and both shapes."""
    directory, _, _ = saved
    config = json.loads((directory / CONFIG_FILE).read_text())
    config["model"]["d_ff"] = 48
    (directory / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(MuseformerError, match=r"layers\.0\.ffn\.fc1\.\w+ has shape \(64.*expects \(48"):
        load(directory)


def test_missing_tensor_is_named(saved):
    """A weights file lacking a tensor gives a MuseformerError naming it."""
    from safetensors.torch import load_file, save_file

    directory, _, _ = saved
    state = load_file(str(directory / WEIGHTS_FILE))
    del state["layers.1.attention.key2.weight"]
    save_file(state, str(directory / WEIGHTS_FILE))
    with pytest.raises(MuseformerError, match=r"missing tensor.*layers\.1\.attention\.key2\.weight"):
        load(directory)


def test_unknown_config_keys_and_missing_files(saved, tmp_path):
    """Unknown config keys, missing files and non-directories give MuseformerErrors naming them."""
    directory, _, _ = saved
    config = json.loads((directory / CONFIG_FILE).read_text())
    config["model"]["n_experts"] = 4
    (directory / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(MuseformerError, match=r"config\.json.*n_experts"):
        load(directory)
    del config["model"]["n_experts"]
    (directory / CONFIG_FILE).write_text(json.dumps(config))
    (directory / TOKENIZER_FILE).unlink()
    with pytest.raises(MuseformerError, match="tokenizer.json: missing"):
        load(directory)
    with pytest.raises(MuseformerError, match="no such checkpoint directory"):
        load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MuseformerError, match="config.json: missing"):
        load(tmp_path / "empty")


# ---------------------------------------------------------------------------------------------
# weights that lie, configs that do not belong, byte-stable files, run folders
# ---------------------------------------------------------------------------------------------
def _write_raw_weights(directory, state, metadata=None):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / WEIGHTS_FILE), metadata=metadata)


def test_config_that_does_not_belong_to_the_weights_is_refused(saved):
    """A config.json edited after saving (same shapes, other n_heads) is refused, naming the key."""
    directory, _, _ = saved
    config = json.loads((directory / CONFIG_FILE).read_text())
    assert config["model"]["n_heads"] != 1
    config["model"]["n_heads"] = 1
    (directory / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(MuseformerError, match=r"config\.json does not belong to .*n_heads"):
        load(directory)


def test_old_checkpoint_without_stored_config_still_loads(saved):
    """Weights saved before the config was stored in their metadata load as before."""
    directory, model, _ = saved
    _write_raw_weights(directory, model.state_dict(), {"format": "pt"})
    loaded, _ = load(directory)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("bad", ["nan", "inf", "int"])
def test_non_finite_or_integer_weights_are_refused(saved, bad):
    """NaN, Inf or integer weights are a MuseformerError naming the tensor, on load and on save."""
    directory, model, tokenizer = saved
    state = {k: v.clone() for k, v in model.state_dict().items()}
    name = "layers.0.ffn.fc1.weight"
    if bad == "int":
        state[name] = state[name].round().to(torch.int32)
    else:
        state[name][0, 0] = float(bad)
    _write_raw_weights(directory, state)
    with pytest.raises(MuseformerError, match=name.replace(".", r"\.") + r" (is int32|has 1 non-finite)"):
        load(directory)
    if bad != "int":  # a diverged model is not saved over a good checkpoint
        save_checkpoint(directory, model, tokenizer)
        before = (directory / WEIGHTS_FILE).read_bytes()
        with torch.no_grad():
            model.state_dict()[name][0, 0] = float(bad)
        with pytest.raises(MuseformerError, match="non-finite"):
            save_checkpoint(directory, model, tokenizer)
        assert (directory / WEIGHTS_FILE).read_bytes() == before


def test_same_weights_give_the_same_bytes(saved, tmp_path):
    """Saving the same model again gives byte-identical files (stable checkpoint_sha256)."""
    directory, model, tokenizer = saved
    first = (directory / WEIGHTS_FILE).read_bytes()
    for i in range(6):
        save_checkpoint(tmp_path / f"again{i}", model, tokenizer)
        assert (tmp_path / f"again{i}" / WEIGHTS_FILE).read_bytes() == first
        assert (tmp_path / f"again{i}" / CONFIG_FILE).read_bytes() == (directory / CONFIG_FILE).read_bytes()


def test_short_write_of_weights_keeps_the_old_checkpoint(saved, monkeypatch):
    """A weights file that reaches the disk short (full disk) is refused; the old checkpoint stays."""
    from pathlib import Path

    from museformer.errors import WriteError

    directory, model, tokenizer = saved
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    real = Path.write_bytes
    monkeypatch.setattr(Path, "write_bytes", lambda self, data: real(self, data[: len(data) // 2]))
    with pytest.raises(WriteError, match=r"model\.safetensors: only \d+ of \d+ bytes"):
        save_checkpoint(directory, model, tokenizer)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before


def test_resolve_checkpoint_accepts_a_run_folder(saved, tmp_path):
    """--checkpoint RUN finds RUN/model, else the newest RUN/checkpoints/step-N; a checkpoint is itself."""
    import shutil

    from museformer.checkpoint import resolve_checkpoint

    directory, _, _ = saved
    assert resolve_checkpoint(directory) == directory
    run = tmp_path / "run"
    for step in (100, 2000):
        shutil.copytree(directory, run / "checkpoints" / f"step-{step:08d}")
    (run / "checkpoints" / "step-00003000").mkdir()  # incomplete: ignored
    assert resolve_checkpoint(run) == run / "checkpoints" / "step-00002000"
    shutil.copytree(directory, run / "model")
    assert resolve_checkpoint(run) == run / "model"
    with pytest.raises(MuseformerError, match="not a checkpoint directory"):
        resolve_checkpoint(tmp_path / "run" / "checkpoints")


def test_bundled_model_stores_its_config():
    """The bundled model carries the config it was saved with, and it matches its config.json."""
    from safetensors import safe_open

    from museformer.checkpoint import CONFIG_METADATA_KEY
    from museformer.generate import bundled_checkpoint

    directory = bundled_checkpoint()
    with safe_open(str(directory / WEIGHTS_FILE), "pt") as f:
        stored = json.loads(f.metadata()[CONFIG_METADATA_KEY])
    assert stored == json.loads((directory / CONFIG_FILE).read_text())["model"]
    load(directory)
