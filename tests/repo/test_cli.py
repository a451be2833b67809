"""The `ditscale` console script, run as a user would run it."""

import json
import re
import subprocess

import pytest

from tests.support.dit_paper import PAPER_GFLOPS


def ditscale(*args, check=True):
    proc = subprocess.run(["ditscale", *args], capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_models_json_reproduces_the_paper_table():
    rows = {r["name"]: r for r in json.loads(ditscale("models", "--json", "--image-size", "256").stdout)}
    for short, paper in PAPER_GFLOPS.items():
        row = rows[f"DiT-{short}"]
        assert abs(row["gflops"] - paper) <= max(0.011, 5e-4 * paper)
        assert {"name", "depth", "hidden", "heads", "patch", "tokens", "params", "gflops"} <= set(row)
    assert round(rows["DiT-XL/2"]["params"] / 1e6, 1) == 675.1
    assert rows["DiT-XL/2"]["tokens"] == 256


def test_models_table_names_the_convention_and_raw_input_size():
    out = ditscale("models", "--input-size", "16", "--channels", "1").stdout
    assert "multiply-adds" in out
    assert "DiT-XXS/2" in out and "DiT-S/8" in out  # 8 divides 16
    rows = json.loads(ditscale("models", "--json", "--input-size", "12", "--channels", "1").stdout)
    assert rows and all(12 % r["patch"] == 0 for r in rows) and all(r["in_channels"] == 1 for r in rows)


def test_bench_runs_ours_and_the_diffusers_reference():
    proc = ditscale("bench", "DiT-XXS/2", "--batch", "2", "--steps", "2", "--warmup", "1", "--input-size", "8",
                    "--device", "cpu", "--json")
    report = json.loads(proc.stdout)
    labels = [r["label"] for r in report["results"]]
    assert labels == ["ditscale DiT-XXS/2", "diffusers DiTTransformer2DModel"]
    assert all(r["img_per_s"] > 0 and r["tflops"] > 0 for r in report["results"])
    assert report["step_time_ratio_vs_reference"] > 0
    assert report["results"][0]["mfu"] is None  # no known peak for a CPU


def test_bad_model_name_is_one_clear_line():
    proc = ditscale("bench", "DiT-Q/2", check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "DiT-Q/2" in lines[0] and "Traceback" not in proc.stderr


def test_bench_data_prints_loader_throughput(digits_dir):
    out = ditscale("bench", "--data", str(digits_dir), "--data-seconds", "0.5", "--data-batch", "64").stdout
    assert f"{digits_dir}: pixels 1x16x16:" in out and "samples/s per process" in out
    rate = float(out.split("1x16x16: ")[1].split(" samples/s")[0].replace(",", ""))
    assert rate > 0


def test_bench_without_model_or_data_is_a_clear_error():
    proc = ditscale("bench", check=False)
    assert proc.returncode == 2 and "--data" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_bench_startup_times_each_trial_of_a_real_sweep(tmp_path):
    """Two 3-step trials in Tune's reused process: a row per trial with its total and phases, read
    back from MLflow (numbers are printed, not judged: speed lives in benchmarks, not tests)."""
    proc = subprocess.run(["ditscale", "bench", "--startup", "--startup-trials", "2", "--startup-mode", "in-process"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout.split("in-process: start-up per trial")[1]
    header = table.splitlines()[1].split()
    assert header[:2] == ["trial", "total"] and "first_step" in header and "deepspeed" in header
    rows = [line.split() for line in table.splitlines()[2:4]]
    assert [r[0] for r in rows] == ["0", "1"] and all(float(r[1]) > 0 for r in rows)
    assert re.search(r"first [0-9.]+ s; later trials median [0-9.]+ s", table)
    assert list(tmp_path.iterdir()) == [], "the bench works in a temporary folder"
