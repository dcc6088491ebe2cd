"""The contract every node kind implements (docs/architecture.md, "The node-kind contract").

A node kind declares, as data, its typed ``Config``, its ports and whether it is
splittable or a loop; the compiler reads only these declarations (no weights).
The runtime builds one instance per *piece* (a contiguous range of the node's
parts) and calls ``setup`` then ``forward`` (or the loop methods).
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Generic

from typing_extensions import TypeVar

# A kind's Config dataclass: ``class Load(NodeKind[LoadConfig])`` types ``self.cfg`` and the
# class-level ``cfg`` arguments; a bare ``NodeKind`` means any config (the runtime's view).
C = TypeVar("C", default=Any)

# A micro-batch of values: port name -> batched value (a tensor with the batch
# first, or a list with one entry per item).
Batch = dict[str, Any]


@dataclass(frozen=True)
class Port:
    """A typed input or output of a node kind.

    ``shape`` is symbolic: ints are fixed sizes, strings are symbols (``"B"``,
    ``"T"``) or simple expressions (``"H/8"``); ``None`` means the value is not
    a tensor (a string, a path, a variable-length list). ``collate`` tells the
    runtime how to batch per-item values: ``stack`` (tensors of equal shape),
    ``pad`` (pad the last dim to the longest, with ``pad_value``), or ``list``.
    """

    name: str
    dtype: str
    shape: tuple[int | str, ...] | None = None
    collate: str = "stack"
    pad_value: float = 0.0
    optional: bool = False
    doc: str = ""


@dataclass(frozen=True)
class ItemMeta:
    """Per-item metadata travelling with a micro-batch.

    ``sub``/``of`` number the items a request was expanded into (e.g. the 30 s
    windows of a long recording); ``params`` holds per-request parameters.
    """

    request_id: str
    sub: int = 0
    of: int = 1
    params: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.request_id if self.of == 1 else f"{self.request_id}#{self.sub}"


@dataclass(kw_only=True)
class EmptyConfig:
    """Config of a node kind without parameters."""


class NodeKind(Generic[C]):
    """Base class of node kinds. Subclasses are registered with ``@register``."""

    kind: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Config: ClassVar[type] = EmptyConfig
    inputs: ClassVar[tuple[Port, ...]] = ()
    outputs: ClassVar[tuple[Port, ...]] = ()
    splittable: ClassVar[bool] = False
    loop: ClassVar[bool] = False
    # Light nodes (file reading, tokenizing) share a stage with their neighbour
    # instead of getting a worker of their own.
    light: ClassVar[bool] = False
    # A node that turns one item into several (``forward`` returns
    # ``"_parent"``: the input row of each output row).
    expands: ClassVar[bool] = False
    # With ``expands``: ``forward`` may return an iterator of such output dicts, made
    # lazily (a long recording read window by window): the runtime hands each chunk on
    # before asking for the next, so memory stays bounded by the queues. Item ``sub``
    # numbers continue across chunks; a request's count is known when the iterator ends.
    # Config fields a single request may override (``ItemMeta.params[field]``);
    # each is validated like the recipe value (see ``param``).
    request_params: ClassVar[tuple[str, ...]] = ()
    # Those of them that items of one micro-batch (and one loop group) must share, because
    # the math cannot mix them (an image size, a step count); others may differ per item.
    batch_keys: ClassVar[tuple[str, ...]] = ()

    # ---- declarations (class level, no weights) --------------------------
    @classmethod
    def is_light(cls, cfg: C) -> bool:
        """Whether this configuration of the kind is light (``light``, unless a kind's
        cost depends on its config)."""
        return cls.light

    @classmethod
    def ports(cls, cfg: C) -> tuple[tuple[Port, ...], tuple[Port, ...]]:
        """Input and output ports for this config (override when they depend on it)."""
        return cls.inputs, cls.outputs

    @classmethod
    def num_parts(cls, cfg: C) -> int:
        """How many consecutive parts the node can be cut into."""
        return 1

    @classmethod
    def part_costs(cls, cfg: C) -> list[float]:
        """Relative cost of each part, used to balance stages."""
        return [1.0] * cls.num_parts(cfg)

    @classmethod
    def check(cls, cfg: C) -> list[tuple[str, str, str]]:
        """Extra config checks: a list of (field, message, fix)."""
        return []

    @classmethod
    def expected_trips(cls, cfg: C) -> int | None:
        """Loop kinds: the iterations an item takes (None: it depends on the data)."""
        return None

    @classmethod
    def gather(cls, port: str, values: list[Any]) -> Any:
        """Merge the per-item values of one request (after ``expands``)."""
        return values

    # ---- execution --------------------------------------------------------
    def __init__(self, cfg: C, parts: range | None = None, num_parts: int = 1) -> None:
        self.cfg = cfg
        self.parts = parts if parts is not None else range(num_parts)
        self.num_parts_total = num_parts
        self.device: Any = "cpu"

    def param(self, meta: "ItemMeta", name: str) -> Any:
        """The item's per-request value of config field ``name`` (a ``request_params``
        entry), else the recipe's."""
        if name in self.request_params and name in meta.params:
            return meta.params[name]
        return getattr(self.cfg, name)

    @property
    def is_first(self) -> bool:
        return self.parts.start == 0

    @property
    def is_last(self) -> bool:
        return self.parts.stop == self.num_parts_total

    def setup(self, device: Any, dtype: Any = None) -> None:
        """Load weights and move them to ``device``. Called once per piece."""
        self.device = device

    def forward(self, x: Batch, meta: list[ItemMeta]) -> Batch:
        """Run this piece on a micro-batch.

        The first piece receives the node's input ports; later pieces receive
        what the previous piece returned (its carry). The last piece
        returns the node's output ports; earlier pieces return a carry dict
        (keys must not clash with port names).
        """
        raise NotImplementedError


