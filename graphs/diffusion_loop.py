"""The denoising loop shared by ``diffusion.denoise`` and ``diffusion.denoise_uncond``.

Per item, as diffusers does it for one prompt: the initial noise comes from the
item's own ``torch.Generator().manual_seed(seed)`` (``prepare_latents``) and step
noise (DDPM, Euler ancestral...) from that same generator. The last piece owns
the scheduler state: items that entered the loop together and share a schedule
form a *cohort* (``Cohort``, referenced from each member's lane) with one
scheduler object, one latents tensor and one batched ``scheduler.step`` per
iteration, as diffusers' batched call steps its batch (with one generator per
row). A cohort is per piece, never travels, and follows its members: one that
leaves (finished, failed, dropped) takes its row out of the cohort's state;
members that come back in different groups split it. The first piece's
``begin`` draws the same noise from the seed to make the first model input, so
latents never travel: the carry between iterations is only ``x`` (the next
model input, already scaled by the item's scheduler in ``end``) and ``t`` (one
timestep per item), which is what lets items at different timesteps share one
UNet call (continuous batching). Between pieces the carry holds ``h``, ``emb``
and ``res<i>`` (down-block residuals) as ``[B, k, ...]``: k = 2 rows per item
(uncond, cond) with guidance.
"""
from __future__ import annotations

import copy
import inspect
import itertools
from typing import Any, Callable, Protocol, TypeVar

from mmpipe.graphs.base import Batch, ItemMeta, LoopKind
from mmpipe.graphs.diffusion_load import check_equal, component, make_scheduler, torch_dtype

# Called as fn(request_id, steps_done, steps_total) after every denoising step of
# every item (from the loop's last stage thread): a hook for per-step progress bars.
StepCallback = Callable[[str, int, int], None]
_on_step: StepCallback | None = None

# Schedulers whose ``step`` treats each row on its own (row-wise maths with shared
# scalars; step noise from ``randn_tensor``, which draws row r from generator r of a
# list) and keep per-sample state only as latents-shaped tensors: a batch of them
# steps exactly as each item alone, so a cohort shares one. Any other scheduler (an
# SDE one with a Brownian tree over the whole batch...) steps each item alone.
BATCHED_SCHEDULERS = frozenset({
    "DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
    "UniPCMultistepScheduler", "DEISMultistepScheduler", "HeunDiscreteScheduler", "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler", "LCMScheduler", "TCDScheduler", "EDMEulerScheduler",
    "EDMDPMSolverMultistepScheduler", "SASolverScheduler",
})
# Contexts of this many recent item groups are kept per piece (groups alternate in a piece).
CTX_CACHE = 4


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


