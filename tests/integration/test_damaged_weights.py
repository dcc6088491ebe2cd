"""Corrupt or foreign weights end in a user error (exit 2) naming the file, with a fix.

Each test builds its models into its own cache (``MMPIPE_CACHE``), damages one
file, and runs the CLI as a user would: no traceback, the file named, and a fix
that works (deleting the named cache directory makes the next run succeed).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.cli import mmpipe

pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parents[2]


def mmpipe_cached(cache: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``mmpipe ARGS`` with its model cache in ``cache`` (this test's own, damaged on purpose)."""
    return mmpipe(*args, env={"MMPIPE_CACHE": str(cache)})


def truncate(f: Path, size: int) -> None:
    with open(f, "r+b") as fh:
        fh.truncate(size)


def assert_user_error(r: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert "fix:" in r.stderr, r.stderr
    for frag in fragments:
        assert frag in r.stderr, f"{frag!r} not in:\n{r.stderr}"


def test_truncated_cached_diffusion_weights(tmp_path: Path) -> None:
    pytest.importorskip("diffusers")
    cache = tmp_path / "cache"
    build = "from mmpipe.graphs.diffusion_models import ensure_model; print(ensure_model('tiny_random'))"
    model = Path(subprocess.run([sys.executable, "-c", build], capture_output=True, text=True, check=True, cwd=ROOT,
                                env={**os.environ, "MMPIPE_CACHE": str(cache)}, timeout=300).stdout.strip())
    unet = next((model / "unet").glob("*.safetensors"))
    truncate(unet, unet.stat().st_size // 2)
    args = ("run", "sd_txt2img", "num_inference_steps=2", "-q")
    r = mmpipe_cached(cache, *args, f"output_dir={tmp_path}/a")
    assert_user_error(r, str(model), "delete the cache directory")
    m = re.search(r"rm -r '([^']+)'", r.stderr)
    assert m and Path(m.group(1)) == model
    # The fix works: the deleted entry is rebuilt and the run succeeds.
    subprocess.run(["rm", "-r", m.group(1)], check=True)
    r = mmpipe_cached(cache, *args, f"output_dir={tmp_path}/b")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("cut", ["header", "data"])
def test_truncated_converted_whisper_weights(tmp_path: Path, cut: str) -> None:
    pytest.importorskip("transformers")
    cache = tmp_path / "cache"
    r = mmpipe_cached(cache, "run", "whisper_stt", f"output_dir={tmp_path}/a", "-q")  # converts tiny.en into the cache
    assert r.returncode == 0, r.stderr
    (st,) = (cache / "whisper-hf").glob("*/model.safetensors")
    truncate(st, 6 if cut == "header" else st.stat().st_size // 2)
    r = mmpipe_cached(cache, "run", "whisper_stt", f"output_dir={tmp_path}/b")
    assert_user_error(r, str(st), f"rm -r '{st.parent}'")


def test_foreign_ctranslate2_model_bin(tmp_path: Path) -> None:
    src = tmp_path / "fake-ct2"
    src.mkdir()
    (src / "config.json").write_text("{}")
    for i, blob in enumerate([os.urandom(4096), b"\x06\x00\x00\x00" + os.urandom(64), b""]):
        (src / "model.bin").write_bytes(blob)  # random bytes; a plausible version then junk; empty
        r = mmpipe_cached(tmp_path / "cache", "run", "whisper_stt", f"model.path={src}", f"output_dir={tmp_path}/{i}")
        assert_user_error(r, str(src / "model.bin"), "re-download or re-save")


def test_not_a_safetensors_file_in_a_user_directory(tmp_path: Path) -> None:
    """A transformers directory whose model.safetensors is something else (a text file)."""
    d = tmp_path / "whisper"
    d.mkdir()
    (d / "config.json").write_text('{"d_model": 384, "encoder_layers": 4, "decoder_layers": 4, "num_mel_bins": 80}')
    (d / "model.safetensors").write_text("<html>404 Not Found</html>")
    r = mmpipe_cached(tmp_path / "cache", "run", "whisper_stt", f"model.path={d}", f"output_dir={tmp_path}/o")
    assert_user_error(r, str(d / "model.safetensors"), "re-download or re-save")
