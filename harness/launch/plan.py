"""The plan of a study, printed by `ditscale sweep --dry-run` (and before every sweep): one row per
trial with its model, forward and training compute, workers. Starts nothing: no Ray, no MLflow."""

from __future__ import annotations

from harness.config import TrialConfig
from harness.trial.build import dataset_info
from models.flops import training_gflops


def plan_rows(trials: list[TrialConfig]) -> list[dict]:
    rows = []
    for i, trial in enumerate(trials):
        fwd = dataset_info(trial, need_manifest=False).forward_gflops
        rows.append({
            "trial": i, "trial_id": trial.trial_id, "model": trial.model_name,
            "attention": trial.model.attention if trial.model.family == "mmdit" else "-",
            "objective": trial.objective.kind, "steps": trial.train.steps, "batch": trial.train.batch_size,
            "fwd_gflops": fwd, "train_gflops": training_gflops(fwd, trial.train.steps * trial.train.batch_size),
            "workers": trial.resources.workers_per_trial,
        })
    return rows


def print_plan(rows: list[dict]) -> None:
    print(f"{'#':>3} {'trial_id':<13}{'model':<15}{'attn':<7}{'objective':<15}{'steps':>7}{'batch':>6}"
          f"{'fwd GFLOPs':>12}{'train GFLOPs':>14}{'workers':>8}")
    for r in rows:
        print(f"{r['trial']:>3} {r['trial_id']:<13}{r['model']:<15}{r['attention']:<7}{r['objective']:<15}"
              f"{r['steps']:>7}{r['batch']:>6}{r['fwd_gflops']:>12.4f}{r['train_gflops']:>14.4g}{r['workers']:>8}")
    print("GFLOPs are multiply-adds (DiT paper convention); training compute = 3 x forward x images.")
