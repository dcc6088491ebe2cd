"""Results per request, and the files ``mmpipe run`` writes (results.jsonl, summary.json)."""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from mmpipe.dsl.plan import Plan
from mmpipe.graphs.base import ItemMeta


@dataclass
class Result:
    """What one request produced: outputs or an error, plus timings."""

    id: str
    input: dict[str, Any]
    outputs: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    timings: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id, "input": jsonable(self.input)}
        if self.error is None:
            d["outputs"] = jsonable(self.outputs)
        else:
            d["error"] = jsonable(self.error)
        d["timings"] = jsonable(self.timings)
        return d


def jsonable(v: Any) -> Any:
    """Tensors -> lists, numbers rounded for floats that are not finite, paths -> str."""
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    if isinstance(v, (str, int, bool)) or v is None:
        return v
    if isinstance(v, Path):
        return str(v)
    if hasattr(v, "tolist"):
        return jsonable(v.tolist())
    return str(v)


def assemble(plan: Plan, rows: list[tuple[ItemMeta, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Final per-item value rows -> per-request outputs (gathering expanded items)."""
    from mmpipe.runtime.nodes import kind_class

    by_req: dict[str, list[tuple[ItemMeta, dict[str, Any]]]] = {}
    for meta, vals in rows:
        by_req.setdefault(meta.request_id, []).append((meta, vals))
    out: dict[str, dict[str, Any]] = {}
    for rid, items in by_req.items():
        items.sort(key=lambda t: t[0].sub)
        res: dict[str, Any] = {}
        for name, key in plan.outputs.items():
            got = [v.get(key) for _, v in items]
            if items[0][0].of > 1 or len(items) > 1:
                node, _, port = key.partition(".")
                res[name] = kind_class(plan, node).gather(port, got) if node in plan.nodes else got
            else:
                res[name] = got[0]
        out[rid] = res
    return out


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def write_results(out_dir: Path, results: list[Result]) -> Path:
    """``results.jsonl`` with these results, in this order (replaced atomically)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "results.jsonl"
    write_atomic(path, "".join(json.dumps(r.to_json()) + "\n" for r in results))
    return path


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class ResultsFile:
    """``results.jsonl`` as a run goes: each result appended when it finishes, straight to
    the file (no buffer), so an interrupted or crashed run keeps every finished request
    on disk, and a full disk leaves no torn line."""

    def __init__(self, out_dir: Path, kept: list[dict[str, Any]] | None = None) -> None:
        """``kept``: lines of an earlier run this one resumes (written first)."""
        out_dir.mkdir(parents=True, exist_ok=True)
        self.out_dir = out_dir
        self.path = out_dir / "results.jsonl"
        self.lines: dict[str, str] = {str(row["id"]): json.dumps(row) for row in kept or []}
        self.fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._append("".join(line + "\n" for line in self.lines.values()))
        self.written: list[Result] = []

    def _append(self, text: str) -> None:
        assert self.fd is not None, "the results file is closed"
        data = text.encode()
        end = os.lseek(self.fd, 0, os.SEEK_END)
        try:
            while data:
                data = data[os.write(self.fd, data):]
        except OSError:
            os.ftruncate(self.fd, end)  # frees space: works on a full disk
            raise

    def write(self, r: Result) -> None:
        """Append one line (a full disk: nothing of it stays, and the error is raised). The
        line and its record go together: Ctrl-C or SIGTERM waits until both are done, so
        the summary of an interrupted run counts exactly the lines on disk."""
        line = json.dumps(r.to_json())
        with _signals_held():
            self._append(line + "\n")
            self.lines[r.id] = line
            self.written.append(r)

    def finish(self, order: list[str]) -> None:
        """The run completed: the same lines (a resumed run's too), in request order."""
        self.close()
        rank = {rid: i for i, rid in enumerate(order)}
        lines = sorted(self.lines.items(), key=lambda kv: rank.get(kv[0], len(rank)))
        write_atomic(self.path, "".join(line + "\n" for _, line in lines))

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM take effect after the block, not inside it. Python runs signal
    handlers in the main thread whichever thread the kernel hands the signal to, so blocking
    this thread's mask is not enough once workers run (CI caught a summary one line short).
    In the main thread the handlers are swapped for a recorder while the block runs, and a
    signal that came is raised again after it; elsewhere no handler runs, so nothing to hold."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    if any(h is None for h in old.values()):  # a handler installed outside Python: leave it
        yield
        return
    for s in old:
        signal.signal(s, lambda signum, _frame: pending.append(signum))
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for signum in pending[:1]:
            signal.raise_signal(signum)  # the restored handler runs now, after the block


def summarize(plan: Plan, results: list[Result], wall_s: float, stats: dict[str, Any], config: dict[str, Any] | None = None,
              models: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``summary.json`` content: recipe, config, plan, throughput, busy %, latency."""
    lat = [r.timings.get("latency_s", 0.0) for r in results if r.ok]
    out: dict[str, Any] = jsonable({
        "recipe": plan.recipe,
        "file": plan.file,
        "config": config or {},
        "models": models or {},
        "plan": plan.to_dict(),
        "requests": len(results),
        "failed": sum(not r.ok for r in results),
        "wall_s": round(wall_s, 6),
        "throughput_rps": round(len(results) / wall_s, 4) if wall_s > 0 else None,
        "latency_p50_s": round(percentile(lat, 0.5), 6) if lat else None,
        "latency_p95_s": round(percentile(lat, 0.95), 6) if lat else None,
        **stats,
    })
    return out
