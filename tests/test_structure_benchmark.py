"""benchmarks/structure.py: its five patterns, parameter matching, token budget and a tiny whole run."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import benchmark_module

from museformer.structure import AttentionPattern, bar_layout, dense_masks, toy_song
from museformer.vocab import Vocab


@pytest.fixture(scope="module")
def bench_module():
    """The benchmark script, imported as a module."""
    yield from benchmark_module("structure")


@pytest.fixture(scope="module")
def toy_data(lmd6_copies) -> Path:
    """The test MIDI files in 4 copies, prepared with the LMD preset (conftest.lmd6_copies)."""
    return lmd6_copies


def test_pattern_table_holds_five_distinct_valid_patterns(bench_module):
    """The five patterns are valid AttentionPatterns, the ones the docs name, and all attend differently."""
    table = bench_module.pattern_table()
    assert list(table) == ["fc", "full", "local", "fine-only", "summaries-only"]
    assert table["fc"] == AttentionPattern()  # the paper's pattern is the package default
    assert table["full"] == AttentionPattern.full()
    assert [p.has_summaries for p in table.values()] == [True, False, False, False, True]
    for pattern in table.values():
        assert AttentionPattern.from_dict(pattern.to_dict()) == pattern
    vocab = Vocab.builtin("lmd6remi")
    song = toy_song(40, vocab, seed=3)
    # who a regular token may read, over the regular tokens and the summaries of the fc layout
    reads = {}
    for name, pattern in table.items():
        summary_mask, regular_mask = dense_masks(bar_layout(song, vocab, pattern), pattern)
        reads[name] = regular_mask[0]
    names = list(reads)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert reads[a].shape != reads[b].shape or not torch.equal(reads[a], reads[b]), (a, b)


def test_matched_models_have_the_fc_models_parameter_count(bench_module):
    """Patterns without summaries get a wider FFN, so every model is within 0.1% of the FC model's size."""
    bench = bench_module.BenchConfig("unused", "unused")
    vocab = Vocab.builtin("lmd6remi")
    counts = {name: bench_module.count_parameters(bench_module.matched_config(bench, p, vocab), vocab)
              for name, p in bench_module.pattern_table().items()}
    for name, count in counts.items():
        assert abs(count - counts["fc"]) / counts["fc"] < 1e-3, (name, count, counts["fc"])
    plain = bench_module.base_model(bench, AttentionPattern.full()).replace(vocab_size=len(vocab))
    assert bench_module.count_parameters(plain, vocab) < 0.95 * counts["fc"]  # the matching did something


def test_token_budget_is_the_first_update_that_reaches_it(bench_module, toy_data):
    """steps_for_tokens gives the shortest run whose micro-batches hold at least the budget."""
    from museformer.data import BatchOrder, input_lengths, open_split

    bench = bench_module.BenchConfig(str(toy_data), "unused", train_tokens=3000, batch_tokens=512, max_len=256)
    steps, tokens = bench_module.steps_for_tokens(str(toy_data), bench, seed=1)
    lengths = input_lengths(open_split(toy_data, "train"), 256)
    order = BatchOrder(lengths, 512, 1)
    per_step = [int(lengths[order[g][1]].sum()) for g in range(steps)]
    assert sum(per_step) == tokens >= 3000 > sum(per_step[:-1])


def test_tiny_comparison_writes_its_report_and_reuses_finished_runs(bench_module, toy_data, tmp_path, monkeypatch,
                                                                  one_thread):
    """Two patterns end to end: results, table, JSON/CSV/PNG; perplexity as `evaluate`; a rerun trains nothing."""
    from museformer.evaluate import evaluate_perplexity

    bench = bench_module.BenchConfig.quick(
        str(toy_data), str(tmp_path / "out"), patterns=("fc", "local"), d_model=16, n_heads=2, d_ff=32,
        train_tokens=600, batch_tokens=384, max_len=192, save_every=2, eval_lens=(64, 128), eval_songs=0, samples=2,
        sample_batch=2, bars=3, max_tokens=200, max_interval=2, in_process=True)
    docs = tmp_path / "docs"
    results, ref = bench_module.run(bench, docs=docs)
    assert [(r["pattern"], r["seed"]) for r in results] == [("fc", 0), ("local", 0)]
    for r in results:
        assert r["train"]["tokens"] >= 600 and r["samples"]["songs"] == 2
        assert r["samples"]["validity_rate"] == 1.0  # grammar-constrained samples decode cleanly
        assert math.isfinite(r["similarity_error"]) and len(r["similarity_curve"]) == 2
        # the script's perplexity is museformer.evaluate's on the whole test split
        run_dir = tmp_path / "out" / "runs" / f"{r['pattern']}-seed0"
        expected = evaluate_perplexity(run_dir / "model", toy_data, "test", [64, 128], device="cpu")
        assert [p["perplexity"] for p in r["perplexity"]] == pytest.approx(
            [e["perplexity"] for e in expected["results"]], rel=1e-9)
    assert results[0]["train"]["tokens"] == results[1]["train"]["tokens"]  # same budget, same batches
    table = (tmp_path / "out" / "table.md").read_text()
    assert "\n| fc | " in table and "\n| local | " in table
    saved = json.loads((docs / "structure_benchmark.json").read_text())
    assert len(saved["results"]) == 2 and saved["held_out"]["songs"] == ref.songs
    assert (docs / "structure_benchmark.png").stat().st_size > 0
    assert len((docs / "structure_benchmark.csv").read_text().splitlines()) == 3
    curves = (docs / "structure_benchmark_curves.csv").read_text().splitlines()
    assert curves[0] == "interval,held_out,fc-seed0,local-seed0" and len(curves) == 3

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(bench_module, "train_run", no_training)
    again, _ = bench_module.run(bench, docs=docs)
    assert again == results
    assert np.isfinite([r["similarity_error"] for r in again]).all()


def test_a_run_folder_refuses_other_settings_and_rebuilt_data(bench_module, toy_data, tmp_path):
    """check_settings: same settings and data pass (patterns/seeds may change); others, or rebuilt data, fail."""
    from museformer.errors import MuseformerError

    data = tmp_path / "data"
    shutil.copytree(toy_data, data)
    bench = bench_module.BenchConfig.quick(str(data), str(tmp_path / "out"))
    first = bench_module.check_settings(bench)
    again = bench_module.BenchConfig.quick(str(data), str(tmp_path / "out"), patterns=("fc",), seeds=(3,))
    assert bench_module.check_settings(again) == first
    with pytest.raises(MuseformerError, match="train_tokens"):
        bench_module.check_settings(bench_module.BenchConfig.quick(str(data), str(tmp_path / "out"),
                                                                   train_tokens=999))
    tokens = bytearray((data / "test.tokens.bin").read_bytes())
    tokens[0] ^= 1  # one id of one held-out song changes
    (data / "test.tokens.bin").write_bytes(bytes(tokens))
    with pytest.raises(MuseformerError, match="rebuilt"):
        bench_module.check_settings(bench)
