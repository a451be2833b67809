"""A trial's checkpoints: DeepSpeed's (all ranks) with the EMA and the trial state beside them.

    <trial folder>/checkpoints/step-XXXXXXXX/   DeepSpeed checkpoint + ema.pt (rank 0)
    <trial folder>/checkpoints/latest           DeepSpeed's pointer to the newest complete tag

The client state DeepSpeed stores with each tag carries the trial state (step, images seen, MLflow
run, resumes) and every rank's RNG state, so a resumed trial continues where it stopped.

DeepSpeed unpickles its checkpoint files (weights_only=False): whoever can write into a checkpoint
folder can run code in the trial that resumes from it. The trial folder and checkpoints/ are therefore
created (and kept) mode 0700, whatever the umask. A newest tag that cannot be read (or is corrupt) is
reported in one line and the trial resumes from the newest older one that can. After each complete
save, rank 0 keeps the newest `train.keep_checkpoints` tags (never the one just written, never the one
`latest` names) and removes the others.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as tdist

from harness.errors import UserError
from harness.paths import checkpoint_root
from harness.trial.distributed import DistInfo

EMA_FILE = "ema.pt"
LATEST = "latest"
TAG_PATTERN = re.compile(r"step-(\d+)")
PRUNING_PREFIX = ".pruning-"  # a tag being removed is renamed first: never half a tag under a step-* name


@dataclass
class TrialState:
    """What a trial carries from step to step and across resumes."""

    step: int = 0
    samples_seen: int = 0
    run_id: str | None = None  # the trial's MLflow run
    resumes: int = 0           # how often the trial was resumed (seeds the data stream anew)
    min_loss: float = math.inf  # running minimum of the logged loss (train.divergence_factor), kept across resumes


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


def prepare_checkpoint_root(root: Path) -> Path:
    """Create the trial folder and its checkpoints/ folder, both mode 0700 (chmod, so the umask does not
    matter; a folder that already exists, e.g. made by Ray or an older version, is tightened too)."""
    for folder in (root.parent, root):
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        if folder.stat().st_uid == os.geteuid():
            os.chmod(folder, 0o700)
    return root


def _warn(dist: DistInfo, message: str) -> None:
    if dist.is_main:
        print(f"warning: {message}", file=sys.stderr, flush=True)


def _step_of(name: str) -> int | None:
    match = TAG_PATTERN.fullmatch(name)
    return int(match.group(1)) if match else None


def _latest_tag(root: Path) -> str | None:
    """The tag DeepSpeed's `latest` names, when it is a plain step-* name in `root`."""
    try:
        tag = (root / LATEST).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return tag if _step_of(tag) is not None else None


