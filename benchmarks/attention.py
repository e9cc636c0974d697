"""FC-attention speed and memory: causal SDPA vs the FC paths (dense masks, bar chunks, flex).

One attention layer's both steps (summarisation + aggregation), 8 heads x 64, bars of 50-150 tokens.

- CPU (float32, the default there): forward and forward+backward of causal SDPA over the same tokens,
  the FC dense-mask path (where its T x (S + T) masks are small), the FC bar-chunk path (``"chunks"``,
  also with attention dropout 0.1), and with ``--flex`` the compiled flex path (forward only: it has no
  CPU backward). Checks bar chunks against the dense masks where those fit.
- CUDA (bf16): the same rows plus flex per block size.

Every row reports milliseconds, the memory saved for the backward pass (every tensor autograd keeps,
counted once; a linear-in-length path keeps O(T x keys per query)), the attention FLOPs the method
does (4 H Dh per query-key pair read, x3 with the backward), and MFU against this machine's measured
fp32 matmul peak. ``x causal`` is causal SDPA's time over the row's time (same direction).

    python benchmarks/attention.py --out results/ [--device cpu] [--lengths 4096 16384 32768] [--flex]

Prints a table and writes ``attention_<device>.json`` to ``--out``.

``--memory`` (CPU) instead runs every case in a fresh subprocess and reports its forward+backward
time and its **peak memory**: the process's resident-set high-water mark (``VmHWM``, reset once the
inputs exist) minus its resident set then (so the bar-chunk state, every saved tensor and every transient
count). Cases: causal SDPA, the bar chunks of another checkout (``--other-src``, e.g. main's
``src``: its aggregation through plain ops), the plain-ops path of this checkout and its
recomputing backward (the default), each with attention dropout 0 and 0.1:

    python benchmarks/attention.py --memory --out results/ --other-src /work/main/src --lengths 4096 8192
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from museformer import fc_blocks
from museformer.bar_chunks import BarChunkBackend
from museformer.structure import AttentionPattern, bar_layout, dense_masks
from museformer.vocab import BOS_ID, Vocab

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe, header  # noqa: E402

VOCAB = Vocab.builtin("lmd6remi")
HEADS, HEAD_DIM = 8, 64
DENSE_MASK_LIMIT = {"cpu": 5 * 10**7, "cuda": 2 * 10**9}  # elements of the (T, S + T) mask we build


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
    """Median wall time of ``fn()`` in ms (after one warm-up call, except single CPU runs)."""
    if repeat > 1 or device == "cuda":
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


def saved_mb(fn) -> float:
    """MB of the tensors autograd saves for the backward of ``fn()`` (each storage counted once)."""
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.device)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values()) / 2**20


def keys_read(state, tokens: int) -> int:
    """Query-key pairs the bar-chunk aggregation reads (minus the one column each padding row reads)."""
    reads = sum(int(g.reads(0, g.query_count.numel()).sum()) for g in state.groups)
    rows = sum(g.query_rows.numel() for g in state.groups)
    return reads - (rows - tokens)


# =============================================================================================
# --memory: one case per fresh process (time and resident-set high-water mark)
# =============================================================================================
MEMORY_METHODS = ("causal SDPA", "chunks (other checkout)", "chunks, plain ops", "chunks, recomputing")


def _status_mb(field: str) -> float:
    """``VmRSS`` (resident set now) or ``VmHWM`` (its high-water mark) of this process, MB (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def _reset_peak() -> None:
    """Reset this process's resident-set high-water mark to the resident set now (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def run_case(method: str, length: int, dropout_p: float, repeat: int) -> dict:
    """One case in this (fresh) process: fwd+bwd ms (median of ``repeat`` after the first run, or the
    first run when ``repeat`` is 0) and MB of peak memory above the inputs."""
    torch.manual_seed(0)
    pattern = AttentionPattern()
    ids = synthetic_song(length)
    layout = bar_layout(ids, VOCAB, pattern)
    S = layout.num_summaries
    g = torch.Generator().manual_seed(0)

    def rand(n):  # (B, H, n, Dh) as FCAttention makes them: a transposed view of (B, n, H, Dh)
        return torch.randn(1, n, HEADS, HEAD_DIM, generator=g).transpose(1, 2).requires_grad_()

    q, k, v = rand(length), rand(length), rand(length)
    sq, sk, sv, k2, v2 = (rand(S) for _ in range(5))
    inputs = (q, k, v, sq, sk, sv, k2, v2)
    _reset_peak()  # what torch's import and the inputs took before does not count
    base = _status_mb("VmRSS")
    if method == "causal SDPA":
        def forward():
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    else:
        # BarChunkBackend is the one of the checkout on PYTHONPATH (the parent sets it per case)
        backend = BarChunkBackend(recompute=False) if method == "chunks, plain ops" else BarChunkBackend()
        state = backend.prepare(layout, pattern)

        def forward():
            h = backend.summarise(sq, sk, sv, k, v, state, dropout_p)
            return backend.aggregate(q, k2, v2, k, v, state, dropout_p).sum() + h.sum()

    times = []
    for _ in range(1 + repeat):
        start = time.perf_counter()
        forward().sum().backward()
        times.append((time.perf_counter() - start) * 1e3)
        for x in inputs:
            x.grad = None
    peak = _status_mb("VmHWM") - base
    return {"method": method, "tokens": length, "bars": S, "dropout": dropout_p,
            "fwd_bwd_ms": statistics.median(times[1:] or times), "peak_mb": peak}


def memory_table(args) -> None:
    """Every (length, dropout, method) in a fresh subprocess; print a table and write JSON."""
    meta = describe("cpu")
    meta.update(dtype="float32", heads=HEADS, head_dim=HEAD_DIM, command=" ".join(sys.argv))
    print(header(meta), flush=True)
    here = str(Path(__file__).resolve().parent.parent / "src")
    rows = []
    for length in args.lengths or [4_096, 8_192, 16_384, 32_768]:
        for dropout_p in (0.0, 0.1):
            for method in MEMORY_METHODS:
                if method == "chunks (other checkout)" and not args.other_src:
                    continue
                # SDPA's CPU dropout is its math path: T x T weights (8 heads: 8 GB at 8,192 tokens)
                if method == "causal SDPA" and dropout_p and length > args.causal_dropout_limit:
                    rows.append({"method": method, "tokens": length, "dropout": dropout_p,
                                 "skipped": "math path, T x T weights"})
                    continue
                src = args.other_src if method == "chunks (other checkout)" else here
                env = dict(os.environ, PYTHONPATH=src)
                repeat = args.repeat if length <= 8192 else 0
                cmd = [sys.executable, __file__, "--case", method, "--length", str(length),
                       "--dropout", str(dropout_p), "--repeat", str(repeat), "--out", str(args.out)]
                done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
                if done.returncode:
                    row = {"method": method, "tokens": length, "dropout": dropout_p,
                           "error": done.stderr.strip().splitlines()[-1][:200] if done.stderr.strip() else done.returncode}
                else:
                    row = json.loads(done.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(f"  {row}  (load {os.getloadavg()[0]:.2f})", flush=True)
    meta["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(header(meta))
    print("| tokens | attention dropout | method | fwd+bwd ms | x causal | peak MB |")
    print("|---:|---:|---|---:|---:|---:|")
    for row in rows:
        causal = next((r for r in rows if r["tokens"] == row["tokens"] and r["method"] == "causal SDPA"
                       and r["dropout"] == row["dropout"] and "fwd_bwd_ms" in r), None)
        if "fwd_bwd_ms" not in row:
            print(f"| {row['tokens']:,} | {row['dropout']} | {row['method']} | {row.get('skipped', row.get('error'))} | | |")
            continue
        ratio = f"{causal['fwd_bwd_ms'] / row['fwd_bwd_ms']:.2f}" if causal else "-"
        print(f"| {row['tokens']:,} | {row['dropout']} | {row['method']} | {row['fwd_bwd_ms']:.0f} | {ratio} | "
              f"{row['peak_mb']:.0f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "attention_memory_cpu.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


def bench_length(length: int, device: str, dtype, block_sizes, repeat: int, flex: bool, peak: float) -> dict:
    pattern = AttentionPattern()
    ids = synthetic_song(length).to(device)
    layout = bar_layout(ids, VOCAB, pattern)
    S = layout.num_summaries
    g = torch.Generator(device=device).manual_seed(0)

    def rand(n):  # (B, H, n, Dh) as FCAttention makes them: a transposed view of (B, n, H, Dh)
        x = torch.randn(1, n, HEADS, HEAD_DIM, device=device, dtype=dtype, generator=g)
        return x.transpose(1, 2).requires_grad_()

    q, k, v = rand(length), rand(length), rand(length)
    sq, sk, sv, k2, v2 = (rand(S) for _ in range(5))
    inputs = (q, k, v, sq, sk, sv, k2, v2)
    result = {"tokens": length, "bars": S, "rows": {}}
    rows = result["rows"]
    reps = repeat if length <= 8192 else 1  # long causal backward passes take a minute each

    def record(name, fn, pairs, backward=True):
        pair_flops = 4 * HEADS * HEAD_DIM * pairs
        with torch.no_grad():
            entry = {"fwd_ms": timed(fn, device, reps), "pairs": pairs}
        entry["fwd_mfu"] = pair_flops / (entry["fwd_ms"] / 1e3) / (peak * 1e9)
        if backward:
            def step():
                out = fn()
                loss = sum(x.float().sum() for x in (out if isinstance(out, tuple) else (out,)))
                loss.backward()
            entry["fwd_bwd_ms"] = timed(step, device, reps)
            entry["fwd_bwd_mfu"] = 3 * pair_flops / (entry["fwd_bwd_ms"] / 1e3) / (peak * 1e9)
            entry["saved_mb"] = saved_mb(fn)
            for x in inputs:
                x.grad = None
        rows[name] = entry
        print(f"  {length} {name}: {entry}", flush=True)

    causal_pairs = length * (length + 1) // 2
    record("causal SDPA (all tokens)", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), causal_pairs)

    chunks = BarChunkBackend()
    build_ms = timed(lambda: chunks.prepare(layout, pattern), "cpu" if device == "cpu" else device, repeat)
    state = chunks.prepare(layout, pattern)
    fc_pairs = keys_read(state, length) + 2 * length  # + summarisation (each token read by its summary, + itself)

    def chunk_fc(p=0.0):
        h = chunks.summarise(sq, sk, sv, k, v, state, p)
        return chunks.aggregate(q, k2, v2, k, v, state, p), h

    record("FC bar chunks", chunk_fc, fc_pairs)
    rows["FC bar chunks"]["layout_build_ms"] = build_ms
    record("FC bar chunks, dropout 0.1", lambda: chunk_fc(0.1), fc_pairs)

    # --- the FC dense-mask path (both steps), only where its masks are small ---------------------
    if length * (S + length) <= DENSE_MASK_LIMIT[device]:
        summary_mask, regular_mask = dense_masks(layout, pattern)
        sm, rm = summary_mask[:, None], regular_mask[:, None]

        def dense_fc():
            h = F.scaled_dot_product_attention(sq, torch.cat([sk, k], 2), torch.cat([sv, v], 2), attn_mask=sm)
            out = F.scaled_dot_product_attention(q, torch.cat([k2, k], 2), torch.cat([v2, v], 2), attn_mask=rm)
            return out, h

        record("FC dense masks + SDPA", dense_fc, fc_pairs)
        rows["FC bar chunks"].update(check_against_dense(chunk_fc, dense_fc, inputs, layout))
    else:
        rows["FC dense masks + SDPA"] = {"skipped": f"dense mask of {length * (S + length):,} elements"}

    # --- the flex path (compiled; on CPU forward only) ----------------------------------------------
    for bs in block_sizes if (flex or device == "cuda") else ():
        name = f"FC flex, block {bs}"
        try:
            fl = fc_blocks.flex_layout(layout, pattern, bs)

            def flex_fc():
                h = fc_blocks.summarise(sq, sk, sv, k, v, layout)
                return fc_blocks.aggregate(q, k, v, k2, v2, fl), h

            record(name, flex_fc, fc_pairs, backward=device == "cuda")
        except Exception as error:  # a block size the kernel cannot compile is a result, not a crash
            rows[name] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
    causal = rows["causal SDPA (all tokens)"]
    for row in rows.values():
        for key in ("fwd_ms", "fwd_bwd_ms"):
            if key in row:
                row[key.replace("_ms", "_x_causal")] = causal[key] / row[key]
    return result


def check_against_dense(chunk_fc, dense_fc, inputs, layout) -> dict:
    """Max abs differences of outputs (real tokens / real summaries) and of input gradients."""
    real = (layout.token_kind != 0)[:, None, :, None]
    real_s = (layout.summary_kind != 0)[:, None, :, None]

    def run(fn):
        for x in inputs:
            x.grad = None
        out, h = fn()
        out, h = out * real, h * real_s
        (out.float().sum() + h.float().sum()).backward()
        return out.detach().float(), h.detach().float(), [x.grad.float() for x in inputs]

    fo, fh, fg = run(chunk_fc)
    do, dh, dg = run(dense_fc)
    for x in inputs:
        x.grad = None
    return {"max_abs_err_out": float((fo - do).abs().max()), "max_abs_err_summary": float((fh - dh).abs().max()),
            "max_abs_err_grad": max(float((a - b).abs().max()) for a, b in zip(fg, dg))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the JSON results")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="where to run")
    parser.add_argument("--lengths", type=int, nargs="*", help="token counts (default: by device)")
    parser.add_argument("--block-sizes", type=int, nargs="*", default=[128, 64], help="flex block sizes to try")
    parser.add_argument("--flex", action="store_true", help="on CPU also time the compiled flex forward")
    parser.add_argument("--repeat", type=int, default=3, help="timed repetitions (median; 1 beyond 8,192 tokens)")
    parser.add_argument("--memory", action="store_true", help="time and peak memory, one subprocess per case (CPU)")
    parser.add_argument("--other-src", help="with --memory: a checkout's src/ whose bar chunks to compare")
    parser.add_argument("--causal-dropout-limit", type=int, default=8192,
                        help="with --memory: longest causal SDPA case with dropout (its math path is T x T)")
    parser.add_argument("--case", choices=MEMORY_METHODS, help=argparse.SUPPRESS)  # the subprocess of --memory
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dropout", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.length, args.dropout, args.repeat)))
        return
    if args.memory:
        memory_table(args)
        return
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    on_cuda = device == "cuda"
    lengths = args.lengths or ([15_360, 32_768, 100_000] if on_cuda else [4_096, 16_384, 32_768])
    dtype = torch.bfloat16 if on_cuda else torch.float32

    meta = describe(device)
    meta.update(dtype=str(dtype), heads=HEADS, head_dim=HEAD_DIM, command=" ".join(sys.argv))
    peak = meta["peak_bf16_gflops" if on_cuda else "peak_fp32_gflops"]
    print(header(meta), flush=True)
    results = {"meta": meta, "lengths": []}
    for length in lengths:
        results["lengths"].append(bench_length(length, device, dtype, args.block_sizes, args.repeat, args.flex, peak))
    meta["load_average_after"] = [round(x, 2) for x in __import__("os").getloadavg()]

    fmt = lambda x, spec=".0f": "-" if x is None else format(x, spec)  # noqa: E731
    print(header(meta))
    print("| tokens | method | fwd ms | x causal | fwd+bwd ms | x causal | MFU fwd+bwd | saved for bwd MB | max err |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for entry in results["lengths"]:
        for name, row in entry["rows"].items():
            if "fwd_ms" not in row:
                print(f"| {entry['tokens']:,} | {name} | {row} | | | | | | |")
                continue
            err = max(row.get("max_abs_err_out", 0), row.get("max_abs_err_grad", 0)) if "max_abs_err_out" in row else None
            print(f"| {entry['tokens']:,} | {name} | {fmt(row['fwd_ms'])} | {fmt(row.get('fwd_x_causal'), '.2f')} | "
                  f"{fmt(row.get('fwd_bwd_ms'))} | {fmt(row.get('fwd_bwd_x_causal'), '.2f')} | "
                  f"{fmt(row.get('fwd_bwd_mfu', row.get('fwd_mfu')), '.1%')} | {fmt(row.get('saved_mb'))} | "
                  f"{fmt(err, '.1e')} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"attention_{device}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
