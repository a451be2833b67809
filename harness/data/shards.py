"""Shard addresses: brace patterns, globs, local paths, `pipe:` commands and http(s) URLs.

`expand_shards` turns what a user wrote into a list of URLs and fails at once, with one line, when
nothing matches or local shards are missing. `open_shard` opens one URL for streaming.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import BinaryIO, Sequence

import braceexpand

from harness.data.errors import DataError
from harness.data.manifest import read_manifest, split_paths

REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://")


def is_remote(url: str) -> bool:
    return url.startswith(REMOTE_PREFIXES)


def local_path(url: str) -> str:
    return url[len("file:"):] if url.startswith("file:") else url


def absolute_path(pattern: str) -> str:
    """A local path or brace pattern made absolute (against the working directory); URLs unchanged."""
    if is_remote(pattern) or "://" in pattern:
        return pattern
    local = local_path(pattern)
    return local if os.path.isabs(local) else os.path.normpath(os.path.join(os.getcwd(), local))


def shard_urls(pattern: str) -> tuple[list[str], list[str]]:
    """Expand a brace pattern into (existing or remote URLs, missing local files). Remote and
    pipe: URLs are taken as given; local globs are expanded."""
    urls, missing = [], []
    for item in braceexpand.braceexpand(pattern):
        if is_remote(item):
            urls.append(item)
            continue
        local = local_path(item)
        if any(c in local for c in "*?["):
            urls.extend(sorted(glob.glob(local)))
        elif os.path.isfile(local):
            urls.append(local)
        else:
            missing.append(local)
    return urls, missing


def expand_shards(shards: str | os.PathLike | Sequence[str], split: str = "train") -> list[str]:
    """URLs of `shards`: a brace pattern ("data/train-{000000..000009}.tar"), a glob, a list of
    either, a `pipe:`/http(s) URL, or a dataset folder (its manifest's `split`)."""
    if isinstance(shards, (str, os.PathLike)):
        text = os.fspath(shards)
        if not is_remote(text) and os.path.isdir(local_path(text)):
            return _folder_shards(local_path(text), split)
        patterns = [text]
    else:
        patterns = [os.fspath(p) for p in shards]
    if not patterns or not all(patterns):
        raise DataError("no shards given")
    urls, missing = [], []
    for pattern in patterns:
        found, lost = shard_urls(pattern)
        if not found and not lost:
            raise DataError(f"no shard matches {pattern!r}")
        urls += found
        missing += lost
    if missing:
        total = len(urls) + len(missing)
        if total == 1:
            raise DataError(f"{missing[0]}: no such shard or dataset folder")
        raise DataError(f"{len(missing)} of {total} shards do not exist (first: {missing[0]})")
    return urls


def _folder_shards(folder: str, split: str) -> list[str]:
    manifest = read_manifest(folder)
    if manifest is not None:
        paths = split_paths(folder, manifest, split)
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise DataError(f"{len(missing)} of {len(paths)} {split} shards listed in {folder}/dataset.json "
                            f"do not exist (first: {missing[0]})")
        return paths
    paths = sorted(str(p) for p in Path(folder).glob(f"{split}-*.tar"))
    if not paths:
        raise DataError(f"{folder}: no dataset.json and no {split}-*.tar shards")
    return paths


def open_shard(url: str, bufsize: int = 1 << 20) -> BinaryIO:
    """A binary stream of one shard: a local file, or webdataset's gopen for pipe:/http(s)/cloud URLs."""
    if not is_remote(url):
        return open(local_path(url), "rb", buffering=bufsize)
    from webdataset.gopen import gopen

    return gopen(url, "rb", bufsize=bufsize)


def shard_name(url: str) -> str:
    """The file name of a shard URL (for manifest look-ups and messages)."""
    text = url
    if text.startswith("pipe:"):
        words = [w for w in text[5:].split() if w.endswith((".tar", ".tgz", ".tar.gz"))]
        text = words[-1] if words else text
    return text.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0]


def manifest_of_shards(pattern: str) -> dict:
    """The dataset.json beside the first local shard matching `pattern` (read by
    harness.data.manifest.read_manifest, the one schema-checked reader); {} for remote shards or when
    there is none."""
    manifest, _ = manifest_beside(shard_urls(pattern)[0])
    return manifest or {}


def manifest_beside(urls: list[str]) -> tuple[dict | None, str | None]:
    """(manifest, folder) of the dataset.json beside the first local shard, else (None, None)."""
    for url in urls:
        if not is_remote(url):
            folder = str(Path(local_path(url)).parent)
            return read_manifest(folder), folder
    return None, None
