"""Issue 26, files and processes: a read-only output folder is one line naming the flag or field that
chose it (train, data pack, report) before any work; a full disk during a checkpoint is one line naming
the checkpoint folder and leaves no half-written tag; `ditscale eval` chooses its checkpoint as a resumed
trial does (a damaged newest tag is named in a warning and the previous good one is used).

Read-only folders and full disks are real: a tmpfs mounted read-only or with a small size (the tests
run as root, whom permission bits do not stop; skipped where mounting is not allowed). SIGTERM and
SIGKILL during `data pack` are in tests/data/test_data_hardening.py.
"""

from __future__ import annotations

import argparse
import errno
import json
import subprocess
from pathlib import Path

import pytest
import torch

from harness.errors import UserError
from tests.support import ROOT, ditscale, tiny_study, write_study


def _mount_tmpfs(where: Path, options: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")


@pytest.fixture
def read_only(tmp_path):
    """A real read-only filesystem (tmpfs mounted ro): even root cannot create anything in it."""
    mount = tmp_path / "ro"
    _mount_tmpfs(mount, "ro,size=64k")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    """`ditscale ARGS` in this process (torch is imported once, not per command)."""
    from harness.cli import main

    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def _one_line(code: int, err: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --- (a) read-only output folders: one line before any work ---------------------------------------------

def test_read_only_outputs_are_one_line_naming_the_flag_or_field(read_only, tmp_path, capsys, monkeypatch,
                                                                 digits_dir):
    # data pack: OUT on the read-only mount, and OUT below a regular file
    line = _one_line(*_cli(capsys, "data", "pack", "shapes", str(read_only / "out"), "--image-size", "8",
                           "--count", "20")[::2])
    assert line.startswith(f"ditscale data: error: OUT {read_only / 'out'}: cannot write there") and \
        "Read-only file system" in line, line
    (tmp_path / "a-file").write_text("x")
    line = _one_line(*_cli(capsys, "data", "pack", "shapes", str(tmp_path / "a-file" / "out"), "--image-size",
                           "8", "--count", "20")[::2])
    assert "OUT" in line and "is not a folder" in line, line

    # train: resources.storage, then a local MLflow database, on the read-only mount (before any model is built)
    monkeypatch.chdir(tmp_path)
    study = tiny_study(digits_dir, "readonly", resources={"workers_per_trial": 1, "storage": str(read_only / "runs")})
    path = write_study(tmp_path / "s.yaml", study)
    line = _one_line(*_cli(capsys, "train", str(path))[::2])
    assert f"resources.storage {read_only / 'runs'}: cannot write there" in line and "Read-only" in line, line
    study["resources"]["storage"] = str(tmp_path / "runs")
    study["tracking"]["uri"] = f"sqlite:///{read_only / 'mlflow.db'}"
    line = _one_line(*_cli(capsys, "train", str(write_study(path, study)))[::2])
    assert "tracking.uri" in line and str(read_only / "mlflow.db") in line, line
    assert not (tmp_path / "runs").exists()

    # report: --out, and the default reports/<experiment> in a read-only working folder
    line = _one_line(*_cli(capsys, "report", "--experiment", "readonly", "--out", str(read_only / "rep"))[::2])
    assert f"--out {read_only / 'rep'}: cannot write there" in line, line
    monkeypatch.chdir(read_only)
    line = _one_line(*_cli(capsys, "report", "--experiment", "readonly")[::2])
    assert "--out (default)" in line and str(read_only / "reports" / "readonly") in line, line


def test_a_refused_write_at_the_write_site_is_the_same_one_line(read_only, tmp_path):
    """Where the up-front check cannot see it coming (a folder made read-only meanwhile, a sweep's
    trial that meets it first): the write sites give the same line."""
    from harness.data import DataError
    from harness.data.pack import _output_refused_is_one_line
    from harness.trial.checkpoint import prepare_checkpoint_root

    out = tmp_path / "out"
    for culprit in (out / "train-000000.tar", tmp_path / ".out.x1y2.partial" / "train-000000.tar", out):
        refused = PermissionError(errno.EACCES, "Permission denied", str(culprit))
        with pytest.raises(DataError, match=rf"^OUT {out}: cannot write there \(Permission denied\)"), \
                _output_refused_is_one_line(out):
            raise refused
    # an input the pack reads is not OUT's problem: the error goes on as it was
    refused = PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "images" / "a.png"))
    with pytest.raises(PermissionError), _output_refused_is_one_line(out):
        raise refused

    with pytest.raises(UserError, match=r"^resources.storage .*cannot write there \(Read-only file system\)"):
        prepare_checkpoint_root(read_only / "runs" / "study" / "trial" / "checkpoints")


