"""The Python API: compile a recipe and run requests, without the CLI.

    from mmpipe.api import compile, open_pipeline, requests_of
    plan = compile("synthetic", ["stages=2"])
    with open_pipeline(plan) as pipe:
        results = pipe.run(requests_of(plan))
"""
from __future__ import annotations

import atexit
import builtins
import weakref
from pathlib import Path
from typing import Any

from mmpipe.dsl.compile import compile_loaded, compile_recipe
from mmpipe.dsl.load import Loaded, Provenance
from mmpipe.dsl.plan import Plan
from mmpipe.graphs import get_source
from mmpipe.graphs.base import Request, SourceError, make_config


def compile(recipe: str | Path | Any, overrides: builtins.list[str] | None = None) -> Plan:  # noqa: A001
    """A plan from a recipe name, a .yaml path, or an OmegaConf DictConfig."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(recipe, DictConfig):
        cfg: Any = recipe  # only read: the plan is plain data (a copy cost a fifth of a compile)
        if overrides:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        loaded = Loaded(cfg=cfg, path=Path("<DictConfig>"), overrides=list(overrides or []), provenance=Provenance(recipe_file="<DictConfig>"), choices={})
        return compile_loaded(loaded)
    return compile_recipe(str(recipe), list(overrides or []))


def source_config(plan: Plan) -> Any:
    """The typed config of the plan's request source."""
    if plan.source is None:
        raise SourceError("source", f"recipe '{plan.recipe}' has no source", "pass requests explicitly")
    cls = get_source(plan.source["kind"])
    assert cls is not None, "the compiler checked the source kind"
    return make_config(cls.Config, plan.source["params"])


def requests_of(plan: Plan) -> list[Request]:
    """The requests the recipe's source makes (``input=``, ``prompt=``, ``requests=``)."""
    cls = get_source(plan.source["kind"]) if plan.source else None
    if cls is None:
        raise SourceError("source", f"recipe '{plan.recipe}' has no source", "pass requests explicitly")
    return cls.requests(source_config(plan))


def open_pipeline(plan: Plan, output_dir: str | None = None, backend: str | None = None) -> Any:
    """A started executor for ``plan``: ``run``, ``submit``/``stream`` (threads), ``close``."""
    from mmpipe.runtime import make_executor

    return make_executor(plan, output_dir if output_dir is not None else plan.output_dir, backend).start()


def run(recipe: str | Path | Any, overrides: builtins.list[str] | None = None, requests: builtins.list[Request] | None = None) -> builtins.list[Any]:
    """Compile, run every request (the source's by default) and return the results."""
    plan = compile(recipe, overrides)
    reqs = requests if requests is not None else requests_of(plan)
    ex = open_pipeline(plan)
    try:
        results: builtins.list[Any] = ex.run(reqs)
        return results
    finally:
        ex.close()


# ------------------------------------------------------------------ one-call pipelines
def override_list(overrides: dict[str, Any]) -> builtins.list[str]:
    """``{"beam_size": 1, "nodes.encoder.split": 2}`` -> Hydra overrides (strings stay free text)."""

    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if v is None:
            return "null"
        if isinstance(v, (builtins.list, tuple)):
            return "[" + ",".join(fmt(x) for x in v) + "]"
        return str(v)

    return [f"{k}={fmt(v)}" for k, v in overrides.items()]


def as_audio(audio: Any, sample_rate: int | None = None) -> Any:
    """A request's audio value from a path, a numpy array or torch tensor (with
    ``sample_rate``), encoded bytes, or a binary file object (its own rate)."""
    from mmpipe.graphs.audio import AudioError, Waveform, decode_audio
    from mmpipe.graphs.base import UserError

    if isinstance(audio, (str, Path)):
        return str(audio)
    if isinstance(audio, (bytes, bytearray, memoryview)) or hasattr(audio, "read"):
        # Decoded by the same code as files, so bytes get the same checks and diagnoses.
        name = getattr(audio, "name", None)
        name = name if isinstance(name, str) else "<audio bytes>"
        raw = audio.read() if hasattr(audio, "read") else bytes(audio)  # from where it stands, as soundfile read it
        if not isinstance(raw, (bytes, bytearray)):
            raise UserError("audio", f"the file object {name} gave {type(raw).__name__}, not bytes", "open it in binary mode: open(path, 'rb')")
        try:
            samples, sr = decode_audio(bytes(raw), name)
        except AudioError as exc:
            raise UserError("audio", str(exc), "pass WAV/FLAC/OGG/MP3 bytes with finite samples, or an array with sample_rate=") from None
        return Waveform(samples.T.contiguous(), sr)
    if type(audio).__module__ in ("numpy", "torch"):
        import numpy as np
        import torch

        if sample_rate is None:
            raise UserError("sample_rate", "an audio array needs its sample rate", "call pipe(audio, sample_rate=16000)")
        t = torch.as_tensor(audio)
        if not t.is_floating_point():  # PCM integers -> [-1, 1], as soundfile reads them
            t = t.float() / float(np.iinfo(np.dtype(str(t.dtype).replace("torch.", ""))).max + 1)
        return Waveform(t.detach().cpu().float(), int(sample_rate))
    raise UserError("audio", f"cannot read audio from a {type(audio).__name__}",
                    "pass a path, a numpy array or torch tensor with sample_rate=, bytes, or a binary file object")


