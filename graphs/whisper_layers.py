"""Whisper's layer blocks as pipeline parts: the encoder's three parts per layer (two
attention head groups, feed-forward), the decoder's three blocks per layer, the conv stem.

Each block loads its own tensors through a ``whisper_model.Loader``. The math mirrors
``transformers``' Whisper modules (q scaled before the attention product, sdpa with
scale 1, erf GELU, LayerNorm eps 1e-5) so that greedy token ids equal
``WhisperForConditionalGeneration.generate``. The decoder's step math (KV caches) is in
``whisper_decode``. Imported lazily (it imports torch at module level).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Self

import torch
import torch.nn.functional as F

from mmpipe.graphs.whisper_common import DECODER_BLOCKS, ENCODER_BLOCKS
from mmpipe.graphs.whisper_model import Linear, Loader, Norm


def self_attention(ld: Loader, p: str) -> tuple[Norm, Linear]:
    """The pre-norm and fused q/k/v projection of layer ``p``'s self-attention (the same
    tensor names in encoder and decoder layers; its output projection is ``attention_out``)."""
    return ld.norm(f"{p}.self_attn_layer_norm"), ld.fused(f"{p}.self_attn", ("q_proj", "k_proj", "v_proj"))


def attention_out(ld: Loader, p: str) -> Linear:
    """The output projection of layer ``p``'s self-attention."""
    return ld.linear(f"{p}.self_attn.out_proj")


@dataclass
class HeadGroups:
    """An encoder layer stopped between its two attention head groups: what the second needs."""

    h: torch.Tensor  # the layer's input (for the residual)
    qkv: torch.Tensor  # the fused q/k/v projection of ln1(h), [B, T, 3D]
    a: torch.Tensor  # attention over the first head group, [B, T, H//2, dh]

    @staticmethod
    def to_batch(s: "EncoderState") -> dict[str, torch.Tensor]:
        """What a piece hands on (the runtime carries dicts of tensors): ``h``, and for a
        layer cut between its head groups also ``qkv`` and ``a``."""
        return {"h": s.h, "qkv": s.qkv, "a": s.a} if isinstance(s, HeadGroups) else {"h": s}

    @staticmethod
    def from_batch(x: dict[str, Any]) -> "EncoderState":
        """The state ``to_batch`` handed on."""
        return HeadGroups(x["h"], x["qkv"], x["a"]) if "qkv" in x else x["h"]


# Between two encoder parts: hidden states [B, T, D], or a layer cut between its head groups.
EncoderState = torch.Tensor | HeadGroups


