"""Corpus preparation speed: files/s and tokens/s of ``museformer.data.prepare`` on the Bach corpus.

Exports the music21 Bach chorales to MIDI once (into ``--cache``), then prepares them from scratch
(empty output folder, so nothing is reused) with each worker count, and prints a Markdown table.

    python benchmarks/prepare.py [--workers 1 2] [--cache /tmp/museformer-bach-midi] [--repeat 3]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import symusic

import museformer
from museformer.corpora import export_corpus
from museformer.data import prepare
from museformer.tokenizer import Tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "museformer-bach-midi"))
    ap.add_argument("--preset", default=None, help="tokenizer preset (default: Tokenizer())")
    ap.add_argument("--repeat", type=int, default=3, help="runs per worker count; the best is reported")
    args = ap.parse_args()

    t0 = time.perf_counter()
    exported = export_corpus("bach", args.cache, workers=max(args.workers), progress=False)
    print(f"export: {exported.written} written, {exported.existing} present, {len(exported.failed)} failed "
          f"in {time.perf_counter() - t0:.1f} s")
    tok = Tokenizer.preset(args.preset) if args.preset else Tokenizer()
    import music21

    print(f"date {datetime.date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}, museformer {museformer.__version__}, numpy {np.__version__}, "
          f"symusic {symusic.__version__}, music21 {music21.__version__}")
    print("| workers | files | tokens | seconds | files/s | tokens/s |")
    print("|---|---|---|---|---|---|")
    for workers in args.workers:
        best = None
        for _ in range(args.repeat):
            with tempfile.TemporaryDirectory() as out:
                t = time.perf_counter()
                report = prepare(args.cache, out, tok, workers=workers, progress=False)
                seconds = time.perf_counter() - t
            best = seconds if best is None else min(best, seconds)
        files = sum(report.songs.values()) + len(report.failed)
        tokens = sum(report.tokens.values())
        print(f"| {workers} | {files} | {tokens:,} | {best:.2f} | {files / best:.0f} | {tokens / best:,.0f} |")
    shutil.rmtree(args.cache, ignore_errors=True) if os.environ.get("MUSEFORMER_BENCH_CLEAN") else None


if __name__ == "__main__":
    main()
