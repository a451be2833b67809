"""The shards a trial trains and validates on, as MLflow dataset inputs of its run.

MLflow's runs table has a Dataset column and its run page a Datasets panel; both show a run's dataset
inputs (https://mlflow.org/docs/latest/ml/dataset/): a name, a digest (same digest = same data), a
source (where the data lives) and, per input, the context it served in ("training", "validation").

Only the manifest (dataset.json, written by `ditscale data pack`) is read, never a shard: shards may
be large or remote, and the manifest already holds every shard's sha256. So the digest is a hash of
the split's shard sha256s, in the order the loader reads them (`manifest_digest`). Shards with no
manifest beside them (remote URLs, hand-made tars) get a hash of their URLs instead: it tells two
shard lists apart, not two contents of the same URLs; the input's `ditscale.digest_of` tag says which.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

CONTEXT_TAG = "mlflow.data.context"  # MLflow's own input tag for the context (mlflow.utils.mlflow_tags)
DIGEST_OF_TAG = "ditscale.digest_of"
DIGEST_OF_MANIFEST = "shard sha256 (dataset.json)"
DIGEST_OF_URLS = "shard URLs (no manifest beside the shards)"
DIGEST_LEN = 16  # MLflow stores at most 36 characters; its own datasets use 8

# (data field, split the loader reads from a dataset folder, MLflow context)
_ROLES = (("shards", "train", "training"), ("val_shards", "val", "validation"))


def manifest_digest(sha256s: list[str]) -> str:
    """The digest of a split whose manifest lists these shard sha256s (in loading order)."""
    return hashlib.sha256("\n".join(sha256s).encode()).hexdigest()[:DIGEST_LEN]


def describe_split(pattern: str, split: str) -> dict:
    """{name, digest, digest_of, source, shards, samples} of the shards `pattern` names, from their URLs and
    the manifest beside them. Expanding the pattern checks that local shards exist; nothing is opened."""
    from harness.data.shards import expand_shards, local_path, manifest_beside, shard_name

    urls = expand_shards(pattern, split)
    manifest, folder = manifest_beside(urls)
    listed = {s["name"]: s for part in (manifest or {}).get("splits", {}).values() for s in part["shards"]}
    entries = [listed.get(shard_name(url)) for url in urls]
    if manifest is not None and all(e is not None and e.get("sha256") for e in entries):
        digest, digest_of = manifest_digest([e["sha256"] for e in entries]), DIGEST_OF_MANIFEST
        counts = [e.get("count") for e in entries]
        samples = sum(counts) if all(c is not None for c in counts) else None
    else:
        digest = hashlib.sha256("\n".join(urls).encode()).hexdigest()[:DIGEST_LEN]
        digest_of, samples = DIGEST_OF_URLS, None
    base = Path(folder).name if folder else PurePosixPath(urlsplit(local_path(urls[0])).path).parent.name
    return {"name": f"{base or 'shards'}/{split}", "digest": digest, "digest_of": digest_of, "source": pattern,
            "shards": len(urls), "samples": samples}


def _source(uri: str):
    """MLflow's dataset source for a shard pattern: http(s) -> HTTPDatasetSource, s3://, gs://, ... ->
    that store's artifact source, a local path -> LocalArtifactDatasetSource. A `pipe:` command has no
    MLflow source type: its text is kept as a local source's URI, so the UI still shows it."""
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.sources import LocalArtifactDatasetSource

    if uri.startswith(("http://", "https://")):
        return HTTPDatasetSource(url=uri)
    if "://" in uri:
        from mlflow.data.dataset_source_registry import resolve_dataset_source

        try:
            return resolve_dataset_source(uri)
        except Exception:  # a scheme MLflow has no source for
            pass
    return LocalArtifactDatasetSource(uri)


def dataset_inputs(trial) -> list:
    """The trial's training (and, with data.val_shards, validation) shards as mlflow.entities.DatasetInput."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import Dataset, DatasetInput, InputTag

    from harness.credentials import redact

    inputs = []
    for field, split, context in _ROLES:
        pattern = getattr(trial.data, field)
        if not pattern:
            continue
        info = describe_split(pattern, split)
        # MetaDataset: a dataset known by its metadata only (MLflow's class for data it does not load).
        # redact: a shard URL's user-info (https://user:token@host/...) is no dataset source to keep.
        meta = MetaDataset(_source(redact(info["source"])), name=info["name"], digest=info["digest"]).to_dict()
        profile = {"num_shards": info["shards"]} | ({"num_rows": info["samples"]} if info["samples"] is not None else {})
        entity = Dataset(name=meta["name"], digest=meta["digest"], source_type=meta["source_type"],
                         source=meta["source"], schema=meta.get("schema"), profile=json.dumps(profile))
        inputs.append(DatasetInput(entity, tags=[InputTag(CONTEXT_TAG, context),
                                                 InputTag(DIGEST_OF_TAG, info["digest_of"])]))
    return inputs


def log_dataset_inputs(client, run_id: str, trial) -> None:
    """Log the trial's dataset inputs on its run; a failure is reported in one line and training goes on
    (the inputs describe the run, they are not needed to train it)."""
    from harness.credentials import redact

    def warn(err: Exception) -> None:
        print(redact(f"warning: the trial's datasets were not logged to MLflow run {run_id}: {type(err).__name__}: "
                     f"{err}"), flush=True)

    try:
        inputs = dataset_inputs(trial)
    except Exception as err:  # the shards cannot be described: retrying would not change that
        warn(err)
        return
    attempts = 4
    for attempt in range(attempts):
        try:
            if inputs:
                client.log_inputs(run_id, datasets=inputs)
            return
        except Exception as err:
            # Trials of a study log the same datasets; two that insert one at the same moment collide on
            # the store's unique (experiment, name, digest) and one fails. Once written, it is found: retry.
            if attempt == attempts - 1:
                warn(err)
                return
            time.sleep(0.5 * (attempt + 1))