def prune_checkpoints(root: Path, keep: int, current: str, also_keep: Iterable[int] = ()) -> list[str]:
    """Remove all but the newest `keep` step-* tags of `root`, never `current` (the tag just written),
    the one `latest` names, nor those of the steps `also_keep` (train.save_at: a trunk's branch points);
    tags newer than `current` (left by a run that fell back to an older one) are not touched. Returns
    the tags removed. Call it on rank 0 after a complete save."""
    now = _step_of(current)
    if now is None:
        return []
    tags = sorted(((step, p.name) for p in root.iterdir()
                   if p.is_dir() and (step := _step_of(p.name)) is not None and step <= now), reverse=True)
    protected = {current, _latest_tag(root)} | {name for _, name in tags[:max(1, keep)]}
    branch_points = set(also_keep)
    protected |= {name for step, name in tags if step in branch_points}
    removed = []
    for _, name in tags:
        if name in protected:
            continue
        doomed = root / f"{PRUNING_PREFIX}{name}"
        os.replace(root / name, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        removed.append(name)
    for leftover in root.glob(f"{PRUNING_PREFIX}*"):  # an earlier prune that was interrupted
        shutil.rmtree(leftover, ignore_errors=True)
    return removed


def save_checkpoint(engine, ema, dist: DistInfo, root: Path, state: TrialState, keep: int | None = None,
                    also_keep: Iterable[int] = ()) -> Path:
    """DeepSpeed checkpoint on all ranks; EMA (replicated) written by rank 0 beside it. With `keep`,
    rank 0 then prunes the trial's older tags but those of `also_keep` (prune_checkpoints; DeepSpeed's
    save ends with a barrier, so every rank has finished writing by then)."""
    tag = tag_for(state.step)
    rng = [None] * dist.world_size
    tdist.all_gather_object(rng, _rng_state())
    client = {"step": state.step, "samples_seen": state.samples_seen, "run_id": state.run_id,
              "resumes": state.resumes, "min_loss": state.min_loss, "rng": rng}
    # EMA first, then DeepSpeed: DeepSpeed writes `latest` last, so a crash in between never
    # leaves `latest` pointing at a checkpoint without its EMA.
    path = root / tag
    if dist.is_main:
        path.mkdir(parents=True, exist_ok=True)
        torch.save(ema.state_dict(), path / EMA_FILE)
    engine.save_checkpoint(str(root), tag=tag, client_state=client)
    if keep is not None and dist.is_main:
        try:
            prune_checkpoints(root, keep, tag, also_keep)
        except OSError as err:  # housekeeping: the trial goes on
            _warn(dist, f"could not prune old checkpoints in {root}: {err}")
    return path


def _candidates(root: Path, resume_from: dict | None) -> list[Path]:
    """Tag folders to resume from, newest first: the one `latest` names (else Ray's pointer), then the
    older step-* tags of the trial folder that have their EMA. Empty: nothing was ever completed."""
    if (root / LATEST).is_file():
        first = _latest_tag(root)
        first = root / first if first else None  # an unreadable `latest`: the step-* tags decide
    elif resume_from is not None:
        first = Path(resume_from["root"]) / resume_from["tag"]
    else:
        return []
    below = _step_of(first.name) if first is not None else None
    older = sorted(((step, p) for p in (root.iterdir() if root.is_dir() else [])
                    if p.is_dir() and (step := _step_of(p.name)) is not None and (p / EMA_FILE).is_file()
                    and (below is None or step < below)), key=lambda sp: sp[0], reverse=True)
    return ([first] if first is not None else []) + [p for _, p in older]


def _unreadable(tag_dir: Path) -> str | None:
    """Why the tag cannot be loaded (a file missing, unreadable or not a complete torch archive), or None.
    Cheap: each archive's central directory is read, not its contents."""
    if not tag_dir.is_dir():
        return "missing"
    if not (tag_dir / EMA_FILE).is_file():
        return f"no {EMA_FILE}"
    if not any(tag_dir.glob("*model_states.pt")):
        return "no DeepSpeed model states"
    for path in sorted(tag_dir.iterdir()):
        if not path.is_file():
            continue
        try:
            if path.suffix == ".pt":
                with zipfile.ZipFile(path):
                    pass
            else:
                with open(path, "rb") as f:
                    f.read(1)
        except (OSError, zipfile.BadZipFile, EOFError) as err:
            return f"{path.name}: {getattr(err, 'strerror', None) or err}"
    return None


def _agree(dist: DistInfo, problem: str | None) -> str | None:
    """Every rank's verdict on a tag; the first problem any rank found (all ranks then skip it)."""
    if dist.world_size == 1 or not tdist.is_initialized():
        return problem
    found = [None] * dist.world_size
    tdist.all_gather_object(found, problem)
    return next((f"rank {rank}: {p}" for rank, p in enumerate(found) if p is not None), None)


def _load(engine, ema, dist: DistInfo, tag_dir: Path) -> TrialState:
    path, client = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    if path is None or client is None:
        raise RuntimeError("DeepSpeed found no checkpoint there")
    ema.load_state_dict(torch.load(tag_dir / EMA_FILE, weights_only=True, map_location="cpu"))
    _set_rng_state(client["rng"][dist.rank] if dist.rank < len(client["rng"]) else client["rng"][0])
    return TrialState(step=client["step"], samples_seen=client["samples_seen"], run_id=client.get("run_id"),
                      resumes=client.get("resumes", 0) + 1, min_loss=client.get("min_loss", math.inf))


def resume(engine, ema, dist: DistInfo, root: Path, resume_from: dict | None) -> TrialState:
    """Load the newest checkpoint, if any, into the engine, the EMA and the RNGs; its trial state
    (resumes counted up), else a fresh state.

    The trial folder's `latest` (written by DeepSpeed after a complete save) is preferred: Ray's
    pointer (`resume_from`) is the newest checkpoint Ray had recorded, which lags when a job was killed
    between a save and its report. The pointer serves when the folder has no `latest`. A tag that cannot
    be read or loaded on some rank is reported in one warning line and the next older one is tried;
    when none can be, the trial stops with an error rather than silently starting again."""
    candidates = _candidates(root, resume_from)
    if not candidates:
        return TrialState()
    problems = []
    for tag_dir in candidates:
        problem = _agree(dist, _unreadable(tag_dir))
        if problem is None:
            try:
                state = _load(engine, ema, dist, tag_dir)
            except Exception as err:  # noqa: BLE001 - corrupt files fail in many ways (pickle, zip, shapes)
                first = str(err).strip().splitlines()[0] if str(err).strip() else ""
                state, problem = None, f"{type(err).__name__}: {first}"
            problem = _agree(dist, problem)
        if problem is None:
            return state
        problems.append(f"{tag_dir.name} ({problem})")
        _warn(dist, f"checkpoint {tag_dir} cannot be resumed from ({problem}); "
                    + ("trying the previous one" if tag_dir is not candidates[-1] else "no older checkpoint left"))
    raise UserError(f"no checkpoint of this trial can be resumed from ({'; '.join(problems)}); move {root} "
                    "away to train the trial from the start")


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


BRANCH_MARKER = "branched_from.json"  # beside a branch's tags: {"trunk": trial id, "step": branch point}


def came_from_trunk(root: Path, step: int) -> bool:
    """Whether the state resumed at `step` is the trunk's (harness/launch/branches.py seeds a branch with
    its trunk's checkpoint): then its MLflow run id is the trunk's, not the branch's."""
    marker = root / BRANCH_MARKER
    return marker.is_file() and json.loads(marker.read_text()).get("step") == step
