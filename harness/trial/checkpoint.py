"""A trial's checkpoints: DeepSpeed's (all ranks) with the EMA and the trial state beside them.

    <trial folder>/checkpoints/step-XXXXXXXX/   DeepSpeed checkpoint + ema.pt (rank 0)
    <trial folder>/checkpoints/latest           DeepSpeed's pointer to the newest complete tag
    <trial folder>/checkpoints/.saving-step-X/  a tag being written; renamed to step-X once complete

A save that fails for want of space (torch.save's "enforce fail at inline_container.cc") or permission
is one line naming the checkpoint folder (on every rank, naming the rank that failed: save_checkpoint);
its partial files go with the hidden folder.

The client state DeepSpeed stores with each tag carries the trial state (step, images seen, MLflow
run, resumes) and every rank's RNG state, so a resumed trial continues where it stopped.

DeepSpeed unpickles its checkpoint files (weights_only=False): whoever can write into a checkpoint
folder can run code in the trial that resumes from it. The trial folder and checkpoints/ are therefore
created (and kept) mode 0700, whatever the umask. A newest tag that cannot be read (or is corrupt) is
reported in one line and the trial resumes from the newest older one that can (choose_checkpoint,
which `ditscale eval` uses too). After each complete
save, rank 0 keeps the newest `train.keep_checkpoints` tags (never the one just written, never the one
`latest` names) and removes the others.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as tdist

from harness.common.process_group import DistInfo
from harness.errors import UserError
from harness.files import atomic_write_text, disk_full, not_writable_message, write_refused
from harness.paths import BRANCH_MARKER, checkpoint_root
from harness.tracking import REWINDS_TAG
from harness.trial.checkpoint_files import (
    EMA_FILE,
    LATEST,
    PRUNING_PREFIX,
    SAVING_PREFIX,
    prepare_checkpoint_root,  # noqa: F401 - where the trial's callers find it
    tag_for,
    tag_step,
)
from harness.trial.divergence import SmoothedLoss
from harness.trial.posthoc_ema import load_phema, save_phema

T = TypeVar("T")
# MLflow's limit on a tag's value (mlflow/utils/validation.py MAX_TAG_VAL_LENGTH, 8000 in MLflow 2 and 3):
# about 330 pairs of (step, ms) fit; _rewinds_text drops the oldest beyond it, with a warning.
MAX_REWIND_CHARS = 8000


@dataclass
class TrialState:
    """What a trial carries from step to step and across resumes."""

    step: int = 0
    samples_seen: int = 0
    run_id: str | None = None  # the trial's MLflow run
    resumes: int = 0           # how often the trial was resumed (seeds the data stream anew)
    # The divergence rule's moving average and its minimum (harness/trial/divergence.py), kept across
    # resumes and handed from a WSD trunk to its branches, so they judge as one uninterrupted trial would.
    smoothed_loss: SmoothedLoss = field(default_factory=SmoothedLoss)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _warn(dist: DistInfo, message: str) -> None:
    if dist.is_main:
        print(f"warning: {message}", file=sys.stderr, flush=True)


def _latest_tag(root: Path) -> str | None:
    """The tag DeepSpeed's `latest` names, when it is a plain step-* name in `root`."""
    try:
        tag = (root / LATEST).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return tag if tag_step(tag) is not None else None


def prune_checkpoints(root: Path, keep: int, current: str, also_keep: Iterable[int] = ()) -> list[str]:
    """Remove all but the newest `keep` step-* tags of `root`, never `current` (the tag just written),
    the one `latest` names, nor those of the steps `also_keep` (train.save_at: a trunk's branch points);
    tags newer than `current` (left by a run that fell back to an older one) are not touched. Returns
    the tags removed. Call it on rank 0 after a complete save."""
    now = tag_step(current)
    if now is None:
        return []
    tags = sorted(((step, p.name) for p in root.iterdir()
                   if p.is_dir() and (step := tag_step(p.name)) is not None and step <= now), reverse=True)
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
    for leftover in root.glob(f"{SAVING_PREFIX}*"):  # saves cut short (this trial saves one tag at a time)
        shutil.rmtree(leftover, ignore_errors=True)
    return removed


