"""Audio node kinds: ``audio.load`` (files -> 16 kHz mono) and ``audio.log_mel``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mmpipe.graphs import register
from pathlib import Path

from mmpipe.graphs.base import Batch, ItemMeta, NodeKind, Port, Request, SourceKind


@dataclass(kw_only=True)
class LoadConfig:
    sample_rate: int = 16000


@register
class Load(NodeKind):
    """Read an audio file (wav/flac/ogg/mp3 via soundfile) as mono float32."""

    kind = "audio.load"
    description = "Audio file -> mono float32 waveform at sample_rate."
    Config = LoadConfig
    inputs = (Port("path", "str", None, collate="list"),)
    outputs = (Port("audio", "float32", ("B", "S"), collate="list"),)
    light = True

    @classmethod
    def check(cls, cfg: Any) -> list[tuple[str, str, str]]:
        if cfg.sample_rate <= 0:
            return [("sample_rate", f"must be positive, got {cfg.sample_rate}", "use 16000 for Whisper")]
        return []

    def forward(self, x: Batch, meta: list[ItemMeta]) -> Batch:
        raise NotImplementedError("audio.load runs with the speech recipe issue")


@dataclass(kw_only=True)
class LogMelConfig:
    n_mels: int = 80
    sample_rate: int = 16000
    chunk_s: float = 30.0


@register
class LogMel(NodeKind):
    """Whisper's log-mel spectrogram; long audio is cut into 30 s windows."""

    kind = "audio.log_mel"
    description = "Waveform -> Whisper log-mel features, one item per 30 s window."
    Config = LogMelConfig
    inputs = (Port("audio", "float32", ("B", "S"), collate="list"),)
    light = True
    expands = True

    @classmethod
    def ports(cls, cfg: Any) -> tuple[tuple[Port, ...], tuple[Port, ...]]:
        frames = int(round(cfg.chunk_s * 100))
        return cls.inputs, (Port("features", "float32", ("B", cfg.n_mels, frames)),)

    @classmethod
    def check(cls, cfg: Any) -> list[tuple[str, str, str]]:
        if cfg.n_mels not in (80, 128):
            return [("n_mels", f"Whisper uses 80 or 128 mel bins, got {cfg.n_mels}", "set n_mels: 80")]
        return []

    def forward(self, x: Batch, meta: list[ItemMeta]) -> Batch:
        raise NotImplementedError("audio.log_mel runs with the speech recipe issue")


AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".oga", ".aiff", ".aif")


@dataclass(kw_only=True)
class FilesConfig:
    path: str | None = None


@register
class Files(SourceKind):
    """``input=`` as a file, a directory (its audio files, sorted) or a glob."""

    kind = "audio.files"
    description = "Audio requests from a file, a directory or a glob."
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
    def check(cls, cfg: Any) -> list[tuple[str, str, str]]:
        if not cfg.path:
            return [("path", "no input given", "pass input=FILE, input=DIR or input='GLOB'")]
        files = cls.expand(cfg.path)
        if not files:
            return [("path", f"'{cfg.path}' matches no audio files", f"give a file, or a directory/glob with {', '.join(AUDIO_SUFFIXES)} files")]
        if len(files) == 1 and not files[0].exists():
            return [("path", f"input file '{cfg.path}' does not exist", "check the path (relative paths are from the current directory)")]
        return []

    @classmethod
    def requests(cls, cfg: Any) -> list[Request]:
        out, seen = [], set()
        for f in cls.expand(cfg.path or ""):
            rid = f.stem
            while rid in seen:  # same stem in two folders: keep ids unique
                rid += "_"
            seen.add(rid)
            out.append(Request(id=rid, values={"audio": str(f)}, input={"audio": str(f)}))
        return out
