"""FC-attention speed and memory: dense causal SDPA vs the dense-mask FC path vs the flex FC path.

On CUDA (bf16, 8 heads x 64, bars of 50-150 tokens) at 15,360 / 32,768 / 100,000 tokens it
  - checks the flex path against the dense-mask path (outputs and gradients, bf16 tolerance) where
    the dense mask fits in memory,
  - times forward and forward+backward of: causal SDPA over the same tokens (FlashAttention),
    the FC dense-mask path (both steps), the flex path (both steps) per block size,
  - times the block-layout build and records peak memory.
On CPU it runs a small forward-only float32 version (and the layout build at the full lengths).

    python benchmarks/attention.py --out results/            # CUDA if available, else CPU
    python benchmarks/attention.py --out results/ --device cpu

Prints a table and writes ``attention_<device>.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from museformer import fc_blocks
from museformer.structure import AttentionPattern, bar_layout, dense_masks
from museformer.vocab import BOS_ID, Vocab

VOCAB = Vocab.builtin("lmd6remi")
HEADS, HEAD_DIM = 8, 64
DENSE_MASK_LIMIT = 2 * 10**9  # elements of the (T, S + T) dense mask we are willing to build


def synthetic_song(length: int, seed: int = 0) -> torch.Tensor:
    """BOS + bars of 50-150 tokens (``t-*``, pitches, ``b-1``), cut to ``length`` tokens."""
    g = torch.Generator().manual_seed(seed)
    tempo, pitch = VOCAB.token_to_id("t-30"), VOCAB.token_to_id("p-60")
    ids = [BOS_ID]
    while len(ids) < length:
        n = int(torch.randint(50, 151, (1,), generator=g))
        ids += [tempo] + [pitch] * (n - 2) + [VOCAB.bar_id]
    return torch.tensor(ids[:length])[None]  # (1, T)


def timed(fn, device: str, repeat: int) -> float:
    """Median wall time of ``fn()`` in ms (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_mb(fn, device: str) -> float | None:
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def bench_length(length: int, device: str, dtype, block_sizes, backward: bool, repeat: int) -> dict:
    pattern = AttentionPattern()
    ids = synthetic_song(length).to(device)
    layout = bar_layout(ids, VOCAB, pattern)
    S = layout.num_summaries
    g = torch.Generator(device=device).manual_seed(0)

    def rand(n):
        return torch.randn(1, HEADS, n, HEAD_DIM, device=device, dtype=dtype, generator=g).requires_grad_(backward)

    q, k, v = rand(length), rand(length), rand(length)
    sq, sk, sv, k2, v2 = (rand(S) for _ in range(5))
    result = {"tokens": length, "bars": S, "rows": {}}
    rows = result["rows"]

    def record(name, fn):
        entry = {"fwd_ms": timed(lambda: fn(), device, repeat), "peak_mb": peak_mb(fn, device)}
        if backward:
            def step():
                out = fn()
                (out[0] if isinstance(out, tuple) else out).float().sum().backward()
            entry["fwd_bwd_ms"] = timed(step, device, repeat)
            entry["fwd_bwd_peak_mb"] = peak_mb(step, device)
        rows[name] = entry

    record("causal SDPA (all tokens)", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))

    # --- the FC dense-mask path (both steps), only where its masks fit -------------------------
    reference = None
    if length * (S + length) <= DENSE_MASK_LIMIT:
        summary_mask, regular_mask = dense_masks(layout, pattern)
        sm, rm = summary_mask[:, None], regular_mask[:, None]

        def dense_fc():
            h = F.scaled_dot_product_attention(sq, torch.cat([sk, k], 2), torch.cat([sv, v], 2), attn_mask=sm)
            out = F.scaled_dot_product_attention(q, torch.cat([k2, k], 2), torch.cat([v2, v], 2), attn_mask=rm)
            return out, h

        record("FC dense masks + SDPA", dense_fc)
        reference = dense_fc
    else:
        rows["FC dense masks + SDPA"] = {"skipped": f"dense mask of {length * (S + length):,} elements"}

    # --- the flex path ----------------------------------------------------------------------------
    for bs in block_sizes:
        name = f"FC flex, block {bs}"
        try:
            build_ms = timed(lambda: fc_blocks.flex_layout(layout, pattern, bs), device, repeat)
            fl = fc_blocks.flex_layout(layout, pattern, bs)

            def flex_fc():
                h = fc_blocks.summarise(sq, sk, sv, k, v, layout)
                return fc_blocks.aggregate(q, k, v, k2, v2, fl), h

            record(name, flex_fc)
            bm = fl.block_mask
            rows[name].update(
                layout_build_ms=build_ms,
                padded_tokens=fl.padded_length,
                blocks_read=int(bm.kv_num_blocks.sum() + bm.full_kv_num_blocks.sum()),
                partial_blocks=int(bm.kv_num_blocks.sum()),
                key_tokens_read_per_query=float((bm.kv_num_blocks.sum() + bm.full_kv_num_blocks.sum()) * bs
                                                / bm.kv_num_blocks.shape[-1]),
            )
            if reference is not None:
                rows[name].update(check_against_dense(flex_fc, reference, (q, k, v, sq, sk, sv, k2, v2), layout, backward))
        except Exception as error:  # a block size the kernel cannot compile is a result, not a crash
            rows[name] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
    return result


