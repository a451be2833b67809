"""Stand-in feature extractors for when clean-fid's Inception weights are not available.

A Fréchet distance needs *some* feature space. Without Inception-v3 the harness trains a small
network on the real images of the dataset — as people use LeNet features for MNIST — once per
dataset, and caches it beside the shards. Its metrics are always named after it (`fd_lenet_cfg1.5`,
`fd_shapesdet_cfg1.5`), never `fid`: the numbers are not comparable with published FIDs.

    lenet       a LeNet-style classifier of the class labels (digits, any labelled pixel dataset);
                features: its 64-d penultimate layer (before the ReLU).
    shapesdet   a detector for the built-in `shapes` set: the image is cut into the 3 x 3 grid the
                scenes are drawn on and one small CNN, shared by the cells, names each cell's colour
                and shape (or "empty"); features: the 9 cells' 16-d embeddings, concatenated.
                It also scores generated images against their captions (`prompt_alignment`).

Both take what clean-fid's feature extractors take: float [B, 3, H, W] RGB in 0..255.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from harness.data.builtin import COUNT_WORDS, RELATIONS, SHAPE_COLORS, SHAPE_NAMES
from harness.files import atomic_write

VERSION = 2  # 2: pinned training. Bump when the networks or their training change: cached stand-ins are then retrained
COLORS = tuple(SHAPE_COLORS)
GRID = 3
_SIZE, _PAD, _WINDOW, _STRIDE = 32, 2, 14, 11  # the detector's input size and its per-cell windows
assert _PAD * 2 + _SIZE == _WINDOW + (GRID - 1) * _STRIDE


def _to_unit(x: torch.Tensor, size: int) -> torch.Tensor:
    """0..255 RGB -> [-1, 1] at size x size."""
    x = x.float() / 127.5 - 1.0
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x


def _conv(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]


class LeNet(nn.Module):
    name = "lenet"

    def __init__(self, num_classes: int, image_size: int, width: int = 16, features: int = 64):
        super().__init__()
        self.config = {"num_classes": int(num_classes), "image_size": int(image_size), "width": width,
                       "features": features}
        self.size = max(8, min(int(image_size), 32))
        self.trunk = nn.Sequential(
            *_conv(3, width), nn.MaxPool2d(2), *_conv(width, 2 * width), nn.MaxPool2d(2),
            *_conv(2 * width, 2 * width), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
        )
        self.fc = nn.Linear(2 * width * 16, features)
        self.head = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features [B, 64] of 0..255 RGB images."""
        return self.fc(self.trunk(_to_unit(x, self.size)))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self(x)))

    def loss(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(x), target)

    @torch.no_grad()
    def accuracy(self, x: torch.Tensor, target: torch.Tensor) -> float:
        return float((self.logits(x).argmax(1) == target).float().mean())


