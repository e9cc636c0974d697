"""Training and perplexity: schedule, batching, config precedence, loss, exact resume, DDP, guard."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import prepared_copies

from museformer.cli import build_train_config
from museformer.cli import main as cli_main
from museformer.data import plan_epoch
from museformer.errors import MuseformerError
from museformer.evaluate import evaluate_perplexity
from museformer.train import TrainConfig, lr_at, train

REPO = Path(__file__).resolve().parents[1]
# a tiny model on short songs: each update takes a few milliseconds on a CPU
FAST = ["max_len=192", "val_max_len=192", "batch_tokens=384", "warmup_steps=2", "lr=3e-3",
        "log_every=1", "eval_every=0", "progress=False", "tensorboard=False"]


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> Path:
    """The test MIDI files (Bach chorales and synthetic songs), copied into 4 folders and prepared."""
    from museformer.tokenizer import Tokenizer

    return prepared_copies(tmp_path_factory.mktemp("train_data"), Tokenizer())


def _config(data: Path, out: Path, *extra: str) -> TrainConfig:
    return build_train_config(data, out, preset="tiny", overrides=[*FAST, *extra])


def _losses(out: Path) -> dict[int, str]:
    with open(out / "metrics.csv", newline="") as f:
        return {int(r["step"]): r["loss"] for r in csv.DictReader(f)}


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), **extra)
    env.pop("WORLD_SIZE", None)
    return env


# ---------------------------------------------------------------------------------------------
# pure parts
# ---------------------------------------------------------------------------------------------
def test_lr_schedule_warms_up_linearly_then_decays_as_inverse_sqrt():
    """lr rises linearly to the peak at the end of warm-up, then falls as 1/sqrt(step)."""
    peak, warm = 5e-4, 100
    assert lr_at(0, peak_lr=peak, warmup_steps=warm) == pytest.approx(peak / warm)
    assert lr_at(49, peak_lr=peak, warmup_steps=warm) == pytest.approx(peak / 2)
    assert lr_at(99, peak_lr=peak, warmup_steps=warm) == pytest.approx(peak)
    assert lr_at(399, peak_lr=peak, warmup_steps=warm) == pytest.approx(peak / 2)
    assert lr_at(9, peak_lr=peak, warmup_steps=0) == pytest.approx(peak / math.sqrt(10))


def test_epoch_plan_covers_every_song_once_within_the_token_budget():
    """Each epoch holds every song exactly once; batches fit the budget; the plan is seeded."""
    lengths = np.random.default_rng(0).integers(10, 400, size=300)
    plan = plan_epoch(lengths, batch_tokens=1000, seed=3, epoch=1)
    songs = np.concatenate(plan)
    assert sorted(songs.tolist()) == list(range(300))
    for batch in plan:
        assert len(batch) == 1 or len(batch) * lengths[batch].max() <= 1000
    assert all((a == b).all() for a, b in zip(plan, plan_epoch(lengths, 1000, 3, 1)))
    assert not all(len(a) == len(b) and (a == b).all() for a, b in zip(plan, plan_epoch(lengths, 1000, 3, 2)))


def test_random_crop_is_a_bar_aligned_window(prepared):
    """A crop starts at a bar start, has max_len tokens, and its targets are the inputs shifted by one;
    without a generator a batch holds the songs' beginnings (Song.model_inputs)."""
    from museformer.data import Corpus, corpus_batch

    corpus = Corpus(prepared)
    longest = int(np.argmax(corpus.lengths))
    song = corpus[longest]
    vocab = corpus.vocab
    for seed in range(5):
        start = song.crop_start(200, np.random.default_rng(seed))
        assert start == 0 or song.ids[start - 1] == vocab.bar_id
        x = song.model_inputs(200, start)
        assert len(x["input_ids"]) == len(x["target_ids"]) == 200
        assert (x["input_ids"][1:] == x["target_ids"][:-1]).all()
        assert (x["input_ids"][1:] == song.ids[start:start + 199]).all()
        batch = corpus_batch(corpus, [longest], 200, np.random.default_rng(seed))
        assert all((batch[k][0].numpy() == x[k]).all() for k in x)
    plain = corpus_batch(corpus, [longest], 200)
    assert all((plain[k][0].numpy() == song.model_inputs(200)[k]).all() for k in x)


