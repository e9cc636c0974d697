"""Speed of the bar-similarity analysis (``museformer.analysis.analyze_songs``) on synthetic songs.

Builds N songs of token text in code (B bars of D notes each, every song a repeated 4-bar or 8-bar
pattern with random variations), writes them as one token dump, and times ``analyze_songs`` with
1 and with W worker processes (spawn start-up included). Prints songs/s and bars/s.

    python benchmarks/analyze.py --songs 2000 --bars 100 --notes-per-bar 20 --workers 2
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from museformer.analysis import analyze_songs, find_songs


def synthetic_song(rng: np.random.Generator, bars: int, notes_per_bar: int) -> str:
    period = int(rng.choice([4, 8]))
    motifs = [[(int(o), int(rng.integers(40, 90)), int(rng.integers(1, 24))) for o in rng.choice(48, notes_per_bar)]
              for _ in range(period)]
    tokens = []
    for b in range(bars):
        notes = list(motifs[b % period])
        if rng.random() < 0.3:  # a varied repeat
            notes[0] = (notes[0][0], notes[0][1] + 1, notes[0][2])
        tokens.append("t-30")
        for onset in sorted({n[0] for n in notes}):
            tokens += [f"o-{onset}", "i-0"]
            for _, p, d in sorted((n for n in notes if n[0] == onset), reverse=True):
                tokens += [f"p-{p}", f"d-{d}", "v-20"]
        tokens.append("b-1")
    return " ".join(tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--songs", type=int, default=2000)
    parser.add_argument("--bars", type=int, default=100)
    parser.add_argument("--notes-per-bar", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-interval", type=int, default=64)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        dump = Path(tmp) / "songs.txt"
        dump.write_text("\n".join(synthetic_song(rng, args.bars, args.notes_per_bar) for _ in range(args.songs)) + "\n")
        sources = find_songs(dump)
        tokens = sum(len(s.text.split()) for s in sources)
        print(f"{len(sources)} songs, {args.bars} bars each, {tokens:,} tokens")
        for workers in sorted({1, args.workers}):
            start = time.perf_counter()
            results = analyze_songs(sources, max_interval=args.max_interval, workers=workers, progress=False)
            seconds = time.perf_counter() - start
            assert all(r.error is None for r in results)
            print(f"workers={workers}: {seconds:.2f} s, {len(sources) / seconds:,.0f} songs/s, "
                  f"{len(sources) * args.bars / seconds:,.0f} bars/s, {tokens / seconds:,.0f} tokens/s")


if __name__ == "__main__":
    main()
