"""The plan of a study, printed by `ditscale sweep --dry-run` (and before every sweep): one row per
trial with its model, size, budget, length and compute. Starts nothing: no Ray, no MLflow.

Budget trials (`train.flops`) get their step count here (harness/trial/budget.py), before anything runs.
"""

from __future__ import annotations

from harness.config import TrialConfig
from harness.trial.budget import resolve_budgets
from harness.trial.build import dataset_info
from models.flops import training_gflops


def plan_rows(trials: list[TrialConfig]) -> list[dict]:
    resolve_budgets(trials)
    rows = []
    for i, trial in enumerate(trials):
        info = dataset_info(trial, need_manifest=False)
        images = trial.train.steps * trial.train.batch_size
        rows.append({
            "trial": i, "trial_id": trial.trial_id, "model": trial.model_name,
            "attention": trial.model.attention if trial.model.family == "mmdit" else "-",
            "objective": trial.objective.kind, "params": info.params, "budget": trial.train.flops,
            "steps": trial.train.steps, "batch": trial.train.batch_size, "images": images,
            "images_per_param": images / info.params, "fwd_gflops": info.forward_gflops,
            "train_gflops": training_gflops(info.forward_gflops, images),
            "workers": trial.resources.workers_per_trial,
        })
    return rows


def print_plan(rows: list[dict]) -> None:
    print(f"{'#':>3} {'trial_id':<13}{'model':<15}{'attn':<6}{'objective':<15}{'params':>10}{'budget':>10}"
          f"{'steps':>8}{'batch':>6}{'images':>10}{'img/param':>10}{'fwd GFLOPs':>11}{'train GFLOPs':>13}{'workers':>8}")
    for r in rows:
        budget = f"{r['budget']:.3g}" if r["budget"] else "-"
        print(f"{r['trial']:>3} {r['trial_id']:<13}{r['model']:<15}{r['attention']:<6}{r['objective']:<15}"
              f"{r['params'] / 1e6:>9.2f}M{budget:>10}{r['steps']:>8}{r['batch']:>6}{r['images']:>10}"
              f"{r['images_per_param']:>10.3g}{r['fwd_gflops']:>11.4f}{r['train_gflops']:>13.4g}{r['workers']:>8}")
    print("GFLOPs and budgets are multiply-adds (DiT paper convention); training compute = 3 x forward x images.")
