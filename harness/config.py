"""The study file: reading it, `--set` overrides, grid expansion and validation (the schema of its
sections is harness/schema.py; `harness.study.load_trials` adds the budgets' step counts).

A study is one YAML file (see experiments/). Everything outside `grid:` is a base value; `grid:`
maps dotted keys to lists and every combination is a trial (minus the `exclude:` entries); `points:`
lists explicit trials (mappings of dotted keys), each combined with every grid combination.
Every problem is reported before anything starts, one line each, with the dotted path of the field
to change: schema errors through pydantic, cross-field rules (patch divides the image, batch
divides across workers, shards exist, ...) per trial.
"""

from __future__ import annotations

import copy
import itertools
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from harness.checks import check_trial
from harness.errors import UserError
from harness.one_law import one_law_problems
from harness.schema import (  # noqa: F401  (the schema's names, where the study's readers have always found them)
    DEFAULT_BUDGET_DIVERGENCE,
    STUDY_ONLY,
    BracketConfig,
    DataConfig,
    EvalConfig,
    LadderConfig,
    ModelConfig,
    ObjectiveConfig,
    PosthocEMAConfig,
    ResourcesConfig,
    Study,
    TrackingConfig,
    TrainConfig,
    TrialConfig,
    flatten,
)


class StudyError(UserError):
    """One or more problems in a study file; str() is one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = list(dict.fromkeys(problems))  # unique, in order
        super().__init__("\n".join(self.problems))


# --- dotted keys ---------------------------------------------------------------------------


def set_dotted(d: dict, dotted: str, value: Any) -> None:
    """d["a"]["b"] = value for "a.b", creating sections as needed."""
    *parents, leaf = dotted.split(".")
    node = d
    for part in parents:
        if not isinstance(node.get(part, {}), dict):
            raise StudyError([f"{dotted}: {part} is a value, not a section"])
        node = node.setdefault(part, {})
    if isinstance(value, dict) and isinstance(node.get(leaf), dict):
        # A mapping on a section (e.g. a grid axis `model: [{family: dit, size: B}, ...]`) sets
        # several fields of it at once and keeps the others.
        for key, sub in value.items():
            set_dotted(node[leaf], key, sub)
        return
    node[leaf] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'train.lr=3e-4' -> ("train.lr", 0.0003); values are parsed as YAML (numbers, lists, null)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise StudyError([f"--set {text!r}: expected dotted.key=value"])
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        parsed = value
    # YAML 1.1 reads "1e-4" as a string; a user writing a number means a number.
    if isinstance(parsed, str):
        try:
            parsed = float(parsed)
        except ValueError:
            pass
    return key.strip(), parsed


def _field_paths(cls: type[BaseModel], prefix: str = "") -> set[str]:
    out: set[str] = set()
    for name, field in cls.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            out |= _field_paths(field.annotation, f"{prefix}{name}.")
        else:
            out.add(prefix + name)
    return out


_FIELDS = _field_paths(TrialConfig)


_SECTIONS = {f.rsplit(".", 1)[0] for f in _FIELDS if "." in f}


def _known_field(dotted: str) -> bool:
    return dotted in _FIELDS or dotted in _SECTIONS or dotted.startswith("train.deepspeed.")


# The study's own sections that `--set` may change like a trial's fields (`--set ladder.budgets=[4.8e12]`),
# but that are not grid axes or points: a ladder or bracketing belongs to the study, not to one trial.
_STUDY_SETTABLE = {f for f in _field_paths(Study) if f.split(".")[0] in ("ladder", "bracket")} | {"ladder", "bracket"}


# --- loading and validation ----------------------------------------------------------------


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise StudyError([f"{path}: no such study file"])
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise StudyError([f"{path}:{where}: YAML syntax error: {problem}"]) from None
    if not isinstance(raw, dict):
        raise StudyError([f"{path}: a study file is a mapping of sections (name, data, model, train, ...)"])
    return raw


def _pydantic_problems(err: ValidationError, prefix: str = "") -> list[str]:
    problems = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        elif e["type"] == "missing":
            msg = "required field is missing"
        elif e["type"] in ("literal_error", "enum") and "expected" in e.get("ctx", {}):
            msg = f"got {e['input']!r}; allowed: {e['ctx']['expected']}"
        else:
            msg = f"{msg} (got {e['input']!r})" if not isinstance(e.get("input"), dict) else msg
        problems.append(f"{prefix}{loc}: {msg}")
    return problems


MAX_TRIALS = 10_000       # default of `ditscale sweep --max-trials`: a larger grid is refused before expanding
MAX_NAME_LENGTH = 100     # study names: a folder and an MLflow experiment


def load_study(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = (), check_files: bool = True,
               max_trials: int | None = MAX_TRIALS) -> Study:
    """Read, override, validate (see read_study): the study alone, for what needs no trials (its name, its
    base values). What runs or plans trials takes them from harness.study.load_trials, expanded once."""
    return read_study(path, overrides, check_files, max_trials)[0]


def read_study(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = (), check_files: bool = True,
               max_trials: int | None = MAX_TRIALS) -> tuple[Study, list[TrialConfig]]:
    """Read, override, validate: (the study, its trials). Raises StudyError listing every problem found.
    A grid of more than `max_trials` points (None: no limit) is refused before it is expanded. Budget
    trials (train.flops) come without their step count: harness.study.load_trials resolves it."""
    raw = _read_yaml(Path(path))
    for text in overrides:
        key, value = parse_override(text)
        if not _known_field(key) and not key.startswith("grid.") and key not in _STUDY_SETTABLE:
            raise StudyError([f"--set {key}: unknown field"])
        if key.startswith("grid."):
            raw.setdefault("grid", {})[key[len("grid."):]] = value
        else:
            set_dotted(raw, key, value)
    name = raw.get("name")
    if isinstance(name, str) and len(name) > MAX_NAME_LENGTH:
        raise StudyError([(f"name: {len(name)} characters; a study name has at most {MAX_NAME_LENGTH} (it names "
                           "a folder and an MLflow experiment): letters, digits, _ . -")])
    try:
        study = Study.model_validate(raw)
    except ValidationError as err:
        raise StudyError(_pydantic_problems(err)) from None
    problems = [f"grid.{key}: not a study field" for key in study.grid if not _known_field(key)]
    problems += [f"grid.{key}: a grid axis needs a non-empty list of values"
                 for key, values in study.grid.items() if not isinstance(values, list) or not values]
    point_keys = {key for point in study.points for key in point}
    for i, point in enumerate(study.points):
        problems += [f"points.{i}: an empty mapping; give dotted.key: value pairs"] if not point else []
        problems += [f"points.{i}.{key}: not a study field" for key in point if not _known_field(key)]
        problems += [f"points.{i}.{key}: also a grid axis; give it in one place" for key in point if key in study.grid]
    for i, entry in enumerate(study.exclude):
        problems += [f"exclude.{i}.{key}: not a grid axis" for key in entry
                     if key not in study.grid and key not in point_keys]
    if problems:
        raise StudyError(problems)
    trials = expand_grid(study, max_trials=max_trials)
    problems = []
    for trial in trials:
        problems += check_trial(trial, check_files=check_files)
    problems += _ladder_problems(study, trials) + _bracket_problems(study, trials)
    if problems:
        raise StudyError(problems)
    return study, trials


def _ladder_problems(study: Study, trials: list[TrialConfig]) -> list[str]:
    """ladder.budgets: extrapolations of an isoFLOP (train.flops) design, each beyond its largest budget."""
    budgets = study.ladder.budgets
    if not budgets:
        return []
    grid = [t.train.flops for t in trials]
    if any(b is None for b in grid):
        return [("ladder.budgets: a ladder extrapolates an isoFLOP design; give the grid's trials train.flops "
                 "budgets (not train.steps)")]

    return [f"ladder.budgets: {b:.3g} is not above the grid's largest budget {max(grid):.3g}; a ladder predicts "
            "beyond the fitted budgets" for b in budgets if b <= max(grid)] + one_law_problems(trials)


def _bracket_problems(study: Study, trials: list[TrialConfig]) -> list[str]:
    """bracket.max_extra_sizes: bracketing compares the final val_loss of sizes at one train.flops budget."""
    if not study.bracket.max_extra_sizes:
        return []
    if any(t.train.flops is None for t in trials):
        return [("bracket.max_extra_sizes: bracketing extends an isoFLOP design; give the grid's trials "
                 "train.flops budgets (not train.steps)")]
    if any(not t.eval.val_batches for t in trials):
        return ["bracket.max_extra_sizes: bracketing compares each size's final val_loss; set eval.val_batches > 0"]
    return []


def grid_size(study: Study) -> int:
    """How many points the grid's cartesian product has (before `exclude:`), from the axis lengths."""
    n = 1
    for values in study.grid.values():
        n *= len(values) if isinstance(values, list) else 1
    return n * max(1, len(study.points))


