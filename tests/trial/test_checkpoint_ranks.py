"""A checkpoint that fails on one rank only (issue 26 follow-up): every rank ends the save alike and in
bounded time, and no tag missing that rank's files is published. Real DeepSpeed on 2 gloo ranks
(torchrun), a real full disk (a small tmpfs) under rank 1's checkpoint folder (slow); the pieces on one
rank in-process (fast): a stand-in engine whose checkpoint engine meets a full disk, what each rank
raises, and a publish that fails partway."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.paths import ROOT

GROUP_TIMEOUT_S = 90  # the process group's timeout in the script: a rank left waiting fails after this

_RANKS = r"""
import json, sys, time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as tdist

# A process group with a short timeout (the harness's is 30 min): a rank left waiting in a collective
# fails after it, so a save that leaves one rank behind shows as a slow, failed save, not a hung test.
tdist.init_process_group("gloo", timeout=timedelta(seconds=int(sys.argv[4])))
from harness.common.process_group import setup_distributed

dist = setup_distributed(use_gpu=False)  # adopts the group; DeepSpeed's distributed setup
import deepspeed

from harness.trial.checkpoint import TrialState, save_checkpoint
from models.ema import EMA

torch.manual_seed(0)
model = torch.nn.Linear(256, 256)  # ZeRO-1: each rank writes its half of the Adam states (~260 kB)
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
                                  config={"train_batch_size": 2, "zero_optimization": {"stage": 1},
                                          "zero_allow_untested_optimizer": True})
engine.backward(engine(torch.randn(1, 256)).square().mean())
engine.step()
ema = EMA(engine.module, decay=0.9)
out = Path(sys.argv[1])
results = []
# Step 1 into a folder each with room; step 2 with rank 1's folder on a full disk (as a node whose local
# disk filled up). Rank 0's folder is the one whose tags get published.
for step, root in ((1, out / f"rank{dist.rank}"), (2, Path(sys.argv[2 + dist.rank]))):
    root.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        save_checkpoint(engine, ema, dist, root, TrialState(step=step))
        outcome = "saved"
    except Exception as err:
        outcome = f"{type(err).__name__}: {err}"
    results.append({"step": step, "outcome": outcome, "seconds": round(time.monotonic() - started, 2)})
(out / f"rank{dist.rank}.json").write_text(json.dumps(results))
# An orderly exit (tests/trial/test_phema.py): without it a rank can leave while gloo's threads still
# serve its peer.
tdist.barrier()
tdist.destroy_process_group()
"""


@pytest.mark.slow
def test_a_checkpoint_that_fails_on_one_rank_ends_on_every_rank_and_publishes_nothing(tmp_path):
    """Rank 1's disk is full at step 2: DeepSpeed's write of its optimizer states fails there only.
    Before, rank 1 left DeepSpeed's save and waited for the others in another collective while rank 0
    waited in DeepSpeed's closing barrier (until the group's timeout; 30 min in the harness). Now both
    ranks raise the same one-line UserError naming rank 1 and its folder within seconds, rank 0 leaves
    no step-2 tag (hidden or not) and `latest` still names step 1."""
    from harness.common.net import free_port

    disk = tmp_path / "full"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True,
                             text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        (tmp_path / "ranks.py").write_text(_RANKS)
        rank0, rank1 = tmp_path / "rank0", disk / "checkpoints"
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                               "--master_port", str(free_port()), str(tmp_path / "ranks.py"), str(tmp_path),
                               str(rank0), str(rank1), str(GROUP_TIMEOUT_S)],
                              cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                              timeout=4 * GROUP_TIMEOUT_S, check=False)
        results = {rank: json.loads((tmp_path / f"rank{rank}.json").read_text())
                   for rank in (0, 1) if (tmp_path / f"rank{rank}.json").is_file()}
        assert set(results) == {0, 1}, proc.stdout[-3000:] + proc.stderr[-6000:]
        print(f"\n{json.dumps(results)}")
        assert results[0][0]["outcome"] == "saved" == results[1][0]["outcome"], results
        failed = {rank: results[rank][1] for rank in (0, 1)}
        expected = f"UserError: rank 1: checkpoint {rank1 / 'step-00000002'}: no space left on its disk"
        assert all(f["outcome"].startswith(expected) for f in failed.values()), failed
        assert all(f["seconds"] < GROUP_TIMEOUT_S / 3 for f in failed.values()), failed  # nobody waited it out
        tags = sorted(p.name for p in rank0.iterdir() if not p.name.endswith(".py"))  # DeepSpeed's zero_to_*.py
        assert tags == ["latest", "step-00000001"], tags  # no step-00000002, no hidden .saving-step-00000002
        assert (rank0 / "latest").read_text().strip() == "step-00000001"
        assert proc.returncode == 0, proc.stderr[-6000:]
    finally:
        subprocess.run(["umount", str(disk)], check=True)


class _FullDisk:
    """Stands in for DeepSpeed's checkpoint engine (deepspeed/runtime/checkpoint_engine: makedirs, save)
    on a full disk: every save raises ENOSPC, as torch.save's open does there."""

    def __init__(self):
        self.calls: list[str] = []

    def makedirs(self, path, exist_ok=False):
        self.calls.append("makedirs")
        os.makedirs(path, exist_ok=exist_ok)

    def save(self, state_dict, path):
        self.calls.append(Path(path).name)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


