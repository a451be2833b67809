"""The streaming loader the trainer reads: WebDataset shards -> batches of tensors.

    loader = make_loader("data/digits/train-{000000..000003}.tar", 64, rank=r, world_size=w,
                         num_workers=2, epoch_batches=1000, seed=0, flip=True)
    for batch in loader:          # exactly 1000 batches on every rank
        batch["x"]                # float32 [B, C, H, W]: pixels in [-1, 1], or scaled latents
        batch["cls"]              # int64 [B] (when the shards have labels)
        batch["txt"]              # list of B captions (when they have captions)
        batch["txt_tokens"], batch["txt_mask"], batch["txt_pooled"]   # precomputed embeddings, if asked
        batch["key"]              # list of B sample keys
        batch["corrupt"]          # samples skipped since this worker's previous batch
    loader.corrupt                # samples skipped so far, all workers together (a metric)

Distribution. Every (rank, DataLoader worker) pair is one reader. With `resampled=True` (training)
each reader draws shards with replacement from the whole list, seeded by (seed, rank, worker,
epoch), so ranks see different streams; `epoch_batches` cuts each rank's stream to the same number
of batches, so DDP ranks never wait on a rank that ran dry. With `resampled=False` (evaluation) the
shards are split by rank, then by worker (shards[rank::world_size][worker::num_workers]): one pass
delivers every sample exactly once across all readers. Rank and world size are arguments, not read
from the environment.

Damage. A sample that cannot be read or decoded is skipped, logged (harness.data logger, rate
limited) and counted; when dataset.json gives a shard's sample count, samples a truncation swallowed
are counted too. The count reaches the trainer twice: per batch ("corrupt") and as `loader.corrupt`,
a counter in shared memory that worker processes add to.

Speed. Tar headers are parsed directly (tario.py), .npy payloads become np.frombuffer views after
the header is parsed once per shape, batches are stacked in numpy and converted to torch once:
no per-sample torch work. See throughput.py.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from harness.data.codec import torchvision_png_decoder
from harness.data.errors import DataError
from harness.data.manifest import MANIFEST, read_manifest, shard_counts
from harness.data.sample import SampleSpec, decode_sample
from harness.data.shards import expand_shards, manifest_beside, open_shard, shard_name
from harness.data.tario import iter_samples

log = logging.getLogger("harness.data")

_WARN_FIRST = 20
_WARN_EVERY = 1000


class LoaderStats:
    """Counters in shared memory, added to by every worker process of one loader."""

    def __init__(self):
        self._corrupt = multiprocessing.get_context().Value("q", 0)

    def add_corrupt(self, n: int = 1) -> None:
        with self._corrupt.get_lock():
            self._corrupt.value += n

    @property
    def corrupt(self) -> int:
        return int(self._corrupt.value)


@dataclass
class _Spec(SampleSpec):
    """What to decode from each sample (harness/data/sample.py) and how to batch it: latent scaling
    and random flips (picklable; built from the manifest)."""

    scale: float = 1.0
    shift: float = 0.0
    flip: bool = False


class ShardStream(IterableDataset):
    """One reader's stream of batches (dicts); see the module docstring."""

    def __init__(self, urls: list[str], batch_size: int, spec: _Spec, *, rank: int, world_size: int,
                 resampled: bool, shuffle: int, seed: int, partial: bool, expected: dict[str, int],
                 stats: LoaderStats):
        self.urls, self.batch_size, self.spec = urls, batch_size, spec
        self.rank, self.world_size, self.resampled = rank, world_size, resampled
        self.shuffle, self.seed, self.partial, self.expected, self.stats = shuffle, seed, partial, expected, stats
        self.epoch = 0
        self._iterations = 0  # per process: advances the seed of persistent workers between epochs

    # -- plan ---------------------------------------------------------------------------------
    def reader(self) -> tuple[int, int]:
        info = get_worker_info()
        return (info.id, info.num_workers) if info is not None else (0, 1)

    def shards_for(self, worker: int, workers: int, rng: random.Random):
        if self.resampled:
            while True:
                yield self.urls[rng.randrange(len(self.urls))]
        mine = self.urls[self.rank::self.world_size][worker::workers]
        if self.shuffle > 1:
            mine = list(mine)
            rng.shuffle(mine)
        yield from mine

    def __iter__(self):
        worker, workers = self.reader()
        epoch = self.epoch + self._iterations
        self._iterations += 1
        rng = random.Random(f"ditscale/{self.seed}/{self.rank}/{worker}/{epoch}")
        state = _StreamState(self.stats)
        flips = np.random.default_rng(rng.getrandbits(64))
        samples = self._read(self.shards_for(worker, workers, rng), state)
        if self.shuffle > 1:
            samples = _shuffled(samples, self.shuffle, rng)
        return self._batches(samples, state, flips)

    # -- reading ------------------------------------------------------------------------------
    def _read(self, shards, state: "_StreamState"):
        dry = 0  # shards in a row that gave nothing: stop an endless resampled loop over unreadable shards
        for url in shards:
            if self.resampled and dry >= max(10, 3 * len(self.urls)):
                raise DataError(f"{dry} shards in a row gave no readable sample (last: {url})")
            name = shard_name(url)
            expected = self.expected.get(name)
            good = bad = 0
            unknown_loss = False
            try:
                stream = open_shard(url)
            except OSError as err:
                dry += 1
                state.corrupt(url, None, f"cannot open: {err}", n=expected or 0)
                continue
            finished = False
            try:
                for sample in iter_samples(stream):
                    if "__error__" in sample:
                        if sample["__key__"] is not None:
                            bad += 1
                            state.corrupt(url, sample["__key__"], sample["__error__"])
                        else:
                            unknown_loss = True
                            state.warn(url, None, sample["__error__"])
                        continue
                    good += 1
                    sample["__url__"] = url
                    yield sample
                finished = True
            finally:
                try:
                    stream.close()
                except Exception as err:  # noqa: BLE001 - e.g. a pipe: command that failed
                    if finished:  # not when the consumer stopped early (a cut pipe may complain)
                        unknown_loss = True
                        state.warn(url, None, f"closing: {err}")
            dry = 0 if good else dry + 1
            if expected is not None and good + bad < expected:
                lost = expected - good - bad
                state.corrupt(url, None, f"{lost} of {expected} samples missing", n=lost)
            elif expected is None and unknown_loss:
                state.corrupt(url, None, "damaged stream (lost samples unknown)", warn_now=False)

    # -- decoding and batching --------------------------------------------------------------------
    def _batches(self, samples, state: "_StreamState", flips: np.random.Generator):
        rows: list = []
        for sample in samples:
            try:
                d = decode_sample(sample, self.spec)
                rows.append((sample["__key__"], d.x, d.label, d.caption, d.embedding))
            except Exception as err:  # noqa: BLE001 - any undecodable sample is skipped and counted
                state.corrupt(sample.get("__url__", "?"), sample["__key__"], f"{type(err).__name__}: {err}")
                continue
            if len(rows) == self.batch_size:
                yield self._collate(rows, state, flips)
                rows = []
        if rows and self.partial:
            yield self._collate(rows, state, flips)

    def _collate(self, rows: list, state: "_StreamState", flips: np.random.Generator) -> dict:
        spec = self.spec
        keys, xs, labels, captions, embeddings = zip(*rows)
        x = np.stack(xs)  # [B, C, H, W]: uint8 pixels or fp16 latents
        if spec.flip:
            chosen = flips.random(len(rows)) < 0.5
            if chosen.any():
                x[chosen] = x[chosen][..., ::-1]
        if spec.kind == "pixels":  # uint8 -> float in [-1, 1]
            images = torch.from_numpy(x).float()
            images.mul_(2.0 / 255.0).sub_(1.0)
        else:
            images = torch.from_numpy(x).float()
            if spec.shift:
                images.sub_(spec.shift)
            if spec.scale != 1.0:
                images.mul_(spec.scale)
        batch = {"x": images, "key": list(keys)}
        if spec.want_cls:
            batch["cls"] = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        if spec.want_txt:
            batch["txt"] = list(captions)
        if spec.want_embeddings:
            dim = embeddings[0][0].shape[1]
            tokens = np.zeros((len(rows), spec.tokens, dim), dtype=np.float16)
            mask = np.zeros((len(rows), spec.tokens), dtype=bool)
            for i, (tok, m, _) in enumerate(embeddings):
                tokens[i, : len(tok)] = tok
                mask[i, : len(m)] = m
            batch["txt_tokens"] = torch.from_numpy(tokens).float()
            batch["txt_mask"] = torch.from_numpy(mask)
            batch["txt_pooled"] = torch.from_numpy(np.stack([e[2] for e in embeddings])).float()
        batch["corrupt"] = state.take()
        state.delivered += len(rows)
        return batch


