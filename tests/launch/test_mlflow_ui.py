"""What a team sees when it opens a study in MLflow 3's UI (issue 19, item 7): the experiment is a
model-training one, each trial's run has its shards as dataset inputs (digest from dataset.json's sha256s)
and the study file as its source, and the printed link opens the runs table with every trial and its
val_loss and FD metric, in headless Chromium against a real `mlflow server`."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.support import tiny_study, write_study
from tests.support.paths import ROOT
from tests.support.procs import free_port as _free_port

FD_METRIC = re.compile(r"^(fid|fd_).*")


def _expected_digest(folder: Path, split: str) -> str:
    """dataset.json's shard sha256s of the split, hashed as harness/tracking_inputs.py documents it."""
    manifest = json.loads((folder / "dataset.json").read_text())
    shas = [s["sha256"] for s in manifest["splits"][split]["shards"]]
    return hashlib.sha256("\n".join(shas).encode()).hexdigest()[:16]


def _inputs(run) -> dict[str, tuple]:
    """context -> (name, digest, source, input tags) of a run's dataset inputs."""
    out = {}
    for item in run.inputs.dataset_inputs:
        tags = {t.key: t.value for t in item.tags}
        out[tags["mlflow.data.context"]] = (item.dataset.name, item.dataset.digest, json.loads(item.dataset.source),
                                            tags)
    return out


def _grid_study(digits: Path, name: str, **sections) -> dict:
    return {**tiny_study(digits, name, **sections), "grid": {"model.patch": [2, 4]}}


# --- the store, without training ---------------------------------------------------------------------


def test_experiment_kind_sources_and_dataset_inputs(tmp_path, digits_dir):
    """What the sweep's driver and its trials write (open_parent_run, open_trial_run), on SQLite."""
    import mlflow

    from harness.config import expand_grid, load_study
    from harness.tracking import open_parent_run, open_trial_run

    path = write_study(tmp_path / "study.yaml", _grid_study(digits_dir, "kinds"))
    study = load_study(path)
    trials = expand_grid(study)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = open_parent_run(uri, study, trials, source=str(path))
    run_ids = [open_trial_run(t, uri, parent_run_id=parent) for t in trials]

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("kinds")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    for run_id in [parent] + run_ids:  # the Source column: the study file, on the sweep and its trials
        tags = client.get_run(run_id).data.tags
        assert tags["mlflow.source.name"] == str(path.resolve()) and tags["mlflow.source.type"] == "LOCAL"
    for run_id in run_ids:
        inputs = _inputs(client.get_run(run_id))
        assert set(inputs) == {"training", "validation"}
        name, digest, source, tags = inputs["training"]
        assert name == "digits/train" and digest == _expected_digest(digits_dir, "train")
        assert source == {"uri": str(digits_dir / "train-{000000..000003}.tar")}
        assert tags["ditscale.digest_of"] == "shard sha256 (dataset.json)"
        name, digest, source, _ = inputs["validation"]
        assert name == "digits/val" and digest == _expected_digest(digits_dir, "val")
    # A resumed trial (same trial_id) reuses its run: no second set of inputs.
    assert open_trial_run(trials[0], uri, parent_run_id=parent) == run_ids[0]
    assert len(client.get_run(run_ids[0]).inputs.dataset_inputs) == 2



_SAME_INSTANT = """
import sys, time
from mlflow import MlflowClient
from harness.config import expand_grid, load_study
from harness.tracking_inputs import dataset_inputs, log_dataset_inputs

uri, study, at = sys.argv[1], sys.argv[2], float(sys.argv[3])
c = MlflowClient(uri)
trial = expand_grid(load_study(study))[0]
dataset_inputs(trial)  # MLflow's dataset modules imported before the start line
exp_id = c.get_experiment_by_name("race").experiment_id
for k in range(4):  # each round: new datasets (another study's), inserted by every process at once
    trial.data.shards = trial.data.shards.replace("{000000..", "{00000" + str(k) + "..")
    run = c.create_run(exp_id)
    while time.time() < at + k:
        time.sleep(0.0005)
    log_dataset_inputs(c, run.info.run_id, trial)
    print(run.info.run_id)
"""


