"""Pure-PyTorch diffusion transformers: no Ray, DeepSpeed, MLflow or WebDataset imports here.

Names are resolved lazily so that `models.registry` (preset names, used by config validation)
can be imported without paying for torch.
"""

from importlib import import_module

_EXPORTS = {
    "DiT": "models.dit",
    "ModelSpec": "models.registry",
    "build_model": "models.registry",
    "list_presets": "models.registry",
    "model_name": "models.registry",
    "parse_model_name": "models.registry",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")
