"""The paper's comparison in miniature: five attention patterns on the same data, parameter count,
token budget and seeds, scored by perplexity and by the Similarity Error of their samples.

Patterns (all ``museformer.structure.AttentionPattern``; ``pattern_table``):

- ``fc``: the paper's pattern, fine offsets 1, 2, 4, 8, 12, 16, 24, 32 + one summary per bar;
- ``full``: plain causal attention over every earlier token (Music Transformer's role);
- ``local``: the own bar and the 3 previous bars token by token, nothing else (Transformer-XL /
  Longformer's role: a sliding window of bars);
- ``fine-only``: the paper's fine offsets, no summaries (earlier bars that are not fine are unseen);
- ``summaries-only``: the own bar token by token plus the summary of every earlier bar.

Same parameter count: patterns without summaries have no summary embedding and no second key/value
projections (``key2``/``value2``), so their feed-forward width is raised until their parameter count
is within a fraction of a per cent of the FC model's (``matched_config``). Same token budget: every
run of one seed sees exactly the same micro-batches (the training order is a pure function of the
seed), for the number of updates that first reaches ``--train-tokens`` real tokens.

For each (pattern, seed) the script trains with ``museformer.train.train`` in a child process (so
that its peak resident memory, ``VmHWM`` of /proc, belongs to that run alone), then measures the
perplexity of held-out (test) songs cut to each ``--eval-lens`` length (``museformer.evaluate``),
samples ``--samples`` songs of ``--bars`` bars (``museformer.generate``, top-k 8, grammar on, the same
sampling seeds for every model) and scores them against the held-out songs with the definitions of
``museformer analyze`` / ``evaluate-structure`` (``museformer.analysis``, ``museformer.metrics``).

Everything is resumable: training resumes from its newest checkpoint, and every finished stage
(training, perplexity, samples) and every finished (pattern, seed) is saved under ``--out`` and
skipped on a rerun. ``--extra NAME=MODEL_DIR`` scores another model (e.g. a bundled one) the same way.

    OMP_NUM_THREADS=1 python benchmarks/structure.py --data DATA_DIR --out RUN_ROOT [--docs docs]
        [--patterns fc full local fine-only summaries-only] [--seeds 0 1] [--train-tokens N]
        [--samples 100] [--bars 33] [--extra NAME=MODEL_DIR] [--quick]

``--quick`` is a tiny setting (a 64-wide model, a few thousand tokens, a few samples) that runs the
whole pipeline in a minute or two. With ``--docs DIR`` the results go to
``DIR/structure_benchmark.{json,csv,png}`` and ``DIR/structure_benchmark_curves.csv``; the Markdown
table is printed and written to ``RUN_ROOT/table.md``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from museformer import analysis, metrics
from museformer.data import BatchOrder, input_lengths, open_split
from museformer.errors import MuseformerError
from museformer.files import write_text_atomic
from museformer.model import Museformer, MuseformerConfig
from museformer.structure import AttentionPattern

PAPER_OFFSETS = (1, 2, 4, 8, 12, 16, 24, 32)
LOCAL_OFFSETS = (1, 2, 3)
SAMPLE_SEED = 10_000  # song i of every model is sampled with seed SAMPLE_SEED + i


def pattern_table() -> dict[str, AttentionPattern]:
    """The five attention patterns of the comparison, by name."""
    return {
        "fc": AttentionPattern(PAPER_OFFSETS, 1),
        "full": AttentionPattern.full(),
        "local": AttentionPattern(LOCAL_OFFSETS, 0),
        "fine-only": AttentionPattern(PAPER_OFFSETS, 0),
        "summaries-only": AttentionPattern((), 1),
    }


PATTERN_NOTES = {
    "fc": "own bar + bars 1,2,4,8,12,16,24,32 back + summaries of all other bars",
    "full": "every earlier token",
    "local": "own bar + the 3 previous bars, no summaries",
    "fine-only": "own bar + bars 1,2,4,8,12,16,24,32 back, no summaries",
    "summaries-only": "own bar + summaries of all earlier bars",
}


# =============================================================================================
# settings
# =============================================================================================
@dataclass(frozen=True)
class BenchConfig:
    """One comparison: data, model size, training budget, evaluation and sampling settings."""

    data: str
    out: str
    patterns: tuple[str, ...] = tuple(pattern_table())
    seeds: tuple[int, ...] = (0, 1)
    d_model: int = 128
    n_layers: int = 3
    n_heads: int = 4
    d_ff: int = 512
    train_tokens: int = 300_000
    batch_tokens: int = 4096
    max_len: int = 2048
    lr: float = 1e-3
    warmup_fraction: float = 0.1
    save_every: int = 10
    eval_lens: tuple[int, ...] = (1024, 2048, 4096)
    eval_songs: int = 0  # 0 = every held-out song
    samples: int = 100
    sample_batch: int = 50
    bars: int = 33  # 33 bars: interval 32 has a pair in every sample
    max_tokens: int = 4096
    max_interval: int = 32
    in_process: bool = False  # train in this process (tests): no per-run peak memory

    def __post_init__(self) -> None:
        table = pattern_table()
        unknown = [p for p in self.patterns if p not in table]
        if unknown:
            raise MuseformerError(f"unknown pattern(s) {unknown}; choose from {', '.join(table)}")
        if not self.patterns or not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise MuseformerError("give at least one pattern and at least one seed (no duplicates)")
        for name in ("d_model", "n_layers", "n_heads", "d_ff", "train_tokens", "batch_tokens", "max_len", "samples",
                     "sample_batch", "bars", "max_tokens", "max_interval", "save_every"):
            if getattr(self, name) < 1:
                raise MuseformerError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.eval_songs < 0 or not self.eval_lens or min(self.eval_lens) < 2:
            raise MuseformerError("--eval-songs must be >= 0 and --eval-lens values >= 2")
        if not 0 <= self.warmup_fraction < 1:
            raise MuseformerError(f"--warmup-fraction must be in [0, 1), got {self.warmup_fraction}")

    @classmethod
    def quick(cls, data: str, out: str, **changes) -> BenchConfig:
        """A tiny setting that runs the whole pipeline in a minute or two on one core."""
        values = dict(d_model=64, n_layers=2, n_heads=2, d_ff=128, train_tokens=12_000, batch_tokens=2048,
                      max_len=1024, save_every=5, eval_lens=(256, 512), eval_songs=6, samples=6, sample_batch=6,
                      bars=9, max_tokens=1024, max_interval=8, seeds=(0,))
        values.update(changes)
        return cls(data, out, **values)


def base_model(bench: BenchConfig, pattern: AttentionPattern, d_ff: int | None = None) -> MuseformerConfig:
    """The model of the comparison with ``pattern`` (bar/onset embeddings half / a quarter of d_model)."""
    return MuseformerConfig.preset(
        "small", d_model=bench.d_model, n_layers=bench.n_layers, n_heads=bench.n_heads,
        d_ff=bench.d_ff if d_ff is None else d_ff, bar_embedding_dim=max(4, bench.d_model // 2 // 2 * 2),
        onset_embedding_dim=max(4, bench.d_model // 4 // 2 * 2), pattern=pattern)


def count_parameters(config: MuseformerConfig, vocab) -> int:
    """Trainable parameters of a model with ``config`` (built, then dropped)."""
    return Museformer(config, vocab=vocab).num_parameters()


def matched_config(bench: BenchConfig, pattern: AttentionPattern, vocab) -> MuseformerConfig:
    """The model with ``pattern`` whose parameter count is closest to the FC model's.

    Only the feed-forward width changes (parameters grow linearly with it), so every pattern keeps
    the same width, depth and heads.
    """
    size = dict(vocab=vocab.name, vocab_size=len(vocab))
    target = count_parameters(base_model(bench, pattern_table()["fc"]).replace(**size), vocab)
    here = count_parameters(base_model(bench, pattern).replace(**size), vocab)
    if here == target:
        return base_model(bench, pattern).replace(**size)
    slope = count_parameters(base_model(bench, pattern, bench.d_ff + 1).replace(**size), vocab) - here
    d_ff = max(1, bench.d_ff + round((target - here) / slope))
    return base_model(bench, pattern, d_ff).replace(**size)


def steps_for_tokens(data: str, bench: BenchConfig, seed: int) -> tuple[int, int]:
    """(updates, real tokens) of the shortest run of ``seed`` that reaches ``bench.train_tokens``.

    The micro-batches of a run are ``BatchOrder(lengths, batch_tokens, seed)`` in order, the same
    for every pattern, so the same number of updates means exactly the same tokens.
    """
    lengths = input_lengths(open_split(data, "train"), bench.max_len)
    order = BatchOrder(lengths, bench.batch_tokens, seed)
    tokens, steps = 0, 0
    while tokens < bench.train_tokens:
        tokens += int(lengths[order[steps][1]].sum())
        steps += 1
    return steps, tokens


def machine() -> dict:
    """CPU model, threads and load average now (the facts every benchmark prints)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from machine import cpu_model

    return {"cpu": cpu_model(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "load_average": [round(x, 2) for x in os.getloadavg()], "torch": torch.__version__}


def _rss_mb(field: str) -> float | None:
    """``VmRSS`` / ``VmHWM`` (peak) of this process from /proc, in MiB (None elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


# =============================================================================================
# training (in a child process, for its peak memory)
# =============================================================================================
def train_config(bench: BenchConfig, name: str, seed: int, run_dir: Path):
    """The ``TrainConfig`` of one (pattern, seed) run."""
    from museformer.train import TrainConfig

    vocab = open_split(bench.data, "train").vocab
    steps, _ = steps_for_tokens(bench.data, bench, seed)
    return TrainConfig(
        data_dir=bench.data, out_dir=str(run_dir), model=matched_config(bench, pattern_table()[name], vocab),
        seed=seed, max_steps=steps, lr=bench.lr, warmup_steps=max(1, round(bench.warmup_fraction * steps)),
        max_len=bench.max_len, val_max_len=min(bench.max_len, 1024), val_max_songs=4, batch_tokens=bench.batch_tokens,
        eval_every=0, save_every=bench.save_every, keep_checkpoints=1, log_every=1, device="cpu", precision="fp32",
        tensorboard=False, progress=False)


def _train_child(config: dict, result_path: str, parent_pid: int) -> None:
    """Child process: train, then write this process's peak memory next to the run."""
    from museformer.train import TrainConfig, train
    from museformer.workers import die_with_parent

    die_with_parent(parent_pid)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    base = _rss_mb("VmRSS")
    train(TrainConfig.from_dict(config), resume=True)
    write_text_atomic(result_path, json.dumps({"base_rss_mb": base, "peak_rss_mb": _rss_mb("VmHWM")}))


def train_run(bench: BenchConfig, name: str, seed: int, run_dir: Path) -> dict:
    """Train one (pattern, seed) to its token budget (resuming), and what the training measured."""
    from museformer.checkpoint import load_config
    from museformer.train import train

    cfg = train_config(bench, name, seed, run_dir)
    memory_file = run_dir / "peak_memory.json"
    if not _finished(run_dir, cfg.max_steps):
        load_before = os.getloadavg()[0]
        if bench.in_process:
            train(cfg, resume=True)
        else:
            import multiprocessing

            child = multiprocessing.get_context("spawn").Process(
                target=_train_child, args=(cfg.to_dict(), str(memory_file), os.getpid()))
            child.start()
            child.join()
            if child.exitcode != 0:
                raise MuseformerError(f"training {name} seed {seed} failed (exit code {child.exitcode}); "
                                      f"rerun to resume from {run_dir}")
        print(f"  trained {name} seed {seed} (load average {load_before:.2f} -> {os.getloadavg()[0]:.2f})",
              flush=True)
    memory = json.loads(memory_file.read_text()) if memory_file.exists() else {}
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    tokens = sum(float(r["tokens"]) for r in rows)
    seconds = sum(float(r["tokens"]) / float(r["tokens_per_s"]) for r in rows)  # update time (log_every = 1)
    model = load_config(run_dir / "model")
    return {
        "steps": len(rows), "tokens": int(tokens), "update_seconds": seconds, "tokens_per_s": tokens / seconds,
        "wall_seconds": float(rows[-1]["elapsed_s"]), "final_loss": float(rows[-1]["loss"]),
        "val_ppl": float(rows[-1]["val_ppl"]) if rows[-1]["val_ppl"] else None,
        "params": count_parameters(model, open_split(bench.data, "train").vocab),
        "d_ff": model.d_ff, "warmup_steps": cfg.warmup_steps, **memory,
    }


def _finished(run_dir: Path, steps: int) -> bool:
    """Whether the run folder holds its final checkpoint (step == ``steps``)."""
    return (run_dir / "checkpoints" / f"step-{steps:08d}" / "train_state.pt").exists()


# =============================================================================================
# perplexity, samples, structure
# =============================================================================================
def eval_songs(bench: BenchConfig) -> np.ndarray:
    """The held-out (test) songs scored: all, or ``eval_songs`` of them evenly spread over the split."""
    n = len(open_split(bench.data, "test"))
    if bench.eval_songs == 0 or bench.eval_songs >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, bench.eval_songs).round().astype(np.int64))