def attend(qkv: torch.Tensor, heads: int, lo: int, hi: int) -> torch.Tensor:
    """Self-attention over heads [lo, hi) of a fused q/k/v projection -> [B, T, hi - lo, dh]
    (sdpa's CPU output is laid out so: contiguous, nothing to copy when it is handed on).

    sdpa computes each head on its own, so the groups' results are bitwise those of one
    call over all heads (checked for tiny.en, odd head counts, 1 and 2 threads)."""
    B, T, D3 = qkv.shape
    dh = D3 // 3 // heads
    q, k, v = (x.view(B, T, heads, dh)[:, :, lo:hi].transpose(1, 2) for x in qkv.split(D3 // 3, dim=-1))
    return F.scaled_dot_product_attention(q * dh**-0.5, k, v, scale=1.0).transpose(1, 2)


@dataclass
class FirstHeads:
    """Encoder part 3i: layer i's pre-norm, fused q/k/v projection and the attention of its
    first head group (heads [0, H//2)); the layer's attention is cut in two so that stages
    can be balanced finer than its largest block."""

    ln1: Norm
    qkv: Linear

    @classmethod
    def load(cls, ld: Loader, p: str) -> "FirstHeads":
        return cls(*self_attention(ld, p))

    def __call__(self, h: EncoderState, heads: int) -> HeadGroups:
        assert isinstance(h, torch.Tensor), "a layer's first head group starts from hidden states"
        qkv = self.qkv(self.ln1(h))
        return HeadGroups(h, qkv, attend(qkv, heads, 0, heads // 2))


@dataclass
class SecondHeads:
    """Encoder part 3i + 1: the attention of layer i's second head group (heads [H//2, H)),
    both groups' outputs through the output projection, and the residual."""

    out: Linear

    @classmethod
    def load(cls, ld: Loader, p: str) -> "SecondHeads":
        return cls(attention_out(ld, p))

    def __call__(self, s: EncoderState, heads: int) -> torch.Tensor:
        assert isinstance(s, HeadGroups), "a layer's second head group follows its first"
        B, T, D = s.h.shape
        # both groups side by side in one copy: [B, T, H, dh] is [B, T, D] as the projection reads it
        a = torch.cat([s.a, attend(s.qkv, heads, heads // 2, heads)], dim=2).reshape(B, T, D)
        return s.h + self.out(a)


@dataclass
class FeedForward:
    """The feed-forward block of a pre-norm layer and its residual (the third part of an
    encoder or a decoder layer)."""

    ln: Norm
    fc1: Linear
    fc2: Linear

    @classmethod
    def load(cls, ld: Loader, p: str) -> Self:
        return cls(ld.norm(f"{p}.final_layer_norm"), ld.linear(f"{p}.fc1"), ld.linear(f"{p}.fc2"))

    def __call__(self, h: torch.Tensor, heads: int = 0) -> torch.Tensor:
        return h + self.fc2(self.fc1.gelu(self.ln(h)))


class EncoderFeedForward(FeedForward):
    """Encoder part 3i + 2: layer i's feed-forward block (starts from hidden states)."""

    def __call__(self, h: EncoderState, heads: int = 0) -> torch.Tensor:
        assert isinstance(h, torch.Tensor), "a feed-forward block starts from hidden states"
        return super().__call__(h)


EncoderPart = FirstHeads | SecondHeads | EncoderFeedForward
ENCODER_PARTS = (FirstHeads, SecondHeads, EncoderFeedForward)  # a layer's parts, in order
assert len(ENCODER_PARTS) == ENCODER_BLOCKS


def _layer_part(ld: Loader, part: int, layers: str, blocks: tuple[Any, ...]) -> Any:
    """Part ``part`` of a stack whose layers are ``blocks`` in order: block part % len of
    layer part // len, loaded from ``{layers}.{layer}``."""
    i, k = divmod(part, len(blocks))
    return blocks[k].load(ld, f"{layers}.{i}")


def encoder_part(ld: Loader, part: int) -> EncoderPart:
    """Encoder part ``part`` (first head group, second head group with the output
    projection, feed-forward of layer part // 3)."""
    block: EncoderPart = _layer_part(ld, part, "model.encoder.layers", ENCODER_PARTS)
    return block


@dataclass
class DecoderSelf:
    """A decoder layer's self-attention weights (its first part; the step's math is in whisper_decode)."""

    ln1: Norm
    qkv: Linear
    out: Linear

    @classmethod
    def load(cls, ld: Loader, p: str) -> "DecoderSelf":
        return cls(*self_attention(ld, p), attention_out(ld, p))


@dataclass
class DecoderCross:
    """A decoder layer's cross-attention weights (its second part)."""

    ln2: Norm
    xq: Linear
    xkv: Linear
    xout: Linear

    @classmethod
    def load(cls, ld: Loader, p: str) -> "DecoderCross":
        return cls(ld.norm(f"{p}.encoder_attn_layer_norm"), ld.linear(f"{p}.encoder_attn.q_proj"),
                   ld.fused(f"{p}.encoder_attn", ("k_proj", "v_proj")), ld.linear(f"{p}.encoder_attn.out_proj"))


DecoderBlock = DecoderSelf | DecoderCross | FeedForward
DECODER_PARTS = (DecoderSelf, DecoderCross, FeedForward)  # a layer's blocks, in order
assert len(DECODER_PARTS) == DECODER_BLOCKS


def decoder_block(ld: Loader, part: int) -> DecoderBlock:
    """Decoder part ``part`` (self-attention, cross-attention, feed-forward of layer part // 3)."""
    block: DecoderBlock = _layer_part(ld, part, "model.decoder.layers", DECODER_PARTS)
    return block


@dataclass
class DecoderLayer:
    """All three blocks of decoder layer ``i`` (word alignment runs whole layers)."""

    self_attn: DecoderSelf
    cross: DecoderCross
    mlp: FeedForward

    @classmethod
    def load(cls, ld: Loader, i: int) -> "DecoderLayer":
        p = f"model.decoder.layers.{i}"
        return cls(DecoderSelf.load(ld, p), DecoderCross.load(ld, p), FeedForward.load(ld, p))


def encoder_stem(features: torch.Tensor, conv1: Linear, conv2: Linear, positions: torch.Tensor) -> torch.Tensor:
    """Log-mel [B, n_mels, 3000] -> conv stem + sinusoid positions [B, 1500, D]."""
    x = F.gelu(F.conv1d(features, conv1.w, conv1.b, padding=1))
    x = F.gelu(F.conv1d(x, conv2.w, conv2.b, stride=2, padding=1))
    x = x.permute(0, 2, 1)
    return x + positions[: x.shape[1]]
