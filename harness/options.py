"""Command-line pieces every command that reads a study shares: `--set` overrides and choosing one
trial of a study by index. Argparse only (commands stay instant to start)."""

from __future__ import annotations

import argparse

from harness.errors import UserError

SET_HELP = "override a study field, e.g. --set train.steps=100 (repeatable)"


def add_set_option(p: argparse.ArgumentParser, help: str = SET_HELP) -> None:
    p.add_argument("--set", action="append", default=[], metavar="DOTTED.KEY=VALUE", help=help)


def choose_trial(trials: list, index: int | None, alternative: str = ""):
    """The trial at `index` (`--trial`); with no index, the study's only trial, else one clear error
    that lists the trials to choose from."""
    if index is None and len(trials) > 1:
        listing = "; ".join(f"{i}: {trial.model_name} {trial.objective.kind} ({trial.trial_id})" for i, trial in enumerate(trials))
        raise UserError(f"the study has {len(trials)} trials; choose one with --trial INDEX ({listing})"
                        + (f" {alternative}" if alternative else ""))
    index = index or 0
    if not 0 <= index < len(trials):
        raise UserError(f"--trial {index}: the study has trials 0..{len(trials) - 1}")
    return trials[index]