def perplexity(model, bench: BenchConfig) -> list[dict]:
    """Perplexity of the held-out songs cut to each length, and of the tokens between two lengths.

    ``band_perplexity`` of length L scores only the targets after the previous length (a causal
    model gives those first targets the same NLL at every cut, so it is a difference of sums).
    For the same reason only the songs longer than the previous length are scored again at the next
    one: ``total(L) = total(prev) - nll(longer songs, prev) + nll(longer songs, L)`` (equal to scoring
    every song at L, up to the order of float sums).
    """
    from museformer.evaluate import corpus_nll

    test, songs = open_split(bench.data, "test"), eval_songs(bench)
    lengths = test.lengths[songs] + 1  # BOS + tokens (inputs); targets: tokens + EOS
    cpu = torch.device("cpu")
    out, previous, previous_len = [], (0.0, 0), None
    for max_len in sorted(bench.eval_lens):
        if previous_len is None:
            total, count = corpus_nll(model, test, max_len, 16_384, cpu, "fp32", songs)
        else:
            longer = songs[lengths > previous_len]
            total, count = previous
            if len(longer):
                at_prev = corpus_nll(model, test, previous_len, 16_384, cpu, "fp32", longer)
                at_this = corpus_nll(model, test, max_len, 16_384, cpu, "fp32", longer)
                total, count = total - at_prev[0] + at_this[0], count - at_prev[1] + at_this[1]
        band = (total - previous[0]) / (count - previous[1]) if count > previous[1] else math.nan
        out.append({"max_len": max_len, "tokens": count, "songs": len(songs),
                    "songs_longer": int((lengths > max_len).sum()), "perplexity": math.exp(total / count),
                    "band_tokens": count - previous[1], "band_perplexity": math.exp(band) if band == band else None})
        previous, previous_len = (total, count), max_len
    return out


