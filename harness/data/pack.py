"""`ditscale data pack SOURCE OUT`: images (+ labels, captions, attributes) -> WebDataset shards.

Each sample is written under a key (its index in the source's fixed order) with the members
    png            the image (uint8, grayscale or RGB) — or latent.npy (fp16 [C, h, w]) with a VAE
    cls            the class index as text (sources with labels)
    txt            the caption (UTF-8)
    json           attributes (shapes: the scene; photos: the source path)
    txt_tokens.npy / txt_mask.npy / txt_pooled.npy   precomputed text embeddings (--text-encoder)
into OUT/NAME-000000.tar ... and OUT/val-000000.tar ..., plus OUT/dataset.json (see manifest.py).

The split and the order inside each split are a deterministic permutation of the source (seeded), so
shards need no further shuffling at the file level; re-packing with the same arguments gives
byte-identical shards. Existing shards or manifests are never replaced without overwrite=True; a
split added beside other splits of the same dataset (e.g. a separate validation folder) is merged
into the manifest. Shards are built in a scratch folder beside OUT and moved in at the end, so a
failed or interrupted pack (Ctrl-C, SIGTERM) leaves OUT as it was; overwrite deletes only the
replaced splits' own NAME-NNNNNN.tar files inside OUT. A scratch folder left by a pack that was
killed outright (SIGKILL) is removed by the next pack into the same OUT once its owner file proves
that pack dead. An OUT that cannot be written is one line before any work.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import logging
import multiprocessing
import os
import re
import signal
import threading
import uuid
from pathlib import Path

import numpy as np

from harness.data.codec import encode_cls, encode_json, encode_npy, encode_png, encode_txt
from harness.data.errors import DataError
from harness.data.manifest import FORMAT, MANIFEST, ManifestError, read_manifest, shard_pattern, write_manifest
from harness.data.sources import ShapesSource, Source, open_source
from harness.data.tario import ShardWriter
from harness.files import not_writable_message, reap_scratch_folders, require_writable, scratch_folder, write_refused

log = logging.getLogger("harness.data")

VAL_SPLIT = "val"
_NAME = re.compile(r"^[A-Za-z0-9_]+$")
_MAX_WARNINGS = 10
_COMPATIBLE = ("kind", "sample_shape", "num_classes", "class_names")


def pack_dataset(
    source: str,
    out: str,
    *,
    name: str = "train",
    image_size: int | None = None,
    val_fraction: float = 0.05,
    shard_size: int = 5000,
    seed: int = 0,
    count: int | None = None,
    vae: str | None = None,
    text_encoder: str | None = None,
    device: str = "cpu",
    batch_size: int = 64,
    workers: int = 0,
    overwrite: bool = False,
    progress: bool | None = None,
) -> dict:
    """Pack `source` (a built-in set name, an image folder, or a captions file) into shards in `out`;
    returns the manifest. `count`: shapes — how many to draw (default 10,000); other sources — keep a
    deterministic random subset of this many. `workers`: processes that decode and encode images.
    `progress`: tqdm bars (None: only on a terminal)."""
    _check_arguments(name, image_size, val_fraction, shard_size, count, batch_size, workers)
    require_writable(out, "OUT", DataError)  # before the source is read: a read-only OUT fails at once
    src = open_source(source, image_size=image_size, count=count, seed=seed)
    order = np.random.default_rng(seed).permutation(len(src))
    if count is not None and not isinstance(src, ShapesSource):
        order = order[:count]
    n_val = int(round(len(order) * val_fraction))
    if val_fraction > 0 and n_val == 0 and len(order) > 1:
        n_val = 1
    splits = {name: order[n_val:]}
    if n_val:
        splits[VAL_SPLIT] = order[:n_val]
    if len(splits[name]) == 0:
        raise DataError(f"--val-fraction {val_fraction}: leaves no sample for the {name} split")

    out_dir = Path(out)
    existing, replaced = _plan_output(out_dir, list(splits), overwrite)
    old = _remaining(existing, replaced)
    # Shards are built in a scratch folder and moved into OUT at the end: an interrupted or failed
    # pack leaves OUT as it was (and no partial files anywhere).
    with _output_refused_is_one_line(out_dir):
        return _build(src, splits, out_dir, existing, replaced, old, name=name, shard_size=shard_size, seed=seed,
                      val_fraction=val_fraction, vae=vae, text_encoder=text_encoder, device=device,
                      batch_size=batch_size, workers=workers, progress=progress)


def _build(src: Source, splits: dict, out_dir: Path, existing: dict | None, replaced: set[str], old: dict | None, *,
           name: str, shard_size: int, seed: int, val_fraction: float, vae: str | None, text_encoder: str | None,
           device: str, batch_size: int, workers: int, progress: bool | None) -> dict:
    parent, scratch_name = _scratch_parent(out_dir), out_dir.resolve().name or "pack"
    for stale in reap_scratch_folders(parent, scratch_name):
        log.warning("removed %s, the scratch folder of an earlier pack into %s that was killed", stale, out_dir)
    with scratch_folder(parent, scratch_name) as stage:
        # The pool starts before torch models load (forking after torch threads start is fragile).
        pool = _start_pool(src, workers, as_png=not vae) if workers > 0 else None
        try:
            vae_model = encoder = vae_meta = None
            channels, sample_size = src.channels, src.image_size
            if vae:
                from harness.data.vae import load_vae, vae_info

                vae_model = load_vae(vae, device)
                vae_meta = vae_info(vae_model, vae)
                if src.image_size % vae_meta["downsample"]:
                    raise DataError(f"--image-size {src.image_size} is not divisible by the VAE's downsampling "
                                    f"factor {vae_meta['downsample']}")
                channels, sample_size = vae_meta["latent_channels"], src.image_size // vae_meta["downsample"]
            if text_encoder:
                if not src.has_captions:
                    raise DataError("--text-encoder: the source has no captions")
                from harness.data.text_embeddings import load_encoder

                encoder = load_encoder(text_encoder, device)
            manifest = {
                "format": FORMAT, "version": 1,
                "source": src.describe(),
                "kind": "latents" if vae_model is not None else "pixels",
                "sample_shape": [channels, sample_size, sample_size],
                "channels": channels, "image_size": sample_size, "pixel_size": src.image_size,
                "num_classes": src.num_classes, "class_names": src.class_names,
                "vae": vae_meta, "text_encoder": None,
            }
            _check_compatible(out_dir, old, manifest, text_encoder)
            writer_state = _PackState(src, vae_model, encoder, text_encoder, device, progress)
            pack_id = uuid.uuid4().hex[:12]
            split_entries = {}
            for split, indices in splits.items():
                split_entries[split] = writer_state.write_split(stage, split, indices, shard_size, batch_size,
                                                                pool, where=out_dir)
                split_entries[split].update(pack_id=pack_id, fields=sorted(writer_state.fields or []))
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()

        fields = set(writer_state.fields or ())
        for entry in (old or {}).get("splits", {}).values():  # every split must have the listed members
            fields &= set(entry.get("fields", fields))
        manifest.update({
            "fields": sorted(fields),
            "captions": "txt" in fields,
            "attributes": bool(src.has_attributes),
            "text_encoder": writer_state.text_meta,
            "seed": seed, "val_fraction": val_fraction, "shard_size": shard_size,
            "skipped": writer_state.skipped, "skipped_examples": writer_state.skipped_examples,
            "created_by": "ditscale data pack",
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        })
        all_splits = dict(old["splits"]) if old else {}
        all_splits.update(split_entries)
        manifest["splits"] = all_splits
        manifest["counts"] = {s: entry["count"] for s, entry in all_splits.items()}
        _stage_manifest(stage, out_dir, manifest)
        with _interrupts_held():
            _commit(stage, out_dir, existing, replaced, split_entries)
    if writer_state.skipped:
        log.warning("skipped %d unreadable images (listed under skipped_examples in %s/dataset.json)",
                    writer_state.skipped, out_dir)
    return manifest


@contextlib.contextmanager
def _output_refused_is_one_line(out: Path):
    """An OUT that became unwritable after the up-front check (or that access checks cannot see):
    the same one line as that check, for an error on a path of OUT, above it or in its scratch folder."""
    try:
        yield
    except OSError as err:
        if not (write_refused(err, out) or _in_scratch(err, out)):
            raise
        raise DataError(not_writable_message(out, "OUT", err.strerror or str(err))) from None


def _in_scratch(err: OSError, out: Path) -> bool:
    """Whether a refused write was in (or of) OUT's scratch folder beside it."""
    if not write_refused(err) or not err.filename:
        return False
    path, out = Path(os.fsdecode(err.filename)).resolve(), out.resolve()
    return any(p.parent == out.parent and p.name.startswith(f".{out.name}.") for p in (path, *path.parents))


