"""Running the ``mmpipe`` CLI as a user does, for the integration tests: one subprocess of
this interpreter (so the venv's mmpipe and its packages), its output captured as text."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MMPIPE = [sys.executable, "-m", "mmpipe"]


def mmpipe(*args: str, env: dict[str, str] | None = None, cwd: Path | None = ROOT,
           timeout: float | None = 300) -> subprocess.CompletedProcess[str]:
    """``mmpipe ARGS`` in ``cwd`` (the repository root, so relative paths such as
    ``recipes/examples/hello.wav`` are the README's), never raising on a non-zero exit
    (tests assert the code). ``env`` adds to this process's environment rather than
    replacing it; ``timeout=None`` waits as long as the run takes."""
    return subprocess.run([*MMPIPE, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          env={**os.environ, **(env or {})})