def sample(model, tokenizer, bench: BenchConfig) -> dict:
    """``bench.samples`` songs of ``bench.bars`` bars from scratch (seeds SAMPLE_SEED + i), timed."""
    from museformer.generate import generate

    start = time.perf_counter()
    songs = generate(model=model, tokenizer=tokenizer, num_songs=bench.samples, batch_size=bench.sample_batch,
                     seed=SAMPLE_SEED, max_bars=bench.bars, max_tokens=bench.max_tokens)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": sum(s.num_tokens for s in songs),
            "ids": [s.ids for s in songs], "finish": [s.finish for s in songs], "bars": [s.bars for s in songs]}


def structure(sources, bench: BenchConfig, label: str) -> analysis.SetSummary:
    """Interval statistics and metrics of some songs, exactly as ``analyze`` computes them."""
    results = analysis.analyze_songs(sources, max_interval=bench.max_interval, workers=1, progress=False, desc=label)
    return analysis.summarize(label, results, bench.max_interval)


def token_sources(ids_lists, vocab, label: str) -> list[analysis.SongSource]:
    """Generated songs as token-text inputs of ``analysis`` (its validity check decodes them)."""
    return [analysis.SongSource("tokens", f"{label}/{i}", text=" ".join(vocab.symbols[t] for t in ids))
            for i, ids in enumerate(ids_lists)]


