"""Does a bundled model's output show the corpus's form? (issue 13, docs/pretrained.md)

Reads a folder of generated songs (``museformer generate`` output: MIDI + JSON sidecars) and a
prepared corpus, and reports

- the corpus's bar-similarity curve (train split, songs weigh the same) and its two most similar
  intervals (among those at least 10% of the songs reach, as ``museformer analyze``);
- the samples' mean bar similarity at those intervals, as a share of the corpus's (goal >= 70%);
- the similarity error of the samples against the held-out songs (``--held-out``: valid + test by
  default) over 1..N;
- decodability (tokens the decoder skipped, from the sidecars), bars per song, how songs ended;
- tempo changes per song in the samples and in the corpus;
- with ``--figure PNG``: one sample's self-similarity matrix next to a corpus song's.

Usage: python benchmarks/form.py SAMPLES_DIR DATA_DIR [--max-interval 32] [--figure F.png] [-o F.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from museformer import metrics
from museformer.data import Corpus
from museformer.tokenizer import Tokenizer
from museformer.vocab import TokenKind


def tempo_changes(ids, vocab) -> int:
    """Number of t-* tokens whose value differs from the previous t-*."""
    ids = np.asarray(ids, dtype=np.int64)
    tempos = np.asarray(vocab.values)[ids[np.asarray(vocab.kinds)[ids] == TokenKind.TEMPO]]
    return int((tempos[1:] != tempos[:-1]).sum())


def corpus_songs(data: Path, splits: tuple[str, ...]) -> list[tuple[str, np.ndarray]]:
    out = []
    for split in splits:
        corpus = Corpus(data, split)
        out.extend((corpus[i].name, np.asarray(corpus[i].ids)) for i in range(len(corpus)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("samples")
    ap.add_argument("data")
    ap.add_argument("--max-interval", type=int, default=32)
    ap.add_argument("--figure", default=None)
    ap.add_argument("--sample-index", type=int, default=0, help="which sample the figure shows")
    ap.add_argument("--corpus-song", default=None, help="name of the corpus song the figure shows")
    ap.add_argument("--held-out", default="valid,test",
                    help="the splits the similarity error compares against (default valid,test; "
                    "use test alone when sampling settings were chosen on valid)")
    ap.add_argument("-o", "--output", default=None)
    args = ap.parse_args()
    data, samples = Path(args.data), Path(args.samples)
    tokenizer = Tokenizer.load(data / "tokenizer.json")
    vocab = tokenizer.vocab
    n = args.max_interval

    train = corpus_songs(data, ("train",))
    held_splits = tuple(x for x in args.held_out.split(",") if x)
    held = corpus_songs(data, held_splits)
    train_notes = [metrics.notes_from_ids(ids, vocab) for _, ids in train]
    train_stats = metrics.combine((metrics.song_interval_stats(s, n) for s in train_notes), n)
    corpus_curve = train_stats.curve
    reach = train_stats.songs >= 0.1 * len(train)
    ranked = [k for k in metrics.top_intervals(np.where(reach, corpus_curve, np.nan), 10)]
    top2 = ranked[:2]
    held_curve = metrics.similarity_curve((metrics.notes_from_ids(ids, vocab) for _, ids in held), n)

    sidecars = sorted(samples.glob("song_*.json"))
    sample_ids, skipped, bars, finish = [], [], [], []
    for sc in sidecars:
        meta = json.loads(sc.read_text())
        ids = tokenizer.encode_file(samples / meta["midi"], as_ids=True)
        sample_ids.append(np.asarray(ids))
        skipped.append(int(meta.get("skipped_tokens", meta.get("skipped", 0)) or 0))
        bars.append(int(meta["bars"]))
        finish.append(meta.get("finish"))
    sample_notes = [metrics.notes_from_ids(ids, vocab) for ids in sample_ids]
    sample_stats = metrics.combine((metrics.song_interval_stats(s, n) for s in sample_notes), n)
    sample_curve = sample_stats.curve
    share = {int(k): float(sample_curve[k - 1] / corpus_curve[k - 1]) for k in top2}
    mean_share = float(np.mean([sample_curve[k - 1] for k in top2]) / np.mean([corpus_curve[k - 1] for k in top2]))
    report = {
        "samples": len(sidecars), "corpus_train_songs": len(train), "held_out_songs": len(held),
        "held_out_splits": list(held_splits),
        "corpus_top_intervals": ranked, "top2": top2,
        "corpus_at_top2": {int(k): float(corpus_curve[k - 1]) for k in top2},
        "samples_at_top2": {int(k): float(sample_curve[k - 1]) for k in top2},
        "share_at_top2": share, "mean_share_at_top2": mean_share,
        f"similarity_error_1_{n}_vs_held_out": metrics.similarity_error(sample_curve, held_curve),
        f"similarity_error_1_{n}_held_out_vs_train": metrics.similarity_error(held_curve, corpus_curve),
        "decodable_share": float(np.mean([s == 0 for s in skipped])) if skipped else None,
        "bars": {"min": min(bars), "max": max(bars), "mean": float(np.mean(bars))} if bars else None,
        "finish": {f: finish.count(f) for f in set(finish)},
        "tempo_changes_per_song": {
            "samples": float(np.mean([tempo_changes(ids, vocab) for ids in sample_ids])) if sample_ids else None,
            "corpus_train": float(np.mean([tempo_changes(ids, vocab) for _, ids in train])),
        },
        "sample_curve": [float(x) for x in sample_curve], "corpus_curve": [float(x) for x in corpus_curve],
        "held_out_curve": [float(x) for x in held_curve],
    }
    print(json.dumps({k: v for k, v in report.items() if not k.endswith("_curve")}, indent=1))
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=1) + "\n")
    if args.figure:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = [name for name, _ in train]
        # default: the first training song of 32 bars or more (the corpus's typical AABB length)
        j = names.index(args.corpus_song) if args.corpus_song in names else \
            next(i for i, s in enumerate(train_notes) if s.num_bars >= 32)
        panels = [(metrics.self_similarity(sample_notes[args.sample_index]),
                   f"generated: {sidecars[args.sample_index].stem}"),
                  (metrics.self_similarity(train_notes[j]), f"corpus: {names[j]}")]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.8), dpi=110)
        for ax, (sim, title) in zip(axes, panels):
            m = len(sim)
            image = ax.imshow(sim, vmin=0, vmax=1, cmap="magma", interpolation="nearest",
                              extent=(0.5, m + 0.5, m + 0.5, 0.5))
            ax.set_title(title[-60:], fontsize=9)
            ax.set_xlabel("bar")
            ax.set_ylabel("bar")
        fig.colorbar(image, ax=axes, label="bar similarity")
        fig.savefig(args.figure)
        print(f"wrote {args.figure}")


if __name__ == "__main__":
    main()
