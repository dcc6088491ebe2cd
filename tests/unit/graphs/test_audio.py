"""audio.load, audio.log_mel (parity with WhisperFeatureExtractor), windows, audio.files outputs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mmpipe.graphs.audio import (AudioError, Files, FilesConfig, Load, LoadConfig, LogMel, LogMelConfig, Waveform, load_audio, log_mel,
                                 plan_windows, read_audio)
from mmpipe.graphs.audio_stream import LongAudio
from mmpipe.graphs.base import ItemMeta
from mmpipe.runtime.results import Result

sf = pytest.importorskip("soundfile")
SPEECH = Path(__file__).resolve().parents[2] / "assets" / "speech"
SR = 16000


def _tone_bursts(seconds: list[tuple[float, float]], total: float, noise: float = 0.0) -> torch.Tensor:
    """A 440 Hz tone during each (start, stop), silence (or noise) elsewhere."""
    t = torch.arange(int(total * SR)) / SR
    x = torch.zeros_like(t)
    for a, b in seconds:
        m = (t >= a) & (t < b)
        x[m] = 0.5 * torch.sin(2 * torch.pi * 440 * t[m])
    if noise:
        x = x + noise * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    return x


# ---------------------------------------------------------------- audio.load
def test_load_mono_16k_unchanged():
    w = read_audio(str(SPEECH / "clip1.wav"), SR)
    ref, sr = sf.read(SPEECH / "clip1.wav", dtype="float32")
    assert sr == SR and w.dtype == torch.float32 and w.ndim == 1
    assert torch.equal(w, torch.from_numpy(ref))


def test_load_stereo_44k_is_mono_16k():
    w = read_audio(str(SPEECH / "stereo44k.wav"), SR)
    mono = read_audio(str(SPEECH / "clip1.wav"), SR)
    assert w.ndim == 1 and abs(w.shape[0] - mono.shape[0]) <= 2
    n = min(w.shape[0], mono.shape[0])
    # same speech after 16k -> 44.1k -> 16k: close, not bit-equal
    assert torch.corrcoef(torch.stack([w[:n], mono[:n]]))[0, 1] > 0.99


def test_load_other_formats(tmp_path):
    x = _tone_bursts([(0.1, 0.5)], 0.6).numpy()
    for ext, sub in ((".flac", "PCM_16"), (".ogg", "VORBIS")):
        p = tmp_path / f"a{ext}"
        sf.write(p, x, 22050, subtype=sub)
        w = read_audio(str(p), SR)
        assert abs(w.shape[0] - len(x) * SR / 22050) <= 2


@pytest.mark.parametrize("case", ["missing", "empty", "corrupt", "text", "no_samples"])
def test_load_errors_are_clear(tmp_path, case):
    p = tmp_path / "bad.wav"
    if case == "empty":
        p.write_bytes(b"")
    elif case == "corrupt":
        p.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(range(40)))
    elif case == "text":
        p = tmp_path / "notes.mp3"
        p.write_text("this is not audio\n" * 20)
    elif case == "no_samples":
        sf.write(p, np.zeros(0, dtype=np.float32), SR)
    with pytest.raises(AudioError) as e:
        Load(LoadConfig()).forward({"path": [str(p)]}, [ItemMeta("r")])
    msg = str(e.value)
    assert str(p) in msg
    assert {"missing": "not found", "empty": "empty", "corrupt": "cannot decode", "text": "cannot decode", "no_samples": "no samples"}[case] in msg


def test_mono_and_resample_are_one_step_with_the_old_numerics():
    """Files, streamed reads and in-memory audio all average then resample through
    ``to_mono``; each is bit-equal to the expression it replaced (copied here)."""
    import torchaudio.functional as AF

    from mmpipe.graphs.audio_stream import to_mono

    path = SPEECH / "stereo44k.wav"
    data, sr = sf.read(path, dtype="float32", always_2d=True)
    assert sr == 44100 and data.shape[1] == 2
    old_file = AF.resample(torch.from_numpy(data).mean(dim=1), orig_freq=int(sr), new_freq=SR).contiguous()
    assert torch.equal(to_mono(torch.from_numpy(data), 1, sr, SR), old_file)
    assert torch.equal(read_audio(str(path), SR), old_file)
    assert torch.equal(LongAudio(str(path), SR, sr, data.shape[0])._read_src(0, data.shape[0]), old_file)
    for samples in (torch.from_numpy(data.T.copy()), torch.from_numpy(data)):  # [channels, n] and [n, channels]
        wave = torch.as_tensor(samples).float()
        old = AF.resample(wave.mean(dim=0 if wave.shape[0] <= wave.shape[1] else 1), orig_freq=sr, new_freq=SR).contiguous()
        assert torch.equal(load_audio(Waveform(samples, sr), SR), old)


def test_non_finite_samples_are_counted_per_frame_as_before(tmp_path):
    """A frame with NaN in both channels is one bad sample, as when the mono mix was counted."""
    x = np.full((16000, 2), 0.1, np.float32)
    x[100] = np.nan
    x[200, 1] = np.inf
    p = tmp_path / "bad.wav"
    sf.write(p, x, SR, subtype="FLOAT")
    with pytest.raises(AudioError, match=f"^audio file holds 2 NaN or infinite samples: {p}$"):
        read_audio(str(p), SR)


@pytest.mark.parametrize("layout", ["mono", "channels_first", "channels_last"])
def test_waveforms_with_nan_fail_naming_the_input(layout):
    x = torch.full((2, 16000), 0.1)
    x[1, 500] = float("nan")
    samples = {"mono": x[1], "channels_first": x, "channels_last": x.T}[layout]
    value = Waveform(samples, SR)
    with pytest.raises(AudioError, match="audio holds 1 NaN or infinite samples") as e:
        Load(LoadConfig()).forward({"path": [value]}, [ItemMeta("r")])
    assert str(value) in str(e.value) and "nan_to_num" in str(e.value)


# ---------------------------------------------------------------- audio.log_mel
def test_log_mel_matches_whisper_feature_extractor():
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor(feature_size=80, sampling_rate=SR, hop_length=160, chunk_length=30, n_fft=400)
    g = torch.Generator().manual_seed(0)
    waves = [read_audio(str(SPEECH / f"clip{i}.wav"), SR) for i in (1, 2, 5)]
    waves += [0.1 * torch.randn(SR * 3, generator=g), torch.zeros(SR), 0.3 * torch.randn(SR * 31, generator=g)]  # silence; > 30 s truncates
    ours = log_mel(waves, 80, SR)
    ref = torch.from_numpy(fe([w.numpy() for w in waves], sampling_rate=SR, return_tensors="np").input_features)
    assert ours.shape == ref.shape == (6, 80, 3000)
    assert (ours - ref).abs().max().item() < 1e-4


def test_log_mel_batch_equals_single():
    waves = [read_audio(str(SPEECH / f"clip{i}.wav"), SR) for i in (1, 3)]
    both = log_mel(waves, 80, SR)
    assert torch.equal(both[1], log_mel(waves[1:], 80, SR)[0])


def test_log_mel_node_expands_long_audio():
    short = read_audio(str(SPEECH / "clip1.wav"), SR)
    long = _tone_bursts([(i * 3.0, i * 3.0 + 2.0) for i in range(14)], 42.0)
    out = LogMel(LogMelConfig()).forward({"audio": [short, long]}, [ItemMeta("a"), ItemMeta("b")])
    assert out["_parent"] == [0, 1, 1]
    assert out["features"].shape == (3, 80, 3000)
    w = out["window"]
    assert w[0] == {"start": 0.0, "end": short.shape[0] / SR, "keep": (0.0, short.shape[0] / SR), "overlap": 0.0, "silent": False}
    assert w[1]["start"] == 0.0 and w[2]["start"] == w[1]["end"] == w[1]["keep"][1] == w[2]["keep"][0]
    assert w[2]["end"] == 42.0 and w[1]["overlap"] == w[2]["overlap"] == 0.0


# ---------------------------------------------------------------- windows
def test_windows_cut_in_the_longest_pause_near_the_edge():
    # speech-like bursts with a short gap at ~24.6 s and a long one at 26.5-28 s
    bursts = [(0.0, 24.5), (24.7, 26.5), (28.0, 45.0)]
    wins = plan_windows(_tone_bursts(bursts, 45.0), LogMelConfig())
    assert len(wins) == 2
    cut = wins[0]["end"] / SR
    assert 26.5 < cut < 28.0 and wins[1]["start"] == wins[0]["end"] and wins[1]["overlap"] == 0
    assert all(w["end"] - w["start"] <= 30 * SR for w in wins)


def test_windows_overlap_when_there_is_no_pause():
    x = _tone_bursts([(0.0, 70.0)], 70.0, noise=0.01)
    cfg = LogMelConfig(overlap_s=4.0)
    wins = plan_windows(x, cfg)
    assert len(wins) == 3
    for a, b in zip(wins, wins[1:]):
        assert a["end"] - b["start"] == 4 * SR == b["overlap"]  # 2 s each side of the cut
        assert a["keep1"] == b["keep0"] == (a["end"] + b["start"]) // 2
    assert all(w["end"] - w["start"] <= 30 * SR for w in wins) and wins[-1]["end"] == 70 * SR


def test_windows_drop_silent_tails():
    x = torch.cat([_tone_bursts([(0.0, 25.0)], 25.0), torch.zeros(SR * 20)])
    wins = plan_windows(x, LogMelConfig())
    assert len(wins) == 1 and 25 * SR < wins[0]["end"] < 30 * SR


def test_windows_without_signal_are_marked_silent():
    """Digital silence (and dither far below it) is not decoded; faint sound is."""
    quiet = 1e-5 * torch.randn(SR * 5, generator=torch.Generator().manual_seed(0))
    faint = _tone_bursts([(0.0, 1.0)], 2.0) * 0.002  # -60 dBFS: still decoded
    out = LogMel(LogMelConfig()).forward({"audio": [torch.zeros(SR * 30), quiet, faint]}, [ItemMeta(k) for k in "abc"])
    assert [w["silent"] for w in out["window"]] == [True, True, False]
    assert [w["silent"] for w in LogMel(LogMelConfig(floor_db=-120)).forward({"audio": [quiet]}, [ItemMeta("a")])["window"]] == [False]


def test_log_mel_checks():
    assert LogMel.check(LogMelConfig(chunk_s=40.0))
    assert LogMel.check(LogMelConfig(overlap_s=10.0))
    assert LogMel.check(LogMelConfig(floor_db=-10.0))
    assert not LogMel.check(LogMelConfig())


# ---------------------------------------------------------------- audio.files
def test_files_write_outputs(tmp_path):
    segs = [{"id": 0, "start": 0.0, "end": 1.5, "text": " Hello there."}, {"id": 1, "start": 61.25, "end": 3725.0, "text": "Bye."}]
    results = [Result("a", {"audio": "x/a.wav"}, outputs={"text": "Hello there. Bye.", "segments": segs, "language": "en"}),
               Result("b", {"audio": "x/b.wav"}, error={"message": "boom"})]
    paths = Files.write_outputs(FilesConfig(path="x"), results, tmp_path)
    assert sorted(p.name for p in paths) == ["a.json", "a.srt", "a.tsv", "a.txt", "a.vtt"]
    # openai-whisper's conventions: a line per segment; srt hours always, vtt only when needed
    assert (tmp_path / "a.txt").read_text() == "Hello there.\nBye.\n"
    assert (tmp_path / "a.srt").read_text() == ("1\n00:00:00,000 --> 00:00:01,500\nHello there.\n\n"
                                               "2\n00:01:01,250 --> 01:02:05,000\nBye.\n\n")
    assert (tmp_path / "a.vtt").read_text() == ("WEBVTT\n\n00:00.000 --> 00:01.500\nHello there.\n\n"
                                               "01:01.250 --> 01:02:05.000\nBye.\n\n")
    assert (tmp_path / "a.tsv").read_text() == "start\tend\ttext\n0\t1500\tHello there.\n61250\t3725000\tBye.\n"
    j = json.loads((tmp_path / "a.json").read_text())
    assert j["text"] == "Hello there. Bye." and j["segments"] == segs and j["language"] == "en" and j["id"] == "a"
    only = Files.write_outputs(FilesConfig(path="x", output_format="srt"), results, tmp_path / "srt")
    assert [p.name for p in only] == ["a.srt"]


def test_subtitles_follow_word_timings(tmp_path):
    from mmpipe.graphs.whisper_writers import to_srt, to_vtt

    t = {"segments": [{"start": 0.0, "end": 30.0, "text": " Hi there.",
                       "words": [{"word": " Hi", "start": 1.2, "end": 1.5}, {"word": " there.", "start": 1.5, "end": 2.04}]}]}
    assert to_srt(t) == "1\n00:00:01,200 --> 00:00:02,040\nHi there.\n\n"
    assert to_vtt({"segments": [{"start": 0.0, "end": 1.0, "text": "a --> b"}]}) == "WEBVTT\n\n00:00.000 --> 00:01.000\na -> b\n\n"


def test_manifest_carries_per_request_settings(tmp_path):
    (tmp_path / "a.wav").write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.wav").write_bytes(b"x")
    m = tmp_path / "list.jsonl"
    m.write_text('{"audio": "a.wav", "language": "de", "task": "translate"}\n\n'
                 '{"audio": "sub/b.wav", "id": "bee", "beam_size": 1, "word_timestamps": true}\n')
    assert not Files.check(FilesConfig(path=str(m)))
    reqs = Files.requests(FilesConfig(path=str(m)))
    assert [r.id for r in reqs] == ["a", "bee"]
    assert reqs[0].params == {"language": "de", "task": "translate"} and reqs[0].values == {"audio": str(tmp_path / "a.wav")}
    assert reqs[1].params == {"beam_size": 1, "word_timestamps": True}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"audio": "a.wav", "langauge": "de"}\nnot json\n{"audio": "missing.wav"}\n')
    problems = Files.check(FilesConfig(path=str(bad)))
    assert [p[0] for p in problems] == ["path"] * 3 and all(p[2] for p in problems)
    assert "line 1" in problems[0][1] and "langauge" in problems[0][1] and "line 2" in problems[1][1] and "missing.wav" in problems[2][1]
    from mmpipe.graphs.base import SourceError

    with pytest.raises(SourceError):
        Files.requests(FilesConfig(path=str(bad)))
    assert Files.check(FilesConfig(path=str(m), output_format="docx"))[0][0] == "output_format"


def test_files_source_expands_dirs_and_globs(tmp_path):
    for n in ("b.wav", "a.flac", "c.txt"):
        (tmp_path / n).write_bytes(b"x")
    reqs = Files.requests(FilesConfig(path=str(tmp_path)))
    assert [r.id for r in reqs] == ["a", "b"]
    assert [r.id for r in Files.requests(FilesConfig(path=str(tmp_path / "*.wav")))] == ["b"]
    assert Files.check(FilesConfig(path=str(tmp_path / "nope.wav")))