def reference(bench: BenchConfig) -> analysis.SetSummary:
    """The held-out (test) songs, whole: the reference of the Similarity Error."""
    return structure(analysis.find_songs(bench.data, split="test"), bench, "held-out songs")


def score_model(model, tokenizer, bench: BenchConfig, stage_dir: Path, ref: analysis.SetSummary,
                with_perplexity: bool = True) -> dict:
    """Perplexity (cached in ``stage_dir``), samples (cached) and their structure against ``ref``."""
    model.eval()
    ppl_file, samples_file = stage_dir / "perplexity.json", stage_dir / "samples.json"
    if with_perplexity and not ppl_file.exists():
        write_text_atomic(ppl_file, json.dumps(perplexity(model, bench)))
    if not samples_file.exists():
        write_text_atomic(samples_file, json.dumps(sample(model, tokenizer, bench)))
    drawn = json.loads(samples_file.read_text())
    summary = structure(token_sources(drawn["ids"], tokenizer.vocab, stage_dir.name), bench, stage_dir.name)
    curve = summary.stats.curve
    return {
        "perplexity": json.loads(ppl_file.read_text()) if with_perplexity else None,
        "samples": {"songs": len(drawn["ids"]), "seconds": drawn["seconds"], "tokens": drawn["tokens"],
                    "tokens_per_s": drawn["tokens"] / drawn["seconds"], "mean_bars": float(np.mean(drawn["bars"])),
                    "reached_bars": float(np.mean([b >= bench.bars for b in drawn["bars"]])),
                    "validity_rate": summary.validity_rate, "metrics": summary.means},
        "similarity_curve": [None if math.isnan(v) else float(v) for v in curve],
        "similarity_error": metrics.similarity_error(curve, ref.stats.curve, bench.max_interval),
    }


