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
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.commands.configs import DescribeOptions
from pipeline.commands.dag import describe_llm_request, stage_for  # noqa: E402
from stages.engine.runner import Runner  # noqa: E402
from stages.formats.datasets import Config  # noqa: E402


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
        server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "llm_server.py"), "--latency",
                                   str(args.latency), "--idle-timeout", "120"],
                                  stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True)
        base_url = server.stdout.readline().strip()
        # The server's own count, asked over HTTP (its --stats-file rewrite per request would take
        # the client's CPU on a 2-core machine and inflate the ratio).
        stats_url = base_url.removesuffix("/v1") + "/_stats"
        requests_total = lambda: json.loads(urllib.request.urlopen(stats_url, timeout=10).read())["requests_total"]
        labels = args.labels if args.labels.exists() else synthetic_labels(Path(tmp) / "labels.csv", 174)
        home = Path(tmp) / "home"
        ds = Config(None).dataset("bench", labels)
        opts = DescribeOptions(model="bench", base_url=base_url, n=2,
                          concurrency=args.concurrency)

        def run() -> float:
            runner = Runner(home, stage_for, {"progress": False}, echo=lambda s: None)
            started = time.perf_counter()
            for kind in ("spatial", "temporal"):
                runner.materialise(describe_llm_request(runner, ds, kind, opts))
            return time.perf_counter() - started

        import jinja2  # noqa: F401  (imports and the tokenizer's vocabulary load once per process:
        import openai  # noqa: F401  not throughput, so they are warmed up first; the cold CLI run

        from prompts.tokens import clip_token_counter  # below counts them)

        clip_token_counter()(["warm up"])
        cpu = time.process_time()
        wall = run()
        cpu = time.process_time() - cpu
        sent = requests_total()
        bound = sent * args.latency / args.concurrency
        cached_wall = run()
        resent = requests_total() - sent
        bare_wall, bare_cpu = bare_client(home, base_url, args.concurrency)
        cold_wall = cold_cli(labels, base_url, args.concurrency, Path(tmp) / "cold")
        cold_sent = requests_total() - 2 * sent
        server.stdin.close()
        server.wait(timeout=10)
        print(f"latency bound : {sent} requests x {args.latency} s / {args.concurrency} in flight = {bound:.2f} s")
        print(f"bare client   : the same {sent} requests, openai client + thread pool only: {bare_wall:.2f} s, "
              f"ratio to the bound {bare_wall / bound:.2f}, client CPU {1e3 * bare_cpu / sent:.1f} ms/request")
        print(f"describe      : {sent} requests in {wall:.2f} s, ratio to the bound {wall / bound:.2f}, "
              f"over the bare client {wall / bare_wall:.2f}, client CPU {1e3 * cpu / sent:.1f} ms/request")
        print(f"cold CLI      : msta-pipe describe in a new process, imports included: "
              f"{cold_sent} requests in {cold_wall:.2f} s, ratio to the bound {cold_wall / bound:.2f}")
        print(f"rerun         : {resent} requests in {cached_wall:.2f} s "
              f"({wall / cached_wall:.0f}x faster than the first run)")


def bare_client(home: Path, base_url: str, concurrency: int) -> tuple[float, float]:
    """The requests the stage sent (same messages, same response_format), replayed with nothing but
    the openai client and a thread pool: the floor that client and server set."""
    import duckdb
    from openai import OpenAI

    with duckdb.connect(str(home / "catalog.duckdb"), read_only=True) as con:
        rows = con.execute("SELECT messages, params, response_format FROM llm_requests "
                           "WHERE status = 'ok' ORDER BY created_at").fetchall()
    client = OpenAI(base_url=base_url, api_key="not-needed", max_retries=0)

    def one(row: tuple[str, str, str]) -> None:
        messages, params, fmt = row
        p = json.loads(params)
        client.chat.completions.create(model="bench", messages=json.loads(messages), temperature=p["temperature"],
                                       max_tokens=p["max_tokens"], seed=p["seed"], response_format={"type": fmt})

    cpu, started = time.process_time(), time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, rows))
    return time.perf_counter() - started, time.process_time() - cpu


def cold_cli(labels: Path, base_url: str, concurrency: int, home: Path) -> float:
    """What a user's `msta-pipe describe` takes from a new process, imports included."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline", "describe", "--dataset", "bench", "--labels", str(labels),
                    "--model", "bench", "--base-url", base_url, "--concurrency", str(concurrency),
                    "--home", str(home), "--no-progress"], check=True, stdout=subprocess.DEVNULL, cwd=home.parent)
    return time.perf_counter() - started

if __name__ == "__main__":
    main()
