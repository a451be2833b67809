"""eval.metrics beyond FID: FD_DINOv2 (Stein et al. 2023) and CMMD (Jayasumana et al. 2024).

The real networks (DINOv2 ViT-L/14, CLIP ViT-L/14@336) are not on this machine and nothing may be
downloaded: the tests build the SAME transformers architectures (Dinov2Model, CLIPVisionModelWithProjection)
from configs with tiny hidden sizes (32 wide, 2 layers: for speed; the patch size 14 and the input sizes
224 / 336 are the real ones) and random weights, save them with save_pretrained into a temporary assets
folder laid out as `ditscale assets fetch --metric` lays it out, and load them through the user's path
(resources.assets / $DITSCALE_ASSETS -> harness.evaluation.{dinov2,cmmd}). No Ray.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from harness import assets
from harness.errors import UserError
from tests.support import ditscale, tiny_study, write_study
from tests.support.paths import ROOT

DINO_FOLDER = "metrics/facebook--dinov2-large"
CLIP_FOLDER = "metrics/openai--clip-vit-large-patch14-336"


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory) -> Path:
    """An assets folder with random-weight DINOv2 and CLIP vision networks of tiny width."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, Dinov2Config, Dinov2Model

    root = tmp_path_factory.mktemp("assets")
    torch.manual_seed(0)
    # image_size 56: 4 x 4 position embeddings, resampled to 16 x 16 at 224 px as the real 37 x 37 are
    dino = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, patch_size=14,
                        image_size=56)
    Dinov2Model(dino).save_pretrained(root / DINO_FOLDER)
    clip = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            patch_size=14, image_size=336, projection_dim=16)
    CLIPVisionModelWithProjection(clip).save_pretrained(root / CLIP_FOLDER)
    return root


def _images(n: int, seed: int, size: int = 32) -> np.ndarray:
    """Smooth random RGB images (low-frequency patterns upsampled), uint8 [n, size, size, 3]."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.uniform(0, 255, (n, 3, 4, 4)).astype(np.float32))
    smooth = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return smooth.clamp(0, 255).round().byte().permute(0, 2, 3, 1).numpy()


def _noisy(images: np.ndarray, sd: float, seed: int = 1) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0, sd, images.shape)
    return np.clip(images + noise, 0, 255).round().astype(np.uint8)


# --- FD_DINOv2 --------------------------------------------------------------------------------------------


def test_fd_dinov2_is_zero_against_itself_and_grows_monotonically_with_noise(tiny_assets):
    from harness.evaluation.dinov2 import dinov2_extractor
    from harness.evaluation.features import frechet_distance

    extractor = dinov2_extractor(tiny_assets, "cpu")
    assert extractor.metric("fd") == "fd_dinov2" and extractor.identity.startswith("dinov2@")
    images = _images(96, seed=0)
    feats = extractor.features(images)
    assert feats.shape == (96, 32)
    mu, sigma = feats.mean(0), np.cov(feats, rowvar=False)
    itself = frechet_distance(feats, mu, sigma)
    fds = [frechet_distance(extractor.features(_noisy(images, sd)), mu, sigma) for sd in (8, 24, 64)]
    assert abs(itself) < 1e-6 * np.trace(sigma), itself
    assert fds[0] > 100 * max(abs(itself), 1e-12)
    assert fds[0] < fds[1] < fds[2], fds


def test_fd_dinov2_preprocessing_is_dgm_evals(tiny_assets):
    """PIL bicubic to 224 x 224 on the uint8 image (dgm-eval: torchvision Resize on a PIL image), values kept
    0..255, stacked into the same tensor clean-fid's per-image ToTensor path gives."""

    from PIL import Image

    from harness.evaluation.dinov2 import dgm_eval_resize, dinov2_extractor

    image = _images(1, seed=3, size=24)[0]
    out = dgm_eval_resize(image)
    expected = np.asarray(Image.fromarray(image).resize((224, 224), Image.BICUBIC), dtype=np.float32)
    assert out.shape == (224, 224, 3) and out.dtype == np.float32 and np.array_equal(out, expected)
    extractor = dinov2_extractor(tiny_assets, "cpu", identify=False)
    images = _images(4, seed=4)
    per_image = dataclasses.replace(extractor, float_resize=False).features(images)
    assert np.array_equal(extractor.features(images), per_image)


# --- CMMD ------------------------------------------------------------------------------------------------


def _unit(rng, n: int, d: int, shift: float = 0.0) -> np.ndarray:
    x = rng.normal(size=(n, d)) + shift
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _paper_cmmd(x: np.ndarray, y: np.ndarray, sigma: float = 10.0) -> float:
    """The paper's unbiased MMD² (×1000), pair by pair in float64: k(a, b) = exp(−||a − b||² / (2σ²))."""
    def k(a, b):
        return np.exp(-np.sum((a - b) ** 2) / (2 * sigma ** 2))

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return 1000.0 * (xx + yy - 2 * xy)


