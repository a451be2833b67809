"""Data: packing every kind of source into real WebDataset tars, the streaming loader across ranks and
workers, damaged shards, `ditscale data pack|verify|bench`. Small sizes; nothing is downloaded."""

import functools
import http.server
import io
import json
import os
import shutil
import subprocess
import tarfile
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from harness.cli import main as cli_main
from harness.data import DataError, make_loader, pack_dataset, verify_dataset
from harness.data.builtin import DIGIT_NAMES, SHAPE_NAMES, load_digits_images, shapes_attributes
from harness.data.codec import decode_npy
from harness.data.images import center_crop_arr
from harness.data.manifest import read_manifest
from harness.data.tario import iter_samples
from harness.data.throughput import measure_loader_throughput


def _all(loader):
    """Every batch of a finite pass, concatenated: (x, keys, labels or None, captions or None, corrupt)."""
    xs, keys, labels, captions, corrupt = [], [], [], [], 0
    for batch in loader:
        xs.append(batch["x"])
        keys += batch["key"]
        labels += batch["cls"].tolist() if "cls" in batch else []
        captions += batch.get("txt", [])
        corrupt += batch["corrupt"]
    return torch.cat(xs) if xs else None, keys, labels, captions, corrupt


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    pack_dataset("digits", str(out), image_size=16, shard_size=400, progress=False)
    return out


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    pack_dataset("shapes", str(out), image_size=16, count=120, shard_size=25, seed=3, progress=False)
    return out


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """An ImageNet-layout folder (3 classes, odd sizes and modes, PNG and JPEG) and caption files."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    rows = []
    for c, name in enumerate(["cat", "dog", "red_fox"]):
        (root / "images" / name).mkdir(parents=True)
        for i in range(4):
            h, w = int(rng.integers(20, 60)), int(rng.integers(20, 60))
            array = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
            mode, ext = [("RGB", "png"), ("RGBA", "png"), ("L", "jpg"), ("RGB", "jpeg")][i]
            image = Image.fromarray(array).convert(mode)
            path = root / "images" / name / f"{name}_{i}.{ext}"
            image.save(path)
            rows.append({"image": f"images/{name}/{path.name}", "caption": f"photo {i} of a {name}", "label": name})
    (root / "images" / "notes.txt").write_text("not a class folder")
    with open(root / "captions.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps({"path": row["image"], "text": row["caption"]}) + "\n")
    with open(root / "captions.csv", "w") as f:
        f.write("image,caption,label\n" + "".join(f"{r['image']},{r['caption']},{r['label']}\n" for r in rows))
    return root


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    diffusers = pytest.importorskip("diffusers")
    path = tmp_path_factory.mktemp("vae")
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=16, scaling_factor=0.5, shift_factor=0.1,
    )
    vae.save_pretrained(path)
    return path


# --- packing and round trips --------------------------------------------------------------------

def test_center_crop_is_the_adm_recipe():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 500, 3), dtype=np.uint8))
    out = center_crop_arr(image, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    # 500x300 -> BOX halvings while the short side >= 128: 250x150, 125x75 -> bicubic to 107x64 -> centre crop.
    expected = image.resize((250, 150), Image.BOX).resize((125, 75), Image.BOX).resize((107, 64), Image.BICUBIC)
    assert np.array_equal(out, np.asarray(expected)[:, 21:85])


def test_digits_round_trip(digits):
    m = read_manifest(digits)
    assert m["counts"] == {"train": 1707, "val": 90} and m["kind"] == "pixels" and m["sample_shape"] == [1, 16, 16]
    assert m["class_names"] == list(DIGIT_NAMES) and m["fields"] == ["cls", "png", "txt"]
    assert len(m["splits"]["train"]["shards"]) == 5 and m["splits"]["train"]["pattern"] == "train-{000000..000004}.tar"
    x, keys, labels, captions, corrupt = _all(make_loader(digits, 128, resampled=False, shuffle=0))
    assert len(keys) == len(set(keys)) == 1707 and corrupt == 0
    assert x.shape == (1707, 1, 16, 16) and x.min() == -1 and x.max() == 1
    assert all(c == f"a handwritten digit {DIGIT_NAMES[label]}" for c, label in zip(captions, labels))
    images, targets = load_digits_images(16)
    i = int(keys[0])
    assert labels[0] == targets[i]
    assert torch.allclose(x[0, 0], torch.from_numpy(images[i, :, :, 0]).float() / 127.5 - 1, atol=1e-6)
    _, val_keys, *_ = _all(make_loader(digits, 64, resampled=False, split="val", shuffle=0))
    assert len(val_keys) == 90 and not set(val_keys) & set(keys)


def test_shapes_are_deterministic_and_carry_their_attributes(shapes, tmp_path):
    again = tmp_path / "again"
    pack_dataset("shapes", str(again), image_size=16, count=120, shard_size=25, seed=3, progress=False)
    first, second = read_manifest(shapes), read_manifest(again)
    for split in ("train", "val"):  # byte-identical shards (same sha256)
        assert first["splits"][split]["shards"] == second["splits"][split]["shards"]
    assert first["counts"] == {"train": 114, "val": 6} and first["fields"] == ["cls", "json", "png", "txt"]
    with open(shapes / "train-000000.tar", "rb") as f:
        samples = list(iter_samples(f))
    templates = set()
    for s in samples:
        attrs = json.loads(s["json"])
        assert attrs == shapes_attributes(3, int(s["__key__"]))
        assert s["txt"].decode() == attrs["caption"]
        assert int(s["cls"]) == SHAPE_NAMES.index(attrs["objects"][0]["shape"])
        assert len(attrs["objects"]) == attrs["count"]
        templates.add(attrs["template"])
        if attrs["relation"] in ("left of", "right of"):
            a, b = attrs["objects"]
            assert (a["x"] < b["x"]) == (attrs["relation"] == "left of") and abs(a["y"] - b["y"]) < 1 / 3
    assert templates == {"single", "count", "relation"}
    x, keys, labels, captions, _ = _all(make_loader(shapes, 32, resampled=False, conditioning="text"))
    assert x.shape == (114, 3, 16, 16) and len(set(keys)) == 114 and len(captions) == 114


def test_image_folder_round_trip(photos, tmp_path):
    out = tmp_path / "folder"
    m = pack_dataset(str(photos / "images"), str(out), image_size=16, val_fraction=0.25, progress=False, workers=2)
    assert m["class_names"] == ["cat", "dog", "red_fox"] and m["num_classes"] == 3 and m["sample_shape"] == [3, 16, 16]
    assert m["counts"] == {"train": 9, "val": 3}
    x, keys, labels, captions, _ = _all(make_loader(out, 4, resampled=False))
    assert x.shape == (9, 3, 16, 16) and x.dtype == torch.float32
    assert all(c == ["cat", "dog", "red fox"][label] for c, label in zip(captions, labels))
    with open(out / "train-000000.tar", "rb") as f:
        sample = next(iter_samples(f))
    path = photos / "images" / json.loads(sample["json"])["path"]
    expected = center_crop_arr(Image.open(path).convert("RGB"), 16)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(sample["png"]))), expected)


@pytest.mark.parametrize("name", ["captions.jsonl", "captions.csv"])
def test_caption_file_round_trip(photos, tmp_path, name):
    out = tmp_path / "captions"
    m = pack_dataset(str(photos / name), str(out), image_size=8, val_fraction=0, progress=False)
    x, keys, labels, captions, _ = _all(make_loader(out, 5, resampled=False, conditioning="text"))
    assert x.shape == (12, 3, 8, 8) and sorted(captions) == sorted(f"photo {i} of a {n}" for n in
                                                                    ["cat", "dog", "red_fox"] for i in range(4))
    if name.endswith(".csv"):  # string labels -> sorted class names
        assert m["class_names"] == ["cat", "dog", "red_fox"]
        assert all(["cat", "dog", "red_fox"][label] in c for c, label in zip(captions, labels))
    else:
        assert m["num_classes"] is None and "cls" not in m["fields"]
        with pytest.raises(DataError, match="no class labels"):
            make_loader(out, 5, conditioning="class")


def test_vae_latents_round_trip(tiny_vae, tmp_path):
    from diffusers import AutoencoderKL

    out = tmp_path / "latents"
    m = pack_dataset("shapes", str(out), image_size=16, count=24, val_fraction=0, vae=str(tiny_vae), progress=False)
    assert m["kind"] == "latents" and m["sample_shape"] == [4, 8, 8] and "latent.npy" in m["fields"]
    assert m["vae"]["scaling_factor"] == 0.5 and m["vae"]["shift_factor"] == 0.1 and m["vae"]["downsample"] == 2
    with open(out / "train-000000.tar", "rb") as f:
        raw = {s["__key__"]: decode_npy(s["latent.npy"]) for s in iter_samples(f)}
    assert next(iter(raw.values())).dtype == np.float16
    x, keys, *_ = _all(make_loader(out, 8, resampled=False))
    assert x.shape == (24, 4, 8, 8)
    for row, key in zip(x, keys):
        assert torch.allclose(row, (torch.from_numpy(raw[key].astype(np.float32)) - 0.1) * 0.5)
    # the stored latent is the VAE's posterior mean of the packed image
    from harness.data.builtin import make_shapes_sample

    image = make_shapes_sample(0, int(keys[0]), 16)[0]
    vae = AutoencoderKL.from_pretrained(tiny_vae)
    with torch.no_grad():
        pixels = torch.tensor(image).permute(2, 0, 1)[None].float() / 127.5 - 1
        mean = vae.encode(pixels).latent_dist.mean
    assert torch.allclose(torch.from_numpy(raw[keys[0]].astype(np.float32)), mean[0], atol=2e-3)
    # a VAE that does not load fails the pack before --overwrite deletes anything
    with pytest.raises(DataError, match="--vae .*no-such-vae"):
        pack_dataset("shapes", str(out), count=4, vae=str(tmp_path / "no-such-vae"), overwrite=True, progress=False)
    assert read_manifest(out) == m and verify_dataset(out).ok


def test_precomputed_text_embeddings_round_trip(shapes, tmp_path):
    from models.text import WordEncoder

    captions = [shapes_attributes(3, i)["caption"] for i in range(40)]
    encoder = WordEncoder.from_captions(captions, dim=16, max_length=12, layers=1)
    encoder.save(tmp_path / "words.pt")
    out = tmp_path / "text"
    m = pack_dataset("shapes", str(out), image_size=16, count=40, seed=3, val_fraction=0,
                     text_encoder=f"word:{tmp_path / 'words.pt'}", progress=False)
    assert m["text_encoder"]["tokens"] == 12 and m["text_encoder"]["token_dim"] == 16
    batch = next(iter(make_loader(out, 10, resampled=False, conditioning="text", shuffle=0)))
    assert batch["txt_tokens"].shape == (10, 12, 16) and batch["txt_mask"].dtype == torch.bool
    assert batch["txt_pooled"].shape == (10, 16)
    with torch.no_grad():
        ref = WordEncoder.load(tmp_path / "words.pt").encode(batch["txt"])
    assert torch.equal(batch["txt_mask"], ref.mask)
    assert torch.allclose(batch["txt_tokens"], ref.tokens, atol=1e-2)
    assert torch.allclose(batch["txt_pooled"], ref.pooled, atol=1e-2)
    assert "txt_tokens" not in next(iter(make_loader(out, 10, resampled=False)))  # class conditioning
    with pytest.raises(DataError, match="no precomputed text embeddings"):
        make_loader(shapes, 4, conditioning="text", text_embeddings=True)


# --- distribution -------------------------------------------------------------------------------

def test_two_ranks_two_workers_see_every_sample_once(digits):
    seen = []
    for rank in range(2):
        loader = make_loader(digits, 64, rank=rank, world_size=2, num_workers=2, resampled=False, shuffle=100)
        _, keys, *_ = _all(loader)
        seen.append(keys)
    assert not set(seen[0]) & set(seen[1])
    everything = seen[0] + seen[1]
    assert len(everything) == len(set(everything)) == 1707


def test_resampled_streams_differ_per_rank_with_equal_batch_counts(digits):
    def stream(rank, epochs=1):
        loader = make_loader(digits, 32, rank=rank, world_size=2, num_workers=2, epoch_batches=7, seed=5)
        assert len(loader) == 7
        return [[key for batch in loader for key in batch["key"]] for _ in range(epochs)]

    (r0_e0, r0_e1), (r1_e0,) = stream(0, epochs=2), stream(1)
    assert len(r0_e0) == len(r1_e0) == len(r0_e1) == 7 * 32
    assert r0_e0 != r1_e0 and r0_e0 != r0_e1  # ranks and epochs see different streams
    assert stream(0)[0] == r0_e0  # ... deterministically


def test_flip_is_for_class_labels_only(digits):
    plain, *_ = _all(make_loader(digits, 100, resampled=False, shuffle=0))
    flipped, *_ = _all(make_loader(digits, 100, resampled=False, shuffle=0, flip=True))
    same = (plain == flipped).flatten(1).all(1)
    mirrored = (plain.flip(-1) == flipped).flatten(1).all(1)
    assert bool((same | mirrored).all()) and 0.3 < float((~same).float().mean()) < 0.7
    with pytest.raises(DataError, match="left/right"):
        make_loader(digits, 8, flip=True, conditioning="text")


def test_pipe_and_http_urls_and_missing_shards(digits, tmp_path):
    loader = make_loader(f"pipe:cat {digits}/train-{{000000..000001}}.tar", 100, resampled=False)
    _, keys, *_ = _all(loader)
    assert len(set(keys)) == 800
    if shutil.which("curl"):  # webdataset streams http(s) through curl
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(digits))
        handler.log_message = lambda *a: None
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            url = f"http://127.0.0.1:{server.server_port}/train-{{000003..000004}}.tar"
            _, keys, *_ = _all(make_loader(url, 100, resampled=False, manifest=digits))
            assert len(set(keys)) == 507
        finally:
            server.shutdown()
    with pytest.raises(DataError, match="no shard matches"):
        make_loader(str(tmp_path / "nothing-*.tar"), 8)
    with pytest.raises(DataError, match="2 of 2 shards do not exist"):
        make_loader(str(tmp_path / "nothing-{000000..000001}.tar"), 8)


# --- damage -------------------------------------------------------------------------------------

def test_damaged_shards_are_skipped_counted_and_fail_verify(digits, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(digits, broken)
    shard = broken / "train-000001.tar"
    os.truncate(shard, os.path.getsize(shard) // 2 + 700)  # cuts a sample; the rest of the shard is lost
    with tarfile.open(broken / "train-000003.tar") as tar:  # garble one PNG in place
        member = next(m for m in tar.getmembers() if m.name.endswith(".png"))
    bad_key = member.name.split(".")[0]
    with open(broken / "train-000003.tar", "r+b") as f:
        f.seek(member.offset_data + 20)
        f.write(b"\xff" * 16)
    with open(shard, "rb") as f:
        survivors = [s["__key__"] for s in iter_samples(f) if "png" in s and "__error__" not in s]

    loader = make_loader(broken, 64, num_workers=2, resampled=False)
    _, keys, _, _, corrupt = _all(loader)
    lost = 400 - len(survivors) + 1
    assert len(keys) == len(set(keys)) == 1707 - lost and bad_key not in keys
    assert corrupt == loader.corrupt == lost  # per batch and in shared memory, across workers

    assert cli_main(["data", "verify", str(broken)]) == 1
    result = verify_dataset(broken)
    reports = {r.name: r for r in result.shards}
    truncated = reports["train-000001.tar"]
    assert truncated.corrupt == 400 - len(survivors) and truncated.sha256_ok is False
    assert reports["train-000003.tar"].corrupt == 1 and reports["train-000000.tar"].ok
    os.remove(broken / "train-000002.tar")
    assert verify_dataset(broken).shards[2].missing


def test_verify_catches_a_changed_hash(shapes, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(shapes, copy)
    assert cli_main(["data", "verify", str(copy)]) == 0
    assert "OK: 120 samples" in capsys.readouterr().out
    with open(copy / "val-000000.tar", "r+b") as f:  # a byte of tar padding: samples still decode
        f.seek(-1, os.SEEK_END)
        f.write(b"\x01")
    assert cli_main(["data", "verify", str(copy)]) == 1
    assert "sha256 MISMATCH" in capsys.readouterr().out


# --- output safety and the command line ---------------------------------------------------------

def test_never_overwrites_without_the_flag(tmp_path, capsys):
    out = tmp_path / "s"
    args = ["data", "pack", "shapes", str(out), "--count", "20", "--image-size", "8", "--shard-size", "8"]
    assert cli_main(args) == 0
    before = read_manifest(out)
    assert cli_main(args + ["--seed", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--overwrite" in err[0] and "Traceback" not in err[0]
    assert read_manifest(out) == before
    assert cli_main(args + ["--seed", "1", "--overwrite", "--val-fraction", "0"]) == 0
    after = read_manifest(out)
    # the held-out split of the replaced run goes too (it could overlap the new training split)
    assert after["counts"] == {"train": 20} and not list(out.glob("val-*.tar")) and after["seed"] == 1
    # a separate validation set is added beside the training split (nothing replaced)
    assert cli_main(["data", "pack", "shapes", str(out), "--count", "6", "--image-size", "8", "--name", "val",
                     "--val-fraction", "0", "--seed", "9"]) == 0
    assert read_manifest(out)["counts"] == {"train": 20, "val": 6}
    assert cli_main(["data", "pack", "digits", str(out), "--image-size", "8", "--name", "test",
                     "--val-fraction", "0"]) == 2
    assert "different" in capsys.readouterr().err


def test_console_script_pack_verify_bench(tmp_path):
    out = tmp_path / "cli"
    run = lambda *a: subprocess.run(["ditscale", "data", *a], capture_output=True, text=True, timeout=300)
    proc = run("pack", "shapes", str(out), "--count", "60", "--image-size", "16", "--shard-size", "20")
    assert proc.returncode == 0, proc.stderr
    assert "train-{000000..000002}.tar: 57 samples in 3 shard(s)" in proc.stdout
    assert run("verify", str(out)).returncode == 0
    bench = run("bench", str(out), "--seconds", "0.3", "--batch-size", "16", "--json")
    assert bench.returncode == 0, bench.stderr
    assert json.loads(bench.stdout)["samples_per_s"] > 0
    proc = run("bench", str(tmp_path / "empty"))
    assert proc.returncode == 2 and "no such shard or dataset folder" in proc.stderr


def test_throughput_function_reports_samples_per_second(shapes):
    result = measure_loader_throughput(shapes, 32, seconds=None, batches=5)
    assert result["batches"] == 5 and result["samples"] == 160 and result["samples_per_s"] > 0
    assert result["kind"] == "pixels" and result["sample_shape"] == [3, 16, 16] and result["corrupt"] == 0
