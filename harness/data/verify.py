"""`ditscale data verify DIR`: read every shard, decode every sample, check the manifest.

A shard passes when its sha256 matches dataset.json, every sample decodes to the manifest's shape
with every listed member, and its sample count matches. Missing shards, a missing manifest, corrupt
samples and hash or count mismatches all fail the check (the CLI exits 1).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from harness.data.errors import DataError
from harness.data.manifest import MANIFEST, read_manifest
from harness.data.sample import SampleSpec, decode_sample
from harness.data.tario import iter_samples


@dataclass
class ShardReport:
    name: str
    split: str | None
    good: int = 0
    corrupt: int = 0
    expected: int | None = None
    sha256: str | None = None
    sha256_ok: bool | None = None
    missing: bool = False
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.corrupt or self.sha256_ok is False or self.problems)


@dataclass
class VerifyResult:
    folder: str
    shards: list[ShardReport]
    problems: list[str]  # dataset-level: no manifest, unlisted shards, ...

    @property
    def ok(self) -> bool:
        return not self.problems and all(s.ok for s in self.shards)

    @property
    def good(self) -> int:
        return sum(s.good for s in self.shards)

    @property
    def corrupt(self) -> int:
        return sum(s.corrupt for s in self.shards)

    def lines(self) -> list[str]:
        width = max([len(s.name) for s in self.shards] + [10])
        out = []
        for s in self.shards:
            if s.missing:
                state = "MISSING"
            else:
                sha = {True: "sha256 ok", False: "sha256 MISMATCH", None: "sha256 not listed"}[s.sha256_ok]
                state = f"good {s.good:>7}  corrupt {s.corrupt:>5}  {sha}"
            notes = f"  ({'; '.join(s.problems)})" if s.problems else ""
            out.append(f"{s.name:<{width}}  {state}{notes}")
        out += [f"problem: {p}" for p in self.problems]
        bad = [s for s in self.shards if not s.ok]
        if self.ok:
            out.append(f"OK: {self.good} samples in {len(self.shards)} shards")
        else:
            out.append(f"FAILED: {len(bad)} of {len(self.shards)} shards have problems, {self.corrupt} corrupt or "
                       f"missing samples" + (f", {len(self.problems)} dataset problems" if self.problems else ""))
        return out


class _HashingReader:
    def __init__(self, f):
        self.f, self.hash = f, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.hash.update(data)
        return data

    def finish(self) -> str:
        while self.read(1 << 20):
            pass
        return self.hash.hexdigest()


def verify_shard(path: str, spec: SampleSpec, report: ShardReport, examples: int = 3) -> None:
    with open(path, "rb", buffering=1 << 20) as f:
        reader = _HashingReader(f)
        for sample in iter_samples(reader, check_headers=True):
            if sample.get("__error__") and sample["__key__"] is None:
                # damage between samples (a cut at a member boundary, a bad header): the samples it
                # took are counted below from dataset.json
                report.problems.append(sample["__error__"])
                continue
            try:
                decode_sample(sample, spec, strict=True)
                report.good += 1
            except Exception as err:  # noqa: BLE001 - every failure is a corrupt sample
                report.corrupt += 1
                if len([p for p in report.problems if p.startswith("sample")]) < examples:
                    key = sample.get("__key__")
                    report.problems.append(f"sample {key or '?'}: {err}")
        report.sha256 = reader.finish()
    if report.expected is not None and report.good + report.corrupt < report.expected:
        lost = report.expected - report.good - report.corrupt
        report.corrupt += lost
        report.problems.append(f"{lost} of {report.expected} samples missing")
    elif report.expected is not None and report.good + report.corrupt > report.expected:
        report.problems.append(f"{report.good + report.corrupt} samples, dataset.json says {report.expected}")


def verify_dataset(folder: str | os.PathLike, progress: bool | None = None) -> VerifyResult:
    from tqdm import tqdm

    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"{folder}: no such folder")
    manifest = read_manifest(root)
    problems = []
    reports: list[ShardReport] = []
    listed: set[str] = set()
    if manifest is None:
        problems.append(f"no {MANIFEST} (hashes and counts cannot be checked)")
        tars = sorted(p.name for p in root.glob("*.tar"))
        if not tars:
            raise DataError(f"{folder}: no {MANIFEST} and no .tar shards")
        reports = [ShardReport(name, None) for name in tars]
    else:
        for split, entry in manifest["splits"].items():
            total = 0
            for shard in entry["shards"]:
                reports.append(ShardReport(shard["name"], split, expected=shard.get("count")))
                listed.add(shard["name"])
                total += shard.get("count") or 0
            if entry.get("count") is not None and entry["count"] != total:
                problems.append(f"split {split}: count {entry['count']} but its shards list {total}")
        unlisted = sorted(p.name for p in root.glob("*.tar") if p.name not in listed)
        if unlisted:
            problems.append(f"{len(unlisted)} .tar file(s) not listed in {MANIFEST} (first: {unlisted[0]})")
    hashes = {s["name"]: s.get("sha256") for e in (manifest or {}).get("splits", {}).values() for s in e["shards"]}
    spec = SampleSpec.from_manifest(manifest, fields=frozenset((manifest or {}).get("fields", ())))
    for report in tqdm(reports, desc="verify", unit="shard", disable=None if progress is None else not progress):
        path = root / report.name
        if not path.is_file():
            report.missing = True
            report.corrupt = report.expected or 0
            continue
        verify_shard(str(path), spec, report)
        if hashes.get(report.name):
            report.sha256_ok = report.sha256 == hashes[report.name]
    return VerifyResult(str(root), reports, problems)
