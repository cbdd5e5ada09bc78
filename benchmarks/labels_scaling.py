"""How reading and validating a class list scales: N and 10*N labels, same format, side by side.

A linear check takes about 10x as long on 10x the labels; the former check (list.count per name)
took about 100x, 104 s for 100k labels. Prints the two medians and their ratio.

    python benchmarks/labels_scaling.py [--n 10000] [--reps 3]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from stages.formats.classlists import read_class_list


def seconds(path: Path, reps: int) -> float:
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        read_class_list(path)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="the smaller list's labels (the larger has 10x)")
    parser.add_argument("--reps", type=int, default=3, help="timed reads per size (median reported)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for n in (args.n, 10 * args.n):
            path = Path(tmp) / f"labels_{n}.csv"
            path.write_text("id,name\n" + "".join(f"{i},class number {i}\n" for i in range(n)))
            results[n] = seconds(path, args.reps)
            print(f"{n:>9,} labels: {results[n] * 1e3:9.1f} ms")
    small, large = results[args.n], results[10 * args.n]
    print(f"ratio 10x labels / 1x labels: {large / small:.1f} (linear ~10, quadratic ~100)")


if __name__ == "__main__":
    main()
