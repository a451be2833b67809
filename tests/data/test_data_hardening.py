"""Data hardening (issue 18, the data rows): `pack --overwrite` deletes only its own shards inside OUT
and survives Ctrl-C, a full disk is one line with nothing partial left, damaged tar headers and
shards cut at a member boundary are corrupt data (never an allocation, never a pass), and one
schema-checked reader of dataset.json. Real shards, real `ditscale` processes, a real small tmpfs."""

import functools
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

import harness
from harness.data import DataError, make_loader, pack_dataset

ROOT = Path(harness.__file__).resolve().parents[1]  # the ditscale the subprocesses run: the one imported here


def _ditscale(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def _in_process(capsys, *args: str) -> subprocess.CompletedProcess:
    """The same command in this process (torch and torchvision are imported once, not per command)."""
    from harness.cli import main

    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def _pack_small(out: Path, count: int = 30, shard_size: int = 10, val_fraction: float = 0.0) -> dict:
    return pack_dataset("shapes", str(out), image_size=8, count=count, shard_size=shard_size,
                        val_fraction=val_fraction, progress=False)


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _edit_manifest(folder: Path, edit) -> None:
    path = folder / "dataset.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


# --- row 1: --overwrite deletes only the split's own shards inside OUT ---------------------------

def test_overwrite_never_deletes_files_the_manifest_names_outside_out(tmp_path):
    out = tmp_path / "out"
    _pack_small(out)
    outside, absolute = tmp_path / "x", tmp_path / "elsewhere" / "victim.tar"
    absolute.parent.mkdir()
    for victim in (outside, absolute, out / "notes.tar"):
        victim.write_text("keep me")
    pack = ("data", "pack", "shapes", str(out), "--image-size", "8", "--count", "20", "--shard-size", "10",
            "--val-fraction", "0", "--overwrite")

    for name in ("../x", str(absolute), "notes.tar"):
        shards_before = _snapshot(out)
        _edit_manifest(out, lambda m, n=name: m["splits"]["train"]["shards"].append({"name": n, "count": 1}))
        line = _one_line_error(_ditscale(*pack))
        assert "train" in line and name in line, line
        assert outside.read_text() == absolute.read_text() == (out / "notes.tar").read_text() == "keep me"
        assert _snapshot(out).keys() == shards_before.keys()  # nothing deleted, nothing written
        _edit_manifest(out, lambda m: m["splits"]["train"]["shards"].pop())

    # a sound manifest: the old split's shards go (3 -> 2), everything else in OUT stays
    (out / "eval").mkdir()
    (out / "eval" / "stats.npz").write_bytes(b"cache")
    proc = _ditscale(*pack)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.glob("train-*")) == ["train-000000.tar", "train-000001.tar"]
    assert (out / "notes.tar").exists() and (out / "eval" / "stats.npz").read_bytes() == b"cache"
    assert outside.exists() and absolute.exists()


# --- row 2: Ctrl-C during --overwrite leaves the old dataset as it was -------------------------

def _wait_for_new_shard(tmp_path: Path, out: Path, old: dict, proc: subprocess.Popen, limit: float = 90) -> None:
    """Until a shard of the new pack is complete: in a scratch folder, or (the old code) in OUT."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        scratch = list(tmp_path.glob(".*/*.tar")) + list(out.glob(".*/*.tar"))
        if scratch or set(os.listdir(out)) != set(old):  # the old code deleted the old shards first
            return
        time.sleep(0.05)
    raise AssertionError("the pack wrote no shard in time")


def _start_pack(out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    # Ctrl-C in a terminal: SIGINT with its default action. A test run started in the background by a
    # non-interactive shell (`pytest ... &`) inherits SIGINT ignored, and Python then never raises
    # KeyboardInterrupt (the pack would run on): give the child the terminal's disposition.
    return subprocess.Popen([sys.executable, "-m", "harness.cli", "data", "pack", "shapes", str(out),
                             "--image-size", "8", "--count", "1000000", "--shard-size", "40", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


# SIGTERM (issue 26): `kill` or a scheduler's time limit; its default action killed the pack before the
# scratch folder (.out.*.partial, 164 MB in the report) was removed.
@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_ctrl_c_or_sigterm_during_overwrite_leaves_the_old_dataset_intact(tmp_path, sig, code, word):
    out = tmp_path / "out"
    _pack_small(out, val_fraction=0.1)
    old = _snapshot(out)
    proc = _start_pack(out, "--overwrite")
    try:
        _wait_for_new_shard(tmp_path, out, old, proc)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    lines = stderr.strip().splitlines()
    assert proc.returncode == code and len(lines) == 1 and word in lines[0], stderr
    assert "Traceback" not in stderr
    assert _snapshot(out) == old  # byte-identical, manifest included
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the scratch folder is gone


def test_a_killed_packs_scratch_folder_is_removed_by_the_next_pack_and_no_other(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    proc = _start_pack(out)
    try:
        _wait_for_new_shard(tmp_path, out, {}, proc)
    finally:
        proc.kill()  # SIGKILL: no cleanup can run
        proc.communicate()
    (left,) = tmp_path.glob(".out.*.partial")
    pack = ("data", "pack", "shapes", str(out), "--image-size", "8", "--count", "20", "--val-fraction", "0")
    proc = _in_process(capsys, *pack)
    assert proc.returncode == 0, proc.stderr
    assert not left.exists(), "the killed pack's scratch folder was left"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    # Not provably dead, so kept: a folder without an owner file (an older version's, or one being
    # made), and one whose owner is alive (this process), as a concurrent pack's would be.
    from harness.files import OWNER_FILE, _this_process

    no_owner, alive = tmp_path / ".out.nomarker.partial", tmp_path / ".out.alive.partial"
    no_owner.mkdir()
    alive.mkdir()
    (alive / OWNER_FILE).write_text(json.dumps(_this_process()))
    proc = _in_process(capsys, *pack, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.alive.partial", ".out.nomarker.partial", "out"]


# --- row 3: a full disk is one line, and nothing partial is left -------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A real 512 KiB filesystem (tmpfs), unmounted afterwards; skipped where mounting is not allowed."""
    mount = tmp_path / "small"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_disk_full_is_one_line_naming_the_folder_and_leaves_no_partial_files(small_disk):
    out = small_disk / "out"
    proc = _ditscale("data", "pack", "shapes", str(out), "--image-size", "32", "--count", "2000",
                     "--shard-size", "50")
    line = _one_line_error(proc)
    assert str(out) in line and "disk full" in line and "free" in line, line
    assert list(small_disk.rglob("*")) == []  # no shard, no .partial, no scratch folder


