"""The house rules, read off the import graph of every project module (imports inside functions
included): layers only import downwards, nothing imports in a circle, the model package stands
alone, and a stage sees no other stage, only the shared artifact readers."""
from __future__ import annotations

import ast
from pathlib import Path

from .conftest import ROOT

PACKAGES = ("msta", "cache", "pipeline", "prompts", "stages")

# Lowest first. A module belongs to the longest prefix listed.
LAYERS = {
    "msta": 0,               # the model package: method, video data path, synthetic world, loop
    "cache": 1,              # keys, errors, lock, content-addressed store, catalog
    "stages.engine": 2,      # the stage contract and the runner
    "stages.formats": 2,     # list, label and config files; plots
    "prompts": 2,            # sentence frames, the LLM client, answer parsing
    "stages": 3,
    "pipeline.commands": 4,  # the DAG's requests, demo, report, predict, export
    "pipeline": 5,           # the CLI
}


def module_files() -> dict[str, Path]:
    mods = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def import_graph() -> dict[str, set[str]]:
    mods = module_files()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for mod, path in mods.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            targets |= {t for t in map(resolve, names) if t is not None and t != mod}
        graph[mod] = targets
    return graph


def layer(mod: str) -> int:
    prefix = max((p for p in LAYERS if mod == p or mod.startswith(p + ".")), key=len)
    return LAYERS[prefix]


def test_no_relative_imports() -> None:
    for mod, path in module_files().items():
        for node in ast.walk(ast.parse(path.read_text())):
            assert not (isinstance(node, ast.ImportFrom) and node.level), f"{mod} imports relatively"


def test_imports_only_run_downwards() -> None:
    upward = [f"{src} -> {dst}" for src, dsts in import_graph().items() for dst in dsts if layer(dst) > layer(src)]
    assert not upward


# The top-level folders read bottom to top as the layers: a folder is one layer of the house.
FOLDERS = {"msta": 0, "cache": 1, "prompts": 2, "stages": 3, "pipeline": 4}


def test_folders_are_the_layers() -> None:
    """Grouped by top-level folder, the import graph has no arrow running back up."""
    assert set(FOLDERS) == set(PACKAGES)
    upward = sorted({f"{src} -> {dst}" for src, dsts in import_graph().items() for dst in dsts
                     if FOLDERS[dst.split(".")[0]] > FOLDERS[src.split(".")[0]]})
    assert not upward


def test_the_cli_imports_only_the_command_layer_and_the_errors() -> None:
    graph = import_graph()
    assert graph["pipeline.cli"] and all(d.startswith("pipeline.commands") or d == "cache.errors"
                                         for d in graph["pipeline.cli"]), graph["pipeline.cli"]


def test_no_import_cycles() -> None:
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[str] = []

    def visit(mod: str, path: list[str]) -> None:
        state[mod] = 1
        for dst in sorted(graph[mod]):
            if state.get(dst) == 1:
                cycles.append(" -> ".join(path[path.index(dst):] + [dst]))
            elif dst not in state:
                visit(dst, path + [dst])
        state[mod] = 2

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [mod])
    assert not cycles


def test_the_model_package_stands_alone() -> None:
    outside = {f"{src} -> {dst}" for src, dsts in import_graph().items() if src.startswith("msta")
               for dst in dsts if not dst.startswith("msta")}
    assert not outside


def test_the_foundation_builds_on_the_model_package_file_helpers_only() -> None:
    graph = import_graph()
    assert {dst for src, dsts in graph.items() if src.startswith("cache") for dst in dsts
            if not dst.startswith("cache")} <= {"msta.fileio"}
    engine = {dst for src, dsts in graph.items() if src.startswith("stages.engine") for dst in dsts}
    assert all(d.startswith(("cache", "stages.engine")) for d in engine), engine  # the engine knows no CLIP


def test_a_stage_sees_no_other_stage() -> None:
    allowed = ("cache", "msta", "stages.engine.stage", "stages.formats", "prompts", "stages.artifacts",
               "stages.models")
    graph = import_graph()
    seen = {f"{src} -> {dst}" for src, dsts in graph.items() if src.startswith("stages.") for dst in dsts
            if not dst.startswith(allowed)}
    assert not seen
    for reader in ("stages.artifacts", "stages.models"):  # the shared readers read no stage either
        assert not {d for d in graph[reader]
                    if d.startswith("stages.") and not d.startswith(("stages.engine.", "stages.formats."))}


def test_the_graph_sees_the_project() -> None:
    """Guards the tests above against passing on an empty or misread graph."""
    graph = import_graph()
    assert {"msta.train", "stages.train", "stages.engine.runner", "pipeline.cli"} <= set(graph)
    assert "msta.train" in graph["stages.train"] and "stages.engine.stage" in graph["stages.train"]
    assert layer("pipeline.cli") == 5 and layer("pipeline.commands.dag") == 4 and layer("msta.method.model") == 0