def run_one(bench: BenchConfig, name: str, seed: int, ref: analysis.SetSummary) -> dict:
    """Train, evaluate and sample one (pattern, seed); the result is saved and reused on a rerun."""
    from museformer.checkpoint import load

    out = Path(bench.out)
    result_file = out / "results" / f"{name}-seed{seed}.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    run_dir = out / "runs" / f"{name}-seed{seed}"
    print(f"{time.strftime('%H:%M:%S')} {name} seed {seed}: training", flush=True)
    trained = train_run(bench, name, seed, run_dir)
    model, tokenizer = load(run_dir / "model")
    print(f"{time.strftime('%H:%M:%S')} {name} seed {seed}: perplexity and {bench.samples} samples", flush=True)
    scored = score_model(model, tokenizer, bench, run_dir, ref)
    result = {"pattern": name, "seed": seed, "pattern_config": pattern_table()[name].to_dict(), "train": trained,
              **scored, "machine": machine()}
    result_file.parent.mkdir(parents=True, exist_ok=True)
    analysis.write_json(result_file, result)
    print(f"{time.strftime('%H:%M:%S')} {name} seed {seed}: SE {result['similarity_error']:.4f}, "
          f"ppl {[round(p['perplexity'], 3) for p in result['perplexity']]}, "
          f"{trained['tokens_per_s']:.0f} tokens/s", flush=True)
    return json.loads(result_file.read_text())  # as a rerun reads it


def run_extra(bench: BenchConfig, label: str, model_dir: str, ref: analysis.SetSummary) -> dict:
    """Score another model (samples, Similarity Error; perplexity when its vocabulary is the data's)."""
    from museformer.checkpoint import load, resolve_checkpoint

    out = Path(bench.out)
    result_file = out / "results" / f"extra-{label}.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    directory = resolve_checkpoint(model_dir)
    model, tokenizer = load(directory)
    same_vocab = tokenizer.vocab.symbols == open_split(bench.data, "test").vocab.symbols
    stage = out / "extra" / label
    stage.mkdir(parents=True, exist_ok=True)
    print(f"{time.strftime('%H:%M:%S')} extra model {label} ({directory}): scoring", flush=True)
    scored = score_model(model, tokenizer, bench, stage, ref, with_perplexity=same_vocab)
    result = {"pattern": label, "seed": None, "model_dir": str(directory), "model_config": model.config.to_dict(),
              "train": {"params": model.num_parameters()}, **scored, "machine": machine()}
    result_file.parent.mkdir(parents=True, exist_ok=True)
    analysis.write_json(result_file, result)
    return json.loads(result_file.read_text())  # as a rerun reads it


