"""Synthetic sweeps logged into a real SQLite MLflow store with the layout harness/tracking.py and
harness/trial/loop.py write (parent run tagged ditscale.sweep; child runs with trial_id, family, size,
patch, objective, attention, model, ditscale.status, mlflow.parentRunId; the flattened config as params;
per-step metrics including samples_seen and train_gflops), and check_report, which builds the report of
any study (synthetic or a real sweep's) and asserts it is complete."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import runs
from tests.support.dit_paper import DIT_GFLOPS, DIT_PARAMS_M

__all__ = ["BATCH", "DIT_GFLOPS", "DIT_PARAMS_M", "TRUE_A", "TRUE_ALPHA", "TRUE_E", "check_report", "client",
           "law_loss", "log_synthetic_sweep"]

BATCH = 256

# the law the synthetic loss follows: y = E + A * C^(-alpha), C = training GFLOPs (multiply-adds)
TRUE_ALPHA, TRUE_E = 0.3, 0.1
TRUE_A = 2.0 * (3 * 0.36 * BATCH * 2000) ** TRUE_ALPHA  # reducible part 2.0 at the smallest compute


def client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def log_synthetic_sweep(uri: str, experiment: str, configs: list[dict], loss_fn, fd_fn=None, n_logs: int = 6,
                        n_evals: int = 3, seed: int = 0, params_metric: bool = False,
                        artifact_root: Path | None = None, se_fn=None) -> dict:
    """Log one sweep: a parent run and one child run per config, the way the harness does.

    configs: dicts with family, size, patch, attention, objective, steps, gflops (forward, per image)
    and optionally params. loss_fn(cfg, step, compute, rng) -> loss; fd_fn likewise for the stand-in
    Fréchet distance (fd_lenet, per CFG scale), se_fn for val_loss's standard error (se_val_loss).
    Returns {"parent": run_id, "runs": {trial_id: run_id}}."""
    from mlflow.entities import Metric, Param

    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else c.create_experiment(
        experiment, artifact_location=(artifact_root / experiment).as_uri() if artifact_root else None)
    rng = np.random.default_rng(seed)
    parent = c.create_run(exp_id, tags={"ditscale.sweep": "true", "mlflow.runName": f"sweep-{experiment}"}).info.run_id
    c.log_batch(parent, params=[Param("grid", json.dumps({"model.size": sorted({x["size"] for x in configs})})),
                                Param("n_trials", str(len(configs)))])
    out, status = {}, []
    for cfg in configs:
        family, attention = cfg["family"], cfg.get("attention", "joint")
        model = f"DiT-{cfg['size']}/{cfg['patch']}" if family == "dit" else f"MMDiT-{cfg['size']}/{cfg['patch']}"
        flat = {"name": experiment, "data.image_size": "32", "data.channels": "4", "model.family": family,
                "model.size": cfg["size"], "model.patch": str(cfg["patch"]), "model.attention": attention,
                "model.qk_norm": "", "objective.kind": cfg.get("objective", "ddpm"), "train.steps": str(cfg["steps"]),
                "train.batch_size": str(BATCH), "train.lr": "0.0001", "train.betas": "[0.9, 0.999]",
                "train.precision": "bf16", "eval.cfg_scale": "[1.0, 1.5]", "eval.feature_extractor": "auto",
                "tracking.uri": ""}
        trial_id = hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:12]
        tags = {"family": family, "size": cfg["size"], "patch": str(cfg["patch"]),
                "objective": flat["objective.kind"], "attention": attention if family == "mmdit" else "",
                "model": model, "trial_id": trial_id, "ditscale.status": "running", "mlflow.parentRunId": parent,
                "mlflow.runName": f"{model}-{trial_id[:6]}"}
        run_id = c.create_run(exp_id, tags=tags).info.run_id
        c.log_batch(run_id, params=[Param(k, v) for k, v in flat.items()])
        steps = np.unique(np.linspace(cfg["steps"] / n_logs, cfg["steps"], n_logs).round().astype(int))
        evals = set(steps[-n_evals:].tolist()) if n_evals else set()
        now = int(time.time() * 1000)
        batch = [Metric("startup_s", 3.0, now, 1)]
        if params_metric:
            batch.append(Metric("params", cfg["params"], now, 0))
        for step in steps:
            samples = float(step * BATCH)
            compute = 3 * cfg["gflops"] * samples
            m = {"loss": loss_fn(cfg, step, compute, rng), "lr": 1e-4, "grad_norm": 1.0, "img_per_s": 100.0,
                 "tflops": 1.0, "data_wait_frac": 0.01, "corrupt_samples": 0.0, "samples_seen": samples,
                 "train_gflops": compute, "step": float(step)}
            if step in evals:
                m["val_loss"] = loss_fn(cfg, step, compute, rng)
                if se_fn is not None:
                    m["se_val_loss"] = se_fn(cfg, step, compute, rng)
                if fd_fn is not None:
                    for cfg_scale in (1.0, 1.5):
                        m[f"fd_lenet_cfg{cfg_scale}"] = fd_fn(cfg, step, compute, rng) / cfg_scale
                    m["kid"] = fd_fn(cfg, step, compute, rng) / 100
            batch += [Metric(k, float(v), now, int(step)) for k, v in m.items()]
        for i in range(0, len(batch), 900):
            c.log_batch(run_id, metrics=batch[i:i + 900])
        c.set_tag(run_id, "ditscale.status", "finished")
        c.set_terminated(run_id, "FINISHED")
        out[trial_id] = run_id
        status.append({"trial_id": trial_id, "model": model, "status": "finished"})
    c.log_text(parent, json.dumps(status), "trial_status.json")
    c.set_terminated(parent, "FINISHED")
    return {"parent": parent, "runs": out, "experiment_id": exp_id}


def law_loss(cfg, step, compute, rng):
    return (TRUE_E + TRUE_A * compute ** -TRUE_ALPHA) * (1 + 0.01 * rng.standard_normal())


def check_report(tracking_uri: str, experiment: str, out_dir: Path, parent_run_id: str | None = None,
                 expect_figures: list[str] | None = None, **kw) -> Path:
    """Build the report of a study and assert it is complete: index.html, report.md, the PNGs it
    references, trials.csv/.parquet (one row per trial) — all logged under report/ to the sweep's
    parent run. Reusable for a real sweep: check_report(uri, "smoke", tmp_path / "report")."""
    from analysis.report import ARTIFACT_DIR, build_report

    index = build_report(tracking_uri, experiment, parent_run_id=parent_run_id, out_dir=out_dir, **kw)
    assert index == Path(out_dir) / "index.html" and index.is_file()
    html = index.read_text()
    md = (index.parent / "report.md").read_text()
    assert "the analysis stopped early" not in md, md.split("## Notes")[-1]
    pngs = sorted(p.name for p in index.parent.glob("*.png"))
    assert pngs, "the report has no figure"
    for name in pngs:
        assert f"src='{name}'" in html and f"]({name})" in md
        assert (index.parent / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in expect_figures or []:
        assert name in pngs, f"{name} missing; notes: {md.split('## Notes')[-1][:2000]}"
    assert "http://" not in html.replace(tracking_uri, "") and "https://" not in html and "<script" not in html
    trials = pd.read_csv(index.parent / "trials.csv")
    assert len(trials) == len(runs.load_trials(tracking_uri, experiment, parent_run_id)) > 0
    assert len(pd.read_parquet(index.parent / "trials.parquet")) == len(trials)
    assert "multiply-adds" in html and "multiply-adds" in md
    parent = parent_run_id or runs.find_parent_run(tracking_uri, experiment)
    assert parent, "no sweep parent run to log the report to"
    logged = {Path(a.path).name for a in client(tracking_uri).list_artifacts(parent, ARTIFACT_DIR)}
    missing = {"index.html", "report.md", "trials.csv", "trials.parquet", *pngs} - logged
    assert not missing, f"not logged to the parent run: {missing}"
    return index
