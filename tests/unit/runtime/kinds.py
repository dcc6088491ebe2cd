"""Node kinds used only by the runtime tests (loaded through ``_target_``)."""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from mmpipe.graphs.base import Batch, ItemMeta, NodeKind, Port
from mmpipe.graphs.synthetic import Loop


@dataclass(kw_only=True)
class FanoutConfig:
    max_copies: int = 3


class Fanout(NodeKind):
    """Turns item i into 1 + |x[i, 0]| % max_copies items (row j = x[i] + j)."""

    kind = "testing.fanout"
    Config = FanoutConfig
    inputs = (Port("x", "float32", ("B", "D")),)
    outputs = (Port("y", "float32", ("B", "D")),)
    expands = True

    def forward(self, x: Batch, meta: list[ItemMeta]) -> Batch:
        import torch

        xs = x["x"]
        parents: list[int] = []
        rows = []
        for i in range(xs.shape[0]):
            for j in range(1 + int(xs[i, 0].abs()) % self.cfg.max_copies):
                parents.append(i)
                rows.append(xs[i] + j)
        return {"y": torch.stack(rows), "_parent": parents}


@dataclass(kw_only=True)
class CountConfig:
    pass


class Counted(NodeKind):
    """Identity that counts the items it saw per call (to check batching from outside)."""

    kind = "testing.counted"
    Config = CountConfig
    inputs = (Port("x", "float32", ("B", "D")),)
    outputs = (Port("y", "float32", ("B", "D")),)
    calls: list[list[str]] = []  # request ids per forward call, shared by all instances

    def forward(self, x: Batch, meta: list[ItemMeta]) -> Batch:
        Counted.calls.append([m.request_id for m in meta])
        return {"y": x["x"].clone()}


@dataclass(kw_only=True)
class HandshakeConfig:
    role: str = "first"  # first | second
    wait_s: float = 10.0


class Handshake(NodeKind):
    """Proves two stages work at once: the second stage, busy with micro-batch 1,
    waits for the first stage to be busy with micro-batch 2, and vice versa.
    A runtime that ran one stage at a time would make both waits time out."""

    kind = "testing.handshake"
    Config = HandshakeConfig
    inputs = (Port("x", "float32", ("B", "D")),)
    outputs = (Port("y", "float32", ("B", "D")),)
    events: dict[str, threading.Event] = {}
    met: list[bool] = []

    @classmethod
    def reset(cls) -> None:
        cls.events = {"second_busy": threading.Event(), "first_busy": threading.Event()}
        cls.met = []

    def setup(self, device: Any, dtype: Any = None) -> None:
        super().setup(device, dtype)
        self.n = 0

    def forward(self, x: Batch, meta: list[ItemMeta]) -> Batch:
        self.n += 1
        ev = Handshake.events
        if self.cfg.role == "second" and self.n == 1:
            ev["second_busy"].set()
            Handshake.met.append(ev["first_busy"].wait(self.cfg.wait_s))
        if self.cfg.role == "first" and self.n == 2:
            Handshake.met.append(ev["second_busy"].wait(self.cfg.wait_s))
            ev["first_busy"].set()
        return {"y": x["x"].clone()}


@dataclass(kw_only=True)
class GateConfig:
    wait_s: float = 10.0


class Gate(NodeKind):
    """Blocks its first call until ``Gate.open`` is set (to watch back-pressure)."""

    kind = "testing.gate"
    Config = GateConfig
    inputs = (Port("x", "float32", ("B", "D")),)
    outputs = (Port("y", "float32", ("B", "D")),)
    open = threading.Event()
    entered = threading.Event()

    def forward(self, x: Batch, meta: list[ItemMeta]) -> Batch:
        Gate.entered.set()
        Gate.open.wait(self.cfg.wait_s)
        return {"y": x["x"].clone()}


@dataclass(kw_only=True)
class SmallConfig:
    max_items: int = 1