# =============================================================================================
# reports: table, CSV, JSON, figure
# =============================================================================================
def _spread(values: list[float], fmt: str) -> str:
    """``mean (a / b)`` over seeds, or the single value."""
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return "n/a"
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(float(np.mean(values)), fmt)} ({' / '.join(format(v, fmt) for v in values)})"


def _ppl(result: dict, max_len: int, key: str = "perplexity") -> float | None:
    for p in result.get("perplexity") or []:
        if p["max_len"] == max_len:
            return p[key]
    return None


def table(results: list[dict], ref: analysis.SetSummary, bench: BenchConfig) -> str:
    """The Markdown table: one row per pattern (seeds as ``mean (seed values)``), then extra models."""
    lens = sorted(bench.eval_lens)
    head = (["pattern", "params"] + [f"test ppl @{L:,}" for L in lens]
            + [f"ppl of tokens {a:,}-{b:,}" for a, b in zip(lens, lens[1:])]
            + [f"similarity error (1-{bench.max_interval})", "train tokens/s", "peak RSS (MiB)",
               "samples reaching the bars", "validity"])
    rows = []
    by_name: dict[str, list[dict]] = {}
    for r in results:
        by_name.setdefault(r["pattern"], []).append(r)
    for name, group in by_name.items():
        group = sorted(group, key=lambda r: (r["seed"] is None, r["seed"]))
        rows.append([name if group[0]["seed"] is not None else f"{name} (extra model)",
                     f"{group[0]['train']['params']:,}"]
                    + [_spread([_ppl(r, L) for r in group], ".3f") for L in lens]
                    + [_spread([_ppl(r, L, "band_perplexity") for r in group], ".3f") for L in lens[1:]]
                    + [_spread([r["similarity_error"] for r in group], ".4f"),
                       _spread([r["train"].get("tokens_per_s") for r in group], ".0f"),
                       _spread([r["train"].get("peak_rss_mb") for r in group], ".0f"),
                       _spread([r["samples"]["reached_bars"] for r in group], ".2f"),
                       _spread([r["samples"]["validity_rate"] for r in group], ".2f")])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_csv(path: Path, results: list[dict], bench: BenchConfig) -> None:
    """One row per (pattern, seed) and per extra model."""
    lens = sorted(bench.eval_lens)
    columns = (["pattern", "seed", "params", "train_tokens", "train_steps", "tokens_per_s", "peak_rss_mb",
                "base_rss_mb", "final_train_loss"] + [f"ppl_{L}" for L in lens] + [f"band_ppl_{L}" for L in lens[1:]]
               + ["similarity_error", "samples", "mean_bars", "reached_bars", "validity_rate", "sample_tokens_per_s"])
    lines = [",".join(columns)]
    for r in results:
        t, s = r["train"], r["samples"]
        values = ([r["pattern"], r["seed"], t.get("params"), t.get("tokens"), t.get("steps"), t.get("tokens_per_s"),
                   t.get("peak_rss_mb"), t.get("base_rss_mb"), t.get("final_loss")]
                  + [_ppl(r, L) for L in lens] + [_ppl(r, L, "band_perplexity") for L in lens[1:]]
                  + [r["similarity_error"], s["songs"], s["mean_bars"], s["reached_bars"], s["validity_rate"],
                     s["tokens_per_s"]])
        lines.append(",".join("" if v is None else (f"{v:.6g}" if isinstance(v, float) else str(v)) for v in values))
    write_text_atomic(path, "\n".join(lines) + "\n")


def write_curves(path: Path, results: list[dict], ref: analysis.SetSummary) -> None:
    """The similarity curve L(k) of the held-out songs and of every model's samples, one column each."""
    names = [f"{r['pattern']}-seed{r['seed']}" if r["seed"] is not None else r["pattern"] for r in results]
    curves = [ref.stats.curve.tolist()] + [r["similarity_curve"] for r in results]
    lines = [",".join(["interval", "held_out"] + names)]
    for k in range(len(curves[0])):
        cells = [str(k + 1)] + ["" if c[k] is None or c[k] != c[k] else f"{c[k]:.6f}" for c in curves]
        lines.append(",".join(cells))
    write_text_atomic(path, "\n".join(lines) + "\n")


