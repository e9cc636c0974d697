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
