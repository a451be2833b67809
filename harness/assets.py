"""Offline weights: the Inception network clean-fid uses for FID, the networks of FD_DINOv2 and CMMD,
VAEs and text encoders.

Compute nodes of a cluster often have no internet. `ditscale assets fetch --dest DIR` (on a login
node) downloads what evaluation needs into an *assets folder*; trials read it from

    resources.assets  >  $DITSCALE_ASSETS  >  ~/.cache/ditscale/assets

Layout of an assets folder:

    inception-2015-12-05.pt        clean-fid's TorchScript Inception-v3 (the FID of record)
    vae/<name>/                    diffusers AutoencoderKL folders (save_pretrained), by hub name
    text/<name>/                   Hugging Face snapshots of text encoders, by hub name
    metrics/<name>/                feature networks of eval.metrics beyond FID (fd_dinov2, cmmd): Hugging
                                   Face folders (config.json + weights) at a pinned revision, by hub name

clean-fid looks for its Inception file in one hard-coded place (/tmp; ./ on Windows) and downloads
it when absent. `find_inception` copies the file from the assets folder to that place once per node
(a file lock keeps the ranks of a node from racing; the copy is written under a temporary name and
renamed, so nobody ever loads half a file), and never downloads unless asked to.

Every Inception file is checked against the pinned sha256 of clean-fid's inception-2015-12-05.pt
before it is used, placed or kept by `assets fetch`: /tmp is shared, and "FID" from any other network
would be a wrong number with the right name. The assets folder's copy is preferred; a file whose hash
does not match is an error naming it, never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
from pathlib import Path

from filelock import FileLock

from harness.errors import UserError
from harness.files import atomic_copy, atomic_folder

INCEPTION_FILE = "inception-2015-12-05.pt"
# clean-fid's own address (cleanfid.downloads_helper.inception_url), copied to avoid importing it here.
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
# sha256 of the file at INCEPTION_URL (95,607,719 bytes), as pinned by crowsonkb/k-diffusion
# (k_diffusion/evaluation.py, InceptionV3FeatureExtractor: the same URL with this digest) and by the
# Git LFS pointer of a Hugging Face copy of inception-2015-12-05.pt (oid sha256, size 95607719).
INCEPTION_SHA256 = "f58cb9b6ec323ed63459aa4fb441fe750cfe39fafad6da5cb504a16f19e958f4"
ASSETS_ENV = "DITSCALE_ASSETS"
DOWNLOAD_ENV = "DITSCALE_ALLOW_DOWNLOAD"  # "1": evaluation may download missing Inception weights itself


def assets_dir(configured: str | os.PathLike | None = None) -> Path:
    """The assets folder: `configured` (resources.assets), else $DITSCALE_ASSETS, else the user cache."""
    chosen = configured or os.environ.get(ASSETS_ENV)
    if chosen:
        return Path(chosen).expanduser().resolve()
    return Path.home() / ".cache" / "ditscale" / "assets"


def cleanfid_dir() -> Path:
    """Where clean-fid's feature_extractor() looks for (and would download) the Inception file."""
    return Path("./" if platform.system() == "Windows" else "/tmp")


def download_allowed() -> bool:
    return os.environ.get(DOWNLOAD_ENV, "").strip().lower() in ("1", "true", "yes")


def file_lock(path: str | os.PathLike) -> FileLock:
    """An exclusive lock on `path` (created, with its folder, if needed): one holder per node at a time."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path))


def download(url: str, dst: str | os.PathLike, sha256: str | None = None) -> Path:
    """url -> dst through torch.hub's downloader (a temporary file moved into place at the end;
    with `sha256`, a file whose hash does not start with it is refused). file:// URLs work too."""
    # torch only when something is downloaded: this module is read at `ditscale` start-up.
    from torch.hub import download_url_to_file

    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    download_url_to_file(url, str(dst), hash_prefix=sha256, progress=sys.stderr.isatty())
    return dst


