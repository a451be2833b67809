"""Feature extractors for FID, the dataset's reference statistics, and the distances themselves.

The FID of record is clean-fid's: its TorchScript Inception-v3, its "clean" resize (PIL bicubic to
299 x 299 on float images), `frechet_distance` on the features' mean and covariance, and
`kernel_distance` for KID. Images go through exactly the steps clean-fid applies to an image file
(uint8 RGB -> resize -> tensor), so a folder of our samples scores the same here as with
`cleanfid.fid.compute_fid` (tests/test_evaluate.py checks it).

Without the Inception weights (see harness/assets.py) a stand-in network trained on the dataset
(harness/standin.py) is used and its metrics are named `fd_<name>` / `kd_<name>`, never fid / kid.

Reference statistics are computed once per (feature extractor, resolution, split, sample count,
packing of the split) and cached beside the shards as clean-fid's custom statistics are: an .npz
with `mu`, `sigma` and the features (`feats`, for KID). Caches live in `<dataset>/eval/`, or in
~/.cache/ditscale/eval/ when the dataset folder is read-only or remote. Writers take a file lock and
rename a finished temporary file into place, so concurrent trials never race or see half a file.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from harness.assets import file_lock, find_inception, missing_inception_hint
from harness.errors import UserError

log = logging.getLogger("harness.evaluate")

EXTRACTORS = ("auto", "inception", "lenet", "shapesdet")
REFERENCE_LIMIT = 50_000  # the most reference images read when eval.reference_samples is not set
STANDIN_TRAIN_LIMIT = 20_000
_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


# --- the dataset as evaluation sees it ----------------------------------------------------------------


@dataclass
class EvalData:
    """Where the real images are: the training shards, the held-out shards, their dataset.json."""

    train: str  # shard pattern, list or dataset folder
    val: str | None = None
    manifest: dict = field(default_factory=dict)
    folder: Path | None = None  # the dataset folder (caches go to folder/eval)
    assets: str | None = None

    @classmethod
    def from_trial(cls, trial) -> "EvalData":
        from harness.data.manifest import manifest_beside
        from harness.data.shards import expand_shards

        manifest, folder = manifest_beside(expand_shards(trial.data.shards))
        return cls(trial.data.shards, trial.data.val_shards, manifest or {}, Path(folder) if folder else None,
                   getattr(trial.resources, "assets", None))

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, assets: str | None = None) -> "EvalData":
        from harness.data.manifest import read_manifest

        folder = Path(folder)
        manifest = read_manifest(folder)
        if manifest is None:
            raise UserError(f"{folder}: no dataset.json; give the folder `ditscale data pack` wrote")
        val = str(folder) if "val" in manifest.get("splits", {}) else None
        return cls(str(folder), val, manifest, folder, assets)

    # -- facts ----------------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        return self.manifest.get("kind", "pixels")

    @property
    def is_shapes(self) -> bool:
        source = self.manifest.get("source") or {}
        return source.get("kind") == "builtin" and source.get("name") == "shapes"

    @property
    def has_labels(self) -> bool:
        return bool(self.manifest.get("num_classes")) and "cls" in self.manifest.get("fields", ["cls"])

    @property
    def pixel_size(self) -> int | None:
        return self.manifest.get("pixel_size") or self.manifest.get("image_size")

    def urls(self, split: str) -> list[str]:
        from harness.data.shards import expand_shards

        pattern = self.train if split == "train" else self.val
        if split not in ("train", "val"):
            if self.folder is None:
                raise UserError(f"eval.reference_split: {split!r}; use train or val")
            pattern = str(self.folder)
        if not pattern:
            raise UserError(f"eval.reference_split: {split}, but the study has no data.val_shards")
        return expand_shards(pattern, split)

    def split_identity(self, split: str) -> str:
        """Changes when the split is re-packed (cached statistics then become stale)."""
        entry = (self.manifest.get("splits") or {}).get(split) or {}
        if entry.get("shards"):
            blob = json.dumps([entry.get("pack_id"), [s.get("sha256") for s in entry["shards"]]])
        else:
            blob = json.dumps(self.urls(split))
        return hashlib.sha256(blob.encode()).hexdigest()[:8]

    def split_count(self, split: str) -> int | None:
        entry = (self.manifest.get("splits") or {}).get(split) or {}
        return entry.get("count")

    def cache_dir(self) -> Path:
        """folder/eval when it can be written, else a per-dataset folder under ~/.cache/ditscale/eval."""
        if self.folder is not None:
            candidate = self.folder / "eval"
            try:
                candidate.mkdir(exist_ok=True)
                probe = tempfile.NamedTemporaryFile(dir=candidate, prefix=".probe", delete=True)
                probe.close()
                return candidate
            except OSError:
                pass
        key = hashlib.sha256(str(self.folder or self.train).encode()).hexdigest()[:12]
        fallback = Path.home() / ".cache" / "ditscale" / "eval" / key
        fallback.mkdir(parents=True, exist_ok=True)
        return fallback


# --- reading real images ---------------------------------------------------------------------------


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] float [B, C, H, W] -> uint8 [B, H, W, 3] (grayscale repeated, as PIL's convert("RGB") does)."""
    u = ((x.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    if u.shape[1] == 1:
        u = u.expand(-1, 3, -1, -1)
    return u.permute(0, 2, 3, 1).contiguous().cpu().numpy()


class LatentDecoder:
    """The dataset's VAE: latents (as the loader yields them, or raw as stored) -> uint8 RGB images."""

    def __init__(self, manifest: dict, device, assets: str | None = None):
        from harness.assets import resolve_vae
        from harness.data.errors import DataError
        from harness.data.vae import load_vae

        meta = manifest.get("vae") or {}
        if not meta.get("name"):
            raise UserError("the shards hold latents but dataset.json names no VAE to decode them with")
        spec = resolve_vae(meta["name"], assets)
        try:
            self.vae = load_vae(spec, str(device))
        except DataError as err:
            raise UserError(f"FID on latents needs their VAE: {err}; copy it with `ditscale assets fetch --vae "
                            f"{meta['name']}` into the assets folder") from None
        self.scale = float(meta.get("scaling_factor", 1.0))
        self.shift = float(meta.get("shift_factor") or 0.0)
        self.device = device

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, scaled: bool = True) -> np.ndarray:
        z = latents.to(self.device, torch.float32)
        if scaled:  # the loader's (latent - shift) * scale, undone
            z = z / self.scale + self.shift
        images = self.vae.decode(z.to(self.vae.dtype)).sample
        return to_uint8(images)


def iter_real_images(data: EvalData, split: str, limit: int | None, batch_size: int = 256, *,
                     decoder: LatentDecoder | None = None, want_json: bool = False) -> Iterator[dict]:
    """Batches of real images of a split, in shard order: {"images": uint8 [B, H, W, 3], "cls": int64
    [B] or None, "txt": [...], "json": [...] (want_json)}; at most `limit` images."""
    from harness.data.codec import decode_npy, decode_png
    from harness.data.shards import open_shard
    from harness.data.tario import iter_samples

    rows: list = []
    taken = 0

    def flush():
        nonlocal rows
        xs = [r[0] for r in rows]
        if isinstance(xs[0], np.ndarray) and xs[0].dtype == np.uint8:
            images = np.stack([x if x.shape[2] == 3 else np.repeat(x, 3, axis=2) for x in xs])
        else:
            if decoder is None:
                raise UserError("the shards hold latents: decoding them needs the dataset's VAE")
            images = decoder.decode(torch.from_numpy(np.stack(xs).astype(np.float32)), scaled=False)
        cls = [r[1] for r in rows]
        batch = {"images": images, "cls": None if any(c is None for c in cls) else torch.tensor(cls),
                 "txt": [r[2] for r in rows], "json": [r[3] for r in rows]}
        rows = []
        return batch

    for url in data.urls(split):
        with open_shard(url) as stream:
            for sample in iter_samples(stream):
                if "__error__" in sample:
                    continue
                member = next((m for m in ("png", "jpg", "jpeg", "webp") if m in sample), None)
                try:
                    if member is not None:
                        x = decode_png(bytes(sample[member]))
                    elif "latent.npy" in sample:
                        x = np.array(decode_npy(sample["latent.npy"]))
                    else:
                        continue
                    label = int(bytes(sample["cls"])) if "cls" in sample else None
                    caption = bytes(sample["txt"]).decode("utf-8") if "txt" in sample else None
                    meta = json.loads(bytes(sample["json"])) if want_json and "json" in sample else None
                except (ValueError, OSError):
                    continue  # corrupt samples are counted by the loader in training; here they are skipped
                rows.append((x, label, caption, meta))
                taken += 1
                if len(rows) == batch_size:
                    yield flush()
                if limit is not None and taken >= limit:
                    break
        if limit is not None and taken >= limit:
            break
    if rows:
        yield flush()


# --- extractors ------------------------------------------------------------------------------------


def _standin_resize(image: np.ndarray) -> np.ndarray:
    """clean-fid `custom_fn_resize` of the stand-ins: no resize (they resize inside), float32 0..255."""
    return image.astype(np.float32)


@dataclass
class Extractor:
    """A feature network with clean-fid's calling convention: `model_fn(float [B, 3, H, W] 0..255)`
    -> [B, D], and `fn_resize(uint8 HWC) -> float32 HWC` applied per image before it."""

    name: str  # inception | lenet | shapesdet
    key: str  # names cached statistics: inception-clean, lenet-<weights hash>
    model_fn: Callable[[torch.Tensor], torch.Tensor]
    fn_resize: Callable[[np.ndarray], np.ndarray]
    device: torch.device
    module: torch.nn.Module | None = None  # the stand-in network (detection, prompt alignment)
    state: dict | None = None  # the stand-in's weights, for other ranks

    @property
    def is_inception(self) -> bool:
        return self.name == "inception"

    def metric(self, kind: str = "fd") -> str:
        """fid / kid for Inception; fd_<name> / kd_<name> for a stand-in (never fid)."""
        if self.is_inception:
            return "fid" if kind == "fd" else "kid"
        return f"{kind}_{self.name}"

    @torch.no_grad()
    def features(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """uint8 [N, H, W, 3] -> float32 [N, D], through the same steps clean-fid applies to files."""
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"expected uint8 [N, H, W, 3] images, got {images.dtype} {images.shape}")
        out = []
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            if self.fn_resize is _standin_resize:  # the per-image path, vectorised (same values)
                batch = torch.from_numpy(np.ascontiguousarray(chunk)).permute(0, 3, 1, 2).float()
            else:
                batch = torch.stack([_cleanfid_tensor(self.fn_resize(img)) for img in chunk])
            out.append(self.model_fn(batch.to(self.device)).detach().float().cpu().numpy())
        if not out:
            return np.zeros((0, 0), np.float32)
        return np.concatenate(out).astype(np.float32, copy=False)


def _cleanfid_tensor(resized: np.ndarray) -> torch.Tensor:
    """cleanfid.utils.ResizeDataset.__getitem__'s conversion of a resized image to a tensor."""
    import torchvision

    to_tensor = torchvision.transforms.ToTensor()
    if resized.dtype == np.uint8:
        return to_tensor(np.array(resized)) * 255
    return to_tensor(resized)


def inception_extractor(path: Path, device) -> Extractor:
    from cleanfid.inception_torchscript import InceptionV3W
    from cleanfid.resize import build_resizer

    try:
        model = InceptionV3W(str(path.parent), download=False, resize_inside=False).to(device).eval()
    except Exception as err:  # noqa: BLE001 - a truncated or foreign file fails inside torch.jit.load
        raise UserError(f"cannot load the Inception weights {path} ({type(err).__name__}: {err}); delete the file "
                        "and copy it again (`ditscale assets fetch`)") from None
    return Extractor("inception", "inception-clean", lambda x: model(x), build_resizer("clean"), torch.device(device))


def standin_extractor(state: dict, device) -> Extractor:
    from harness.standin import standin_from_state, state_digest

    net = standin_from_state(state, device)
    return Extractor(state["name"], f"{state['name']}-{state_digest(state)}", lambda x: net(x), _standin_resize,
                     torch.device(device), module=net, state=state)


def standin_for(data: EvalData) -> str | None:
    """The stand-in a dataset can train: shapesdet for the built-in shapes, lenet for labelled data."""
    if data.is_shapes:
        return "shapesdet"
    if data.has_labels:
        return "lenet"
    return None


def ensure_standin(name: str, data: EvalData, device="cpu", progress: bool = False) -> dict:
    """The stand-in's state (weights and config): from the cache beside the shards, else trained on the
    training split (once: concurrent trials wait on a file lock and then read the cached file)."""
    from harness.standin import VERSION, load_standin_state, save_standin, shapes_targets, train_standin

    if name == "shapesdet" and not data.is_shapes:
        raise UserError("eval.feature_extractor: shapesdet detects the built-in `shapes` scenes only; "
                        "use lenet or auto")
    if name == "lenet" and not data.has_labels:
        raise UserError("eval.feature_extractor: lenet is trained on class labels, and the shards have none")
    key = hashlib.sha256(json.dumps([name, VERSION, data.split_identity("train"), data.pixel_size]).encode())
    path = data.cache_dir() / f"standin-{name}-{key.hexdigest()[:12]}.pt"
    if not path.is_file():
        with file_lock(path.with_name(path.name + ".lock")):
            if not path.is_file():
                decoder = LatentDecoder(data.manifest, device, data.assets) if data.kind == "latents" else None
                images, labels, scenes = [], [], []
                for batch in iter_real_images(data, "train", STANDIN_TRAIN_LIMIT, decoder=decoder,
                                              want_json=name == "shapesdet"):
                    images.append(batch["images"])
                    if name == "lenet":
                        labels.append(batch["cls"])
                    else:
                        scenes += batch["json"]
                if not images:
                    raise UserError(f"{data.train}: no readable images to train the {name} stand-in on")
                images = np.concatenate(images)
                if name == "lenet":
                    targets = torch.cat(labels)
                    config = {"num_classes": int(data.manifest.get("num_classes") or int(targets.max()) + 1),
                              "image_size": int(images.shape[1])}
                else:
                    if any(s is None for s in scenes):
                        raise UserError(f"{data.train}: shapes samples without their json attributes; re-pack them")
                    targets = shapes_targets(scenes)
                    config = {"image_size": int(images.shape[1])}
                print(f"evaluation: training the {name} stand-in feature extractor on {len(images)} images "
                      "(once per dataset)", file=sys.stderr, flush=True)
                net, meta = train_standin(name, images, targets, config, device=device)
                save_standin(net.cpu(), path, meta)
                print(f"evaluation: {name} stand-in: held-out accuracy {meta['accuracy']:.3f} after "
                      f"{meta['seconds']:.1f} s -> {path}", file=sys.stderr, flush=True)
    return load_standin_state(path)


def choose_extractor(requested: str, data: EvalData, device, *, progress: bool = False,
                     need_detector: bool = False) -> tuple[Extractor | None, Extractor | None]:
    """(feature extractor for FD / KD or None, shapes detector for prompt alignment or None).

    requested: auto (Inception when its weights are present, else the dataset's stand-in, with one
    clear warning), inception (an error when absent), lenet, shapesdet."""
    if requested not in EXTRACTORS:
        raise UserError(f"eval.feature_extractor: {requested!r}; allowed: {', '.join(EXTRACTORS)}")
    extractor = None
    if requested in ("auto", "inception"):
        path = find_inception(data.assets)
        if path is not None:
            extractor = inception_extractor(path, device)
        elif requested == "inception":
            raise UserError(f"eval.feature_extractor: inception, but its weights are missing: "
                            f"{missing_inception_hint(data.assets)}")
        else:
            fallback = standin_for(data)
            if fallback is None:
                warn_once("no-extractor", "FID: the Inception weights are missing and this dataset has no stand-in "
                                          "(it needs class labels, or the built-in shapes); no Fréchet distance is "
                                          f"computed. For FID, {missing_inception_hint(data.assets)}")
            else:
                warn_once("standin", f"FID: the Inception weights are missing, so FID is NOT computed; a stand-in "
                                     f"({fallback}, a small network trained on this dataset) is used instead and its "
                                     f"metrics are named fd_{fallback}_cfg*, never fid. For real FID, "
                                     f"{missing_inception_hint(data.assets)}")
                extractor = standin_extractor(ensure_standin(fallback, data, device, progress), device)
    else:
        extractor = standin_extractor(ensure_standin(requested, data, device, progress), device)
    detector = None
    if need_detector and data.is_shapes:
        detector = extractor if extractor is not None and extractor.name == "shapesdet" else \
            standin_extractor(ensure_standin("shapesdet", data, device, progress), device)
    return extractor, detector


# --- reference statistics ----------------------------------------------------------------------------


def reference_path(data: EvalData, extractor: Extractor, split: str, limit: int | None) -> Path:
    wanted = min(limit or REFERENCE_LIMIT, REFERENCE_LIMIT)
    count = data.split_count(split)
    n = min(wanted, count) if count else wanted
    res = data.pixel_size or "na"
    return data.cache_dir() / f"fid_stats_{extractor.key}_{split}_{res}px_n{n}_{data.split_identity(split)}.npz"


def reference_stats(data: EvalData, extractor: Extractor, split: str = "train", limit: int | None = None, *,
                    batch_size: int = 64, device="cpu", progress: bool = False) -> dict:
    """{"mu", "sigma", "feats", "count", "path", "computed"}: cached, else one feature pass over the
    first `limit` images of the split (default: all, up to 50,000), written once under a lock."""
    path = reference_path(data, extractor, split, limit)
    computed = False
    if not path.is_file():
        with file_lock(path.with_name(path.name + ".lock")):
            if not path.is_file():
                decoder = LatentDecoder(data.manifest, device, data.assets) if data.kind == "latents" else None
                feats = []
                batches = iter_real_images(data, split, min(limit or REFERENCE_LIMIT, REFERENCE_LIMIT),
                                           batch_size=max(batch_size, 64), decoder=decoder)
                if progress:
                    from tqdm.auto import tqdm

                    batches = tqdm(batches, desc=f"reference features ({split})", leave=False)
                for batch in batches:
                    feats.append(extractor.features(batch["images"], batch_size))
                if not feats or sum(len(f) for f in feats) < 2:
                    raise UserError(f"the {split} split has fewer than 2 readable images: no reference statistics")
                feats = np.concatenate(feats)
                save_stats(path, feats)
                computed = True
    with np.load(path) as stats:
        return {"mu": stats["mu"], "sigma": stats["sigma"], "feats": stats["feats"], "count": int(len(stats["feats"])),
                "path": path, "computed": computed}


def save_stats(path: Path, feats: np.ndarray) -> None:
    """clean-fid's custom statistics (mu, sigma; feats for KID) in one .npz, written atomically."""
    mu, sigma = np.mean(feats, axis=0), np.cov(feats, rowvar=False)
    buf = io.BytesIO()
    np.savez_compressed(buf, mu=mu, sigma=sigma, feats=feats)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(buf.getvalue())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- distances -------------------------------------------------------------------------------------------


def frechet_distance(feats: np.ndarray, ref_mu: np.ndarray, ref_sigma: np.ndarray) -> float:
    """clean-fid's Fréchet distance between N(mean, cov) of `feats` and the reference Gaussian."""
    from cleanfid.fid import frechet_distance as cleanfid_frechet

    if len(feats) < 2:
        raise ValueError("a Fréchet distance needs at least 2 samples")
    mu, sigma = np.mean(feats, axis=0), np.cov(feats, rowvar=False)
    with _blas_threads():
        return float(cleanfid_frechet(mu, sigma, ref_mu, ref_sigma))


def kernel_distance(feats: np.ndarray, ref_feats: np.ndarray, seed: int = 0) -> float:
    """clean-fid's KID (unbiased MMD^2, cubic polynomial kernel, 100 subsets of up to 1000), with its
    random subsets drawn from a fixed seed; numpy's global RNG is restored afterwards."""
    from cleanfid.fid import kernel_distance as cleanfid_kernel

    state = np.random.get_state()
    np.random.seed(seed)
    try:
        with _blas_threads():
            return float(cleanfid_kernel(ref_feats, feats))
    finally:
        np.random.set_state(state)


def _blas_threads():
    """numpy's BLAS limited to torch's thread count (a Ray worker's CPUs): an oversubscribed BLAS
    spins instead of working when trials share a machine."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(limits=torch.get_num_threads(), user_api="blas")


# --- folders of images (tools, tests) -------------------------------------------------------------------


def folder_images(folder: str | os.PathLike) -> np.ndarray:
    """Every image under `folder` (clean-fid's extensions, sorted, recursive) as uint8 [N, H, W, 3],
    read the way clean-fid reads them (PIL, convert("RGB"))."""
    from cleanfid.utils import EXTENSIONS
    from PIL import Image

    files = sorted(f for ext in EXTENSIONS for f in glob.glob(os.path.join(str(folder), f"**/*.{ext}"), recursive=True))
    if not files:
        raise UserError(f"{folder}: no images")
    return np.stack([np.array(Image.open(f).convert("RGB")) for f in files])


def folder_distance(folder1: str | os.PathLike, folder2: str | os.PathLike, extractor: Extractor) -> float:
    """The Fréchet distance between two image folders in the extractor's features."""
    f1 = extractor.features(folder_images(folder1))
    f2 = extractor.features(folder_images(folder2))
    return frechet_distance(f1, np.mean(f2, axis=0), np.cov(f2, rowvar=False))
