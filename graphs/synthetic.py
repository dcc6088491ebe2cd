"""Synthetic node kinds: deterministic tensor transforms with a chosen workload.

Used by the ``synthetic`` recipe, the runtime tests and the benchmarks. Every
part maps ``y = x * scale_p + shift_p`` (exactly reproducible), then does its
workload: ``sleep`` (releases the GIL, so it measures the runtime itself),
``matmul`` (a fixed ``dim`` x ``dim`` product) or ``noop``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from mmpipe.graphs import register
from mmpipe.graphs.base import Batch, ItemMeta, LoopKind, NodeKind, Port, Request, SourceKind


class InjectedFailure(RuntimeError):
    """Raised by synthetic nodes for requests listed in ``fail_ids``."""


@dataclass(kw_only=True)
class ChainConfig:
    parts: int = 4  # pieces the node splits into
    work: str = "sleep"  # sleep | matmul | noop
    stage_ms: float = 10.0  # time each part takes (sleep) per call
    dim: int = 256  # matrix size for work=matmul
    width: int = 16  # length of each request's vector
    fail_ids: list[str] = field(default_factory=list)  # request ids that raise (error-path tests)
    hang_ids: list[str] = field(default_factory=list)  # request ids that hang (timeout tests)
    hang_s: float = 3600.0  # how long a hanging request hangs
    costs: list[float] = field(default_factory=list)  # relative cost of each part (default: equal)


def _part_coeffs(part: int) -> tuple[float, float]:
    # Exactly representable factors keep results bit-identical across batchings.
    return 1.0 + 0.125 * ((part % 5) + 1), 0.25 * (part + 1)


def _inject(cfg: Any, meta: list[ItemMeta]) -> None:
    ids = {m.request_id for m in meta}
    bad = ids.intersection(cfg.fail_ids)
    if bad:
        raise InjectedFailure(f"injected failure for request(s) {sorted(bad)}")
    if ids.intersection(cfg.hang_ids):
        time.sleep(cfg.hang_s)


class _Work:
    """The per-part workload, shared by the chain and the loop kinds."""

    def _setup_work(self, cfg: Any, device: Any) -> None:
        self._w = None
        if cfg.work == "matmul":
            import torch

            g = torch.Generator().manual_seed(0)
            self._w = (torch.randn(cfg.dim, cfg.dim, generator=g) / cfg.dim**0.5).to(device)

    def _do_work(self, cfg: Any, nparts: int) -> None:
        if cfg.work == "sleep":
            time.sleep(cfg.stage_ms * nparts / 1000.0)
        elif cfg.work == "matmul":
            for _ in range(nparts):
                self._w @ self._w  # noqa: B018  (the workload itself)


@register
class Chain(_Work, NodeKind):
    """A chain of ``parts`` synthetic layers, splittable into stages."""

    kind = "synthetic.chain"
    description = "Deterministic affine parts with a sleep/matmul/noop workload."
    Config = ChainConfig
    inputs = (Port("x", "float32", ("B", "D")),)
    outputs = (Port("y", "float32", ("B", "D")),)
    splittable = True

    @classmethod
    def num_parts(cls, cfg: Any) -> int:
        return int(cfg.parts)

    @classmethod
    def part_costs(cls, cfg: Any) -> list[float]:
        if cfg.costs:
            return [float(c) for c in cfg.costs]
        return [1.0] * int(cfg.parts)

    @classmethod
    def check(cls, cfg: Any) -> list[tuple[str, str, str]]:
        out = []
        if cfg.parts < 1:
            out.append(("parts", f"parts must be at least 1, got {cfg.parts}", "e.g. parts=4 (recipe variable stages=4 in the synthetic recipe)"))
        if cfg.work not in ("sleep", "matmul", "noop"):
            out.append(("work", f"unknown work {cfg.work!r}", "use one of sleep, matmul, noop"))
        if cfg.costs and len(cfg.costs) != cfg.parts:
            out.append(("costs", f"{len(cfg.costs)} costs for {cfg.parts} parts", "give one cost per part"))
        return out

    def setup(self, device: Any, dtype: Any = None) -> None:
        super().setup(device, dtype)
        self._setup_work(self.cfg, device)

    def forward(self, x: Batch, meta: list[ItemMeta]) -> Batch:
        _inject(self.cfg, meta)
        h = x["h"] if "h" in x else x["x"]
        for p in self.parts:
            a, b = _part_coeffs(p)
            h = h * a + b
        self._do_work(self.cfg, len(self.parts))
        return {"y": h} if self.is_last else {"h": h}


@dataclass(kw_only=True)
class LoopConfig(ChainConfig):
    max_trips: int = 100  # most iterations an item may take


@register
class Loop(_Work, LoopKind):
    """A loop whose body is ``parts`` synthetic layers; item i runs ``trips[i]`` times."""

    kind = "synthetic.loop"
    description = "Loop body of affine parts; each item loops its own number of trips."
    Config = LoopConfig
    inputs = (Port("x", "float32", ("B", "D")), Port("trips", "int64", ("B",)))
    outputs = (Port("y", "float32", ("B", "D")), Port("n", "int64", ("B",)))
    splittable = True

    num_parts = Chain.num_parts
    part_costs = Chain.part_costs
    check = Chain.check

    def setup(self, device: Any, dtype: Any = None) -> None:
        super().setup(device, dtype)
        self._setup_work(self.cfg, device)

    def begin(self, x: Batch, meta: list[ItemMeta]) -> Batch:
        import torch

        trips = x["trips"].clamp(1, self.cfg.max_trips)
        return {"h": x["x"].clone(), "left": trips.clone(), "n": torch.zeros_like(trips)}

    def enter(self, x: Batch, meta: list[ItemMeta], lanes: list[dict]) -> None:
        # Per-item state that stays on this piece: how often the item passed here.
        for lane in lanes:
            lane["passes"] = 0

    def step(self, carry: Batch, meta: list[ItemMeta], lanes: list[dict]) -> Batch:
        _inject(self.cfg, meta)
        h = carry["h"]
        for p in self.parts:
            a, b = _part_coeffs(p)
            # Keep values bounded over many trips: scale back into range.
            h = (h * a + b) * 0.5
        for lane in lanes:
            lane["passes"] += 1
        self._do_work(self.cfg, len(self.parts))
        return {**carry, "h": h}

    def end(self, carry: Batch, meta: list[ItemMeta], lanes: list[dict]) -> tuple[Batch, list[bool], Batch]:
        left = carry["left"] - 1
        n = carry["n"] + 1
        done = [bool(v) for v in (left <= 0).tolist()]
        # passes counted on this piece must equal the trip count: a lane check.
        for lane, k in zip(lanes, n.tolist()):
            assert lane["passes"] == k, "loop lane out of step with its item"
        return {"h": carry["h"], "left": left, "n": n}, done, {"y": carry["h"], "n": n}


@dataclass(kw_only=True)
class RequestsConfig:
    count: int = 32  # how many requests
    width: int = 16  # length of each request's vector
    max_trips: int = 0  # >0: each request gets a trips value in 1..max_trips
    seed: int = 0  # random seed of the request vectors


@register
class Requests(SourceKind):
    """``count`` generated requests: a seeded random vector each (and a trip count)."""

    kind = "synthetic.requests"
    description = "Generated tensors for the synthetic recipes."
    Config = RequestsConfig
    fields = ("x", "trips")

    @classmethod
    def check(cls, cfg: Any) -> list[tuple[str, str, str]]:
        if cfg.count <= 0:
            return [("count", f"count must be positive, got {cfg.count}", "set requests=N with N >= 1")]
        return []

    @classmethod
    def requests(cls, cfg: Any) -> list[Request]:
        import torch

        g = torch.Generator().manual_seed(cfg.seed)
        out = []
        for i in range(cfg.count):
            x = torch.randint(-8, 8, (cfg.width,), generator=g).float()
            values: dict[str, Any] = {"x": x}
            if cfg.max_trips > 0:
                values["trips"] = torch.randint(1, cfg.max_trips + 1, (), generator=g)
            out.append(Request(id=f"r{i:04d}", values=values, input={"index": i}))
        return out
