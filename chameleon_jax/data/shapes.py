"""The procedural shapes dataset: exact ground truth for image→text and text→image smoke runs.

64×64 white canvases with 1–2 objects on a 3×3 grid (at most one per cell); an object is one of
3 shapes × 6 colours × 2 sizes. Everything is a pure function of `(seed, index)`, and the split of a
scene is a hash of its content, so no scene appears in two splits. Research note B4
(`shared/docs/vqgan-and-data.md`).

Public API:

    Obj(cell, shape, color, size)        one object; cell is 0..8 in row-major order (CELLS names them)
    Scene(objects)                       a tuple of Obj sorted by cell (the canonical order); hashable
    sample_scene(seed, index) -> Scene   deterministic (uniform=True: every distinct scene equally likely)
    scene_counts()                       distinct scenes per object count: [324, 46656]
    render(scene, size=64) -> PIL.Image  RGB; render_array(...) gives uint8 [H, W, 3]
    object_boxes(scene, size=64)         float [n, 4] (x0, y0, x1, y1) pixel boxes, for region losses
    caption(scene) -> str                "a large red circle at the top left and a small blue square at the center."
    parse_caption(text) -> Scene | None  the grammar's inverse (None for anything off-grammar)
    analyze(image) -> Scene | None       rule-based reading of a uint8 [H, W, 3] image back into a Scene
    split_of(scene) -> str               "train" | "val" | "test", by a hash of the caption
    iter_split(split, seed, n, unique)   the first n scenes of `split` in index order (unique: no repeats)
    score(pred, truth) -> dict           exact match and tuple-set precision/recall for evaluation
    evaluation_scenes(split, two_object, seed)   distinct scenes: every single-object one + a seeded sample
    questions(scene, rng) -> [(kind, question, answer)]   VQA questions from the grammar, one-word answers

Drawing is at 4× supersampling, downsampled with a box filter: Lanczos rings, and the ringing breaks
the analyzer (B4.1).
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import math
import re
from typing import Iterator, NamedTuple, Sequence

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLORS = {  # well separated from each other and from the white background
    "red": (220, 30, 30),
    "green": (30, 160, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 0),
    "magenta": (200, 30, 200),
    "cyan": (0, 190, 210),
}
COLOR_NAMES = tuple(COLORS)
SIZES = {"small": 0.18, "large": 0.30}  # object diameter as a fraction of the canvas side (B4.1)
SIZE_NAMES = tuple(SIZES)
CELLS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
MAX_OBJECTS = 2
SPLITS = {"train": 0.90, "val": 0.05, "test": 0.05}  # shares of the scene space
_SUPERSAMPLE = 4
_WHITE = np.array([255.0, 255.0, 255.0])


class Obj(NamedTuple):
    cell: int
    shape: str
    color: str
    size: str


class Scene(NamedTuple):
    objects: tuple[Obj, ...]

    @classmethod
    def of(cls, objects: Sequence[Obj]) -> "Scene":
        """The canonical scene (objects sorted by cell); raises if two objects share a cell."""
        objs = tuple(sorted(Obj(*o) for o in objects))
        if len({o.cell for o in objs}) != len(objs):
            raise ValueError(f"two objects share a cell: {objs}")
        return cls(objs)


def scene_counts(max_objects: int = MAX_OBJECTS) -> np.ndarray:
    """[max_objects] number of distinct scenes with 1, 2, … objects: C(9, n) · 36^n (1: 324, 2: 46,656)."""
    attrs = len(SHAPES) * len(COLORS) * len(SIZES)
    return np.array([math.comb(len(CELLS), n) * attrs ** n for n in range(1, max_objects + 1)], np.float64)


@functools.lru_cache(maxsize=None)
def _object_count_probs(max_objects: int) -> np.ndarray:
    w = scene_counts(max_objects)  # cached: sample_scene runs per image in the training stream
    return w / w.sum()


def sample_scene(seed: int, index: int, max_objects: int = MAX_OBJECTS, uniform: bool = False) -> Scene:
    """The scene at (seed, index). By default the object count is drawn first (1 and 2 equally likely:
    captions and the smoke corpora want that mix); `uniform` draws every distinct scene equally often
    instead, so a single-object scene is 0.7% of draws rather than 50% (a tokenizer's training stream:
    it never sees the same 324 single-object scenes over and over)."""
    rng = np.random.default_rng([seed, index])
    if uniform:
        p = _object_count_probs(max_objects)
        n = int(rng.choice(len(p), p=p)) + 1
    else:
        n = int(rng.integers(1, max_objects + 1))
    cells = rng.choice(len(CELLS), size=n, replace=False)
    return Scene.of(Obj(int(c), SHAPES[rng.integers(len(SHAPES))], COLOR_NAMES[rng.integers(len(COLORS))],
                        SIZE_NAMES[rng.integers(len(SIZES))]) for c in cells)


# ----------------------------------------------------------------------------------------------- render

def object_boxes(scene: Scene, size: int = 64) -> np.ndarray:
    """[n, 4] float boxes (x0, y0, x1, y1) in pixels, one per object in canonical order."""
    boxes = []
    for o in scene.objects:
        cx, cy = (o.cell % 3 + 0.5) * size / 3, (o.cell // 3 + 0.5) * size / 3
        r = SIZES[o.size] * size / 2
        boxes.append((cx - r, cy - r, cx + r, cy + r))
    return np.asarray(boxes, np.float32).reshape(-1, 4)


def render(scene: Scene, size: int = 64) -> Image.Image:
    big = size * _SUPERSAMPLE
    img = Image.new("RGB", (big, big), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for o, (x0, y0, x1, y1) in zip(scene.objects, object_boxes(scene, big)):
        fill = COLORS[o.color]
        if o.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif o.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:  # upright triangle, apex at the top centre
            draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
    return img.reduce(_SUPERSAMPLE)  # box filter


def render_array(scene: Scene, size: int = 64) -> np.ndarray:
    return np.asarray(render(scene, size), dtype=np.uint8)


# --------------------------------------------------------------------------------------------- captions

def caption(scene: Scene) -> str:
    return " and ".join(f"a {o.size} {o.color} {o.shape} at the {CELLS[o.cell]}" for o in scene.objects) + "."


_CLAUSE = re.compile(r"a (%s) (%s) (%s) at the (%s)" % (
    "|".join(SIZE_NAMES), "|".join(COLOR_NAMES), "|".join(SHAPES),
    "|".join(sorted(CELLS, key=len, reverse=True))))  # longest first: "top left" before "top"


def parse_caption(text: str) -> Scene | None:
    """Inverse of `caption`. Tolerates case, surrounding space and a missing final period; anything else
    off-grammar (unknown words, repeated cells, no objects) gives None."""
    body = text.strip().lower()
    body = body[:-1] if body.endswith(".") else body
    clauses = body.split(" and ")
    objs = []
    for clause in clauses:
        m = _CLAUSE.fullmatch(clause.strip())
        if m is None:
            return None
        size, color, shape, cell = m.groups()
        objs.append(Obj(CELLS.index(cell), shape, color, size))
    try:
        return Scene.of(objs)
    except ValueError:
        return None


# --------------------------------------------------------------------------------------------- analyzer

_PALETTE = np.array([COLORS[c] for c in COLOR_NAMES], np.float64)


def analyze(image) -> Scene | None:
    """Reads the scene back from pixels (uint8 [H, W, 3], any square size; floats are taken as 0..255).

    Per grid cell (B4.4): skip near-white cells; colour = median of the 10% of pixels furthest from white,
    snapped to the palette; ink = projection of (white − pixel) onto (white − colour); mask = ink > 0.5;
    triangle if the mask's centroid sits low in its box, square if the box corners are filled, else circle;
    large if the box side is above the midpoint of the two sizes. None when no object is found.
    """
    img = np.asarray(image, np.float64)[..., :3]
    h, w = img.shape[:2]
    objs = []
    for cell in range(9):
        r, c = divmod(cell, 3)
        patch = img[r * h // 3:(r + 1) * h // 3, c * w // 3:(c + 1) * w // 3]
        dist = np.linalg.norm(_WHITE - patch, axis=-1)
        if dist.max() < 80:
            continue
        far = patch[dist >= np.quantile(dist, 0.9)]
        col = np.median(far, axis=0)
        k = int(np.argmin(((_PALETTE - col) ** 2).sum(-1)))
        ref = _WHITE - _PALETTE[k]
        ink = ((_WHITE - patch) @ ref) / (ref @ ref)
        mask = ink > 0.5
        ys, xs = np.nonzero(mask)
        if len(ys) < 4:
            continue
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        bh, bw = y1 - y0, x1 - x0
        box = mask[y0:y1, x0:x1]
        cy = (ys.mean() + 0.5 - y0) / bh
        q_h, q_w = max(1, round(bh / 4)), max(1, round(bw / 4))
        corners = np.mean([box[:q_h, :q_w].mean(), box[:q_h, -q_w:].mean(),
                           box[-q_h:, :q_w].mean(), box[-q_h:, -q_w:].mean()])
        shape = "triangle" if cy > 0.57 else "square" if corners > 0.6 else "circle"
        side = max(bh, bw) / w
        size = "large" if side > (SIZES["small"] + SIZES["large"]) / 2 else "small"
        objs.append(Obj(cell, shape, COLOR_NAMES[k], size))
    return Scene(tuple(objs)) if objs else None


def score(pred: Scene | None, truth: Scene) -> dict[str, float]:
    """exact (1/0), precision and recall of the (cell, shape, color, size) tuple sets, count match."""
    p = set(pred.objects) if pred else set()
    t = set(truth.objects)
    hit = len(p & t)
    return {"exact": float(p == t), "precision": hit / len(p) if p else 0.0, "recall": hit / len(t),
            "count": float(len(p) == len(t))}


# ---------------------------------------------------------------------------------------------- splits

def split_of(scene: Scene) -> str:
    """The scene's split, a function of its content only (so a scene never appears in two splits)."""
    digest = hashlib.blake2b(caption(scene).encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "little") / 2.0 ** 64
    edge = 0.0
    for name, share in SPLITS.items():
        edge += share
        if u < edge:
            return name
    return name