def select_state(sched: Any, rows: list[int], shape: tuple[int, ...]) -> None:
    """Keep ``rows`` of a scheduler's per-sample state, in place: every attribute that is a
    tensor shaped like the cohort's latents (``shape``), alone or in a list/tuple
    (DPM-Solver's ``model_outputs``, PNDM's ``ets``, LMS's ``derivatives``...)."""
    import torch

    index: dict[Any, Any] = {}

    def sel(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and tuple(v.shape) == shape:
            if v.device not in index:
                index[v.device] = torch.as_tensor(rows, dtype=torch.long, device=v.device)
            return v.index_select(0, index[v.device])
        if isinstance(v, (list, tuple)):
            return type(v)(sel(e) for e in v)
        return v

    for name, value in list(vars(sched).items()):
        setattr(sched, name, sel(value))


class Cohort:
    """Items of one (last) piece that entered together and share a schedule.

    One scheduler, latents ``[n, C, H, W]`` with rows in ``uids`` order, one batched
    ``step`` per iteration; each row keeps its own generator.
    """

    def __init__(self, sched: Any, uids: list[int], latents: Any, gens: list[Any]) -> None:
        self.sched, self.uids, self.latents, self.gens = sched, uids, latents, gens
        self.i = 0  # steps done

    @property
    def total(self) -> int:
        return len(self.sched.timesteps)

    def keep(self, rows: list[int]) -> None:
        """Only ``rows`` stay (in that order): members left, or the cohort was split."""
        select_state(self.sched, rows, tuple(self.latents.shape))
        self.latents = self.latents[rows]
        self.uids, self.gens = [self.uids[r] for r in rows], [self.gens[r] for r in rows]

    def take(self, rows: list[int]) -> "Cohort":
        """A new cohort of ``rows`` with its own copy of the scheduler (generators are shared:
        each is one item's own stream); this one keeps the other rows."""
        other = copy.copy(self)
        other.sched = copy.deepcopy(self.sched)
        other.keep(rows)
        taken = set(rows)
        self.keep([r for r in range(len(self.uids)) if r not in taken])
        return other

    def step(self, noise: Any, eta: float | None, with_gen: bool) -> tuple[Any, Any, bool]:
        """One scheduler step of every row: (next model input, its timestep, finished)."""
        s = self.sched
        kw: dict[str, Any] = {}
        if eta is not None:
            kw["eta"] = eta
        if with_gen:  # a list: row r draws from member r's generator (randn_tensor)
            kw["generator"] = self.gens if len(self.gens) > 1 else self.gens[0]
        lat = s.step(noise, s.timesteps[self.i], self.latents, **kw, return_dict=False)[0]
        self.latents, self.i = lat, self.i + 1
        if self.i >= self.total:
            return lat, s.timesteps[-1], True
        t = s.timesteps[self.i]
        return s.scale_model_input(lat, t), t, False  # the next model input, scaled by this schedule


class UNetLoopConfig(Protocol):
    """What the shared loop reads of its kinds' configs (DenoiseConfig, UncondConfig)."""

    model: Any
    scheduler: str
    num_inference_steps: int
    eta: float
    channels_last: bool


CU = TypeVar("CU", bound=UNetLoopConfig)


class UNetLoop(LoopKind[CU]):
    """What both denoising loops share: setup, per-item lanes, the UNet pass, cohort steps."""

    splittable = True

    @classmethod
    def num_parts(cls, cfg: CU) -> int:
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
        check_equal("model.num_train_timesteps", m.num_train_timesteps, self.sched.config.num_train_timesteps, "scheduler")
        self.sched.set_timesteps(self.cfg.num_inference_steps, device=self.device)
        self._templates = {self.cfg.num_inference_steps: self.sched}
        params = set(inspect.signature(self.sched.step).parameters)
        self.takes_eta, self.takes_gen = "eta" in params, "generator" in params
        self.batch_steps = type(self.sched).__name__ in BATCHED_SCHEDULERS
        self.k = self._rows_per_item(unet)
        self._uid = itertools.count()
        self._ctx: dict[tuple[int, ...], Any] = {}

    def _check_model(self, unet: Any) -> None:
        """Kind-specific checks of the loaded UNet against the model group."""

    def _rows_per_item(self, unet: Any) -> int:
        return 1

    def _shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def _seed(self, m: ItemMeta) -> int:
        return int(m.params.get("seed", getattr(self, "seed", 0)))

    def _steps(self, m: ItemMeta) -> int:
        """The item's number of denoising steps: items share a cohort only when these agree."""
        return int(self.param(m, "num_inference_steps"))

    def _template(self, steps: int) -> Any:
        """A scheduler set to ``steps`` timesteps, copied per cohort (never stepped itself)."""
        if steps not in self._templates:
            s = make_scheduler(self.cfg.model, self.cfg.scheduler)
            s.set_timesteps(steps, device=self.device)
            self._templates[steps] = s
        return self._templates[steps]

    def _noise(self, m: ItemMeta) -> tuple[Any, Any]:
        """The item's generator and initial latents, drawn as diffusers' prepare_latents does."""
        import torch
        from diffusers.utils.torch_utils import randn_tensor

        g = torch.Generator("cpu").manual_seed(self._seed(m))
        lat = randn_tensor((1, *self._shape()), generator=g, device=self.device, dtype=self.dtype)
        return g, lat * self._template(self._steps(m)).init_noise_sigma

    # ------------------------------------------------------------ loop
    def begin(self, x: Batch, meta: list[ItemMeta]) -> Batch:
        import torch

        with torch.inference_mode():
            groups = _by_key(meta, self._steps)
            xs, ts = [], []
            for steps, rows in groups.items():
                lat = torch.cat([self._noise(meta[j])[1] for j in rows])
                s = copy.deepcopy(self._template(steps))  # scale_model_input may set a step index
                t0 = s.timesteps[0]
                xs.append(s.scale_model_input(lat, t0))
                ts.append(t0.reshape(1).repeat(len(rows)))
            order = list(groups.values())
            return {"x": _in_order(xs, order), "t": _in_order(ts, order)}

    def enter(self, x: Batch, meta: list[ItemMeta], lanes: list[dict]) -> None:
        import torch

        with torch.inference_mode():
            for j, lane in enumerate(lanes):
                lane["uid"] = next(self._uid)
                if self.is_last:
                    lane["seed"], lane["steps"] = self._seed(meta[j]), self._steps(meta[j])
                    lane["info"] = self._info(meta[j], lane["seed"], lane["steps"])
                if self.unet.cross:
                    lane["ctx"] = self._context(x, j)
            if self.is_last:
                self._form_cohorts(meta, lanes)

    def _form_cohorts(self, meta: list[ItemMeta], lanes: list[dict]) -> None:
        """Newcomers with the same schedule share a cohort (each its own, if the scheduler
        cannot step a batch as it steps single items); noise drawn again from the seeds."""
        import torch

        groups = list(_by_key(meta, self._steps).values()) if self.batch_steps else [[j] for j in range(len(meta))]
        for rows in groups:
            drawn = [self._noise(meta[j]) for j in rows]
            c = Cohort(copy.deepcopy(self._template(lanes[rows[0]]["steps"])), [lanes[j]["uid"] for j in rows],
                       torch.cat([lat for _, lat in drawn]), [g for g, _ in drawn])
            for j in rows:
                lanes[j]["cohort"] = c

    def _context(self, x: Batch, j: int) -> Any:
        raise NotImplementedError

    def _batched_ctx(self, lanes: list[dict]) -> Any:
        """Cross-attention context of these items, [B*k, T, D]; kept for the last few item
        groups, since the groups in flight take turns in this piece."""
        import torch

        key = tuple(lane["uid"] for lane in lanes)
        ctx = self._ctx.pop(key, None)
        if ctx is None:
            ctx = torch.cat([lane["ctx"] for lane in lanes]) if len(lanes) > 1 else lanes[0]["ctx"]
            while len(self._ctx) >= CTX_CACHE:
                self._ctx.pop(next(iter(self._ctx)))
        self._ctx[key] = ctx  # most recent last
        return ctx

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

    def _guide(self, eps: Any, meta: list[ItemMeta]) -> Any:
        """[B, k, C, H, W] model output -> [B, C, H, W] noise prediction (``meta``: per-item values)."""
        return eps[:, 0]

    def _cohorts(self, lanes: list[dict]) -> list[tuple[Cohort, list[int]]]:
        """The cohorts of this call and the call rows of each, in cohort row order. A cohort
        whose rows came back in a different order is reordered; one only partly here (its
        other members are in another group) is split, so every cohort steps whole."""
        found: dict[int, tuple[Cohort, list[int]]] = {}
        for j, lane in enumerate(lanes):
            found.setdefault(id(lane["cohort"]), (lane["cohort"], []))[1].append(j)
        out = []
        for c, pos in found.values():
            at = {uid: r for r, uid in enumerate(c.uids)}
            rows = [at[lanes[j]["uid"]] for j in pos]
            if len(rows) < len(c.uids):
                c = c.take(rows)
                for j in pos:
                    lanes[j]["cohort"] = c
            elif rows != list(range(len(rows))):
                c.keep(rows)
            out.append((c, pos))
        return out

    def end(self, carry: Batch, meta: list[ItemMeta], lanes: list[dict]) -> tuple[Batch, list[bool], Batch]:
        import torch

        with torch.inference_mode():
            noise = self._guide(carry["eps"], meta)
            b = len(lanes)
            eta = self.cfg.eta if self.takes_eta else None
            xs, ts, lats, order, done = [], [], [], [], [False] * b
            progress: list[Any] = [None] * b  # per item, to its submitter's on_progress (step bars, servers)
            hook = _on_step
            for c, pos in self._cohorts(lanes):
                whole = len(pos) == b  # the usual case: one cohort, the whole call, in order
                x, t, finished = c.step(noise if whole else noise[pos], eta, self.takes_gen)
                xs.append(x)
                ts.append(t.reshape(1).repeat(len(pos)))
                lats.append(c.latents)
                order.append(pos)
                for j in pos:
                    done[j] = finished
                    progress[j] = {"step": c.i, "steps": c.total}
                if hook is not None:
                    for j in pos:
                        hook(meta[j].request_id, c.i, c.total)
            outs: Batch = {"_progress": progress}
            if any(done):  # the runtime reads the outputs of finished items only
                outs.update(self._outputs(_in_order(lats, order), lanes))
            return {"x": _in_order(xs, order), "t": _in_order(ts, order)}, done, outs

    def _outputs(self, latents: Any, lanes: list[dict]) -> Batch:
        raise NotImplementedError

    def _meta_outputs(self, lanes: list[dict]) -> Batch:
        infos = [lane["info"] for lane in lanes]
        return {"seed": [lane["seed"] for lane in lanes], "steps": [lane["steps"] for lane in lanes],
                **{k: [i[k] for i in infos] for k in ("guidance", "scheduler", "size")}, "info": infos}

    def _info(self, m: ItemMeta, seed: int, steps: int) -> dict[str, Any]:
        """The item's generation parameters, as SD tools record them with an image."""
        w, h = self._image_size()
        model = self.cfg.model
        return {"seed": seed, "steps": steps, "guidance": self._guidance(m), "scheduler": type(self._template(steps)).__name__,
                "size": f"{w}x{h}", "model": model.name if model.path.startswith("builtin:") else model.path}

    def _image_size(self) -> tuple[int, int]:
        """(width, height) of the image this loop makes (default: the sample's own size)."""
        h, w = self._shape()[-2:]
        return w, h

    def _guidance(self, m: ItemMeta) -> float | None:
        """The item's guidance scale (None: this loop has no guidance)."""
        return None

    def finish(self, lanes: list[dict]) -> None:
        gone: dict[int, tuple[Cohort, set[int]]] = {}
        for lane in lanes:
            c = lane.get("cohort")
            if c is not None:
                gone.setdefault(id(c), (c, set()))[1].add(lane["uid"])
        for c, uids in gone.values():
            stay = [r for r, uid in enumerate(c.uids) if uid not in uids]
            if stay and len(stay) < len(c.uids):  # members left early (a failure): drop their rows
                c.keep(stay)
        left = {lane.get("uid") for lane in lanes}
        for key in [k for k in self._ctx if left.intersection(k)]:
            del self._ctx[key]


def _by_key(meta: list[ItemMeta], key: Callable[[ItemMeta], Any]) -> dict[Any, list[int]]:
    """Row indices of ``meta`` grouped by ``key`` (first-seen order)."""
    out: dict[Any, list[int]] = {}
    for j, m in enumerate(meta):
        out.setdefault(key(m), []).append(j)
    return out


def _in_order(parts: list[Any], order: list[list[int]]) -> Any:
    """Tensors holding rows ``order[i]`` of a batch -> the batch in row order (no copy for one part in order)."""
    import torch

    if len(parts) == 1 and order[0] == list(range(len(order[0]))):
        return parts[0]
    flat_order = [j for pos in order for j in pos]
    out = torch.cat(parts)
    if flat_order == list(range(len(flat_order))):
        return out
    inv = [0] * len(flat_order)
    for k, j in enumerate(flat_order):
        inv[j] = k
    return out[torch.as_tensor(inv, dtype=torch.long, device=out.device)]
