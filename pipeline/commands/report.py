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
from typing import Any

from msta.method.metrics import harmonic_mean

PAPER_FEW_SHOT = {"hmdb51": (61.2, 62.3, 67.1, 70.4), "ucf101": (86.1, 90.2, 92.7, 94.8), "ssv2": (9.1, 10.4, 13.3, 17.5)}
PAPER_B2N = {"k400": (77.2, 65.9, 72.0), "hmdb51": (77.5, 57.0, 66.3), "ucf101": (96.0, 73.0, 82.9),
             "ssv2": (21.5, 14.9, 18.9)}
PAPER_ZERO_SHOT = {"hmdb51": 55.8, "ucf101": 78.7, "k600": 74.5}
PAPER_FULL = {"k400": (82.2, 96.2)}
SHOTS = (2, 4, 8, 16)


def variant(params: dict[str, Any] | None) -> str:
    """A readable name for what a run trained, from its parameters."""
    if params is None:
        return "frozen CLIP (frame mean)"
    if params["method"] == "full":
        return "full fine-tuning"
    a = params["adapter"]
    parts = []
    if params["alpha"] == 0:
        parts.append("w/o L_CC")
    if not a["temporal"]:
        parts.append("w/o temporal")
    if not a["shared"]:
        parts.append("w/o shared")
    if a["towers"] != "both":
        parts.append(f"{a['towers']} only")
    if a["temporal"] and a["temporal_branch"] != "paper":
        parts.append(f"{a['temporal_branch']} TConv")
    return "MSTA" + (" " + ", ".join(parts) if parts else "")


def _pct(values: list[float]) -> str:
    if not values:
        return ""
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
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


def render(catalog: Any, fmt: str = "markdown", authors_logs: list[Any] | None = None) -> str:
    authors = authors_section(authors_logs) if authors_logs else []
    if not catalog.exists():
        return "\n".join(authors) if authors else "no results yet"
    with catalog.reader() as con:
        rows = con.execute("""SELECT r.run_key, r.protocol, r.dataset, r.split, r.metric, r.value, r.selection,
                                     t.params FROM results r LEFT JOIN runs t ON t.key = r.run_key AND t.status = 'done'
                              ORDER BY r.dataset, r.split""").fetchall()
    if fmt == "csv":
        lines = ["run_key,protocol,dataset,split,metric,value,selection,variant"]
        lines += [f"{k},{p},{d},{s},{m},{v:.4f},{sel},{variant(json.loads(par) if par else None)}"
                  for k, p, d, s, m, v, sel, par in rows]
        return "\n".join(lines)
    few: dict[tuple[str, str, str], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    b2n: dict[tuple[str, str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    other: dict[tuple[str, str, str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    seen: set[tuple[str, ...]] = set()
    for key, protocol, dataset, split, metric, value, sel, params_json in rows:
        if (key, dataset, split, metric, sel) in seen:
            continue
        seen.add((key, dataset, split, metric, sel))
        params = json.loads(params_json) if params_json else None
        name = variant(params)
        if protocol == "few-shot" and metric == "top1" and params is not None:
            few[(dataset, name, sel)][params["shots"]].append(value)
        elif protocol == "base2novel" and metric in ("base", "novel", "hm"):
            parent = dataset.rsplit("-", 1)[0] if dataset.endswith(("-base", "-novel")) else dataset
            b2n[(parent, name, sel)][metric].append(value)
        elif metric in ("top1", "top5") and protocol in ("zero-shot", "fully-supervised"):
            target = dataset.split("-zs")[0]  # K600's three zero-shot splits are one target
            other[(protocol, target, name, sel)][metric].append(value)
    out: list[str] = []
    if few:
        out += ["## Few-shot (top-1 %)", "", "| dataset | model | selection | K=2 | K=4 | K=8 | K=16 |",
                "|---|---|---|---|---|---|---|"]
        for (dataset, name, sel), by_k in sorted(few.items()):
            out.append(f"| {dataset} | {name} | {sel} | " + " | ".join(_pct(by_k.get(k, [])) for k in SHOTS) + " |")
        for dataset in sorted({d for d, _, _ in few} & set(PAPER_FEW_SHOT)):
            out.append(f"| {dataset} | MSTA, paper (ViCLIP-B, test-selected) | max | "
                       + " | ".join(f"{v:.1f}" for v in PAPER_FEW_SHOT[dataset]) + " |")
        out.append("")
    if b2n:
        out += ["## Base-to-novel (top-1 %, mean ± std over seeds; HM of the mean base and mean novel, as the "
                "authors average)", "",
                "| dataset | model | selection | seeds | base | novel | HM |", "|---|---|---|---|---|---|---|"]
        for (dataset, name, sel), m in sorted(b2n.items()):
            out.append(f"| {dataset} | {name} | {sel} | {len(m.get('hm', m.get('base', [])))} | "
                       f"{_pct(m.get('base', []))} | {_pct(m.get('novel', []))} | "
                       f"{_hm_of_means(m.get('base', []), m.get('novel', []))} |")
        for dataset in sorted({d for d, _, _ in b2n} & set(PAPER_B2N)):
            b, n, h = PAPER_B2N[dataset]
            out.append(f"| {dataset} | MSTA, paper (ViCLIP-B, test-selected) | max | 3 | {b:.1f} | {n:.1f} | {h:.1f} |")
        out.append("")
    if other:
        out += ["## Zero-shot and fully supervised (top-1 / top-5 %, mean ± std over splits)", "",
                "| protocol | dataset | model | selection | top-1 | top-5 | paper top-1 |", "|---|---|---|---|---|---|---|"]
        for (protocol, dataset, name, sel), m in sorted(other.items()):
            paper = PAPER_ZERO_SHOT.get(dataset) if protocol == "zero-shot" else PAPER_FULL.get(dataset, (None,))[0]
            out.append(f"| {protocol} | {dataset} | {name} | {sel} | {_pct(m['top1'])} | {_pct(m['top5'])} | "
                       f"{'' if paper is None else f'{paper:.1f}'} |")
        out.append("")
    out += confusion_section(catalog)
    out += authors
    return "\n".join(out) if out else "no results yet"


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
                                      e.params->>'backbone', t.params
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
    for run_key, dataset, split, sel, path, backbone, params in evals:
        if not (catalog.home / path).exists():
            continue  # collected or moved: the results table still holds its numbers
        table = pq.read_table(catalog.home / path)
        label, pred = (table[c].to_numpy() for c in ("label", "pred"))
        wrong = label != pred
        top = sorted(Counter(zip(label[wrong].tolist(), pred[wrong].tolist())).items(),
                     key=lambda kv: (-kv[1], kv[0]))[:CONFUSED_PAIRS]
        out += [f"### {dataset}:{split}, {variant(json.loads(params) if params else None)} "
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
