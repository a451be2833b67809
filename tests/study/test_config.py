"""The study schema: grid expansion, overrides, trial ids, and a corpus of bad study files that must
each be rejected with the dotted path of the field to change, quickly and without starting anything."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from harness.config import StudyError, expand_grid, load_study, parse_override
from tests.support.paths import FIXTURES

STUDIES = FIXTURES / "studies"


@pytest.fixture
def shard_dir(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    for name in ("train-000000.tar", "train-000001.tar", "val-000000.tar"):
        (d / name).write_bytes(b"")
    return d


def base_dict(shard_dir) -> dict:
    text = (STUDIES / "base.yaml").read_text().replace("SHARDS", str(shard_dir))
    return yaml.safe_load(text)


def write(tmp_path, study: dict | str, name="study.yaml") -> Path:
    path = tmp_path / name
    path.write_text(study if isinstance(study, str) else yaml.safe_dump(study))
    return path


def test_valid_study_expands_its_grid(tmp_path, shard_dir):
    study = load_study(write(tmp_path, base_dict(shard_dir)))
    trials = expand_grid(study)
    assert [t.model.patch for t in trials] == [2, 4]
    assert [t.model_name for t in trials] == ["DiT-XXS/2", "DiT-XXS/4"]
    assert len({t.trial_id for t in trials}) == 2
    t = trials[0]
    assert t.micro_batch_size == 4 and t.grad_accumulation == 1  # 8 global over 2 workers
    assert t.data.conditioning == "class" and t.model.learn_sigma is True  # resolved per trial
    # Same keys for every trial, so MLflow can compare them side by side
    assert trials[0].flat_params().keys() == trials[1].flat_params().keys()
    assert trials[0].flat_params()["model.patch"] == "2"


def test_trial_id_is_stable_and_ignores_where_it_runs(tmp_path, shard_dir):
    a = expand_grid(load_study(write(tmp_path, base_dict(shard_dir))))[0]
    b = expand_grid(load_study(write(tmp_path, base_dict(shard_dir)), ["resources.workers_per_trial=4"]))[0]
    c = expand_grid(load_study(write(tmp_path, base_dict(shard_dir)), ["train.lr=2e-3"]))[0]
    assert a.trial_id == b.trial_id
    assert a.trial_id != c.trial_id
    assert c.train.lr == 2e-3


def test_grid_over_family_resolves_defaults_per_point(tmp_path, shard_dir):
    d = base_dict(shard_dir)
    d["grid"] = {"objective.kind": ["ddpm", "rectified_flow"]}
    trials = expand_grid(load_study(write(tmp_path, d)))
    assert [t.model.learn_sigma for t in trials] == [True, False]


def test_exclude_and_set_overrides(tmp_path, shard_dir):
    d = base_dict(shard_dir)
    d["grid"] = {"model.size": ["XXS", "XS"], "model.patch": [2, 4]}
    d["exclude"] = [{"model.size": "XS", "model.patch": 2}]
    trials = expand_grid(load_study(write(tmp_path, d), ["train.steps=5", "grid.train.seed=[0, 1]"]))
    points = [(t.model.size, t.model.patch, t.train.seed) for t in trials]
    assert len(points) == 6 and ("XS", 2, 0) not in points and ("XS", 4, 1) in points
    assert all(t.train.steps == 5 for t in trials)
    assert parse_override("eval.cfg_scale=[1.0, 4.0]") == ("eval.cfg_scale", [1.0, 4.0])
    assert parse_override("train.lr=1e-4") == ("train.lr", 1e-4)


def _mutations():
    """(description, mutation of the base dict or raw YAML text, expected dotted path in the message)."""

    def setp(path, value):
        def f(d):
            node = d
            *parents, leaf = path.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
        return f

    def delete(path):
        def f(d):
            *parents, leaf = path.split(".")
            node = d
            for p in parents:
                node = node[p]
            del node[leaf]
        return f

    return [
        ("unknown top-level key", setp("trainer", {"steps": 1}), "trainer: unknown field"),
        ("unknown nested key", setp("train.stpes", 10), "train.stpes: unknown field"),
        ("unknown model size", setp("model.size", "XXL"), "model.size"),
        ("unknown family", setp("model.family", "unet"), "model.family"),
        ("patch does not divide", setp("grid", {"model.patch": [3]}), "model.patch: 3 does not divide data.image_size"),
        ("zero stage 4", setp("train.zero_stage", 4), "train.zero_stage"),
        ("negative batch", setp("train.batch_size", -8), "train.batch_size"),
        ("zero lr", setp("train.lr", 0), "train.lr"),
        ("zero steps", setp("train.steps", 0), "train.steps"),
        ("batch not divisible by workers x micro", setp("train.micro_batch_size", 3),
         "train.batch_size: 8 is not divisible by resources.workers_per_trial (2) x train.micro_batch_size (3)"),
        ("missing shards", setp("data.shards", "/nonexistent/train-{000000..000003}.tar"), "data.shards"),
        ("partly missing shards", "PARTLY", "data.shards: 1 of 3 shards are missing"),
        ("missing required field", delete("train.steps"), "train.steps / train.flops: give exactly one"),
        ("bad precision", setp("train.precision", "fp8"), "train.precision"),
        ("grid axis that is not a field", setp("grid", {"model.sise": ["S"]}), "grid.model.sise: not a study field"),
        ("text conditioning with DiT", setp("data.conditioning", "text"), "data.conditioning"),
        ("bad value on a grid axis", setp("grid", {"train.zero_stage": [2, 5]}), "train.zero_stage"),
        ("exclude names a non-axis", setp("exclude", [{"model.size": "S"}]), "exclude.0.model.size"),
        ("YAML syntax error", "SYNTAX", "line 4, column 13: YAML syntax error"),
        ("flip with captions", "FLIPTEXT", "data.flip"),
    ]


def test_bad_study_corpus_is_rejected_fast_without_starting_anything(tmp_path, shard_dir):
    cases = []
    for i, (what, mutate, expected) in enumerate(_mutations()):
        d = copy.deepcopy(base_dict(shard_dir))
        if mutate == "SYNTAX":
            text = "name: x\ndata:\n  shards: [unclosed\n  image_size: 16\n"
        elif mutate == "PARTLY":
            d["data"]["shards"] = str(shard_dir / "train-{000000..000002}.tar")
            text = yaml.safe_dump(d)
        elif mutate == "FLIPTEXT":
            d["model"] = {"family": "mmdit", "size": "d2", "patch": 2}
            d["data"]["flip"] = True
            d["grid"] = {}
            text = yaml.safe_dump(d)
        else:
            mutate(d)
            text = yaml.safe_dump(d)
        cases.append({"what": what, "path": str(write(tmp_path, text, f"bad{i}.yaml")), "expected": expected})
    assert len(cases) >= 10

    # One fresh interpreter loads every bad file: it proves no Ray/DeepSpeed import and times the checks.
    script = """
import json, sys, time
from harness.config import StudyError, load_study
cases = json.loads(sys.argv[1])
out = []
for c in cases:
    start = time.perf_counter()
    try:
        load_study(c["path"])
        out.append({"what": c["what"], "error": None, "seconds": time.perf_counter() - start})
    except StudyError as e:
        out.append({"what": c["what"], "error": str(e), "seconds": time.perf_counter() - start})
print(json.dumps({"results": out, "heavy": [m for m in ("ray", "deepspeed", "mlflow") if m in sys.modules]}))
"""
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(cases)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["heavy"] == []
    for case, result in zip(cases, report["results"]):
        assert result["error"] is not None, f"{case['what']}: accepted"
        assert case["expected"] in result["error"], (case["what"], result["error"])
        assert "Traceback" not in result["error"]
        assert result["seconds"] < 1.0, (case["what"], result["seconds"])


def test_cli_prints_one_line_per_problem(tmp_path, shard_dir):
    d = base_dict(shard_dir)
    d["train"]["zero_stage"] = 7
    d["train"]["lr"] = -1
    path = write(tmp_path, d)
    with pytest.raises(StudyError) as err:
        load_study(path)
    assert len(err.value.problems) == 2