def file_sha256(path: str | os.PathLike) -> str:
    """The file's sha256, read afresh each time (~0.2 s for Inception's 96 MB, once per evaluator)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _inception_ok(path: Path) -> bool | None:
    """None: no file there; True: clean-fid's Inception (its sha256 matches); False: something else."""
    if not path.is_file():
        return None
    try:
        return file_sha256(path) == INCEPTION_SHA256
    except OSError:
        return False


def _not_inception(path: Path) -> UserError:
    try:
        got = f"sha256 {file_sha256(path)[:16]}…"
    except OSError as err:
        got = f"unreadable: {err.strerror or err}"
    return UserError(f"{path} is not clean-fid's Inception weights ({got}, expected {INCEPTION_SHA256[:16]}…); "
                     f"FID is never computed from it: delete it, then `ditscale assets fetch --dest DIR`")


def find_inception(assets: str | os.PathLike | None = None, *, place: bool = True,
                   target_dir: str | os.PathLike | None = None, allow_download: bool | None = None) -> Path | None:
    """The Inception file to load (its sha256 checked), or None when it is nowhere to be found.

    The assets folder's copy is preferred: with `place` it is copied to where clean-fid looks
    (`target_dir`, default /tmp; once per node, under a lock) so that clean-fid's own functions find it
    too, replacing anything else there; when that place is not writable the assets copy is used where
    it is. Without one, a verified file already where clean-fid looks is used. With `allow_download`
    (default: $DITSCALE_ALLOW_DOWNLOAD=1) a missing file is downloaded there (hash checked); otherwise
    nothing is ever downloaded. A file whose sha256 is not INCEPTION_SHA256 is a UserError naming it."""
    target = Path(target_dir) if target_dir is not None else cleanfid_dir()
    placed = target / INCEPTION_FILE
    source = assets_dir(assets) / INCEPTION_FILE
    have_source = _inception_ok(source)
    if have_source is False:
        raise _not_inception(source)
    if have_source:
        if not place:
            return source
        if _inception_ok(placed):
            return placed
        try:
            with file_lock(target / f"{INCEPTION_FILE}.lock"):
                if not _inception_ok(placed):  # another rank of this node may have copied it meanwhile
                    atomic_copy(source, placed)
            return placed if _inception_ok(placed) else source
        except OSError:
            return source
    found = _inception_ok(placed)
    if found:
        return placed
    if found is False:
        raise _not_inception(placed)
    if allow_download if allow_download is not None else download_allowed():
        with file_lock(target / f"{INCEPTION_FILE}.lock"):
            if not _inception_ok(placed):
                download(INCEPTION_URL, placed, sha256=INCEPTION_SHA256)
        return placed
    return None


def missing_inception_hint(assets: str | os.PathLike | None = None) -> str:
    return (f"run `ditscale assets fetch --dest DIR` on a machine with internet, then point resources.assets "
            f"or ${ASSETS_ENV} at DIR (looked in {cleanfid_dir() / INCEPTION_FILE} and "
            f"{assets_dir(assets) / INCEPTION_FILE})")


# --- VAEs and text encoders ---------------------------------------------------------------------


def safe_name(name: str) -> str:
    """A hub name as one folder name: stabilityai/sd-vae-ft-ema -> stabilityai--sd-vae-ft-ema."""
    return name.strip("/").replace("/", "--")


def resolve_vae(name: str, assets: str | os.PathLike | None = None) -> str:
    """A VAE spec from a manifest -> what to load: the path itself when it exists, else the assets
    folder's copy (vae/<name>), else the name unchanged (diffusers then follows Hugging Face's own
    cache and HF_HUB_OFFLINE settings)."""
    if Path(name).expanduser().exists():
        return str(Path(name).expanduser())
    local = assets_dir(assets) / "vae" / safe_name(name)
    return str(local) if local.is_dir() else name


