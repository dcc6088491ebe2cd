"""Per-request parameters: what a single request may set, checked like recipe values.

Each node kind lists in ``request_params`` the config fields a request may override
(``language``, ``guidance_scale``, ...). ``request_params(plan)`` collects them for
a compiled plan, with their types and the recipe's values as defaults;
``check_params`` converts and checks a request's values with the same type checker
the recipe went through, so a bad value is refused with the same words.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any

from mmpipe.dsl.plan import Plan
from mmpipe.dsl.typecheck import convert, type_name


@dataclass
class ParamSpec:
    """One per-request parameter: its type, the recipe's value, the nodes that read it."""

    name: str
    type: Any
    default: Any
    nodes: list[str]
    batch_key: bool  # requests with different values never share a micro-batch

    @property
    def type_name(self) -> str:
        return type_name(self.type)


def request_params(plan: Plan) -> dict[str, ParamSpec]:
    """Every parameter some node of ``plan`` lets a request set."""
    from mmpipe.graphs import get_kind, load_target

    out: dict[str, ParamSpec] = {}
    for name, node in plan.nodes.items():
        cls = load_target(node.target) if node.target else get_kind(node.kind)
        if cls is None:
            continue
        hints = typing.get_type_hints(cls.Config)
        fields = {f.name for f in dataclasses.fields(cls.Config)}
        for p in cls.request_params:
            if p not in fields:
                continue
            spec = out.get(p)
            if spec is None:
                out[p] = ParamSpec(p, hints[p], node.config.get(p), [name], p in cls.batch_keys)
            else:
                spec.nodes.append(name)
                spec.batch_key = spec.batch_key or p in cls.batch_keys
    return out


def check_params(specs: dict[str, ParamSpec], values: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """``values`` converted to their parameters' types, and (name, message) per problem."""
    out: dict[str, Any] = {}
    problems: list[tuple[str, str]] = []
    for k, v in values.items():
        spec = specs.get(k)
        if spec is None:
            problems.append((k, f"this recipe takes no per-request '{k}' (it takes: {', '.join(sorted(specs)) or 'none'})"))
            continue
        found: list[tuple[str, str]] = []
        converted = convert(v, spec.type, k, lambda key, msg, fix, value, has: found.append((key, f"{msg} ({fix})" if fix else msg)))
        if found:
            problems += found
        else:
            out[k] = converted
    return out, problems