class _StreamState:
    """Per-reader bookkeeping: corrupt samples since the last batch, warnings, samples delivered."""

    def __init__(self, stats: LoaderStats):
        self.stats, self.pending, self.seen, self.delivered = stats, 0, 0, 0

    def warn(self, url, key, message) -> None:
        self.seen += 1
        if self.seen <= _WARN_FIRST or self.seen % _WARN_EVERY == 0:
            where = f"{shard_name(url)}" + (f" sample {key}" if key else "")
            more = " (further warnings are rate-limited)" if self.seen == _WARN_FIRST else ""
            log.warning("data: skipping corrupt data in %s: %s%s", where, message, more)

    def corrupt(self, url, key, message, n: int = 1, warn_now: bool = True) -> None:
        if warn_now:
            self.warn(url, key, message)
        if n:
            self.pending += n
            self.stats.add_corrupt(n)

    def take(self) -> int:
        n, self.pending = self.pending, 0
        return n


def _shuffled(samples, size: int, rng: random.Random, initial: int = 100):
    """A shuffle buffer of up to `size` samples; yielding starts after `min(initial, size)`."""
    buf: list = []
    initial = min(initial, size)
    it = iter(samples)
    for sample in it:
        buf.append(sample)
        if len(buf) < size:
            nxt = next(it, None)  # grow the buffer by one more while filling
            if nxt is not None:
                buf.append(nxt)
        if len(buf) >= initial:
            k = rng.randrange(len(buf))
            buf[k], buf[-1] = buf[-1], buf[k]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


