"""Shared helpers of the image family (text, diffusion, image kinds).

``SDModel``/``DDPMModel`` declare a model's sizes (read by the compiler, no
weights); ``component`` loads one pipeline component (tokenizer, text encoder,
UNet, VAE) once per process, keyed by path, component and dtype, so that the
pieces of a split node share one copy; ``make_scheduler`` builds any diffusers
scheduler by name from the model's own scheduler config.

torch, diffusers and transformers are imported inside functions: importing
this module stays cheap for ``mmpipe validate``/``plan``.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from mmpipe.graphs.base import UserError

log = logging.getLogger("mmpipe.image")

NOISE_NOTE = ("random weights: makes NOISE images, not pictures; real images need real weights "
              "(model.path=<diffusers directory or hub id>; for sd_txt2img: model=sd15)")


@dataclass(kw_only=True)
class SDModel:
    """Which Stable Diffusion-family weights to load, and their sizes (checked at load)."""

    name: str = "tiny_random"  # the model group option's name
    # A local diffusers directory, a hub id, or ``builtin:NAME`` (built offline, seeded).
    path: str = "builtin:tiny_random"
    note: str = ""  # printed once when the model loads
    text_hidden: int = 32  # CLIP hidden size
    max_length: int = 77  # CLIP tokens per prompt
    latent_channels: int = 4  # UNet latent channels
    vae_scale: int = 8  # pixels per latent cell
    unet_down_blocks: int = 2  # UNet down blocks
    unet_up_blocks: int = 2  # UNet up blocks (with the mid block: the UNet's parts)
    # UNet block widths and which down blocks have attention: only used for the
    # stage-balancing cost estimate (``unet_costs`` overrides it when given).
    unet_channels: list[int] = field(default_factory=lambda: [32, 64])
    unet_attention: list[bool] = field(default_factory=lambda: [False, True])  # down blocks with attention
    unet_costs: list[float] = field(default_factory=list)  # relative cost per part (overrides the estimate)
    vae_up_blocks: int = 2  # VAE decoder up blocks (the VAE's parts)
    # The scheduler's training timesteps (checked at load): no scheduler can take more
    # inference steps than this, so validate can say so before any weights load.
    num_train_timesteps: int = 1000
    # "auto" follows runtime.dtype; float16/bfloat16 for GPUs.
    dtype: str = "auto"


@dataclass(kw_only=True)
class DDPMModel:
    """An unconditional pixel-space UNet2DModel pipeline (DDPMPipeline layout)."""

    name: str = "tiny_ddpm"  # the model group option's name
    path: str = "builtin:tiny_ddpm"  # a local diffusers directory, a hub id, or builtin:NAME
    note: str = ""  # printed once when the model loads
    channels: int = 3  # image channels
    sample_size: int = 32  # image side in pixels
    unet_down_blocks: int = 2  # UNet down blocks
    unet_up_blocks: int = 2  # UNet up blocks
    unet_channels: list[int] = field(default_factory=lambda: [32, 64])  # UNet block widths (cost estimate only)
    unet_attention: list[bool] = field(default_factory=lambda: [False, True])  # down blocks with attention (cost estimate only)
    unet_costs: list[float] = field(default_factory=list)  # relative cost per part (overrides the estimate)
    num_train_timesteps: int = 1000  # as SDModel's
    dtype: str = "auto"  # "auto" follows runtime.dtype


# ------------------------------------------------------------------ paths
_NOTED: set[str] = set()


def resolve_path(model: Any) -> str:
    """``builtin:NAME`` -> the offline model's cache directory (built on first use);
    an existing local directory as is; anything else is taken as a hub id."""
    path = str(model.path)
    if path.startswith("builtin:"):
        from mmpipe.graphs.diffusion_models import MODEL_NAMES, ensure_model

        name = path.split(":", 1)[1]
        if name not in MODEL_NAMES:
            raise UserError("model.path", f"unknown builtin model '{name}'", f"use one of: {', '.join('builtin:' + n for n in sorted(MODEL_NAMES))}")
        if path not in _NOTED:  # say it once per process, on stderr
            _NOTED.add(path)
            log.warning("mmpipe: model %s has %s", name, NOISE_NOTE)
        return str(ensure_model(name))
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / "model_index.json").is_file():
            raise UserError("model.path", f"'{path}' is not a diffusers pipeline directory (no model_index.json)",
                            "point model.path at a directory saved with save_pretrained (unet/, vae/, text_encoder/, ...)")
        return str(p)
    if path.startswith(("/", ".", "~")) or path.count("/") != 1:
        raise UserError("model.path", f"model directory '{path}' does not exist",
                        "give an existing diffusers directory, a hub id (org/name), or builtin:tiny_random")
    return path  # a hub id: from_pretrained fetches (or finds it in the HF cache)


def _index(path: str) -> dict[str, Any]:
    """The pipeline's model_index.json (local, or fetched from the hub)."""
    local = Path(path) / "model_index.json"
    if not local.is_file():
        from huggingface_hub import hf_hub_download

        local = Path(hf_hub_download(path, "model_index.json"))
    return json.loads(local.read_text())


# ------------------------------------------------------------------ components
_CACHE: dict[tuple[str, str, str], Any] = {}
_LOCK = threading.Lock()


def torch_dtype(model: Any, runtime_dtype: Any) -> Any:
    """The dtype to load in: the model group's, or the runtime's when it says auto."""
    import torch

    if model.dtype in ("auto", "", None):
        return runtime_dtype if runtime_dtype is not None else torch.float32
    return getattr(torch, model.dtype)