# --- row 4: a huge size in a tar header is a corrupt sample, never an allocation ---------------

def _set_member_size(shard: Path, index: int, size_field: bytes) -> str:
    """Rewrite the size field of the index-th member's header (checksum fixed, so only the size lies)."""
    with tarfile.open(shard) as tar:
        member = tar.getmembers()[index]
    with open(shard, "r+b") as f:
        f.seek(member.offset)
        header = bytearray(f.read(512))
        header[124:136] = size_field
        header[148:156] = b" " * 8
        header[148:156] = b"%06o\0 " % sum(header)
        f.seek(member.offset)
        f.write(bytes(header))
    return member.name.split(".")[0]


def test_huge_member_sizes_are_corrupt_samples_in_verify_bench_and_the_loader(tmp_path, capsys):
    out = tmp_path / "out"
    _pack_small(out)
    # 8 GB in the usual 11 octal digits; 2^88 in GNU base-256
    _set_member_size(out / "train-000001.tar", 8, b"%011o\0" % 8_000_000_000)  # sample 2's first member
    _set_member_size(out / "train-000002.tar", 8, bytes([0x81]) + bytes(11))

    verify = _in_process(capsys, "data", "verify", str(out), "--json")
    assert verify.returncode == 1 and "Traceback" not in verify.stderr, verify.stderr
    shards = {s["name"]: s for s in json.loads(verify.stdout)["shards"]}
    assert shards["train-000000.tar"]["corrupt"] == 0
    # samples 0 and 1 read; the lying header ends each shard: 8 of its 10 samples are counted corrupt
    assert shards["train-000001.tar"]["corrupt"] == shards["train-000002.tar"]["corrupt"] == 8

    bench = _in_process(capsys, "data", "bench", str(out), "--seconds", "0.3", "--batch-size", "8", "--shuffle", "0",
                        "--json")
    assert bench.returncode == 0 and "Traceback" not in bench.stderr, bench.stderr
    assert json.loads(bench.stdout)["corrupt"] > 0

    loader = make_loader(out, 8, resampled=False, shuffle=0, partial=True)
    seen = sum(len(batch["x"]) for batch in loader)
    assert seen == 30 - 16 and loader.corrupt == 16


# --- row 5: a shard cut exactly at a member boundary is truncated ------------------------------

def test_a_shard_cut_at_a_member_boundary_is_reported_truncated(tmp_path, capsys):
    out = tmp_path / "out"
    _pack_small(out)
    shard = out / "train-000002.tar"
    with tarfile.open(shard) as tar:
        last = tar.getmembers()[-1]
    os.truncate(shard, last.offset_data + (-last.size % 512) + last.size)  # every sample whole, no end blocks
    # a hand-written manifest (counts, no hashes): the count still matches
    _edit_manifest(out, lambda m: [s.pop("sha256") for s in m["splits"]["train"]["shards"]])
    proc = _in_process(capsys, "data", "verify", str(out))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("train-000002.tar"))
    assert "truncated" in line and "end-of-archive" in line, proc.stdout
    assert "FAILED" in proc.stdout


# --- row 6: one schema-checked manifest reader ---------------------------------------------------

def test_a_malformed_manifest_is_one_line_naming_the_field_and_nothing_outside_is_read(tmp_path, capsys):
    from harness.data.shards import manifest_of_shards as trial_manifest

    out = tmp_path / "out"
    _pack_small(out)
    good = (out / "dataset.json").read_text()
    shard = lambda name: {"splits": {"train": {"shards": [{"name": name, "count": 10}]}}}
    cases = {
        json.dumps(shard("../../etc/passwd")): "splits.train.shards.0.name: '../../etc/passwd' is not a plain file",
        json.dumps({"splits": {"train": {"shards": [{"count": 10}]}}}): "splits.train.shards.0.name: Field required",
        json.dumps({"splits": "oops"}): "splits: Input should be a valid dictionary",
        json.dumps(shard("/etc/passwd")): "splits.train.shards.0.name: '/etc/passwd' is not a plain file",
        json.dumps({**json.loads(good), "sample_shape": [3, "x", 8]}): "sample_shape.1:",
        "{not json": "unreadable manifest",
        "[1, 2]": "a JSON list",
    }
    for i, (text, expected) in enumerate(cases.items()):
        (out / "dataset.json").write_text(text)
        run = _ditscale if i == 0 else functools.partial(_in_process, capsys)  # one real process is enough
        line = _one_line_error(run("data", "verify", str(out)))
        assert "dataset.json: " in line and expected in line, line
        for read in (lambda: trial_manifest(str(out / "train-*.tar")), lambda: make_loader(out, 8)):
            with pytest.raises(DataError, match="dataset.json: ") as err:
                read()
            assert expected in str(err.value)
    (out / "dataset.json").write_text(good)
    assert _in_process(capsys, "data", "verify", str(out)).returncode == 0