def test_trials_logging_the_same_datasets_at_once_all_get_them(tmp_path, digits_dir):
    """Every trial of a study logs the same datasets; two inserting one at the same moment collide on the
    store's unique (experiment, name, digest) (without the retry, about half of such calls failed)."""
    import mlflow

    study = write_study(tmp_path / "study.yaml", tiny_study(digits_dir, "race"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.MlflowClient(uri).create_experiment("race")
    at = time.time() + 10  # after the imports of every process (a late one only weakens the test)
    procs = [subprocess.Popen([sys.executable, "-c", _SAME_INSTANT, uri, str(study), str(at)], text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT)
             for _ in range(3)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert not any("warning: the trial's datasets were not logged" in out for out in outs), outs
    client = mlflow.MlflowClient(uri)
    run_ids = [line for out in outs for line in out.split() if re.fullmatch(r"[0-9a-f]{32}", line)]
    assert len(run_ids) == 12, outs
    for run_id in run_ids:
        assert set(_inputs(client.get_run(run_id))) == {"training", "validation"}, run_id



def test_a_sweep_closes_the_parent_runs_a_lost_driver_left_running(tmp_path, digits_dir, monkeypatch):
    """A driver killed with its host leaves its sweep's parent run RUNNING; the next sweep of the study
    (which holds the study's lock, so no other sweep is alive) ends it as KILLED, saying why. A requeued
    Slurm job's own parent run is reused instead."""
    import mlflow

    from harness.config import expand_grid, load_study
    from harness.tracking import open_parent_run

    path = write_study(tmp_path / "study.yaml", tiny_study(digits_dir, "orphans"))
    study = load_study(path)
    trials = expand_grid(study)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("SLURM_JOB_ID", "101")
    lost = open_parent_run(uri, study, trials)               # job 101's driver, then its host is lost
    assert open_parent_run(uri, study, trials) == lost       # job 101 requeued: the same sweep, reused
    monkeypatch.setenv("SLURM_JOB_ID", "102")
    new = open_parent_run(uri, study, trials)                # a resubmission
    client = mlflow.MlflowClient(uri)
    old = client.get_run(lost)
    assert old.info.status == "KILLED" and old.data.tags["ditscale.status"].startswith("killed: its sweep ended")
    assert client.get_run(new).info.status == "RUNNING"


def test_shards_without_a_manifest_get_a_digest_of_their_urls(tmp_path, digits_dir, monkeypatch):
    import mlflow

    from harness.config import expand_grid, load_study
    from harness.tracking import open_trial_run, set_study_file

    bare = tmp_path / "bare"
    bare.mkdir()
    for shard in ("train-000000.tar", "train-000001.tar"):
        shutil.copy(digits_dir / shard, bare / shard)  # no dataset.json beside them
    study = tiny_study(digits_dir, "bare", data={"shards": str(bare / "train-{000000..000001}.tar"),
                                                 "val_shards": None, "num_classes": 10})
    path = write_study(tmp_path / "study.yaml", study)
    (trial,) = expand_grid(load_study(path))
    monkeypatch.setattr("harness.tracking._study_file", None)  # restored afterwards: it is process state
    set_study_file(str(path))  # what `ditscale train` does: no sweep run to copy the source from
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = mlflow.MlflowClient(uri).get_run(open_trial_run(trial, uri))
    urls = "\n".join(str(bare / f"train-00000{i}.tar") for i in range(2))
    ((name, digest, _, tags),) = _inputs(run).values()
    assert name == "bare/train" and digest == hashlib.sha256(urls.encode()).hexdigest()[:16]
    assert tags["ditscale.digest_of"].startswith("shard URLs") and tags["mlflow.data.context"] == "training"
    assert run.data.tags["mlflow.source.name"] == str(path.resolve())


def test_an_existing_experiment_gets_the_kind_unless_one_was_chosen(tmp_path):
    import mlflow

    from harness.tracking import experiment_id

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    old = client.create_experiment("old")  # made before ditscale tagged experiments
    chosen = client.create_experiment("chosen", tags={"mlflow.experimentKind": "genai_development"})
    assert experiment_id(uri, "old") == old and experiment_id(uri, "chosen") == chosen
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"
    assert client.get_experiment(chosen).tags["mlflow.experimentKind"] == "genai_development"


def test_study_view_and_links(tmp_path, digits_dir):
    from harness.config import expand_grid, load_study
    from harness.tracking_view import study_view, ui_url

    trials = expand_grid(load_study(write_study(tmp_path / "s.yaml", _grid_study(digits_dir, "view"))))
    view = study_view({"loss", "val_loss", "val_mse", "fd_lenet_cfg1.0", "kd_lenet_cfg1.0", "lr"}, trials)
    assert view["orderByKey"] == "metrics.`val_loss`" and view["orderByAsc"] is True
    assert view["selectedColumns"] == ["attributes.`Dataset`", "attributes.`Source`", "metrics.`fd_lenet_cfg1.0`",
                                       "metrics.`loss`", "metrics.`val_loss`", "params.`model.patch`"]
    assert ui_url("http://u:pw@host:5000/", "7") == (
        "http://host:5000/#/experiments/7/runs?workflowType=machine_learning&viewStateShareKey=ditscale-study")
    assert ui_url("sqlite:////x/mlflow.db", "7", view=None).startswith(
        "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning&orderByKey=metrics.%60val_loss%60")


# --- the UI in a real browser --------------------------------------------------------------------------


class _Page:
    """One tab of headless Chromium (the DevTools-protocol client of tests/support/chromium.py)."""

    def __init__(self, browser, width: int = 2400):
        self.b = browser
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime"):
            browser.send(f"{domain}.enable", session=self.session)
        # Wide enough that the grid renders every selected column (AG Grid draws only the visible ones).
        browser.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": 1200, "deviceScaleFactor": 1,
                                                             "mobile": False}, session=self.session)

    def eval(self, expression: str):
        reply = self.b.send("Runtime.evaluate", {"expression": expression, "returnByValue": True},
                            session=self.session)
        return reply["result"].get("value")

    def open(self, url: str, until: str, timeout: float = 90) -> None:
        """Navigate, then wait until the JavaScript expression `until` is true (the UI renders after
        its API calls return, well after the load event)."""
        self.b.send("Page.navigate", {"url": url}, session=self.session)
        deadline = time.monotonic() + timeout
        while not self.eval(f"Boolean({until})"):
            if time.monotonic() > deadline:
                if os.environ.get("DITSCALE_ARTIFACTS"):  # CI keeps what the page looked like
                    self.screenshot(Path(os.environ["DITSCALE_ARTIFACTS"]) / "mlflow-ui-timeout.png")
                raise AssertionError(f"{url}: not {until} after {timeout} s; page text:\n"
                                     + (self.eval("document.body.innerText") or "")[:3000])
            time.sleep(0.5)

    def text(self) -> str:
        return self.eval("document.body.innerText") or ""

    def grid_rows(self) -> list[dict]:
        """The runs table as the browser shows it: one {column id: cell text} per row, in row order
        (AG Grid splits a row over its pinned and scrolling containers; row-index joins them)."""
        rows = self.eval("""JSON.stringify((() => { const rows = {};
            document.querySelectorAll('.ag-row').forEach(r => { const i = r.getAttribute('row-index');
              rows[i] = rows[i] || {};
              r.querySelectorAll('.ag-cell').forEach(c => { rows[i][c.getAttribute('col-id')] = c.innerText.trim(); }); });
            return rows; })())""")
        rows = json.loads(rows)
        return [rows[k] for k in sorted(rows, key=int)]

    def compare_metrics(self) -> dict[str, list[str]]:
        """The compare view's metrics table: {metric: [value per run, in the URL's order]}. It is two
        react-virtualized grids (names; values, one column per run) that draw only the rows in view, so
        each is scrolled through."""
        grids = "document.querySelectorAll('.ReactVirtualized__Grid')"
        cells: list[dict] = []
        for i in range(self.eval(f"{grids}.length")):
            cells.append({})
            while True:
                got = json.loads(self.eval(f"""JSON.stringify((() => {{ const g = {grids}[{i}];
                    const c = [...g.querySelector('.ReactVirtualized__Grid__innerScrollContainer').children];
                    return {{cells: c.map(e => [parseFloat(e.style.top), parseFloat(e.style.left), e.innerText.trim()]),
                             top: g.scrollTop, max: g.scrollHeight - g.clientHeight, step: g.clientHeight}}; }})())"""))
                cells[i].update({(top, left): text for top, left, text in got["cells"]})
                if got["top"] >= got["max"]:
                    break
                self.eval(f"{grids}[{i}].scrollTop = {got['top'] + got['step']}")
                time.sleep(0.3)  # the grid draws the newly visible rows on its next frame
        names = [g for g in cells if len({left for _, left in g}) == 1]
        values = [g for g in cells if len({left for _, left in g}) > 1]
        assert len(names) == 1 and len(values) == 1, f"unexpected compare-view layout: {cells}"
        return {name: [text for (t, _), text in sorted(values[0].items()) if t == top]
                for (top, _), name in names[0].items()}

    def screenshot(self, path: Path) -> None:
        shot = self.b.send("Page.captureScreenshot", {"format": "png"}, session=self.session)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))


