"""benchmarks/precision.py: bf16 against float32 perplexity and sampling speed, end to end on a tiny corpus."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import torch

from museformer.checkpoint import save_checkpoint
from museformer.model import Museformer, MuseformerConfig
from museformer.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]


def test_precision_benchmark_scores_both_precisions(lmd6_copies, tmp_path):
    """The script scores the same test songs in both precisions (same token count, perplexities a
    bf16 rounding apart), times sampling of both, and writes its JSON."""
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "ckpt", Museformer(MuseformerConfig.preset("tiny")).eval(), Tokenizer.preset("lmd6"))
    out = tmp_path / "precision.json"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "precision.py"), str(lmd6_copies),
                    "--checkpoint", str(tmp_path / "ckpt"), "--songs", "2", "--max-len", "200", "--tokens", "12",
                    "--batch", "2", "-o", str(out)], check=True, capture_output=True, text=True, timeout=600)
    report = json.loads(out.read_text())
    assert report["songs"] == 2 and report["tokens_scored"] > 0
    assert math.isfinite(report["ppl_fp32"]) and report["ppl_fp32"] > 1
    assert abs(report["ppl_relative_difference"]) < 0.01
    assert report["ppl_bf16"] / report["ppl_fp32"] - 1 == report["ppl_relative_difference"]
    for key in ("fp32_batch1", "bf16_batch1", "fp32_batch2", "bf16_batch2"):
        assert report[f"tokens_per_s_{key}"] > 0
