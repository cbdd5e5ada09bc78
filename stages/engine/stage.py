"""The stage contract.

A stage is a pure function of (its parameters, the content of its inputs, its code version)
that produces one artifact. A `Request` names the stage, its keyed parameters, its
locators (where things are, how fast to go: never part of the key) and its inputs, each either
another `Request` or a `FileInput`. The engine turns a request tree into keys and runs;
stage modules implement `run` and never see each other, only the artifacts they are handed.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Union

if TYPE_CHECKING:
    import duckdb
    import pyarrow as pa

    from cache.catalog import Catalog
    from cache.store import Store, TableSink


@dataclass(frozen=True)
class FileInput:
    """A file outside the home (label list, template, weights): keyed by its content digest."""
    path: Path

    def to_json(self) -> dict[str, Any]:
        return {"file": str(self.path)}


@dataclass(frozen=True)
class Request:
    stage: str
    params: Mapping[str, Any]
    inputs: Mapping[str, Union["Request", FileInput]] = field(default_factory=dict)
    locators: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"stage": self.stage, "params": dict(self.params), "locators": dict(self.locators),
                "inputs": {k: v.to_json() for k, v in self.inputs.items()}}

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> "Request":
        inputs: dict[str, Request | FileInput] = {}
        for name, spec in data.get("inputs", {}).items():
            inputs[name] = FileInput(Path(spec["file"])) if "file" in spec else Request.from_json(spec)
        return Request(data["stage"], dict(data["params"]), inputs, dict(data.get("locators", {})))


@dataclass(frozen=True)
class Artifact:
    """A registered stage output: `digest` identifies its logical content."""
    digest: str
    kind: str
    path: Path
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FileDigest:
    path: Path
    sha256: str


Resolved = Union[Artifact, FileDigest]


def artifact_of(r: Resolved) -> Artifact:
    """An input that must be an upstream artifact."""
    if not isinstance(r, Artifact):
        raise TypeError(f"expected an upstream artifact, got the file {r.path}")
    return r


def path_of(r: Resolved) -> Path:
    """An input that must be a file outside the home."""
    if not isinstance(r, FileDigest):
        raise TypeError(f"expected a file input, got the artifact {r.digest[:12]}")
    return r.path


@dataclass
class Output:
    """What `Stage.run` returns: exactly one of `table`, `rows`, `data` or `file` is the artifact (a
    file's digest is its sha256 unless the stage gives a logical `digest`; `rows` is a table written
    batch by batch, for one too long to hold).

    `publish` runs inside the transaction that registers the artifact, so catalog tables that
    mirror an artifact (descriptions, classes, ...) change together with it or not at all.
    """
    kind: str
    table: "pa.Table | None" = None
    rows: "TableSink | None" = None
    digest: str | None = None  # a file output's logical digest, when its bytes are not stable
    data: bytes | None = None
    file: Path | None = None
    ext: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict)
    summary: Mapping[str, Any] = field(default_factory=dict)
    publish: Callable[["duckdb.DuckDBPyConnection", Artifact], None] | None = None


class StageFailed(Exception):
    """The stage finished but did not produce a complete artifact (e.g. some classes failed).

    `output`, when given, is still published (valid rows stay inspectable) but the run is not
    marked done, so a rerun tries again.
    """

    def __init__(self, message: str, output: Output | None = None) -> None:
        super().__init__(message)
        self.output = output


@dataclass
class Context:
    """What a running stage may use: the home's store and catalog, and run-time options."""
    home: Path
    catalog: Catalog
    store: Store
    options: dict[str, Any] = field(default_factory=dict)
    echo: Callable[[str], None] = print
    run_id: str = ""
    key: str = ""
    forced: bool = False  # run with --force: a stage redoes its work instead of resuming it
    target: str = ""  # the running request's target
    upstream: Mapping[str, str] = field(default_factory=dict)  # input name -> that request's target

    def option(self, name: str, default: Any = None) -> Any:
        return self.options.get(name, default)


class Stage:
    code_version: ClassVar[str]

    def target(self, req: Request, upstream: Mapping[str, str]) -> str:
        """A readable identity shared by every run of 'the same thing' with other parameters;
        `upstream` gives the targets of the request's upstream requests by input name."""
        raise NotImplementedError

    def configuration(self, req: Request, upstream: Mapping[str, str]) -> str:
        """The name of what a run computes, apart from where it runs and which repeat it is: runs of
        one configuration differ only in what varies across repeats (a seed, a split), and that is
        all `report` aggregates over. By default a target is one configuration."""
        return self.target(req, upstream)

    def run(self, req: Request, inputs: Mapping[str, Resolved], ctx: Context) -> Output | None:
        """Produce the artifact. None only on a non-zero rank of a torchrun launch (`Runner.follow`),
        whose share of the work rank 0 registers."""
        raise NotImplementedError

    def check(self, artifact: Artifact, home: Path) -> str:
        """Why a cached artifact no longer holds although its key matches ("" if it holds).

        For inputs too many to key individually, e.g. the videos a frame index was decoded from.
        """
        return ""

    def plan(self, req: Request, inputs: Mapping[str, Resolved] | None, ctx: Context) -> str:
        """What a run would do, for --dry-run; `inputs` is None while upstream would run first."""
        return ""
