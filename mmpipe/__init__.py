"""mmpipe: pipeline-parallel multimodal inference declared in Hydra YAML."""
__version__ = "0.1.0"
