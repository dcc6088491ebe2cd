"""Diffusion node kinds: the denoising loops (UNet split by block), VAE decode, seeds.

``diffusion.denoise`` (text-conditioned, Stable Diffusion) and
``diffusion.denoise_uncond`` (DDPMPipeline layout) are loops over the
scheduler's timesteps (the shared loop is in ``diffusion_loop.py``): each
request's noise comes from its own seed and each item steps its own scheduler,
so a batch of N equals N single runs, as diffusers with one generator per prompt.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mmpipe.graphs import register
from mmpipe.graphs.base import Batch, ItemMeta, NodeKind, Port, Request, SourceKind, UserError
from mmpipe.graphs.diffusion_load import DDPMModel, SDModel, check_equal, component, scheduler_problem, standalone, torch_dtype
from mmpipe.graphs.diffusion_loop import UNetLoop, set_step_callback, unet_costs

__all__ = ["Denoise", "DenoiseUncond", "VaeDecode", "Seeds", "set_step_callback"]

SCHEDULERS = ("default", "ddim", "euler", "euler_a", "dpm++", "ddpm", "pndm", "lms", "unipc")


@dataclass(kw_only=True)
class DenoiseConfig:
    model: SDModel = field(default_factory=SDModel)  # the model group (model=...)
    scheduler: str = "default"  # a short name above or any diffusers scheduler class name
    num_inference_steps: int = 20  # denoising steps (a request may set its own)
    guidance_scale: float = 7.5  # <= 1: no classifier-free guidance (as diffusers)
    guidance_rescale: float = 0.0  # rescales guided noise (diffusers' guidance_rescale; 0: off)
    eta: float = 0.0  # DDIM's eta (schedulers that take it)
    height: int = 64  # image height in pixels (a multiple of 8)
    width: int = 64  # image width in pixels (a multiple of 8)
    # UNet convolutions in channels_last: faster on CPU (oneDNN) for wide UNets; not bit-exact.
    channels_last: bool = False


@dataclass(kw_only=True)
class UncondConfig:
    model: DDPMModel = field(default_factory=DDPMModel)  # the model group (model=...)
    scheduler: str = "default"  # a short name (default, ddim, ...) or a diffusers class name
    num_inference_steps: int = 50  # denoising steps
    eta: float = 0.0  # DDIM's eta (schedulers that take it)
    channels_last: bool = False  # UNet convolutions in channels_last (faster on CPU, not bit-exact)


# Per-item facts for results.jsonl and the images' provenance, as plain values (one per item).
META_PORTS = (Port("seed", "int", None, collate="list"), Port("steps", "int", None, collate="list"),
              Port("guidance", "float32", None, collate="list", doc="guidance scale (None: unconditional)"),
              Port("scheduler", "str", None, collate="list", doc="the scheduler's diffusers class"),
              Port("size", "str", None, collate="list", doc="WIDTHxHEIGHT in pixels"),
              Port("info", "any", None, collate="list", doc="all generation parameters (image.save writes them into the PNG)"))


def _latent_shape(cfg: DenoiseConfig | VaeConfig) -> tuple[int | str, ...]:
    m = cfg.model
    return ("B", m.latent_channels, cfg.height // m.vae_scale, cfg.width // m.vae_scale)


def _loop_checks(cfg: DenoiseConfig | UncondConfig) -> list[tuple[str, str, str]]:
    out = []
    msg = scheduler_problem(cfg.scheduler)
    if msg:
        out.append(("scheduler", msg, f"use one of {', '.join(SCHEDULERS)} or a diffusers class name (e.g. LMSDiscreteScheduler)"))
    if cfg.num_inference_steps <= 0:
        out.append(("num_inference_steps", f"must be positive, got {cfg.num_inference_steps}", "e.g. num_inference_steps=20"))
    m = cfg.model
    if cfg.num_inference_steps > m.num_train_timesteps:
        # DDIM/DDPM refuse this at setup; the others would repeat timesteps.
        out.append(("num_inference_steps", f"{cfg.num_inference_steps} steps, but the model's scheduler has only "
                    f"{m.num_train_timesteps} training timesteps", f"use num_inference_steps={m.num_train_timesteps} or fewer (e.g. 50)"))
    parts = m.unet_down_blocks + 1 + m.unet_up_blocks
    if m.unet_costs and len(m.unet_costs) != parts:
        out.append(("model.unet_costs", f"{len(m.unet_costs)} costs for {parts} UNet parts", "give one cost per down block, the mid block and each up block"))
    return out


@register
class Denoise(UNetLoop[DenoiseConfig]):
    """Stable Diffusion denoising loop; UNet parts: down blocks, mid, up blocks."""

    kind = "diffusion.denoise"
    description = "Text embeddings -> denoised latents (any diffusers scheduler, CFG)."
    Config = DenoiseConfig
    # Steps differ per item (each cohort keeps its own scheduler); the guidance scale is
    # applied per item. Whether guidance runs at all (two UNet rows per item) is the
    # recipe's choice, so a request may only change the scale on the recipe's side of 1.
    request_params = ("num_inference_steps", "guidance_scale")

    @classmethod
    def ports(cls, cfg: DenoiseConfig) -> tuple[tuple[Port, ...], tuple[Port, ...]]:
        m = cfg.model
        n, d = m.max_length, m.text_hidden
        return (
            (Port("embeds", "float32", ("B", n, d)), Port("uncond_embeds", "float32", ("B", n, d))),
            (Port("latents", "float32", _latent_shape(cfg)), *META_PORTS),
        )

    @classmethod
    def part_costs(cls, cfg: DenoiseConfig) -> list[float]:
        return unet_costs(cfg.model, cfg.height // cfg.model.vae_scale)

    @classmethod
    def check(cls, cfg: DenoiseConfig) -> list[tuple[str, str, str]]:
        out = _loop_checks(cfg)
        f = cfg.model.vae_scale
        for key in ("height", "width"):
            v = getattr(cfg, key)
            if v <= 0 or v % f:
                out.append((key, f"must be a positive multiple of {f} (the VAE's scale), got {v}", f"e.g. {key}={max(f, v - v % f)}"))
        if cfg.guidance_scale < 0:
            out.append(("guidance_scale", f"must be >= 0, got {cfg.guidance_scale}", "e.g. guidance_scale=7.5 (<= 1 turns guidance off)"))
        return out

    def _check_model(self, unet: Any) -> None:
        m = self.cfg.model
        if not hasattr(unet, "get_time_embed"):
            raise UserError("model.path", f"'{m.path}' has a {type(unet).__name__}, not a text-conditioned UNet2DConditionModel",
                            "use a Stable Diffusion pipeline here (unconditional UNets run in the ddpm_uncond recipe)")
        check_equal("model.latent_channels", m.latent_channels, unet.config.in_channels, "UNet")
        check_equal("model.text_hidden", m.text_hidden, unet.config.cross_attention_dim, "UNet (cross_attention_dim)")
        vae = component(m, "vae_config", None)
        check_equal("model.vae_scale", m.vae_scale, 2 ** (len(vae["block_out_channels"]) - 1), "VAE")

    def _rows_per_item(self, unet: Any) -> int:
        # As diffusers' do_classifier_free_guidance (time_cond_proj_dim is refused earlier).
        return 2 if self.cfg.guidance_scale > 1 else 1

    def _shape(self) -> tuple[int, ...]:
        m = self.cfg.model
        return (m.latent_channels, self.cfg.height // m.vae_scale, self.cfg.width // m.vae_scale)

    def _image_size(self) -> tuple[int, int]:
        return self.cfg.width, self.cfg.height  # the VAE's output, vae_scale times the latents

    def _guidance(self, m: ItemMeta) -> float | None:
        return float(self.param(m, "guidance_scale"))

    def _context(self, x: Batch, j: int) -> Any:
        import torch

        cond = x["embeds"][j].to(self.device, self.dtype)
        if self.k == 1:
            return cond[None]
        return torch.stack([x["uncond_embeds"][j].to(self.device, self.dtype), cond])

    def _guide(self, eps: Any, meta: list[ItemMeta]) -> Any:
        import torch

        scales = [float(self.param(m, "guidance_scale")) for m in meta]
        if self.k == 1:
            if any(g > 1 for g in scales):  # no unconditional row was run for these items
                raise UserError("params.guidance_scale", f"guidance_scale={max(scales)} needs classifier-free guidance, which this "
                                f"recipe turned off (guidance_scale={self.cfg.guidance_scale})", "start it with guidance_scale > 1")
            return eps[:, 0]
        uncond, text = eps[:, 0], eps[:, 1]
        if all(g == self.cfg.guidance_scale for g in scales):
            g: Any = self.cfg.guidance_scale  # the recipe's value: a Python float, as diffusers
        else:  # per item: the same arithmetic, one scale per row
            g = torch.tensor(scales, dtype=text.dtype, device=text.device).view(-1, *([1] * (text.ndim - 1)))
        noise = uncond + g * (text - uncond)
        r = self.cfg.guidance_rescale
        if r > 0:  # diffusers' rescale_noise_cfg, per item
            dims = list(range(1, text.ndim))
            rescaled = noise * (text.std(dim=dims, keepdim=True) / noise.std(dim=dims, keepdim=True))
            noise = r * rescaled + (1 - r) * noise
        return noise

    def _outputs(self, latents: Any, lanes: list[dict]) -> Batch:
        return {"latents": latents, **self._meta_outputs(lanes)}


@register
class DenoiseUncond(UNetLoop[UncondConfig]):
    """Unconditional denoising loop (UNet2DModel, DDPMPipeline layout) -> images in [0, 1]."""

    kind = "diffusion.denoise_uncond"
    description = "Seeded noise -> images with an unconditional UNet2DModel (DDPM/DDIM...)."
    Config = UncondConfig
    request_params = ("num_inference_steps",)

    @classmethod
    def ports(cls, cfg: UncondConfig) -> tuple[tuple[Port, ...], tuple[Port, ...]]:
        m = cfg.model
        return (), (Port("image", "float32", ("B", m.channels, m.sample_size, m.sample_size)),
                    *META_PORTS)

    @classmethod
    def part_costs(cls, cfg: UncondConfig) -> list[float]:
        return unet_costs(cfg.model, cfg.model.sample_size)

    @classmethod
    def check(cls, cfg: UncondConfig) -> list[tuple[str, str, str]]:
        return _loop_checks(cfg)

    def _check_model(self, unet: Any) -> None:
        m = self.cfg.model
        check_equal("model.channels", m.channels, unet.config.in_channels, "UNet")
        size = unet.config.sample_size
        check_equal("model.sample_size", m.sample_size, size if isinstance(size, int) else size[0], "UNet")

    def _shape(self) -> tuple[int, ...]:
        m = self.cfg.model
        return (m.channels, m.sample_size, m.sample_size)

    def _outputs(self, latents: Any, lanes: list[dict]) -> Batch:
        # DDPMPipeline's post-processing: [-1, 1] -> [0, 1].
        return {"image": (latents / 2 + 0.5).clamp(0, 1).float(), **self._meta_outputs(lanes)}


# ---------------------------------------------------------------------- VAE
@dataclass(kw_only=True)
class VaeConfig:
    model: SDModel = field(default_factory=SDModel)  # the model group (model=...)
    height: int = 64  # image height in pixels (as the denoise node's)
    width: int = 64  # image width in pixels (as the denoise node's)
    # A TAESD (AutoencoderTiny) directory or hub id: a fast approximate decoder (one part).
    taesd: str = ""


@register
class VaeDecode(NodeKind[VaeConfig]):
    """The VAE decoder; parts: (scale, post_quant_conv, conv_in, mid block), then each up block."""

    kind = "diffusion.vae_decode"
    description = "Latents -> images in [0, 1] (AutoencoderKL, or TAESD with taesd=PATH)."
    Config = VaeConfig
    splittable = True

    @classmethod
    def ports(cls, cfg: VaeConfig) -> tuple[tuple[Port, ...], tuple[Port, ...]]:
        return (
            (Port("latents", "float32", _latent_shape(cfg)),),
            (Port("image", "float32", ("B", 3, cfg.height, cfg.width)),),
        )

    @classmethod
    def num_parts(cls, cfg: VaeConfig) -> int:
        return 1 if cfg.taesd else 1 + cfg.model.vae_up_blocks

    @classmethod
    def part_costs(cls, cfg: VaeConfig) -> list[float]:
        n = cls.num_parts(cfg)
        # Up blocks work at growing resolution: each costs about 4x the one before.
        return [1.0] + [float(4**i) for i in range(n - 1)] if n > 1 else [1.0]

    def setup(self, device: Any, dtype: Any = None) -> None:
        import torch

        self.device = torch.device(device)
        m = self.cfg.model
        self.dtype = torch_dtype(m, dtype)
        if self.cfg.taesd:
            self.vae = standalone(self.cfg.taesd, "AutoencoderTiny", self.dtype).to(self.device)
            self.scale = float(self.vae.config.scaling_factor)
            return
        vae = component(m, "vae", self.dtype)
        dec = vae.decoder
        check_equal("model.vae_up_blocks", m.vae_up_blocks, len(dec.up_blocks), "VAE")
        check_equal("model.latent_channels", m.latent_channels, vae.config.latent_channels, "VAE")
        self.scale = float(vae.config.scaling_factor)
        mods: list[Any] = []
        if self.is_first:
            self.post_quant_conv, self.conv_in, self.mid = vae.post_quant_conv, dec.conv_in, dec.mid_block
            mods += [self.post_quant_conv, self.conv_in, self.mid]
        self.ups = [dec.up_blocks[p - 1] for p in self.parts if p > 0]
        mods += self.ups
        if self.is_last:
            self.norm, self.act, self.conv_out = dec.conv_norm_out, dec.conv_act, dec.conv_out
            mods += [self.norm, self.act, self.conv_out]
        for mod in mods:
            if mod is not None:
                mod.to(self.device)

    def forward(self, x: Batch, meta: list[ItemMeta]) -> Batch:
        import torch

        with torch.inference_mode():
            if self.cfg.taesd:
                img = self.vae.decode(x["latents"].to(self.dtype) / self.scale, return_dict=False)[0]
                return {"image": (img * 0.5 + 0.5).clamp(0, 1).float()}
            if self.is_first:
                z = x["latents"].to(self.dtype) / self.scale  # as StableDiffusionPipeline
                if self.post_quant_conv is not None:
                    z = self.post_quant_conv(z)
                h = self.mid(self.conv_in(z), None)
            else:
                h = x["h"]
            for up in self.ups:
                h = up(h, None)
            if not self.is_last:
                return {"h": h}
            h = self.conv_out(self.act(self.norm(h)))
            # VaeImageProcessor.denormalize: [-1, 1] -> [0, 1], exactly.
            return {"image": (h * 0.5 + 0.5).clamp(0, 1).float()}


# ---------------------------------------------------------------------- source
@dataclass(kw_only=True)
class SeedsConfig:
    count: int = 4  # how many images
    seed: int = 0  # request n gets seed + n


@register
class Seeds(SourceKind[SeedsConfig]):
    """``count`` requests with seeds ``seed``, ``seed+1``, ... (unconditional generation)."""

    kind = "diffusion.seeds"
    description = "One request per seed, for unconditional image generation."
    Config = SeedsConfig
    fields = ("seed",)

    @classmethod
    def check(cls, cfg: SeedsConfig) -> list[tuple[str, str, str]]:
        if cfg.count <= 0:
            return [("count", f"must be positive, got {cfg.count}", "e.g. images=4")]
        return []

    @classmethod
    def requests(cls, cfg: SeedsConfig) -> list[Request]:
        out = []
        for n in range(cfg.count):
            s = cfg.seed + n
            out.append(Request(id=f"{n:04d}", values={"seed": s}, input={"seed": s}, params={"seed": s}))
        return out
