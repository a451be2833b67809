"""Built-in data sets that need no download: `digits` and `shapes`.

* digits: scikit-learn's bundled 8x8 handwritten digits (1,797 real images, 10 classes), upsampled to
  the requested size (BICUBIC, grayscale), captioned "a handwritten digit seven".
* shapes: coloured shapes drawn procedurally on black, with compositional captions — one object
  ("a red circle"), a count ("three green triangles") or a relation ("a red circle left of a blue
  square"; left of / right of / above / below). Every sample's exact attributes (template, objects
  with colour, shape, centre and size in [0, 1] image units, relation) are returned with it so
  generated images can be scored against the caption later. Sample i depends only on (seed, i).
  The class label is the shape of the caption's first object.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from harness.data.images import resize_square

BUILTIN_SETS = ("digits", "shapes")

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

SHAPE_NAMES = ("circle", "square", "triangle", "diamond")
SHAPE_COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 205),
    "orange": (245, 140, 30),
    "cyan": (40, 205, 215),
    "white": (240, 240, 240),
}
RELATIONS = ("left of", "right of", "above", "below")
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
TEMPLATES = ("single", "count", "relation")
_TEMPLATE_P = (0.25, 0.35, 0.40)
_GRID = 3
_SUPERSAMPLE = 4


def digit_caption(label: int) -> str:
    return f"a handwritten digit {DIGIT_NAMES[label]}"


def load_digits_images(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [1797, size, size, 1], int64 labels [1797]) from scikit-learn's bundled copy."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    raw = np.clip(np.round(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    images = np.stack([resize_square(image[:, :, None], size) for image in raw])
    return images, digits.target.astype(np.int64)


def _cell_box(rng: np.random.Generator, row: int, col: int) -> tuple[float, float, float]:
    """(x, y, size) in [0, 1] units: an object inside grid cell (row, col), jittered."""
    cell = 1.0 / _GRID
    size = cell * rng.uniform(0.55, 0.85)
    slack = (cell - size) / 2
    x = (col + 0.5) * cell + rng.uniform(-slack, slack)
    y = (row + 0.5) * cell + rng.uniform(-slack, slack)
    return float(x), float(y), float(size)


def _plural(shape: str) -> str:
    return shape + "s"


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def shapes_attributes(seed: int, index: int) -> dict:
    """The scene of sample `index`: template, caption, objects (colour, shape, x, y, size), relation."""
    rng = np.random.default_rng([seed, index])
    template = TEMPLATES[rng.choice(len(TEMPLATES), p=_TEMPLATE_P)]
    colors = list(SHAPE_COLORS)
    objects: list[dict] = []
    relation = None

    def obj(color, shape, row, col):
        x, y, size = _cell_box(rng, row, col)
        return {"color": color, "shape": shape, "x": round(x, 4), "y": round(y, 4), "size": round(size, 4)}

    if template == "single":
        color, shape = colors[rng.integers(len(colors))], SHAPE_NAMES[rng.integers(len(SHAPE_NAMES))]
        cell = int(rng.integers(_GRID * _GRID))
        objects.append(obj(color, shape, cell // _GRID, cell % _GRID))
        caption = f"{_a(color)} {shape}"
    elif template == "count":
        n = int(rng.integers(2, 5))
        color, shape = colors[rng.integers(len(colors))], SHAPE_NAMES[rng.integers(len(SHAPE_NAMES))]
        for cell in rng.choice(_GRID * _GRID, size=n, replace=False):
            objects.append(obj(color, shape, int(cell) // _GRID, int(cell) % _GRID))
        caption = f"{COUNT_WORDS[n]} {color} {_plural(shape)}"
    else:
        first = (colors[rng.integers(len(colors))], SHAPE_NAMES[rng.integers(len(SHAPE_NAMES))])
        while True:
            second = (colors[rng.integers(len(colors))], SHAPE_NAMES[rng.integers(len(SHAPE_NAMES))])
            if second != first:
                break
        relation = RELATIONS[rng.integers(len(RELATIONS))]
        line = int(rng.integers(_GRID))  # the shared row (left/right) or column (above/below)
        near, far = sorted(int(v) for v in rng.choice(_GRID, size=2, replace=False))
        subject_pos, object_pos = (near, far) if relation in ("left of", "above") else (far, near)
        if relation in ("left of", "right of"):
            cells = [(line, subject_pos), (line, object_pos)]
        else:
            cells = [(subject_pos, line), (object_pos, line)]
        objects.append(obj(*first, *cells[0]))
        objects.append(obj(*second, *cells[1]))
        caption = f"{_a(first[0])} {first[1]} {relation} {_a(second[0])} {second[1]}"
    return {"template": template, "caption": caption, "count": len(objects), "relation": relation,
            "objects": objects}


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, size: float, fill) -> None:
    r = size / 2
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render_shapes(attributes: dict, size: int) -> np.ndarray:
    """uint8 [size, size, 3]: the scene drawn at 4x and box-filtered down (antialiased)."""
    big = size * _SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    for o in attributes["objects"]:
        _draw(draw, o["shape"], o["x"] * big, o["y"] * big, o["size"] * big, SHAPE_COLORS[o["color"]])
    return np.asarray(canvas.resize((size, size), resample=Image.BOX))


def make_shapes_sample(seed: int, index: int, size: int) -> tuple[np.ndarray, int, str, dict]:
    """(image uint8 [size, size, 3], class = the first object's shape, caption, attributes)."""
    attributes = shapes_attributes(seed, index)
    image = render_shapes(attributes, size)
    return image, SHAPE_NAMES.index(attributes["objects"][0]["shape"]), attributes["caption"], attributes
