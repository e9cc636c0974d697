"""Structure control: do songs follow their form plan, what does it cost, and does infilling fit the song?

Writes one JSON line per measured song to ``OUT/results.jsonl`` (resumable: songs already there are
skipped), then prints Markdown tables (also with ``--summarize`` alone). Sections:

- ``form``: for each plan (AABA, AABB, ABAC, verse/chorus) N songs decoded to the plan with K
  candidates per planned bar (``museformer.form.decode_form``), plus N unconstrained songs of the
  same length (``generate``, the baseline; each is scored against every plan). Per song: the mean
  absolute error between the achieved bar self-similarity matrix (``metrics.self_similarity``, what
  ``analyze`` computes) and the plan over the planned pairs, the mean achieved similarity of
  same-letter pairs and of different-letter pairs, and the mean per-token log-likelihood of the
  song's bars under the model (all bars, and only the sampled ones). Songs interleave the plans
  (song i of every plan, then i + 1), so a run stopped early stays balanced.
- ``variation``: the verse/chorus plan with varied-repeat candidates proposed as plain samples
  instead of kept bar openings (``variation="sample"``), the measured alternative.
- ``infill``: held-out (test split) songs with a 4-bar gap in the middle filled with K candidates:
  the log-likelihood of the song's kept bars after the gap, for the chosen infill, for a plain
  left-to-right continuation (the first, unweighted candidate) and for the original bars; and the
  mean bar similarity of the gap bars to the two bars on each side of the gap.
- ``speed``: seconds for one 32-bar AABA song with K = 8 and for a 4-bar gap in a 64-bar song (a
  test song repeated to 64 bars), next to plain generation of 32 bars, in one process.

Run (long: in the background with one thread, not under the CPU lock)::

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/structure_control.py --out runs/structure_control \
        --songs 50 --data /work/data/bach-lmd6
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

PLANS = {"AABA": "A8 A8 B8 A8", "AABB": "A8 A8 B8 B8", "ABAC": "A8 B8 A8 C8",
         "verse/chorus": "verse8 chorus8 verse'8 chorus8"}


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in subprocess.run(["lscpu"], capture_output=True, text=True)
                .stdout.splitlines() if line.startswith("Model name")), platform.processor())
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} thread(s), "
            f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def token_logprobs(model, ids: list[int]) -> np.ndarray:
    """The model's log-probability of every token of a song (BOS first), from one full forward."""
    from museformer.vocab import BOS_ID

    with torch.inference_mode():
        x = torch.tensor([[BOS_ID] + list(ids)])
        lp = model(x)[0].float().log_softmax(-1)[:-1].gather(-1, x[0, 1:, None])[:, 0]
    return lp.numpy()


def form_row(plan_name, plan, ids, vocab, lps, how, seconds, kind) -> dict:
    from museformer.form import _bar_spans, plan_error
    from museformer.metrics import notes_from_ids, self_similarity

    err = plan_error(plan, self_similarity(notes_from_ids(ids, vocab)))
    spans = _bar_spans(ids, vocab.bar_id)
    sampled = [i for i, h in enumerate(how) if h not in ("copied", "prompt")]
    sampled_lp = np.concatenate([lps[a:b] for i, (a, b) in enumerate(spans) if i in sampled]) if sampled else []
    return {"kind": kind, "plan": plan_name, **err, "logprob": float(np.mean(lps)),
            "logprob_sampled": float(np.mean(sampled_lp)) if len(sampled_lp) else math.nan,
            "tokens": len(ids), "bars": len(spans), "seconds": seconds, "ids": list(map(int, ids))}