def _check_arguments(name, image_size, val_fraction, shard_size, count, batch_size, workers) -> None:
    if not _NAME.match(name):
        raise DataError(f"--name {name!r}: use letters, digits and underscores")
    if not 0 <= val_fraction < 1:
        raise DataError(f"--val-fraction {val_fraction}: must be in [0, 1)")
    if name == VAL_SPLIT and val_fraction > 0:
        raise DataError(f"--name {VAL_SPLIT} is the held-out split's name; pass --val-fraction 0 to pack a "
                        "validation set on its own")
    for flag, value in (("--image-size", image_size), ("--count", count)):
        if value is not None and value <= 0:
            raise DataError(f"{flag} {value}: must be positive")
    for flag, value in (("--shard-size", shard_size), ("--batch-size", batch_size)):
        if value <= 0:
            raise DataError(f"{flag} {value}: must be positive")
    if workers < 0:
        raise DataError(f"--workers {workers}: must be 0 or more")


def _plan_output(out: Path, splits: list[str], overwrite: bool) -> tuple[dict | None, set[str]]:
    """Refuse to replace existing shards/manifest entries of `splits` unless `overwrite` (checked
    before anything slow). Returns (existing manifest, splits to replace): with `overwrite`, the
    splits being written plus the others packed by the same run as a replaced split (a stale
    held-out split could overlap the new training split). Nothing is deleted here."""
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} exists and is not a folder")
    try:
        old = read_manifest(out)
    except ManifestError as err:
        if err.parsed:  # its shard names cannot be trusted to say what --overwrite may delete
            raise DataError(f"{err}; fix it or remove it before packing into {out}") from None
        if not overwrite:
            raise DataError(f"{out}/dataset.json is unreadable; pass --overwrite to replace it") from None
        old = None
    files = sorted(p for s in splits for p in out.glob(f"{s}-*.tar"))
    listed = [s for s in splits if old and s in old["splits"]]
    if (files or listed) and not overwrite:
        what = f"{len(files)} shard(s) of the {'/'.join(splits)} split(s)" if files else \
            f"the {'/'.join(listed)} split(s) in dataset.json"
        raise DataError(f"{out} already holds {what}; pass --overwrite to replace them")
    replaced = set(splits)
    if old and listed:
        runs = {old["splits"][s].get("pack_id") for s in listed} - {None}
        replaced |= {s for s, entry in old["splits"].items() if entry.get("pack_id") in runs}
    for split in sorted(replaced & set(old["splits"] if old else ())):
        for shard in old["splits"][split]["shards"]:
            if not _own_shard(split, shard["name"]):
                raise DataError(f"{out}/{MANIFEST}: split {split} lists {shard['name']!r}, which is not one of its "
                                f"own {split}-NNNNNN.tar shards; --overwrite deletes only those: remove the entry "
                                "or pack into another folder")
    return old, replaced


