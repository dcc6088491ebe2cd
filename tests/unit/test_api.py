"""The Python API: ``mmpipe.pipeline`` on audio in memory (numpy, torch, bytes, file
objects, with a sample rate) and on prompts (PIL images back, as well as paths)."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest

import mmpipe
from mmpipe.api import as_audio, override_list
from mmpipe.graphs.audio import Waveform
from mmpipe.graphs.base import UserError

HELLO = Path(__file__).resolve().parents[2] / "recipes/examples/hello.wav"


def test_override_list_formats_values():
    assert override_list({"beam_size": 1, "timestamps": True, "language": None, "temperature": [0.0, 0.2], "prompt": "a cat, oil"}) == [
        "beam_size=1", "timestamps=true", "language=null", "temperature=[0.0,0.2]", "prompt=a cat, oil"]


def test_as_audio_accepts_arrays_bytes_files_and_paths():
    import numpy as np
    import soundfile as sf
    import torch

    data, sr = sf.read(HELLO, dtype="int16")
    assert as_audio(HELLO) == str(HELLO)
    w = as_audio(data, sample_rate=sr)  # int16 PCM -> floats in [-1, 1]
    assert isinstance(w, Waveform) and w.sample_rate == sr and w.samples.dtype == torch.float32 and w.samples.abs().max() <= 1
    ref = torch.from_numpy(sf.read(HELLO, dtype="float32")[0])
    assert torch.allclose(w.samples, ref)
    for v in (HELLO.read_bytes(), io.BytesIO(HELLO.read_bytes()), open(HELLO, "rb")):
        got = as_audio(v)
        assert got.sample_rate == sr and torch.allclose(got.samples[0], ref)
    assert as_audio(torch.from_numpy(np.stack([ref.numpy()] * 2)), sample_rate=sr).samples.shape == (2, len(ref))
    with pytest.raises(UserError, match="sample rate"):
        as_audio(ref)
    with pytest.raises(UserError, match="cannot decode"):
        as_audio(b"not audio")


MP4 = b"\x00\x00\x00\x18ftypM4A " + bytes(200)  # an AAC container: libsndfile cannot read it


def test_as_audio_bytes_get_the_same_checks_and_diagnoses_as_files(tmp_path: Path) -> None:
    """Bytes and file objects are decoded by ``decode_audio``, like files: the codec
    diagnosis, the empty and NaN checks, with the argument named instead of a path."""
    import numpy as np
    import soundfile as sf

    from mmpipe.graphs.audio import AudioError, read_audio

    nan = tmp_path / "nan.wav"
    sf.write(nan, np.where(np.arange(1600) % 7 == 0, np.nan, 0.1).astype(np.float32), 16000, subtype="FLOAT")
    mp4 = tmp_path / "talk.m4a"
    mp4.write_bytes(MP4)
    for p, fragment in ((mp4, "unsupported audio codec in"), (nan, "holds 229 NaN or infinite samples")):
        with pytest.raises(AudioError) as from_file:
            read_audio(str(p), 16000)
        assert fragment in str(from_file.value)
        with pytest.raises(UserError) as from_bytes:
            as_audio(p.read_bytes())
        assert from_bytes.value.key == "audio" and from_bytes.value.message == str(from_file.value).replace(str(p), "<audio bytes>")
        with open(p, "rb") as f, pytest.raises(UserError) as from_object:
            as_audio(f)
        assert from_object.value.message == str(from_file.value)  # a file object named by its path
    with pytest.raises(UserError, match=r"^audio file is empty \(0 bytes\): <audio bytes>$"):
        as_audio(b"")
    with pytest.raises(UserError, match="^cannot decode audio file <audio bytes>: ") as bad:
        as_audio(bytearray(b"not audio"))
    assert "BytesIO" not in bad.value.message  # libsndfile's name for the buffer is no use to the caller
    with open(HELLO, encoding="latin-1") as text, pytest.raises(UserError, match="not bytes") as e:
        as_audio(text)
    assert "'rb'" in e.value.fix


def test_pipeline_on_a_recipe_without_per_call_inputs_says_what_to_use():
    with pytest.raises(UserError, match="neither audio nor a prompt") as e:
        mmpipe.pipeline("synthetic", work="noop")([1])
    assert "mmpipe.api.run" in e.value.fix


@pytest.mark.slow
def test_whisper_pipeline_takes_audio_in_memory():
    import soundfile as sf
    import torch
    import torchaudio.functional as AF

    data, sr = sf.read(HELLO, dtype="float32")
    with mmpipe.pipeline("whisper_stt", beam_size=1, temperature=0) as asr:
        want = asr(str(HELLO))["text"]
        assert "pipeline" in want.lower()
        at_8k = AF.resample(torch.from_numpy(data), sr, 8000)  # another rate: resampled by audio.load
        outs = asr([data, torch.from_numpy(data), HELLO.read_bytes(), io.BytesIO(HELLO.read_bytes())], sample_rate=sr)
        assert [o["text"] for o in outs] == [want] * 4
        assert "pipeline" in asr(at_8k.numpy(), sample_rate=8000)["text"].lower()


@pytest.mark.slow
def test_image_pipeline_returns_pil_images_and_paths(tmp_path: Path) -> None:
    from PIL import Image

    pipe: Any = mmpipe.pipeline("sd_txt2img", num_inference_steps=2, height=32, width=32, output_dir=str(tmp_path))
    try:
        one = pipe("a red bicycle", seed=3)
        assert isinstance(one["image"], Image.Image) and one["image"].size == (32, 32)
        assert Path(one["path"]).parent == tmp_path and one["seed"] == 3 and one["image"].text["prompt"] == "a red bicycle"
        two = pipe(["a", "b"], negative_prompt="blurry")
        assert [r["prompt"] for r in two] == ["a", "b"] and all(isinstance(r["image"], Image.Image) for r in two)
        assert pipe("a", num_images_per_prompt=2)[1]["seed"] == 1
        assert len(list(tmp_path.glob("*.png"))) == 5  # ids run on across calls: nothing overwritten
    finally:
        pipe.close()


def test_a_pipeline_left_open_is_closed_at_exit(tmp_path: Path) -> None:
    """A script that never calls close() exits cleanly: its pipeline is closed before the
    interpreter finalizes (worker threads inside torch used to abort it: "terminate called")."""
    import subprocess
    import sys

    script = ("import mmpipe, mmpipe.api as api\n"
              f"p = mmpipe.pipeline('sd_txt2img', num_inference_steps=2, height=32, width=32, output_dir={str(tmp_path)!r})\n"
              "p('a cat', seed=1)\n"
              "assert p in api._OPEN\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "terminate called" not in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_compile_reads_a_dictconfig_without_changing_it_and_keeps_nothing_of_it():
    """compile() no longer copies a DictConfig first: it must only read it, and the plan must
    not change when the caller edits the config afterwards."""
    from omegaconf import OmegaConf

    from mmpipe.api import compile
    from mmpipe.dsl.load import load_recipe

    cfg = load_recipe("synthetic").cfg
    before = OmegaConf.to_yaml(cfg)
    plan = compile(cfg)
    assert OmegaConf.to_yaml(cfg) == before
    stages, source = plan.num_stages, dict(plan.source or {})
    cfg.stages = 1
    cfg.requests = 3
    assert plan.num_stages == stages == 4 and plan.source == source
    assert compile(cfg).num_stages == 1
    with_override = compile(cfg, ["stages=2"])
    assert with_override.num_stages == 2 and cfg.stages == 1