def check_against_dense(flex_fc, dense_fc, inputs, layout, backward: bool) -> dict:
    """Max abs differences of outputs (real tokens / real summaries) and of input gradients."""
    real = (layout.token_kind != 0)[:, None, :, None]
    real_s = (layout.summary_kind != 0)[:, None, :, None]

    def run(fn):
        for x in inputs:
            x.grad = None
        out, h = fn()
        out, h = out * real, h * real_s
        if backward:
            (out.float().sum() + h.float().sum()).backward()
        return out.detach().float(), h.detach().float(), [None if x.grad is None else x.grad.float() for x in inputs]

    fo, fh, fg = run(flex_fc)
    do, dh, dg = run(dense_fc)
    check = {"max_abs_err_out": float((fo - do).abs().max()), "max_abs_err_summary": float((fh - dh).abs().max())}
    if backward:
        check["max_abs_err_grad"] = max(float((a - b).abs().max()) for a, b in zip(fg, dg) if a is not None)
    return check


def layout_build_times(lengths, block_sizes, repeat: int) -> dict:
    """Block-layout build on CPU at the full lengths (no dense mask is ever built)."""
    pattern = AttentionPattern()
    out = {}
    for length in lengths:
        layout = bar_layout(synthetic_song(length), VOCAB, pattern)
        for bs in block_sizes:
            out[f"{length}/{bs}"] = timed(lambda: fc_blocks.flex_layout(layout, pattern, bs), "cpu", repeat)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the JSON results")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="where to run")
    parser.add_argument("--lengths", type=int, nargs="*", help="token counts (default: by device)")
    parser.add_argument("--block-sizes", type=int, nargs="*", default=[128, 64], help="flex block sizes to try")
    parser.add_argument("--repeat", type=int, default=5, help="timed repetitions (median reported)")
    args = parser.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    on_cuda = device == "cuda"
    lengths = args.lengths or ([15_360, 32_768, 100_000] if on_cuda else [2_048, 4_096, 8_192])
    dtype = torch.bfloat16 if on_cuda else torch.float32

    meta = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if on_cuda else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "dtype": str(dtype),
        "heads": HEADS,
        "head_dim": HEAD_DIM,
        "cpu_threads": torch.get_num_threads(),
    }
    results = {"meta": meta, "lengths": []}
    for length in lengths:
        results["lengths"].append(bench_length(length, device, dtype, args.block_sizes, on_cuda, args.repeat))
    results["layout_build_cpu_ms"] = layout_build_times([15_360, 32_768, 100_000], args.block_sizes, args.repeat)

    print(json.dumps(meta))
    header = f"{'tokens':>8} {'method':<26} {'fwd ms':>9} {'fwd+bwd ms':>11} {'peak MB':>9} {'build ms':>9} {'err':>9}"
    print(header)
    for entry in results["lengths"]:
        for name, row in entry["rows"].items():
            if "fwd_ms" not in row:
                print(f"{entry['tokens']:>8} {name:<26} {row}")
                continue
            fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
            err = max(row.get("max_abs_err_out", 0), row.get("max_abs_err_grad", 0)) if "max_abs_err_out" in row else None
            print(f"{entry['tokens']:>8} {name:<26} {fmt(row['fwd_ms']):>9} {fmt(row.get('fwd_bwd_ms')):>11} "
                  f"{fmt(row.get('peak_mb')):>9} {fmt(row.get('layout_build_ms')):>9} {fmt(err):>9}")
    for key, ms in results["layout_build_cpu_ms"].items():
        print(f"layout build on CPU, tokens/block {key}: {ms:.1f} ms")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"attention_{device}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
