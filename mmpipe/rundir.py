"""The output directory of a run: claimed before any weights load, never shared.

``claim`` makes the directory (or says exactly why it cannot), takes an exclusive
lock on it for the run's lifetime (a second run on the same directory is told
who holds it), and refuses to write over an earlier run's results unless the
user says ``resume=true`` (skip what already succeeded) or ``overwrite=true``.
A time-stamped default directory (``${now:...}``) that is taken moves on to a
free sibling instead. It also records what Hydra users expect next to the
results (``.hydra/config.yaml`` with secrets redacted, ``.hydra/overrides.yaml``)
and points ``latest`` at the newest time-stamped run.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmpipe.graphs.base import UserError

LOCK = ".mmpipe.lock"


@dataclass
class RunDir:
    """A claimed output directory (see the module docstring)."""

    path: Path
    lock_fd: int
    done_ids: set[str] = field(default_factory=set)  # resume: requests that already succeeded
    kept: list[dict[str, Any]] = field(default_factory=list)  # resume: their result lines

    def release(self) -> None:
        try:
            os.close(self.lock_fd)
        except OSError:
            pass


def _problem(key: str, message: str, fix: str) -> UserError:
    return UserError(key, message, fix)


def _make(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise _problem("output_dir", f"'{path}' exists and is not a directory", "give a directory path: output_dir=...")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _problem("output_dir", f"cannot create '{path}': {exc.strerror}", "choose a directory you can write: output_dir=...") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise _problem("output_dir", f"'{path}' is not writable", "choose a directory you can write: output_dir=...")


def _lock(path: Path) -> int:
    fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
        os.close(fd)
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            raise _problem("output_dir", f"another mmpipe run (pid {holder}) is writing into '{path}'",
                           "wait for it to finish, or give this run its own output_dir=...") from None
        raise
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def claim(path: Path, resume: bool = False, overwrite: bool = False, timestamped: bool = False) -> RunDir:
    """Make, lock and check the run's directory (a user error says why it cannot be used)."""
    if resume and overwrite:
        raise _problem("resume", "resume=true and overwrite=true contradict each other", "keep one of them")
    candidates = [path] + ([path.with_name(f"{path.name}-{k}") for k in range(2, 100)] if timestamped and not resume else [])
    last: UserError | None = None
    for p in candidates:
        _make(p)
        try:
            fd = _lock(p)
        except UserError as exc:
            last = exc
            continue
        results = p / "results.jsonl"
        if results.exists() and results.stat().st_size and not (resume or overwrite):
            os.close(fd)
            n = len(results.read_text(errors="replace").splitlines())
            last = _problem("output_dir", f"'{p}' already holds the results of an earlier run ({n} requests)",
                            "resume=true skips the requests that succeeded there, overwrite=true starts afresh, "
                            "or give another output_dir=...")
            continue
        rd = RunDir(p, fd)
        if overwrite:
            for name in ("results.jsonl", "summary.json"):
                (p / name).unlink(missing_ok=True)
        elif resume and results.exists():
            for line in results.read_text(errors="replace").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line torn by a crash: that request runs again
                if "outputs" in row and "id" in row:
                    rd.done_ids.add(str(row["id"]))
                    rd.kept.append(row)
        return rd
    assert last is not None
    raise last


def check_writable_file(key: str, path: Path) -> None:
    """A file the run will write at the end (``trace=``): can it be written? Checked up front."""
    if path.exists() and path.is_dir():
        raise _problem(key, f"'{path}' is a directory", f"give a file path, e.g. {key}={path}/trace.json")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _problem(key, f"cannot create the folder of '{path}': {exc.strerror}", f"choose a path you can write: {key}=...") from None
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise _problem(key, f"'{path}' is not writable", f"choose a path you can write: {key}=...")


def record_config(path: Path, config: Any, overrides: list[str]) -> None:
    """Hydra's layout: ``.hydra/config.yaml`` (the composed config) and ``.hydra/overrides.yaml``."""
    import yaml

    d = path / ".hydra"
    d.mkdir(exist_ok=True)
    (d / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (d / "overrides.yaml").write_text(yaml.safe_dump(list(overrides)))


def point_latest(path: Path) -> None:
    """``<parent>/latest`` -> this run (replaced atomically; best effort)."""
    link = path.parent / "latest"
    tmp = path.parent / f".latest.{os.getpid()}"
    try:
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(path.name)
        os.replace(tmp, link)
    except OSError:
        tmp.unlink(missing_ok=True)
