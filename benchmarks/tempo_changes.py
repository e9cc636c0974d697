"""Tempo changes in sampled songs vs training songs, and why (issue 17).

Samples songs with the bundled model (or --checkpoint) twice, with ``tempo_changes`` on (the old
behaviour) and off (the default), and counts the tempo changes per song. Then teacher-forces the
sampled songs through the model and reports, at every bar-start tempo token after the first, the
probability the top-k-renormalised distribution gives to *repeating* the previous tempo: the chance
of a change at one bar is 1 minus that, so a song of B bars changes tempo about B (1 - p) times.

Usage: python benchmarks/tempo_changes.py [--num 8] [--bars 20] [--checkpoint DIR]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform

import torch

from museformer.generate import bundled_checkpoint, generate
from museformer.checkpoint import load
from museformer.vocab import BOS_ID, TokenKind


def tempo_changes(ids: list[int], vocab) -> int:
    """Number of t-* tokens whose value differs from the previous t-*."""
    tempos = [int(vocab.values[t]) for t in ids if vocab.kinds[t] == TokenKind.TEMPO]
    return sum(a != b for a, b in zip(tempos, tempos[1:]))


@torch.no_grad()
def repeat_probability(model, ids: list[int], top_k: int) -> list[float]:
    """At each t-* after the first: probability of repeating the previous tempo's token, as sampling
    sees it (logits restricted to t-* tokens, which is what the grammar leaves at a REMIGEN2 bar
    start, then top-k, then softmax)."""
    vocab = model.vocab
    logits = model(torch.tensor([[BOS_ID] + ids]))[0].float()  # (T+1, V): row i predicts ids[i]
    not_tempo = torch.as_tensor(vocab.kinds != TokenKind.TEMPO)
    out, prev = [], None
    for i, t in enumerate(ids):
        if vocab.kinds[t] != TokenKind.TEMPO:
            continue
        if prev is not None:
            row = logits[i].masked_fill(not_tempo, float("-inf"))
            kth = torch.topk(row, top_k).values[-1]
            probs = torch.softmax(row.masked_fill(row < kth, float("-inf")), dim=-1)
            out.append(float(probs[prev]))
        prev = t
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--num", type=int, default=8)
    ap.add_argument("--bars", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tok = load(args.checkpoint or bundled_checkpoint())
    model.eval()
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC  {platform.machine()}  "
          f"torch {torch.__version__}  load average {os.getloadavg()[0]:.2f}  "
          f"{args.num} songs x {args.bars} bars, seed {args.seed}, top-k 8")
    for allow in (True, False):
        songs = generate(model=model, tokenizer=tok, num_songs=args.num, max_bars=args.bars, seed=args.seed,
                         tempo_changes=allow)
        changes = [tempo_changes(s.ids, tok.vocab) for s in songs]
        print(f"tempo_changes={allow}: changes per song {changes}; songs with a change "
              f"{sum(c > 0 for c in changes)}/{len(changes)}")
        if allow:
            per_song = [repeat_probability(model, s.ids, 8) for s in songs]
            p = [q for song in per_song for q in song]
            print(f"  P(repeat previous tempo) at a bar start: mean {sum(p) / len(p):.3f}, min {min(p):.3f}, "
                  f"bars with P < 0.9: {sum(q < 0.9 for q in p)}/{len(p)}; per song (mean): "
                  f"{[round(sum(q) / max(len(q), 1), 2) for q in per_song]}")


if __name__ == "__main__":
    main()
