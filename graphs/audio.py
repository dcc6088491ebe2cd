"""Audio node kinds: ``audio.load`` (files -> 16 kHz mono) and ``audio.log_mel``
(Whisper's log-mel features, one item per <= 30 s window), and the ``audio.files``
request source (audio files, or a ``.jsonl`` manifest whose lines carry per-request
settings), which also writes each transcript's txt/vtt/srt/tsv/json files.

torch, torchaudio and soundfile are imported inside the functions that need them,
so ``mmpipe validate``/``plan`` stay fast.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmpipe.graphs import register
from mmpipe.graphs.audio_stream import AudioError as AudioError  # re-exported: callers import it from here
from mmpipe.graphs.audio_stream import LongAudio, check_file_finite, nonfinite, to_mono
from mmpipe.graphs.base import Batch, ItemMeta, NodeKind, Port, Request, SourceError, SourceKind

WHISPER_FRAMES = 3000  # Whisper's encoder always sees 30 s of features
N_FFT, HOP = 400, 160


# WAV format tags libsndfile decodes (PCM, ADPCM, float, A-law, mu-law, IMA, GSM, extensible).
_WAV_CODECS = {0x0001, 0x0002, 0x0003, 0x0006, 0x0007, 0x0011, 0x0031, 0xFFFE}


def _unsupported_codec(head: bytes) -> str | None:
    """Name a container or codec libsndfile cannot read (it calls them "malformed"), from
    the first 64 bytes."""
    if head[4:8] == b"ftyp":
        return "an MP4/M4A container (AAC/ALAC)"
    fmt_size = int.from_bytes(head[16:20], "little")
    if head[:4] == b"RIFF" and head[8:16] == b"WAVEfmt " and len(head) >= 22 and 16 <= fmt_size <= 64:  # else: corrupt
        tag = int.from_bytes(head[20:22], "little")
        if tag not in _WAV_CODECS:
            return f"WAV format tag 0x{tag:04x}"
    return None


def decode_audio(src: "str | bytes", name: str) -> tuple[Any, int]:
    """A file's (a path) or encoded bytes' samples as a float32 [frames, channels] tensor,
    and their rate. Each check raises ``AudioError`` naming ``name``: missing, empty,
    undecodable (with the codec when libsndfile cannot read it), no samples, NaN/inf."""
    import io

    import soundfile as sf
    import torch

    if isinstance(src, str):
        p = Path(src)
        if not p.is_file():
            raise AudioError(f"audio file not found: {name}")
        empty, target = p.stat().st_size == 0, str(p)
    else:
        empty, target = len(src) == 0, io.BytesIO(src)
    if empty:
        raise AudioError(f"audio file is empty (0 bytes): {name}")
    try:
        data, sr = sf.read(target, dtype="float32", always_2d=True)
    except Exception as e:  # libsndfile's errors name the problem but not always the file
        if isinstance(src, str):
            with open(src, "rb") as f:
                head = f.read(64)
        else:
            head = src[:64]
        codec = _unsupported_codec(head)
        if codec:
            raise AudioError(f"unsupported audio codec in {name}: {codec}; convert it first, e.g. ffmpeg -i IN -ar 16000 OUT.wav") from None
        why = str(e) if isinstance(src, str) else str(e).replace(repr(target), name)  # not a buffer's repr: its name
        raise AudioError(f"cannot decode audio file {name}: {why} (readable: {', '.join(sorted(sf.available_formats()))[:200]})") from None
    if data.shape[0] == 0:
        raise AudioError(f"audio file has no samples: {name}")
    samples = torch.from_numpy(data)
    check_file_finite(nonfinite(samples, channel_dim=1), name)
    return samples, int(sr)


def read_audio(path: str, sample_rate: int) -> Any:
    """The file as a mono float32 tensor at ``sample_rate`` (channels averaged)."""
    samples, sr = decode_audio(path, path)
    return to_mono(samples, 1, sr, sample_rate).contiguous()


@dataclass(frozen=True)
class Waveform:
    """Audio already in memory (from the Python API): samples and their rate. ``samples``:
    a 1-D tensor, or 2-D with channels on the shorter axis (averaged to mono)."""

    samples: Any
    sample_rate: int

    def __str__(self) -> str:  # what results.jsonl and error messages show for it
        return f"<waveform: {self.samples.shape[-1] if self.samples.ndim else 0} samples at {self.sample_rate} Hz>"


def load_audio(value: Waveform, sample_rate: int) -> Any:
    """A request's in-memory audio as mono float32 at ``sample_rate``."""
    import torch

    wave = torch.as_tensor(value.samples).float()
    # channels on the shorter axis, as both soundfile's and torchaudio's layouts have
    channels = (0 if wave.shape[0] <= wave.shape[1] else 1) if wave.ndim == 2 else None
    if wave.ndim not in (1, 2) or wave.numel() == 0 or value.sample_rate <= 0:
        raise AudioError(f"audio has no usable samples: {value} (give a 1-D or [channels, samples] array and its sample rate)")
    bad = nonfinite(wave, channels)
    if bad:  # arrays skip decode_audio, so they are checked here
        raise AudioError(f"audio holds {bad} NaN or infinite samples: {value} (replace them, e.g. with numpy.nan_to_num)")
    return to_mono(wave, channels, int(value.sample_rate), sample_rate).contiguous()


