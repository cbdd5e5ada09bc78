"""How the pipeline grows with a Kinetics-shaped list (400 classes), side by side in one run.

Builds the dataset at three sizes from ONE tiny H.264 clip hard-linked under every listed path (so
disk stays small and every path is still its own video to decode), then times, in a fresh home per
size: `frames` (first run: decodes every video; second run: all cached), `status`, `gc --dry-run`,
`sql` over the `frames` view, `train` from its start to its first optimiser step (fully supervised,
msta-tiny, no L_CC, every listed video), and `evaluate --frozen` on a test list of a quarter of the
size. Prints seconds per 1k videos at each size, the exponent fitted to seconds ~ N^k (1 = linear;
for train start-up the goal is 0: it must not grow with the list) and each command's peak RSS.

    python benchmarks/scale.py                    # sizes 250, 1000, 4000 (a few minutes on 2 cores)
    python benchmarks/scale.py --sizes 1000,4000,16000 --repeats 3

Peak RSS of the same command moves by ~5 MB from run to run (when DuckDB's instances open and
close follows the clock), so with --repeats every size is built once and run R times in fresh
homes: the table gives the median and the range.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLASSES = 400

# Runs one command in a child, so that its peak RSS (with its own decoding workers) is its alone.
MEASURE = """
import resource, subprocess, sys, time
t0 = time.perf_counter()
r = subprocess.run(sys.argv[1:], capture_output=True, text=True)
seconds = time.perf_counter() - t0
if r.returncode not in (0, 3):
    sys.exit(f"{sys.argv[1:]} failed ({r.returncode}): {r.stderr[-2000:]}")