def _own_shard(split: str, name: str) -> bool:
    """Whether `name` is a file `pack` writes for `split` (the only files --overwrite deletes)."""
    return re.fullmatch(rf"{re.escape(split)}-\d{{6}}\.tar(\.partial)?", name) is not None


def _remaining(old: dict | None, replaced: set[str]) -> dict | None:
    """The existing manifest without the replaced splits (None when no split stays)."""
    if not old:
        return None
    kept = {s: e for s, e in old["splits"].items() if s not in replaced}
    if not kept:
        return None
    return {**old, "splits": kept, "counts": {s: e["count"] for s, e in kept.items()}}


def _scratch_parent(out: Path) -> Path:
    """Where to build: beside OUT, so that the final renames stay on one filesystem; inside OUT when
    OUT is a mount point or its parent is not writable (a dataset folder on a shared volume)."""
    out = out.resolve()
    if out.is_dir() and (out.stat().st_dev != out.parent.stat().st_dev or not os.access(out.parent, os.W_OK)):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    return out.parent


def _stage_manifest(stage: Path, out: Path, manifest: dict) -> None:
    """The manifest is written in the scratch folder too: a full disk shows before OUT is touched."""
    try:
        write_manifest(stage, manifest)
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise DataError(f"{out}: disk full while writing {MANIFEST}; free some space or pack elsewhere") from None


