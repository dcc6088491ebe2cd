"""One piece of a UNet split by block: parts are down blocks, the mid block, up blocks.

The maths is that of ``UNet2DConditionModel.forward`` / ``UNet2DModel.forward``
in diffusers, cut at block boundaries: the first piece adds the time embedding
and ``conv_in``, the last ``conv_norm_out``/``conv_out``. Down-block residuals
ride in the carry to the up-block pieces.

Batched values are *item-major*: with classifier-free guidance each item has
``k = 2`` rows (uncond, cond), stored in the carry as ``[B, k, ...]`` so that
the runtime can select/concat items by row; blocks see them flattened.
"""
from __future__ import annotations

from typing import Any

from mmpipe.graphs.base import UserError


def unet_cost_estimate(channels: list[int], attention: list[bool], layers: int, latent_hw: int) -> list[float]:
    """Rough relative FLOPs of each part (down blocks, mid, up blocks) for balancing stages."""
    n = len(channels)
    costs_down, costs_up = [], []
    for i, c in enumerate(channels):
        area = (latent_hw / 2**i) ** 2
        conv = 9 * c * c * area * 2  # two 3x3 convs per resnet
        attn = (8 * c * c * area + 2 * area * area * c) if attention[i] else 0.0
        costs_down.append(layers * (conv + attn))
        costs_up.append((layers + 1) * (1.5 * conv + attn))  # skip concat widens the input conv
    c, area = channels[-1], (latent_hw / 2 ** (n - 1)) ** 2
    mid = 2 * 9 * c * c * area * 2 + 8 * c * c * area + 2 * area * area * c
    total = sum(costs_down) + mid + sum(costs_up)
    return [round(v / total, 4) for v in costs_down + [mid] + costs_up[::-1]]


def flat(v: Any) -> Any:
    """[B, k, ...] -> [B*k, ...] (a view)."""
    return v.flatten(0, 1)