class _Engine:
    """The part of a DeepSpeed engine that save_checkpoint drives: its save_checkpoint writes through its
    checkpoint engine and would meet the other ranks in a barrier after the first file."""

    def __init__(self, checkpoint_engine):
        if checkpoint_engine is not None:
            self.checkpoint_engine = checkpoint_engine
        self.reached_barrier = False

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        folder = Path(save_dir) / tag
        self.checkpoint_engine.makedirs(folder, exist_ok=True)
        self.checkpoint_engine.save({"client": client_state}, folder / "mp_rank_00_model_states.pt")
        self.reached_barrier = True  # DeepSpeed's barrier: a failing rank must still get here
        self.checkpoint_engine.save({}, folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
        return True


def test_a_full_disk_in_deepspeeds_writes_is_one_user_error_and_publishes_nothing(tmp_path):
    """One rank (a real gloo group of 1, in-process), a checkpoint engine whose disk is full: the error is
    recorded (the save goes on to DeepSpeed's barrier and writes nothing more), the checkpoint engine's
    methods are restored, the save ends in the one-line UserError, and step 2 is not published: `latest`
    still names step 1. An engine without the checkpoint engine's methods (DeepSpeed renamed them) is a
    RuntimeError naming DeepSpeed's version, not a save that could hang again."""
    import torch
    import torch.distributed as tdist

    from harness.common.process_group import DistInfo
    from harness.errors import UserError
    from harness.trial.checkpoint import TrialState, save_checkpoint

    root = tmp_path / "checkpoints"
    (root / "step-00000001").mkdir(parents=True)
    (root / "latest").write_text("step-00000001")
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    ema = torch.nn.Linear(1, 1)
    started = not tdist.is_initialized()
    if started:
        tdist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        disk = _FullDisk()
        engine = _Engine(disk)
        with pytest.raises(UserError) as err:
            save_checkpoint(engine, ema, dist, root, TrialState(step=2))
        assert str(err.value).startswith(f"checkpoint {root / 'step-00000002'}: no space left on its disk"), err.value
        assert len(str(err.value).splitlines()) == 1
        assert engine.reached_barrier and disk.calls == ["makedirs", "mp_rank_00_model_states.pt"]
        assert "save" not in vars(disk) and "makedirs" not in vars(disk)  # the class's methods again
        assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000001"]
        assert (root / "latest").read_text() == "step-00000001"
        for renamed in (None, type("Renamed", (), {"makedirs": os.makedirs})()):
            with pytest.raises(RuntimeError, match=r"DeepSpeed \S+: its engine has no checkpoint_engine\."):
                save_checkpoint(_Engine(renamed), ema, dist, root, TrialState(step=3))
    finally:
        if started:
            tdist.destroy_process_group()


def test_each_rank_raises_its_own_bug_else_the_first_full_disk_else_names_the_failed_rank(tmp_path):
    """Rank 0 met a bug, rank 1 a full disk, rank 2 nothing: rank 0 raises its own error, ranks 1 and 2
    the full disk's UserError (the user's to fix, though a lower rank failed otherwise); with no user
    failure anywhere, a rank without an error of its own raises a RuntimeError naming the failed rank."""
    import torch

    from harness.common.process_group import DistInfo
    from harness.errors import UserError
    from harness.trial.checkpoint import _raise_save_failure, _SaveFailure

    path = tmp_path / "step-00000002"
    bug, full = _SaveFailure("ValueError: bad state", False), _SaveFailure(f"checkpoint {path}: no space left", True)
    failures = [(0, bug), (1, full)]

    def raised(rank, mine, error=None, found=failures):
        dist = DistInfo(rank=rank, world_size=3, local_rank=rank, device=torch.device("cpu"))
        with pytest.raises(Exception) as err:
            _raise_save_failure(found, mine, error, dist, path)
        return err.value

    own = ValueError("bad state")
    assert raised(0, bug, own) is own
    for rank, mine, error in ((1, full, OSError(errno.ENOSPC, "full")), (2, None, None)):
        err = raised(rank, mine, error)
        assert isinstance(err, UserError) and str(err) == f"rank 1: checkpoint {path}: no space left", err
    err = raised(2, None, found=[(0, bug)])
    assert type(err) is RuntimeError and str(err) == f"checkpoint {path} not saved: rank 0: ValueError: bad state"


def test_a_publish_that_fails_partway_is_undone(tmp_path):
    """_publish: `latest` cannot be written (here a folder holds its name), or the new tag cannot be
    renamed into place (here its staging folder is gone): the renames done are undone, so the step's
    folder (new or replaced) is not left under its step-* name unnamed by `latest`, and an older folder
    of that step is back, not deleted or left under .pruning-."""
    from harness.trial.checkpoint import _publish

    root = tmp_path / "checkpoints"

    def prepare(old: bool):
        shutil.rmtree(root, ignore_errors=True)
        (root / ".saving-step-00000002").mkdir(parents=True)
        (root / ".saving-step-00000002" / "new").write_text("new")
        if old:
            (root / "step-00000002").mkdir()
            (root / "step-00000002" / "old").write_text("old")

    for old in (False, True):
        prepare(old)
        (root / "latest").mkdir()  # `latest` cannot be replaced by a file
        with pytest.raises(OSError):
            _publish(root, root / ".saving-step-00000002", "step-00000002")
        assert (root / ".saving-step-00000002" / "new").read_text() == "new"  # back: the caller removes it
        expected = [".saving-step-00000002", "latest"] + (["step-00000002"] if old else [])
        assert sorted(p.name for p in root.iterdir()) == expected, old
        if old:
            assert [p.name for p in (root / "step-00000002").iterdir()] == ["old"]
    prepare(True)
    with pytest.raises(FileNotFoundError):
        _publish(root, root / ".saving-step-00000003", "step-00000002")  # nothing to rename into place
    assert sorted(p.name for p in root.iterdir()) == [".saving-step-00000002", "step-00000002"]
    assert [p.name for p in (root / "step-00000002").iterdir()] == ["old"]
