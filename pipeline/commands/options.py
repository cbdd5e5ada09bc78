"""Options declared once. A command's configuration is a frozen dataclass whose fields carry their
flag, help, limit and choices (`opt`); from it derive the command line (`cli_parameters`), the
resolution of flags over a preset over the defaults (`resolve`), the checks (`check`) and what
enters a stage key (`keyed`). Presets never need to know which flags a user typed: every flag
reaches the command as None unless given, whichever click typer ships.

Light on purpose: the CLI builds its signatures from here at import time.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any, TypeVar

from cache.errors import UserError
from pipeline.commands.flags import Limit

T = TypeVar("T")

# How a field enters its stage's key when not as itself.
SELF = "self"          # as itself, under its own name
INPUTS = "inputs"      # it chooses an input (a list, a draw), whose own key holds it
RESOLVED = "resolved"  # the request builder keys its resolved value (under its own or another name)
LOCATOR = "locator"    # how fast or where to go, never what comes out


@dataclass(frozen=True)
class Spec:
    help: str
    flags: tuple[str, ...] = ()          # default: --field-name (a bool: --name/--no-name)
    limit: Limit | None = None
    choices: tuple[str, ...] = ()
    key: str = SELF
    group: str = ""                      # fields keyed together under this name (e.g. the adapter config)
    cli: bool = True                     # False: set by code (the demo, tests), not on the command line
    default_text: str | None = None      # the help's default when the dataclass default is resolved later
    hidden_flags: tuple[str, ...] = ()   # old spellings kept for scripts, not shown in --help


def opt(default: Any, help: str, **spec: Any) -> Any:
    """A configuration field: its default and everything the CLI and the checks need to know."""
    return field(default=default, metadata={"spec": Spec(help, **spec)})


def spec_of(f: Field[Any]) -> Spec:
    return f.metadata.get("spec") or Spec("")


def flag_name(f: Field[Any]) -> str:
    s = spec_of(f)
    return s.flags[0].split("/")[0] if s.flags else "--" + f.name.replace("_", "-")


def _default_text(f: Field[Any]) -> str:
    s = spec_of(f)
    if s.default_text is not None:
        return s.default_text
    if f.default is MISSING or f.default is None:
        return ""
    if isinstance(f.default, bool):
        return "on" if f.default else "off"
    return f"{f.default:g}" if isinstance(f.default, float) else str(f.default)


def cli_parameters(cls: type) -> list[Any]:
    """One keyword parameter per CLI field of `cls`, for a typer command's signature. Every one
    defaults to None, so that "not given" is visible to `resolve` (presets fill those only)."""
    import inspect
    from typing import Annotated, Optional

    import typer

    out = []
    for f in fields(cls):
        s = spec_of(f)
        if not s.cli:
            continue
        kind = _base_type(f)
        decls = list(s.flags) if s.flags else (
            [f"--{f.name.replace('_', '-')}/--no-{f.name.replace('_', '-')}"] if kind is bool
            else ["--" + f.name.replace("_", "-")])
        help_text = s.help
        if s.choices:
            help_text += f" ({', '.join(s.choices)})"
        default = _default_text(f)
        if default:
            help_text += f" [default: {default}]"
        info = typer.Option(*decls, help=help_text, show_default=False)
        out.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                                     default=None, annotation=Annotated[Optional[kind], info]))
        for alias in s.hidden_flags:  # a second, hidden option that feeds the same field
            hidden = typer.Option(alias, hidden=True, show_default=False)
            out.append(inspect.Parameter(_alias_param(f.name, alias), inspect.Parameter.KEYWORD_ONLY,
                                         default=None, annotation=Annotated[Optional[kind], hidden]))
    return out


def _alias_param(name: str, alias: str) -> str:
    return f"{name}__{alias.lstrip('-').replace('-', '_')}"


def _base_type(f: Field[Any]) -> type:
    """The field's Python type without Optional (annotations are strings here: `from __future__`)."""
    text = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "str")
    text = text.replace(" | None", "").replace("Optional[", "").rstrip("]")
    return {"int": int, "float": float, "bool": bool, "str": str}.get(text, str)


def given_values(cls: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of `cls` a user gave on the command line (None: not given), hidden aliases folded in."""
    out: dict[str, Any] = {}
    for f in fields(cls):
        s = spec_of(f)
        candidates = [values.get(f.name)] + [values.get(_alias_param(f.name, a)) for a in s.hidden_flags]
        given = [v for v in candidates if v is not None]
        if given:
            out[f.name] = given[0]
    return out


def resolve(cls: type[T], given: Mapping[str, Any], preset: Mapping[str, Any] | None = None,
            **fixed: Any) -> T:
    """Defaults, then the preset's values, then the user's flags: flags always win."""
    unknown = set(preset or {}) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"preset sets unknown fields {sorted(unknown)}")
    values = {**(preset or {}), **fixed, **given}
    return cls(**values)


def check(obj: Any) -> None:
    """Every field inside its limit and choices, else a usage error naming the flag (exit 2)."""
    for f in fields(obj):
        s = spec_of(f)
        value = getattr(obj, f.name)
        if value is None:
            continue
        if s.choices and value not in s.choices:
            raise UserError(f"{flag_name(f)} must be one of {', '.join(s.choices)}, not {value!r}", 2)
        if s.limit is not None and not isinstance(value, (bool, str)) and not s.limit.holds(value):
            what = s.limit.describe() if math.isfinite(value) else "a finite number"
            raise UserError(f"{flag_name(f)} must be {what}, not {value:g}", 2)


def keyed(obj: Any) -> dict[str, Any]:
    """The fields that enter the stage key as themselves."""
    return {f.name: getattr(obj, f.name) for f in fields(obj) if spec_of(f).key == SELF}


def group(obj: Any, name: str) -> dict[str, Any]:
    """The fields of one keyed group (e.g. `adapter`), by field name."""
    return {f.name: getattr(obj, f.name) for f in fields(obj) if spec_of(f).group == name}


def with_options(cls: type) -> Any:
    """Decorator of a typer command: the command line gets one flag per field of `cls` (before the
    command's own parameters), and the function receives the flags a user gave as `given`, a dict by
    field name (see `given_values`), to `resolve` over a preset and the defaults."""
    import functools
    import inspect

    def wrap(func: Any) -> Any:
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
               for p in inspect.signature(func, eval_str=True).parameters.values() if p.name != "given"]
        generated = cli_parameters(cls)
        names = {p.name for p in generated}

        @functools.wraps(func)
        def command(**kwargs: Any) -> Any:
            flags = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
            return func(given_values(cls, flags), **kwargs)

        params = [*generated, *own]
        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return wrap
