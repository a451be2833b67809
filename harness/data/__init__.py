"""Data: WebDataset packing (`pack_dataset`), the streaming loader (`make_loader`), shard verification
(`verify_dataset`), loader throughput (`measure_loader_throughput`) and the built-in sets (digits, shapes).

Importing this package is cheap (no torch); the heavy modules load on first use.
"""

import importlib

from harness.data.errors import DataError

_LAZY = {
    "pack_dataset": "harness.data.pack",
    "make_loader": "harness.data.loader",
    "ShardLoader": "harness.data.loader",
    "verify_dataset": "harness.data.verify",
    "measure_loader_throughput": "harness.data.throughput",
    "expand_shards": "harness.data.shards",
    "read_manifest": "harness.data.manifest",
    "center_crop_arr": "harness.data.images",
}

__all__ = ["DataError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'harness.data' has no attribute {name!r}")