class LoopKind(NodeKind[C]):
    """A loop node: a body (split over pieces) run per item until it is done.

    Per iteration the runtime calls, for items that just entered, ``begin`` on
    the first piece and ``enter`` on every piece (side inputs into per-item
    lanes, e.g. a cross-attention cache); then ``step`` on each piece in order
    and ``end`` on the last piece, which says which items are done and gives
    their outputs. Unfinished items go back to the first piece. ``lanes`` is a
    list with one dict per item, owned by the piece (state never travels).
    """

    loop = True

    def begin(self, x: Batch, meta: list[ItemMeta]) -> Batch:
        """First piece: the initial carry of newly entered items."""
        raise NotImplementedError

    def enter(self, x: Batch, meta: list[ItemMeta], lanes: list[dict[str, Any]]) -> None:
        """Every piece: fill the lanes of newly entered items from the node inputs."""

    def step(self, carry: Batch, meta: list[ItemMeta], lanes: list[dict[str, Any]]) -> Batch:
        """Every piece: one pass of this piece's share of the body."""
        raise NotImplementedError

    def end(self, carry: Batch, meta: list[ItemMeta], lanes: list[dict[str, Any]]) -> tuple[Batch, list[bool], Batch]:
        """Last piece: (carry for the next iteration, done flags, outputs).

        ``outputs`` are batched over all items of ``carry``; the runtime takes
        the rows of done items. An optional ``"_progress"`` list (one entry per item)
        reports how far unfinished items got (tokens so far, a step count): it reaches
        whoever submitted their request (a server streaming partial results).
        """
        raise NotImplementedError

    def finish(self, lanes: list[dict[str, Any]]) -> None:
        """Every piece: items left the loop; free anything lanes hold."""

    @staticmethod
    def select(carry: Batch, rows: list[int]) -> Batch:
        """Rows of a carry (default: index tensors and lists)."""
        return {k: select_rows(v, rows) for k, v in carry.items()}

    @staticmethod
    def concat(carries: list[Batch]) -> Batch:
        """Join carries of several item groups (default: cat tensors, join lists)."""
        if len(carries) == 1:
            return carries[0]
        return {k: concat_rows([c[k] for c in carries]) for k in carries[0]}

    def forward(self, x: Batch, meta: list[ItemMeta]) -> Batch:  # pragma: no cover
        raise TypeError(f"{self.kind} is a loop node; the runtime calls begin/step/end")


def select_rows(value: Any, rows: list[int]) -> Any:
    """Take ``rows`` of a batched value (tensor on dim 0, or list)."""
    if isinstance(value, list):
        return [value[i] for i in rows]
    if isinstance(value, tuple):
        return tuple(select_rows(v, rows) for v in value)
    if isinstance(value, dict):
        return {k: select_rows(v, rows) for k, v in value.items()}
    if value is None:
        return None
    import torch

    if isinstance(value, torch.Tensor):
        if len(rows) == value.shape[0] and rows == list(range(len(rows))):
            return value
        return value[torch.as_tensor(rows, dtype=torch.long, device=value.device)]
    raise TypeError(f"cannot select rows of {type(value).__name__}")


def concat_rows(values: list[Any]) -> Any:
    """Concatenate batched values along the batch dimension."""
    first = values[0]
    if isinstance(first, list):
        return [v for part in values for v in part]
    if isinstance(first, tuple):
        return tuple(concat_rows(list(p)) for p in zip(*values))
    if isinstance(first, dict):
        return {k: concat_rows([v[k] for v in values]) for k in first}
    if first is None:
        return None
    import torch

    return torch.cat(values, dim=0)


@dataclass
class Request:
    """One request: its id, a JSON-friendly description, and its input values."""

    id: str
    values: dict[str, Any]
    input: dict[str, Any] = dataclasses.field(default_factory=dict)
    params: dict[str, Any] = dataclasses.field(default_factory=dict)


class UserError(Exception):
    """A user mistake found at run time (a missing model directory, a bad input
    file list): the CLI prints it without a traceback and exits with 2."""

    def __init__(self, key: str, message: str, fix: str = "") -> None:
        super().__init__(message)
        self.key, self.message, self.fix = key, message, fix


class SourceError(UserError):
    """A user mistake in a request source (missing file, empty glob...)."""


class SourceKind(Generic[C]):
    """Turns recipe/CLI values (``input=``, ``prompt=``, ``requests=``) into requests."""

    kind: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Config: ClassVar[type] = EmptyConfig
    # Request fields this source fills (must match the recipe's ``inputs``).
    fields: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def check(cls, cfg: C) -> list[tuple[str, str, str]]:
        return []

    @classmethod
    def requests(cls, cfg: C) -> list[Request]:
        raise NotImplementedError

    @classmethod
    def write_outputs(cls, cfg: C, results: list[Any], out_dir: Any) -> list[Any]:
        """Write the recipe's natural files (e.g. ``<stem>.txt``); return their paths."""
        return []


def make_config(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild a (possibly nested) config dataclass from plain data (a plan's JSON).

    The compiler has already checked types; this only restores the objects.
    """
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        v, tp = data[f.name], hints.get(f.name)
        if dataclasses.is_dataclass(tp) and isinstance(v, dict):
            v = make_config(typing.cast(type, tp), v)
        kwargs[f.name] = v
    return cls(**kwargs)