def _commit(stage: Path, out: Path, old: dict | None, replaced: set[str], new_splits: dict) -> None:
    """Swap the new splits in: move the new shards in, delete the replaced splits' other shards (only
    their own NAME-NNNNNN.tar files inside OUT), then dataset.json. Renames and deletions only."""
    out.mkdir(parents=True, exist_ok=True)
    incoming = {shard["name"] for entry in new_splits.values() for shard in entry["shards"]}
    doomed = {path.name for split in replaced for path in out.glob(f"{split}-*.tar*") if _own_shard(split, path.name)}
    for split in replaced & set(old["splits"] if old else ()):
        doomed |= {s["name"] for s in old["splits"][split]["shards"] if _own_shard(split, s["name"])}
    for name in sorted(incoming):
        os.replace(stage / name, out / name)
    for name in sorted(doomed - incoming):
        (out / name).unlink(missing_ok=True)
    os.replace(stage / MANIFEST, out / MANIFEST)


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a scheduler's time limit) during a pack: raised like Ctrl-C's KeyboardInterrupt,
    so the same cleanup runs (the scratch folder is removed, OUT stays as it was)."""


def _raise_terminated(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def terminate_as_interrupt():
    """SIGTERM raises Terminated inside the block (its default action would kill the process before the
    scratch folder is removed). Only the main thread can set handlers; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