def items(v: Any, b: int) -> Any:
    """[B*k, ...] -> [B, k, ...] (a view)."""
    return v.unflatten(0, (b, v.shape[0] // b))


class UNetPiece:
    """The modules of parts ``parts`` of ``unet``, and the forward over them."""

    def __init__(self, unet: Any, parts: range, device: Any, channels_last: bool = False) -> None:
        import torch

        self.cond = hasattr(unet, "get_time_embed")  # UNet2DConditionModel
        self.config = unet.config
        self.n_down, self.n_up = len(unet.down_blocks), len(unet.up_blocks)
        self.total = self.n_down + 1 + self.n_up
        self.parts = parts
        self.first, self.last = parts.start == 0, parts.stop == self.total
        self.dtype = unet.dtype
        _check_supported(unet, self.cond)
        # Keep references to this piece's modules only (and move only them).
        self.blocks: list[tuple[str, int, Any]] = []
        for p in parts:
            if p < self.n_down:
                self.blocks.append(("down", p, unet.down_blocks[p]))
            elif p == self.n_down:
                self.blocks.append(("mid", 0, unet.mid_block))
            else:
                j = p - self.n_down - 1
                self.blocks.append(("up", j, unet.up_blocks[j]))
        mods = [m for _, _, m in self.blocks]
        if self.first:
            self.time_proj, self.time_embedding, self.conv_in = unet.time_proj, unet.time_embedding, unet.conv_in
            self.time_embed_act = getattr(unet, "time_embed_act", None)
            mods += [self.time_embedding, self.conv_in, self.time_embed_act]
        if self.last:
            self.conv_norm_out, self.conv_act, self.conv_out = unet.conv_norm_out, unet.conv_act, unet.conv_out
            mods += [self.conv_norm_out, self.conv_act, self.conv_out]
        # channels_last: faster oneDNN/cuDNN convolutions (same maths, rounding may differ slightly)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        for m in mods:
            if m is not None:
                m.to(device, memory_format=self.memory_format)
        self.num_upsamplers = getattr(unet, "num_upsamplers", 0)
        self.cross = any(getattr(m, "has_cross_attention", False) for m in mods if m is not None)

    # ------------------------------------------------------------ forward
    def embed(self, x: Any, t: Any, k: int) -> tuple[Any, Any]:
        """First piece: repeat each item k times, time embedding, conv_in."""
        import torch

        if self.config.center_input_sample:
            x = 2 * x - 1.0
        if k > 1:
            x, t = x.repeat_interleave(k, 0), t.repeat_interleave(k, 0)
        if not self.cond:  # UNet2DModel broadcasts timesteps this way
            t = t * torch.ones(x.shape[0], dtype=t.dtype, device=t.device)
        t_emb = self.time_proj(t.to(x.device)).to(dtype=self.dtype if not self.cond else x.dtype)
        emb = self.time_embedding(t_emb)
        if self.time_embed_act is not None:
            emb = self.time_embed_act(emb)
        return self.conv_in(x.contiguous(memory_format=self.memory_format)), emb

    def run(self, h: Any, emb: Any, res: tuple, ctx: Any) -> tuple[Any, tuple]:
        """This piece's blocks on flat tensors; returns the sample and the residuals left."""
        for kind, j, blk in self.blocks:
            if kind == "down":
                if getattr(blk, "has_cross_attention", False):
                    h, r = blk(hidden_states=h, temb=emb, encoder_hidden_states=ctx, attention_mask=None,
                               cross_attention_kwargs=None, encoder_attention_mask=None)
                else:
                    h, r = blk(hidden_states=h, temb=emb)
                res = res + tuple(r)
            elif kind == "mid":
                if blk is None:
                    continue
                if getattr(blk, "has_cross_attention", False):
                    h = blk(h, emb, encoder_hidden_states=ctx, attention_mask=None, cross_attention_kwargs=None,
                            encoder_attention_mask=None)
                else:
                    h = blk(h, emb)
            else:
                n = len(blk.resnets)
                r, res = res[-n:], res[:-n]
                if not self.cond:
                    h = blk(h, r, emb)
                    continue
                upsample_size = None
                if j < self.n_up - 1 and self._odd_size(res[0]):  # res[0]: conv_in's output, the input size
                    upsample_size = res[-1].shape[2:]
                if getattr(blk, "has_cross_attention", False):
                    h = blk(hidden_states=h, temb=emb, res_hidden_states_tuple=r, encoder_hidden_states=ctx,
                            cross_attention_kwargs=None, upsample_size=upsample_size, attention_mask=None,
                            encoder_attention_mask=None)
                else:
                    h = blk(hidden_states=h, temb=emb, res_hidden_states_tuple=r, upsample_size=upsample_size)
        return h, res

    def _odd_size(self, first_res: Any) -> bool:
        """diffusers' forward_upsample_size: the input is not a multiple of the total upsampling."""
        f = 2**self.num_upsamplers
        return any(d % f for d in first_res.shape[-2:])

    def out(self, h: Any, t: Any) -> Any:
        """Last piece: norm, activation, conv_out (and UNet2DModel's fourier scaling)."""
        if self.conv_norm_out is not None:
            h = self.conv_norm_out(h)
            h = self.conv_act(h)
        h = self.conv_out(h)
        if not self.cond and self.config.time_embedding_type == "fourier":
            tt = t.repeat_interleave(h.shape[0] // t.shape[0], 0)
            h = h / tt.reshape((h.shape[0], *([1] * (h.ndim - 1))))
        return h


def _check_supported(unet: Any, cond: bool) -> None:
    """Refuse (clearly) the UNet features this split does not implement."""
    cfg = unet.config
    bad = []
    if getattr(unet, "class_embedding", None) is not None:
        bad.append("class embeddings")
    if cond:
        if cfg.addition_embed_type is not None:
            bad.append(f"addition_embed_type={cfg.addition_embed_type} (SDXL-style)")
        if getattr(unet, "encoder_hid_proj", None) is not None:
            bad.append("encoder_hid_proj")
        if cfg.time_cond_proj_dim is not None:
            bad.append("time_cond_proj_dim (LCM guidance embedding)")
    else:
        if any(hasattr(b, "skip_conv") for b in list(unet.down_blocks) + list(unet.up_blocks)):
            bad.append("skip blocks (score-SDE UNets)")
    if bad:
        raise UserError("model.path", f"this UNet uses {', '.join(bad)}, which diffusion.denoise does not split yet",
                        "use a Stable Diffusion 1.x/2.x or DDPM/DDIM pipeline")
