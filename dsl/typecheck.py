"""Check plain values against dataclass field types, collecting every problem.

Used for the recipe schema and for each node kind's ``Config``: unknown keys,
wrong types and missing required values are all reported, with a fix.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Callable, Literal, Union, get_args, get_origin

from mmpipe.dsl.errors import did_you_mean

MISSING_MARK = "???"
# report(key_path, message, fix, value, has_value)
Report = Callable[[str, str, str, Any, bool], None]


def type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in get_args(tp))
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (list, tuple):
        return f"list of {type_name(get_args(tp)[0])}" if get_args(tp) else "list"
    if origin is dict:
        return f"mapping of {type_name(get_args(tp)[1])}" if get_args(tp) else "mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def convert(value: Any, tp: Any, key: str, report: Report) -> Any:
    """Return ``value`` converted to ``tp``; report and return it unchanged if impossible."""
    if tp is Any or tp is object:
        return value
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors: list[Any] = []
        for a in args:
            if a is type(None):
                continue
            trial: list[Any] = []
            out = convert(value, a, key, lambda *r: trial.append(r))
            if not trial:
                return out
            errors.extend(trial)
        report(key, f"expected {type_name(tp)}, got {type(value).__name__}", f"give a {type_name(tp)}", value, True)
        return value
    if origin is Literal:
        if value not in get_args(tp):
            report(key, f"must be one of {', '.join(map(repr, get_args(tp)))}", did_you_mean(str(value), map(str, get_args(tp))) or "pick one of the listed values", value, True)
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            report(key, f"expected a list, got {type(value).__name__}", f"write a YAML list, e.g. [{value!r}]", value, True)
            return value
        (arg,) = get_args(tp)[:1] or (Any,)
        return [convert(v, arg, f"{key}[{i}]", report) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            report(key, f"expected a mapping, got {type(value).__name__}", "write a YAML mapping (key: value)", value, True)
            return value
        vt = get_args(tp)[1] if get_args(tp) else Any
        return {k: convert(v, vt, f"{key}.{k}", report) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            report(key, f"expected a mapping, got {type(value).__name__}", "write a YAML mapping (key: value)", value, True)
            return value
        return build(typing.cast(type, tp), value, key, report)
    if tp is bool:
        if not isinstance(value, bool):
            report(key, f"expected true or false, got {value!r}", "write true or false", value, True)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            report(key, f"expected an integer, got {type(value).__name__}", "write a whole number", value, True)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            report(key, f"expected a number, got {type(value).__name__}", "write a number", value, True)
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)
            report(key, f"expected a string, got {type(value).__name__}", "quote the value", value, True)
        return value
    return value


def _has_default(f: Any) -> bool:
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def build(cls: type, data: dict[str, Any], prefix: str, report: Report, *, extra: str = "error", lenient: bool = False) -> Any:
    """Instantiate dataclass ``cls`` from ``data``, reporting every problem.

    ``extra``: "error" reports unknown keys; "ignore" skips them. ``lenient``: a field
    whose value has a problem (reported) takes its default, so that checking can go on
    and find every other problem in the same pass; unknown keys are reported and
    skipped. Only a required field without a usable value makes the result None.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    ok = True
    for k, v in data.items():
        path = f"{prefix}.{k}" if prefix else str(k)
        if k not in fields:
            if extra == "error":
                hint = did_you_mean(str(k), fields)
                report(path, f"unknown key '{k}'", hint or f"known keys: {', '.join(sorted(fields))}", None, False)
                ok = ok and lenient
            continue
        if v == MISSING_MARK:
            report(path, "missing required value (???)", f"set it, e.g. {path}=...", None, False)
            ok = ok and lenient and _has_default(fields[k])
            continue
        n = [0]

        def counting(*r: Any) -> None:
            n[0] += 1
            report(*r)

        tp = hints[k]
        if lenient and dataclasses.is_dataclass(tp) and isinstance(v, dict):
            # a nested section: its own bad values take their defaults
            value = build(typing.cast(type, tp), v, path, counting, extra=extra, lenient=True)
            if value is not None:
                kwargs[k] = value
            elif not _has_default(fields[k]):
                ok = False
            continue
        value = convert(v, tp, path, counting)
        if n[0] == 0:
            kwargs[k] = value
        elif not (lenient and _has_default(fields[k])):
            ok = False
    for name, f in fields.items():
        if name not in kwargs and not _has_default(f):
            if name not in data:
                path = f"{prefix}.{name}" if prefix else name
                report(path, "missing required value", f"add '{name}: ...' to the recipe or override {path}=...", None, False)
            ok = False
    if not ok:
        return None
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        report(prefix, str(exc), "", None, False)
        return None