class ShardLoader:
    """Iterable over batches (a torch DataLoader underneath); `len()` is `epoch_batches`."""

    def __init__(self, dataloader: DataLoader, dataset: ShardStream, epoch_batches: int | None,
                 stats: LoaderStats, manifest: dict | None, urls: list[str]):
        self.dataloader, self.dataset, self.epoch_batches = dataloader, dataset, epoch_batches
        self.stats, self.manifest, self.urls = stats, manifest, urls
        self._epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Start the next iteration's streams from `epoch` (e.g. after resuming)."""
        self._epoch = epoch

    def __iter__(self):
        self.dataset.epoch = self._epoch
        self._epoch += 1
        it = iter(self.dataloader)
        return it if self.epoch_batches is None else itertools.islice(it, self.epoch_batches)

    def __len__(self) -> int:
        if self.epoch_batches is None:
            raise TypeError("this loader has no epoch length; pass epoch_batches to make_loader")
        return self.epoch_batches

    @property
    def corrupt(self) -> int:
        """Samples skipped as corrupt so far, over every worker process."""
        return self.stats.corrupt

    @property
    def kind(self) -> str | None:
        return self.dataset.spec.kind


def _as_is(batch: dict) -> dict:
    """The batches are already tensors; skip DataLoader's recursive default_convert (it visits every
    caption and key)."""
    return batch


def _load_manifest(manifest, urls: list[str]) -> dict | None:
    if manifest is None:
        return manifest_beside(urls)[0]
    if isinstance(manifest, dict):
        return manifest
    path = Path(manifest)
    folder = path if path.is_dir() else path.parent
    found = read_manifest(folder)
    if found is None:
        raise DataError(f"manifest {manifest}: no {MANIFEST} there")
    return found


