"""Symbolic shape unification for port edges (no weights, no torch)."""
from __future__ import annotations

import re

Dim = int | str
_EXPR = re.compile(r"^([A-Za-z_]\w*)\s*([*/])\s*(\d+)$")


def evaluate(dim: Dim, binding: dict[str, Dim]) -> Dim:
    """A dim with known symbols substituted; ``H/8`` is computed when H is bound to an int."""
    if isinstance(dim, int):
        return dim
    if dim in binding:
        return binding[dim]
    m = _EXPR.match(dim)
    if m and m.group(1) in binding and isinstance(binding[m.group(1)], int):
        v, op, k = int(binding[m.group(1)]), m.group(2), int(m.group(3))
        return v * k if op == "*" else v // k
    return dim


def unify(expected: list[Dim] | None, actual: list[Dim] | None, binding: dict[str, Dim]) -> str | None:
    """Bind ``expected``'s symbols to ``actual``; return a message on mismatch."""
    if expected is None or actual is None:
        return None if expected is None and actual is None or expected is None else "a tensor port cannot take a non-tensor value"
    if len(expected) != len(actual):
        return f"rank mismatch: expected {len(expected)} dims {fmt(expected)}, got {len(actual)} dims {fmt(actual)}"
    for i, (e, a) in enumerate(zip(expected, actual)):
        ev = evaluate(e, binding)
        if isinstance(ev, int):
            if isinstance(a, int) and a != ev:
                return f"dim {i} is {a} but {fmt(expected)} needs {ev}"
            continue
        if ev == e and isinstance(e, str) and not _EXPR.match(e):
            binding[e] = a  # first sight of this symbol
        elif isinstance(a, int) and isinstance(ev, str):
            continue  # symbolic expression vs concrete: cannot tell without values
        elif ev != a and isinstance(a, int) and isinstance(ev, int):
            return f"dim {i} is {a} but {fmt(expected)} needs {ev}"
    return None


def substitute(shape: list[Dim] | None, binding: dict[str, Dim]) -> list[Dim] | None:
    return None if shape is None else [evaluate(d, binding) for d in shape]


def fmt(shape: list[Dim] | None) -> str:
    return "scalar/object" if shape is None else "[" + ", ".join(str(d) for d in shape) + "]"


def dtype_ok(expected: str, actual: str) -> bool:
    return expected == actual or "any" in (expected, actual)
