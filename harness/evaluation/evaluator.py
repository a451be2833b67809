"""Evaluation of a trial: validation loss, FID (clean-fid) per CFG scale, prompt alignment, sample grids.

    evaluator = Evaluator(trial, info, conditioner, objective, dist)
    if evaluator.due(step, final=step == trial.train.steps):
        with ema.swapped_into(model):             # the EMA weights, as DiT evaluates
            model.eval()
            metrics, images = evaluator.run(model, step)   # on every rank (collective)
            model.train()

What `run` measures (metrics are valid on rank 0):

    val_loss, val_mse      the objective's loss (and its MSE term) on the first eval.val_batches x
                           eval.batch_size held-out samples, each at a fixed timestep (stratified over
                           the training distribution, assigned by a fixed permutation) and with fixed
                           noise (seeded per sample). Deterministic, so it is comparable across
                           trials and evaluations; the default y-axis of the scaling fits.
    se_val_loss            the standard error of val_loss: its spread over redraws of the validation
                           images and noise, by the collapsed-strata estimator (one sample per timestep
                           stratum; `stratified_standard_error`). It covers a fresh draw of images, so
                           it exceeds the spread over eval.seed alone (same images, each used once):
                           0.0063 vs 0.0024 in tests/evaluation/test_evaluate.py. Named so that analysis/runs.py
                           never takes it for a loss (its regexes match val_loss*, not se_*).
    fid_cfg<s>, kid_cfg<s> clean-fid's FID / KID of eval.fid_samples images sampled with the EMA
                           weights, eval.sampler, eval.sampling_steps and CFG scale s, decoded with
                           the dataset's VAE when the data are latents, against the dataset's cached
                           reference statistics (harness/evaluation/features.py). Without Inception weights:
                           fd_<stand-in>_cfg<s>, kd_<stand-in>_cfg<s> — never fid.
    se_fid_cfg<s>, se_fd_… the FID's / FD's spread over sampling draws (eval.fd_spread_draws random
                           halves of the samples: `frechet_distance_spread`), the noise the report
                           compares FD gaps with.
    fd_dinov2_cfg<s>,      eval.metrics: fd_dinov2 — the FD in DINOv2 ViT-L/14 features (dgm-eval's
    se_fd_dinov2_cfg<s>    preprocessing; harness/evaluation/dinov2.py), with the same spread estimate.
    cmmd_cfg<s>            eval.metrics: cmmd — 1000 · unbiased MMD² of CLIP ViT-L/14@336 embeddings,
                           RBF σ = 10 (harness/evaluation/cmmd.py). fid_cfg<s> and its stand-ins only
                           when eval.metrics lists fid (the default: [fid]).
    prompt_alignment_cfg<s> captioned `shapes` only: the fraction of samples whose detected colours,
                           shapes and positions match their caption.
    eval_seconds           wall time of the evaluation.

Artifacts: one 8 x 8 sample grid per CFG scale, as {"samples/step-00001000_cfg1.5.png": PIL image}, and
the per-sample validation losses as a table {"val_losses/step-00001000.json": {sample, t, loss}} (the
report pairs two trials' losses sample by sample to judge their gap: `harness.evaluation.noise`).

Sampling is spread over the trial's workers: the samples are cut into batches of eval.batch_size,
batch k goes to rank k mod world_size, and its noise and conditions depend on k alone (class labels
cycle through the classes; captions come from the held-out shards), so the result does not depend on
the number of workers. Every CFG scale uses the same noise and conditions. Features (not images)
are gathered to rank 0. With ZeRO-3 every forward is a collective, so each rank runs the same
number of batches (a rank short of work samples a throw-away batch).
"""

from __future__ import annotations

import logging
import math
import sys
import time

import numpy as np
import torch
import torch.distributed as tdist
from PIL import Image
from torchvision.utils import make_grid
from tqdm.auto import tqdm

from harness.assets import find_inception, missing_inception_hint
from harness.common.process_group import DistInfo, broadcast_object
from harness.data.loader import make_loader
from harness.errors import UserError
from harness.evaluation import cmmd as cmmd_metric
from harness.evaluation.dataset import EvalData, LatentDecoder, to_uint8, warn_once
from harness.evaluation.dinov2 import dinov2_extractor
from harness.evaluation.features import (DETECTOR_TAG, choose_extractor, ensure_standin, frechet_distance,
                                         frechet_distance_spread, inception_extractor, kernel_distance,
                                         reference_stats, standin_extractor)
from harness.evaluation.noise import VAL_LOSSES_DIR, stratified_standard_error
from harness.evaluation.standin import alignment_counts

