"""Shared test helpers: writing recipes into tmp dirs, making requests, thread checks."""
from __future__ import annotations

import textwrap
import threading
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
    """Every test must leave no worker thread behind."""
    before = {t.ident for t in threading.enumerate()}
    yield
    leaked = [t for t in threading.enumerate() if t.ident not in before and t.is_alive() and not t.daemon]
    assert not leaked, f"threads left running: {[t.name for t in leaked]}"
