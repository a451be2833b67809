"""Post-hoc EMA in a trial folder: the snapshots a training run writes and the reconstruction that reads them.

EDM2 (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", arXiv
2312.02696; NVlabs/edm2 training/phema.py): power-function EMA profiles (models/phema.py) are tracked
during training and saved every `train.posthoc_ema.snapshot_every` optimizer steps; the EMA of any other
width sigma_rel at any snapshot step is then a least-squares combination of the snapshots.

    <trial folder>/phema/profiles.json          {"sigma_rels", "snapshot_every", "steps", "dtype"}: what to expect
    <trial folder>/phema/<sigma_rel>-<step>.pt  one profile's EMA at one step (sigma_rel as `{:g}`, step 8 digits)
    <trial folder>/checkpoints/<tag>/phema.pt   the tracked state (every profile, its step), for resume

Snapshots are fp32 (the shadows' precision: exact, at 4 bytes per parameter per snapshot; bf16 would halve
the disk and add ~3 significant digits of rounding to every snapshot, which the reconstruction's weights,
some negative, would amplify). Each file is written under a hidden temporary name and renamed, never
pruned, and a snapshot a resumed trial passes again is rewritten with the resumed run's weights (the
state it continues from is the checkpoint's). A WSD branch (harness/launch/branches.py) starts from its
trunk's checkpoint, phema.pt included, so it continues the trunk's profiles; its snapshots up to the
branch point are the trunk's, which the reconstruction reads from the trunk's folder
(checkpoints/branched_from.json names it).

At the end of a trial, `eval.ema_sigma_rels` chooses the EMA that is evaluated (`choose_sigma_rel`): each
width is rebuilt from the snapshots and scored by the validation loss alone (cheap, the same fixed samples
for every width), and the full evaluation (FID/FD, ...) runs only for the best. EDM2 (Sec. 3.2, Fig. 5)
chooses by FID; the validation loss stands in for it here because it costs a few forwards per width.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as tdist

from harness.common.process_group import broadcast_object
from harness.errors import UserError
from harness.files import atomic_write, atomic_write_text, disk_full, not_writable_message, write_refused
from harness.paths import BRANCH_MARKER
from models.ema import EMA, update_together
from models.phema import MAX_SIGMA_REL, PowerFunctionEMA, check_sigma_rel, sigma_rel_to_gamma, solve_weights_and_error

PHEMA_DIR = "phema"
MANIFEST = "profiles.json"
STATE_FILE = "phema.pt"  # in a checkpoint tag, beside ema.pt
FORMAT = 1
_STEP = re.compile(r"-(\d{8,})\.pt")


def snapshot_name(sigma_rel: float, step: int) -> str:
    return f"{sigma_rel:g}-{step:08d}.pt"


def snapshot_folder(trial_dir: Path) -> Path:
    return Path(trial_dir) / PHEMA_DIR


# -- writing (training) --------------------------------------------------------------------------------

class PosthocEMA:
    """Post-hoc EMA in a training run: the profiles updated after every optimizer step (every rank: under
    ZeRO-3 the update gathers the weights), and rank 0 writing the manifest once and every profile's
    snapshot at each snapshot step (every `snapshot_every` steps and the last step)."""

    def __init__(self, trial, trial_dir: Path, model, is_main: bool, gather=None):
        cfg = trial.train.posthoc_ema
        self.ema, self.is_main = PowerFunctionEMA(model, cfg.sigma_rels, gather=gather), is_main
        self.every, self.steps = cfg.snapshot_every, trial.train.steps
        self.folder = snapshot_folder(trial_dir)
        if is_main:
            self._guarded(self.folder, self._start)

    def _start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        manifest = {"format": FORMAT, "sigma_rels": list(self.ema.sigma_rels), "snapshot_every": self.every,
                    "steps": self.steps, "dtype": "float32"}
        atomic_write_text(self.folder / MANIFEST, json.dumps(manifest, indent=1) + "\n")

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.steps

    def update(self, model, step: int, running: EMA | None = None) -> list[Path]:
        """After optimizer step `step` (every rank): update the profiles (and the trial's running EMA,
        `running`, from the same read of the weights: one ZeRO-3 gather per step, not two), then write the
        snapshots if it is a snapshot step (rank 0). Returns the files written."""
        update_together(model, *([running] if running is not None else []), self.ema)
        if self.ema.num_updates != step:  # the profiles' t must be the trial's step, or every beta is wrong
            raise RuntimeError(f"post-hoc EMA at update {self.ema.num_updates}, the trial at step {step}")
        if not self.is_main or not self.due(step):
            return []
        written = []
        for sigma_rel in self.ema.sigma_rels:
            path = self.folder / snapshot_name(sigma_rel, step)
            self._guarded(path, lambda p=path, s=sigma_rel: self._save(p, self.ema.snapshot(s, model)))
            written.append(path)
        return written

    @staticmethod
    def _save(path: Path, snapshot: dict) -> None:
        with atomic_write(path) as out:
            torch.save(snapshot, out)

    def _guarded(self, path: Path, write) -> None:
        """A full disk or a refused write: one line naming the file and the field that put it there."""
        try:
            write()
        except (OSError, RuntimeError) as err:
            if disk_full(err, self.folder):
                raise UserError(f"post-hoc EMA snapshot {path}: no space left on its disk; free some space or point "
                                "resources.storage elsewhere (train.posthoc_ema writes one per profile every "
                                "snapshot_every steps), and the trial resumes from its last checkpoint") from None
            if write_refused(err):
                raise UserError(not_writable_message(self.folder, "resources.storage", err.strerror or str(err)))
            raise


def save_phema(ema: PowerFunctionEMA | None, tag_dir: Path) -> None:
    """The tracked state into a checkpoint tag being written (rank 0)."""
    if ema is not None:
        torch.save(ema.state_dict(), Path(tag_dir) / STATE_FILE)


def load_phema(ema: PowerFunctionEMA | None, tag_dir: Path) -> None:
    """The tracked state from a checkpoint tag; a tag without it cannot continue the profiles (the
    caller then tries an older one, as for any unreadable tag)."""
    if ema is None:
        return
    path = Path(tag_dir) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {STATE_FILE} (the post-hoc EMA state train.posthoc_ema needs)")
    ema.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))


# -- reading (reconstruction) ----------------------------------------------------------------------------

@dataclass
class Snapshot:
    step: int
    sigma_rel: float
    path: Path
    weight: float = 0.0


@dataclass
class Plan:
    """What a reconstruction combines: the target and the snapshots with their weights."""

    sigma_rel: float
    step: int
    snapshots: list[Snapshot]
    fit_error: float                 # relative L2 distance of the combined profile from the target's
    manifest: dict = field(default_factory=dict)

    def as_json(self) -> dict:
        return {"sigma_rel": self.sigma_rel, "gamma": sigma_rel_to_gamma(self.sigma_rel), "step": self.step,
                "profile_fit_error": self.fit_error,
                "snapshots": [{"file": str(s.path), "step": s.step, "sigma_rel": s.sigma_rel, "weight": s.weight}
                              for s in self.snapshots]}


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not folder.is_dir():
        raise UserError(f"{folder}: no post-hoc EMA snapshots there (train the trial with train.posthoc_ema)")
    try:
        manifest = json.loads(path.read_text())
        manifest["sigma_rels"] = [float(s) for s in manifest["sigma_rels"]]
        manifest["snapshot_every"], manifest["steps"] = int(manifest["snapshot_every"]), int(manifest["steps"])
    except FileNotFoundError:
        raise UserError(f"{path}: missing (it lists the tracked profiles)") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path}: unreadable ({type(err).__name__}: {err})") from None
    return manifest


def _found_steps(folder: Path, sigma_rel: float) -> set[int]:
    prefix = f"{sigma_rel:g}"
    return {int(m.group(1)) for p in folder.glob(f"{prefix}-*.pt")
            if p.name.startswith(prefix + "-") and (m := _STEP.fullmatch(p.name[len(prefix):]))}


def _trunk(trial_dir: Path) -> tuple[Path, int] | None:
    """(the trunk's snapshot folder, the branch point) of a WSD branch, else None."""
    marker = trial_dir / "checkpoints" / BRANCH_MARKER
    if not marker.is_file():
        return None
    try:
        info = json.loads(marker.read_text())
        return snapshot_folder(trial_dir.parent / str(info["trunk"])), int(info["step"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{marker}: unreadable ({type(err).__name__}: {err})") from None


def plan_reconstruction(trial_dir: str | os.PathLike, sigma_rel: float, step: int | None = None,
                        step_from: str = "--step") -> Plan:
    """The snapshots and weights that rebuild the EMA of width `sigma_rel` at `step` (default: the last
    snapshot step) in a trial folder: every snapshot of every tracked profile up to `step`. Raises
    UserError (one line, naming the flag or file) for a sigma_rel outside (0, 0.3], a step beyond the
    last snapshot, or a snapshot that should be there and is not. `step_from` names where the step came
    from in those lines (the flag; `ditscale eval` says --checkpoint)."""
    trial_dir = Path(trial_dir)
    try:
        sigma_rel = check_sigma_rel(sigma_rel, "--sigma-rel")
    except ValueError as err:
        raise UserError(str(err)) from None
    folder = snapshot_folder(trial_dir)
    manifest = read_manifest(folder)
    trunk = _trunk(trial_dir)
    # (folder, first step, last step) of the snapshots each folder holds: a branch's own after its
    # branch point, its trunk's up to it.
    sources = [(folder, trunk[1] + 1, None), (trunk[0], 1, trunk[1])] if trunk else [(folder, 1, None)]
    found: dict[tuple[float, int], Path] = {}
    for src, first, last in sources:
        for s in manifest["sigma_rels"]:
            for n in _found_steps(src, s) if src.is_dir() else ():
                if n >= first and (last is None or n <= last):
                    found[(s, n)] = src / snapshot_name(s, n)
    if not found:
        raise UserError(f"{folder}: no snapshot files there (train.posthoc_ema writes them every snapshot_every steps)")
    # The newest step every profile reached (a run killed between two profiles' files has one of them).
    last = min(max((n for s2, n in found if s2 == s), default=0) for s in manifest["sigma_rels"])
    if last < 1:
        lacking = next(s for s in manifest["sigma_rels"] if all(s2 != s for s2, _ in found))
        first = folder / snapshot_name(lacking, manifest["snapshot_every"])
        raise UserError(f"{first}: snapshot missing (no snapshot of sigma_rel {lacking:g} in {folder})")
    if step is None:
        step = last
    if step < 1 or step > last:
        raise UserError(f"{step_from}: {step} is beyond the last snapshot (step {last})" if step > last
                        else f"{step_from}: {step} must be >= 1")
    every = manifest["snapshot_every"]
    if step % every and step != manifest["steps"] and all(n != step for _, n in found):
        # Between snapshots the profile's newest part (after the previous one) is in no snapshot: the fit is poor.
        raise UserError(f"{step_from}: {step} is not a snapshot step (every {every} steps and the last, "
                        f"{manifest['steps']}); the nearest earlier one is {step - step % every}")
    expected = set(range(every, step + 1, every)) | ({manifest["steps"]} if manifest["steps"] <= step else set())
    snapshots = []
    for s in manifest["sigma_rels"]:
        for n in sorted(expected | {n for s2, n in found if s2 == s and n <= step}):
            path = found.get((s, n))
            if path is None:
                where = trunk[0] if trunk and n <= trunk[1] else folder
                raise UserError(f"{where / snapshot_name(s, n)}: snapshot missing (needed to reconstruct step {step})")
            snapshots.append(Snapshot(n, s, path))
    weights, fit_error = solve_weights_and_error([(x.step, x.sigma_rel) for x in snapshots], (step, sigma_rel))
    for snap, w in zip(snapshots, weights):
        snap.weight = w
    return Plan(sigma_rel, step, snapshots, fit_error, manifest)


def _load_snapshot(snap: Snapshot) -> dict:
    try:
        data = torch.load(snap.path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncated/corrupt archives fail in several ways
        first = (str(err).strip().splitlines() or [""])[0]
        raise UserError(f"{snap.path}: unreadable snapshot ({type(err).__name__}: {first})") from None
    if not isinstance(data, dict) or "shadow" not in data:
        raise UserError(f"{snap.path}: not a post-hoc EMA snapshot")
    if int(data.get("step", -1)) != snap.step or f"{float(data.get('sigma_rel', -1)):g}" != f"{snap.sigma_rel:g}":
        raise UserError(f"{snap.path}: holds sigma_rel {data.get('sigma_rel')} at step {data.get('step')}, "
                        "not what its name says")
    return data


def reconstruct(plan: Plan) -> dict[str, torch.Tensor]:
    """The weighted sum of the plan's snapshots: a state dict in the model's own layout (every parameter,
    fp32, plus the persistent buffers of the newest snapshot used), for model.load_state_dict(strict=True).
    Summed in float64: the weights include negative ones, whose fp32 cancellation would cost digits."""
    total: dict[str, torch.Tensor] = {}
    buffers, reference = {}, None
    for snap in sorted(plan.snapshots, key=lambda x: x.step):
        data = _load_snapshot(snap)
        shadow = data["shadow"]
        if reference is None:
            reference = {k: v.shape for k, v in shadow.items()}
            total = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in shadow.items()}
        elif {k: v.shape for k, v in shadow.items()} != reference:
            raise UserError(f"{snap.path}: its parameters differ from those of {plan.snapshots[0].path}")
        for name, value in shadow.items():
            total[name].add_(value, alpha=snap.weight)  # promoted to float64 in place
        buffers = data.get("buffers") or {}
    out = {name: value.to(torch.float32) for name, value in total.items()}
    out.update(buffers)
    return out


def reconstruct_to_file(trial_dir, sigma_rel: float, out: Path, step: int | None = None) -> tuple[Plan, float]:
    """Plan, reconstruct and save (atomically) to `out`; returns the plan and the seconds it took."""
    started = time.perf_counter()
    plan = plan_reconstruction(trial_dir, sigma_rel, step)
    state = reconstruct(plan)
    with atomic_write(out) as f:
        torch.save(state, f)
    return plan, time.perf_counter() - started


# -- choosing the EMA at the end of a trial (eval.ema_sigma_rels) ---------------------------------------

BEST_PARAM = "eval.ema_sigma_rel_best"  # an MLflow param: the width the final evaluation used
FINAL_EMA_TAG = "ditscale.final_ema"      # a run tag saying so in words


def val_loss_metric(sigma_rel: float) -> str:
    """The metric of one width's validation loss, e.g. val_loss_ema0.05 (characters MLflow accepts)."""
    return f"val_loss_ema{sigma_rel:g}"


@dataclass
class EMAChoice:
    """What choose_sigma_rel found: every width's validation loss (the same on every rank) and the best
    width's weights in `weights` (an EMA holder with identical weights on every rank, for swapped_into)."""

    best: float
    val_losses: dict[float, float]
    weights: EMA
    step: int
    snapshots: int
    seconds: float

    def metrics(self) -> dict[str, float]:
        return {**{val_loss_metric(s): v for s, v in self.val_losses.items()}, "posthoc_ema_seconds": self.seconds}

    def tag(self) -> str:
        return (f"post-hoc EMA sigma_rel={self.best:g} (best validation loss of eval.ema_sigma_rels "
                f"{self._listed()}), reconstructed at step {self.step} from {self.snapshots} snapshots")

    def _listed(self) -> list[float]:
        return [float(f"{s:g}") for s in self.val_losses]

    def edge_warning(self) -> str | None:
        """One line when the best width is the smallest or the largest of several listed (with a finite
        loss): the loss still fell at that edge, so the best width may lie outside the list, and the
        evaluation used a width that is not the optimum. None otherwise (and at 0.3: no profile is wider)."""
        listed = list(self.val_losses)
        if len(listed) < 2 or not math.isfinite(self.val_losses[self.best]):
            return None
        if self.best == min(listed):
            side, beyond = "smallest", "below it"
        elif self.best == max(listed) and self.best < MAX_SIGMA_REL:
            side, beyond = "largest", f"above it (up to {MAX_SIGMA_REL:g})"
        else:
            return None
        return (f"warning: eval.ema_sigma_rels: the best sigma_rel, {self.best:g}, is the {side} listed "
                f"({self._listed()}), so the best width may lie {beyond}; extend eval.ema_sigma_rels past it")


def choose_sigma_rel(trial_dir, sigma_rels, step: int, module, validate, dist, gather=None,
                     step_from: str = "--step") -> EMAChoice:
    """Collective (every rank calls it). For each width: rank 0 rebuilds its EMA from the trial folder's
    snapshots at `step`, every rank receives the weights (a broadcast; the snapshots need not be on every
    node's disk), and `validate(module)` (the evaluator's validation loss, a collective) scores them in
    `module`; the module's own weights are restored afterwards. The lowest loss wins (a non-finite loss
    never does; a tie goes to the first listed). Rank 0 keeps the best width's weights, so every rank
    ends with the same, whatever their losses' last digits. The caller puts the module in eval mode.
    `step_from` names the step's origin in a reconstruction error (plan_reconstruction)."""
    started = time.perf_counter()
    holder = EMA(module, decay=1.0, gather=gather)  # a full fp32 copy of the weights, refilled per width
    losses: dict[float, float] = {}
    best, best_state, snapshots = None, None, 0
    for sigma_rel in sigma_rels:
        state, snapshots = _reconstructed(trial_dir, sigma_rel, step, dist.is_main, step_from)
        _share(holder, state, dist)
        with holder.swapped_into(module):
            losses[float(sigma_rel)] = float(validate(module))
        if dist.is_main and (best is None or _score(losses[float(sigma_rel)]) < _score(losses[best])):
            best, best_state = float(sigma_rel), state
        del state
    best = broadcast_object(best)
    _share(holder, best_state, dist)
    return EMAChoice(best, losses, holder, step, broadcast_object(snapshots), time.perf_counter() - started)


def _score(loss: float) -> float:
    return loss if math.isfinite(loss) else math.inf


def _reconstructed(trial_dir, sigma_rel: float, step: int, is_main: bool,
                   step_from: str = "--step") -> tuple[dict | None, int]:
    """(rank 0: the rebuilt state dict, else None; the snapshots used). A failure on rank 0 (a missing
    snapshot: one line naming the file) is raised on every rank, so none waits in a collective for it."""
    state, snapshots, error = None, 0, None
    if is_main:
        try:
            plan = plan_reconstruction(trial_dir, sigma_rel, step, step_from)
            state, snapshots = reconstruct(plan), len(plan.snapshots)
        except UserError as err:
            error = str(err)
    error = broadcast_object(error)
    if error is not None:
        if is_main:
            raise UserError(f"eval.ema_sigma_rels: {error}")
        raise RuntimeError(f"post-hoc EMA reconstruction failed on rank 0: {error}")
    return state, snapshots


@torch.no_grad()
def _share(holder: EMA, state: dict | None, dist) -> None:
    """Rank 0's rebuilt parameters (its `state`; None elsewhere) into every rank's holder. The snapshot's
    buffers are not used: as for the trial's EMA (models/ema.py), the model's own buffers stay."""
    if state is not None:
        holder.load_state_dict({"shadow": {k: v for k, v in state.items() if k in holder.shadow}})
    if dist.world_size > 1 and tdist.is_initialized():
        for name in sorted(holder.shadow):  # the same order on every rank
            tdist.broadcast(holder.shadow[name], src=0)


ChooseEMA = Callable[[torch.nn.Module, int], EMAChoice]


def ema_chooser(trial, built, dist, folder: Path, gather=None, step_from: str = "--step") -> ChooseEMA:
    """eval.ema_sigma_rels, as the end of a trial (harness/trial/loop.py) and `ditscale eval`
    (harness/trial/evaluate_checkpoint.py) both use it: (module, step) -> the EMAChoice of choose_sigma_rel
    over the snapshots in `folder` (the trial folder that trained them), scoring each width with a second
    evaluator that computes the validation loss only (eval.fid_samples 0: no sampling), on the same fixed
    samples as the trial's evaluator. `built` is harness/trial/build.build_trial's result."""
    from harness.evaluation.evaluator import Evaluator  # not needed by `ditscale ema reconstruct`

    val_only = trial.model_copy(update={"eval": trial.eval.model_copy(update={"fid_samples": 0})})
    evaluator = Evaluator(val_only, built.info, built.conditioner, built.objective, dist)

    def choose(module: torch.nn.Module, step: int) -> EMAChoice:
        def validate(m: torch.nn.Module) -> float:
            return evaluator.run(m, step)[0].get("val_loss", math.nan)

        return choose_sigma_rel(folder, trial.eval.ema_sigma_rels, step, module, validate, dist, gather, step_from)

    return choose


def log_ema_choice(logger, choice: EMAChoice, say: Callable[[str], None]) -> None:
    """Rank 0, after the evaluation that used the choice: into the run (`logger`, a harness.tracking.RunLogger;
    None: nothing logged) the param eval.ema_sigma_rel_best and a tag saying the evaluation used it; and
    through `say` one line with every width's loss, plus the edge warning when there is one."""
    best = f"{choice.best:g}"
    if logger is not None:
        logged = logger.client.get_run(logger.run_id).data.params.get(BEST_PARAM)
        if logged is None:
            logger.client.log_param(logger.run_id, BEST_PARAM, best)
        elif logged != best:  # re-evaluated (a resume, `ditscale eval`) and the choice flipped: params are immutable
            say(f"{BEST_PARAM} stays {logged} (logged before); this evaluation used {best}")
        logger.set_tag(FINAL_EMA_TAG, choice.tag())
    losses = " ".join(f"{s:g}: {v:.5g}" for s, v in choice.val_losses.items())
    say(f"post-hoc EMA val_loss by sigma_rel {losses}; evaluated sigma_rel {best} ({choice.seconds:.1f} s to choose)")
    warning = choice.edge_warning()
    if warning is not None:
        say(warning)


def choose_at_checkpoint(trial, evaluated, built, dist, module, step: int) -> EMAChoice | None:
    """`ditscale eval` (harness/trial/evaluate_checkpoint.py) of a trial whose evaluation lists
    eval.ema_sigma_rels (`evaluated`: the trial with the command's eval.* overrides): as at the end of the
    trial, each width is rebuilt at the checkpoint's step from the snapshots in the trial's own folder
    (`trial`'s: overrides change the trial id, not where it trained) and scored by its validation loss;
    `module` is left carrying the best width's weights for the full evaluation. None without the field."""
    if not evaluated.eval.ema_sigma_rels:
        return None
    from harness.paths import trial_dir

    choice = ema_chooser(evaluated, built, dist, trial_dir(trial), step_from="--checkpoint")(module, step)
    choice.weights.copy_to(module)
    return choice


def log_checkpoint_choice(trial, run_id: str | None, choice: EMAChoice | None) -> None:
    """Rank 0 of `ditscale eval`, after log_ema_choice's pattern: into the trial's run (`run_id`; None with
    --no-log) and on stderr, so that --json's stdout stays JSON."""
    if choice is None:
        return
    from harness.tracking import RunLogger, resolve_tracking_uri

    logger = RunLogger(resolve_tracking_uri(trial.tracking.uri), run_id) if run_id else None
    log_ema_choice(logger, choice, lambda line: print(line, file=sys.stderr, flush=True))