def make_loader(
    shards: str | os.PathLike | Sequence[str],
    batch_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    resampled: bool = True,
    epoch_batches: int | None = None,
    shuffle: int = 1000,
    seed: int = 0,
    flip: bool = False,
    conditioning: str = "class",
    text_embeddings: bool | None = None,
    manifest: dict | str | os.PathLike | None = None,
    split: str = "train",
    partial: bool | None = None,
    pin_memory: bool = False,
    prefetch_factor: int | None = None,
    persistent_workers: bool = False,
) -> ShardLoader:
    """A loader over `shards` (brace pattern, glob, list, pipe:/http(s) URL, or a dataset folder, whose
    `split` is read) for one process of `world_size`. See the module docstring for the batch format.

    shuffle: shuffle-buffer size in samples (0 or 1: off; finite passes also shuffle shard order when on).
    conditioning: "class" requires labels; "text" requires captions and forbids `flip` (captions say
    left/right). text_embeddings: yield the precomputed embeddings (default: when the shards have them
    and conditioning is "text"). manifest: dict, folder or dataset.json path (default: the dataset.json
    beside the first local shard; for latents it supplies the scaling and shift factors).
    partial: yield a last short batch (default: only when not resampled).
    """
    if batch_size <= 0:
        raise DataError(f"batch_size {batch_size}: must be positive")
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank {rank} / world_size {world_size}: need 0 <= rank < world_size")
    if num_workers < 0:
        raise DataError(f"num_workers {num_workers}: must be 0 or more")
    if epoch_batches is not None and epoch_batches <= 0:
        raise DataError(f"epoch_batches {epoch_batches}: must be positive")
    if conditioning not in ("class", "text"):
        raise DataError(f"conditioning {conditioning!r}: use 'class' or 'text'")
    if flip and conditioning == "text":
        raise DataError("flip: horizontal flips would contradict captions that say left/right; "
                        "use flip with class conditioning only")
    urls = expand_shards(shards, split)
    info = _load_manifest(manifest, urls)
    fields = set(info.get("fields", ())) if info else set()
    if info:
        if conditioning == "class" and "cls" not in fields:
            raise DataError("conditioning 'class': the shards have no class labels (dataset.json num_classes is "
                            "null); use text conditioning or pack with labels")
        if conditioning == "text" and "txt" not in fields:
            raise DataError("conditioning 'text': the shards have no captions")
    has_embeddings = bool(info and info.get("text_encoder"))
    if text_embeddings is None:
        text_embeddings = has_embeddings and conditioning == "text"
    elif text_embeddings and not has_embeddings:
        raise DataError("text_embeddings: the shards hold no precomputed text embeddings "
                        "(pack them with --text-encoder)" if info else
                        "text_embeddings: no dataset.json beside the shards; pass manifest= to read embeddings")
    kind = info.get("kind") if info else None
    scale, shift = 1.0, 0.0
    if kind == "latents":
        vae = info.get("vae") or {}
        scale, shift = float(vae.get("scaling_factor", 1.0)), float(vae.get("shift_factor") or 0.0)
    if not info:
        log.warning("data: no %s beside %s; shapes are taken from the first sample and latents, if any, "
                    "are not scaled (pass manifest=)", MANIFEST, urls[0])
    spec = _Spec(
        kind=kind, shape=tuple(info["sample_shape"]) if info and info.get("sample_shape") else None,
        want_cls=conditioning == "class" or "cls" in fields,
        want_txt=conditioning == "text" or "txt" in fields,
        want_embeddings=bool(text_embeddings), tokens=(info.get("text_encoder") or {}).get("tokens") if info else None,
        num_classes=info.get("num_classes") if info else None, scale=scale, shift=shift, flip=flip,
    )
    if not resampled and len(urls) < world_size * max(1, num_workers):
        log.warning("data: %d shard(s) for %d readers (world_size %d x workers %d): some readers get no data "
                    "in a finite pass", len(urls), world_size * max(1, num_workers), world_size, max(1, num_workers))
    if kind != "latents":
        torchvision_png_decoder()  # import it here once: forked workers inherit it (else ~2 s each)
    stats = LoaderStats()
    dataset = ShardStream(urls, batch_size, spec, rank=rank, world_size=world_size, resampled=resampled,
                          shuffle=shuffle, seed=seed, partial=(not resampled) if partial is None else partial,
                          expected=shard_counts(info), stats=stats)
    dataloader = DataLoader(
        dataset, batch_size=None, collate_fn=_as_is, num_workers=num_workers, pin_memory=pin_memory,
        prefetch_factor=prefetch_factor if num_workers else None,
        persistent_workers=persistent_workers and num_workers > 0,
    )
    return ShardLoader(dataloader, dataset, epoch_batches, stats, info, urls)
