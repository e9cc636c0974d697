"""benchmarks/form.py: a sample folder's form against a prepared corpus, end to end on a tiny corpus."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from museformer import metrics
from museformer.checkpoint import save_checkpoint
from museformer.data import Corpus
from museformer.generate import SampleConfig
from museformer.model import Museformer, MuseformerConfig
from museformer.songs import generate_to_folder
from museformer.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]


def test_form_report_of_generated_songs(lmd6_copies, tmp_path):
    """The report counts the samples and their bars, and its similarity error is the one of
    ``metrics`` against exactly the held-out splits asked for."""
    tokenizer = Tokenizer.load(lmd6_copies / "tokenizer.json")
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "ckpt", Museformer(MuseformerConfig.preset("tiny")).eval(), tokenizer)
    generate_to_folder(tmp_path / "songs", tmp_path / "ckpt", num_songs=3, config=SampleConfig(seed=1, max_bars=6))
    out = tmp_path / "form.json"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "form.py"), str(tmp_path / "songs"), str(lmd6_copies),
                    "--max-interval", "4", "--held-out", "test", "-o", str(out)],
                   check=True, capture_output=True, text=True, timeout=600)
    report = json.loads(out.read_text())
    assert report["samples"] == 3 and report["bars"] == {"min": 6, "max": 6, "mean": 6.0}
    assert report["held_out_splits"] == ["test"] and report["decodable_share"] == 1.0
    test = Corpus(lmd6_copies, "test")
    held = metrics.similarity_curve((metrics.notes_from_ids(np.asarray(test[i].ids), tokenizer.vocab)
                                     for i in range(len(test))), 4)
    assert report["held_out_songs"] == len(test)
    np.testing.assert_allclose(report["held_out_curve"], held)
    assert report["similarity_error_1_4_vs_held_out"] == pytest.approx(
        metrics.similarity_error(np.array(report["sample_curve"]), held))
