"""Loader throughput: samples per second that one training process's loader delivers.

`ditscale data bench DIR` prints it; the goal is that the loader is never what the accelerator waits
on (>= 20,000 latent samples/s per process on a laptop CPU with no worker processes).
"""

from __future__ import annotations

import os
import time
from typing import Sequence

from harness.data.errors import DataError
from harness.data.loader import make_loader
from harness.data.shards import expand_shards, manifest_beside


def measure_loader_throughput(
    shards: str | os.PathLike | Sequence[str],
    batch_size: int = 256,
    *,
    seconds: float | None = 5.0,
    batches: int | None = None,
    num_workers: int = 0,
    warmup_batches: int = 3,
    **loader_kwargs,
) -> dict:
    """Stream the (resampled, shuffled) training loader for `seconds` or `batches` after
    `warmup_batches` and return {samples_per_s, samples, batches, seconds, startup_s, batch_size,
    num_workers, kind, sample_shape, corrupt}. Extra keywords go to make_loader (conditioning is
    picked from the manifest when not given)."""
    if seconds is None and batches is None:
        raise DataError("give seconds or batches")
    if "conditioning" not in loader_kwargs:
        info, _ = manifest_beside(expand_shards(shards, loader_kwargs.get("split", "train")))
        fields = set((info or {}).get("fields", ()))
        loader_kwargs["conditioning"] = "text" if fields and "cls" not in fields else "class"
    started = time.perf_counter()
    loader = make_loader(shards, batch_size, num_workers=num_workers, resampled=True, **loader_kwargs)
    it = iter(loader)
    first = next(it)
    startup = time.perf_counter() - started
    for _ in range(warmup_batches):
        next(it)
    count = n_batches = 0
    t0 = time.perf_counter()
    while True:
        batch = next(it)
        count += batch["x"].shape[0]
        n_batches += 1
        elapsed = time.perf_counter() - t0
        if (batches is not None and n_batches >= batches) or (seconds is not None and elapsed >= seconds):
            break
    del it
    return {
        "samples_per_s": count / elapsed, "samples": count, "batches": n_batches, "seconds": elapsed,
        "startup_s": startup, "batch_size": batch_size, "num_workers": num_workers, "kind": loader.kind,
        "sample_shape": list(first["x"].shape[1:]), "corrupt": loader.corrupt,
    }


def format_throughput(result: dict) -> str:
    shape = "x".join(str(d) for d in result["sample_shape"])
    return (f"{result['kind']} {shape}: {result['samples_per_s']:,.0f} samples/s per process "
            f"(batch {result['batch_size']}, {result['num_workers']} workers, {result['batches']} batches "
            f"in {result['seconds']:.1f} s, first batch after {result['startup_s']:.2f} s)")
