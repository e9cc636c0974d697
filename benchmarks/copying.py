"""Does a model bring a strain back? Teacher-forced copy checks, no sampling (issue 13).

Two measurements, both with this package's own model, loss and ``museformer.evaluate``:

- ``checkpoints``: for each checkpoint, ``repeat_bar_nll`` on a prepared split: the mean NLL of the
  targets in bars that repeat the bar K earlier token for token, against every other bar. A model
  that copies through its fine attention predicts a repeated bar almost surely (NLL near 0); one
  that does not scores it like any easy bar. ``--songs N`` scores N songs spread evenly over the
  split (default: all).
- ``synthetic``: the smallest copy task. Songs of 2 x ``--strain`` bars whose second half repeats
  the first exactly (bars drawn at random from a prepared corpus, so the first strain is
  unpredictable and the second is fully predictable by copying). One fresh model per attention
  pattern, the same batches for every pattern, and the mean NLL of the first and the repeated strain
  on held-out songs every ``--eval-every`` updates. A pattern whose fine offsets include the strain
  length (``fc``, ``full``) *can* copy; ``local`` (bars 1-3 back only) cannot, so it is the control.

Usage:
    python benchmarks/copying.py checkpoints DATA_DIR CKPT [CKPT ...] [--repeats 8 4] [--songs 100]
    python benchmarks/copying.py synthetic DATA_DIR [--patterns fc local full] [--steps 1500] [-o F.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from museformer.checkpoint import load
from museformer.data import open_split
from museformer.evaluate import repeat_bar_nll, token_nll
from museformer.model import Museformer, MuseformerConfig, lm_loss
from museformer.structure import AttentionPattern, bar_ids, onset_ids
from museformer.vocab import BOS_ID, EOS_ID, PAD_ID

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe, header

PATTERNS = {
    "fc": AttentionPattern(),
    "local": AttentionPattern((1, 2, 3), 0),
    "full": AttentionPattern.full(),
    "fine-only": AttentionPattern((1, 2, 4, 8, 12, 16, 24, 32), 0),
}


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------
def score_checkpoints(data: str, checkpoints: list[str], repeats: list[int], split: str, songs: int | None,
                      max_len: int) -> list[dict]:
    corpus = open_split(data, split)
    picked = None if songs is None else np.unique(np.linspace(0, len(corpus) - 1, songs).astype(int))
    out = []
    for path in checkpoints:
        model, _ = load(path)
        start = time.perf_counter()
        result = repeat_bar_nll(model.eval(), corpus, max_len, repeats, 16_384, torch.device("cpu"), songs=picked)
        result.update(checkpoint=path, split=split, songs=len(corpus) if picked is None else len(picked),
                      seconds=round(time.perf_counter() - start, 1))
        parts = ", ".join(f"bars repeating b-{k}: {r['mean_nll']:.3f} ({r['tokens']:,} tokens)"
                          for k, r in result["repeat"].items())
        print(f"{path}: {parts}; other bars: {result['other']['mean_nll']:.3f} ({result['other']['tokens']:,})",
              flush=True)
        out.append(result)
    return out


# ---------------------------------------------------------------------------------------------
# synthetic AA songs
# ---------------------------------------------------------------------------------------------
def bar_pool(data: str, split: str, max_songs: int) -> tuple[object, list[np.ndarray]]:
    """Every bar (its token ids, ``b-1`` last) of the first ``max_songs`` songs of a split."""
    corpus = open_split(data, split)
    bars = []
    for i in range(min(max_songs, len(corpus))):
        ids = np.asarray(corpus[i].ids)
        numbers = bar_ids(torch.from_numpy(np.concatenate([[BOS_ID], ids])), corpus.vocab).numpy()[1:]
        bars.extend(ids[numbers == b] for b in np.unique(numbers))
    return corpus.vocab, bars


def aa_batch(rng: np.random.Generator, bars: list[np.ndarray], songs: int, strain: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``songs`` AA songs: BOS, ``strain`` random bars, the same bars again; inputs and targets ``(B, T)``."""
    rows = []
    for _ in range(songs):
        first = [bars[j] for j in rng.integers(0, len(bars), strain)]
        rows.append(np.concatenate([[BOS_ID], *first, *first]))
    length = max(len(r) for r in rows)
    inputs = torch.full((songs, length), PAD_ID, dtype=torch.long)
    targets = torch.full((songs, length), PAD_ID, dtype=torch.long)
    for i, r in enumerate(rows):
        inputs[i, : len(r)] = torch.from_numpy(r)
        targets[i, : len(r)] = torch.from_numpy(np.concatenate([r[1:], [EOS_ID]]))
    return inputs, targets


