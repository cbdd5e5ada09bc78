"""`msta-pipe report`: the results table as the paper shapes it, the paper's numbers beside ours.

Figures are top-1 in percent. "last" is the last epoch; "best-heldout" the epoch chosen on held-out
training videos; "test-max" the epoch snapshot with the best test accuracy, which is how the authors
selected theirs. The paper's own numbers come from a ViCLIP-B backbone; with `--authors-logs DIR` the
report also reads the authors' training logs and prints what they logged, both test-selected (the
maximum over their 11 evaluations) and at their last epoch, so that like stands beside like.
"""
from __future__ import annotations

import json
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cache.errors import printable
from msta.method.metrics import harmonic_mean
from stages.train import PLACE, REPEATS, configuration_name

PAPER_FEW_SHOT = {"hmdb51": (61.2, 62.3, 67.1, 70.4), "ucf101": (86.1, 90.2, 92.7, 94.8), "ssv2": (9.1, 10.4, 13.3, 17.5)}
PAPER_B2N = {"k400": (77.2, 65.9, 72.0), "hmdb51": (77.5, 57.0, 66.3), "ucf101": (96.0, 73.0, 82.9),
             "ssv2": (21.5, 14.9, 18.9)}
PAPER_ZERO_SHOT = {"hmdb51": 55.8, "ucf101": 78.7, "k600": 74.5}
PAPER_FULL = {"k400": (82.2, 96.2)}
SHOTS = (2, 4, 8, 16)


def _pct(values: list[float]) -> str:
    """mean ± std in percent, and always n: a cell never hides how many runs it holds."""
    if not values:
        return ""
    if len(values) == 1:
        return f"{100 * values[0]:.1f} (n=1)"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f} (n={len(values)})"


def _hm_of_means(base: list[float], novel: list[float]) -> str:
    """The authors' convention: base and novel averaged over seeds (splits) first, then the HM."""
    if not base or not novel:
        return ""
    b, n = statistics.mean(base), statistics.mean(novel)
    return f"{100 * harmonic_mean(b, n):.1f}"


def authors_section(logs: list[Any]) -> list[str]:
    """The authors' logged numbers: few-shot by K, base-to-novel base / novel / HM averaged over seeds."""
    out = ["## The authors' logs (ViCLIP-B; test-max = their reported selection, last = their last epoch)", "",
           "| protocol | dataset | K / seeds | test-max top-1 | last top-1 |", "|---|---|---|---|---|"]
    for log in sorted((g for g in logs if g.protocol == "few-shot"), key=lambda g: (g.dataset, g.shots or 0)):
        out.append(f"| few-shot | {log.dataset} | K={log.shots} | {log.max_accuracy:.1f} | {log.accuracies[-1][0]:.1f} |")
    by_dataset: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for log in (g for g in logs if g.protocol == "base2novel"):
        if log.trains:
            by_dataset[log.dataset]["base"].append(log.max_accuracy or 0.0)
        elif log.evaluates_novel:  # the test-selected checkpoint evaluated on the novel classes
            by_dataset[log.dataset]["novel"].append(log.accuracies[-1][0])
    for dataset, m in sorted(by_dataset.items()):
        base, novel = statistics.mean(m["base"]), statistics.mean(m["novel"]) if m["novel"] else float("nan")
        hm = harmonic_mean(base, novel)
        out.append(f"| base-to-novel | {dataset} | {len(m['base'])} seeds | base {base:.1f}, novel {novel:.1f}, "
                   f"HM {hm:.1f} (HM of the means) | |")
    return out + [""]


@dataclass(frozen=True)
class Result:
    run_key: str
    protocol: str
    dataset: str
    split: str
    metric: str
    value: float
    selection: str
    configuration: str            # what the run trained, e.g. `MSTA w/o L_CC #1f0c9a2e`; frozen: the backbone
    params: dict[str, Any] | None  # the training run's (None: the frozen CLIP)


