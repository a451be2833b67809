"""Feature extractors for FID, the dataset's reference statistics, and the distances themselves
(the images they are computed from: harness/evaluation/dataset.py).

The FID of record is clean-fid's: its TorchScript Inception-v3, its "clean" resize (PIL bicubic to
299 x 299 on float images), `frechet_distance` on the features' mean and covariance, and
`kernel_distance` for KID. Images go through exactly the steps clean-fid applies to an image file
(uint8 RGB -> resize -> tensor), so a folder of our samples scores the same here as with
`cleanfid.fid.compute_fid` (tests/evaluation/test_evaluate.py checks it).

Without the Inception weights (see harness/assets.py) a stand-in network trained on the dataset
(harness/evaluation/standin.py) is used and its metrics are named `fd_<name>` / `kd_<name>`, never fid / kid.

Reference statistics are computed once per (feature extractor, resolution, split, sample count,
packing of the split) and cached beside the shards as clean-fid's custom statistics are: an .npz
with `mu`, `sigma` and the features (`feats`, for KID). Caches live in `<dataset>/eval/`, or in
~/.cache/ditscale/eval/ when the dataset folder is read-only or remote. Writers take a file lock and
rename a finished temporary file into place, so concurrent trials never race or see half a file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from harness.assets import file_lock, find_inception, missing_inception_hint
from harness.errors import UserError
from harness.evaluation.dataset import EvalData, LatentDecoder, folder_images, iter_real_images, warn_once
from harness.evaluation.standin import (
    VERSION,
    load_standin_state,
    save_standin,
    shapes_targets,
    standin_from_state,
    state_digest,
    train_standin,
)
from harness.files import atomic_write
from harness.tracking import DETECTOR_TAG

log = logging.getLogger("harness.evaluation")

EXTRACTORS = ("auto", "inception", "lenet", "shapesdet")
REFERENCE_LIMIT = 50_000  # the most reference images read when eval.reference_samples is not set
STANDIN_TRAIN_LIMIT = 20_000
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
    # fn_resize returns float32 HWC: stacked in one go, the values ToTensor gives a float array (it only
    # rescales uint8), without its per-image cost (~8 ms an image at 224 px)
    float_resize: bool = False

    @property
    def is_inception(self) -> bool:
        return self.name == "inception"

    @property
    def identity(self) -> str:
        """What the FD's scale depends on, logged with every FD as the run tag `ditscale.detector`:
        `inception@clean` (clean-fid's fixed TorchScript weights), or `<stand-in>@<sha256 of its
        weights, 10 hex>` — two runs' fd_<name> are comparable only when this is equal (the report
        refuses to rank or fit FDs of different detectors together)."""
        return "inception@clean" if self.is_inception else self.key.replace(f"{self.name}-", f"{self.name}@", 1)

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
            elif self.float_resize:
                batch = torch.from_numpy(np.stack([self.fn_resize(img) for img in chunk])).permute(0, 3, 1, 2)
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


def metric_network(metric: str, model_class, assets, device, identify: bool = True):
    """(eval.metrics' `metric` network loaded by transformers' `model_class` from the assets folder, in eval
    mode; the sha256 of its weights file, 10 hex, or None without `identify`). A missing folder is a
    UserError naming it and the fetch command, never a stand-in. Hashing the weights (~1-2 GB for the
    ViT-L networks, a few seconds) is done where the key is needed: on the rank that names the statistics."""
    from harness.assets import WEIGHT_FILES, file_sha256, find_metric_weights, missing_metric_weights

    folder = find_metric_weights(metric, assets)
    if folder is None:
        raise UserError(missing_metric_weights(metric, assets))
    try:
        model = model_class.from_pretrained(str(folder)).to(device).eval()
    except Exception as err:  # noqa: BLE001 - a truncated or foreign folder fails deep inside transformers
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"eval.metrics: {metric}: cannot load {folder} with {model_class.__name__} ({first}); "
                        f"delete the folder and fetch it again (`ditscale assets fetch --metric {metric}`)") from None
    digest = None
    if identify:
        weights = next(folder / name for name in WEIGHT_FILES if (folder / name).is_file())
        digest = file_sha256(weights)[:10]
    return model, digest


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
    with atomic_write(path) as out:
        np.savez_compressed(out, mu=mu, sigma=sigma, feats=feats)


# --- distances -------------------------------------------------------------------------------------------


def frechet_distance(feats: np.ndarray, ref_mu: np.ndarray, ref_sigma: np.ndarray) -> float:
    """clean-fid's Fréchet distance between N(mean, cov) of `feats` and the reference Gaussian."""
    from cleanfid.fid import frechet_distance as cleanfid_frechet

    if len(feats) < 2:
        raise ValueError("a Fréchet distance needs at least 2 samples")
    mu, sigma = np.mean(feats, axis=0), np.cov(feats, rowvar=False)
    with _blas_threads():
        return float(cleanfid_frechet(mu, sigma, ref_mu, ref_sigma))


def frechet_distance_spread(feats: np.ndarray, ref_mu: np.ndarray, ref_sigma: np.ndarray, draws: int = 10,
                            seed: int = 0) -> float:
    """How far the Fréchet distance of these N samples would move with a fresh draw of N samples (the
    reference statistics fixed, as they are between trials): the standard deviation of the FD over
    `draws` random halves of the samples, drawn without replacement. For a statistic whose variance
    goes as 1/N, a half varies twice as much as the whole, and drawing it from these N samples
    (finite-population correction 1 − 1/2) halves that again, so the half-sample SD estimates the
    N-sample SD (half-sampling, McCarthy 1969; subsampling, Politis, Romano & Wolf 1999). The FD is not
    a mean and its variance falls a little faster than 1/N in high dimension, so the estimate runs high:
    conservative. Measured on Gaussian features against the SD over fresh draws: 0.99x at d = 32,
    N = 256 (tests/evaluation/test_evaluate.py), 1.3x at d = 144, N = 512, where bootstrap resamples (with
    replacement) gave 1.6x. The FD of N samples is a random quantity (Chong & Forsyth 2020, "Effectively
    Unbiased FID and Inception Score", CVPR); the report compares FD gaps with this spread.

    Cost: `draws` more FDs (with Inception each a 2048 × 2048 matrix square root, about a second on a
    CPU) per CFG scale and evaluation. NaN for fewer than 2 draws, and when a half has no more samples
    than features (its covariance is singular, its FD undefined) or an FD fails."""
    n, dim = feats.shape if feats.ndim == 2 else (len(feats), 1)
    if draws < 2 or n // 2 <= dim:
        return math.nan
    rng = np.random.default_rng(seed)
    try:
        values = [frechet_distance(feats[rng.permutation(n)[: n // 2]], ref_mu, ref_sigma) for _ in range(draws)]
    except ValueError:  # clean-fid: "Imaginary component" of a near-singular product
        return math.nan
    return float(np.std(values, ddof=1))


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
        return contextlib.nullcontext()
    return threadpool_limits(limits=torch.get_num_threads(), user_api="blas")


# --- folders of images (tools, tests) -------------------------------------------------------------------


def folder_distance(folder1: str | os.PathLike, folder2: str | os.PathLike, extractor: Extractor) -> float:
    """The Fréchet distance between two image folders in the extractor's features."""
    f1 = extractor.features(folder_images(folder1))
    f2 = extractor.features(folder_images(folder2))
    return frechet_distance(f1, np.mean(f2, axis=0), np.cov(f2, rowvar=False))