def save_checkpoint(engine, ema, dist: DistInfo, root: Path, state: TrialState, keep: int | None = None,
                    also_keep: Iterable[int] = (), phema=None) -> Path:
    """DeepSpeed checkpoint on all ranks; EMA (replicated) written by rank 0 beside it. With `keep`,
    rank 0 then prunes the trial's older tags but those of `also_keep` (prune_checkpoints; every rank
    has finished writing by then).

    A write that fails on some ranks only (a full or read-only disk on one node, a bug) ends the save on
    every rank alike, in bounded time: the failing rank's DeepSpeed writes record their error instead of
    raising (_writes_recorded), so it still takes part in every collective of DeepSpeed's save (a rank
    that left DeepSpeed midway would leave the others waiting in its closing barrier, up to the process
    group's timeout, 30 min by default, while it waited for them in another collective); then every
    rank's outcome is gathered before rank 0 publishes the tag, so a tag missing one rank's files is
    never named by `latest`. What each rank then raises: _raise_save_failure (its own error when that
    was not a full disk or refused write; else the first full disk or refused write of any rank as one
    UserError line naming that rank and the folder; else a RuntimeError naming the rank that failed)."""
    tag = tag_for(state.step)
    rng = [None] * dist.world_size
    tdist.all_gather_object(rng, _rng_state())
    client = {"step": state.step, "samples_seen": state.samples_seen, "run_id": state.run_id,
              "resumes": state.resumes, "smoothed_loss": state.smoothed_loss.to_dict(), "rng": rng}
    # Written under a hidden name, renamed to step-* when complete (every rank's files and the EMA,
    # agreed on by every rank), then `latest` is pointed at it: a save cut short by a full disk, a crash
    # or a kill leaves no step-* folder that resume or `ditscale eval` could take.
    path, staging = root / tag, root / f"{SAVING_PREFIX}{tag}"
    error = None
    try:
        if dist.is_main:
            shutil.rmtree(staging, ignore_errors=True)  # an earlier save of this step that was cut short
        with _writes_recorded(engine) as failed:
            engine.save_checkpoint(str(root), tag=staging.name, client_state=client, save_latest=False)
        if failed:
            raise failed[0]
        if dist.is_main:
            torch.save(ema.state_dict(), staging / EMA_FILE)
            save_phema(phema, staging)  # post-hoc EMA profiles (train.posthoc_ema), when tracked
    except Exception as err:  # noqa: BLE001 - every rank's outcome is agreed on below, then raised
        error = err
    mine = _failure(error, root, path)
    failures = _save_outcome(dist, mine)
    if not failures and dist.is_main:
        try:
            _publish(root, staging, tag)
        except Exception as err:  # noqa: BLE001 - as above
            error = err
            mine = _failure(error, root, path)
    if not failures:  # rank 0's rename, agreed: also holds the other ranks until it is done
        failures = _save_outcome(dist, mine)
    if failures:
        if dist.is_main:
            shutil.rmtree(staging, ignore_errors=True)
        _raise_save_failure(failures, mine, error, dist, path)
    if keep is not None and dist.is_main:
        try:
            prune_checkpoints(root, keep, tag, also_keep)
        except OSError as err:  # housekeeping: the trial goes on
            _warn(dist, f"could not prune old checkpoints in {root}: {err}")
    return path


# DeepSpeed's own writes during engine.save_checkpoint (DeepSpeed 0.19): the checkpoint engine's
# makedirs and save (every file), and rank 0's copy of the ZeRO recovery scripts.
# The checkpoint engine's two must be there (_writes_recorded raises otherwise); the recovery-script copy
# is ZeRO's and optional.
_DEEPSPEED_WRITES = (("checkpoint_engine", "makedirs"), ("checkpoint_engine", "save"), (None, "_copy_recovery_script"))


