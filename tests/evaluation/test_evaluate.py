"""Evaluation: clean-fid FID (and the named stand-ins when Inception is absent), cached reference
statistics, validation loss, prompt alignment on `shapes`, offline assets, `ditscale eval`.

Real clean-fid, real shards packed in temporary folders, real MLflow (SQLite). The Inception weights
are not on this machine (and nothing may download): the Inception *placement* is tested with a stand-in
file, and the FID code paths run with the stand-in extractors through clean-fid's custom-extractor route.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import harness.assets as assets
from harness.errors import UserError
from tests.support import ditscale, tiny_study, write_study
from tests.support.evaluation import evaluation_trial as _trial
from tests.support.evaluation import evaluator as _evaluator
from tests.support.shared import shared_folder

# --- fixtures ---------------------------------------------------------------------------------------


# Inception is absent in every test here: tests/evaluation/conftest.py (no_inception).


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> Path:
    """shapes at 32x32 with captions, packed once per run with its shapesdet stand-in (tests/support/shared.py)."""
    from harness.data import pack_dataset

    return shared_folder(tmp_path_factory, "shapes",
                         lambda out: pack_dataset("shapes", str(out), image_size=32, count=1500, progress=False))


@pytest.fixture(scope="session")
def lenet(digits_dir):
    from harness.evaluation.features import EvalData, ensure_standin, standin_extractor

    return standin_extractor(ensure_standin("lenet", EvalData.from_folder(digits_dir)), "cpu")


@pytest.fixture(scope="session")
def shapesdet(shapes_dir):
    from harness.evaluation.features import EvalData, ensure_standin, standin_extractor

    return standin_extractor(ensure_standin("shapesdet", EvalData.from_folder(shapes_dir)), "cpu")


@pytest.fixture(scope="session")
def digit_folders(digits_dir, tmp_path_factory):
    """PNG folders of real digits: low (classes 0-4) and high (5-9), as clean-fid reads folders."""
    from harness.evaluation.features import EvalData, iter_real_images

    root = tmp_path_factory.mktemp("folders")
    batch = next(iter_real_images(EvalData.from_folder(digits_dir), "train", 600, batch_size=600))
    for name, keep in (("low", batch["cls"] < 5), ("high", batch["cls"] >= 5)):
        (root / name).mkdir()
        for i, image in enumerate(batch["images"][keep.numpy()]):
            Image.fromarray(image[:, :, 0]).save(root / name / f"{i:04d}.png")  # grayscale, as packed
    return root / "low", root / "high"


# --- Fréchet distance: our numbers are clean-fid's ----------------------------------------------------


def test_folder_against_itself_is_zero_and_different_distributions_are_not(digit_folders, lenet):
    from harness.evaluation.features import folder_distance

    low, high = digit_folders
    assert abs(folder_distance(low, low, lenet)) < 1e-6
    different = folder_distance(low, high, lenet)
    assert different > 1.0, different


def test_equals_cleanfid_compute_fid_on_the_same_folders(digit_folders, lenet):
    from cleanfid import fid

    from harness.evaluation.features import folder_distance

    low, high = digit_folders
    ours = folder_distance(low, high, lenet)
    theirs = fid.compute_fid(str(low), str(high), mode="clean", custom_feat_extractor=lenet.model_fn,
                             custom_fn_resize=lenet.fn_resize, num_workers=0, batch_size=50,
                             device=torch.device("cpu"), verbose=False)
    assert ours == pytest.approx(theirs, rel=1e-5)
    assert abs(fid.compute_fid(str(low), str(low), mode="clean", custom_feat_extractor=lenet.model_fn,
                               custom_fn_resize=lenet.fn_resize, num_workers=0, device=torch.device("cpu"),
                               verbose=False)) < 1e-6


def test_torchmetrics_cross_checks_kid_and_fd(digit_folders, lenet):
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    from harness.evaluation.features import folder_images, frechet_distance, kernel_distance

    low, high = (folder_images(f) for f in digit_folders)
    n = min(len(low), len(high))
    low, high = low[:n], high[:n]
    f_low, f_high = lenet.features(low), lenet.features(high)
    ours_kid = kernel_distance(f_high, f_low)
    ours_fd = frechet_distance(f_high, np.mean(f_low, 0), np.cov(f_low, rowvar=False))

    class Features(torch.nn.Module):  # torchmetrics calls its feature module on the images as given
        def forward(self, x):
            return lenet.model_fn(x.float())

    to_tensor = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2)
    kid = KernelInceptionDistance(feature=Features(), subsets=3, subset_size=n)
    fd = FrechetInceptionDistance(feature=Features(), input_img_size=(3, 16, 16))
    for metric in (kid, fd):
        metric.update(to_tensor(low), real=True)
        metric.update(to_tensor(high), real=False)
    # With subsets of every sample both KIDs are the same unbiased MMD^2 estimate.
    assert ours_kid == pytest.approx(float(kid.compute()[0]), rel=1e-3)
    assert ours_fd == pytest.approx(float(fd.compute()), rel=1e-3)


# --- reference statistics ----------------------------------------------------------------------------


def test_reference_statistics_are_cached_and_reused(digits_dir, lenet):
    from harness.evaluation.features import EvalData, reference_stats

    data = EvalData.from_folder(digits_dir)
    calls = []
    spy = lenet.__class__(lenet.name, lenet.key, lambda x: calls.append(len(x)) or lenet.model_fn(x),
                          lenet.fn_resize, lenet.device)
    first = reference_stats(data, spy, "train", limit=321)
    assert first["computed"] and first["count"] == 321 and sum(calls) == 321
    assert first["path"].parent == digits_dir / "eval"
    name = first["path"].name
    assert "lenet" in name and "_train_" in name and "16px" in name and "n321" in name
    calls.clear()
    second = reference_stats(data, spy, "train", limit=321)
    assert not second["computed"] and calls == [], "the second evaluation must not read the reference set again"
    np.testing.assert_array_equal(first["mu"], second["mu"])
    # another split or sample count is another cache entry
    assert reference_stats(data, spy, "val", limit=40)["path"] != first["path"]
    leftovers = [p for p in (digits_dir / "eval").iterdir() if p.name.endswith(".partial")]
    assert leftovers == []


# --- the evaluator -------------------------------------------------------------------------------------


def test_standin_metrics_are_never_named_fid(digits_dir, tmp_path, lenet, caplog):
    import harness.evaluation.dataset as dataset

    dataset._warned.clear()
    trial = _trial(digits_dir, tmp_path, fid_samples=160)  # halves of 80 > LeNet's 64 features: an FD spread
    evaluator, model = _evaluator(trial)
    rng = torch.get_rng_state()
    with caplog.at_level(logging.WARNING, logger="harness.evaluation"):
        metrics, images = evaluator.run(model, step=7)
        again, _ = evaluator.run(model, step=8)
        _evaluator(trial)[0].run(model, step=9)
    assert torch.equal(rng, torch.get_rng_state()), "evaluation must leave the training RNG alone"
    assert set(metrics) == {"val_loss", "se_val_loss", "val_mse", "fd_lenet_cfg1.0", "kd_lenet_cfg1.0",
                            "fd_lenet_cfg3.0", "kd_lenet_cfg3.0", "se_fd_lenet_cfg1.0", "se_fd_lenet_cfg3.0",
                            "eval_seconds"}
    assert 0 < metrics["se_fd_lenet_cfg1.0"] < metrics["fd_lenet_cfg1.0"]
    assert not [k for k in metrics if k.startswith(("fid", "kid"))]
    warnings = [r.getMessage() for r in caplog.records if "Inception" in r.getMessage()]
    assert len(warnings) == 1, "one clear warning per process"
    assert "NOT computed" in warnings[0] and "fd_lenet" in warnings[0] and "ditscale assets fetch" in warnings[0]
    # deterministic: the same numbers every time (fixed noise, labels, timesteps)
    assert {k: v for k, v in again.items() if k != "eval_seconds"} == \
           {k: v for k, v in metrics.items() if k != "eval_seconds"}
    assert metrics["fd_lenet_cfg1.0"] > 0 and metrics["fd_lenet_cfg1.0"] != metrics["fd_lenet_cfg3.0"]
    assert 0 < metrics["val_mse"] < 2 and np.isfinite(metrics["val_loss"])
    assert sorted(images) == ["samples/step-00000007_cfg1.0.png", "samples/step-00000007_cfg3.0.png",
                              "val_losses/step-00000007.json"]
    # the per-sample table the report pairs trials with: every validation sample once, in order, and
    # its mean is the val_loss itself
    table = images["val_losses/step-00000007.json"]
    assert table["sample"] == list(range(len(table["loss"]))) and len(set(table["t"])) == len(table["t"])
    assert np.mean(table["loss"]) == pytest.approx(metrics["val_loss"], rel=1e-9)
    grid = images["samples/step-00000007_cfg1.0.png"]
    assert grid.size == (8 * 18 + 2, 4 * 18 + 2)  # the first batch's 32 samples, 8 per row


def test_requesting_inception_without_weights_is_one_clear_error(digits_dir, tmp_path):
    trial = _trial(digits_dir, tmp_path, feature_extractor="inception")
    evaluator, model = _evaluator(trial)
    with pytest.raises(UserError, match="inception.*ditscale assets fetch"):
        evaluator.run(model, step=1)


def test_due_at_every_and_at_the_end(digits_dir, tmp_path):
    evaluator, _ = _evaluator(_trial(digits_dir, tmp_path, every=10))
    assert [s for s in range(1, 31) if evaluator.due(s, final=s == 25)] == [10, 20, 25, 30]
    quiet, _ = _evaluator(_trial(digits_dir, tmp_path, every=None, fid_samples=0, val_batches=0))
    assert not quiet.due(10, final=True)
    final_only, _ = _evaluator(_trial(digits_dir, tmp_path, every=None))
    assert [s for s in range(1, 31) if final_only.due(s, final=s == 30)] == [30]


def test_validation_loss_is_fixed_and_tells_models_apart(digits_dir, tmp_path):
    trial = _trial(digits_dir, tmp_path, fid_samples=0, val_batches=3)
    first, model = _evaluator(trial)
    a = first.run(model, 1)[0]["val_loss"]
    b = _evaluator(trial)[0].run(model, 1)[0]["val_loss"]  # a fresh evaluator (another trial): same set
    assert a == b
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    assert first.run(model, 2)[0]["val_loss"] != a


# --- the standard error of val_loss --------------------------------------------------------------------------


def test_stratified_standard_error_is_the_noise_not_the_trend_over_t():
    """loss = f(t) + iid noise of sd 0.05 at n stratified timesteps: the collapsed-strata estimate
    matches sd/√n (the true standard error of the mean) although f spans 3.0 over t, where the naive
    std/√n counts the trend as noise."""
    from harness.evaluation.noise import stratified_standard_error

    rng = np.random.default_rng(0)
    n, sd = 256, 0.05
    t = (np.arange(n) + 0.5) / n
    trend = 0.2 + 3.0 * t ** 2
    means, estimates, naive = [], [], []
    for _ in range(400):
        loss = trend + sd * rng.standard_normal(n)
        perm = rng.permutation(n)  # the evaluator's samples come in any order (a permutation, ranks)
        means.append(loss.mean())
        estimates.append(stratified_standard_error(t[perm], loss[perm]))
        naive.append(loss.std(ddof=1) / np.sqrt(n))
    truth = sd / np.sqrt(n)
    print(f"\ntrue SE {truth:.5f}; observed SD of the mean {np.std(means, ddof=1):.5f}; collapsed strata "
          f"{np.mean(estimates):.5f} (single draws {np.min(estimates):.5f}-{np.max(estimates):.5f}); "
          f"naive {np.mean(naive):.5f}")
    # the trend adds Σ_pairs (Δf)² / n² ≈ 6 / n³ to the variance: +1.8 % on the SE here (measured +1.6 %)
    assert np.mean(estimates) == pytest.approx(truth, rel=0.04)
    assert np.all(np.abs(np.array(estimates) / truth - 1) < 0.3)  # one draw: 128 pairs, ±6 % (1 sd)
    assert np.std(means, ddof=1) == pytest.approx(truth, rel=0.15)  # the truth is what the means do
    assert np.mean(naive) > 10 * truth  # what the estimator is for

    # ties in t (DDPM's integer timesteps, 4 samples per t): still unbiased — ties keep their (random)
    # sample order; pairing them by loss would give x0.45 of the variance
    tied = np.repeat(np.arange(64.0), 4)
    var = [stratified_standard_error(tied, rng.standard_normal(256)) ** 2 for _ in range(4000)]
    assert np.mean(var) == pytest.approx(1.0 / 256, rel=0.05)
    assert np.isnan(stratified_standard_error([0.5], [1.0]))


@pytest.mark.parametrize("n", [3, 5, 9])
def test_stratified_standard_error_odd_sample_out_is_unbiased(n):
    """With an odd count the last three strata form one group (k/(k−1)·Σ(l − l̄)²): unbiased for equal
    stratum means. Pairing the odd sample again would be biased up (at n = 3 by +33 %), dropping it
    down (−33 %)."""
    from harness.evaluation.noise import stratified_standard_error

    rng = np.random.default_rng(n)
    t = np.arange(n, dtype=float)
    var = [stratified_standard_error(t, rng.standard_normal(n)) ** 2 for _ in range(20000)]
    assert np.mean(var) == pytest.approx(1.0 / n, rel=0.04)


def test_fd_spread_predicts_the_spread_of_the_fd_over_fresh_samples():
    """Gaussian features (d = 32, N = 256) against a fixed reference: the half-sample estimate of one
    draw's FD spread matches the FD's SD over 30 fresh draws. Measured: mean estimate / SD = 0.99
    (single estimates 0.76-1.26); at d = 144, N = 512 the ratio was 1.3 (and 1.6 for a bootstrap)."""
    from harness.evaluation.features import frechet_distance, frechet_distance_spread

    rng = np.random.default_rng(0)
    d, n = 32, 256
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    ref = rng.normal(size=(20000, d)) @ mix
    mu, sigma = ref.mean(0), np.cov(ref, rowvar=False)
    shifted = mix + 0.3 * rng.normal(size=(d, d)) / np.sqrt(d)

    def draw():
        return rng.normal(size=(n, d)) @ shifted + 0.2

    fresh_sd = np.std([frechet_distance(draw(), mu, sigma) for _ in range(30)], ddof=1)
    estimates = [frechet_distance_spread(draw(), mu, sigma, draws=20, seed=s) for s in range(6)]
    print(f"\nFD over 30 fresh draws: SD {fresh_sd:.4f}; half-sample estimates {np.round(estimates, 4)}")
    assert 0.7 < np.mean(estimates) / fresh_sd < 2.0
    assert np.isnan(frechet_distance_spread(draw(), mu, sigma, draws=1))
    assert np.isnan(frechet_distance_spread(draw()[:64], mu, sigma))  # halves of 32 samples in 32 dimensions: singular


@pytest.fixture(scope="module")
def shapes_val_draws(tmp_path_factory) -> Path:
    """shapes at 16 px with 8 held-out shards of 256 images: 8 independent draws of validation images."""
    from harness.data import pack_dataset

    out = tmp_path_factory.mktemp("shapes16") / "shapes"
    pack_dataset("shapes", str(out), image_size=16, count=2560, val_fraction=0.8, shard_size=256, progress=False)
    return out


def test_se_val_loss_predicts_the_spread_of_val_loss_over_validation_draws(shapes_val_draws, tmp_path):
    """A real DiT (d1w64/4, 40 AdamW steps on shapes, so its loss falls steeply with t) evaluated on 8
    validation draws — other held-out images (another val shard) and other noise and timestep assignment
    (another eval.seed): the spread of val_loss over the draws is what se_val_loss claims to be.
    Measured: SD over the 8 draws 0.0067, mean se_val_loss 0.0063 (ratio 0.93; 0.89 and 1.00 with 60
    and 150 training steps). Redrawing only eval.seed on the same 256 images moves val_loss less (SD
    0.0024, ratio 2.6; 4.7 after 150 steps): every image is used once whatever the seed, so the images'
    own difficulty does not change — se_val_loss covers a fresh draw of images as well."""
    from harness.common.process_group import DistInfo
    from harness.config import TrialConfig
    from harness.data import make_loader
    from harness.evaluation.evaluator import Evaluator
    from harness.evaluation.noise import stratified_standard_error
    from harness.trial.build import build_denoiser, build_objective_for, dataset_info

    data = shapes_val_draws

    def trial(seed: int, shard: int):
        return TrialConfig.model_validate(tiny_study(
            data, "se", data={"shards": str(data / "train-{000000..000001}.tar"),
                              "val_shards": str(data / f"val-{shard:06d}.tar"), "image_size": 16, "channels": 3},
            model={"family": "dit", "size": "d1w64", "patch": 4}, objective={"kind": "rectified_flow"},
            eval={"val_batches": 4, "batch_size": 64, "seed": seed, "fid_samples": 0},
            resources={"storage": str(tmp_path / "runs")}))

    dist = DistInfo(0, 1, 0, torch.device("cpu"))
    info = dataset_info(trial(0, 0))
    torch.manual_seed(0)
    model, conditioner = build_denoiser(trial(0, 0), info, dist.device)
    objective = build_objective_for(trial(0, 0))
    batches = list(zip(range(16), make_loader(trial(0, 0).data.shards, 32, resampled=False, shuffle=0,
                                              conditioning="class", num_workers=0)))

    def train(net, steps):
        opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
        for step in steps:
            batch = batches[step % len(batches)][1]
            loss = objective.loss(net, batch["x"], conditioner.from_batch(batch))
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()

    train(model, range(40))

    def spread(draws):
        found = [Evaluator(trial(seed, shard), info, conditioner, objective, dist).run(model, 1)[0]
                 for seed, shard in draws]
        vals, ses = np.array([m["val_loss"] for m in found]), np.array([m["se_val_loss"] for m in found])
        return vals.std(ddof=1), ses

    full_sd, ses = spread([(k, k) for k in range(8)])
    seed_sd, seed_ses = spread([(k, 0) for k in range(8)])
    print(f"\nval_loss over 8 draws of images and noise: SD {full_sd:.5f}; se_val_loss {ses.mean():.5f} "
          f"({ses.min():.5f}-{ses.max():.5f}); over 8 eval.seed on the same images: SD {seed_sd:.5f}")
    # An SD from 8 draws is itself uncertain by about ±27 % (1 sd): a factor of 2 either way.
    assert 0.5 < ses.mean() / full_sd < 2.0
    assert ses.max() / ses.min() < 1.5  # each evaluation's own estimate, not just their mean
    assert seed_ses.mean() > seed_sd  # the fixed images' difficulty is in the SE, not in the seed spread

    # The gap between two models scored on the same draw: its spread over the draws is what the paired
    # standard error of the per-sample differences (the report's test, analysis.study) claims, and far
    # below the two se_val_loss combined (which count what the models share: the images' difficulty).
    other = copy.deepcopy(model).train()
    train(other, range(40, 60))
    gaps, paired, unpaired = [], [], []
    for k in range(8):
        evaluator = Evaluator(trial(k, k), info, conditioner, objective, dist)
        (ma, art_a), (mb, art_b) = evaluator.run(model, 1), evaluator.run(other, 1)
        a, b = art_a["val_losses/step-00000001.json"], art_b["val_losses/step-00000001.json"]
        assert a["t"] == b["t"] and a["sample"] == b["sample"]  # the same samples: pairs line up
        gaps.append(mb["val_loss"] - ma["val_loss"])
        paired.append(stratified_standard_error(np.array(a["t"]), np.array(b["loss"]) - np.array(a["loss"])))
        unpaired.append(math.hypot(ma["se_val_loss"], mb["se_val_loss"]))
    gap_sd = np.std(gaps, ddof=1)
    print(f"gap over the 8 draws: mean {np.mean(gaps):.5f} SD {gap_sd:.5f}; paired SE {np.mean(paired):.5f}; "
          f"unpaired {np.mean(unpaired):.5f}")
    assert 0.5 < np.mean(paired) / gap_sd < 2.0
    assert np.mean(unpaired) > 1.5 * np.mean(paired)


# --- shapes: the detector and prompt alignment --------------------------------------------------------------


def test_prompt_alignment_near_one_on_real_shapes_and_near_chance_shuffled(shapes_dir, shapesdet):
    from harness.evaluation.features import EvalData, iter_real_images
    from harness.evaluation.standin import alignment_counts, parse_shapes_caption

    batch = next(iter_real_images(EvalData.from_folder(shapes_dir), "val", None, batch_size=1000))
    images = torch.from_numpy(batch["images"]).permute(0, 3, 1, 2).float()
    captions = batch["txt"]
    assert all(parse_shapes_caption(c) is not None for c in captions)
    matched, total = alignment_counts(shapesdet.module, images, captions)
    assert total == len(captions) and matched / total >= 0.9, matched / total
    rng = np.random.default_rng(0)
    shuffled = [captions[i] for i in np.roll(rng.permutation(len(captions)), 1)]
    wrong, _ = alignment_counts(shapesdet.module, images, shuffled)
    assert wrong / total <= 0.1, wrong / total


def test_shapes_captions_parse_into_what_they_say():
    from harness.evaluation.standin import caption_matches, parse_shapes_caption

    p = parse_shapes_caption("a red circle left of an orange square")
    assert p == {"template": "relation", "objects": [("red", "circle"), ("orange", "square")], "relation": "left of"}
    assert caption_matches(p, [(1, 0, "red", "circle"), (1, 2, "orange", "square")])
    assert not caption_matches(p, [(1, 2, "red", "circle"), (1, 0, "orange", "square")])
    three = parse_shapes_caption("three green triangles")
    assert caption_matches(three, [(r, r, "green", "triangle") for r in range(3)])
    assert not caption_matches(three, [(0, 0, "green", "triangle"), (1, 1, "green", "triangle")])
    assert parse_shapes_caption("a photo of a cat") is None


# --- offline assets --------------------------------------------------------------------------------------


def _place(args):
    source, target = args
    return str(assets.find_inception(source, target_dir=target))


def test_inception_is_placed_once_per_node_without_races(tmp_path, monkeypatch):
    source = tmp_path / "assets"
    source.mkdir()
    payload = os.urandom(3 << 20)
    monkeypatch.setattr(assets, "INCEPTION_SHA256", hashlib.sha256(payload).hexdigest())  # this payload is "Inception"
    (source / assets.INCEPTION_FILE).write_bytes(payload)
    target = tmp_path / "node-tmp"
    target.mkdir()
    with multiprocessing.get_context("fork").Pool(4) as pool:  # four "ranks" of one node at once
        found = pool.map(_place, [(str(source), str(target))] * 8)
    assert set(found) == {str(target / assets.INCEPTION_FILE)}
    assert (target / assets.INCEPTION_FILE).read_bytes() == payload
    assert not [p for p in target.iterdir() if p.name.endswith(".partial")]
    mtime = (target / assets.INCEPTION_FILE).stat().st_mtime_ns
    assert assets.find_inception(source, target_dir=target) == target / assets.INCEPTION_FILE
    assert (target / assets.INCEPTION_FILE).stat().st_mtime_ns == mtime, "placed once, not again"
    # a truncated copy (e.g. an interrupted download by clean-fid itself) is replaced
    (target / assets.INCEPTION_FILE).write_bytes(payload[:100])
    assert assets.find_inception(source, target_dir=target).read_bytes() == payload


def test_inception_absent_means_none_and_no_download(tmp_path):
    assert assets.find_inception(tmp_path / "empty", target_dir=tmp_path / "t") is None
    assert not (tmp_path / "t" / assets.INCEPTION_FILE).exists()


def test_assets_fetch_and_data_stats_commands(tmp_path, digits_dir, lenet, monkeypatch):
    mirror = tmp_path / "mirror.pt"
    mirror.write_bytes(b"not really inception" * 1000)
    dest = tmp_path / "assets"
    # a mirror serving anything but clean-fid's file is refused (sha256 pinned), and nothing is kept
    bad = ditscale("assets", "fetch", "--dest", str(dest), "--inception-url", mirror.as_uri(), cwd=tmp_path,
                   check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and not (dest / assets.INCEPTION_FILE).exists()
    monkeypatch.setattr(assets, "INCEPTION_SHA256", hashlib.sha256(mirror.read_bytes()).hexdigest())
    assert assets.fetch_inception(dest, url=mirror.as_uri()).read_bytes() == mirror.read_bytes()
    out = ditscale("assets", "fetch", "--dest", str(dest), "--no-inception", cwd=tmp_path).stdout
    assert "DITSCALE_ASSETS" in out
    env = {assets.ASSETS_ENV: str(tmp_path / "none")}
    proc = ditscale("data", "stats", str(digits_dir), "--extractor", "lenet", "--samples", "200", "--json",
                    cwd=tmp_path, env=env)
    assert '"metric": "fd_lenet"' in proc.stdout and '"count": 200' in proc.stdout
    bad = ditscale("data", "stats", str(digits_dir), "--extractor", "shapesdet", cwd=tmp_path, env=env, check=False)
    assert bad.returncode == 2 and "shapesdet" in bad.stderr and "Traceback" not in bad.stderr


# --- `ditscale eval` on a checkpoint, logged to MLflow ------------------------------------------------------


def test_eval_command_logs_into_the_trials_run(digits_dir, tmp_path, lenet, monkeypatch):

    import mlflow

    from harness.paths import trial_dir
    from harness.trial.build import build_denoiser, dataset_info
    from models.ema import EMA

    study = tiny_study(digits_dir, "evalcmd", eval={"fid_samples": 64, "sampling_steps": 3, "cfg_scale": [1.5],
                                                    "batch_size": 32, "val_batches": 1})
    path = write_study(tmp_path / "study.yaml", study)
    from harness.config import expand_grid, load_study

    monkeypatch.chdir(tmp_path)  # storage and tracking default to the working directory
    trial = expand_grid(load_study(path))[0]
    model, _ = build_denoiser(trial, dataset_info(trial), torch.device("cpu"))
    ckpt = trial_dir(trial) / "checkpoints" / "step-00000030"
    ckpt.mkdir(parents=True)
    torch.save(EMA(model).state_dict(), ckpt / "ema.pt")
    proc = ditscale("eval", str(path), "--json", "--set", "eval.fid_samples=48", "--set",
                    "eval.feature_extractor=lenet", cwd=tmp_path)
    assert "fd_lenet_cfg1.5" in proc.stdout and '"fid' not in proc.stdout
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("evalcmd")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.tags["trial_id"] == trial.trial_id, "eval.* overrides must not change the trial evaluated"
    history = client.get_metric_history(run.info.run_id, "fd_lenet_cfg1.5")
    assert [m.step for m in history] == [30]
    assert "val_loss" in run.data.metrics and not any(k.startswith("fid") for k in run.data.metrics)
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
    assert artifacts == ["samples/step-00000030_cfg1.5.png"]
    # the FD carries its detector's identity, as a trained trial's does (the report never mixes detectors)
    assert run.data.tags["ditscale.detector"].startswith("lenet@")

    # Evaluated again at the same step (as after a resume from the final checkpoint): the per-sample
    # losses are replaced, not appended to — doubled rows would pair each sample with its own copy and
    # make every gap's noise zero in the report.
    import pandas as pd

    from analysis.runs import load_val_samples

    again = ditscale("eval", str(path), "--json", "--set", "eval.fid_samples=48", "--set",
                     "eval.feature_extractor=lenet", cwd=tmp_path)
    assert json.loads(again.stdout)["tables"] == ["val_losses/step-00000030.json"]
    found = load_val_samples(f"sqlite:///{tmp_path / 'mlflow.db'}",
                             pd.DataFrame({"run_id": [run.info.run_id], "trial_id": [trial.trial_id]}))
    table = found[trial.trial_id]
    assert list(table["sample"]) == list(range(len(table))) and len(table) == len(set(table["t"]))
    assert table["loss"].mean() == pytest.approx(client.get_run(run.info.run_id).data.metrics["val_loss"], rel=1e-9)


# --- several ranks: the same numbers as one ---------------------------------------------------------------


def _rank_main(rank: int, world: int, port: int, digits: str, tmp: str, out: str) -> None:

    import torch.distributed as tdist

    assets.cleanfid_dir = lambda: Path(tmp) / "cleanfid-place"  # as the autouse fixture does in the parent
    os.environ[assets.ASSETS_ENV] = str(Path(tmp) / "no-assets")
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        evaluator, model = _evaluator(_trial(Path(digits), Path(tmp)))
        evaluator.dist = evaluator.dist.__class__(rank, world, 0, torch.device("cpu"))
        metrics, images = evaluator.run(model, step=3)
        if rank == 0:
            Path(out).write_text(json.dumps({"metrics": metrics, "images": sorted(images),
                                             "table": images["val_losses/step-00000003.json"]}))
    finally:
        tdist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_give_the_numbers_of_one(digits_dir, tmp_path, lenet):
    import torch.multiprocessing as mp

    from harness.common.net import free_port

    single, model = _evaluator(_trial(digits_dir, tmp_path))
    alone, images = single.run(model, step=3)
    out = tmp_path / "two.json"
    mp.spawn(_rank_main, args=(2, free_port(), str(digits_dir), str(tmp_path), str(out)), nprocs=2, join=True)
    two = json.loads(out.read_text())
    assert two["images"] == sorted(images)
    table = images["val_losses/step-00000003.json"]  # the per-sample losses, gathered from both ranks in order
    assert two["table"]["sample"] == table["sample"] and two["table"]["t"] == pytest.approx(table["t"])
    assert two["table"]["loss"] == pytest.approx(table["loss"], rel=1e-9)
    for key, value in alone.items():
        if key != "eval_seconds":
            assert two["metrics"][key] == pytest.approx(value, rel=1e-9, abs=1e-9), key


# --- inside the training loop ------------------------------------------------------------------------------


@pytest.mark.slow
def test_training_evaluates_every_n_steps_under_zero3_on_two_ranks(digits_dir, tmp_path, lenet):
    import mlflow

    from tests.support.procs import torchrun as _torchrun

    study = write_study(tmp_path / "s.yaml", tiny_study(
        digits_dir, "evaltrain", train={"zero_stage": 3, "steps": 20},
        eval={"every": 10, "fid_samples": 40, "sampling_steps": 3, "cfg_scale": [1.0, 2.0], "batch_size": 16,
              "val_batches": 2},
        resources={"workers_per_trial": 2}))
    proc = _torchrun(study, tmp_path)
    assert proc.stdout.count("eval at step") == 2
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("evaltrain").experiment_id])
    for key in ("val_loss", "se_val_loss", "fd_lenet_cfg1.0", "kd_lenet_cfg2.0"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [10, 20], key
    assert not any(k.startswith(("fid", "kid")) for k in run.data.metrics)
    assert len(client.list_artifacts(run.info.run_id, "samples")) == 4
    assert run.data.tags["ditscale.status"] == "finished"


# --- latents: samples and references are decoded with the dataset's VAE --------------------------------------


def test_latent_datasets_are_decoded_with_their_vae(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from harness.config import TrialConfig
    from harness.data import make_loader, pack_dataset
    from harness.evaluation.features import EvalData, LatentDecoder, iter_real_images

    vae_dir = tmp_path / "vae"
    diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=16, scaling_factor=0.5, shift_factor=0.1,
    ).save_pretrained(vae_dir)
    data_dir = tmp_path / "latents"
    pack_dataset("digits", str(data_dir), image_size=16, count=400, vae=str(vae_dir), progress=False)
    data = EvalData.from_folder(data_dir)
    decoder = LatentDecoder(data.manifest, torch.device("cpu"))
    # the loader's scaled latents and the shards' raw latents decode to the same images
    scaled = next(iter(make_loader(str(data_dir), 8, resampled=False, shuffle=0, split="val")))["x"]
    raw = next(iter_real_images(data, "val", 8, batch_size=8, decoder=decoder))["images"]
    assert np.abs(decoder.decode(scaled).astype(int) - raw.astype(int)).max() <= 1
    assert raw.shape == (8, 16, 16, 3)

    trial = TrialConfig.model_validate(tiny_study(
        data_dir, "latents", data={"shards": str(data_dir / "train-000000.tar"),
                                   "val_shards": str(data_dir / "val-000000.tar"), "image_size": 8, "channels": 4},
        model={"family": "dit", "size": "XXS", "patch": 2},
        eval={"fid_samples": 24, "sampling_steps": 2, "cfg_scale": [1.0], "batch_size": 16, "val_batches": 1,
              "feature_extractor": "lenet"},
        resources={"storage": str(tmp_path / "runs")}))
    evaluator, model = _evaluator(trial)
    metrics, images = evaluator.run(model, step=1)
    assert {"fd_lenet_cfg1.0", "kd_lenet_cfg1.0", "val_loss"} <= set(metrics)
    grid = images["samples/step-00000001_cfg1.0.png"]
    assert grid.size == (8 * 18 + 2, 2 * 18 + 2), "grid tiles are decoded 16 px images, not 8 px latents"


def test_captioned_shapes_get_prompt_alignment(shapes_dir, shapesdet, tmp_path):
    from harness.config import TrialConfig

    trial = TrialConfig.model_validate(tiny_study(
        shapes_dir, "captions", data={"shards": str(shapes_dir / "train-000000.tar"),
                                      "val_shards": str(shapes_dir / "val-000000.tar"), "image_size": 32,
                                      "channels": 3, "conditioning": "text"},
        model={"family": "mmdit", "size": "d2", "patch": 4},
        eval={"fid_samples": 40, "sampling_steps": 2, "cfg_scale": [1.0, 2.0], "batch_size": 20, "val_batches": 1},
        resources={"storage": str(tmp_path / "runs")}))
    evaluator, model = _evaluator(trial)
    metrics, _ = evaluator.run(model, step=1)
    for scale in ("1.0", "2.0"):
        assert f"fd_shapesdet_cfg{scale}" in metrics and 0 <= metrics[f"prompt_alignment_cfg{scale}"] <= 1
    assert evaluator._prompt_pool()["txt"][:3] == _val_captions(shapes_dir)[:3], "captions come from the val shards"


def _val_captions(folder: Path) -> list[str]:
    from harness.evaluation.features import EvalData, iter_real_images

    return next(iter_real_images(EvalData.from_folder(folder), "val", 3))["txt"]


# --- with Inception weights present: the FID path (a stand-in TorchScript file, never placed in /tmp) ---------


def _fake_inception(folder: Path, monkeypatch) -> Path:
    """A TorchScript file with the interface of clean-fid's inception-2015-12-05.pt (`.layers` maps a
    normalised 299 x 299 batch to 2048 features). NOT Inception: it only exercises the plumbing."""

    class Layers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(3 * 8 * 8, 2048)

        def forward(self, x):
            return self.proj(torch.nn.functional.adaptive_avg_pool2d(x, 8).flatten(1))

    class Base(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = Layers()

        def forward(self, x, return_features: bool = False):
            return self.layers(x)

    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / assets.INCEPTION_FILE
    torch.jit.save(torch.jit.script(Base()), str(path))
    # assets pins clean-fid's sha256: for this test the stand-in file is the one to accept
    monkeypatch.setattr(assets, "INCEPTION_SHA256", hashlib.sha256(path.read_bytes()).hexdigest())
    return path


def test_present_inception_is_placed_loaded_and_fed_as_cleanfid_feeds_it(digits_dir, digit_folders, tmp_path,
                                                                         monkeypatch, caplog):
    from cleanfid.fid import get_folder_features
    from cleanfid.resize import build_resizer

    from harness.evaluation.features import EvalData, choose_extractor, folder_images

    _fake_inception(tmp_path / "assets", monkeypatch)
    monkeypatch.setenv(assets.ASSETS_ENV, str(tmp_path / "assets"))
    with caplog.at_level(logging.WARNING, logger="harness.evaluation"):
        extractor, _ = choose_extractor("auto", EvalData.from_folder(digits_dir), "cpu")
    assert extractor.is_inception and extractor.metric("fd") == "fid" and extractor.metric("kd") == "kid"
    assert not caplog.records, "no stand-in warning when the weights are there"
    assert (assets.cleanfid_dir() / assets.INCEPTION_FILE).is_file(), "copied to where clean-fid looks"
    low = digit_folders[0]
    ours = extractor.features(folder_images(low)[:20])
    theirs = get_folder_features(str(low), extractor.model_fn, num_workers=0, num=20, batch_size=8,
                                 device=torch.device("cpu"), mode="clean", verbose=False,
                                 custom_fn_resize=build_resizer("clean"))
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_present_inception_gives_metrics_named_fid(digits_dir, tmp_path, monkeypatch):
    _fake_inception(tmp_path / "assets", monkeypatch)
    monkeypatch.setenv(assets.ASSETS_ENV, str(tmp_path / "assets"))
    trial = _trial(digits_dir, tmp_path, cfg_scale=[1.5], fid_samples=40, val_batches=0, reference_samples=100)
    evaluator, model = _evaluator(trial)
    metrics, images = evaluator.run(model, step=2)
    # no se_fid: halves of 40 samples in 2048 dimensions have a singular covariance
    assert {"fid_cfg1.5", "kid_cfg1.5", "eval_seconds"} == set(metrics)
    assert evaluator.reference["path"].name.startswith("fid_stats_inception-clean_train_16px_n100_")


# --- the stand-in detector: the same weights on every machine ---------------------------------------

_STANDIN_SCRIPT = """
import numpy as np, torch
from harness.evaluation.standin import VERSION, state_digest, train_standin
rng = np.random.default_rng(0)
images = rng.integers(0, 256, (400, 16, 16, 3), dtype=np.uint8)
labels = torch.from_numpy(rng.integers(0, 4, 400))
net, _ = train_standin("lenet", images, labels, {"num_classes": 4, "image_size": 16}, steps=40)
state = {"name": net.name, "version": VERSION, "config": net.config, "state_dict": net.state_dict()}
print("DIGEST", state_digest(state))
"""


def test_standin_training_gives_the_same_weights_whatever_the_threads_and_isa(tmp_path):
    """This process and a child that differs as another machine would: 1 thread instead of this one's,
    ATen's portable kernels instead of its widest (AVX-512 where the CPU has it), oneDNN capped at
    AVX2 — the stand-in's weights, and so the detector identity (ditscale.detector) every FD carries,
    are the same bit for bit."""

    from tests.support import ROOT

    script = tmp_path / "train.py"
    script.write_text(_STANDIN_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "AVX2",
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    child = next(ln.split()[1] for ln in proc.stdout.splitlines() if ln.startswith("DIGEST"))
    threads, here = torch.get_num_threads(), {}
    torch.set_num_threads(2)
    try:
        exec(compile(_STANDIN_SCRIPT.replace('print("DIGEST", state_digest(state))', "out['digest'] = state_digest(state)"),
                     "train.py", "exec"), {"out": here})
    finally:
        torch.set_num_threads(threads)
    assert here["digest"] == child


def test_fd_metrics_carry_the_detector_identity():
    from harness.evaluation.features import standin_extractor
    from harness.evaluation.standin import VERSION, LeNet, state_digest

    torch.manual_seed(0)
    net = LeNet(num_classes=4, image_size=16)
    state = {"name": "lenet", "version": VERSION, "config": net.config, "state_dict": net.state_dict()}
    extractor = standin_extractor(state, "cpu")
    assert extractor.identity == f"lenet@{state_digest(state)}" and extractor.metric("fd") == "fd_lenet"
    assert len(state_digest(state)) == 10
