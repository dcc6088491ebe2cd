"""The denoising loop shared by ``diffusion.denoise`` and ``diffusion.denoise_uncond``.

Per item, as diffusers does it for one prompt: the initial noise comes from the
item's own ``torch.Generator().manual_seed(seed)`` (``prepare_latents``), and
the last piece keeps the item's scheduler copy, latents and generator in its
lane (multistep schedulers keep state; DDPM draws step noise from the
generator). The first piece's ``begin`` draws the same noise from the seed to
make the first model input, so latents never travel: the carry between
iterations is only ``x`` (the next model input, already scaled by the item's
own scheduler in ``end``) and ``t`` (one timestep per item), which is what lets
items at different timesteps share one UNet call (continuous batching).
Between pieces the carry holds ``h``, ``emb`` and ``res<i>`` (down-block
residuals) as ``[B, k, ...]``: k = 2 rows per item (uncond, cond) with guidance.
"""
from __future__ import annotations

import copy
import inspect
import itertools
from typing import Any, Callable

from mmpipe.graphs.base import Batch, ItemMeta, LoopKind
from mmpipe.graphs.diffusion_load import check_equal, component, make_scheduler, torch_dtype

# Called as fn(request_id, steps_done, steps_total) after every denoising step of
# every item (from the loop's last stage thread): a hook for per-step progress bars.
StepCallback = Callable[[str, int, int], None]
_on_step: StepCallback | None = None


def set_step_callback(fn: StepCallback | None) -> None:
    """Install (or remove, with None) the per-step progress hook of both denoising loops."""
    global _on_step
    _on_step = fn


def unet_costs(m: Any, latent_hw: int) -> list[float]:
    """Part costs for balancing: the model group's ``unet_costs``, else a FLOP estimate."""
    from mmpipe.graphs.diffusion_unet import unet_cost_estimate

    n = m.unet_down_blocks + 1 + m.unet_up_blocks
    if m.unet_costs:
        return [float(c) for c in m.unet_costs]
    if len(m.unet_channels) != m.unet_down_blocks or len(m.unet_attention) != m.unet_down_blocks or m.unet_down_blocks != m.unet_up_blocks:
        return [1.0] * n
    return unet_cost_estimate(list(m.unet_channels), list(m.unet_attention), 2, latent_hw)