def plot(path: Path, results: list[dict], ref: analysis.SetSummary, bench: BenchConfig) -> None:
    """One figure: similarity curves (samples vs held-out), Similarity Error and perplexity per pattern."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_name: dict[str, list[dict]] = {}
    for r in results:
        by_name.setdefault(r["pattern"], []).append(r)
    k = np.arange(1, bench.max_interval + 1)
    fig, (curve_ax, se_ax, ppl_ax) = plt.subplots(1, 3, figsize=(16, 4.8), gridspec_kw={"width_ratios": [2.2, 1, 1]})
    curve_ax.plot(k, ref.stats.curve, color="black", lw=2.5, label=f"held-out songs ({ref.songs})")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    names = list(by_name)
    for i, name in enumerate(names):
        curves = np.array([[np.nan if v is None else v for v in r["similarity_curve"]] for r in by_name[name]])
        colour = colours[i % len(colours)]
        style = "--" if by_name[name][0]["seed"] is None else "-"
        curve_ax.plot(k, np.nanmean(curves, axis=0), style, color=colour, lw=1.4, label=name)
        if len(curves) > 1:
            curve_ax.fill_between(k, np.nanmin(curves, axis=0), np.nanmax(curves, axis=0), color=colour, alpha=0.15)
        ses = [r["similarity_error"] for r in by_name[name]]
        se_ax.bar(i, np.mean(ses), color=colour, alpha=0.6)
        se_ax.scatter([i] * len(ses), ses, color="black", s=12, zorder=3)
        ppls = [_ppl(r, min(bench.eval_lens)) for r in by_name[name]]
        ppls = [p for p in ppls if p is not None]
        if ppls:
            ppl_ax.bar(i, np.mean(ppls), color=colour, alpha=0.6)
            ppl_ax.scatter([i] * len(ppls), ppls, color="black", s=12, zorder=3)
    curve_ax.set_xlabel("interval k (bars)")
    curve_ax.set_ylabel("mean bar similarity L(k)")
    curve_ax.set_title(f"bar similarity: {bench.samples} samples per model (seeds shaded) vs held-out songs")
    curve_ax.set_xticks([1, 2, 4, 8, 12, 16, 24, 32][: sum(1 for x in (1, 2, 4, 8, 12, 16, 24, 32)
                                                         if x <= bench.max_interval)])
    curve_ax.legend(fontsize=8)
    for ax, title in ((se_ax, f"similarity error, intervals 1-{bench.max_interval}"),
                      (ppl_ax, f"test perplexity @{min(bench.eval_lens):,} tokens")):
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(results: list[dict], ref: analysis.SetSummary, bench: BenchConfig, docs: Path | None,
           figure: bool = True) -> str:
    """Write the table (``OUT/table.md``) and, with ``docs``, the JSON, CSVs and (``figure``) the figure there."""
    text = table(results, ref, bench)
    write_text_atomic(Path(bench.out) / "table.md", text)
    if docs is not None:
        docs.mkdir(parents=True, exist_ok=True)
        settings = dataclasses.asdict(bench)
        payload = {"settings": settings, "data_sha256": data_fingerprint(bench.data), "machine": machine(),
                   "sample_seed": SAMPLE_SEED,
                   "held_out": {"songs": ref.songs, "similarity_curve": [None if v != v else float(v)
                                                                       for v in ref.stats.curve],
                                "metrics": ref.means},
                   "results": results}
        analysis.write_json(docs / "structure_benchmark.json", payload)
        write_csv(docs / "structure_benchmark.csv", results, bench)
        write_curves(docs / "structure_benchmark_curves.csv", results, ref)
        if figure:
            plot(docs / "structure_benchmark.png", results, ref, bench)
    return text


# =============================================================================================
# main
# =============================================================================================
SETTINGS_FILE = "settings.json"
FREE_SETTINGS = ("patterns", "seeds", "in_process")  # may differ between runs into one --out


def data_fingerprint(data: str | os.PathLike) -> str:
    """SHA-256 of a prepared corpus's meta.json and shards: any rebuild of the data changes it."""
    import hashlib

    digest = hashlib.sha256()
    for name in ["meta.json"] + [f"{s}.{part}" for s in ("train", "valid", "test")
                                 for part in ("offsets.npy", "tokens.bin")]:
        path = Path(data) / name
        digest.update(name.encode() + b"\0" + (path.read_bytes() if path.exists() else b"missing") + b"\0")
    return digest.hexdigest()


