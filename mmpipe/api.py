"""The Python API: compile a recipe and run requests, without the CLI.

    from mmpipe.api import compile, open_pipeline, requests_of
    plan = compile("synthetic", ["stages=2"])
    with open_pipeline(plan) as pipe:
        results = pipe.run(requests_of(plan))
"""
from __future__ import annotations

import builtins
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
        cfg = recipe.copy()
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
        return ex.run(reqs)
    finally:
        ex.close()
