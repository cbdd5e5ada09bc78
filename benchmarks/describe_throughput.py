"""describe throughput against the OpenAI-compatible test server with injected latency.

348 requests (174 SSv2 classes x 2 kinds) at --concurrency 16 with 200 ms per answer: prints the
wall time, the latency bound 348 x 0.2 / 16 and their ratio, then the all-cached rerun's time and
request count. Run: python benchmarks/describe_throughput.py [--labels PATH] [--latency 0.2]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.commands.dag import LLMOptions, describe_llm_request, stage_for  # noqa: E402
from pipeline.engine.runner import Runner  # noqa: E402
from pipeline.formats.datasets import Config  # noqa: E402


def synthetic_labels(path: Path, n: int) -> Path:
    path.write_text("id,name\n" + "".join(f"{i},doing thing number {i}\n" for i in range(n)))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--labels", type=Path, default=ROOT.parent / "shared/data/labels/ssv2_labels.csv",
                    help="class list (default: the real SSv2 list if present, else 174 made-up classes)")
    ap.add_argument("--latency", type=float, default=0.2)
    ap.add_argument("--concurrency", type=int, default=16)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        # The server runs in its own process, as a real endpoint would: in-process it would compete
        # with the client for the interpreter lock and the measurement would be the server's.
        stats = Path(tmp) / "stats.json"
        server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "llm_server.py"), "--latency",
                                   str(args.latency), "--stats-file", str(stats), "--idle-timeout", "120"],
                                  stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True)
        base_url = server.stdout.readline().strip()
        requests_total = lambda: json.loads(stats.read_text())["requests_total"] if stats.exists() else 0
        labels = args.labels if args.labels.exists() else synthetic_labels(Path(tmp) / "labels.csv", 174)
        home = Path(tmp) / "home"
        ds = Config(None).dataset("bench", labels)
        opts = LLMOptions(model="bench", endpoint=base_url, base_url_given=True, n=2,
                          concurrency=args.concurrency)

        def run() -> float:
            runner = Runner(home, stage_for, {"progress": False}, echo=lambda s: None)
            started = time.perf_counter()
            for kind in ("spatial", "temporal"):
                runner.materialise(describe_llm_request(runner, ds, kind, opts))
            return time.perf_counter() - started

        import openai  # noqa: F401  (imports and the tokenizer's vocabulary load once per process:

        from stages.describe import TokenCounter  # not throughput, so they are warmed up first)

        TokenCounter()(["warm up"])
        wall = run()
        sent = requests_total()
        bound = sent * args.latency / args.concurrency
        cached_wall = run()
        resent = requests_total() - sent
        server.stdin.close()
        server.wait(timeout=10)
        print(f"first run : {sent} requests in {wall:.2f} s; latency bound {sent} x {args.latency} / "
              f"{args.concurrency} = {bound:.2f} s; ratio wall/bound = {wall / bound:.2f}")
        print(f"rerun     : {resent} requests in {cached_wall:.2f} s "
              f"({wall / cached_wall:.0f}x faster than the first run)")


if __name__ == "__main__":
    main()