def check_settings(bench: BenchConfig) -> str:
    """Record the settings and the data's fingerprint in ``OUT/settings.json``, or check them.

    A folder of finished runs is reused only with the same settings (other patterns or seeds may be
    added) and the same data, so a rerun never mixes results of two setups. Returns the fingerprint.
    """
    out = Path(bench.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(bench))).items() if k not in FREE_SETTINGS}
    data_hash = data_fingerprint(bench.data)
    path = out / SETTINGS_FILE
    if path.exists():
        saved = json.loads(path.read_text())
        differ = sorted(k for k in set(settings) | set(saved.get("settings", {}))
                        if settings.get(k) != saved["settings"].get(k))
        if differ:
            raise MuseformerError(f"{out} holds runs made with other settings ({', '.join(differ)}); "
                                  f"use those settings or a new --out")
        if saved.get("data_sha256") != data_hash:
            raise MuseformerError(f"{bench.data} is not the data the runs in {out} were made with (it was rebuilt?); "
                                  f"use a new --out")
    else:
        write_text_atomic(path, json.dumps({"settings": settings, "data_sha256": data_hash}, indent=1))
    return data_hash


def run(bench: BenchConfig, extras: dict[str, str] | None = None, docs: Path | None = None
        ) -> tuple[list[dict], analysis.SetSummary]:
    """The whole comparison (seed-major: every pattern of seed 0 first), then the extra models.

    Returns the results (one per (pattern, seed), then one per extra model) and the reference.
    """
    data_hash = check_settings(bench)
    ref = reference(bench)
    results = []
    for seed in bench.seeds:
        for name in bench.patterns:
            results.append(run_one(bench, name, seed, ref))
            if data_fingerprint(bench.data) != data_hash:
                raise MuseformerError(f"{bench.data} changed during the run (after {name} seed {seed}); its results "
                                      f"mix two versions of the data: start again with a new --out")
            report(results, ref, bench, docs, figure=False)  # the table so far
    for label, model_dir in (extras or {}).items():
        results.append(run_extra(bench, label, model_dir, ref))
    report(results, ref, bench, docs)
    return results, ref


def parse_args(argv=None) -> tuple[BenchConfig, dict[str, str], Path | None]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="prepared corpus (museformer prepare)")
    p.add_argument("--out", required=True, help="folder for runs, stage files and results (resumable)")
    p.add_argument("--docs", type=Path, help="write structure_benchmark.{json,csv,png} here")
    p.add_argument("--quick", action="store_true", help="a tiny setting for a smoke run")
    p.add_argument("--extra", action="append", default=[], metavar="NAME=MODEL_DIR",
                   help="also score this model (samples, similarity error, perplexity)")
    defaults = BenchConfig("", "")
    for f in dataclasses.fields(BenchConfig):
        if f.name in ("data", "out", "in_process"):
            continue
        flag = "--" + f.name.replace("_", "-")
        value = getattr(defaults, f.name)
        if isinstance(value, tuple):
            p.add_argument(flag, nargs="+", type=type(value[0]))
        else:
            p.add_argument(flag, type=type(value))
    args = p.parse_args(argv)
    changes = {f.name: (tuple(v) if isinstance(v, list) else v) for f in dataclasses.fields(BenchConfig)
               if (v := getattr(args, f.name, None)) is not None and f.name not in ("data", "out")}
    bench = BenchConfig.quick(args.data, args.out, **changes) if args.quick else BenchConfig(args.data, args.out,
                                                                                           **changes)
    extras = {}
    for item in args.extra:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            p.error(f"--extra must be NAME=MODEL_DIR, got {item!r}")
        extras[label] = path
    return bench, extras, args.docs


def main(argv=None) -> int:
    bench, extras, docs = parse_args(argv)
    print(f"# {json.dumps(machine())}", flush=True)
    print(f"# {json.dumps(dataclasses.asdict(bench))}", flush=True)
    try:
        results, ref = run(bench, extras, docs)
    except MuseformerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print((Path(bench.out) / "table.md").read_text())
    print(f"# done {json.dumps(machine())}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