@torch.no_grad()
def strain_nll(model, vocab, inputs: torch.Tensor, targets: torch.Tensor, strain: int) -> tuple[float, float]:
    """Mean NLL of the targets in the first strain and in the repeated one."""
    bars = bar_ids(inputs, vocab)
    batch = {"input_ids": inputs, "target_ids": targets, "bar_ids": bars, "onset_ids": onset_ids(inputs, vocab)}
    nll = token_nll(model, batch, inputs.device)  # (B, T)
    target_bar = torch.cat([bars[:, 1:], bars[:, -1:]], 1)  # target t is input t + 1
    real = targets != PAD_ID
    first = real & (target_bar >= 1) & (target_bar <= strain)
    second = real & (target_bar > strain)
    return float(nll[first].mean()), float(nll[second].mean())


def synthetic(data: str, patterns: list[str], steps: int, eval_every: int, strain: int, batch: int,
              lr: float, width: int, layers: int) -> list[dict]:
    vocab, train_bars = bar_pool(data, "train", 600)
    _, test_bars = bar_pool(data, "valid", 200)
    held_out = aa_batch(np.random.default_rng(123), test_bars, 32, strain)
    out = []
    for name in patterns:
        torch.manual_seed(0)
        rng = np.random.default_rng(0)  # the same batches for every pattern
        config = MuseformerConfig(d_model=width, n_layers=layers, n_heads=4, d_ff=4 * width, dropout=0.0,
                                  attention_dropout=0.0, bar_embedding_dim=64, onset_embedding_dim=32,
                                  pattern=PATTERNS[name])
        model = Museformer(config, vocab=vocab)
        optimiser = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98))
        curve, start = [], time.perf_counter()
        for step in range(1, steps + 1):
            inputs, targets = aa_batch(rng, train_bars, batch, strain)
            loss = lm_loss(model(inputs, bar_ids=bar_ids(inputs, vocab), onset_ids=onset_ids(inputs, vocab)), targets)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            if step % eval_every == 0 or step == steps:
                model.eval()
                first, repeated = strain_nll(model, vocab, *held_out, strain)
                model.train()
                curve.append({"step": step, "train_loss": round(float(loss.detach()), 4), "first_strain_nll": round(first, 4),
                              "repeated_strain_nll": round(repeated, 4),
                              "seconds": round(time.perf_counter() - start, 1)})
                print(f"{name:>9} update {step:>5}: NLL first strain {first:.3f}, repeated strain {repeated:.3f} "
                      f"({curve[-1]['seconds']:.0f} s)", flush=True)
        out.append({"pattern": name, "parameters": sum(p.numel() for p in model.parameters()), "curve": curve})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("checkpoints")
    c.add_argument("data")
    c.add_argument("checkpoints", nargs="+")
    c.add_argument("--repeats", type=int, nargs="+", default=[8, 4])
    c.add_argument("--split", default="test")
    c.add_argument("--songs", type=int, default=None)
    c.add_argument("--max-len", type=int, default=2560)
    c.add_argument("-o", "--output")
    s = sub.add_parser("synthetic")
    s.add_argument("data")
    s.add_argument("--patterns", nargs="+", default=["fc", "local", "full"], choices=sorted(PATTERNS))
    s.add_argument("--steps", type=int, default=1500)
    s.add_argument("--eval-every", type=int, default=300)
    s.add_argument("--strain", type=int, default=8)
    s.add_argument("--batch", type=int, default=8)
    s.add_argument("--lr", type=float, default=1e-3)
    s.add_argument("--width", type=int, default=128)
    s.add_argument("--layers", type=int, default=2)
    s.add_argument("-o", "--output")
    args = ap.parse_args()
    torch.set_num_threads(1)
    report = {"machine": describe(), "command": " ".join(sys.argv)}
    print(header(report["machine"]), flush=True)
    if args.command == "checkpoints":
        report["results"] = score_checkpoints(args.data, args.checkpoints, args.repeats, args.split, args.songs,
                                              args.max_len)
    else:
        report["results"] = synthetic(args.data, args.patterns, args.steps, args.eval_every, args.strain,
                                      args.batch, args.lr, args.width, args.layers)
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
