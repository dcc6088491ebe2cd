"""Long recordings stream: ``LongAudio`` reads windows lazily and ``audio.log_mel`` hands
them on a few at a time, with the same windows and features as reading the file whole."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from mmpipe.graphs import audio
from mmpipe.graphs.audio import AudioError, LogMel, LogMelConfig, open_audio, plan_windows, read_audio
from mmpipe.graphs.audio_stream import LongAudio
from mmpipe.graphs.base import ItemMeta

sf = pytest.importorskip("soundfile")
SPEECH = Path(__file__).resolve().parents[2] / "assets" / "speech"
SR = 16000


def _speechy(seconds: float, sr: int, seed: int = 0) -> np.ndarray:
    """Clips of real speech at random places, with noise between them (windows overlap and pause)."""
    rng = np.random.default_rng(seed)
    clip, csr = sf.read(SPEECH / "clip1.wav", dtype="float32")
    assert csr == SR
    if sr != SR:
        clip = np.interp(np.arange(int(len(clip) * sr / SR)) * SR / sr, np.arange(len(clip)), clip).astype(np.float32)
    x = 0.003 * rng.standard_normal(int(seconds * sr)).astype(np.float32)
    for start in rng.uniform(0, seconds - len(clip) / sr, size=int(seconds / 4)):
        a = int(start * sr)
        x[a:a + len(clip)] += clip
    return x


@pytest.fixture
def long_wav(tmp_path: Path) -> Path:
    p = tmp_path / "long.wav"
    sf.write(p, _speechy(100.0, SR), SR, subtype="FLOAT")
    return p


def test_long_files_open_lazily(long_wav: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(open_audio(str(long_wav), SR), torch.Tensor)  # 100 s: read whole
    monkeypatch.setattr(audio, "STREAM_AFTER_S", 60.0)
    w = open_audio(str(long_wav), SR)
    assert isinstance(w, LongAudio) and w.shape == (100 * SR,)
    back = pickle.loads(pickle.dumps(w))  # crosses ranks as a path and sizes
    assert back.shape == w.shape and back._stats == {}


def test_reads_and_statistics_equal_the_whole_file(long_wav: Path) -> None:
    whole = read_audio(str(long_wav), SR)
    w = LongAudio(str(long_wav), SR, SR, whole.shape[0])
    for a, b in [(0, 480000), (12345, 99999), (whole.shape[0] - 100, whole.shape[0] + 50)]:
        assert torch.equal(w.read(a, b), whole[a:b])
    rms, peak = w.frame_stats(320)
    n = whole.shape[0] // 320 * 320
    assert torch.allclose(rms, whole[:n].view(-1, 320).pow(2).mean(1).sqrt())
    assert torch.equal(peak, whole[:n].view(-1, 320).abs().amax(1))


def test_windows_and_features_equal_the_whole_file(long_wav: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audio, "STREAM_WINDOWS", 3)  # 4 windows: chunks of 3 and 1
    whole = read_audio(str(long_wav), SR)
    lazy = LongAudio(str(long_wav), SR, SR, whole.shape[0])
    cfg = LogMelConfig()
    assert plan_windows(lazy, cfg) == plan_windows(whole, cfg)
    node = LogMel(cfg)
    ref = node.forward({"audio": [whole]}, [ItemMeta("r")])
    chunks = list(node.forward({"audio": [lazy]}, [ItemMeta("r")]))
    assert len(chunks) == -(-len(ref["window"]) // audio.STREAM_WINDOWS) > 1
    assert all(len(c["window"]) <= audio.STREAM_WINDOWS for c in chunks)
    assert torch.equal(torch.cat([c["features"] for c in chunks]), ref["features"])
    assert [w for c in chunks for w in c["window"]] == ref["window"]
    assert [p for c in chunks for p in c["_parent"]] == ref["_parent"]


def test_a_resampled_long_file_reads_close_to_the_whole_file(tmp_path: Path) -> None:
    p = tmp_path / "long44k.wav"
    x = _speechy(70.0, 44100)
    sf.write(p, np.stack([x, 0.5 * x], axis=1), 44100, subtype="FLOAT")  # stereo 44.1 kHz
    whole = read_audio(str(p), SR)
    info = sf.info(str(p))
    w = LongAudio(str(p), SR, info.samplerate, info.frames)
    assert w.shape == whole.shape
    for a in (0, 160 * 1001, 30 * SR):
        got, ref = w.read(a, a + 5 * SR), whole[a:a + 5 * SR]
        assert got.shape == ref.shape and (got - ref).abs().max() < 2e-3
    rms = w.frame_stats(320)[0]
    n = whole.shape[0] // 320
    assert rms.shape == (n,)
    assert torch.allclose(rms, whole[: n * 320].view(-1, 320).pow(2).mean(1).sqrt(), atol=2e-3)


def test_a_nan_in_a_long_recording_fails_before_windows_are_planned(tmp_path: Path) -> None:
    """The planning pass sees every sample first: a NaN there made the loudness NaN, every
    window after the first was dropped as silent, and the run "succeeded" on 25 s of 100."""
    x = _speechy(100.0, SR)
    x[70 * SR] = np.nan
    x[80 * SR] = np.inf
    p = tmp_path / "long_nan.wav"
    sf.write(p, x, SR, subtype="FLOAT")
    lazy = LongAudio(str(p), SR, SR, len(x))
    cfg = LogMelConfig()
    msg = f"^audio file holds 2 NaN or infinite samples: {p}$"  # the whole file's count, as read_audio gives
    with pytest.raises(AudioError, match=msg):
        plan_windows(lazy, cfg)
    assert lazy._stats == {}  # nothing planned from the bad samples
    with pytest.raises(AudioError, match=msg):  # raised by the call, before any window is handed on
        LogMel(cfg).forward({"audio": [lazy]}, [ItemMeta("r")])
    with pytest.raises(AudioError, match=msg):
        read_audio(str(p), SR)
