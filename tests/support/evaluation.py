"""An Evaluator (harness/evaluation/evaluator.py) on a tiny trial of the digits, for the evaluation tests
(tests/evaluation/test_evaluate.py, tests/evaluation/test_modern_metrics.py)."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.support.study import tiny_study


def evaluation_trial(digits: Path, tmp_path: Path, **eval_section):
    from harness.config import TrialConfig

    study = tiny_study(digits, "evaluate", eval={"fid_samples": 96, "sampling_steps": 4, "cfg_scale": [1.0, 3.0],
                                                 "batch_size": 32, "val_batches": 2, **eval_section},
                       resources={"workers_per_trial": 1, "storage": str(tmp_path / "runs")},
                       tracking={"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "system_metrics": False})
    return TrialConfig.model_validate(study)


def evaluator(trial):
    from harness.common.process_group import DistInfo
    from harness.evaluation.evaluator import Evaluator
    from harness.trial.build import build_denoiser, build_objective_for, dataset_info

    dist = DistInfo(0, 1, 0, torch.device("cpu"))
    info = dataset_info(trial)
    torch.manual_seed(0)
    model, conditioner = build_denoiser(trial, info, dist.device)
    perturb(model)
    return Evaluator(trial, info, conditioner, build_objective_for(trial), dist), model.eval()


def perturb(model) -> None:
    """A freshly built DiT ignores its condition (adaLN-Zero): give the zero-initialised layers weights."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
