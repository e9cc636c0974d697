"""benchmarks/copying.py: its AA songs, strain scoring, and both commands end to end on a tiny corpus."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import benchmark_module

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def copying():
    """The benchmark script, imported as a module."""
    yield from benchmark_module("copying")


def test_aa_songs_repeat_their_first_strain_exactly(copying, lmd6_copies):
    """An AA song is BOS, k real bars, the same k bars again; targets are the inputs shifted by one."""
    from museformer.structure import bar_ids
    from museformer.vocab import BOS_ID, EOS_ID, PAD_ID

    vocab, bars = copying.bar_pool(str(lmd6_copies), "train", 50)
    assert bars and all(b[-1] == vocab.bar_id for b in bars)
    inputs, targets = copying.aa_batch(np.random.default_rng(0), bars, 3, 4)
    for row in range(3):
        ids = inputs[row][inputs[row] != PAD_ID]
        assert ids[0] == BOS_ID
        numbers = bar_ids(ids, vocab)
        assert int(numbers.max()) == 8
        for b in range(1, 5):
            assert torch.equal(ids[numbers == b], ids[numbers == b + 4])
        real = targets[row][targets[row] != PAD_ID]
        assert torch.equal(real[:-1], ids[1:]) and real[-1] == EOS_ID


def test_strain_nll_scores_the_two_halves_apart(copying, lmd6_copies):
    """strain_nll's two means are the cross entropy over the first and over the repeated strain's targets."""
    from museformer.model import Museformer, MuseformerConfig
    from museformer.structure import bar_ids, onset_ids

    vocab, bars = copying.bar_pool(str(lmd6_copies), "train", 50)
    inputs, targets = copying.aa_batch(np.random.default_rng(1), bars, 2, 3)
    torch.manual_seed(0)
    model = Museformer(MuseformerConfig.preset("tiny"), vocab=vocab).eval()
    first, repeated = copying.strain_nll(model, vocab, inputs, targets, 3)
    with torch.no_grad():
        logits = model(inputs, bar_ids=bar_ids(inputs, vocab), onset_ids=onset_ids(inputs, vocab))
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    numbers = bar_ids(inputs, vocab)
    target_bar = torch.cat([numbers[:, 1:], numbers[:, -1:]], 1)
    real = targets != 0
    assert first == pytest.approx(float(nll[real & (target_bar >= 1) & (target_bar <= 3)].mean()), rel=1e-5)
    assert repeated == pytest.approx(float(nll[real & (target_bar > 3)].mean()), rel=1e-5)


def test_both_commands_write_their_json(copying, lmd6_copies, tmp_path):
    """'synthetic' trains each pattern and logs the strain NLLs; 'checkpoints' scores a checkpoint
    with repeat_bar_nll; both write JSON with the machine's facts."""
    from museformer.checkpoint import save_checkpoint
    from museformer.data import open_split
    from museformer.model import Museformer, MuseformerConfig

    script = str(REPO / "benchmarks" / "copying.py")
    out = tmp_path / "synthetic.json"
    subprocess.run([sys.executable, script, "synthetic", str(lmd6_copies), "--patterns", "fc", "local",
                    "--steps", "2", "--eval-every", "1", "--strain", "2", "--batch", "2", "--width", "32",
                    "--layers", "1", "-o", str(out)], check=True, capture_output=True, timeout=300)
    report = json.loads(out.read_text())
    assert [r["pattern"] for r in report["results"]] == ["fc", "local"]
    assert [p["step"] for p in report["results"][0]["curve"]] == [1, 2]
    assert "cpu" in report["machine"]

    corpus = open_split(lmd6_copies, "test")
    save_checkpoint(tmp_path / "ckpt", Museformer(MuseformerConfig.preset("tiny"), vocab=corpus.vocab),
                    corpus.tokenizer)
    out = tmp_path / "ckpts.json"
    subprocess.run([sys.executable, script, "checkpoints", str(lmd6_copies), str(tmp_path / "ckpt"),
                    "--repeats", "1", "--songs", "3", "-o", str(out)], check=True, capture_output=True, timeout=300)
    result = json.loads(out.read_text())["results"][0]
    assert result["songs"] <= 3 and set(result["repeat"]) == {"1"}
    assert result["repeat"]["1"]["tokens"] + result["other"]["tokens"] > 0