def test_cmmd_equals_the_papers_formula_on_fixed_embeddings():
    from harness.evaluation.cmmd import cmmd, self_term

    rng = np.random.default_rng(0)
    x, y = _unit(rng, 40, 16), _unit(rng, 30, 16, shift=0.3)
    expected = _paper_cmmd(x, y)
    assert expected > 0
    assert cmmd(x, y) == pytest.approx(expected, rel=1e-4)
    assert cmmd(x, y, ref_self=self_term(y)) == pytest.approx(expected, rel=1e-4)  # the cached reference term


def test_cmmd_is_unbiased_two_samples_of_one_distribution_give_zero_on_average():
    from harness.evaluation.cmmd import cmmd

    rng = np.random.default_rng(1)
    same = np.array([cmmd(_unit(rng, 30, 8), _unit(rng, 30, 8)) for _ in range(60)])
    apart = cmmd(_unit(rng, 30, 8), _unit(rng, 30, 8, shift=2.0))
    se = same.std(ddof=1) / np.sqrt(len(same))
    assert abs(same.mean()) < 3 * se, (same.mean(), se)  # expectation 0 ...
    assert (same < 0).any()  # ... so some draws are negative (the biased V-statistic never is)
    assert apart > same.mean() + 5 * same.std(ddof=1)


def test_cmmd_embeddings_come_from_the_assets_clip_and_are_unit_vectors(tiny_assets):
    from harness.evaluation.cmmd import clip_extractor, cmmd

    extractor = clip_extractor(tiny_assets, "cpu")
    assert extractor.identity.startswith("clip@")
    feats = extractor.features(_images(48, seed=0))
    assert feats.shape == (48, 16)
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, rtol=1e-5)
    same = cmmd(extractor.features(_images(48, seed=5)), feats)  # another draw of the same kind of image
    static = np.random.default_rng(6).integers(0, 256, (48, 32, 32, 3), dtype=np.uint8)  # pixel noise
    assert cmmd(extractor.features(static), feats) > max(same, 0)


def test_too_few_embeddings_for_cmmd_is_an_error():
    from harness.evaluation.cmmd import cmmd

    with pytest.raises(ValueError, match="at least 2"):
        cmmd(np.ones((1, 4)) / 2, np.ones((5, 4)) / 2)


# --- the evaluator: metric names, cached reference statistics, tags ---------------------------------------


def test_evaluator_logs_fd_dinov2_and_cmmd_from_the_assets_folder(digits_dir, tmp_path, tiny_assets):
    from tests.support.evaluation import evaluation_trial as _trial
    from tests.support.evaluation import evaluator as _evaluator

    trial = _trial(digits_dir, tmp_path, metrics=["fd_dinov2", "cmmd"], fid_samples=96, cfg_scale=[1.0],
                   reference_samples=128, val_batches=0)
    trial.resources.assets = str(tiny_assets)
    evaluator, model = _evaluator(trial)
    metrics, _ = evaluator.run(model, step=1)
    assert set(metrics) == {"fd_dinov2_cfg1.0", "se_fd_dinov2_cfg1.0", "cmmd_cfg1.0", "eval_seconds"}
    assert metrics["fd_dinov2_cfg1.0"] > 0 and 0 < metrics["se_fd_dinov2_cfg1.0"] < metrics["fd_dinov2_cfg1.0"]
    assert np.isfinite(metrics["cmmd_cfg1.0"])
    tags = evaluator.tags()
    assert tags["ditscale.detector.fd_dinov2"].startswith("dinov2@") and tags["ditscale.detector.cmmd"].startswith("clip@")
    # reference statistics cached per dataset as FID's are, keyed by the network's weights
    cached = sorted(p.name for p in evaluator.data.cache_dir().glob("fid_stats_*.npz"))
    assert any(name.startswith("fid_stats_dinov2-") for name in cached)
    assert any(name.startswith("fid_stats_clip-") for name in cached)
    assert list(evaluator.data.cache_dir().glob("*_cmmd_sigma10.json"))
    again, _ = evaluator.run(model, step=2)
    assert {k: v for k, v in again.items() if k != "eval_seconds"} == \
           {k: v for k, v in metrics.items() if k != "eval_seconds"}


# --- the study file: default, names, missing weights, sample count ------------------------------------


def _load(digits_dir, tmp_path, **eval_section):
    from harness.config import load_study

    study = tiny_study(digits_dir, "metrics", eval={"fid_samples": 64, **eval_section})
    return load_study(write_study(tmp_path / "study.yaml", study))