def results(catalog: Any) -> list[Result]:
    """Every result once, with the configuration of the run it measures."""
    with catalog.reader() as con:
        rows = con.execute("""
            SELECT DISTINCT ON (r.run_key, r.dataset, r.split, r.metric, r.selection)
                   r.run_key, r.protocol, r.dataset, r.split, r.metric, r.value, r.selection,
                   t.configuration, t.params
            FROM results r LEFT JOIN runs t ON t.key = r.run_key AND t.stage = 'train' AND t.status = 'done'
            ORDER BY r.run_key, r.dataset, r.split, r.metric, r.selection, t.finished_at DESC""").fetchall()
    out = []
    for key, protocol, dataset, split, metric, value, sel, conf, params_json in rows:
        params = json.loads(params_json) if params_json else None
        if params is None:
            conf = f"frozen CLIP (frame mean) {key.removeprefix('frozen:')}"
        elif conf is None:  # a run registered before configurations were recorded
            conf = configuration_name(params)
        out.append(Result(key, protocol, dataset, split, metric, value, sel, conf, params))
    return sorted(out, key=lambda r: (r.dataset, r.split, r.configuration, r.selection, r.run_key))


def _parent(dataset: str) -> str:
    return dataset.rsplit("-", 1)[0] if dataset.endswith(("-base", "-novel")) else dataset


