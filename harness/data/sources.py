"""What `ditscale data pack` reads: a built-in set, an image folder with class sub-folders (ImageNet
layout), or a JSONL / JSON / CSV / TSV file of image paths and captions.

Every source is a sequence of `len(source)` samples in a fixed order; `source.load(i)` returns sample
i as (uint8 image [S, S, C], class index or None, caption or None, attributes dict or None), or
raises when the image cannot be read. Sources are picklable so a process pool can load them.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from harness.data.builtin import (BUILTIN_SETS, DIGIT_NAMES, SHAPE_NAMES, digit_caption, load_digits_images,
                                  make_shapes_sample)
from harness.data.errors import DataError
from harness.data.images import IMAGE_EXTENSIONS, center_crop_arr, load_rgb

PATH_KEYS = ("image", "path", "file", "file_name", "filename", "img", "image_path")
CAPTION_KEYS = ("caption", "text", "txt", "prompt")
LABEL_KEYS = ("label", "class", "cls")
CAPTION_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")
DEFAULT_SIZES = {"digits": 16, "shapes": 32}
DEFAULT_PHOTO_SIZE = 256
DEFAULT_SHAPES_COUNT = 10_000


class Source:
    kind = "?"
    channels = 3
    class_names: list[str] | None = None
    num_classes: int | None = None
    has_captions = True
    has_attributes = False

    def __init__(self, image_size: int):
        self.image_size = image_size

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, index: int):
        raise NotImplementedError

    def describe(self) -> dict:
        raise NotImplementedError


class DigitsSource(Source):
    kind, channels = "builtin", 1
    class_names, num_classes = list(DIGIT_NAMES), 10

    def __init__(self, image_size: int):
        super().__init__(image_size)
        self.images, self.labels = load_digits_images(image_size)

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int):
        label = int(self.labels[index])
        return self.images[index], label, digit_caption(label), None

    def describe(self) -> dict:
        return {"kind": "builtin", "name": "digits", "origin": "sklearn.datasets.load_digits (8x8, bicubic upsampling)"}


class ShapesSource(Source):
    kind, channels, has_attributes = "builtin", 3, True
    class_names, num_classes = list(SHAPE_NAMES), len(SHAPE_NAMES)

    def __init__(self, image_size: int, count: int, seed: int):
        super().__init__(image_size)
        self.count, self.seed = count, seed

    def __len__(self) -> int:
        return self.count

    def load(self, index: int):
        return make_shapes_sample(self.seed, index, self.image_size)

    def describe(self) -> dict:
        return {"kind": "builtin", "name": "shapes", "seed": self.seed, "count": self.count,
                "label": "shape of the caption's first object"}


class _PhotoSource(Source):
    """Photos: ADM centre crop + resize to image_size, RGB."""

    def __init__(self, image_size: int, root: Path, items: list[tuple[str, int | None, str | None]]):
        super().__init__(image_size)
        self.root, self.items = root, items

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int):
        path, label, caption = self.items[index]
        image = center_crop_arr(load_rgb(path), self.image_size)
        return image, label, caption, {"path": os.path.relpath(path, self.root)}


class FolderSource(_PhotoSource):
    kind = "folder"

    def __init__(self, folder: Path, image_size: int):
        classes = sorted(d.name for d in os.scandir(folder) if d.is_dir() and not d.name.startswith("."))
        if not classes:
            raise DataError(f"{folder}: no class sub-folders (expected the ImageNet layout FOLDER/CLASS/IMAGE.jpg)")
        items = []
        for label, name in enumerate(classes):
            caption = name.replace("_", " ")
            for dirpath, dirnames, filenames in os.walk(folder / name):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for fname in sorted(filenames):
                    if fname.lower().endswith(IMAGE_EXTENSIONS) and not fname.startswith("."):
                        items.append((os.path.join(dirpath, fname), label, caption))
        if not items:
            raise DataError(f"{folder}: no images in its {len(classes)} class sub-folders "
                            f"(extensions: {', '.join(IMAGE_EXTENSIONS)})")
        super().__init__(image_size, folder, items)
        self.folder = folder
        self.class_names, self.num_classes = classes, len(classes)

    def describe(self) -> dict:
        return {"kind": "folder", "path": str(self.folder.resolve()), "caption": "class folder name"}


class CaptionsSource(_PhotoSource):
    kind = "captions"

    def __init__(self, file: Path, image_size: int):
        rows = _read_rows(file)
        if not rows:
            raise DataError(f"{file}: no rows")
        path_key = _pick_key(rows[0], PATH_KEYS, file, "image path")
        caption_key = _pick_key(rows[0], CAPTION_KEYS, file, "caption")
        label_key = next((k for k in LABEL_KEYS if k in rows[0]), None)
        base = file.parent
        items, missing, labels = [], [], []
        for line, row in enumerate(rows, 1):
            path, caption = row.get(path_key), row.get(caption_key)
            if not path or caption is None:
                raise DataError(f"{file}: row {line} has no {path_key!r} or no {caption_key!r}")
            full = Path(path) if os.path.isabs(path) else base / path
            if not full.is_file():
                missing.append(str(full))
            if label_key is not None:
                if row.get(label_key) in (None, ""):
                    raise DataError(f"{file}: row {line} has no {label_key!r} (other rows have one)")
                labels.append(str(row[label_key]).strip())
            items.append((str(full), None, str(caption)))
        if missing:
            raise DataError(f"{file}: {len(missing)} listed images do not exist (first: {missing[0]})")
        class_names = None
        if label_key is not None:
            if all(_is_int(v) for v in labels):
                ids = [int(v) for v in labels]
                if min(ids) < 0:
                    raise DataError(f"{file}: negative class label {min(ids)}")
                num_classes = max(ids) + 1
            else:
                class_names = sorted(set(labels))
                index = {name: i for i, name in enumerate(class_names)}
                ids, num_classes = [index[v] for v in labels], len(class_names)
            items = [(p, label, c) for (p, _, c), label in zip(items, ids)]
            self.num_classes = num_classes
        super().__init__(image_size, base, items)
        self.file, self.class_names = file, class_names

    def describe(self) -> dict:
        return {"kind": "captions", "path": str(self.file.resolve())}


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _pick_key(row: dict, keys: tuple[str, ...], file: Path, what: str) -> str:
    for key in keys:
        if key in row:
            return key
    raise DataError(f"{file}: no {what} column (one of {', '.join(keys)}); found {', '.join(map(str, row))}")


def _read_rows(file: Path) -> list[dict]:
    suffix = file.suffix.lower()
    try:
        if suffix == ".jsonl":
            rows = []
            with open(file, encoding="utf-8") as f:
                for line, text in enumerate(f, 1):
                    if text.strip():
                        try:
                            rows.append(json.loads(text))
                        except ValueError as err:
                            raise DataError(f"{file}:{line}: not JSON ({err})") from None
        elif suffix == ".json":
            rows = json.loads(file.read_text(encoding="utf-8"))
            if not isinstance(rows, list):
                raise DataError(f"{file}: expected a JSON list of objects")
        else:
            with open(file, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{file}: cannot read ({err})") from None
    if not all(isinstance(r, dict) for r in rows):
        raise DataError(f"{file}: every row must be an object with an image path and a caption")
    return rows


def open_source(source: str, *, image_size: int | None = None, count: int | None = None, seed: int = 0) -> Source:
    """A built-in name (digits, shapes; a built-in name wins over a folder of that name: write
    ./digits for the folder), an image folder, or a captions file."""
    if source in BUILTIN_SETS:
        size = image_size or DEFAULT_SIZES[source]
        if source == "digits":
            return DigitsSource(size)
        return ShapesSource(size, count or DEFAULT_SHAPES_COUNT, seed)
    path = Path(source)
    size = image_size or DEFAULT_PHOTO_SIZE
    if path.is_dir():
        return FolderSource(path, size)
    if path.is_file():
        if path.suffix.lower() not in CAPTION_SUFFIXES:
            raise DataError(f"{source}: a captions file must end in {', '.join(CAPTION_SUFFIXES)}")
        return CaptionsSource(path, size)
    raise DataError(f"{source}: no such folder or file, and not a built-in set ({', '.join(BUILTIN_SETS)})")