# Recordings longer than this are not read whole: ``audio.load`` hands ``audio.log_mel`` a
# ``LongAudio``, which reads one window at a time, and log_mel streams the windows on a few
# at a time, so memory stays bounded however long the file is (a 2-hour file in RAM is
# 460 MB of samples, and all its windows' features at once were 2 GB).
STREAM_AFTER_S = 600.0
STREAM_WINDOWS = 4  # windows per streamed chunk


def open_audio(path: "str | Waveform", sample_rate: int) -> Any:
    """``load_audio``, or a ``LongAudio`` for files longer than ``STREAM_AFTER_S``."""
    import soundfile as sf

    if isinstance(path, Waveform):
        return load_audio(path, sample_rate)

    p = Path(path)
    if p.is_file() and p.stat().st_size > 0:
        try:
            info = sf.info(str(p))
        except Exception:  # read_audio says what is wrong with it
            info = None
        if info is not None and info.frames > 0 and info.frames > STREAM_AFTER_S * info.samplerate:
            return LongAudio(str(p), sample_rate, int(info.samplerate), int(info.frames))
    return read_audio(path, sample_rate)


@dataclass(kw_only=True)
class LoadConfig:
    sample_rate: int = 16000  # resampled to this rate (Hz)


@register
class Load(NodeKind[LoadConfig]):
    """Read an audio file (wav/flac/ogg/mp3 via soundfile) as mono float32."""

    kind = "audio.load"
    description = "Audio file -> mono float32 waveform at sample_rate."
    Config = LoadConfig
    inputs = (Port("path", "str", None, collate="list"),)
    outputs = (Port("audio", "float32", ("B", "S"), collate="list"),)
    light = True

    @classmethod
    def check(cls, cfg: LoadConfig) -> list[tuple[str, str, str]]:
        if cfg.sample_rate <= 0:
            return [("sample_rate", f"must be positive, got {cfg.sample_rate}", "use 16000 for Whisper")]
        return []

    def forward(self, x: Batch, meta: list[ItemMeta]) -> Batch:
        return {"audio": [open_audio(p, self.cfg.sample_rate) for p in x["path"]]}


@dataclass(kw_only=True)
class LogMelConfig:
    n_mels: int = 80  # mel bands: the model's (80, or 128 for large-v3)
    sample_rate: int = 16000  # rate of the incoming waveform (Hz)
    chunk_s: float = 30.0  # longest window
    search_s: float = 8.0  # a long recording is cut at its quietest 0.2 s in the last search_s of a window
    silence_db: float = -40.0  # ... which counts as a pause when this far below the loudest 20 ms
    overlap_s: float = 4.0  # windows cut inside speech overlap by this much (merged on words)
    # A window whose peak stays below this (dBFS) holds no signal (digital silence, below
    # 16-bit dither): it is not decoded, since Whisper reliably invents "you" there.
    floor_db: float = -80.0