def test_config_round_trips_through_json():
    """to_dict -> JSON -> from_dict gives an equal config (model config included)."""
    cfg = build_train_config("d", "o", preset="tiny", overrides=["lr=1e-3", "model.d_model=64", "betas=(0.9, 0.95)"])
    assert cfg.lr == 1e-3 and cfg.model.d_model == 64 and cfg.betas == (0.9, 0.95)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("option,expected", [
    ("bogus=1", "unknown training option 'bogus'; valid keys: batch_tokens"),
    ("model.bogus=1", "unknown training option 'model.bogus'; valid keys under 'model': attention_backend"),
    ("max_steps=abc", "training option 'max_steps' must be int, got 'abc'"),
    ("lr=-1", "training option 'lr' must be a positive number"),
    ("seed=-1", "training option 'seed' must be >= 0, got -1"),
])
def test_cli_rejects_bad_options_with_a_clear_message(tmp_path, capsys, option, expected):
    """Unknown keys (listing the valid ones) and ill-typed values are one-line errors, exit 1."""
    assert cli_main(["train", str(tmp_path), str(tmp_path / "out"), "--model-preset", "tiny", "--set", option]) == 1
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------
def test_loss_decreases_and_the_run_folder_is_complete(prepared, tmp_path):
    """A few updates on real chorales lower the loss; the run leaves a loadable model and metrics."""
    from museformer.checkpoint import load

    final = train(_config(prepared, tmp_path, "max_steps=16", "save_every=8", "eval_every=8"))
    losses = [float(v) for v in _losses(tmp_path).values()]
    assert len(losses) == 16
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.5
    model, tokenizer = load(final)
    assert model.config.vocab_size == len(tokenizer.vocab)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000008", "step-00000016"]
    with open(tmp_path / "metrics.csv", newline="") as f:
        assert [r["val_loss"] != "" for r in csv.DictReader(f)].count(True) == 2


def test_resume_after_sigkill_repeats_the_uninterrupted_losses(prepared, tmp_path):
    """Killed (SIGKILL) right after a checkpoint and resumed, a run logs the same losses as one never stopped."""
    opts = ["max_steps=6", "save_every=2", "random_crop=True", "max_len=128", "model.dropout=0.1",
            "model.attention_dropout=0.1", "seed=5"]
    train(_config(prepared, tmp_path / "whole", *opts))

    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent("""
        import sys, time
        import museformer.train as t
        save = t._save_training_checkpoint
        def save_then_hang(out_dir, step, *args, **kw):
            path = save(out_dir, step, *args, **kw)
            if step == 4:
                print("saved", flush=True)
                time.sleep(600)
            return path
        t._save_training_checkpoint = save_then_hang
        from museformer.cli import main
        sys.exit(main(sys.argv[1:]))
    """))
    out = tmp_path / "killed"
    args = [sys.executable, str(driver), "train", str(prepared), str(out), "--model-preset", "tiny", "--set", *FAST, *opts]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=_env(), text=True)
    try:
        assert proc.stdout.readline().strip() == "saved"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert max(_losses(out)) == 4
    train(build_train_config(prepared, out, resume=True), resume=True)  # options from the saved config
    assert _losses(out) == _losses(tmp_path / "whole")


