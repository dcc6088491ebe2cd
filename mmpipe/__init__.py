"""mmpipe: pipeline-parallel multimodal inference declared in Hydra YAML."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the API imports torch-free but heavy modules: only on demand
    from mmpipe.api import RecipePipeline

__version__ = "0.1.0"


def pipeline(recipe: str, **overrides: Any) -> RecipePipeline:
    """A recipe as a callable shaped like a Hugging Face pipeline (see ``mmpipe.api.pipeline``)."""
    from mmpipe.api import pipeline as _pipeline

    return _pipeline(recipe, **overrides)