first = [l for l in r.stdout.splitlines() if l.startswith("FIRST_STEP ")]
print(first[0].split()[1] if first else seconds, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
"""

# `train` until its first optimiser step, timed from the start of its process (imports included).
FIRST_STEP = """
import time
t0 = time.perf_counter()
import os, sys
import msta.train
def first_step(self, *args, **kwargs):
    print("FIRST_STEP", time.perf_counter() - t0, flush=True)
    os._exit(0)
msta.train.Trainer.step = first_step
from pipeline.cli import main
sys.argv = ["msta-pipe", *sys.argv[1:]]
main()
"""


def tiny_clip(path: Path) -> None:
    import av
    import numpy as np

    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(16):
            frame = np.full((32, 32, 3), (i * 15) % 255, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def test_count(n: int) -> int:
    return max(CLASSES, n // 4)


def build(root: Path, n: int, clip: Path) -> Path:
    """A K400-shaped dataset of n training videos (and n/4 test videos) hard-linked to one clip."""
    (root / "videos").mkdir(parents=True)
    lines = {"train": [], "test": []}
    for split, count in (("train", n), ("test", test_count(n))):
        for i in range(count):
            rel = f"{split}/c{i % CLASSES:03d}/v{i:06d}.mp4"
            (root / "videos" / rel).parent.mkdir(parents=True, exist_ok=True)
            os.link(clip, root / "videos" / rel)
            lines[split].append(f"{rel} {i % CLASSES}")
    (root / "labels.csv").write_text("id,name\n" + "".join(f"{c},action {c}\n" for c in range(CLASSES)))
    for split, items in lines.items():
        (root / f"{split}.txt").write_text("\n".join(items) + "\n")
    config = root / "msta.toml"
    config.write_text('[datasets.k]\nlabels = "labels.csv"\nvideo_root = "videos"\n'
                      '[datasets.k.lists]\ntrain = "train.txt"\ntest = "test.txt"\n'
                      "[datasets.k.video]\nframes = 4\nsamplings = 1\ntrain_short_side = 32\n"
                      "test_short_side = 32\ncrop_size = 32\ntest_clips = 1\ntest_crops = 1\n")
    return config


def run(cmd: list[str]) -> tuple[float, float]:
    out = subprocess.run([sys.executable, "-c", MEASURE, *cmd], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        sys.exit(out.stderr or out.stdout)
    seconds, rss = out.stdout.split()
    return float(seconds), float(rss)


def exponent(sizes: list[int], seconds: list[float]) -> float:
    xs, ys = [math.log(n) for n in sizes], [math.log(max(s, 1e-6)) for s in seconds]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="250,1000,4000", help="training videos per size, comma-separated")
    parser.add_argument("--workers", type=int, default=2, help="decoding processes of `frames`")
    parser.add_argument("--repeats", type=int, default=1, help="runs per size, each in a fresh home (medians reported)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    cli = [sys.executable, "-m", "pipeline"]
    results: dict[str, list[list[tuple[float, float]]]] = {}  # command -> per size -> (seconds, MB) per run
    with tempfile.TemporaryDirectory() as tmp:
        clip = Path(tmp) / "clip.mp4"
        tiny_clip(clip)
        for n, repeat in ((n, r) for n in sizes for r in range(args.repeats)):
            config = Path(tmp) / f"n{n}" / "msta.toml"
            if not repeat:
                build(Path(tmp) / f"n{n}", n, clip)
            home = Path(tmp) / f"home{n}-{repeat}"
            common = ["--config", str(config), "--home", str(home)]
            steps = {
                "frames (first run)": [*cli, "frames", "-d", "k", "--list", "train", "--workers", str(args.workers),
                                       "--no-progress", *common],
                "frames (second run)": [*cli, "frames", "-d", "k", "--list", "train", "--no-progress", *common],
                "status": [*cli, "status", "--home", str(home)],
                "gc --dry-run": [*cli, "gc", "--dry-run", "--home", str(home)],
                "sql over frames": [*cli, "sql", "select count(*), count(distinct video), sum(bytes) from frames",
                                    "--home", str(home)],
                "train start-up to step 1": [sys.executable, "-c", FIRST_STEP, "train", "-d", "k", "--protocol",
                                             "fully-supervised", "--backbone", "msta-tiny", "--pretrained", "random",
                                             "--adapter-layers", "2-4", "--adapter-dim", "8", "--batch-size", "8",
                                             "--no-consistency", "--workers", "0", "--no-progress", *common],
                "evaluate --frozen (test: N/4, >= 400)": [*cli, "evaluate", "-d", "k", "--list", "test", "--frozen",
                                                   "--backbone", "msta-tiny", "--pretrained", "random",
                                                   "--workers", "0", "--no-progress", *common],
            }
            for name, cmd in steps.items():
                per_size = results.setdefault(name, [[] for _ in sizes])[sizes.index(n)]
                per_size.append(run(cmd))
                print(f"  n={n:>6} run {repeat + 1} {name:<32} {per_size[-1][0]:8.2f} s {per_size[-1][1]:6.0f} MB",
                      file=sys.stderr, flush=True)
    print(f"Kinetics-shaped lists ({CLASSES} classes, one hard-linked 16-frame 32 px clip), sizes {sizes}, "
          f"{args.repeats} run(s) each; {os.cpu_count()} cores. Seconds per 1k videos at each size (train start-up: "
          "seconds), fitted exponent k of seconds ~ N^k, peak RSS in MB at each size (medians; the range in brackets).")
    head = " | ".join(f"N={n}" for n in sizes)
    print(f"\n| command | {head} | exponent | peak RSS MB ({', '.join(map(str, sizes))}) | RSS largest/smallest |")
    print("|---|" + "---|" * len(sizes) + "---|---|---|")
    for name, per_size in results.items():
        seconds = [statistics.median(s for s, _ in runs) for runs in per_size]
        per_k = [s if name.startswith("train") else s / (test_count(n) if "evaluate" in name else n) * 1000
                 for s, n in zip(seconds, sizes)]
        rss = [statistics.median(r for _, r in runs) for runs in per_size]
        spread = [f" [{min(r for _, r in runs):.0f}-{max(r for _, r in runs):.0f}]" if len(runs) > 1 else ""
                  for runs in per_size]
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in per_k) + f" | {exponent(sizes, seconds):.2f} | "
              + ", ".join(f"{r:.0f}{w}" for r, w in zip(rss, spread)) + f" | {rss[-1] / rss[0]:.2f} |")


if __name__ == "__main__":
    main()