def run_form(model, tok, out, songs, k, done, write, variation_songs) -> None:
    from museformer.form import decode_form, parse_form
    from museformer.generate import SampleConfig, generate

    config = SampleConfig(seed=0)
    plans = {name: parse_form(text) for name, text in PLANS.items()}
    todo = [i for i in range(songs) if ("free", i) not in done]
    if todo:  # the baseline: unconstrained songs of 32 bars, one batch (song i has seed 10,000 + i at any batch)
        t = time.perf_counter()
        free = generate(model=model, tokenizer=tok, max_bars=32, seed=10_000 + todo[0], num_songs=len(todo))
        seconds = (time.perf_counter() - t) / len(todo)  # per song, in a batch of len(todo)
        for i, song in zip(todo, free):
            assert song.seed == 10_000 + i
            lps = token_logprobs(model, song.ids)
            for name, plan in plans.items():
                write(form_row(name, plan, song.ids, tok.vocab, lps, ["sampled"] * 32, seconds, "free") | {"song": i})
            done.add(("free", i))
    for i in range(songs):
        for name, plan in plans.items():
            modes = ["prefix"] + (["sample"] if name == "verse/chorus" and i < variation_songs else [])
            for mode in modes:
                kind = "form" if mode == "prefix" else "form-sample-variation"
                if (kind, name, i) in done:
                    continue
                t = time.perf_counter()
                r = decode_form(model, tok, plan, config, seed=20_000 + i, candidates=k, variation=mode)
                seconds = time.perf_counter() - t
                write(form_row(name, plan, r.ids, tok.vocab, np.array(r_logprobs(model, r)), r.how, seconds, kind)
                      | {"song": i})
                done.add((kind, name, i))


def r_logprobs(model, result) -> list[float]:
    """Per-token log-probabilities of a decoded form song (recomputed by one full forward: the same
    numbers the decoder recorded, within float rounding)."""
    return token_logprobs(model, result.ids).tolist()


def neighbour_similarity(ids, vocab, first, last) -> float:
    """Mean similarity of the gap bars (1-based first..last) to the two bars on each side."""
    from museformer.form import bar_note_sets, similarity

    sets = bar_note_sets(ids, vocab)
    around = [b for b in (first - 3, first - 2, last, last + 1) if 0 <= b < len(sets)]
    values = [similarity(sets[g], sets[b], empty=math.nan) for g in range(first - 1, last) for b in around]
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def run_infill(model, tok, data, k, done, write, limit) -> None:
    from museformer.data import open_split
    from museformer.form import bar_tokens
    from museformer.infill import infill

    corpus = open_split(data, "test")
    for n in range(min(len(corpus), limit)):
        if ("infill", n) in done:
            continue
        ids = [int(t) for t in corpus[n].ids]
        bars = bar_tokens(ids, tok.vocab.bar_id)
        if len(bars) < 12:
            continue
        first = len(bars) // 2 - 1
        last = first + 3
        t = time.perf_counter()
        result = infill(ids, f"{first}-{last}", model=model, tokenizer=tok, candidates=k, seed=30_000 + n)
        seconds = time.perf_counter() - t
        gap = result.gaps[0]
        plain = list(ids[: sum(len(b) for b in bars[: first - 1])]) + list(gap.candidates[0].ids) + \
            list(ids[sum(len(b) for b in bars[:last]):])
        write({"kind": "infill", "song": n, "bars": len(bars), "gap": f"{first}-{last}",
               "suffix_tokens": gap.suffix_tokens, "chosen_suffix": gap.suffix_logprob[gap.chosen],
               "plain_suffix": gap.suffix_logprob[0], "original_suffix": gap.original_suffix_logprob,
               "best_suffix": max(gap.suffix_logprob), "chosen_index": gap.chosen,
               "chosen_weight": gap.weights[gap.chosen],
               "sim_chosen": neighbour_similarity(result.ids, tok.vocab, first, last),
               "sim_plain": neighbour_similarity(plain, tok.vocab, first, last),
               "sim_original": neighbour_similarity(ids, tok.vocab, first, last), "seconds": seconds})
        done.add(("infill", n))