def iter_split(split: str, seed: int = 0, n: int | None = None, unique: bool = False) -> Iterator[Scene]:
    """Scenes of `split`, sampled at indices 0, 1, 2, … and filtered; stops after n (None = endless).

    `unique` skips scenes already yielded. Evaluations want it: there are only 324 single-object
    scenes, so a held-out split holds a dozen or so of them, yet half of all draws are single-object;
    256 plain draws from "val" (seed 0) are 150 distinct scenes, one of them drawn 15 times, and a
    score over them moves by up to 6 points with one scene.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; pick one of {tuple(SPLITS)}")
    index, count, seen = 0, 0, set()
    while n is None or count < n:
        scene = sample_scene(seed, index)
        index += 1
        if split_of(scene) == split and not (unique and scene in seen):
            if unique:
                seen.add(scene)
            count += 1
            yield scene


def all_scenes(n_objects: int) -> Iterator[Scene]:
    """Every distinct scene with `n_objects` objects, in a fixed order (cells, then attributes)."""
    attrs = [(shape, color, size) for shape in SHAPES for color in COLOR_NAMES for size in SIZE_NAMES]

    def fill(cells):
        if not cells:
            yield ()
            return
        for a in attrs:
            for rest in fill(cells[1:]):
                yield (Obj(cells[0], *a), *rest)

    for cells in itertools.combinations(range(len(CELLS)), n_objects):
        for objs in fill(cells):
            yield Scene(objs)


def evaluation_scenes(split: str = "test", two_object: int = 183, seed: int = 0,
                      single_object: int | None = None) -> list[Scene]:
    """Distinct scenes of `split` to evaluate on: every single-object scene of the split (the first
    `single_object` of them if given), then `two_object` distinct two-object scenes drawn without
    replacement with `seed`.

    Not i.i.d. draws: the test split holds only 16 single-object scenes, which i.i.d. draws repeat (half
    of all draws are single-object), so one systematically missed scene moved a 100-draw score by up to
    7 points. Each scene here counts once. The set depends on `seed` only, not on a training data seed,
    so runs with different data draws are scored on the same scenes.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; pick one of {tuple(SPLITS)}")
    singles = [sc for sc in all_scenes(1) if split_of(sc) == split][:single_object]
    pairs = [sc for sc in all_scenes(2) if split_of(sc) == split]
    if two_object > len(pairs):
        raise ValueError(f"two_object={two_object}: split {split!r} holds only {len(pairs)} two-object scenes")
    pick = np.random.default_rng([seed, 2]).choice(len(pairs), size=two_object, replace=False)
    return singles + [pairs[i] for i in sorted(pick)]