# Pipelines started by RecipePipeline calls and not closed yet: closed at interpreter exit,
# because worker threads still inside torch while Python finalizes can abort the process
# ("terminate called without an active exception").
_OPEN: "weakref.WeakSet[RecipePipeline]" = weakref.WeakSet()


@atexit.register
def _close_open_pipelines() -> None:
    for p in builtins.list(_OPEN):
        p.close()


class RecipePipeline:
    """A recipe as a callable, shaped like a Hugging Face pipeline: models load once (on
    the first call), each call runs its inputs as requests. See :func:`pipeline`."""

    def __init__(self, recipe: str | Path, overrides: dict[str, Any] | None = None) -> None:
        self.plan = compile(recipe, override_list(overrides or {}))
        self.inputs = {name: spec.get("type") for name, spec in (self.plan.inputs or {}).items()}
        self._ex: Any = None
        self._count = 0  # request ids run on across calls, so image files never overwrite each other

    def _id(self) -> str:
        self._count += 1
        return f"{self._count - 1:04d}"

    def __call__(self, inputs: Any, sample_rate: int | None = None, **params: Any) -> Any:
        """One input -> one result dict (a list if it makes several, e.g.
        ``num_images_per_prompt=2``); a list of inputs -> a list of result dicts.
        ``params``: the source's fields (``negative_prompt``, ``seed``, ...) and the
        per-request values node kinds accept (``mmpipe ls KIND``: "per request")."""
        single = not isinstance(inputs, builtins.list)
        reqs = self.requests(builtins.list(inputs) if not single else [inputs], sample_rate, params)
        if self._ex is None:
            self._ex = open_pipeline(self.plan)
            _OPEN.add(self)
        out = [self._result(r) for r in self._ex.run(reqs)]
        return out[0] if single and len(out) == 1 else out

    def requests(self, items: builtins.list[Any], sample_rate: int | None, params: dict[str, Any]) -> builtins.list[Request]:
        """Requests for ``items``: audio converted in memory, text through the recipe's source."""
        import dataclasses

        if "audio" in self.inputs.values():
            field = next(k for k, v in self.inputs.items() if v == "audio")
            reqs = []
            for item in items:
                value = as_audio(item, sample_rate)
                reqs.append(Request(id=self._id(), values={field: value}, input={field: str(value), **params}, params=dict(params)))
            return reqs
        cfg = source_config(self.plan)
        known = {f.name for f in dataclasses.fields(cfg)}
        if "prompt" not in known:
            from mmpipe.graphs.base import UserError

            raise UserError("inputs", f"recipe '{self.plan.recipe}' takes neither audio nor a prompt per call",
                            "run its own requests with mmpipe.api.run(recipe, overrides)")
        mine = {k: v for k, v in params.items() if k in known}
        extra = {k: v for k, v in params.items() if k not in known}
        source = get_source(self.plan.source["kind"])  # type: ignore[index]
        reqs = []
        for item in items:
            for r in source.requests(dataclasses.replace(cfg, **{**mine, "prompt": item, "file": None})):  # type: ignore[union-attr]
                reqs.append(Request(id=self._id(), values=r.values, input={**r.input, **extra}, params={**r.params, **extra}))
        return reqs

    def _result(self, r: Any) -> dict[str, Any]:
        if not r.ok:
            raise RuntimeError(f"request {r.id} failed in node {r.error.get('node')}: {r.error.get('message') or r.error}")
        out = dict(r.outputs or {})
        path = out.get("path")
        if isinstance(path, str) and path.lower().endswith((".png", ".jpg", ".jpeg", ".webp")):
            from PIL import Image

            with Image.open(path) as im:
                im.load()
                out["image"] = im
        return out

    def close(self) -> None:
        """Stop the pipeline's workers (a later call starts them again)."""
        if self._ex is not None:
            self._ex.close()
            self._ex = None
        _OPEN.discard(self)

    def __enter__(self) -> "RecipePipeline":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def pipeline(recipe: str | Path, **overrides: Any) -> RecipePipeline:
    """``mmpipe.pipeline("whisper_stt", beam_size=1)("talk.wav")["text"]``: a recipe as a
    callable. Keyword arguments are overrides (``model="base"``, ``output_dir=...``;
    dotted keys through ``**{"nodes.encoder.split": 2}``)."""
    return RecipePipeline(recipe, overrides)
