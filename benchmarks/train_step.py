"""Training speed: tokens/s of full updates (forward, backward, clip, Adam) on a prepared corpus.

Runs the same pieces as ``museformer train`` (token-budget batches of real songs, bf16 autocast on
CUDA / float32 on CPU, AdamW, grad-norm clip) for a few updates and prints a Markdown row per
setting plus a JSON line. Tokens counted are the non-padding target tokens of each update, the same
number ``metrics.csv`` reports. ``tokens/CPU-s`` divides by the CPU time of this process (all its
threads), a figure that is less sensitive to other processes competing for the cores.

    python benchmarks/train_step.py --data DATA_DIR [--preset small] [--device cpu]
        [--max-len 2048] [--batch-tokens 4096 8192] [--steps 6] [--warmup 2]

``DATA_DIR`` is a prepared corpus, e.g. ``museformer prepare --corpus bach /tmp/bach``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import numpy as np
import torch

import museformer
from museformer.data import BatchOrder, Corpus, corpus_batch, input_lengths
from museformer.evaluate import batch_nll
from museformer.model import Museformer, MuseformerConfig


def run(corpus: Corpus, preset: str, device: torch.device, max_len: int, batch_tokens: int, steps: int,
        warmup: int, compile_model: bool) -> dict:
    vocab = corpus.vocab
    torch.manual_seed(0)
    cfg = MuseformerConfig.preset(preset, vocab=vocab.name, vocab_size=len(vocab))
    model = Museformer(cfg, vocab=vocab).to(device).train()
    runner = torch.compile(model) if compile_model else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-9, weight_decay=0.01)
    lengths = input_lengths(corpus, max_len)
    order = BatchOrder(lengths, batch_tokens, seed=0)
    precision = "auto"
    times, cpu_times, tokens, padded = [], [], [], []
    for step in range(warmup + steps):
        _, songs = order[step]
        batch = corpus_batch(corpus, songs, max_len)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        nll, n = batch_nll(runner, batch, device, precision)
        (nll / n).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 25.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
            tokens.append(n)
            padded.append(batch["input_ids"].numel())
    return {
        "preset": preset, "parameters": model.num_parameters(), "device": str(device), "max_len": max_len,
        "batch_tokens": batch_tokens, "steps": steps, "tokens_per_s": sum(tokens) / sum(times),
        "tokens_per_cpu_s": sum(tokens) / sum(cpu_times),
        "median_s_per_step": statistics.median(times), "mean_tokens_per_step": float(np.mean(tokens)),
        "padding_fraction": 1 - sum(tokens) / sum(padded),
        "peak_gpu_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "train_tokens": int(lengths.sum()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="prepared corpus folder")
    ap.add_argument("--preset", nargs="+", default=["small"], choices=["paper", "small", "tiny"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--max-len", type=int, default=2048, help="songs truncated to this many tokens")
    ap.add_argument("--batch-tokens", type=int, nargs="+", default=[4096])
    ap.add_argument("--steps", type=int, default=6, help="timed updates")
    ap.add_argument("--warmup", type=int, default=2, help="untimed updates first")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    args = ap.parse_args()

    corpus = Corpus(args.data, "train")
    device = torch.device(args.device)
    print(f"# {datetime.date.today()}  {platform.processor() or platform.machine()}  {os.cpu_count()} CPUs  "
          f"torch {torch.__version__}  museformer {museformer.__version__}  threads {torch.get_num_threads()}  "
          f"load {os.getloadavg()[0]:.1f}  {corpus!r}")
    if device.type == "cuda":
        print(f"# {torch.cuda.get_device_name(device)}")
    print("| preset | params | device | max_len | batch_tokens | tokens/s | tokens/CPU-s | s/update | tokens/update | "
          "padding | epoch (train split) |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for preset in args.preset:
        for bt in args.batch_tokens:
            r = run(corpus, preset, device, args.max_len, bt, args.steps, args.warmup, args.compile)
            epoch_min = r["train_tokens"] / r["tokens_per_s"] / 60
            print(f"| {preset} | {r['parameters'] / 1e6:.2f} M | {r['device']} | {r['max_len']} | {bt} | "
                  f"{r['tokens_per_s']:,.0f} | {r['tokens_per_cpu_s']:,.0f} | {r['median_s_per_step']:.2f} | {r['mean_tokens_per_step']:,.0f} | "
                  f"{r['padding_fraction']:.1%} | {epoch_min:.1f} min |", flush=True)
            print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
