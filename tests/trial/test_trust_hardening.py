"""Issue 18, the checkpoint, assets and report rows: what a careless or hostile folder could do before.

Real DeepSpeed training in `ditscale train` subprocesses (gloo, CPU), real files, a real MLflow store
and the real `ditscale report` command. Each test failed on the code before the fix.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from pathlib import Path

import pytest

from tests.support import ditscale, tiny_study, write_study


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _tags(checkpoints: Path) -> list[str]:
    return sorted(p.name for p in checkpoints.glob("step-*"))


def _train(study: Path, cwd: Path, umask: int = 0o022):
    """`ditscale train` in a subprocess under `umask` (inherited from this process)."""
    old = os.umask(umask)
    try:
        return ditscale("train", str(study), cwd=cwd, check=False)
    finally:
        os.umask(old)


# --- rows: resume (0700 trial folders; an unreadable newest tag falls back) and checkpoint pruning ---------
# One real training run serves both rows (each `ditscale train` costs a DeepSpeed start-up).


@pytest.mark.slow
def test_private_folders_pruned_checkpoints_and_a_corrupt_newest_checkpoint_falls_back(tmp_path, digits_dir):
    name = "private"
    # log_every 1 and a divergence factor of 3: a healthy DDPM loss at batch 32, judged on single steps
    # against their running minimum, was stopped as diverged at step 84 of this very trial (issue 26).
    study = write_study(tmp_path / "s.yaml", tiny_study(
        digits_dir, name, train={"steps": 120, "checkpoint_every": 30, "log_every": 1, "keep_checkpoints": 2,
                                 "divergence_factor": 3.0}))
    # umask 0: without an explicit chmod every folder would come out 0777
    first = _train(study, tmp_path, umask=0)
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoints = next((tmp_path / "runs" / name).glob("*/checkpoints"))
    assert _mode(checkpoints.parent) == 0o700, f"trial folder is {oct(_mode(checkpoints.parent))}"
    assert _mode(checkpoints) == 0o700, f"checkpoints/ is {oct(_mode(checkpoints))}"
    assert "finished at step 120" in first.stdout, first.stdout[-3000:]
    # pruning: only the 2 newest of 30, 60, 90, 120 are kept, and no half-removed tag is left behind
    assert _tags(checkpoints) == ["step-00000090", "step-00000120"]
    assert (checkpoints / "latest").read_text().strip() == "step-00000120"
    assert not [p for p in checkpoints.iterdir() if p.name.startswith(".")]

    # The divergence rule's smoothed loss travels in the checkpoint (a resumed trial judges alike): it
    # is the estimator run over the losses logged up to the checkpoint's step.
    import mlflow
    import torch

    from harness.trial.divergence import SmoothedLoss

    states = checkpoints / "step-00000120" / "mp_rank_00_model_states.pt"
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    logged = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss") if m.step <= 120)
    replay = SmoothedLoss()
    for step, loss in logged:
        replay.judge(loss, 1, 3.0, step)
    saved = torch.load(states, weights_only=False, map_location="cpu")["smoothed_loss"]
    assert saved == pytest.approx(replay.to_dict()) and saved["steps"] == 120

    # The newest tag is damaged (a truncated copy, a full disk, a hand edit): resuming falls back to
    # step 90, says so in one line naming the tag, and trains 91..120 again.
    data = states.read_bytes()
    states.write_bytes(data[: len(data) // 2])
    second = _train(study, tmp_path)
    assert second.returncode == 0, f"resume failed:\n{second.stderr[-4000:]}"
    assert "Traceback" not in second.stderr
    warnings = [line for line in (second.stdout + second.stderr).splitlines() if "step-00000120" in line
                and "warning" in line.lower()]
    assert len(warnings) == 1, second.stderr[-3000:]
    assert "step 115/120" in second.stdout and "finished at step 120" in second.stdout, second.stdout[-3000:]
    assert len((checkpoints / "step-00000120" / "mp_rank_00_model_states.pt").read_bytes()) >= len(data) // 2 + 1
    assert _mode(checkpoints.parent) == 0o700 and _mode(checkpoints) == 0o700


def test_pruning_rules_on_real_folders(tmp_path):
    """The tag `latest` names and the one being written are never removed, tags newer than the one
    written (a fallback resume left them) are not touched, branch points stay."""
    from harness.trial.checkpoint import prune_checkpoints

    root = tmp_path / "rules"
    for step in (10, 20, 30, 40, 50, 60, 70):
        (root / f"step-{step:08d}").mkdir(parents=True)
        (root / f"step-{step:08d}" / "ema.pt").write_bytes(b"x")
    (root / "latest").write_text("step-00000010")
    removed = prune_checkpoints(root, keep=2, current="step-00000050", also_keep=[20])
    assert sorted(removed) == ["step-00000030"]
    assert _tags(root) == ["step-00000010", "step-00000020", "step-00000040", "step-00000050", "step-00000060",
                           "step-00000070"]


# --- row: Inception weights checked by sha256 ----------------------------------------------------------------


def test_inception_weights_are_verified_and_the_assets_copy_is_preferred(tmp_path, monkeypatch):
    from harness import assets
    from harness.errors import UserError

    monkeypatch.delenv(assets.DOWNLOAD_ENV, raising=False)
    place = tmp_path / "cleanfid-place"  # stands for /tmp, where clean-fid looks (shared by every user)
    place.mkdir()
    planted = place / assets.INCEPTION_FILE
    planted.write_bytes(b"anything at all" * 4096)
    no_assets = tmp_path / "no-assets"

    # A file where clean-fid looks is never taken on trust: one line naming it, no FID from it.
    with pytest.raises(UserError) as err:
        assets.find_inception(no_assets, target_dir=place)
    assert str(planted) in str(err.value) and "\n" not in str(err.value)
    assert re.fullmatch(r"[0-9a-f]{64}", assets.INCEPTION_SHA256)

    # The assets folder's verified copy is preferred and replaces whatever was at clean-fid's place.
    good = b"stand-in for the real weights" * 4096
    monkeypatch.setattr(assets, "INCEPTION_SHA256", hashlib.sha256(good).hexdigest(), raising=False)
    folder = tmp_path / "assets"
    folder.mkdir()
    (folder / assets.INCEPTION_FILE).write_bytes(good)
    assert assets.find_inception(folder, target_dir=place).read_bytes() == good
    assert assets.find_inception(folder, place=False) == folder / assets.INCEPTION_FILE

    # A same-size impostor in the assets folder is an error naming it (sizes prove nothing).
    (folder / assets.INCEPTION_FILE).write_bytes(b"x" * len(good))
    with pytest.raises(UserError) as err:
        assets.find_inception(folder, target_dir=place)
    assert str(folder / assets.INCEPTION_FILE) in str(err.value)

    # `assets fetch` refuses a mirror that serves another file and keeps nothing of it.
    mirror = tmp_path / "mirror.pt"
    mirror.write_bytes(b"evil" * 4096)
    dest = tmp_path / "fetched"
    with pytest.raises(UserError):
        assets.fetch_inception(dest, url=mirror.as_uri())
    assert not (dest / assets.INCEPTION_FILE).exists()
    mirror.write_bytes(good)
    assert assets.fetch_inception(dest, url=mirror.as_uri()).read_bytes() == good


# --- row: the report's folder ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_report_removes_only_its_own_files_and_stays_inside_reports(tmp_path, monkeypatch):
    import mlflow

    from tests.support.synthetic import DIT_GFLOPS, log_synthetic_sweep
    from tests.support.synthetic import law_loss as _law_loss

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfgs = [{"family": "dit", "size": s, "patch": 8, "steps": 300, "gflops": DIT_GFLOPS[(s, 8)]} for s in ("S", "B")]
    log_synthetic_sweep(uri, "study-a", cfgs, _law_loss, n_logs=3, n_evals=1)
    client = mlflow.MlflowClient(uri)
    client.create_experiment("study-b")  # no trials: a report without figures
    client.create_experiment("../../x")

    # --out into a folder that holds other people's PNGs: only the report's own files come and go.
    out = tmp_path / "shared"
    out.mkdir()
    holiday = out / "holiday.png"
    holiday.write_bytes(b"\x89PNG not the report's")
    ditscale("report", "--experiment", "study-a", "--tracking-uri", uri, "--out", str(out), cwd=tmp_path)
    assert holiday.is_file(), "a PNG the report did not write was deleted"
    figures = sorted(p.name for p in out.glob("*.png") if p != holiday)
    assert figures, "the first report drew no figure"
    manifest = json.loads((out / "report-files.json").read_text())
    assert set(figures) <= set(manifest["files"]) and "holiday.png" not in manifest["files"]
    ditscale("report", "--experiment", "study-b", "--tracking-uri", uri, "--out", str(out), cwd=tmp_path)
    assert holiday.is_file()
    assert not [f for f in figures if (out / f).exists()], "the previous report's figures were left behind"

    # An experiment named ../../x writes its report inside reports/, in one folder named by the same
    # rule harness.paths.report_dir uses.
    work = tmp_path / "a" / "b" / "work"
    work.mkdir(parents=True)
    ditscale("report", "--experiment", "../../x", "--tracking-uri", uri, cwd=work)
    assert not (tmp_path / "a" / "b" / "x").exists() and not (tmp_path / "a" / "x").exists()
    written = [p for p in (work / "reports").iterdir()]
    assert len(written) == 1 and (written[0] / "index.html").is_file()
    monkeypatch.chdir(work)
    from harness.paths import report_dir

    assert report_dir("../../x") == written[0]
    for name in ("../../x", "..", ".", "a/b", "a\\b", "x\ny", "\x1b[31mred", "/abs", ""):
        folder = report_dir(name)
        assert folder.parent == work / "reports" and folder.name not in ("", ".", "..")
        assert not re.search(r"[/\\\x00-\x1f\x7f]", folder.name) and not folder.name.startswith(".")
    assert report_dir("dit-scaling").name == "dit-scaling", "an ordinary name is its own folder name"