def test_default_metrics_keep_trial_ids_and_other_metrics_change_them(digits_dir, tmp_path, tiny_assets, monkeypatch):
    from harness.config import expand_grid

    monkeypatch.setenv(assets.ASSETS_ENV, str(tiny_assets))
    default = expand_grid(_load(digits_dir, tmp_path))[0]
    explicit = expand_grid(_load(digits_dir, tmp_path, metrics=["fid"]))[0]
    more = expand_grid(_load(digits_dir, tmp_path, metrics=["fid", "fd_dinov2", "cmmd"]))[0]
    assert default.eval.metrics == ["fid"] and "metrics" not in default.identity()["eval"]
    assert default.trial_id == explicit.trial_id != more.trial_id


def test_an_unknown_metric_names_eval_metrics(digits_dir, tmp_path):
    with pytest.raises(UserError) as err:
        _load(digits_dir, tmp_path, metrics=["fid", "fd_dino"])
    assert str(err.value) == "eval.metrics.1: got 'fd_dino'; allowed: 'fid', 'fd_dinov2' or 'cmmd'"


def test_a_metric_whose_weights_are_missing_names_the_folder_and_the_fetch_command(digits_dir, tmp_path):
    with pytest.raises(UserError) as err:
        _load(digits_dir, tmp_path, metrics=["fid", "cmmd"])
    lines = str(err.value).splitlines()
    assert len(lines) == 1
    assert str(tmp_path / "no-assets" / CLIP_FOLDER) in lines[0]
    assert "ditscale assets fetch" in lines[0] and "--metric cmmd" in lines[0]


def test_cmmd_with_fewer_than_two_samples_names_eval_fid_samples(digits_dir, tmp_path, tiny_assets, monkeypatch):
    monkeypatch.setenv(assets.ASSETS_ENV, str(tiny_assets))
    with pytest.raises(UserError, match=r"^eval\.fid_samples: 1 sample; cmmd needs? at least 2"):
        _load(digits_dir, tmp_path, metrics=["cmmd"], fid_samples=1)


def test_sweep_stops_before_ray_when_a_metric_weight_is_missing(digits_dir, tmp_path):
    study = write_study(tmp_path / "study.yaml",
                        tiny_study(digits_dir, "metrics", eval={"fid_samples": 64, "metrics": ["fd_dinov2"]}))
    # the CLI of this checkout (PYTHONPATH), whichever copy of the package is installed
    done = ditscale("sweep", str(study), cwd=tmp_path, check=False, timeout=120,
                    env={assets.ASSETS_ENV: str(tmp_path / "empty-assets"),
                         "PYTHONPATH": str(ROOT)})
    assert done.returncode != 0
    assert str(tmp_path / "empty-assets" / DINO_FOLDER) in done.stderr
    assert "ditscale assets fetch --dest DIR --metric fd_dinov2" in done.stderr
    assert "Ray" not in done.stderr and "Traceback" not in done.stderr


def test_assets_status_lists_each_metric_network_with_its_revision_or_the_fetch_command(tiny_assets, tmp_path, capsys):
    """`ditscale assets status` says, per eval.metrics network, whether evaluation will find it and whether it
    is the pinned revision; a missing one gets the fetch command (the line a study would stop with)."""

    from harness.evaluation.commands import _cmd_assets_status

    folder = tmp_path / "assets"
    shutil.copytree(tiny_assets, folder)
    name, pinned, _ = assets.METRIC_WEIGHTS["fd_dinov2"]
    assets.write_fetched(folder / DINO_FOLDER, name, pinned)  # as `assets fetch` records it
    shutil.rmtree(folder / CLIP_FOLDER)
    assert _cmd_assets_status(argparse.Namespace(assets=str(folder))) == 0
    lines = {ln.split(":", 1)[0]: ln for ln in capsys.readouterr().out.splitlines()}
    assert str(folder / DINO_FOLDER) in lines["fd_dinov2"] and f"pinned revision {pinned[:12]}" in lines["fd_dinov2"]
    assert "missing" in lines["cmmd"] and "ditscale assets fetch --dest DIR --metric cmmd" in lines["cmmd"]
    (folder / DINO_FOLDER / assets.FETCHED_FILE).unlink()  # placed by hand
    _cmd_assets_status(argparse.Namespace(assets=str(folder)))
    assert "revision unknown" in capsys.readouterr().out


def test_the_fetch_record_is_json_whatever_the_strings_hold(tmp_path):
    """`assets fetch`'s record reads back as written even with a quote or a backslash in it (it was built with an
    f-string, which wrote invalid JSON for those); an unreadable record reads as none (a folder placed by hand)."""
    assets.write_fetched(tmp_path, 'org/"odd\\name', "abc")
    assert assets.read_fetched(tmp_path) == {"name": 'org/"odd\\name', "revision": "abc"}
    (tmp_path / assets.FETCHED_FILE).write_text('{"name": "broken')
    assert assets.read_fetched(tmp_path) == {}