def resolve_text_encoder(name: str, assets: str | os.PathLike | None = None) -> str:
    """As resolve_vae, for a text encoder's (or an SD3 pipeline's) folder: text/<name>."""
    if Path(name).expanduser().exists():
        return str(Path(name).expanduser())
    local = assets_dir(assets) / "text" / safe_name(name)
    return str(local) if local.is_dir() else name


def resolve_text_spec(spec: str, assets: str | os.PathLike | None = None) -> str:
    """A text-encoder spec (clip:NAME, t5:NAME, sd3:L,G,T5 or sd3:PIPELINE) with every hub name that
    the assets folder holds replaced by that folder; word:FILE and local paths are left as they are."""
    kind, sep, rest = spec.partition(":")
    if not sep or kind.strip().lower() not in ("clip", "t5", "sd3"):
        return spec
    return f"{kind}:" + ",".join(resolve_text_encoder(part.strip(), assets) for part in rest.split(","))


# --- `ditscale assets fetch` ------------------------------------------------------------------------


def fetch_inception(dest: str | os.PathLike, url: str = INCEPTION_URL, force: bool = False) -> Path:
    """clean-fid's Inception file -> DEST (a copy already there is kept only when its sha256 matches;
    a download whose sha256 does not match is refused and leaves nothing behind)."""
    path = Path(dest) / INCEPTION_FILE
    if not force and _inception_ok(path):
        return path
    try:
        return download(url, path, sha256=INCEPTION_SHA256)
    except RuntimeError as err:  # torch.hub: the downloaded file's hash does not match
        raise UserError(f"assets fetch: {url} is not clean-fid's Inception weights ({err}); nothing was saved "
                        f"(a mirror must serve the same file: sha256 {INCEPTION_SHA256})") from None
    except OSError as err:
        raise UserError(f"assets fetch: cannot download the Inception weights from {url} ({err}); run it where "
                        f"there is internet, or copy inception-2015-12-05.pt (sha256 {INCEPTION_SHA256}) "
                        "into the folder") from None


def fetch_vae(name: str, dest: str | os.PathLike) -> Path:
    """A diffusers AutoencoderKL by hub name (or a pipeline with a vae/ subfolder) -> DEST/vae/<name>."""
    out = Path(dest) / "vae" / safe_name(name)
    if (out / "config.json").is_file():
        return out
    try:
        from diffusers import AutoencoderKL

        try:
            vae = AutoencoderKL.from_pretrained(name)
        except Exception:  # noqa: BLE001 - a pipeline repository keeps the VAE in vae/
            vae = AutoencoderKL.from_pretrained(name, subfolder="vae")
    except Exception as err:  # noqa: BLE001 - hub/network errors come in many types
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"assets fetch --vae {name}: cannot download an AutoencoderKL ({first})") from None
    with atomic_folder(out) as tmp:
        vae.save_pretrained(tmp)
    return out


def fetch_text_encoder(name: str, dest: str | os.PathLike) -> Path:
    """A Hugging Face repository (weights, tokenizer, config) -> DEST/text/<name>."""
    out = Path(dest) / "text" / safe_name(name)
    if out.is_dir() and any(out.iterdir()):
        return out
    try:
        from huggingface_hub import snapshot_download

        with atomic_folder(out) as tmp:
            snapshot_download(repo_id=name, local_dir=str(tmp),
                              allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "spiece*", "*.tiktoken"])
    except Exception as err:  # noqa: BLE001
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"assets fetch --text-encoder {name}: cannot download it ({first})") from None
    return out


# --- feature networks of eval.metrics (FD_DINOv2, CMMD) ---------------------------------------------

