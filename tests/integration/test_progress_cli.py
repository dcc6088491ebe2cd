"""Progress as a user sees it (MMPIPE_PROGRESS=1 draws the bars into a pipe too): the
requests bar starts once the models are loaded, loops have a per-step bar (a single
request shows only that), and a first-time model build says what it does and how long
it took."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.integration.cli import mmpipe

pytest.importorskip("diffusers")


PROGRESS = {"MMPIPE_PROGRESS": "1"}  # bars even though stderr is a pipe here


def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """A small, successful sd_txt2img run with progress bars on."""
    r = mmpipe("run", "sd_txt2img", "num_inference_steps=4", "height=32", "width=32", *args, env={**PROGRESS, **env})
    assert r.returncode == 0, r.stderr
    return r


def test_first_build_is_announced_and_bars_start_after_setup(tmp_path: Path) -> None:
    r = run("num_images_per_prompt=3", f"output_dir={tmp_path / 'out'}", env={"MMPIPE_CACHE": str(tmp_path / "cache")})
    err = r.stderr.replace("\r", "\n")
    assert "preparing offline model tiny_random" in err and "first use only" in err
    assert re.search(r"prepared offline model tiny_random\S* \(random weights, seeded\) in \d+\.\d s", err)
    assert err.index("prepared offline model") < err.index("requests:")  # no bar (and no ETA) while models load
    assert "requests:" in err and "/3 [" in err and "denoise:" in err and "step/s" in err
    # the cache is reused: no build the second time
    r = run(f"output_dir={tmp_path / 'again'}", env={"MMPIPE_CACHE": str(tmp_path / "cache")})
    assert "preparing" not in r.stderr


def test_single_request_shows_a_step_bar_and_quiet_shows_none(tmp_path: Path) -> None:
    err = run(f"output_dir={tmp_path / 'one'}", env={}).stderr.replace("\r", "\n")
    assert "denoise:" in err and "requests:" not in err
    err = run("-q", f"output_dir={tmp_path / 'q'}", env={}).stderr
    assert "denoise:" not in err and "requests:" not in err


@pytest.mark.slow  # real Whisper weights
def test_decoding_shows_a_token_bar(tmp_path: Path) -> None:
    r = mmpipe("run", "whisper_stt", "beam_size=1", "temperature=0", f"output_dir={tmp_path}", env=PROGRESS)
    assert r.returncode == 0, r.stderr
    err = r.stderr.replace("\r", "\n")
    assert "decode:" in err and "tok/s" in err and "requests:" not in err  # one file: its token bar is its progress