@contextlib.contextmanager
def _writes_recorded(engine):
    """Within the block, a failing DeepSpeed write on this rank is recorded in the yielded list and skipped
    (as are the writes after it) instead of raising, so that this rank goes on through DeepSpeed's save and
    meets the other ranks in its barriers. DeepSpeed's checkpoint engine is its pluggable interface for
    checkpoint I/O (deepspeed/runtime/checkpoint_engine); the methods are wrapped on the instances for the
    one call, then restored."""
    failed: list[Exception] = []

    def recorded(write):
        def call(*args, **kwargs):
            if failed:  # the tag is lost already: write nothing more of it
                return None
            try:
                return write(*args, **kwargs)
            except Exception as err:  # noqa: BLE001 - recorded, raised after DeepSpeed's save
                failed.append(err)
                return None
        return call

    wrapped = []
    for owner_name, method in _DEEPSPEED_WRITES:
        owner = getattr(engine, owner_name, None) if owner_name else engine
        if owner is not None and callable(getattr(owner, method, None)):
            wrapped.append((owner, method, owner.__dict__.get(method)))
            setattr(owner, method, recorded(getattr(owner, method)))
        elif owner_name:  # without them a failing rank would leave DeepSpeed's save midway: the hang again
            raise RuntimeError(f"DeepSpeed {_deepspeed_version()}: its engine has no {owner_name}.{method} to "
                               "record checkpoint writes with (written for DeepSpeed 0.19); adapt "
                               "harness/trial/checkpoint.py _DEEPSPEED_WRITES")
    try:
        yield failed
    finally:
        for owner, method, own in reversed(wrapped):
            if own is None:
                delattr(owner, method)  # the class's method again
            else:
                setattr(owner, method, own)


def _deepspeed_version() -> str:
    try:
        import deepspeed
    except ImportError:
        return "(not installed)"
    return getattr(deepspeed, "__version__", "(version unknown)")


@dataclass
class _SaveFailure:
    why: str    # one line
    user: bool  # a full disk or a refused write (the user's to fix), else an error of ours


def _failure(error: Exception | None, root: Path, path: Path) -> _SaveFailure | None:
    """This rank's failure, classified while the partial files are still there (a full disk is told by
    the free space where torch gives no errno: harness.files.disk_full)."""
    if error is None:
        return None
    problem = _save_problem(error, root, path)
    if problem is not None:
        return _SaveFailure(problem, True)
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return _SaveFailure(f"{type(error).__name__}: {first}", False)


def _save_outcome(dist: DistInfo, mine: _SaveFailure | None) -> list[tuple[int, _SaveFailure]]:
    """Every rank's failure gathered (a collective: every rank calls it): (rank, failure) of each rank
    that failed, by rank; empty when every rank succeeded."""
    found = [mine]
    if dist.world_size > 1 and tdist.is_initialized():
        found = [None] * dist.world_size
        tdist.all_gather_object(found, mine)
    return [(rank, failure) for rank, failure in enumerate(found) if failure is not None]


def _raise_save_failure(failures: list[tuple[int, _SaveFailure]], mine: _SaveFailure | None,
                        error: Exception | None, dist: DistInfo, path: Path) -> None:
    """Every rank raises, one of three things:
    - a rank whose own error was not a full disk or refused write raises that error as is (its traceback);
    - else, when some rank met a full disk or refused write, a UserError with the first such rank's line
      (prefixed "rank N: " when world_size > 1): the same on every rank that raises it, whether it failed
      that way itself or met no error of its own, even when a lower rank failed otherwise;
    - else (every failure was an error of ours, elsewhere) a RuntimeError naming the checkpoint and the
      first rank that failed, with its error's first line."""
    if mine is not None and not mine.user:
        raise error
    rank, failure = next(((r, f) for r, f in failures if f.user), failures[0])
    prefix = f"rank {rank}: " if dist.world_size > 1 else ""
    if failure.user:
        raise UserError(prefix + failure.why)
    raise RuntimeError(f"checkpoint {path} not saved: {prefix}{failure.why}")