def plan_windows(wave: Any, cfg: LogMelConfig) -> list[dict[str, int]]:
    """Cut a waveform into windows of at most ``chunk_s`` (sample indices).

    Each window: ``start``/``end`` (samples fed to the model), ``keep0``/``keep1``
    (the span it owns once stitched) and ``overlap`` (samples shared with the previous).
    All-silent windows after the first are dropped (Whisper invents text on silence).
    """
    import torch.nn.functional as F

    sr, n = cfg.sample_rate, int(wave.shape[0])
    chunk = int(cfg.chunk_s * sr)
    if n <= chunk:
        return [{"start": 0, "end": n, "keep0": 0, "keep1": n, "overlap": 0}]
    frame = sr // 50  # 20 ms
    if isinstance(wave, LongAudio):
        rms = wave.frame_stats(frame)[0]
    else:
        rms = wave[: n // frame * frame].view(-1, frame).pow(2).mean(1).sqrt()
    quiet = float(rms.max()) * 10 ** (cfg.silence_db / 20)
    # loudness of each 0.2 s stretch (the loudest 20 ms in it): a pause, not a plosive's closure
    span = F.max_pool1d(rms[None, None], 10, stride=1)[0, 0]
    half = int(cfg.overlap_s * sr / 2)
    wins, pos, keep0, ov = [], 0, 0, 0
    while n - pos > chunk:
        lo = (pos + chunk - int(cfg.search_s * sr)) // frame + 1
        hi = (pos + chunk - half) // frame - 10
        hi = max(hi, lo + 1)
        f, silent = _pause(span[lo:hi], quiet)
        f += lo
        cut = (f + 5) * frame  # the middle of the chosen 0.2 s stretch
        if silent:
            wins.append({"start": pos, "end": cut, "keep0": keep0, "keep1": cut, "overlap": ov})
            pos, ov = cut, 0
        else:
            wins.append({"start": pos, "end": cut + half, "keep0": keep0, "keep1": cut, "overlap": ov})
            pos, ov = cut - half, 2 * half
        keep0 = cut
    wins.append({"start": pos, "end": n, "keep0": keep0, "keep1": n, "overlap": ov})
    if isinstance(wave, LongAudio):
        return [w for i, w in enumerate(wins) if i == 0 or wave.peak(w["start"], w["end"], frame) > quiet]
    return [w for i, w in enumerate(wins) if i == 0 or float(wave[w["start"]:w["end"]].abs().max()) > quiet]


def _pause(span: Any, quiet: float) -> tuple[int, bool]:
    """Index of the stretch to cut at: the middle of the longest pause (the later one on
    ties, for fewer windows), else the quietest stretch; and whether it is a pause."""
    runs: list[tuple[int, int]] = []  # (length, start) of runs of quiet stretches
    start = None
    for i, q in enumerate((span <= quiet).tolist() + [False]):
        if q and start is None:
            start = i
        elif not q and start is not None:
            runs.append((i - start, start))
            start = None
    if runs:
        n, s = max(runs)
        return s + n // 2, True
    return int(span.argmin()), False


def log_mel(waves: list[Any], n_mels: int, sample_rate: int) -> Any:
    """Whisper log-mel [B, n_mels, 3000] of waveforms padded with zeros to 30 s.

    Same steps as ``WhisperFeatureExtractor``: periodic Hann STFT (n_fft 400, hop
    160, reflect-padded), power spectrum without the last frame, Slaney mel filters,
    log10 clamped at 1e-10, floor at (max - 8) per item, then (x + 4) / 4.
    """
    import torch
    import torchaudio.functional as AF

    n = WHISPER_FRAMES * HOP
    batch = torch.zeros(len(waves), n)
    for i, w in enumerate(waves):
        batch[i, : min(n, w.shape[0])] = w[:n]
    stft = torch.stft(batch, N_FFT, HOP, window=torch.hann_window(N_FFT), return_complex=True)
    power = stft[..., :-1].abs() ** 2
    fb = AF.melscale_fbanks(N_FFT // 2 + 1, 0.0, sample_rate / 2, n_mels, sample_rate, norm="slaney", mel_scale="slaney")
    mel = fb.T @ power
    logs = mel.clamp(min=1e-10).log10()
    logs = torch.maximum(logs, logs.amax(dim=(1, 2), keepdim=True) - 8.0)
    return (logs + 4.0) / 4.0


@register
class LogMel(NodeKind[LogMelConfig]):
    """Whisper's log-mel spectrogram; long audio is cut into <= 30 s windows (one item each)."""

    kind = "audio.log_mel"
    description = "Waveform -> Whisper log-mel features, one item per 30 s window."
    Config = LogMelConfig
    inputs = (Port("audio", "float32", ("B", "S"), collate="list"),)
    light = True
    expands = True

    @classmethod
    def ports(cls, cfg: LogMelConfig) -> tuple[tuple[Port, ...], tuple[Port, ...]]:
        return cls.inputs, (
            Port("features", "float32", ("B", cfg.n_mels, WHISPER_FRAMES)),
            Port("window", "any", None, collate="list", doc="the window's place in the recording (seconds)"),
        )

    @classmethod
    def check(cls, cfg: LogMelConfig) -> list[tuple[str, str, str]]:
        out = []
        if cfg.n_mels not in (80, 128):
            out.append(("n_mels", f"Whisper uses 80 or 128 mel bins, got {cfg.n_mels}", "set n_mels: 80"))
        if not 1.0 <= cfg.chunk_s <= 30.0:
            out.append(("chunk_s", f"windows must be 1 to 30 s long, got {cfg.chunk_s}", "use chunk_s: 30 (Whisper sees 30 s at a time)"))
        if not 0.0 <= cfg.overlap_s < cfg.search_s < cfg.chunk_s:
            out.append(("search_s", f"need 0 <= overlap_s < search_s < chunk_s, got {cfg.overlap_s}, {cfg.search_s}, {cfg.chunk_s}", "e.g. overlap_s: 4, search_s: 8"))
        if cfg.floor_db > -20.0:
            out.append(("floor_db", f"{cfg.floor_db} dBFS would drop audible speech as silence", "keep it low, e.g. floor_db: -80"))
        return out

    def forward(self, x: Batch, meta: list[ItemMeta]) -> Any:
        plans = []
        for i, w in enumerate(x["audio"]):
            if w.shape[0] == 0:
                raise AudioError(f"request {meta[i].request_id}: the audio has no samples")
            plans += [(i, win) for win in plan_windows(w, self.cfg)]
        if not any(isinstance(w, LongAudio) for w in x["audio"]):
            return self._features(x["audio"], plans)
        # A long recording: hand its windows on a few at a time (the runtime streams them,
        # with back-pressure), so only those windows' samples and features are in memory.
        return (self._features(x["audio"], plans[k:k + STREAM_WINDOWS]) for k in range(0, len(plans), STREAM_WINDOWS))

    def _features(self, audio: list[Any], plans: list[tuple[int, dict[str, int]]]) -> Batch:
        """Features, window times and parent rows of the windows ``plans`` (item, window)."""
        sr = self.cfg.sample_rate
        floor = 10 ** (self.cfg.floor_db / 20)
        waves, parents, windows = [], [], []
        for i, win in plans:
            w = audio[i]
            # A LongAudio's samples were checked for NaN/inf in frame_stats, before planning.
            piece = w.read(win["start"], win["end"]) if isinstance(w, LongAudio) else w[win["start"]:win["end"]]
            waves.append(piece)
            parents.append(i)
            windows.append({"start": win["start"] / sr, "end": win["end"] / sr, "keep": (win["keep0"] / sr, win["keep1"] / sr),
                            "overlap": win["overlap"] / sr, "silent": bool(piece.abs().max() < floor)})
        return {"features": log_mel(waves, self.cfg.n_mels, sr), "window": windows, "_parent": parents}


AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".oga", ".aiff", ".aif")
OUTPUT_FORMATS = ("txt", "vtt", "srt", "tsv", "json")
MANIFEST_SUFFIX = ".jsonl"
# Manifest keys besides "audio" and "id": the per-request settings of the Whisper kinds.
WORD_PARAMS = ("word_timestamps",)


@dataclass(kw_only=True)
class FilesConfig:
    path: str | None = None  # a file, a directory, a glob or a .jsonl manifest
    output_format: str = "all"  # txt | vtt | srt | tsv | json | all


def _request_keys() -> set[str]:
    from mmpipe.graphs.whisper_loop import REQUEST_PARAMS

    return set(REQUEST_PARAMS) | set(WORD_PARAMS)


def read_manifest(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The entries of a ``.jsonl`` manifest (audio paths made absolute) and its problems."""
    entries: list[dict[str, Any]] = []
    problems: list[str] = []
    known = _request_keys()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        return [], [f"cannot read {path}: {e}"]
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError as e:
            problems.append(f"{path.name} line {n}: not JSON ({e})")
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("audio"), str):
            problems.append(f"{path.name} line {n}: needs an object with an \"audio\" path")
            continue
        unknown = sorted(set(entry) - known - {"audio", "id"})
        if unknown:
            problems.append(f"{path.name} line {n}: unknown key(s) {', '.join(unknown)} (known: audio, id, {', '.join(sorted(known))})")
            continue
        audio = Path(entry["audio"]).expanduser()
        audio = audio if audio.is_absolute() else path.parent / audio
        if not audio.is_file():
            problems.append(f"{path.name} line {n}: audio file '{entry['audio']}' does not exist (relative paths are from the manifest's directory)")
            continue
        entries.append({**entry, "audio": str(audio)})
    if not entries and not problems:
        problems.append(f"{path.name} has no entries")
    return entries, problems


@register
class Files(SourceKind[FilesConfig]):
    """``input=`` as a file, a directory (its audio files, sorted), a glob, or a ``.jsonl``
    manifest: one ``{"audio": PATH, ...}`` per line, where any other key is a per-request
    setting of the Whisper kinds (``language``, ``task``, ``initial_prompt``, ``beam_size``,
    ``temperature``, ``word_timestamps``, ...) and ``id`` names the request."""

    kind = "audio.files"
    description = "Audio requests from a file, a directory, a glob or a .jsonl manifest."
    Config = FilesConfig
    fields = ("audio",)

    @classmethod
    def expand(cls, path: str) -> list[Path]:
        p = Path(path).expanduser()
        if any(c in path for c in "*?["):
            base = Path(p.anchor) if p.is_absolute() else Path(".")
            pattern = str(p.relative_to(p.anchor)) if p.is_absolute() else path
            return sorted(q for q in base.glob(pattern) if q.is_file())
        if p.is_dir():
            return sorted(q for q in p.iterdir() if q.suffix.lower() in AUDIO_SUFFIXES)
        return [p]

    @classmethod
    def check(cls, cfg: FilesConfig) -> list[tuple[str, str, str]]:
        out = []
        if cfg.output_format not in OUTPUT_FORMATS + ("all",):
            out.append(("output_format", f"unknown output format {cfg.output_format!r}", f"use one of {', '.join(OUTPUT_FORMATS)} or all"))
        if not cfg.path:
            return out + [("path", "no input given", "pass input=FILE, input=DIR, input='GLOB' or input=MANIFEST.jsonl")]
        if cfg.path.endswith(MANIFEST_SUFFIX) and Path(cfg.path).expanduser().is_file():
            _, problems = read_manifest(Path(cfg.path).expanduser())
            return out + [("path", p, "one JSON object per line: {\"audio\": \"a.wav\", \"language\": \"de\", \"task\": \"translate\"}") for p in problems[:5]]
        files = cls.expand(cfg.path)
        if not files:
            return out + [("path", f"'{cfg.path}' matches no audio files", f"give a file, or a directory/glob with {', '.join(AUDIO_SUFFIXES)} files")]
        if len(files) == 1 and not files[0].exists():
            return out + [("path", f"input file '{cfg.path}' does not exist", "check the path (relative paths are from the current directory)")]
        return out

    @classmethod
    def requests(cls, cfg: FilesConfig) -> list[Request]:
        out, seen = [], set()
        path = cfg.path or ""
        if path.endswith(MANIFEST_SUFFIX) and Path(path).expanduser().is_file():
            entries, problems = read_manifest(Path(path).expanduser())
            if problems:
                raise SourceError("path", problems[0], "fix the manifest line")
        else:
            entries = [{"audio": str(f)} for f in cls.expand(path)]
        for e in entries:
            rid = str(e.get("id") or Path(e["audio"]).stem)
            while rid in seen:  # same stem in two folders: keep ids unique
                rid += "_"
            seen.add(rid)
            params = {k: v for k, v in e.items() if k not in ("audio", "id")}
            out.append(Request(id=rid, values={"audio": e["audio"]}, input={"audio": e["audio"], **params}, params=params))
        return out

    @classmethod
    def write_outputs(cls, cfg: FilesConfig, results: list[Any], out_dir: Any) -> list[Any]:
        """``<id>.txt/.vtt/.srt/.tsv/.json`` (``output_format``) per transcribed file."""
        from mmpipe.graphs.whisper_writers import write_transcript

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        formats = OUTPUT_FORMATS if cfg.output_format == "all" else (cfg.output_format,)
        paths: list[Path] = []
        for r in results:
            if not r.ok or not r.outputs:
                continue
            transcript = {"text": str(r.outputs.get("text") or ""), "segments": [dict(s) for s in (r.outputs.get("segments") or [])],
                          "language": r.outputs.get("language")}
            paths += write_transcript(transcript, out_dir / r.id, formats, extra={"id": r.id, "input": r.input})
        return paths
