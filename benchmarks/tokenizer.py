"""Tokenizer speed: tokens per second of museformer's encoder (and the official one, if present).

Usage: python benchmarks/tokenizer.py [--repeat N] [--official DIR]

Encodes every MIDI under tests/data/ with the lmd6-compatible options (remigen2, normalise pitch,
remove empty bars, ignore time signatures, instrument order by id so that every fixture is
accepted by the official code) and prints tokens/s, file parsing included. ``--official DIR``
points at a reconstruction of the official MidiProcessor encoder (a module ``official_enc`` with
``encode(path, **options)``) to time it on the same files in the same run; it is run with the
Python of DIR/venv in a subprocess, as it needs miditoolkit, which museformer does not use.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

import symusic

from museformer import __version__
from museformer.tokenizer import Tokenizer

DATA = Path(__file__).resolve().parents[1] / "tests" / "data"
OPTIONS = dict(normalize_pitch=True, remove_empty_bars=True, ignore_ts=True)

OFFICIAL_SNIPPET = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from official_enc import encode
files, repeat = json.loads(sys.argv[2]), int(sys.argv[3])
n, t0 = 0, time.perf_counter()
for _ in range(repeat):
    for f in files:
        n += len(encode(f, normalize_pitch=True, remove_empty_bars=True, ignore_ts=True))
print(json.dumps([n, time.perf_counter() - t0]))
"""


def bench_ours(files: list[str], repeat: int) -> tuple[int, float]:
    tok = Tokenizer(**OPTIONS)
    tok.encode_file(files[0])  # warm-up
    n, t0 = 0, time.perf_counter()
    for _ in range(repeat):
        for f in files:
            n += len(tok.encode_file(f))
    return n, time.perf_counter() - t0


def bench_official(files: list[str], repeat: int, folder: Path) -> tuple[int, float]:
    python = folder / "venv" / "bin" / "python"
    out = subprocess.run([str(python), "-c", OFFICIAL_SNIPPET, str(folder), json.dumps(files), str(repeat)],
                         check=True, capture_output=True, text=True).stdout  # fmt: skip
    n, seconds = json.loads(out.strip().splitlines()[-1])
    return n, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=50, help="passes over the fixture files")
    parser.add_argument("--official", type=Path, help="folder of the official encoder reconstruction")
    args = parser.parse_args()
    files = [str(p) for p in sorted(DATA.glob("*.mid"))]
    rows = [("museformer", *bench_ours(files, args.repeat))]
    if args.official:
        rows.append(("official (miditoolkit)", *bench_official(files, max(1, args.repeat // 10), args.official)))
    print(f"museformer {__version__}, symusic {symusic.__version__}, Python {platform.python_version()}, "
          f"{platform.machine()}; {len(files)} files x repeats, one process")  # fmt: skip
    print(f"| encoder | tokens | seconds | tokens/s |\n|---|---:|---:|---:|")
    for name, n, s in rows:
        print(f"| {name} | {n:,} | {s:.3f} | {n / s:,.0f} |")
    if len(rows) == 2:
        print(f"speed-up: {(rows[0][1] / rows[0][2]) / (rows[1][1] / rows[1][2]):.1f}x")


if __name__ == "__main__":
    main()