def _publish(root: Path, staging: Path, tag: str) -> None:
    """Rename the complete `staging` folder to `tag` and point `latest` at it (atomically; DeepSpeed's
    own save_latest writes the file in place). A folder of that step already there (left by a run that
    fell back from a damaged newer tag) is replaced: moved aside, removed only once `latest` is written.

    When a step fails, what was done is undone by renames (cheap, no space needed) and the error raised:
    the new tag back to `staging` (which the caller removes), the old folder back to `tag`, `latest`
    untouched (atomic_write_text leaves the old file whole). Only if an undoing rename fails too (the
    folder itself gone unwritable) can there be left: the new tag under `tag` that `latest` does not
    name (resume takes `latest`'s tag and older ones only; the next save of that step replaces it), or
    the old folder under the hidden .pruning-<tag> name and none under `tag` (the next complete save's
    pruning removes it)."""
    final = root / tag
    doomed = root / f"{PRUNING_PREFIX}{tag}"
    replacing = final.exists()
    if replacing:
        shutil.rmtree(doomed, ignore_errors=True)
        os.replace(final, doomed)
    try:
        os.replace(staging, final)
    except OSError:
        if replacing:
            os.replace(doomed, final)
        raise
    try:
        atomic_write_text(root / LATEST, tag)
    except Exception:
        os.replace(final, staging)
        if replacing:
            os.replace(doomed, final)
        raise
    if replacing:
        shutil.rmtree(doomed, ignore_errors=True)


def _save_problem(err: Exception, root: Path, path: Path) -> str | None:
    """The one line for a save that failed for want of space or permission (None: another error, a bug).
    A full disk reaches us from torch.save as "enforce fail at inline_container.cc" without an errno."""
    if disk_full(err, root):
        free = shutil.disk_usage(root).free if root.is_dir() else 0
        return (f"checkpoint {path}: no space left on its disk ({free / 2**20:.1f} MiB free); free some space or "
                "point resources.storage elsewhere, and the trial resumes from its last complete checkpoint")
    if write_refused(err):
        return not_writable_message(root, "resources.storage", err.strerror or str(err))
    return None


