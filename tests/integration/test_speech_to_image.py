"""speech_to_image: two pipelined loops from two model families in one plan. Its result
equals running whisper_stt, then sd_txt2img with the transcript as the prompt and the same
seed, for any splits and micro-batch sizes (real Whisper tiny.en, the offline tiny_random
SD model). Plus the CLI end to end: the PNG says which words made it."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("diffusers")

from mmpipe.api import compile, open_pipeline, requests_of  # noqa: E402
from tests.integration.cli import mmpipe  # noqa: E402

pytestmark = pytest.mark.slow  # real Whisper weights

ROOT = Path(__file__).resolve().parents[2]
CLIPS = ("clip1", "clip2", "clip5")
SEED, STEPS = 11, 3
COMMON = [f"seed={SEED}", f"num_inference_steps={STEPS}", "height=32", "width=32"]


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("clips")
    for c in CLIPS:
        shutil.copy(ROOT / "tests/assets/speech" / f"{c}.wav", d / f"{c}.wav")
    return d


def run(recipe: str, overrides: list[str], out: Path) -> dict[str, Any]:
    """Outputs per request id (plus the image as a uint8 array)."""
    import numpy as np
    from PIL import Image

    plan = compile(recipe, [*overrides, f"output_dir={out}"])
    with open_pipeline(plan) as pipe:
        results = pipe.run(requests_of(plan))
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    return {r.id: {**r.outputs, "pixels": np.asarray(Image.open(r.outputs["path"])).astype(int)}
            for r in results if r.outputs and r.outputs.get("path")} or {r.id: r.outputs for r in results}


@pytest.fixture(scope="module")
def reference(clips: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """whisper_stt (greedy, as the recipe's default), then sd_txt2img on each transcript."""
    out = tmp_path_factory.mktemp("ref")
    texts = {k: v["text"] for k, v in run("whisper_stt", [f"input={clips}", "beam_size=1", "temperature=0"], out / "stt").items()}
    assert set(texts) == set(CLIPS)
    ref = {}
    for k, text in texts.items():
        (img,) = run("sd_txt2img", [*COMMON, f"prompt={text}"], out / k).values()
        ref[k] = {**img, "text": text}
    return ref


@pytest.mark.parametrize("variant", [
    ["nodes.encoder.split=1", "nodes.decoder.split=1", "nodes.denoise.split=1", "runtime.microbatch_size=1"],
    ["nodes.encoder.split=2", "nodes.decoder.split=2", "nodes.denoise.split=3", "runtime.microbatch_size=4"],
    ["nodes.decoder.split=4", "nodes.vae.split=2", "runtime.microbatch_size=2", "runtime=sequential"],
], ids=["one-stage-each", "split-mb4", "sequential-mb2"])
def test_equals_whisper_then_sd(variant: list[str], clips: Path, reference: dict[str, Any], tmp_path: Path) -> None:
    got = run("speech_to_image", [f"input={clips}", *COMMON, *variant], tmp_path)
    assert set(got) == set(reference)
    for k, ref in reference.items():
        g = got[k]
        assert g["text"] == ref["text"]
        assert (g["seed"], g["steps"], g["guidance"], g["scheduler"], g["size"]) == (SEED, STEPS, ref["guidance"], ref["scheduler"], "32x32")
        # float32 on CPU with other batch shapes: at most one level of rounding apart
        assert abs(g["pixels"] - ref["pixels"]).max() <= 1, k


def test_cli_speech_to_image(clips: Path, tmp_path: Path) -> None:
    from PIL import Image

    r = mmpipe("run", "speech_to_image", f"input={clips / 'clip2.wav'}", *COMMON, f"output_dir={tmp_path}", "-q")
    assert r.returncode == 0, r.stderr
    line = json.loads((tmp_path / "results.jsonl").read_text())
    assert line["outputs"]["text"] == "I would like a cup of coffee with milk."
    text = Image.open(tmp_path / "clip2.png").text
    assert text["prompt"] == line["outputs"]["text"] and text["seed"] == str(SEED) and text["model"] == "tiny_random"
