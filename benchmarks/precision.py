"""bf16 decoding against float32: test-split perplexity and sampling speed of one checkpoint.

bf16 here is what ``museformer generate --precision bf16`` decodes with: the model's weights cast
to bfloat16 (``generate.decoding_model``), so activations and the cache are bfloat16 too. Reports,
with the same songs and seeds for both precisions in one run:

1. perplexity of ``--songs`` test songs (evenly spread over the split, cut to ``--max-len``), and
   the relative difference (the goal: within 1% of float32);
2. tokens/s of real sampling (grammar on, top-k 8, EOS forbidden; ``benchmarks/generate.py``'s
   ``sampling_rate``) for one song and for a batch.

On a CPU without native bf16 (AVX2 only) bf16 products are emulated, so (2) shows bf16 slower
there; ``museformer generate --precision auto`` therefore picks bf16 only where the hardware has it.

Usage: python benchmarks/precision.py [--checkpoint DIR] DATA_DIR [--songs 100] [--threads 1] [-o F.json]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from generate import sampling_rate  # benchmarks/generate.py's
from machine import describe, header

from museformer.checkpoint import load
from museformer.data import Corpus
from museformer.evaluate import corpus_nll
from museformer.generate import bundled_checkpoint, decoding_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", help="a prepared corpus (its test split is scored)")
    ap.add_argument("--checkpoint", default=None, help="default: the bundled folk model")
    ap.add_argument("--split", default="test")
    ap.add_argument("--songs", type=int, default=100, help="songs scored, evenly spread over the split (0 = all)")
    ap.add_argument("--max-len", type=int, default=2560)
    ap.add_argument("--tokens", type=int, default=300, help="tokens per song in the speed runs")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("-o", "--output", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    info = describe()
    print(header(info), flush=True)
    directory = Path(args.checkpoint) if args.checkpoint else bundled_checkpoint("folk")
    fp32, tokenizer = load(directory)
    fp32.eval()
    bf16 = decoding_model(fp32, "bf16", owned=False)
    corpus = Corpus(args.data, args.split)
    n = len(corpus)
    songs = np.arange(n) if args.songs <= 0 or args.songs >= n else \
        np.unique(np.linspace(0, n - 1, args.songs).round().astype(np.int64))
    report = {"machine": info, "checkpoint": str(directory), "data": str(args.data), "split": args.split,
              "songs": len(songs), "max_len": args.max_len}
    device = torch.device("cpu")
    with torch.inference_mode():
        for name, model in (("fp32", fp32), ("bf16", bf16)):
            start = time.perf_counter()
            total, count = corpus_nll(model, corpus, args.max_len, 16_384, device, songs=songs)
            report[f"ppl_{name}"] = math.exp(total / count)
            report[f"eval_seconds_{name}"] = round(time.perf_counter() - start, 1)
            report["tokens_scored"] = count
            print(f"{name}: perplexity {report[f'ppl_{name}']:.5f} over {count} tokens "
                  f"({report[f'eval_seconds_{name}']} s)", flush=True)
    report["ppl_relative_difference"] = report["ppl_bf16"] / report["ppl_fp32"] - 1
    print(f"bf16 vs fp32 perplexity: {100 * report['ppl_relative_difference']:+.3f}%", flush=True)
    for batch in (1, args.batch):
        for name, model in (("fp32", fp32), ("bf16", bf16)):
            rate = sampling_rate(model, tokenizer, batch, args.tokens)
            report[f"tokens_per_s_{name}_batch{batch}"] = round(rate, 1)
            print(f"sampling {name}, batch {batch}: {rate:.1f} tokens/s", flush=True)
    print(header(describe()))  # the load may have changed during the run
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