def _candidates(root: Path, resume_from: dict | None, without_pointer: bool = False) -> list[Path]:
    """Tag folders to resume from, newest first: the one `latest` names (else Ray's pointer), then the
    older step-* tags of the trial folder that have their EMA. Empty: nothing was ever completed
    (`without_pointer`: when neither pointer exists, every step-* tag with an EMA, for evaluation)."""
    if (root / LATEST).is_file():
        first = _latest_tag(root)
        first = root / first if first else None  # an unreadable `latest`: the step-* tags decide
    elif resume_from is not None:
        first = Path(resume_from["root"]) / resume_from["tag"]
    elif without_pointer:
        first = None
    else:
        return []
    below = tag_step(first.name) if first is not None else None
    older = sorted(((step, p) for p in (root.iterdir() if root.is_dir() else [])
                    if p.is_dir() and (step := tag_step(p.name)) is not None and (p / EMA_FILE).is_file()
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


def _load(engine, ema, dist: DistInfo, tag_dir: Path, phema=None) -> TrialState:
    path, client = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    if path is None or client is None:
        raise RuntimeError("DeepSpeed found no checkpoint there")
    ema.load_state_dict(torch.load(tag_dir / EMA_FILE, weights_only=True, map_location="cpu"))
    load_phema(phema, tag_dir)
    _set_rng_state(client["rng"][dist.rank] if dist.rank < len(client["rng"]) else client["rng"][0])
    return TrialState(step=client["step"], samples_seen=client["samples_seen"], run_id=client.get("run_id"),
                      resumes=client.get("resumes", 0) + 1,
                      # An older checkpoint's "min_loss" (the minimum of single windows, biased low) is not
                      # used: the average starts again from the resumed step.
                      smoothed_loss=SmoothedLoss.from_dict(client.get("smoothed_loss")))


def resume(engine, ema, dist: DistInfo, root: Path, resume_from: dict | None, phema=None) -> TrialState:
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
    _, state = choose_checkpoint(candidates, dist, lambda tag_dir: _load(engine, ema, dist, tag_dir, phema),
                                 purpose="resumed from", hint=f"move {root} away to train the trial from the start")
    return state


def choose_checkpoint(candidates: list[Path], dist: DistInfo, load: Callable[[Path], T], *, purpose: str, hint: str,
                      check: Callable[[Path], str | None] = _unreadable, named: str | None = None) -> tuple[Path, T]:
    """The first of `candidates` (newest first) that every rank can read (`check`) and `load`, with what
    `load` returned: the one choice that resume and `ditscale eval` share. Those passed over are named
    in one warning line each once a good one is found (a damaged newest tag: a truncated copy, a full
    disk, a hand edit); when none is good, one UserError names them all, with `hint` (`named`: the
    flag that named the one candidate, which the error then names instead)."""
    problems = []
    for tag_dir in candidates:
        problem = _agree(dist, check(tag_dir))
        if problem is None:
            try:
                loaded = load(tag_dir)
            except Exception as err:  # noqa: BLE001 - corrupt files fail in many ways (pickle, zip, shapes)
                first = str(err).strip().splitlines()[0] if str(err).strip() else ""
                problem = f"{type(err).__name__}: {first}"
            problem = _agree(dist, problem)
        if problem is None:
            for skipped, why in problems:
                _warn(dist, f"checkpoint {skipped} cannot be {purpose} ({why}); using {tag_dir.name}, the newest "
                            "older one that can")
            return tag_dir, loaded
        problems.append((tag_dir, problem))
    if named:
        raise UserError(f"{named}: cannot be {purpose} ({'; '.join(why for _, why in problems)}); {hint}")
    listed = "; ".join(f"{tag_dir.name} ({why})" for tag_dir, why in problems)
    raise UserError(f"no checkpoint of this trial can be {purpose} ({listed}); {hint}")


def ema_unreadable(tag_dir: Path) -> str | None:
    """Why the tag's EMA weights cannot be read (all `ditscale eval` needs), or None; cheap, as _unreadable."""
    if not tag_dir.is_dir():
        return "missing"
    try:
        with zipfile.ZipFile(tag_dir / EMA_FILE):
            return None
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        return f"{EMA_FILE}: {getattr(err, 'strerror', None) or err}"


def eval_candidates(trial, checkpoint: str | None = None) -> list[Path]:
    """The checkpoint folders `ditscale eval` may use, newest first: `checkpoint` alone if given, else
    the trial's as resume orders them (the tag `latest` names, then the older step-* tags with an EMA),
    or every step-* tag with an EMA when there is no `latest` (weights saved by hand, a copied tag).
    choose_checkpoint then takes the first good one."""
    if checkpoint:
        path = Path(checkpoint)
        if not (path / EMA_FILE).is_file():
            raise UserError(f"--checkpoint {checkpoint}: no {EMA_FILE} there (give a checkpoints/step-XXXXXXXX folder)")
        return [path]
    root = checkpoint_root(trial)
    found = _candidates(root, None, without_pointer=True)
    if not found:
        raise UserError(f"no checkpoint with EMA weights under {root}: train the trial first "
                        "(`ditscale train` / `ditscale sweep`) or pass --checkpoint")
    return found


def step_of_checkpoint(path: Path) -> int:
    """The step a checkpoint folder is named after (step-XXXXXXXX; 0 when its name has none)."""
    try:
        return int(path.name.rsplit("-", 1)[-1])
    except ValueError:
        return 0




def came_from_trunk(root: Path, step: int) -> bool:
    """Whether the state resumed at `step` is the trunk's (harness/launch/branches.py seeds a branch with
    its trunk's checkpoint): then its MLflow run id is the trunk's, not the branch's."""
    marker = root / BRANCH_MARKER
    return marker.is_file() and json.loads(marker.read_text()).get("step") == step


def record_rewind(client, run_id: str, step: int, now_ms: int | None = None) -> bool:
    """Before a trial that resumed at `step` logs anything, mark in its MLflow run (REWINDS_TAG) that the
    points it logged earlier at steps after `step` are superseded by what it logs from now on. True when
    the pair was added: whenever the run already holds a metric of its own (not a system/ metric), else
    False (a new run: nothing to supersede).

    The pair is added without asking whether the run logged beyond `step`: MLflow keeps no per-run
    highest step across metrics (the `step` metric is only Trainer.log's, and eval.every is not tied to
    train.log_every, so a val_loss can lie beyond the last `step` point), and the cut is always safe:
    every non-system point logged before now at a step above `step` belongs to the abandoned pass.

    Why a mark and not a cleaned run: MLflow cannot delete a metric's points, and a WSD trunk rewound
    because a branch point's checkpoint was deleted (harness/launch/branches.py: rewind_trunk), or any trial
    resumed from a checkpoint older than its last log, logs those steps a second time into the same run.
    A new run per rewind would split one trial's history (and the run id that its checkpoints, its
    branches' `branch_of` and the sweeps' parent tags name) or copy it point by point. With the mark,
    analysis/runs.py load_histories keeps, for each pair (S, T), only the points at steps <= S or logged
    at T or later: the latest pass, one value per step (best_*, final_*, loss_tail and the curves read
    that). `T` is rank 0's clock, which stamps the points it logs next; the superseded points were logged
    before this process started (a restart apart). Pairs that a later one covers are dropped
    (_compact_rewinds)."""
    run = client.get_run(run_id)
    if not any(not key.startswith("system/") for key in run.data.metrics):
        return False
    try:
        pairs = [[int(s), int(t)] for s, t in json.loads(run.data.tags.get(REWINDS_TAG, "[]"))]
    except (ValueError, TypeError):  # a hand-edited tag: start it again rather than fail the trial
        pairs = []
    pairs.append([int(step), int(now_ms if now_ms is not None else time.time() * 1000)])
    client.set_tag(run_id, REWINDS_TAG, _rewinds_text(_compact_rewinds(pairs), run_id))
    return True


def _compact_rewinds(pairs: list[list[int]]) -> list[list[int]]:
    """`pairs` (oldest first) without those a later pair covers: a later (S2, T2) with S2 <= S1 cuts every
    point that (S1, T1) cuts (steps above S1 >= S2, logged before T1 <= T2), so dropping (S1, T1) loses
    nothing."""
    kept: list[list[int]] = []
    for step, at in pairs:
        kept = [p for p in kept if p[0] < step]
        kept.append([step, at])
    return kept


def _rewinds_text(pairs: list[list[int]], run_id: str) -> str:
    """The tag's JSON, every pair while it fits MLflow's tag values (MAX_REWIND_CHARS); beyond that the
    oldest pairs go, with a warning: the points they cut would be read again."""
    text = json.dumps(pairs, separators=(",", ":"))
    dropped = 0
    while len(text) > MAX_REWIND_CHARS and len(pairs) > 1:
        pairs, dropped = pairs[1:], dropped + 1
        text = json.dumps(pairs, separators=(",", ":"))
    if dropped:
        print(f"warning: MLflow run {run_id}: tag {REWINDS_TAG} holds {len(pairs)} rewinds, its most; the "
              f"{dropped} oldest were dropped and the points they superseded are read again by the analysis",
              file=sys.stderr, flush=True)
    return text
