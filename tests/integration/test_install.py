"""`pip install .` (not editable) ships the recipes as package data, found by Hydra."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_non_editable_install_finds_recipes(tmp_path):
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target), str(ROOT)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (target / "mmpipe" / "recipes" / "model" / "tiny_en.yaml").is_file()
    assert (target / "mmpipe" / "graphs" / "assets" / "clip" / "bpe_simple_vocab_16e6.txt.gz").is_file()  # the vendored CLIP vocabulary
    assert (target / "mmpipe" / "serve" / "app.py").is_file()  # mmpipe serve's package
    code = "import mmpipe.dsl.load as l; from mmpipe.dsl.compile import compile_recipe as c; p = c('whisper_stt'); print(l.recipes_dir()); print(p.num_stages)"
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    where, stages = out.stdout.split()
    assert where.startswith(str(target)) and int(stages) >= 3
