"""Runtime tests: no pipeline thread (daemon or not) may outlive a test."""
from __future__ import annotations

import pytest

from tests.unit.runtime.helpers import runtime_threads


@pytest.fixture(autouse=True)
def no_runtime_threads():
    yield
    assert runtime_threads() == [], f"pipeline threads still alive: {runtime_threads()}"