class SmallMemory(NodeKind):
    """Runs out of memory on micro-batches larger than ``max_items`` (as a GPU would)."""

    kind = "testing.small_memory"
    Config = SmallConfig
    inputs = (Port("x", "float32", ("B", "D")),)
    outputs = (Port("y", "float32", ("B", "D")),)
    sizes: list[int] = []  # micro-batch sizes it was called with

    def forward(self, x: Batch, meta: list[ItemMeta]) -> Batch:
        SmallMemory.sizes.append(len(meta))
        if len(meta) > self.cfg.max_items:
            raise MemoryError(f"out of memory for {len(meta)} items")
        return {"y": x["x"] * 2}


@dataclass(kw_only=True)
class LightConfig:
    add: float = 1.0


class LightAdd(NodeKind):
    """A light node (shares its neighbour's stage): y = x + add."""

    kind = "testing.light_add"
    Config = LightConfig
    inputs = (Port("x", "float32", ("B", "D")),)
    outputs = (Port("y", "float32", ("B", "D")),)
    light = True

    def forward(self, x: Batch, meta: list[ItemMeta]) -> Batch:
        return {"y": x["x"] + self.cfg.add}


class StreamFanout(Fanout):
    """``Fanout``, made lazily: one output row per chunk (counts how many it made)."""

    kind = "testing.stream_fanout"
    made: list[str] = []

    def forward(self, x: Batch, meta: list[ItemMeta]) -> Any:
        out = super().forward(x, meta)
        ys, parents = out["y"], out["_parent"]

        def chunks() -> Any:
            for r, p in enumerate(parents):
                StreamFanout.made.append(meta[p].request_id)
                yield {"y": ys[r:r + 1], "_parent": [p]}

        return chunks()


@dataclass(kw_only=True)
class LongConfig:
    rows: int = 50


class LongStream(NodeKind):
    """One request -> ``rows`` items, made one at a time (a long recording, window by window)."""

    kind = "testing.long_stream"
    Config = LongConfig
    inputs = (Port("x", "float32", ("B", "D")),)
    outputs = (Port("y", "float32", ("B", "D")),)
    expands = True
    made = 0

    def forward(self, x: Batch, meta: list[ItemMeta]) -> Any:
        def chunks() -> Any:
            for i in range(len(meta)):
                for k in range(self.cfg.rows):
                    LongStream.made += 1
                    yield {"y": x["x"][i:i + 1] + k, "_parent": [i]}

        return chunks()


class KeyedLoop(Loop):
    """``synthetic.loop`` whose items carry a ``size`` that one step cannot mix (as image
    sizes in a denoising step), and that reports each unfinished item's trips so far."""

    kind = "testing.keyed_loop"
    request_params = ("size",)
    batch_keys = ("size",)
    mixed: list[list[Any]] = []  # steps that saw several sizes (must stay empty)

    def step(self, carry: Batch, meta: list[ItemMeta], lanes: list[dict]) -> Batch:
        sizes = {m.params.get("size") for m in meta}
        if len(sizes) > 1:
            KeyedLoop.mixed.append(sorted(map(str, sizes)))
        return super().step(carry, meta, lanes)

    def end(self, carry: Batch, meta: list[ItemMeta], lanes: list[dict]) -> Any:
        nxt, done, outs = super().end(carry, meta, lanes)
        return nxt, done, {**outs, "_progress": [int(n) for n in nxt["n"].tolist()]}


class Threads(Counted):
    """Doubles x, recording the intra-op threads torch gives the thread running it (the
    ports and empty config of ``Counted``)."""

    kind = "testing.threads"
    seen: list[int] = []  # torch.get_num_threads() per forward call, shared by all instances

    def forward(self, x: Batch, meta: list[ItemMeta]) -> Batch:
        import torch

        Threads.seen.append(torch.get_num_threads())
        return {"y": x["x"] * 2}