# --- (b) a full disk during a checkpoint --------------------------------------------------------------

@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_is_one_line_and_leaves_no_half_tag(tmp_path, digits_dir):
    """The first checkpoint (~3.7 MB: EMA, model, Adam states) fits in 6 MiB, the second does not: one
    line naming the tag and "no space left", the half-written second tag gone, `latest` on the first."""
    disk = tmp_path / "small"
    _mount_tmpfs(disk, "size=6m")
    try:
        study = tiny_study(digits_dir, "fulldisk", train={"steps": 4, "log_every": 2, "checkpoint_every": 2},
                           resources={"workers_per_trial": 1, "storage": str(disk / "runs")})
        proc = ditscale("train", str(write_study(tmp_path / "s.yaml", study)), cwd=tmp_path, check=False,
                        env={"PYTHONPATH": str(ROOT)})  # this checkout's harness, not the installed one
        (checkpoints,) = (disk / "runs" / "fulldisk").glob("*/checkpoints")
        errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
        assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert f"checkpoint {checkpoints / 'step-00000004'}: no space left" in errors[0], errors[0]
        assert "inline_container" not in proc.stderr
        tags = sorted(p.name for p in checkpoints.iterdir() if p.is_dir())
        assert tags == ["step-00000002"], tags  # no step-00000004, no hidden .saving- folder
        assert (checkpoints / "latest").read_text().strip() == "step-00000002"
        assert sorted(p.name for p in (checkpoints / "step-00000002").iterdir()) == [
            "ema.pt", "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    finally:
        subprocess.run(["umount", str(disk)], check=True)


# --- (d) `ditscale eval` chooses as resume does -------------------------------------------------------------

def test_eval_passes_over_damaged_newest_checkpoints_as_resume_does(digits_dir, tmp_path, capsys, monkeypatch):
    from harness.config import expand_grid, load_study
    from harness.paths import checkpoint_root
    from harness.trial.build import build_denoiser, dataset_info
    from models.ema import EMA

    monkeypatch.chdir(tmp_path)
    path = write_study(tmp_path / "s.yaml", tiny_study(digits_dir, "evalpick", eval={"val_batches": 1}))
    trial = expand_grid(load_study(path))[0]
    model, _ = build_denoiser(trial, dataset_info(trial), torch.device("cpu"))
    root = checkpoint_root(trial)
    tags = {step: root / f"step-{step:08d}" for step in (10, 20, 30)}
    for folder in tags.values():
        folder.mkdir(parents=True)
    torch.save(EMA(model).state_dict(), tags[10] / "ema.pt")
    (tags[20] / "ema.pt").write_bytes(b"not a torch archive" * 50)  # a hand edit, a truncated copy
    torch.save(argparse.Namespace(x=1), tags[30] / "ema.pt")  # a torch archive weights_only refuses (UnpicklingError)

    code, out, err = _cli(capsys, "eval", str(path), "--no-log", "--json")
    assert code == 0, err
    assert json.loads(out)["tables"] == ["val_losses/step-00000010.json"]  # evaluated at step 10
    warnings = err.strip().splitlines()
    assert len(warnings) == 2 and "Traceback" not in err, err
    assert str(tags[30]) in warnings[0] and "UnpicklingError" in warnings[0] and "step-00000010" in warnings[0]
    assert str(tags[20]) in warnings[1] and "ema.pt" in warnings[1]

    # an explicit --checkpoint is never replaced by another: one line
    line = _one_line(*_cli(capsys, "eval", str(path), "--no-log", "--checkpoint", str(tags[20]))[::2])
    assert f"--checkpoint {tags[20]}" in line and "cannot be evaluated" in line, line

    # none good: one line naming each
    (tags[10] / "ema.pt").write_bytes(b"")
    line = _one_line(*_cli(capsys, "eval", str(path), "--no-log")[::2])
    assert "no checkpoint of this trial can be evaluated" in line and all(t.name in line for t in tags.values()), line