# -------------------------------------------------------------------------------------------- questions

QUESTION_KINDS = ("count", "shape_at", "color_of", "size_of")
_COUNT_WORDS = ("zero", "one", "two")


def questions(scene: Scene, rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """(kind, question, one-word answer) about `scene`, one per kind the scene allows, from the grammar:

        count     "how many shapes are there?"                 -> "one" | "two"
        shape_at  "what shape is at the top left?"            -> a shape, or "nothing" for an empty cell
        color_of  "what color is the triangle?"               -> a colour (only a shape the scene holds once)
        size_of   "what size is the red triangle?"            -> "small" | "large" (colour+shape unique)

    `rng` picks the cell (occupied or empty, evenly) and which object a question names.
    """
    out = [("count", "how many shapes are there?", _COUNT_WORDS[len(scene.objects)])]
    by_cell = {o.cell: o for o in scene.objects}
    empty = [c for c in range(len(CELLS)) if c not in by_cell]
    cell = int(rng.choice(sorted(by_cell) if rng.random() < 0.5 or not empty else empty))
    out.append(("shape_at", f"what shape is at the {CELLS[cell]}?",
                by_cell[cell].shape if cell in by_cell else "nothing"))
    unique_shape = [o for o in scene.objects if sum(p.shape == o.shape for p in scene.objects) == 1]
    if unique_shape:
        o = unique_shape[int(rng.integers(len(unique_shape)))]
        out.append(("color_of", f"what color is the {o.shape}?", o.color))
    unique = [o for o in scene.objects if sum((p.shape, p.color) == (o.shape, o.color) for p in scene.objects) == 1]
    if unique:
        o = unique[int(rng.integers(len(unique)))]
        out.append(("size_of", f"what size is the {o.color} {o.shape}?", o.size))
    return out


def render_batch(scenes: Sequence[Scene], size: int = 64) -> np.ndarray:
    """uint8 [N, size, size, 3]."""
    return np.stack([render_array(s, size) for s in scenes])