_HELD = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def _interrupts_held():
    """Ctrl-C and SIGTERM wait until the block ends: the commit is a handful of renames, and cut halfway
    it would leave part of the old dataset beside part of the new."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = {sig: signal.signal(sig, lambda signum, _: caught.append(signum)) for sig in _HELD}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    if caught:
        log.warning("%s came while the new shards were being moved in; the pack finished",
                    "Ctrl-C" if signal.SIGINT in caught else "SIGTERM")


def _check_compatible(out: Path, old: dict | None, manifest: dict, text_encoder: str | None) -> None:
    if not old:
        return
    others = ", ".join(sorted(old["splits"]))
    for key in _COMPATIBLE:
        if old.get(key) != manifest.get(key):
            raise DataError(f"{out}/dataset.json describes other splits ({others}) with a different {key} "
                            f"({old.get(key)!r} vs {manifest.get(key)!r}); pack into another folder")
    old_vae = (old.get("vae") or {}).get("name")
    if old_vae != (manifest["vae"] or {}).get("name"):
        raise DataError(f"{out}/dataset.json: its splits ({others}) were packed with --vae {old_vae}; "
                        "pack into another folder")
    old_text = (old.get("text_encoder") or {}).get("spec")
    if old_text != text_encoder:
        raise DataError(f"{out}/dataset.json: its splits ({others}) were packed with --text-encoder {old_text}; "
                        "pack into another folder")


# --- loading images (in a process pool when workers > 0) --------------------------------------

_SOURCE: Source | None = None
_AS_PNG = True


def _init_worker(source: Source, as_png: bool) -> None:
    global _SOURCE, _AS_PNG
    _SOURCE, _AS_PNG = source, as_png


def _load_one(index: int):
    """(index, image, label, caption, attributes, png bytes or None, error or None)."""
    try:
        image, label, caption, attributes = _SOURCE.load(int(index))
        expected = (_SOURCE.image_size, _SOURCE.image_size, _SOURCE.channels)
        if image.shape != expected or image.dtype != np.uint8:
            raise ValueError(f"image of shape {image.shape} {image.dtype}, expected {expected} uint8")
        png = encode_png(image) if _AS_PNG else None
        return index, image, label, caption, attributes, png, None
    except Exception as err:  # noqa: BLE001 - an unreadable image is skipped and reported
        return index, None, None, None, None, None, f"{type(err).__name__}: {err}"


def _init_pool_worker(source: Source, as_png: bool) -> None:
    # Ctrl-C reaches the whole process group: the parent stops the pool, the workers need not print
    # a traceback each. SIGTERM is how the parent's pool.terminate() stops them: its default action
    # (a forked worker inherits the parent's Terminated handler).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _init_worker(source, as_png)


def _start_pool(src: Source, workers: int, as_png: bool):
    """Workers load, crop and (for pixels) PNG-encode images; with a VAE they return raw arrays."""
    return multiprocessing.get_context().Pool(workers, initializer=_init_pool_worker, initargs=(src, as_png))


class _PackState:
    def __init__(self, src: Source, vae, encoder, text_spec, device, progress):
        self.src, self.vae, self.encoder, self.text_spec, self.device = src, vae, encoder, text_spec, device
        self.progress = progress
        self.fields: set[str] | None = None
        self.text_meta = None
        self.skipped = 0
        self.skipped_examples: list[str] = []

    def _loaded(self, indices, pool):
        as_png = self.vae is None
        if pool is None:
            _init_worker(self.src, as_png)
            return map(_load_one, indices)
        return pool.imap(_load_one, indices, chunksize=16)

    def write_split(self, out: Path, split: str, indices, shard_size: int, batch_size: int, pool,
                    where: Path | None = None) -> dict:
        """Shards of `split` in `out`; `where`: the folder errors name (the one the user gave)."""
        from tqdm import tqdm

        batch: list = []
        with ShardWriter(out, split, shard_size, where=where) as writer, tqdm(
            total=len(indices), desc=f"pack {split}", unit="img", disable=None if self.progress is None
            else not self.progress, dynamic_ncols=True,
        ) as bar:
            for item in self._loaded(indices, pool):
                batch.append(item)
                if len(batch) == batch_size:
                    self._write_batch(writer, batch)
                    bar.update(len(batch))
                    batch = []
            if batch:
                self._write_batch(writer, batch)
                bar.update(len(batch))
            shards = writer.close()
        count = sum(s["count"] for s in shards)
        if count == 0:
            raise DataError(f"no readable image for the {split} split")
        return {"count": count, "pattern": shard_pattern(split, len(shards)), "source": self.src.describe(),
                "shards": shards}

    def _write_batch(self, writer: ShardWriter, batch: list) -> None:
        good = []
        for index, image, label, caption, attributes, png, error in batch:
            if error is not None:
                self.skipped += 1
                if len(self.skipped_examples) < 100:
                    self.skipped_examples.append(f"sample {index}: {error}")
                if self.skipped <= _MAX_WARNINGS:
                    log.warning("pack: skipping sample %d (%s)", index, error)
                continue
            good.append((index, image, label, caption, attributes, png))
        if not good:
            return
        latents = embeddings = None
        if self.vae is not None:
            from harness.data.vae import encode_latents

            latents = encode_latents(self.vae, np.stack([g[1] for g in good]), self.device)
        if self.encoder is not None:
            from harness.data.text_embeddings import encode_captions, encoder_info

            embeddings, tokens = encode_captions(self.encoder, [g[3] for g in good])
            if self.text_meta is None:
                self.text_meta = encoder_info(self.text_spec, self.encoder, embeddings[0], tokens)
        for j, (index, image, label, caption, attributes, png) in enumerate(good):
            members = {}
            if latents is not None:
                members["latent.npy"] = encode_npy(latents[j])
            else:
                members["png"] = png if png is not None else encode_png(image)
            if label is not None:
                members["cls"] = encode_cls(label)
            if caption is not None:
                members["txt"] = encode_txt(caption)
            if attributes is not None:
                members["json"] = encode_json(attributes)
            if embeddings is not None:
                for ext, array in embeddings[j].items():
                    members[ext] = encode_npy(array)
            writer.write(f"{int(index):08d}", members)
            names = set(members)
            self.fields = names if self.fields is None else self.fields & names
