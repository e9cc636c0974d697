"""Generation speed: the exact cache vs re-running the whole prefix per token (the official decoder).

Measures, with the same model in the same run:

1. per-token decode time of the cache at several song lengths (teacher-forced on a made-up song so
   every length is reached), and the time of one full forward over the same prefix (which is what
   the official decoder pays for *every* token); their ratio is the speed-up at that length;
2. the total time to produce an N-token song both ways: the cache is timed for real over all N
   tokens; full recompute is the sum over every prefix length of one forward, integrated from the
   forwards measured in (1) (linear interpolation; stated in the output);
3. tokens/s of real sampling (top-k 8, grammar on and off) for one song and for a batch.

Usage: python benchmarks/generate.py [--preset paper] [--tokens 10000] [--threads 1] [--batch 8]
       python benchmarks/generate.py --sampling-only --threads 1   # just (3), a minute
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

import numpy as np
import torch

from museformer.cache import Decoder
from museformer.generate import SampleConfig, build_grammar, stream
from museformer.model import Museformer, MuseformerConfig
from museformer.structure import toy_song
from museformer.tokenizer import Tokenizer
from museformer.vocab import BOS_ID


def cpu_model() -> str:
    """The CPU model name as ``lscpu`` prints it (platform.processor() is often empty on Linux)."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def made_up_song(tokens: int, vocab) -> torch.Tensor:
    """A song of about 60 tokens per bar (20 notes), long enough for ``tokens``."""
    song = toy_song(tokens // 40 + 2, vocab, seed=0, min_notes=10, max_notes=30)
    return song[: tokens + 1]


@torch.no_grad()
def forward_time(model, song: torch.Tensor, length: int, repeats: int = 2) -> float:
    """Seconds for one full forward over the first ``length`` tokens (best of ``repeats``)."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        model(song[None, :length])
        best = min(best, time.perf_counter() - t)
    return best


@torch.no_grad()
def cached_times(model, song: torch.Tensor, probes: list[int], window: int = 50) -> tuple[dict[int, float], float]:
    """Teacher-force the whole song through the cache; per-token seconds around each probe length
    (mean over ``window`` steps) and the total seconds for all steps."""
    dec = Decoder(model)
    start = time.perf_counter()
    dec.prefill([song[:1]])
    stamps = []
    for t in range(1, len(song)):
        dec.step(song[t : t + 1])
        stamps.append(time.perf_counter())
    total = stamps[-1] - start
    stamps = np.array([start] + stamps)
    per_token = {}
    for p in probes:
        lo, hi = max(p - window, 1), min(p, len(stamps) - 1)
        per_token[p] = (stamps[hi] - stamps[lo]) / (hi - lo)
    return per_token, total


def sampling_rate(model, tokenizer, batch: int, tokens: int, seed: int = 0, grammar: bool = True,
                  repeats: int = 1) -> float:
    """Tokens per second of real sampling (top-k 8, EOS forbidden), ``batch`` songs from BOS
    (best of ``repeats`` runs: the machine is shared, so the best run is the least disturbed)."""
    cfg = SampleConfig(seed=seed, max_tokens=tokens, min_tokens=tokens, grammar=grammar)
    rules = build_grammar(tokenizer, cfg)
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        n = sum(1 for _ in stream(model, [[] for _ in range(batch)], cfg, seeds=list(range(batch)), grammar=rules))
        best = max(best, n / (time.perf_counter() - t))
    return best


def matmul_ceiling(model, batches=(1, 64), repeats: int = 20) -> None:
    """Tokens/s if a decoding step did nothing but its weight products (every layer's Q/K/V, out,
    FFN, and the output projection; transposed layout, as the model uses without autograd on CPU),
    in float32 and bfloat16: the ceiling any decoder reaches on this CPU."""
    c = model.config
    shapes = [(c.d_model, 3 * c.d_model), (c.d_model, c.d_model), (c.d_model, c.d_ff), (c.d_ff, c.d_model)] * c.n_layers
    shapes.append((c.d_model, c.vocab_size))
    for dtype in (torch.float32, torch.bfloat16):
        weights = [torch.randn(*s).to(dtype) for s in shapes]
        for batch in batches:
            inputs = {n: torch.randn(batch, n).to(dtype) for n in {s[0] for s in shapes}}
            best = float("inf")
            runs = repeats if dtype == torch.float32 else 1  # bf16 without native support is very slow
            for _ in range(2):
                t = time.perf_counter()
                for _ in range(runs):
                    for w in weights:
                        inputs[w.shape[0]] @ w
                best = min(best, (time.perf_counter() - t) / runs)
            print(f"weight products only, {str(dtype)[6:]}, batch {batch}: {best * 1e3:.2f} ms/step = "
                  f"{batch / best:.0f} tokens/s ceiling")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--tokens", type=int, default=10000)
    ap.add_argument("--probes", default="1000,2500,5000,7500,10000")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--sample-tokens", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3, help="sampling runs per setting (the best is reported)")
    ap.add_argument("--sampling-only", action="store_true", help="skip the cache-vs-recompute comparison")
    ap.add_argument("--ceiling", action="store_true", help="also time the weight products alone (fp32, bf16)")
    ap.add_argument("--grammar-on-only", action="store_true", help="sample with the grammar only (half the time)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokenizer = Tokenizer.preset("lmd6")
    model = Museformer(MuseformerConfig.preset(args.preset)).eval()
    song = made_up_song(args.tokens, model.vocab)
    assert int(song[0]) == BOS_ID
    probes = [int(p) for p in args.probes.split(",") if int(p) <= args.tokens]
    import museformer

    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC  {cpu_model()} "
          f"({os.cpu_count()} CPUs, capability {torch.backends.cpu.get_cpu_capability()})  "
          f"code {os.path.dirname(museformer.__file__)}  "
          f"torch {torch.__version__}  threads {args.threads}  preset {args.preset} "
          f"({model.num_parameters() / 1e6:.1f} M parameters)  load average {os.getloadavg()[0]:.2f}")
    if not args.sampling_only:
        compare(model, song, probes, args.tokens)
    if args.ceiling:
        matmul_ceiling(model, (1, args.batch))
    settings = ((1, True), (1, False), (args.batch, True), (args.batch, False))
    for batch, grammar in (s for s in settings if s[1] or not args.grammar_on_only):
        rate = sampling_rate(model, tokenizer, batch, args.sample_tokens, grammar=grammar, repeats=args.repeats)
        print(f"sampling (top-k 8, grammar {'on' if grammar else 'off'}), batch {batch}: {rate:.0f} tokens/s "
              f"({args.sample_tokens} tokens per song, best of {args.repeats})")
    print(f"# load average at the end {os.getloadavg()[0]:.2f}")


def compare(model, song: torch.Tensor, probes: list[int], tokens: int) -> None:
    """Per-token cache time vs one full forward at each probe length, and the whole-song totals."""
    per_token, cached_total = cached_times(model, song, probes)
    print("\n| prefix length | cache: ms/token | full forward (recompute): ms/token | speed-up |")
    print("|---:|---:|---:|---:|")
    forwards = {}
    for p in probes:
        forwards[p] = forward_time(model, song, p)
        print(f"| {p:,} | {per_token[p] * 1e3:.2f} | {forwards[p] * 1e3:.0f} | {forwards[p] / per_token[p]:,.0f}x |")
    # recompute total: integrate the measured forward times over every prefix length 1..N
    xs = np.array([0] + probes, dtype=float)
    ys = np.array([0.0] + [forwards[p] for p in probes])
    recompute_total = float(np.interp(np.arange(1, tokens + 1), xs, ys).sum())
    print(f"\nwhole {tokens:,}-token song: cache {cached_total:.1f} s (measured, "
          f"{tokens / cached_total:.0f} tokens/s); full recompute ~{recompute_total / 3600:.2f} h "
          f"(sum of forwards over all prefix lengths, interpolated from the measured ones); "
          f"speed-up ~{recompute_total / cached_total:,.0f}x")


if __name__ == "__main__":
    main()