def expand_grid(study: Study, max_trials: int | None = MAX_TRIALS) -> list[TrialConfig]:
    """The cartesian product of the grid axes (in file order), minus excluded points, as trials.
    More than `max_trials` points (None: no limit) is an error, found before anything is expanded."""
    n = grid_size(study)
    if max_trials is not None and n > max_trials:
        axes = " x ".join([f"{len(v)} {k}" for k, v in study.grid.items() if isinstance(v, list)]
                          + ([f"{len(study.points)} points"] if study.points else []))
        raise StudyError([(f"grid: {n:,} trials ({axes}) is more than --max-trials {max_trials:,}; "
                           "make the grid smaller or raise --max-trials")])
    base = study.model_dump(mode="python", exclude=STUDY_ONLY)
    keys = list(study.grid)
    trials, problems = [], []
    for values, extra in itertools.product(itertools.product(*(study.grid[k] for k in keys)), study.points or [{}]):
        point = dict(zip(keys, values)) | extra  # `points:` entries: exactly these, at every grid point
        if any(all(point.get(k) == v for k, v in entry.items()) for entry in study.exclude):
            continue
        raw = copy.deepcopy(base)
        for k, v in point.items():
            set_dotted(raw, k, v)
        try:
            trials.append(TrialConfig.model_validate(raw))
        except ValidationError as err:
            where = ", ".join(f"{k}={v}" for k, v in point.items())
            problems += [f"{p} (grid point {where})" for p in _pydantic_problems(err)]
    if problems:
        raise StudyError(problems)
    return trials


def override_trial(trial: TrialConfig, overrides: list[str] | tuple[str, ...] = ()) -> TrialConfig:
    """The trial with `--set` overrides applied and validated (a different trial_id, when anything
    changed: find checkpoints and runs by the original)."""
    if not overrides:
        return trial
    raw = trial.model_dump(mode="python")
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(raw, key, value)
    try:
        changed = TrialConfig.model_validate(raw)
    except ValidationError as err:
        raise StudyError(_pydantic_problems(err)) from None
    problems = check_trial(changed, check_files=False)
    if problems:
        raise StudyError(problems)
    return changed