class UNetLoop(LoopKind):
    """What both denoising loops share: setup, per-item lanes, the UNet pass, scheduler steps."""

    splittable = True

    @classmethod
    def num_parts(cls, cfg: Any) -> int:
        return cfg.model.unet_down_blocks + 1 + cfg.model.unet_up_blocks

    # ------------------------------------------------------------ setup
    def setup(self, device: Any, dtype: Any = None) -> None:
        import torch

        from mmpipe.graphs.diffusion_unet import UNetPiece

        self.device = torch.device(device)
        m = self.cfg.model
        self.dtype = torch_dtype(m, dtype)
        unet = component(m, "unet", self.dtype)
        check_equal("model.unet_down_blocks", m.unet_down_blocks, len(unet.down_blocks), "UNet")
        check_equal("model.unet_up_blocks", m.unet_up_blocks, len(unet.up_blocks), "UNet")
        self._check_model(unet)
        self.unet = UNetPiece(unet, self.parts, self.device, self.cfg.channels_last)
        self.sched = make_scheduler(m, self.cfg.scheduler)
        self.sched.set_timesteps(self.cfg.num_inference_steps, device=self.device)
        params = set(inspect.signature(self.sched.step).parameters)
        self.takes_eta, self.takes_gen = "eta" in params, "generator" in params
        self.k = self._rows_per_item(unet)
        self._uid = itertools.count()
        self._ctx_key: tuple[int, ...] | None = None
        self._ctx: Any = None

    def _check_model(self, unet: Any) -> None:
        """Kind-specific checks of the loaded UNet against the model group."""

    def _rows_per_item(self, unet: Any) -> int:
        return 1

    def _shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def _seed(self, m: ItemMeta) -> int:
        return int(m.params.get("seed", getattr(self, "seed", 0)))

    def _noise(self, m: ItemMeta) -> tuple[Any, Any]:
        """The item's generator and initial latents, drawn as diffusers' prepare_latents does."""
        import torch
        from diffusers.utils.torch_utils import randn_tensor

        g = torch.Generator("cpu").manual_seed(self._seed(m))
        lat = randn_tensor((1, *self._shape()), generator=g, device=self.device, dtype=self.dtype)
        return g, lat * self.sched.init_noise_sigma

    # ------------------------------------------------------------ loop
    def begin(self, x: Batch, meta: list[ItemMeta]) -> Batch:
        import torch

        with torch.inference_mode():
            lat = torch.cat([self._noise(m)[1] for m in meta])
            s = copy.deepcopy(self.sched)  # scale_model_input may set a step index
            t0 = s.timesteps[0]
            return {"x": s.scale_model_input(lat, t0), "t": t0.reshape(1).repeat(len(meta))}

    def enter(self, x: Batch, meta: list[ItemMeta], lanes: list[dict]) -> None:
        import torch

        with torch.inference_mode():
            for j, (m, lane) in enumerate(zip(meta, lanes)):
                lane["uid"] = next(self._uid)
                if self.unet.cross:
                    lane["ctx"] = self._context(x, j)
                if self.is_last:
                    # The last piece owns the item's scheduler, latents and generator
                    # (drawn again from the seed: state never travels).
                    g, lat = self._noise(m)
                    lane.update(sched=copy.deepcopy(self.sched), gen=g, latents=lat, i=0, seed=self._seed(m))

    def _context(self, x: Batch, j: int) -> Any:
        raise NotImplementedError

    def _batched_ctx(self, lanes: list[dict]) -> Any:
        """Cross-attention context of these items, [B*k, T, D]; reused while the batch is unchanged."""
        import torch

        key = tuple(lane["uid"] for lane in lanes)
        if key != self._ctx_key:
            self._ctx_key, self._ctx = key, torch.cat([lane["ctx"] for lane in lanes])
        return self._ctx

    def step(self, carry: Batch, meta: list[ItemMeta], lanes: list[dict]) -> Batch:
        import torch

        from mmpipe.graphs.diffusion_unet import flat, items

        b, u = len(meta), self.unet
        with torch.inference_mode():
            if self.is_first:
                h, emb = u.embed(carry["x"].to(self.dtype), carry["t"], self.k)
                res: tuple = (h,)
            else:
                h, emb = flat(carry["h"]), flat(carry["emb"])
                res = tuple(flat(carry[f"res{i}"]) for i in range(sum(k.startswith("res") for k in carry)))
            h, res = u.run(h, emb, res, self._batched_ctx(lanes) if u.cross else None)
            if self.is_last:
                return {"eps": items(u.out(h, carry["t"]), b), "t": carry["t"]}
            out = {"h": items(h, b), "emb": items(emb, b), "t": carry["t"]}
            out.update({f"res{i}": items(r, b) for i, r in enumerate(res)})
            return out

    def _guide(self, eps: Any) -> Any:
        """[B, k, C, H, W] model output -> [B, C, H, W] noise prediction."""
        return eps[:, 0]

    def end(self, carry: Batch, meta: list[ItemMeta], lanes: list[dict]) -> tuple[Batch, list[bool], Batch]:
        import torch

        with torch.inference_mode():
            noise = self._guide(carry["eps"])
            xs, ts, done = [], [], []
            hook = _on_step
            for j, lane in enumerate(lanes):
                s = lane["sched"]
                t = s.timesteps[lane["i"]]
                kw: dict[str, Any] = {}
                if self.takes_eta:
                    kw["eta"] = self.cfg.eta
                if self.takes_gen:
                    kw["generator"] = lane["gen"]
                lat = s.step(noise[j : j + 1], t, lane["latents"], **kw, return_dict=False)[0]
                lane["latents"], lane["i"] = lat, lane["i"] + 1
                finished = lane["i"] >= len(s.timesteps)
                if hook is not None:
                    hook(meta[j].request_id, lane["i"], len(s.timesteps))
                if not finished:  # the next model input, scaled by this item's own scheduler
                    t = s.timesteps[lane["i"]]
                    lat = s.scale_model_input(lat, t)
                xs.append(lat)
                ts.append(t.reshape(1))
                done.append(finished)
            outs = self._outputs(torch.cat([lane["latents"] for lane in lanes]), lanes)
            return {"x": torch.cat(xs), "t": torch.cat(ts)}, done, outs

    def _outputs(self, latents: Any, lanes: list[dict]) -> Batch:
        raise NotImplementedError

    def _meta_outputs(self, lanes: list[dict]) -> Batch:
        return {"seed": [lane["seed"] for lane in lanes], "steps": [self.cfg.num_inference_steps] * len(lanes)}

    def finish(self, lanes: list[dict]) -> None:
        self._ctx_key, self._ctx = None, None