_WARM_EVAL_CACHE = """
import sys
from harness.evaluation.features import EvalData, choose_extractor, reference_stats
data = EvalData.from_folder(sys.argv[1])
extractor, _ = choose_extractor("auto", data, "cpu")
if extractor is not None:
    reference_stats(data, extractor, "train")
"""


def _start_server(tmp_path: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job runner: one process fewer
    with open(tmp_path / "server.log", "wb") as log:  # a file, so a chatty server never blocks on a pipe
        return subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
             "--default-artifact-root", str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"],
            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)


def _wait_healthy(uri: str, server: subprocess.Popen, tmp_path: Path, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.poll() is not None:
            pytest.fail("mlflow server exited:\n" + (tmp_path / "server.log").read_text()[-3000:])
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"mlflow server did not come up in {timeout:.0f} s")


@pytest.mark.slow
def test_the_printed_link_opens_the_study_on_its_trials_in_chromium(tmp_path, digits_dir):
    from tests.support.chromium import CDP as _CDP
    from tests.support.chromium import chromium_or_skip

    binary = chromium_or_skip()
    t0 = time.time()
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    server = _start_server(tmp_path, port)
    try:
        # While the server migrates its database: the FD feature extractor (the lenet stand-in, trained
        # once per dataset) and its reference statistics, both cached beside the shards, where the two
        # trials' first evaluation would otherwise compute them.
        subprocess.run([sys.executable, "-c", _WARM_EVAL_CACHE, str(digits_dir)], check=True, capture_output=True,
                       timeout=600, cwd=ROOT)
        _wait_healthy(uri, server, tmp_path)
        t_server = time.time() - t0
        study = write_study(tmp_path / "study.yaml", _grid_study(
            digits_dir, "ui-study", train={"steps": 6, "log_every": 3, "checkpoint_every": 6},
            eval={"fid_samples": 32, "sampling_steps": 2, "cfg_scale": [1.0], "batch_size": 32, "val_batches": 1},
            tracking={"uri": uri, "system_metrics": False}))
        # The two trials side by side, one core each, as `ditscale train --trial I` (a sweep would
        # start Ray first; its runs are written by the same open_trial_run, tested above).
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        env.pop("MLFLOW_TRACKING_URI", None)
        procs = [subprocess.Popen([sys.executable, "-m", "harness.cli", "train", str(study), "--trial", str(i)],
                                  cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                 for i in range(2)]
        outs = [p.communicate(timeout=900)[0] for p in procs]
        for p, out in zip(procs, outs):
            assert p.returncode == 0, out[-5000:]
        t_trials = time.time() - t0 - t_server

        import mlflow

        client = mlflow.MlflowClient(uri)
        exp = client.get_experiment_by_name("ui-study")
        assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
        runs = client.search_runs([exp.experiment_id], filter_string="tags.trial_id != ''")
        assert len(runs) == 2
        for run in runs:  # dataset inputs with the manifest's digest, through the server too
            inputs = _inputs(run)
            assert {c: v[:2] for c, v in inputs.items()} == {
                "training": ("digits/train", _expected_digest(digits_dir, "train")),
                "validation": ("digits/val", _expected_digest(digits_dir, "val"))}
            assert run.data.tags["mlflow.source.name"] == str(study.resolve())
        # Logging through a tracking server (this test took over tests/trial/test_train.py's server test):
        # nothing goes to the default SQLite file; tags, params, the loss history and config.yaml arrive.
        assert not (tmp_path / "mlflow.db").exists(), "nothing may be logged to the default SQLite file"
        for run in runs:
            tags = run.data.tags
            assert (tags["family"], tags["size"], tags["objective"]) == ("dit", "XXS", "ddpm") and len(tags["trial_id"]) == 12
            assert tags["patch"] == run.data.params["model.patch"] and run.data.params["train.batch_size"] == "32"
            assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [3, 6]
            assert "config.yaml" in [a.path for a in client.list_artifacts(run.info.run_id)]
        fd_keys = sorted({k for r in runs for k in r.data.metrics if FD_METRIC.match(k)})
        assert fd_keys, f"no FD metric logged: {sorted(runs[0].data.metrics)}"
        fd = fd_keys[0]
        link = re.findall(r"MLflow UI, the study's training runs: (\S+)", outs[0])
        assert link and link[0].startswith(f"{uri}/#/experiments/{exp.experiment_id}/runs?"), outs[0][-2000:]

        browser = _CDP(binary, tmp_path / "profile")  # a fresh profile: no remembered GenAI/ML switch
        try:
            page = _Page(browser)
            names = [r.info.run_name for r in runs]
            # The experiment's own page, as a model-training experiment: the UI routes it to its runs
            # (as a GenAI one, to an overview of traces and tokens).
            page.open(f"{uri}/#/experiments/{exp.experiment_id}?workflowType=machine_learning",
                      until=f"location.hash.startsWith('#/experiments/{exp.experiment_id}/')")
            assert page.eval("location.hash").startswith(f"#/experiments/{exp.experiment_id}/runs"), \
                page.eval("location.hash")
            # The link `ditscale train` (and `ditscale sweep`) printed: every trial, with its metrics.
            page.open(link[0], until="document.querySelectorAll('.ag-center-cols-container .ag-row').length >= 2 "
                                     f"&& document.body.innerText.includes('{fd}')")
            page.screenshot(tmp_path / "runs.png")
            text, hash_ = page.text(), page.eval("location.hash")
            assert f"/experiments/{exp.experiment_id}/runs" in hash_ and "workflowType=machine_learning" in hash_, hash_
            assert "Token Usage" not in text and "Error loading shared view" not in text, text[:2000]
            assert "2 matching runs" in text, text[:2000]
            rows = page.grid_rows()
            order = [row["attributes.`Run Name`"].splitlines()[-1] for row in rows]  # after the colour chip
            shown = dict(zip(order, rows))
            assert sorted(shown) == sorted(names), rows
            by_val = sorted(runs, key=lambda r: r.data.metrics["val_loss"])
            assert order == [r.info.run_name for r in by_val], "sorted by val_loss, best first"
            for run in runs:
                row = shown[run.info.run_name]
                for key in ("val_loss", fd):
                    cell = row.get(f"metrics.`{key}`")
                    assert cell, f"{key} of {run.info.run_name} not shown: {row}"
                    assert float(cell) == pytest.approx(run.data.metrics[key], rel=1e-6)
                assert "digits/train" in row["attributes.`Dataset`"] and row["attributes.`Source`"] == "study.yaml"
                assert row["params.`model.patch`"] == run.data.params["model.patch"]  # the grid's axis

            # The compare view (what the table's Compare button opens), side by side.
            ids = json.dumps([r.info.run_id for r in runs]).replace(" ", "")
            page.open(f"{uri}/#/compare-runs?runs={ids}&experiments=[\"{exp.experiment_id}\"]"
                      "&workflowType=machine_learning",
                      until="document.body.innerText.includes('Comparing 2 Runs') && "
                            "document.querySelectorAll('.ReactVirtualized__Grid').length >= 2")
            page.screenshot(tmp_path / "compare.png")
            text = page.text()
            assert all(name in text for name in names) and "model.patch" in text, text[:3000]
            table = page.compare_metrics()
            for key in ("val_loss", fd):  # shown rounded (4 significant digits)
                shown = [float(v) for v in table.get(key, [])]
                assert shown == pytest.approx([r.data.metrics[key] for r in runs], rel=2e-3, abs=1e-3), (key, table)
        finally:
            browser.close()
        t_ui = time.time() - t0 - t_server - t_trials
        for shot in ("runs.png", "compare.png"):
            dest = os.environ.get("DITSCALE_ARTIFACTS")
            if dest:
                Path(dest).mkdir(parents=True, exist_ok=True)
                shutil.copy2(tmp_path / shot, Path(dest) / f"mlflow-ui-{shot}")
        print(f"\nserver (and FD stand-in) {t_server:.0f} s, two trials {t_trials:.0f} s, browser {t_ui:.0f} s")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