def test_ddp_two_processes_match_one_process_with_the_same_global_batch(prepared, tmp_path):
    """torchrun with 2 CPU processes (gloo) gives the losses of 1 process accumulating 2 micro-batches."""
    opts = ["max_steps=4", "save_every=0", "seed=1"]
    train(_config(prepared, tmp_path / "one", *opts, "grad_accum=2"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "museformer", "train", str(prepared), str(tmp_path / "two"), "--model-preset", "tiny",
           "--set", *FAST, *opts, "grad_accum=1"]
    done = subprocess.run(cmd, env=_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == list(range(1, 5))
    for step in one:
        assert float(two[step]) == pytest.approx(float(one[step]), abs=1e-5)


def test_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(prepared, tmp_path, monkeypatch):
    """A NaN loss at update 3 raises a clear error; checkpoint step 2 stays as it was."""
    import museformer.train as t

    calls = {"n": 0}
    real = t.batch_nll

    def poisoned(*args, **kwargs):
        nll, n = real(*args, **kwargs)
        calls["n"] += 1
        return (nll * float("nan") if calls["n"] == 3 else nll), n

    monkeypatch.setattr(t, "batch_nll", poisoned)
    with pytest.raises(MuseformerError, match=r"non-finite loss at step 3 .*step-00000002"):
        train(_config(prepared, tmp_path, "max_steps=10", "save_every=1", "keep_checkpoints=5"))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000001", "step-00000002"]
    assert max(_losses(tmp_path)) == 2


# ---------------------------------------------------------------------------------------------
# perplexity
# ---------------------------------------------------------------------------------------------
def test_perplexity_is_exp_of_the_mean_token_nll(prepared, tmp_path):
    """evaluate_perplexity equals exp(total NLL / target tokens), computed song by song by hand."""
    from museformer.checkpoint import load, save_checkpoint
    from museformer.data import Corpus
    from museformer.model import Museformer

    corpus = Corpus(prepared, "test")
    cfg = _config(prepared, tmp_path).model.replace(vocab=corpus.vocab.name, vocab_size=len(corpus.vocab))
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "ckpt", Museformer(cfg, vocab=corpus.vocab), corpus.tokenizer)
    result = evaluate_perplexity(tmp_path / "ckpt", prepared, split="test", max_lens=(64, 160), batch_tokens=400)
    model, _ = load(tmp_path / "ckpt")
    for entry, max_len in zip(result["results"], (64, 160)):
        total, count = 0.0, 0
        for song in corpus:
            x = {k: torch.from_numpy(v)[None] for k, v in song.model_inputs(max_len).items()}
            with torch.no_grad():
                logits = model(x["input_ids"], bar_ids=x["bar_ids"], onset_ids=x["onset_ids"])[0]
            logp = torch.log_softmax(logits.double(), -1)
            total -= float(logp.gather(-1, x["target_ids"][0, :, None]).sum())
            count += x["target_ids"].shape[1]
        assert entry["max_len"] == max_len and entry["tokens"] == count
        assert entry["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert result["songs"] == len(corpus)


def test_cli_evaluate_shows_progress_and_writes_the_documented_json(prepared, tmp_path, capsys):
    """'museformer evaluate -o FILE' shows a progress bar (none with --quiet) and writes JSON whose
    layout (keys, nesting) is the one docs/training.md shows."""
    from museformer.checkpoint import save_checkpoint
    from museformer.data import Corpus
    from museformer.model import Museformer

    corpus = Corpus(prepared, "test")
    cfg = _config(prepared, tmp_path).model.replace(vocab=corpus.vocab.name, vocab_size=len(corpus.vocab))
    save_checkpoint(tmp_path / "ckpt", Museformer(cfg, vocab=corpus.vocab), corpus.tokenizer)
    out = tmp_path / "ppl.json"
    argv = ["evaluate", str(tmp_path / "ckpt"), str(prepared), "--max-len", "64", "-o", str(out)]
    assert cli_main(argv) == 0
    assert "perplexity: 100%" in capsys.readouterr().err
    assert cli_main(argv + ["--quiet"]) == 0
    assert "perplexity:" not in capsys.readouterr().err
    doc = (REPO / "docs" / "training.md").read_text(encoding="utf-8")
    shown = json.loads(doc.split("```json\n", 1)[1].split("```", 1)[0])

    def layout(x):
        if isinstance(x, dict):
            return {k: layout(v) for k, v in x.items()}
        return [layout(x[0])] if isinstance(x, list) else type(x) in (int, float)
    assert layout(json.loads(out.read_text())) == layout(shown)


def test_repeated_bars_marks_the_targets_of_bars_equal_to_the_bar_k_earlier():
    """repeated_bars: a target belongs to the bar of the input after it; a bar counts as repeated
    only when it equals the bar k earlier token for token (the cut last bar never does)."""
    from museformer.evaluate import repeated_bars

    B = 9  # any id standing for b-1
    # BOS | bar 1: 5 6 B | bar 2: 7 B | bar 3: 5 6 B | bar 4: 7 B | bar 5 (cut): 5
    ids = np.array([1, 5, 6, B, 7, B, 5, 6, B, 7, B, 5])
    bars = np.array([0, 1, 1, 1, 2, 2, 3, 3, 3, 4, 4, 5])
    got = repeated_bars(ids, bars, 2)
    # targets t = inputs t + 1: bars 3 and 4 repeat bars 1 and 2; bar 5 (5 alone) is not bar 3 (5 6 B)
    target_bar = np.concatenate([bars[1:], bars[-1:]])
    assert got.tolist() == [b in (3, 4) for b in target_bar]
    assert not repeated_bars(ids, bars, 1).any()
    with pytest.raises(MuseformerError, match="intervals"):
        repeated_bars(ids, bars, 0)


def test_repeat_bar_nll_splits_the_corpus_nll(prepared, tmp_path):
    """repeat_bar_nll with no interval scores every target like corpus_nll; with intervals, the
    repeated and other targets add up to all targets and their NLLs to the total."""
    from museformer.data import Corpus
    from museformer.evaluate import corpus_nll, repeat_bar_nll, repeated_bars
    from museformer.model import Museformer

    corpus = Corpus(prepared, "test")
    cfg = _config(prepared, tmp_path).model.replace(vocab=corpus.vocab.name, vocab_size=len(corpus.vocab))
    torch.manual_seed(0)
    model = Museformer(cfg, vocab=corpus.vocab).eval()
    cpu = torch.device("cpu")
    total, count = corpus_nll(model, corpus, 160, 400, cpu)
    plain = repeat_bar_nll(model, corpus, 160, (), 400, cpu)
    assert plain["other"]["tokens"] == count and plain["repeat"] == {}
    assert plain["other"]["mean_nll"] == pytest.approx(total / count, rel=1e-5)
    expected = sum(int(repeated_bars(s.model_inputs(160)["input_ids"], s.model_inputs(160)["bar_ids"], 1).sum())
                   for s in corpus)
    split = repeat_bar_nll(model, corpus, 160, (1,), 400, cpu)
    assert split["repeat"][1]["tokens"] == expected > 0
    assert split["repeat"][1]["tokens"] + split["other"]["tokens"] == count
    assert split["all"]["tokens"] == count
    assert split["all"]["mean_nll"] == pytest.approx(total / count, rel=1e-5)
    parts = sum(e["mean_nll"] * e["tokens"] for e in (split["repeat"][1], split["other"]))
    assert parts == pytest.approx(total, rel=1e-5)


def test_cli_evaluate_repeats_prints_and_writes_the_repeat_bar_nll(prepared, tmp_path, capsys):
    """'museformer evaluate --repeats 1' prints the repeated-bar line and writes "repeat_bars";
    a zero interval is one error naming --repeats."""
    from museformer.checkpoint import save_checkpoint
    from museformer.data import Corpus
    from museformer.model import Museformer

    corpus = Corpus(prepared, "test")
    cfg = _config(prepared, tmp_path).model.replace(vocab=corpus.vocab.name, vocab_size=len(corpus.vocab))
    save_checkpoint(tmp_path / "ckpt", Museformer(cfg, vocab=corpus.vocab), corpus.tokenizer)
    out = tmp_path / "ppl.json"
    argv = ["evaluate", str(tmp_path / "ckpt"), str(prepared), "--max-len", "64", "160", "--quiet"]
    assert cli_main(argv + ["--repeats", "1", "-o", str(out)]) == 0
    assert "bars repeating bar b-1: mean NLL" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["repeat_bars"]["max_len"] == 160 and set(report["repeat_bars"]["repeat"]) == {"1"}
    assert cli_main(argv + ["--repeats", "0"]) != 0
    assert "--repeats" in capsys.readouterr().err


def test_unigram_baseline_by_hand(prepared):
    """The unigram baseline is exp(mean -log p) with add-one-smoothed train-split frequencies."""
    from museformer.data import Corpus
    from museformer.evaluate import unigram_perplexity
    from museformer.vocab import EOS_ID

    train_split, test_split = Corpus(prepared, "train"), Corpus(prepared, "test")
    counts = {i: 1.0 for i in range(len(train_split.vocab))}
    for song in train_split:
        for t in list(song.ids) + [EOS_ID]:
            counts[int(t)] += 1
    total = sum(counts.values())
    nll, n = 0.0, 0
    for song in test_split:
        for t in (list(song.ids) + [EOS_ID])[:100]:
            nll -= math.log(counts[int(t)] / total)
            n += 1
    assert unigram_perplexity(train_split, test_split, 100) == pytest.approx(math.exp(nll / n), rel=1e-9)


def test_resume_with_a_different_model_is_refused_and_changes_nothing(prepared, tmp_path):
    """Resuming a run with another model config is a clear error; a plain rerun must ask for --resume."""
    train(_config(prepared, tmp_path, "max_steps=1"))
    saved = (tmp_path / "train_config.json").read_text()
    with pytest.raises(MuseformerError, match="different model config"):
        train(_config(prepared, tmp_path, "max_steps=2", "model.d_model=64"), resume=True)
    with pytest.raises(MuseformerError, match="pass --resume"):
        train(_config(prepared, tmp_path, "max_steps=2"))
    assert (tmp_path / "train_config.json").read_text() == saved