class ShapesDetector(nn.Module):
    name = "shapesdet"

    def __init__(self, image_size: int = 32, width: int = 12, features: int = 16):
        super().__init__()
        self.config = {"image_size": int(image_size), "width": width, "features": features}
        self.cell = nn.Sequential(
            *_conv(3, width), nn.MaxPool2d(2), *_conv(width, 2 * width), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(2 * width * (_WINDOW // 4) ** 2, features),
        )
        self.head = nn.Linear(features, len(COLORS) + 1 + len(SHAPE_NAMES) + 1)

    def _cells(self, x: torch.Tensor) -> torch.Tensor:
        # At 32 px a cell is 10.7 px wide: each cell is read through a 14 px window around it (the
        # image padded by 2 px of background, windows every 11 px), so no object is ever cut.
        x = F.pad(_to_unit(x, _SIZE), (_PAD, _PAD, _PAD, _PAD), value=-1.0)
        b = x.shape[0]
        cells = x.unfold(2, _WINDOW, _STRIDE).unfold(3, _WINDOW, _STRIDE)  # [B, 3, GRID, GRID, win, win]
        return self.cell(cells.permute(0, 2, 3, 1, 4, 5).reshape(b * GRID * GRID, 3, _WINDOW, _WINDOW))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features [B, 9 * 16]: the cells' embeddings, row by row."""
        return self._cells(x).view(x.shape[0], -1)

    def cell_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(colour logits [B, 9, colours + empty], shape logits [B, 9, shapes + empty])."""
        out = self.head(F.relu(self._cells(x))).view(x.shape[0], GRID * GRID, -1)
        return out[..., :len(COLORS) + 1], out[..., len(COLORS) + 1:]

    def loss(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        colors, shapes = self.cell_logits(x)
        return (F.cross_entropy(colors.reshape(-1, colors.shape[-1]), target[..., 0].reshape(-1))
                + F.cross_entropy(shapes.reshape(-1, shapes.shape[-1]), target[..., 1].reshape(-1)))

    @torch.no_grad()
    def detect(self, x: torch.Tensor) -> list[list[tuple[int, int, str, str]]]:
        """Per image: the objects found, as (row, col, colour, shape); a cell holds an object when
        its shape is not "empty"."""
        colors, shapes = self.cell_logits(x)
        shape_idx = shapes.argmax(-1).cpu()
        color_idx = colors[..., :len(COLORS)].argmax(-1).cpu()  # the best colour, given an object
        found = []
        for b in range(x.shape[0]):
            objects = []
            for cell in range(GRID * GRID):
                s = int(shape_idx[b, cell])
                if s < len(SHAPE_NAMES):
                    objects.append((cell // GRID, cell % GRID, COLORS[int(color_idx[b, cell])], SHAPE_NAMES[s]))
            found.append(objects)
        return found

    @torch.no_grad()
    def accuracy(self, x: torch.Tensor, target: torch.Tensor) -> float:
        """Fraction of images whose nine cells are all named right."""
        colors, shapes = self.cell_logits(x)
        present = target[..., 1] < len(SHAPE_NAMES)
        color_ok = (colors[..., :len(COLORS)].argmax(-1) == target[..., 0]) | ~present
        shape_ok = shapes.argmax(-1) == target[..., 1]
        return float((color_ok & shape_ok).all(1).float().mean())


STANDINS = {"lenet": LeNet, "shapesdet": ShapesDetector}


def shapes_targets(attributes: list[dict]) -> torch.Tensor:
    """Scene attributes -> int64 [N, 9, 2]: per grid cell (colour, shape) indices, `len(...)` = empty."""
    target = torch.empty(len(attributes), GRID * GRID, 2, dtype=torch.long)
    target[..., 0], target[..., 1] = len(COLORS), len(SHAPE_NAMES)
    for i, scene in enumerate(attributes):
        for o in scene["objects"]:
            row, col = min(GRID - 1, int(o["y"] * GRID)), min(GRID - 1, int(o["x"] * GRID))
            target[i, row * GRID + col, 0] = COLORS.index(o["color"])
            target[i, row * GRID + col, 1] = SHAPE_NAMES.index(o["shape"])
    return target


# --- training and the cache --------------------------------------------------------------------------


def build_standin(name: str, config: dict) -> nn.Module:
    if name not in STANDINS:
        raise ValueError(f"unknown stand-in {name!r}; known: {', '.join(STANDINS)}")
    return STANDINS[name](**config)


# The numeric environment the stand-in is trained in, so that its weights (and every FD measured in its
# features) are the same on every x86-64 machine with AVX2: ATen's kernels at AVX2's width whatever the
# CPU has (AVX2 and AVX-512 kernels sum in other orders: measured, 500 steps trained with each end in
# different weights; "default", portable to CPUs without AVX2, was 2x slower), MKL's conditional
# numerical reproducibility (its results independent of the CPU's ISA), one thread. oneDNN and NNPACK,
# which pick kernels by ISA and cache size at run time, are switched off in _pinned_main.
PINNED_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE", "OMP_NUM_THREADS": "1",
              "MKL_NUM_THREADS": "1"}


def train_standin(name: str, images: np.ndarray, targets: torch.Tensor, config: dict, *, steps: int | None = None,
                  batch_size: int = 32, seed: int = 0, device="cpu", holdout: int = 256,
                  pinned: bool = True) -> tuple[nn.Module, dict]:
    """Train a stand-in on uint8 [N, H, W, 3] images. The global RNG is left as it was (the network
    starts from its own seed). Returns (network in eval mode on `device`, {"accuracy" on held-out
    images, ...}).

    pinned (default): trained on the CPU in a child process with PINNED_ENV (ATen's CPU kernels are
    chosen once per process, so only a fresh process can pin them), deterministic algorithms, fixed
    seeds and data order: the same weights, bit for bit, whatever the machine's ISA and thread count
    (tests/evaluation/test_evaluate.py). pinned=False trains here, faster, reproducible only on this machine."""
    if pinned:
        net, meta = _train_pinned(name, images, targets, config, steps, batch_size, seed, holdout)
        return net.to(device).eval(), meta
    threads = torch.get_num_threads()
    if torch.device(device).type == "cpu":
        torch.set_num_threads(1)  # tiny convolutions: threads only contend with the trials beside them
    try:
        with torch.enable_grad():  # evaluation (which may call this) runs under no_grad
            return _train(name, images, targets, config, steps, batch_size, seed, device, holdout)
    finally:
        torch.set_num_threads(threads)


def _train_pinned(name, images, targets, config, steps, batch_size, seed, holdout) -> tuple[nn.Module, dict]:
    root = str(Path(__file__).resolve().parents[2])  # the checkout: the child imports this same code
    with tempfile.TemporaryDirectory(prefix="ditscale-standin-") as tmp:
        job = {"name": name, "config": config, "steps": steps, "batch_size": batch_size, "seed": seed,
               "holdout": holdout}
        np.save(Path(tmp) / "images.npy", np.ascontiguousarray(images))
        torch.save(targets.cpu(), Path(tmp) / "targets.pt")
        (Path(tmp) / "job.json").write_text(json.dumps(job))
        env = {**os.environ, **PINNED_ENV,
               "PYTHONPATH": os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
        proc = subprocess.run([sys.executable, "-m", "harness.evaluation.standin", tmp], env=env, cwd=root,
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"training the {name} stand-in failed (exit {proc.returncode}): "
                               f"{proc.stderr.strip()[-2000:]}")
        state = load_standin_state(Path(tmp) / "standin.pt")
    return standin_from_state(state), state["meta"]


def _pinned_main(folder: str) -> None:
    """The child of _train_pinned: train with ISA-dependent backends off and deterministic algorithms."""
    torch.backends.mkldnn.enabled = False
    torch.backends.nnpack.set_flags(False)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    job = json.loads((Path(folder) / "job.json").read_text())
    images = np.load(Path(folder) / "images.npy")
    targets = torch.load(Path(folder) / "targets.pt", weights_only=True)
    with torch.enable_grad():
        net, meta = _train(job["name"], images, targets, job["config"], job["steps"], job["batch_size"], job["seed"],
                           "cpu", job["holdout"])
    save_standin(net, Path(folder) / "standin.pt", {**meta, "pinned": PINNED_ENV})


def _train(name, images, targets, config, steps, batch_size, seed, device, holdout):
    started = time.perf_counter()
    n = len(images)
    holdout = min(holdout, n // 5)
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_standin(name, config).to(device)
    steps = steps or 500
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=steps, pct_start=0.2)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen)
    test_idx, train_idx = order[:holdout], order[holdout:]
    net.train()
    for _ in range(steps):
        idx = train_idx[torch.randint(0, len(train_idx), (min(batch_size, len(train_idx)),), generator=gen)]
        loss = net.loss(x[idx].to(device), targets[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    acc = net.accuracy(x[test_idx].to(device), targets[test_idx].to(device)) if holdout else math.nan
    return net, {"accuracy": acc, "steps": steps, "train_images": int(len(train_idx)),
                 "seconds": time.perf_counter() - started}


def save_standin(net: nn.Module, path: Path, meta: dict) -> None:
    """Atomic: written under a temporary name in the same folder, then renamed."""
    state = {"name": net.name, "version": VERSION, "config": net.config, "meta": meta,
             "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()}}
    with atomic_write(path) as out:
        torch.save(state, out)


def load_standin_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def standin_from_state(state: dict, device="cpu") -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        net = build_standin(state["name"], state["config"])
    net.load_state_dict(state["state_dict"])
    return net.to(device).eval()


def state_digest(state: dict) -> str:
    """A short hash of a stand-in's weights: names its reference statistics."""
    h = hashlib.sha256(json.dumps([state["name"], state["version"], state["config"]], sort_keys=True).encode())
    for key in sorted(state["state_dict"]):
        h.update(key.encode())
        h.update(state["state_dict"][key].float().numpy().tobytes())
    return h.hexdigest()[:10]


# --- shapes captions and prompt alignment --------------------------------------------------------------

_COLOR = "|".join(COLORS)
_SHAPE = "|".join(SHAPE_NAMES)
_SINGLE = re.compile(rf"^an? ({_COLOR}) ({_SHAPE})$")
_COUNT = re.compile(rf"^({'|'.join(COUNT_WORDS.values())}) ({_COLOR}) ({_SHAPE})s$")
_RELATION = re.compile(rf"^an? ({_COLOR}) ({_SHAPE}) ({'|'.join(RELATIONS)}) an? ({_COLOR}) ({_SHAPE})$")
_NUMBERS = {word: n for n, word in COUNT_WORDS.items()}


def parse_shapes_caption(caption: str) -> dict | None:
    """A `shapes` caption -> {"template", "objects": [(colour, shape), ...], "relation"}; None if the
    caption is not one of the set's three templates."""
    text = " ".join(caption.strip().lower().split())
    if m := _SINGLE.match(text):
        return {"template": "single", "objects": [(m[1], m[2])], "relation": None}
    if m := _COUNT.match(text):
        return {"template": "count", "objects": [(m[2], m[3])] * _NUMBERS[m[1]], "relation": None}
    if m := _RELATION.match(text):
        return {"template": "relation", "objects": [(m[1], m[2]), (m[4], m[5])], "relation": m[3]}
    return None


def caption_matches(parsed: dict, found: list[tuple[int, int, str, str]]) -> bool:
    """Do the detected objects (row, col, colour, shape) show exactly what the caption says: the
    right number of objects, their colours and shapes, and for relations their relative position?"""
    if len(found) != len(parsed["objects"]):
        return False
    if parsed["template"] != "relation":
        return all((c, s) == parsed["objects"][0] for _, _, c, s in found)
    first, second = parsed["objects"]
    for a, b in ((found[0], found[1]), (found[1], found[0])):
        if (a[2], a[3]) == first and (b[2], b[3]) == second:
            (ra, ca), (rb, cb) = a[:2], b[:2]
            return {"left of": ca < cb, "right of": ca > cb, "above": ra < rb, "below": ra > rb}[parsed["relation"]]
    return False


def alignment_counts(detector: ShapesDetector, images: torch.Tensor, captions: list[str]) -> tuple[int, int]:
    """(images matching their caption, images with a parseable caption), for 0..255 RGB [B, 3, H, W]."""
    found = detector.detect(images)
    matched = total = 0
    for objects, caption in zip(found, captions):
        parsed = parse_shapes_caption(caption)
        if parsed is None:
            continue
        total += 1
        matched += caption_matches(parsed, objects)
    return matched, total


if __name__ == "__main__":  # _train_pinned's child process
    import sys

    _pinned_main(sys.argv[1])