def component(model: Any, name: str, dtype: Any) -> Any:
    """Load pipeline component ``name`` once per process (CPU; pieces move their own blocks)."""
    path = resolve_path(model)
    key = (path, name, str(dtype))
    with _LOCK:
        if key not in _CACHE:
            _CACHE[key] = _load(path, name, dtype)
        return _CACHE[key]


def standalone(path: str, cls_name: str, dtype: Any) -> Any:
    """A model saved on its own (e.g. a TAESD ``AutoencoderTiny``), cached like components."""
    p = Path(path).expanduser()
    src = str(p) if p.is_dir() else path
    key = (src, cls_name, str(dtype))
    with _LOCK:
        if key not in _CACHE:
            import diffusers

            try:
                with _quiet():
                    model = getattr(diffusers, cls_name).from_pretrained(src, torch_dtype=dtype, use_safetensors=True)
                _CACHE[key] = model.eval().requires_grad_(False)
            except (OSError, ValueError) as exc:
                raise UserError("taesd", f"cannot load {cls_name} from '{path}': {exc}", "give a local AutoencoderTiny directory (hub ids need internet)") from exc
        return _CACHE[key]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Hide diffusers'/transformers' loading chatter (progress bars, 'install accelerate')."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    saved = (dlog.get_verbosity(), tlog.get_verbosity(), tlog.is_progress_bar_enabled(), dlog.is_progress_bar_enabled())
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    dlog.disable_progress_bar()
    try:
        yield
    finally:
        dlog.set_verbosity(saved[0])
        tlog.set_verbosity(saved[1])
        if saved[2]:
            tlog.enable_progress_bar()
        if saved[3]:
            dlog.enable_progress_bar()


def _load(path: str, name: str, dtype: Any) -> Any:
    with _quiet():
        return _load_component(path, name, dtype)


def _load_component(path: str, name: str, dtype: Any) -> Any:
    """``name`` from the pipeline at ``path`` (``NAME_config``: its config dict, no weights)."""
    base = name.removesuffix("_config")
    try:
        index = _index(path)
        if base not in index or not index[base][0]:
            raise UserError("model.path", f"'{path}' has no '{base}' component", "use a Stable Diffusion 1.x/2.x (or DDPM) pipeline directory")
        lib, cls_name = index[base]
        cls = getattr(__import__(lib, fromlist=[cls_name]), cls_name)
        if name != base:
            return dict(cls.load_config(path, subfolder=base))
        if base in ("tokenizer", "scheduler"):
            return cls.from_pretrained(path, subfolder=base)
        # transformers 5 names the argument dtype; diffusers models still take torch_dtype
        kw = {"dtype": dtype} if lib == "transformers" else {"torch_dtype": dtype}
        return cls.from_pretrained(path, subfolder=base, use_safetensors=True, **kw).eval().requires_grad_(False)
    except UserError:
        raise
    except _load_errors() as exc:  # missing files, damaged weights, offline or unknown hub id, no safetensors
        from mmpipe.graphs.model_store import damaged_fix

        fix = "pass model.path=<local diffusers directory with safetensors weights> (hub ids need internet)"
        if Path(path).is_dir() and any((Path(path) / base).glob("*.safetensors")):
            fix = damaged_fix(Path(path) / base, f"the pipeline's {base}")  # the files are there, so they are damaged
        raise UserError("model.path", f"cannot load '{base}' from '{path}': {str(exc).strip()}", fix) from exc


def _load_errors() -> tuple[type[BaseException], ...]:
    """What a bad path or hub id raises while loading (not our own bugs)."""
    from huggingface_hub.errors import HfHubHTTPError

    return (OSError, ValueError, HfHubHTTPError)


def clear_cache() -> None:
    """Drop every loaded component (tests; freeing memory)."""
    with _LOCK:
        _CACHE.clear()


# ------------------------------------------------------------------ schedulers
# Short names -> (diffusers class, config overrides). Any other name ending in
# "Scheduler" is looked up in diffusers as a class.
SCHEDULER_ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


def scheduler_problem(name: str) -> str | None:
    """A message when ``name`` cannot name a scheduler (no diffusers import)."""
    if name == "default" or name in SCHEDULER_ALIASES or name.endswith("Scheduler"):
        return None
    return f"unknown scheduler {name!r}"


def make_scheduler(model: Any, name: str) -> Any:
    """A fresh scheduler ``name`` built from the model's own scheduler config."""
    base = component(model, "scheduler", None)
    if name == "default":
        return copy.deepcopy(base)
    cls_name, extra = SCHEDULER_ALIASES.get(name, (name, {}))
    import diffusers

    cls = getattr(diffusers, cls_name, None)
    if cls is None or not hasattr(cls, "from_config"):
        raise UserError("scheduler", f"diffusers has no scheduler {cls_name!r}",
                        f"use one of default, {', '.join(SCHEDULER_ALIASES)} or a diffusers scheduler class name")
    try:
        return cls.from_config(base.config, **extra)
    except ImportError as exc:  # e.g. LMS needs scipy
        raise UserError("scheduler", f"scheduler {cls_name} cannot be used here: {exc}", "install what it names, or pick another scheduler") from exc


def check_equal(key: str, declared: Any, actual: Any, what: str) -> None:
    """Raise a UserError when the model group's declaration disagrees with the weights."""
    if declared != actual:
        raise UserError(key, f"the model group says {key.split('.')[-1]}={declared}, but the loaded {what} has {actual}",
                        f"set {key}={actual} (or use a model group that matches these weights)")
