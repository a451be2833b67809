"""Pure-PyTorch diffusion transformers: no Ray, DeepSpeed, MLflow or WebDataset imports here."""

from .dit import DiT
from .registry import ModelSpec, build_model, list_presets, model_name, parse_model_name

__all__ = ["DiT", "ModelSpec", "build_model", "list_presets", "model_name", "parse_model_name"]
