"""Which trials of a study one scaling law covers: the rule a ladder's single extrapolation needs
(issue 27: a pre-registered ladder run tests the study's law, so the grid must hold one law).

In the study room (below launch/): config.py's validation, the dry run and `ditscale plan` refuse a ladder
on a grid that is several laws, and harness/launch/ladder.py predicts from the one law.
"""

from __future__ import annotations

import json

from harness.schema import TrialConfig, flatten

# What an isoFLOP grid may vary and still be one law: its own axes (size x budget), the learning rate tuned
# per size (the fits keep each (budget, size)'s best LR) and the seed (averaged). The step count of a budget
# trial follows from train.flops.
LAW_AXES = ("model.size", "train.flops", "train.steps", "train.lr", "train.seed")
# Axes that are experiments of their own even when tied to the size (as analysis.study._REAL_AXES): the
# report never pools them into one law.
_OWN_EXPERIMENTS = ("model.patch", "model.family", "model.attention", "objective.kind")


def varying_fields(trials: list[TrialConfig]) -> dict[str, list]:
    """Dotted fields of the trials' identity that take more than one value beyond LAW_AXES, {field: values}.
    A field with one value per size (a μP-style rule tied to the size, e.g. a width-scaled setting) is part
    of the size axis, as the report's grouping (analysis.study.group_axes) treats it, unless it is one of
    _OWN_EXPERIMENTS. A field that follows from another varying one (eval.sampler and model.learn_sigma
    resolved from objective.kind) is left out: the line names the axis the user chose."""
    flat = [{k: json.dumps(v, sort_keys=True) for k, v in flatten(t.identity()).items()} for t in trials]
    keys = sorted({k for f in flat for k in f} - set(LAW_AXES), key=lambda k: (k not in _OWN_EXPERIMENTS, k))
    out: dict[str, list] = {}
    for key in keys:
        if len({f.get(key) for f in flat}) < 2:
            continue
        if _follows(flat, [t.model.size for t in trials], key) and key not in _OWN_EXPERIMENTS:
            continue  # tied to the size: part of the size axis
        if any(_follows(flat, [f.get(k) for f in flat], key) for k in out):
            continue  # derived from an axis already named
        out[key] = sorted({json.loads(f[key]) if key in f else None for f in flat}, key=str)
    return dict(sorted(out.items()))


def _follows(flat: list[dict], of: list, key: str) -> bool:
    """Whether `key`'s value is a function of `of` (one value of `key` per value of `of`, several of `of`)."""
    seen: dict = {}
    for f, x in zip(flat, of):
        if seen.setdefault(x, f.get(key)) != f.get(key):
            return False
    return len(seen) > 1


def one_law_problems(trials: list[TrialConfig]) -> list[str]:
    """ladder.budgets on a grid that varies something besides size, budget, LR and seed (a patch, the
    objective, ...): refused before anything runs, in one line naming ladder.budgets and the field.

    Why refuse rather than fit per group and register one ladder trial per group: the report fits one law
    per such group (a law pooled across patches is no patch's law), so one ladder trial per budget cannot
    test the study's law; a researcher who wants each group's law tested wants, per group, its own
    prediction, registration, cost and Extrapolation row. One ladder trial per group would multiply the
    study's most expensive run (at least 4x its largest budget; dit_isoflop's is 10x) by the number of
    groups, beyond what `ditscale plan` printed and the dry run lists (one trial per ladder budget), and a
    registration is found by its budget alone. So the sweep refuses, and the line says how to get each
    group's ladder: one study per value (e.g. the same file with `--set grid.model.patch=[2] --set name=...`
    when the patch is a grid axis), each with its own ladder. (Bracketing needs no such rule: it decides per
    budget among trials equal in everything but size and seed, harness/launch/bracket.py budget_key, so a
    patch grid brackets each patch on its own.)"""
    varying = varying_fields(trials)
    if not varying:
        return []
    fields = "; ".join(f"{k} ({', '.join(_short(v) for v in vals[:4])}{', ...' if len(vals) > 4 else ''})"
                       for k, vals in varying.items())
    first = next(iter(varying))
    return [(f"ladder.budgets: the grid varies {fields} besides size, budget, learning rate and seed; the report "
             f"fits one law per value and a ladder extrapolates one law: run one study per value, each with its "
             f"own ladder and name (e.g. {first}: {_short(varying[first][0])} alone), or drop ladder.budgets")]


def _short(v) -> str:
    return json.dumps(v) if isinstance(v, (dict, list)) else str(v)