# metric -> (hub name, the publisher's git revision on the Hugging Face hub, what it is). A revision is a
# commit: it fixes every file's Git LFS pointer, i.e. its sha256, so a fetch at it gets the same bytes
# wherever it runs. Revisions: facebook/dinov2-large as pinned by embeddings-benchmark/mteb's model
# table; openai/clip-vit-large-patch14-336 at its last (2022) commit, the snapshot LLaVA-1.5 loads.
METRIC_WEIGHTS = {
    "fd_dinov2": ("facebook/dinov2-large", "47b73eefe95e8d44ec3623f8890bd894b6ea2d6c", "DINOv2 ViT-L/14"),
    "cmmd": ("openai/clip-vit-large-patch14-336", "ce19dc912ca5cd21c8a653c79e251e808ccabcd1", "CLIP ViT-L/14@336"),
}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # what transformers' from_pretrained loads, in order
FETCHED_FILE = "ditscale-fetched.json"  # written by `assets fetch`: hub name and revision of the folder


def metric_weights_dir(metric: str, assets: str | os.PathLike | None = None) -> Path:
    """Where eval.metrics' `metric` network lives: <assets>/metrics/<hub name>."""
    return assets_dir(assets) / "metrics" / safe_name(METRIC_WEIGHTS[metric][0])


def find_metric_weights(metric: str, assets: str | os.PathLike | None = None) -> Path | None:
    """The folder of `metric`'s network when it holds a config and weights transformers can load, else None."""
    folder = metric_weights_dir(metric, assets)
    if (folder / "config.json").is_file() and any((folder / name).is_file() for name in WEIGHT_FILES):
        return folder
    return None


def missing_metric_weights(metric: str, assets: str | os.PathLike | None = None) -> str:
    """One line: which metric, which folder is missing what, and the command that fills it."""
    name, _, what = METRIC_WEIGHTS[metric]
    return (f"eval.metrics: {metric} needs the {what} weights ({name}) in {metric_weights_dir(metric, assets)} "
            f"(config.json and {' or '.join(WEIGHT_FILES)}), which is missing; run `ditscale assets fetch "
            f"--dest DIR --metric {metric}` on a machine with internet and point resources.assets or "
            f"${ASSETS_ENV} at DIR")


def write_fetched(folder: str | os.PathLike, name: str, revision: str) -> None:
    """FETCHED_FILE in `folder`: the hub repository and revision `assets fetch` put there (JSON, so any
    name or revision string round-trips; `assets status` reads it back with read_fetched)."""
    (Path(folder) / FETCHED_FILE).write_text(json.dumps({"name": name, "revision": revision}) + "\n")


def read_fetched(folder: str | os.PathLike) -> dict:
    """What write_fetched wrote in `folder`; {} for a folder placed by hand (no record) or an unreadable one."""
    try:
        return json.loads((Path(folder) / FETCHED_FILE).read_text())
    except (OSError, ValueError):
        return {}


def fetch_metric_weights(metric: str, dest: str | os.PathLike) -> Path:
    """`metric`'s network at its pinned revision -> DEST/metrics/<hub name> (config, preprocessor config,
    one weights file: safetensors when the revision has it)."""
    name, revision, _ = METRIC_WEIGHTS[metric]
    out = Path(dest) / "metrics" / safe_name(name)
    if find_metric_weights(metric, dest) is not None:
        return out
    try:
        from huggingface_hub import HfApi, snapshot_download

        files = set(HfApi().list_repo_files(name, revision=revision))
        weights = next(f for f in WEIGHT_FILES if f in files)
        with atomic_folder(out) as tmp:
            snapshot_download(repo_id=name, revision=revision, local_dir=str(tmp),
                              allow_patterns=["config.json", "preprocessor_config.json", weights])
            write_fetched(tmp, name, revision)
    except StopIteration:
        raise UserError(f"assets fetch --metric {metric}: {name}@{revision} has none of {WEIGHT_FILES}") from None
    except Exception as err:  # noqa: BLE001 - hub/network errors come in many types
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"assets fetch --metric {metric}: cannot download {name}@{revision[:10]} ({first})") from None
    return out