log = logging.getLogger("harness.evaluation")

GRID_IMAGES = 64
# eval.metrics beyond fid -> the loader of its feature network (assets, device, identify)
METRIC_EXTRACTORS = {"fd_dinov2": dinov2_extractor, "cmmd": cmmd_metric.clip_extractor}
PROMPT_POOL_PRECOMPUTED = 2048  # distinct captions kept for sampling when their embeddings are precomputed


def cfg_suffix(scale: float) -> str:
    return f"_cfg{float(scale)}"


def _partitioned(model: torch.nn.Module) -> bool:
    """ZeRO-3 partitions parameters (tagged with ds_id): every forward gathers them collectively."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


class Evaluator:
    def __init__(self, trial, info, conditioner, objective, dist: DistInfo, *, data: EvalData | None = None,
                 progress: bool | None = None):
        self.trial, self.info, self.conditioner, self.objective, self.dist = trial, info, conditioner, objective, dist
        self.e = trial.eval
        self.data = data
        self.progress = (dist.is_main and sys.stderr.isatty()) if progress is None else progress
        self.sampler = self.e.sampler if self.e.sampler != "auto" else objective.default_sampler
        if self.e.fid_samples and self.sampler not in objective.samplers:
            raise UserError(f"eval.sampler: {self.sampler!r} does not sample {objective.kind}; use one of "
                            f"{', '.join(objective.samplers)}")
        self.extractor = self.detector = self.reference = self.decoder = None
        self.metrics = list(dict.fromkeys(self.e.metrics))
        self.extras: dict = {}  # fd_dinov2 / cmmd -> Extractor (every rank)
        self.extra_refs: dict = {}  # fd_dinov2 / cmmd -> reference statistics (rank 0)
        self._prepared = False
        self._val: list | None = None
        self._prompts: dict | None = None
        if self.e.val_batches and not trial.data.val_shards:
            warn_once("no-val", "eval.val_batches: the study has no data.val_shards, so no val_loss is logged")

    # -- when --------------------------------------------------------------------------------------
    @property
    def wants_fid(self) -> bool:
        return self.e.fid_samples > 0

    @property
    def wants_val(self) -> bool:
        return self.e.val_batches > 0 and bool(self.trial.data.val_shards)

    def due(self, step: int, final: bool) -> bool:
        """At multiples of eval.every and at the final step, when there is anything to evaluate."""
        if not (self.wants_fid or self.wants_val):
            return False
        return final or (self.e.every is not None and step > 0 and step % self.e.every == 0)

    # -- the evaluation -----------------------------------------------------------------------------
    def run(self, model: torch.nn.Module, step: int) -> tuple[dict[str, float], dict]:
        """Collective: every rank calls it with the EMA weights in `model` (in eval mode). Returns
        (metrics, {artifact file: PIL image, or a table as {column: list}}), complete on rank 0. The
        global RNGs are left untouched."""
        started = time.perf_counter()
        device = self.dist.device
        metrics: dict[str, float] = {}
        images: dict = {}
        cuda = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda), torch.no_grad():
            if self.wants_val:
                val, table = self._validation_loss(model)
                metrics.update(val)
            if self.wants_fid:
                self._prepare()
                m, images = self._sample_metrics(model, step)
                metrics.update(m)
        if self.wants_val and table is not None:
            images[val_losses_file(step)] = table
        metrics["eval_seconds"] = time.perf_counter() - started
        return metrics, images

    def tags(self) -> dict[str, str]:
        """Run tags for what was evaluated: the FD's detector (features.DETECTOR_TAG), and each further
        metric's network as DETECTOR_TAG.<metric>, once prepared."""
        tags = {DETECTOR_TAG: self.extractor.identity} if self.extractor is not None else {}
        tags.update({f"{DETECTOR_TAG}.{m}": ex.identity for m, ex in self.extras.items() if self.dist.is_main})
        return tags

    # -- preparation: feature extractor, reference statistics, VAE ------------------------------------
    def _prepare(self) -> None:
        if self._prepared:
            return
        device = self.dist.device
        if self.data is None:
            self.data = EvalData.from_trial(self.trial)
        need_detector = self.trial.data.conditioning == "text"
        spec, error = None, None
        if self.dist.is_main:
            try:
                if "fid" in self.metrics:
                    self.extractor, self.detector = choose_extractor(self.e.feature_extractor, self.data, device,
                                                                     progress=self.progress,
                                                                     need_detector=need_detector)
                elif need_detector and self.data.is_shapes:
                    self.detector = standin_extractor(ensure_standin("shapesdet", self.data, device), device)
                self._prepare_extras(identify=True)
                if self.extractor is not None:
                    self.reference = reference_stats(self.data, self.extractor, self.e.reference_split,
                                                     self.e.reference_samples, batch_size=self.e.batch_size,
                                                     device=device, progress=self.progress)
                spec = {"extractor": None if self.extractor is None else
                        ("inception" if self.extractor.is_inception else self.extractor.state),
                        "detector": None if self.detector is None else self.detector.state}
            except Exception as err:
                error = err
        # Rank 0 decided (and trained a stand-in, if one was needed): the others follow its choice.
        shared = broadcast_object((spec, None if error is None else f"{type(error).__name__}: {error}"))
        if error is not None:
            raise error
        if shared[1] is not None:
            raise RuntimeError(f"evaluation failed on rank 0: {shared[1]}")
        if not self.dist.is_main:
            spec = shared[0]
            if spec["extractor"] == "inception":
                path = find_inception(self.data.assets)
                if path is None:
                    raise UserError(f"rank {self.dist.rank}: the Inception weights are missing on this node: "
                                    f"{missing_inception_hint(self.data.assets)}")
                self.extractor = inception_extractor(path, device)
            elif spec["extractor"] is not None:
                self.extractor = standin_extractor(spec["extractor"], device)
            if spec["detector"] is not None:
                self.detector = standin_extractor(spec["detector"], device)
            self._prepare_extras(identify=False)
        if self.data.kind == "latents":
            self.decoder = LatentDecoder(self.data.manifest, device, self.data.assets)
        self._prepared = True

    def _prepare_extras(self, identify: bool) -> None:
        """eval.metrics beyond fid: their networks from the assets folder (a UserError naming the folder
        when one is missing), and on rank 0 (`identify`) their cached reference statistics."""
        device = self.dist.device
        for metric in self.metrics:
            if metric not in METRIC_EXTRACTORS:
                continue
            extractor = METRIC_EXTRACTORS[metric](self.data.assets, device, identify)
            self.extras[metric] = extractor
            if identify:
                ref = reference_stats(self.data, extractor, self.e.reference_split, self.e.reference_samples,
                                      batch_size=self.e.batch_size, device=device, progress=self.progress)
                if metric == "cmmd":
                    ref["self_term"] = cmmd_metric.cached_self_term(ref)
                self.extra_refs[metric] = ref

    # -- validation loss ------------------------------------------------------------------------------
    def _validation_set(self) -> list:
        """This rank's share of the fixed validation set: [(batch, t, noise)], read once and cached."""
        if self._val is not None:
            return self._val
        d = self.trial.data
        precomputed = d.conditioning == "text" and d.text_encoder == "precomputed"
        loader = make_loader(d.val_shards, self.e.batch_size, resampled=False, shuffle=0, conditioning=d.conditioning,
                             text_embeddings=precomputed, num_workers=0, partial=True, split="val")
        batches = []
        for batch in loader:
            batches.append(batch)
            if len(batches) >= self.e.val_batches:
                break
        total = sum(len(b["x"]) for b in batches)
        gen = torch.Generator().manual_seed(self.e.seed)
        t_all = self.objective.validation_timesteps(total, "cpu")[torch.randperm(total, generator=gen)]
        own, start = [], 0
        for index, batch in enumerate(batches):
            n = len(batch["x"])
            if index % self.dist.world_size == self.dist.rank:
                own.append((batch, t_all[start:start + n], self._val_noise(batch, start), start))
            start += n
        if total == 0:
            warn_once("empty-val", f"data.val_shards: {d.val_shards} holds no readable samples; no val_loss")
        self._val = own
        self._val_rounds = math.ceil(len(batches) / self.dist.world_size)
        # ZeRO-3 filler for a rank with fewer batches than the others (possibly none)
        first = batches[0] if batches else None
        self._val_filler = (first, t_all[:len(first["x"])], self._val_noise(first, 0), 0) if first else None
        return own

    def _val_noise(self, batch: dict, start: int) -> torch.Tensor:
        """Fixed noise: sample j of the validation set always gets the draw seeded by (eval.seed, j)."""
        return torch.stack([
            torch.randn(batch["x"].shape[1:], generator=torch.Generator().manual_seed(self.e.seed * 1_000_003 + j))
            for j in range(start, start + len(batch["x"]))])

    def _validation_loss(self, model) -> tuple[dict[str, float], dict | None]:
        """(val_loss, val_mse, se_val_loss; the per-sample table {sample, t, loss} on rank 0)."""
        device = self.dist.device
        own = self._validation_set()
        work: list = list(own)
        if _partitioned(model):
            work += [None] * (self._val_rounds - len(own))  # ZeRO-3: every rank runs as many forwards
        sums = torch.zeros(3, dtype=torch.float64, device=device)
        per_sample = []  # (sample index, t, loss) of this rank's samples
        for item in work:
            batch, t, noise, start = item if item is not None else self._val_filler
            terms = self.objective.loss_terms(model, batch["x"].to(device), self.conditioner.from_batch(batch),
                                              t=t.to(device), noise=noise.to(device))
            if item is not None:  # a ZeRO-3 filler batch is not part of the validation set
                sums += torch.stack([terms["loss"].double().sum(), terms["mse"].double().sum(),
                                     torch.tensor(float(len(t)), dtype=torch.float64, device=device)])
                index = np.arange(start, start + len(t), dtype=np.float64)
                per_sample.append(np.stack([index, t.double().cpu().numpy(),
                                            terms["loss"].double().cpu().numpy()], axis=1))
        sums = self._all_reduce(sums)
        gathered = self._gather(per_sample)
        if sums[2] == 0:
            return {}, None
        metrics = {"val_loss": float(sums[0] / sums[2]), "val_mse": float(sums[1] / sums[2])}
        if not (self.dist.is_main and gathered):
            return metrics, None
        rows = np.concatenate(gathered)
        rows = rows[np.argsort(rows[:, 0], kind="stable")]
        se = stratified_standard_error(rows[:, 1], rows[:, 2])
        if math.isfinite(se):
            metrics["se_val_loss"] = se
        # Every trial scores the same samples (same images, t and noise): the report pairs two trials'
        # per-sample losses to judge their gap, which is far less noisy than their two se's combined.
        table = {"sample": rows[:, 0].astype(int).tolist(), "t": rows[:, 1].tolist(), "loss": rows[:, 2].tolist()}
        return metrics, table

    # -- sampling -----------------------------------------------------------------------------------
    def _prompt_pool(self) -> dict:
        """Captions to sample with (held-out shards, else training shards), with their precomputed
        embeddings when the study uses them."""
        if self._prompts is not None:
            return self._prompts
        d = self.trial.data
        precomputed = d.text_encoder == "precomputed"
        limit = min(self.e.fid_samples, PROMPT_POOL_PRECOMPUTED) if precomputed else self.e.fid_samples
        pattern = d.val_shards or d.shards
        loader = make_loader(pattern, 256, resampled=False, shuffle=0, conditioning="text",
                             text_embeddings=precomputed, num_workers=0, partial=True,
                             split="val" if d.val_shards else "train")
        captions, tensors = [], {"txt_tokens": [], "txt_mask": [], "txt_pooled": []}
        for batch in loader:
            captions += batch["txt"]
            if precomputed:
                for key in tensors:
                    tensors[key].append(batch[key].half() if batch[key].is_floating_point() else batch[key])
            if len(captions) >= limit:
                break
        if not captions:
            raise UserError(f"data.val_shards: no captions to sample with in {pattern}")
        pool = {"txt": captions[:limit]}
        if precomputed:
            pool.update({k: torch.cat(v)[:limit] for k, v in tensors.items()})
        self._prompts = pool
        return pool

    def _conditions(self, first: int, n: int) -> tuple[dict, list[str] | None]:
        """The model's condition for samples first .. first + n - 1 (and their captions)."""
        index = torch.arange(first, first + n)
        if self.trial.data.conditioning == "class":
            classes = self.info.num_classes or 1
            return self.conditioner.from_labels(index % classes), None
        pool = self._prompt_pool()
        rows = (index % len(pool["txt"])).tolist()
        captions = [pool["txt"][i] for i in rows]
        if "txt_tokens" in pool:
            batch = {"txt": captions, **{k: pool[k][rows].float() if pool[k].is_floating_point() else pool[k][rows]
                                         for k in ("txt_tokens", "txt_mask", "txt_pooled")}}
            return self.conditioner.from_batch(batch), captions
        return self.conditioner.from_captions(captions), captions

    def _sample_metrics(self, model, step: int) -> tuple[dict[str, float], dict]:
        e, dist, device = self.e, self.dist, self.dist.device
        n_total, size = e.fid_samples, e.batch_size
        chunks = math.ceil(n_total / size)
        mine: list = list(range(dist.rank, chunks, dist.world_size))
        if _partitioned(model):
            mine += [None] * (math.ceil(chunks / dist.world_size) - len(mine))
        shape = (self.trial.data.channels, self.trial.data.image_size, self.trial.data.image_size)
        metrics: dict[str, float] = {}
        grids: dict = {}
        for scale in e.cfg_scale:
            feats, matched, judged, grid = [], 0, 0, None
            extra_feats: dict = {m: [] for m in self.extras}
            work = mine
            if self.progress:
                work = tqdm(mine, desc=f"sampling cfg {scale} ({n_total} images)", leave=False)
            for k in work:
                kk = 0 if k is None else k
                n = min(size, n_total - kk * size)
                cond, captions = self._conditions(kk * size, n)
                gen = torch.Generator(device=device).manual_seed(e.seed * 10_000_019 + kk)
                x = self.objective.sample(model, (n, *shape), cond, steps=e.sampling_steps, cfg_scale=scale,
                                          sampler=self.sampler, generator=gen, device=device)
                if k is None:
                    continue  # ZeRO-3 filler: the forwards had to happen, the samples are not counted
                images = self.decoder.decode(x) if self.decoder is not None else to_uint8(x)
                if self.extractor is not None:
                    feats.append((k, self.extractor.features(images, size)))
                for metric, extractor in self.extras.items():
                    extra_feats[metric].append((k, extractor.features(images, size)))
                if self.detector is not None and captions is not None:
                    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float().to(device)
                    m, j = alignment_counts(self.detector.module, pixels, captions)
                    matched, judged = matched + m, judged + j
                if k == 0:
                    grid = images[:GRID_IMAGES]
            gathered = self._gather(feats)
            extra_gathered = {m: self._gather(f) for m, f in extra_feats.items()}
            counts = self._all_reduce(torch.tensor([matched, judged], dtype=torch.float64, device=device))
            if not dist.is_main:
                continue
            suffix = cfg_suffix(scale)
            if self.extractor is not None:
                all_feats = np.concatenate([f for _, f in sorted(gathered, key=lambda kf: kf[0])])
                fd_key = self.extractor.metric("fd") + suffix
                metrics[fd_key] = frechet_distance(all_feats, self.reference["mu"], self.reference["sigma"])
                spread = frechet_distance_spread(all_feats, self.reference["mu"], self.reference["sigma"],
                                                 draws=e.fd_spread_draws, seed=e.seed)
                if math.isfinite(spread):
                    metrics["se_" + fd_key] = spread
                metrics[self.extractor.metric("kd") + suffix] = kernel_distance(all_feats, self.reference["feats"],
                                                                                seed=e.seed)
            metrics.update(self._extra_metrics(extra_gathered, suffix))
            if counts[1] > 0:
                metrics["prompt_alignment" + suffix] = float(counts[0] / counts[1])
            if grid is not None:
                grids[f"samples/step-{step:08d}{suffix}.png"] = image_grid(grid)
        return metrics, grids

    def _extra_metrics(self, gathered: dict, suffix: str) -> dict[str, float]:
        """fd_dinov2 (and its spread) and cmmd of one CFG scale, from the gathered features (rank 0)."""
        out: dict[str, float] = {}
        for metric, parts in gathered.items():
            feats = np.concatenate([f for _, f in sorted(parts, key=lambda kf: kf[0])])
            ref = self.extra_refs[metric]
            if metric == "cmmd":
                out[metric + suffix] = cmmd_metric.cmmd(feats, ref["feats"], ref["self_term"])
                continue
            out[metric + suffix] = frechet_distance(feats, ref["mu"], ref["sigma"])
            spread = frechet_distance_spread(feats, ref["mu"], ref["sigma"], draws=self.e.fd_spread_draws,
                                             seed=self.e.seed)
            if math.isfinite(spread):
                out["se_" + metric + suffix] = spread
        return out

    # -- collectives (no-ops for one process) ---------------------------------------------------------
    def _active(self) -> bool:
        return self.dist.world_size > 1 and tdist.is_initialized()

    def _all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._active():
            tdist.all_reduce(tensor)
        return tensor.cpu()

    def _gather(self, items: list) -> list:
        if not self._active():
            return items
        out = [None] * self.dist.world_size if self.dist.is_main else None
        tdist.gather_object(items, out, dst=0)
        return [item for part in out for item in part] if self.dist.is_main else []


def val_losses_file(step: int) -> str:
    """The artifact holding an evaluation's per-sample validation losses (a JSON file of {column: list})."""
    return f"{VAL_LOSSES_DIR}/step-{step:08d}.json"


def image_grid(images: np.ndarray, columns: int = 8, padding: int = 2):
    """uint8 [N, H, W, 3] -> a PIL image of the images in rows of `columns` (torchvision's make_grid)."""
    grid = make_grid(torch.from_numpy(images).permute(0, 3, 1, 2), nrow=columns, padding=padding)
    return Image.fromarray(grid.permute(1, 2, 0).numpy())
