"""Shared test helpers: writing recipes into tmp dirs, making requests, thread checks."""
from __future__ import annotations

import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture
def write_recipe(tmp_path: Path):
    """Write a YAML recipe (dedented) into tmp_path and return its path."""

    def _write(text: str, name: str = "recipe.yaml") -> Path:
        p = tmp_path / name
        p.write_text(textwrap.dedent(text).lstrip())
        return p

    return _write


def make_requests(plan: Any) -> list[Any]:
    from mmpipe.api import requests_of

    return requests_of(plan)


@pytest.fixture(autouse=True)
def no_leaked_threads():
    """Every test must leave no thread behind: pipeline threads (daemons, so that a hung
    node cannot keep the process alive) count too."""
    before = {t.ident for t in threading.enumerate()}
    yield
    deadline = time.monotonic() + 2.0  # a thread that was told to stop may need a moment to return
    while True:
        leaked = [t for t in threading.enumerate() if t.ident not in before and t.is_alive() and (not t.daemon or t.name.startswith("mmpipe-"))]
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert not leaked, f"threads left running: {[t.name for t in leaked]}"
