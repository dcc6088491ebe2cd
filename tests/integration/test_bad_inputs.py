"""Bad inputs fail their own request only; the rest of the run completes and is written.

Audio that is missing, empty, zero-length, corrupt, of an unsupported codec or holds
NaN; prompts that are empty or very long; images that come out NaN; and a 2-hour
recording, which streams through in windows with bounded memory.
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.integration.cli import mmpipe

sf = pytest.importorskip("soundfile")
pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parents[2]
HELLO = ROOT / "recipes" / "examples" / "hello.wav"


def rows(out: Path) -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}


def wav_with_codec(tag: int) -> bytes:
    """A WAV file whose fmt chunk names codec ``tag`` (e.g. 0x0083, G.729)."""
    fmt = struct.pack("<HHIIHH", tag, 1, 8000, 1000, 10, 0)
    body = b"WAVEfmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", 1000) + bytes(1000)
    return b"RIFF" + struct.pack("<I", len(body)) + body


# Each bad file, and a fragment its request's error must hold.
BAD_AUDIO = {
    "b_empty": ("audio file is empty (0 bytes)", lambda p: p.write_bytes(b"")),
    "c_zero_length": ("has no samples", lambda p: sf.write(p, np.zeros(0, np.float32), 16000)),
    "d_corrupt": ("cannot decode audio file", lambda p: p.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(range(40)))),
    "e_codec": ("unsupported audio codec", lambda p: p.write_bytes(wav_with_codec(0x0083))),
    "f_missing": ("audio file not found", lambda p: p.symlink_to(p.parent / "nowhere.wav")),  # listed, gone at load
    "g_nan": ("NaN or infinite samples", lambda p: sf.write(p, np.where(np.arange(48000) % 7 == 0, np.nan, 0.1).astype(np.float32), 16000, subtype="FLOAT")),
    "h_text": ("cannot decode audio file", lambda p: p.write_text("not audio\n" * 50)),
}


def test_bad_audio_files_fail_alone(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    (src / "a_good.wav").write_bytes(HELLO.read_bytes())
    (src / "z_good.wav").write_bytes(HELLO.read_bytes())
    for name, (_, make) in BAD_AUDIO.items():
        make(src / f"{name}.wav")
    out = tmp_path / "out"
    r = mmpipe("run", "whisper_stt", f"input={src}", f"output_dir={out}", "-q")
    assert r.returncode == 1, r.stderr  # some requests failed; the others are written
    assert "Traceback" not in r.stderr
    got = rows(out)
    assert set(got) == {"a_good", "z_good", *BAD_AUDIO}
    for good in ("a_good", "z_good"):
        assert "hello" in got[good]["outputs"]["text"].lower()
        assert (out / f"{good}.txt").is_file()
    for name, (fragment, _) in BAD_AUDIO.items():
        err = got[name]["error"]
        assert fragment in err["message"] and f"{name}.wav" in err["message"], err
        assert err["requests"] == [name] and err["node"] == "load"
        assert not (out / f"{name}.txt").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["requests"] == len(got)


def test_prompts_empty_lines_and_a_very_long_prompt(tmp_path: Path) -> None:
    """Empty lines are skipped (documented); a very long prompt is truncated to CLIP's 77
    tokens with a warning that quotes only a short excerpt of what was dropped."""
    pytest.importorskip("diffusers")
    long = " ".join(f"word{i}" for i in range(20000))  # ~200 kB on one line
    f = tmp_path / "prompts.txt"
    f.write_text(f"a red square\n\n   \n{long}\na blue circle\n", encoding="utf-8")
    out = tmp_path / "out"
    r = mmpipe("run", "sd_txt2img", f"prompts={f}", "num_inference_steps=2", f"output_dir={out}", "-q")
    assert r.returncode == 0, r.stderr
    got = rows(out)
    assert [got[k]["input"]["prompt"][:12] for k in sorted(got)] == ["a red square", long[:12], "a blue circl"]
    warning = [ln for ln in r.stderr.splitlines() if "truncated" in ln]
    assert len(warning) == 1 and "request 0001" in warning[0], r.stderr
    assert len(warning[0]) < 300 and "word19999" not in warning[0]


def test_empty_prompts_file_is_a_user_error(tmp_path: Path) -> None:
    f = tmp_path / "prompts.txt"
    f.write_text("\n  \n")
    r = mmpipe("run", "sd_txt2img", f"prompts={f}", f"output_dir={tmp_path}/out")
    assert r.returncode == 2 and "has no prompt" in r.stderr and str(f) in r.stderr and "fix:" in r.stderr
    assert "Traceback" not in r.stderr


def test_nan_images_are_errors_not_black_pictures(tmp_path: Path) -> None:
    """A guidance scale this large overflows the latents to NaN: the request fails, no PNG."""
    pytest.importorskip("diffusers")
    out = tmp_path / "out"
    r = mmpipe("run", "sd_txt2img", "guidance_scale=1e38", "num_inference_steps=2", f"output_dir={out}", "-q")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    (row,) = rows(out).values()
    assert "NaN or infinite" in row["error"]["message"] and row["error"]["node"] == "save"
    assert not list(out.glob("*.png"))


def _peak_rss_mb(*args: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    """Run the CLI in a fresh interpreter and return its own peak RSS (MiB)."""
    code = ("import resource, sys\nfrom mmpipe.cli import main\nrc = main(sys.argv[1:])\n"
            "print('PEAK_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\nsys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT, timeout=900)
    kb = [ln.split()[1] for ln in r.stderr.splitlines() if ln.startswith("PEAK_KB")]
    assert kb, r.stderr
    return int(kb[0]) / 1024, r


def write_long_recording(path: Path, hours: float) -> None:
    """Digital silence with hello.wav every 10 minutes (written in blocks: the test stays small)."""
    hello, sr = sf.read(HELLO, dtype="int16")
    n = int(hours * 3600 * sr)
    with sf.SoundFile(path, "w", samplerate=sr, channels=1, subtype="PCM_16") as f:
        for start in range(0, n, 600 * sr):
            block = np.zeros(min(600 * sr, n - start), dtype=np.int16)
            block[5 * sr: 5 * sr + len(hello)] = hello
            f.write(block)


@pytest.mark.skipif(os.environ.get("MMPIPE_SKIP_LONG") == "1", reason="MMPIPE_SKIP_LONG=1")
def test_a_two_hour_recording_streams_in_bounded_memory(tmp_path: Path) -> None:
    long = tmp_path / "two_hours.wav"
    write_long_recording(long, 2.0)
    short_mb, r = _peak_rss_mb("run", "whisper_stt", f"input={HELLO}", f"output_dir={tmp_path}/short", "-q")
    assert r.returncode == 0, r.stderr
    long_mb, r = _peak_rss_mb("run", "whisper_stt", f"input={long}", f"output_dir={tmp_path}/long", "-q")
    assert r.returncode == 0, r.stderr
    (row,) = rows(tmp_path / "long").values()
    starts = [s["start"] for s in row["outputs"]["segments"]]
    assert starts == [600.0 * k for k in range(12)], starts  # every burst found, in order
    # The samples alone are 460 MB as float32 (and reading the file whole peaked at
    # +1 GB over a short file): the file must never be in memory whole.
    print(f"peak RSS: short file {short_mb:.0f} MiB, 2-hour file {long_mb:.0f} MiB")
    assert long_mb - short_mb < 400, (short_mb, long_mb)
