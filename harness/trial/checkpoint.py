"""A trial's checkpoints: DeepSpeed's (all ranks) with the EMA and the trial state beside them.

    <trial folder>/checkpoints/step-XXXXXXXX/   DeepSpeed checkpoint + ema.pt (rank 0)
    <trial folder>/checkpoints/latest           DeepSpeed's pointer to the newest complete tag

The client state DeepSpeed stores with each tag carries the trial state (step, images seen, MLflow
run, resumes) and every rank's RNG state, so a resumed trial continues where it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as tdist

from harness.errors import UserError
from harness.paths import checkpoint_root
from harness.trial.distributed import DistInfo

EMA_FILE = "ema.pt"


@dataclass
class TrialState:
    """What a trial carries from step to step and across resumes."""

    step: int = 0
    samples_seen: int = 0
    run_id: str | None = None  # the trial's MLflow run
    resumes: int = 0           # how often the trial was resumed (seeds the data stream anew)


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(engine, ema, dist: DistInfo, root: Path, state: TrialState) -> Path:
    """DeepSpeed checkpoint on all ranks; EMA (replicated) written by rank 0 beside it."""
    tag = tag_for(state.step)
    rng = [None] * dist.world_size
    tdist.all_gather_object(rng, _rng_state())
    client = {"step": state.step, "samples_seen": state.samples_seen, "run_id": state.run_id,
              "resumes": state.resumes, "rng": rng}
    # EMA first, then DeepSpeed: DeepSpeed writes `latest` last, so a crash in between never
    # leaves `latest` pointing at a checkpoint without its EMA.
    path = root / tag
    if dist.is_main:
        path.mkdir(parents=True, exist_ok=True)
        torch.save(ema.state_dict(), path / EMA_FILE)
    engine.save_checkpoint(str(root), tag=tag, client_state=client)
    return path


def resume(engine, ema, dist: DistInfo, root: Path, resume_from: dict | None) -> TrialState:
    """Load the newest checkpoint, if any, into the engine, the EMA and the RNGs; its trial state
    (resumes counted up), else a fresh state.

    The trial folder's `latest` (written by DeepSpeed after a complete save) is preferred: Ray's
    pointer (`resume_from`) is the newest checkpoint Ray had recorded, which lags when a job was killed
    between a save and its report. The pointer serves when the folder has no `latest`."""
    if (root / "latest").is_file():
        folder, tag = str(root), None
    elif resume_from is not None:
        folder, tag = resume_from["root"], resume_from["tag"]
    else:
        return TrialState()
    path, client = engine.load_checkpoint(folder, tag=tag)
    if path is None:
        return TrialState()
    tag_dir = Path(path).parent if Path(path).is_file() else Path(path)  # DeepSpeed returns a file
    ema.load_state_dict(torch.load(tag_dir / EMA_FILE, weights_only=True, map_location="cpu"))
    _set_rng_state(client["rng"][dist.rank] if dist.rank < len(client["rng"]) else client["rng"][0])
    return TrialState(step=client["step"], samples_seen=client["samples_seen"], run_id=client.get("run_id"),
                      resumes=client.get("resumes", 0) + 1)


def newest_checkpoint(trial, checkpoint: str | None = None) -> tuple[Path, int]:
    """(checkpoint folder, its step): `checkpoint` if given, else the trial's newest (DeepSpeed's
    `latest` pointer, else the highest step-* folder with an ema.pt)."""
    if checkpoint:
        path = Path(checkpoint)
        if not (path / EMA_FILE).is_file():
            raise UserError(f"--checkpoint {checkpoint}: no {EMA_FILE} there (give a checkpoints/step-XXXXXXXX folder)")
    else:
        root = checkpoint_root(trial)
        latest = root / "latest"
        path = root / latest.read_text().strip() if latest.is_file() else None
        if path is None or not (path / EMA_FILE).is_file():
            found = sorted(p for p in root.glob("step-*") if (p / EMA_FILE).is_file())
            if not found:
                raise UserError(f"no checkpoint with EMA weights under {root}: train the trial first "
                                "(`ditscale train` / `ditscale sweep`) or pass --checkpoint")
            path = found[-1]
    try:
        step = int(path.name.rsplit("-", 1)[-1])
    except ValueError:
        step = 0
    return path, step