def run_speed(model, tok, data, k, write) -> None:
    from museformer.data import open_split
    from museformer.form import bar_tokens, decode_form, parse_form
    from museformer.generate import SampleConfig, generate
    from museformer.infill import infill

    write({"kind": "machine", "text": machine()})
    plan = parse_form(PLANS["AABA"])
    for rep in range(3):
        t = time.perf_counter()
        generate(model=model, tokenizer=tok, max_bars=32, seed=40_000 + rep)
        plain = time.perf_counter() - t
        t = time.perf_counter()
        r = decode_form(model, tok, plan, SampleConfig(seed=0), seed=40_000 + rep, candidates=k)
        form = time.perf_counter() - t
        write({"kind": "speed-form", "rep": rep, "plain_32_bars_s": plain, "aaba_k8_s": form, "tokens": len(r.ids)})
    corpus = open_split(data, "test")
    bars: list[list[int]] = []
    n = 0
    while len(bars) < 64:
        bars += bar_tokens([int(t) for t in corpus[n % len(corpus)].ids], tok.vocab.bar_id)
        n += 1
    song = [t for b in bars[:64] for t in b]
    for rep in range(3):
        t = time.perf_counter()
        infill(song, "31-34", model=model, tokenizer=tok, candidates=k, seed=50_000 + rep)
        write({"kind": "speed-infill", "rep": rep, "seconds": time.perf_counter() - t, "tokens": len(song)})


# ---------------------------------------------------------------------------------------------
def summarize(rows: list[dict]) -> str:
    def mean(values):
        values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
        return (float(np.mean(values)), len(values)) if values else (math.nan, 0)

    def varied(sel) -> str:
        value, n = mean(r.get("varied") for r in sel)
        return f"{value:.3f} ({mean(r.get('varied_target') for r in sel)[0]:.2f})" if n else "-"

    lines = []
    machines = [r["text"] for r in rows if r["kind"] == "machine"]
    if machines:
        lines.append(f"machine (speed runs): {machines[-1]}\n")
    lines.append("| plan | decoding | songs | MAE vs plan | same-letter sim | different-letter sim | "
                 "varied-repeat sim (target) | log-lik/token (all bars) | log-lik/token (sampled bars) | s/song |")
    lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in PLANS:
        for kind in ("free", "form", "form-sample-variation"):
            sel = [r for r in rows if r["kind"] == kind and r["plan"] == name]
            if not sel:
                continue
            mae, n = mean(r["mae"] for r in sel)
            lines.append(f"| {name} | {kind} | {n} | {mae:.3f} | {mean(r['same'] for r in sel)[0]:.3f} | "
                         f"{mean(r['different'] for r in sel)[0]:.3f} | {varied(sel)} | "
                         f"{mean(r['logprob'] for r in sel)[0]:.3f} | "
                         f"{mean(r['logprob_sampled'] for r in sel)[0]:.3f} | {mean(r['seconds'] for r in sel)[0]:.1f} |")
    inf = [r for r in rows if r["kind"] == "infill"]
    if inf:
        lines.append("")
        lines.append("| infill (4-bar gap, held-out songs) | songs | suffix log-lik (nats/token) | "
                     "similarity to the 4 neighbouring bars |")
        lines.append("|---|---:|---:|---:|")
        for label, key, sim in (("chosen (drawn from the weights)", "chosen_suffix", "sim_chosen"),
                                ("plain left-to-right (first candidate)", "plain_suffix", "sim_plain"),
                                ("best of K by weight", "best_suffix", None),
                                ("original bars", "original_suffix", "sim_original")):
            ll, n = mean(r[key] / r["suffix_tokens"] for r in inf)
            s = f"{mean(r[sim] for r in inf)[0]:.3f}" if sim else "-"
            lines.append(f"| {label} | {n} | {ll:.4f} | {s} |")
        wins = sum(r["chosen_suffix"] > r["plain_suffix"] for r in inf)
        above = sum(r["chosen_suffix"] > r["original_suffix"] for r in inf)
        lines.append(f"\nchosen > plain in {wins}/{len(inf)} songs; chosen > original in {above}/{len(inf)}; "
                     f"mean {mean(r['seconds'] for r in inf)[0]:.1f} s per song")
    def listed(values) -> str:
        return ", ".join(f"{v:.1f}" for v in values)

    sp = [r for r in rows if r["kind"] == "speed-form"]
    if sp:
        lines.append(f"\nspeed: 32-bar AABA, K=8: {listed(r['aaba_k8_s'] for r in sp)} s; plain 32-bar song: "
                     f"{listed(r['plain_32_bars_s'] for r in sp)} s")
    si = [r for r in rows if r["kind"] == "speed-infill"]
    if si:
        lines.append(f"speed: 4-bar gap in a 64-bar song ({si[0]['tokens']} tokens), K=8: "
                     f"{listed(r['seconds'] for r in si)} s")
    return "\n".join(lines)


