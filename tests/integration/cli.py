"""Running the ``mmpipe`` CLI as a user does, for the integration tests: one subprocess of
this interpreter (so the venv's mmpipe and its packages), its output captured as text.
It starts warm (``tests/warm.py``: forked from a process that has imported torch) unless
``MMPIPE_TEST_COLD=1`` or the environment asks for a cold start."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests import warm

ROOT = Path(__file__).resolve().parents[2]
MMPIPE = [sys.executable, "-m", "mmpipe"]


def mmpipe(*args: str, env: dict[str, str] | None = None, cwd: Path | None = ROOT,
           timeout: float | None = 300) -> subprocess.CompletedProcess[str]:
    """``mmpipe ARGS`` in ``cwd`` (the repository root, so relative paths such as
    ``recipes/examples/hello.wav`` are the README's), never raising on a non-zero exit
    (tests assert the code). ``env`` adds to this process's environment rather than
    replacing it; ``timeout=None`` waits as long as the run takes."""
    d = warm.bin_dir()
    cmd = [os.path.join(d, "mmpipe")] if d else MMPIPE
    return subprocess.run([*cmd, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          env={**os.environ, **(env or {})})