def render(catalog: Any, fmt: str = "markdown", authors_logs: list[Any] | None = None) -> str:
    authors = authors_section(authors_logs) if authors_logs else []
    if not catalog.exists():
        return "\n".join(authors) if authors else "no results yet"
    found = results(catalog)
    if fmt == "csv":
        import csv
        import io

        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["run_key", "configuration", "protocol", "dataset", "split", "metric", "value", "selection"])
        writer.writerows([r.run_key, r.configuration, r.protocol, r.dataset, r.split, r.metric, f"{r.value:.4f}",
                          r.selection] for r in found)
        return buffer.getvalue().rstrip("\n")
    # Each table groups by configuration (and where it was tested); a group aggregates only its
    # repeats (seeds, splits): two configurations never share a row.
    few: dict[tuple[str, str, str, str], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    b2n: dict[tuple[str, str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    other: dict[tuple[str, str, str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    rest: dict[tuple[str, str, str, str, str, str], list[float]] = defaultdict(list)
    shown: dict[str, dict[str, Any] | None] = {}
    for r in found:
        if r.protocol == "few-shot" and r.metric == "top1" and r.params is not None:
            few[(r.dataset, r.split, r.configuration, r.selection)][r.params["shots"]].append(r.value)
        elif r.protocol == "base2novel" and r.metric in ("base", "novel", "hm"):
            b2n[(_parent(r.dataset), r.configuration, r.selection)][r.metric].append(r.value)
        elif r.metric in ("top1", "top5") and r.protocol in ("zero-shot", "fully-supervised"):
            target = r.dataset.split("-zs")[0]  # K600's three zero-shot splits are one target
            other[(r.protocol, target, r.configuration, r.selection)][r.metric].append(r.value)
        elif (r.protocol == "few-shot" and r.metric == "top5") or (r.protocol == "base2novel" and r.metric in (
                "top1", "top5")) or (r.protocol == "zero-shot" and r.metric in ("base", "novel")):
            continue  # shown above under another name (base, novel, top-1), or not compared; all in `results`
        else:
            rest[(r.protocol, r.dataset, r.split, r.configuration, r.selection, r.metric)].append(r.value)
        shown.setdefault(r.configuration, r.params)
    out: list[str] = []
    if few:
        shots = {k for by_k in few.values() for k in by_k}  # the columns come from the data
        if any(d in PAPER_FEW_SHOT for d, *_ in few):
            shots |= set(SHOTS)  # and the paper's, where its row is shown
        shots = sorted(shots)
        out += ["## Few-shot (top-1 %, mean ± std over seeds and draws, n runs)", "",
                "| dataset | test list | configuration | selection | " + " | ".join(f"K={k}" for k in shots) + " |",
                "|---|---|---|---|" + "---|" * len(shots)]
        for (dataset, split, conf, sel), by_k in sorted(few.items()):
            out.append(f"| {dataset} | {split} | {conf} | {sel} | "
                       + " | ".join(_pct(by_k.get(k, [])) for k in shots) + " |")
        for dataset in sorted({d for d, *_ in few} & set(PAPER_FEW_SHOT)):
            paper = dict(zip(SHOTS, PAPER_FEW_SHOT[dataset]))
            out.append(f"| {dataset} | test | MSTA, paper (ViCLIP-B, test-selected) | max | "
                       + " | ".join(f"{paper[k]:.1f}" if k in paper else "" for k in shots) + " |")
        out.append("")
    if b2n:
        out += ["## Base-to-novel (top-1 %, mean ± std over seeds and splits, n runs; HM of the mean base and mean "
                "novel, as the authors average)", "",
                "| dataset | configuration | selection | base | novel | HM |", "|---|---|---|---|---|---|"]
        for (dataset, conf, sel), m in sorted(b2n.items()):
            out.append(f"| {dataset} | {conf} | {sel} | {_pct(m.get('base', []))} | {_pct(m.get('novel', []))} | "
                       f"{_hm_of_means(m.get('base', []), m.get('novel', []))} |")
        for dataset in sorted({d for d, _, _ in b2n} & set(PAPER_B2N)):
            b, n, h = PAPER_B2N[dataset]
            out.append(f"| {dataset} | MSTA, paper (ViCLIP-B, test-selected) | max | {b:.1f} (n=3) | {n:.1f} (n=3) | "
                       f"{h:.1f} |")
        out.append("")
    if other:
        out += ["## Zero-shot and fully supervised (top-1 / top-5 %, mean ± std over test splits, n)", "",
                "| protocol | dataset | configuration | selection | top-1 | top-5 | paper top-1 |",
                "|---|---|---|---|---|---|---|"]
        for (protocol, dataset, conf, sel), m in sorted(other.items()):
            paper = PAPER_ZERO_SHOT.get(dataset) if protocol == "zero-shot" else PAPER_FULL.get(dataset, (None,))[0]
            out.append(f"| {protocol} | {dataset} | {conf} | {sel} | {_pct(m['top1'])} | {_pct(m['top5'])} | "
                       f"{'' if paper is None else f'{paper:.1f}'} |")
        out.append("")
    if rest:
        out += ["## Other results (%, mean ± std, n)", "",
                "| protocol | dataset | list | configuration | selection | metric | value |",
                "|---|---|---|---|---|---|---|"]
        out += [f"| {p} | {d} | {s} | {c} | {sel} | {m} | {_pct(v)} |" for (p, d, s, c, sel, m), v in sorted(rest.items())]
        out.append("")
    out += left_out_section(catalog)
    out += configurations_section(shown)
    out += confusion_section(catalog)
    out += authors
    return "\n".join(out) if out else "no results yet"


def left_out_section(catalog: Any) -> list[str]:
    """The runs and evaluations in the tables that left listed videos out (`--skip-missing`): never silent."""
    with catalog.reader() as con:
        rows = con.execute("""
            SELECT stage, target, (summary->>'videos_missing')::INTEGER AS missing FROM runs
            WHERE status = 'done' AND stage IN ('train', 'evaluate') AND (summary->>'videos_missing')::INTEGER > 0
              AND (key IN (SELECT run_key FROM results) OR key IN (SELECT eval_key FROM results))
            ORDER BY stage DESC, target""").fetchall()
    if not rows:
        return []
    return ["## Videos left out (missing from disk, --skip-missing)", "",
            *[f"- {'trained' if stage == 'train' else 'tested'} without {n}: {target}" for stage, target, n in rows],
            ""]


def configurations_section(shown: dict[str, dict[str, Any] | None]) -> list[str]:
    """What tells the configurations in the tables apart: each one's value of every parameter on which
    they differ (the rest they share)."""
    trained = {name: params for name, params in shown.items() if params is not None}
    if len(trained) < 2:
        return []
    flat = {name: _flatten({k: v for k, v in p.items() if k not in REPEATS + PLACE}) for name, p in trained.items()}
    names = sorted({k for f in flat.values() for k in f})
    differing = [k for k in names if len({json.dumps(f.get(k), sort_keys=True) for f in flat.values()}) > 1]
    out = ["## Configurations (the parameters on which the configurations above differ)", "",
           "| configuration | " + " | ".join(differing) + " |", "|---|" + "---|" * len(differing)]
    for name in sorted(flat):
        out.append(f"| {name} | " + " | ".join(_short(json.dumps(flat[name].get(k))) for k in differing) + " |")
    return out + [""]


def _flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in params.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


CONFUSED_PAIRS = 5  # per evaluation


def confusion_section(catalog: Any) -> list[str]:
    """Per evaluation, the class pairs most often confused (true -> predicted, with counts) and, where the
    dataset's descriptions are embedded for the backbone, every description of the predicted class with
    its mean cosine to those videos, closest first: what the model matched."""
    from collections import Counter

    import numpy as np
    import pyarrow.parquet as pq

    with catalog.reader() as con:
        evals = con.execute("""SELECT DISTINCT r.run_key, r.dataset, r.split, r.selection, a.path,
                                      e.params->>'backbone', t.configuration, t.params
                               FROM results r JOIN runs e ON e.key = r.eval_key AND e.status = 'done'
                               JOIN artifacts a ON a.digest = e.output
                               LEFT JOIN runs t ON t.key = r.run_key AND t.status = 'done'
                               WHERE r.selection NOT LIKE 'epoch:%'
                               ORDER BY r.dataset, r.split, r.run_key, r.selection""").fetchall()
        names = {(d, c): n for d, c, n in con.execute("SELECT dataset, class_id, name FROM classes").fetchall()}
        embedded = {(d, b): p for d, b, p in
                    con.execute("SELECT dataset, backbone, path FROM text_embedding_files").fetchall()}
        # the LLM's phrase says what a description adds; its sentence frame is shared by a whole kind
        phrases = {tuple(k): ph for *k, ph in
                   con.execute("SELECT dataset, class_id, kind, idx, phrase FROM descriptions").fetchall()}
    out: list[str] = []
    for run_key, dataset, split, sel, path, backbone, conf, params in evals:
        if not (catalog.home / path).exists():
            continue  # collected or moved: the results table still holds its numbers
        table = pq.read_table(catalog.home / path)
        label, pred = (table[c].to_numpy() for c in ("label", "pred"))
        wrong = label != pred
        top = sorted(Counter(zip(label[wrong].tolist(), pred[wrong].tolist())).items(),
                     key=lambda kv: (-kv[1], kv[0]))[:CONFUSED_PAIRS]
        name = conf or (configuration_name(json.loads(params)) if params else "frozen CLIP (frame mean)")
        out += [f"### {dataset}:{split}, {name} "
                f"(run {run_key[:16]}, {sel})", ""]
        if not top:
            out += ["No video was misclassified.", ""]
            continue
        descriptions = None
        if "embedding" in table.column_names and (dataset, backbone) in embedded:
            descriptions = pq.read_table(catalog.home / embedded[(dataset, backbone)],
                                         filters=[("level", "=", "description")]).to_pylist()
            videos = table["embedding"].combine_chunks().flatten().to_numpy().reshape(len(table), -1)
        out += ["| true class | predicted as | videos | descriptions of the predicted class, closest to these "
                "videos first (mean cosine) |", "|---|---|---|---|"]
        for (t, p), count in top:
            matched = "-"
            own = [d for d in descriptions or [] if d["class_id"] == p]
            if own:
                cosines = videos[(label == t) & (pred == p)] @ np.asarray([d["embedding"] for d in own]).T
                ranked = sorted(zip(cosines.mean(0).tolist(), own), key=lambda x: -x[0])
                matched = "; ".join(f"{c:.3f} \"{_short(phrases.get((dataset, p, d['kind'], d['idx']), d['text']))}\" "
                                    f"({d['kind']})" for c, d in ranked)
            out.append(f"| {names.get((dataset, t), t)} | {names.get((dataset, p), p)} | {count} | {matched} |")
        out.append("")
    return ["## Most confused classes (true -> predicted, per evaluation)", "", *out] if out else []


def _short(text: str, limit: int = 70) -> str:
    text = text.replace("|", "/").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def report_command(fmt: str, authors_logs: Path | None, home: Path | None) -> None:
    import typer

    from pipeline.commands import session

    logs = None
    if authors_logs is not None:
        from pipeline.commands.authors import read_logs

        logs = read_logs(authors_logs)
    typer.echo(printable(render(session.make_runner(home).catalog, fmt, logs)))  # names from LLMs and files