def by_section(rows: list[dict], model, tok) -> str:
    """Mean per-token log-likelihood per 8-bar section (one full forward per stored song): free
    songs vs form songs, the form's sections marked by how their bars were made. Compares like with
    like (a section's position in the song changes its likelihood)."""
    from museformer.form import _bar_spans, parse_form

    lines = ["| plan | section | free songs | form songs | form bars were |", "|---|---|---:|---:|---|"]
    free = [r for r in rows if r["kind"] == "free" and r["plan"] == "AABA" and "ids" in r]
    free_lp = [(token_logprobs(model, r["ids"]), _bar_spans(r["ids"], tok.vocab.bar_id)) for r in free]
    for name, text in PLANS.items():
        plan = parse_form(text)
        form = [r for r in rows if r["kind"] == "form" and r["plan"] == name and "ids" in r]
        form_lp = [(token_logprobs(model, r["ids"]), _bar_spans(r["ids"], tok.vocab.bar_id)) for r in form]
        for label, start, count in plan.sections:
            def section_mean(songs):
                values = [lp[a:b].mean() for lp, spans in songs for a, b in spans[start:start + count]]
                return float(np.mean(values)) if values else math.nan
            rule = plan.rules[start]
            made = {"free": "sampled once", "new": "new: best of K", "repeat": "copied" if rule.similarity == 1.0
                    else "varied: best of K"}[rule.kind]
            lines.append(f"| {name} | {label} (bars {start + 1}-{start + count}) | {section_mean(free_lp):.3f} | "
                         f"{section_mean(form_lp):.3f} | {made} |")
    return "\n".join(lines) + f"\n\n(mean over bars of each bar's mean per-token log-likelihood; {len(free)} free songs)"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for results.jsonl")
    p.add_argument("--checkpoint", default=None, help="model (default: the bundled one)")
    p.add_argument("--data", default="/work/data/bach-lmd6", help="prepared corpus with a test split (infill)")
    p.add_argument("--songs", type=int, default=50, help="songs per plan")
    p.add_argument("--variation-songs", type=int, default=20, help="verse/chorus songs with sampled variations")
    p.add_argument("--infill-songs", type=int, default=36)
    p.add_argument("-k", type=int, default=8, help="candidates")
    p.add_argument("--only", nargs="*", default=["form", "infill", "speed"], choices=["form", "infill", "speed"])
    p.add_argument("--summarize", action="store_true", help="only print the tables of OUT/results.jsonl")
    p.add_argument("--by-section", action="store_true",
                   help="only print the per-section log-likelihood table of the stored songs (loads the model)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    if args.summarize:
        print(summarize(rows))
        return 0
    from museformer.generate import _as_model

    model, tok, directory = _as_model(None, None, args.checkpoint, "cpu")
    model.eval()
    if args.by_section:
        print(by_section(rows, model, tok))
        return 0
    print(f"model {directory}; {machine()}", flush=True)
    done = {(r["kind"], r["plan"], r["song"]) if "plan" in r else (r["kind"], r.get("song")) for r in rows}
    done |= {("free", r["song"]) for r in rows if r["kind"] == "free"}

    def write(row: dict) -> None:
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        rows.append(row)
        print(json.dumps(row), flush=True)

    if "infill" in args.only:
        run_infill(model, tok, args.data, args.k, done, write, args.infill_songs)
    if "form" in args.only:
        run_form(model, tok, out, args.songs, args.k, done, write, args.variation_songs)
    if "speed" in args.only:
        run_speed(model, tok, args.data, args.k, write)
    print(summarize(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
