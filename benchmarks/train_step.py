"""Training speed: tokens/s and MFU of full updates (forward, backward, clip, Adam) on a prepared corpus.

Runs the same pieces as ``museformer train`` (token-budget batches of real songs, the config's
precision, AdamW, grad-norm clip) for a few updates and prints a Markdown row per setting plus a JSON
line. Tokens counted are the non-padding target tokens of each update (what ``metrics.csv`` reports).

``--window N`` trains on one window of N tokens per update instead: consecutive songs concatenated
(each song's BOS dropped after the first, bar and onset ids recomputed), for lengths longer than
any song. ``--pattern full`` is plain causal attention over the same tokens.

MFU is model FLOPs (6 x matmul parameters x tokens, plus 12 x d_model x the query-key pairs the
pattern reads per layer) over time, against this machine's measured fp32 matmul peak (``machine.py``);
the summary stream's extra work is not counted as useful. ``peak_rss_mb`` is the process's
resident-set high-water mark (run one setting per process to compare them).

    python benchmarks/train_step.py --data DATA_DIR [--preset small] [--max-len 2048] [--batch-tokens 8192]
        [--window 8192] [--pattern fc|full] [--attention-dropout 0.1] [--backend auto] [--label NAME]

Run it with ``PYTHONPATH=/path/to/older/src`` to time an older commit the same way (options it lacks
are left at its defaults). ``DATA_DIR`` is a prepared corpus, e.g. ``museformer prepare --corpus bach /tmp/bach``.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import museformer
from museformer.data import Corpus
from museformer.model import Museformer, MuseformerConfig
from museformer.structure import AttentionPattern, bar_ids, bar_layout, dense_masks, onset_ids

try:  # this package's layout
    from museformer.data import BatchOrder, collate, input_lengths
    from museformer.evaluate import batch_nll
except ImportError:  # the previous commit's, benchmarked side by side (PYTHONPATH=<its src>)
    from museformer.train import BatchOrder, batch_nll, collate
    from museformer.train import _input_lengths as input_lengths

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe, header  # noqa: E402


def windows(corpus: Corpus, length: int):
    """Endless windows of ``length`` tokens over the concatenated songs, as collated batches of one."""
    vocab, pieces, total, song = corpus.vocab, [], 0, 0
    while True:
        inputs = corpus[song % len(corpus)].model_inputs()
        ids, targets = inputs["input_ids"], inputs["target_ids"]
        if pieces:  # only the first song keeps its BOS
            ids, targets = ids[1:], targets[1:]
        pieces.append((ids, targets))
        total += len(ids)
        song += 1
        if total >= length:
            ids = np.concatenate([p[0] for p in pieces])[:length]
            targets = np.concatenate([p[1] for p in pieces])[:length]
            yield collate([{"input_ids": ids, "target_ids": targets, "bar_ids": bar_ids(ids, vocab).numpy(),
                            "onset_ids": onset_ids(ids, vocab).numpy()}])
            pieces, total = [], 0


def model_flops(model: Museformer, batch: dict) -> float:
    """Useful FLOPs of one update: 6 x matmul weights x tokens + 12 x D x (query-key pairs) x layers."""
    tokens = int((batch["input_ids"] != 0).sum())
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    pattern = model.config.pattern
    _, regular_mask = dense_masks(bar_layout(batch["input_ids"].cpu(), model.vocab, pattern), pattern)
    pairs = int(regular_mask.sum())
    return 6 * matmul * tokens + 12 * model.config.d_model * pairs * model.config.n_layers


def run(corpus: Corpus, args, batch_tokens: int, peak: float) -> dict:
    vocab = corpus.vocab
    torch.manual_seed(0)
    overrides = {"attention_dropout": args.attention_dropout} if args.attention_dropout is not None else {}
    if args.backend:
        overrides["attention_backend"] = args.backend
    if args.pattern == "full":
        overrides["pattern"] = AttentionPattern.full()
    cfg = MuseformerConfig.preset(args.preset, vocab=vocab.name, vocab_size=len(vocab), **overrides)
    device = torch.device(args.device)
    model = Museformer(cfg, vocab=vocab).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-9, weight_decay=0.01)
    if args.window:
        source = windows(corpus, args.window)
        batches = (next(source) for _ in iter(int, 1))
    else:
        order = BatchOrder(input_lengths(corpus, args.max_len), batch_tokens, seed=0)
        batches = (collate([corpus[int(i)].model_inputs(max_len=args.max_len) for i in order[step][1]])
                   for step in range(10**6))
    times, tokens, flops = [], [], []
    for step in range(args.warmup + args.steps):
        batch = next(batches)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        nll, n = batch_nll(model, batch, device, args.precision)
        (nll / n).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 25.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
            tokens.append(n)
            flops.append(model_flops(model, batch))
    return {
        "label": args.label, "museformer": museformer.__file__, "preset": args.preset,
        "parameters": model.num_parameters(), "backend": cfg.attention_backend, "pattern": cfg.pattern.kind,
        "attention_dropout": cfg.attention_dropout, "precision": args.precision, "max_len": args.max_len,
        "window": args.window, "batch_tokens": batch_tokens, "steps": args.steps,
        "tokens_per_s": sum(tokens) / sum(times), "s_per_step": float(np.median(times)),
        "mean_tokens_per_step": float(np.mean(tokens)), "mfu": sum(flops) / sum(times) / (peak * 1e9),
        # the whole process (corpus, model, optimizer, every step), so one setting per process compares
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="prepared corpus folder")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (MFU is then against the bf16 peak)")
    ap.add_argument("--preset", default="small", choices=["paper", "small", "tiny"])
    ap.add_argument("--max-len", type=int, default=2048, help="songs truncated to this many tokens")
    ap.add_argument("--batch-tokens", type=int, nargs="+", default=[8192])
    ap.add_argument("--window", type=int, help="one window of this many tokens over concatenated songs per update")
    ap.add_argument("--pattern", choices=["fc", "full"], default="fc")
    ap.add_argument("--attention-dropout", type=float, help="override the preset's attention dropout")
    ap.add_argument("--backend", help="override the config's attention backend")
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--steps", type=int, default=3, help="timed updates")
    ap.add_argument("--warmup", type=int, default=1, help="untimed updates first")
    ap.add_argument("--label", default="", help="a name for the row")
    ap.add_argument("--peak", type=float, help="fp32 matmul GFLOP/s (measured when not given)")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    info = describe(args.device) if args.peak is None else None
    peak = args.peak or info["peak_bf16_gflops" if args.device == "cuda" else "peak_fp32_gflops"]
    if info:
        print(header(info), flush=True)
    corpus = Corpus(args.data, "train")
    for bt in ([args.window] if args.window else args.batch_tokens):
        r = run(corpus, args, bt, peak)
        print(f"| {r['label']} | {r['pattern']} | {r['backend']} | {r['precision']} | {r['attention_dropout']} | "
              f"{r['window'] or r['max_len']} | {bt} | {r['tokens_per_s']:,.0f} | {r['s_per_step']:.2f} | "
              f"{r['mfu']:.1%} | {r['peak_rss_mb']:,.0f} |", flush=True)
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
