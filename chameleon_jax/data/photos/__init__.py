"""Real photographs that ship inside installed packages, written as an image folder with a fixed split.

    python -m chameleon_jax.data.photos --out /tmp/vqgan_photos/photos
    write_photo_folder(out_dir, crops_per_photo=8, seed=0) -> manifest dict

Nothing is downloaded: every photo is read as a file from the installed package directory of
scikit-image (`skimage/data/`, the images bundled in its wheel; others that `skimage.data` fetches with
pooch are not used) or scikit-learn (`sklearn/datasets/images/`, what `load_sample_images` returns). A
missing file is an error that names the package to install, never a fetch.

The split is fixed by photo, not drawn:

    heldout/  chelsea (a cat), coffee (a cup), rocket (a launch pad) from scikit-image, flower from
              scikit-learn: written whole, never trained on, and no crop of them is written
    train/    astronaut, motorcycle_left, hubble_deep_field, retina, ihc (colour) and camera, coins, moon,
              grass, gravel, brick (greyscale, stored as RGB) from scikit-image, china from scikit-learn:
              each written whole plus `crops_per_photo` square crops (side uniform in [max(min_crop,
              0.3·shorter side), shorter side], position uniform) drawn from numpy's generator seeded
              with (seed, photo index), so the same arguments write the same bytes

motorcycle_right is left out: it is the other view of the same stereo pair as motorcycle_left. The
files are lossless PNGs at the photos' own resolution; a trainer resizes them (`vqgan/images.py`).
`manifest.json` records each written file's source file, package and version, the source's sha256,
its split and its crop box (left, top, right, bottom in source pixels).
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os

import numpy as np
from PIL import Image

# name -> (distribution, package directory holding the file, file name)
SOURCES = {
    "astronaut": ("scikit-image", "skimage.data", "astronaut.png"),
    "motorcycle_left": ("scikit-image", "skimage.data", "motorcycle_left.png"),
    "hubble_deep_field": ("scikit-image", "skimage.data", "hubble_deep_field.jpg"),
    "retina": ("scikit-image", "skimage.data", "retina.jpg"),
    "ihc": ("scikit-image", "skimage.data", "ihc.png"),
    "camera": ("scikit-image", "skimage.data", "camera.png"),
    "coins": ("scikit-image", "skimage.data", "coins.png"),
    "moon": ("scikit-image", "skimage.data", "moon.png"),
    "grass": ("scikit-image", "skimage.data", "grass.png"),
    "gravel": ("scikit-image", "skimage.data", "gravel.png"),
    "brick": ("scikit-image", "skimage.data", "brick.png"),
    "china": ("scikit-learn", "sklearn.datasets.images", "china.jpg"),
    "chelsea": ("scikit-image", "skimage.data", "chelsea.png"),
    "coffee": ("scikit-image", "skimage.data", "coffee.png"),
    "rocket": ("scikit-image", "skimage.data", "rocket.jpg"),
    "flower": ("scikit-learn", "sklearn.datasets.images", "flower.jpg"),
}
HELD_OUT = ("chelsea", "coffee", "rocket", "flower")
TRAIN = tuple(n for n in SOURCES if n not in HELD_OUT)
MANIFEST = "manifest.json"


def source_path(name: str) -> str:
    """The installed file of photo `name`; FileNotFoundError naming what to install."""
    dist, package, filename = SOURCES[name]
    try:
        spec = importlib.util.find_spec(package)
    except ModuleNotFoundError:
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"photo {name!r} ships in {dist}, which is not installed: "
                                f"pip install -e '.[photos]' (or pip install {dist})")
    path = os.path.join(list(spec.submodule_search_locations)[0], filename)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing from the installed {dist} "
                                f"{importlib.metadata.version(dist)}; reinstall it (pip install --force-reinstall {dist})")
    return path


def crop_boxes(width: int, height: int, count: int, rng: np.random.Generator, min_crop: int):
    """`count` square boxes (left, top, right, bottom) inside a width × height photo."""
    short = min(width, height)
    low = min(short, max(min_crop, int(0.3 * short)))
    boxes = []
    for _ in range(count):
        side = int(rng.integers(low, short + 1))
        left, top = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
        boxes.append((left, top, left + side, top + side))
    return boxes


def _save(img: Image.Image, out_dir: str, split: str, file: str) -> str:
    rel = os.path.join(split, file)
    img.save(os.path.join(out_dir, rel), format="PNG", compress_level=1)  # lossless; fast to write
    return rel


def write_photo_folder(out_dir, *, crops_per_photo: int = 8, seed: int = 0, min_crop: int = 128) -> dict:
    """Writes out_dir/train/*.png, out_dir/heldout/*.png and out_dir/manifest.json; returns the manifest.

    The same arguments write the same files (crops from numpy's generator seeded with (seed, photo
    index)). Files already in train/ or heldout/ are replaced, so a folder never mixes two builds."""
    out_dir = os.fspath(out_dir)
    if crops_per_photo < 0:
        raise ValueError(f"crops_per_photo={crops_per_photo}; use 0 (whole photos only) or more")
    for split in ("train", "heldout"):
        os.makedirs(os.path.join(out_dir, split), exist_ok=True)
        for f in os.listdir(os.path.join(out_dir, split)):
            if f.endswith(".png"):
                os.remove(os.path.join(out_dir, split, f))
    files = []
    for index, name in enumerate(SOURCES):
        dist, _, filename = SOURCES[name]
        path = source_path(name)
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        with Image.open(path) as src:
            photo = src.convert("RGB")  # greyscale photos as three equal channels
        source = {"photo": name, "package": dist, "version": importlib.metadata.version(dist),
                  "file": path, "sha256": digest}
        split = "heldout" if name in HELD_OUT else "train"
        files.append({**source, "split": split, "path": _save(photo, out_dir, split, f"{name}.png"),
                      "box": [0, 0, photo.width, photo.height]})
        if split == "train":
            rng = np.random.default_rng([seed, index])
            for k, box in enumerate(crop_boxes(photo.width, photo.height, crops_per_photo, rng, min_crop)):
                files.append({**source, "split": split, "box": list(box),
                              "path": _save(photo.crop(box), out_dir, split, f"{name}_crop{k}.png")})
    manifest = {"seed": seed, "crops_per_photo": crops_per_photo, "min_crop": min_crop,
                "held_out": list(HELD_OUT), "train": list(TRAIN), "files": files}
    with open(os.path.join(out_dir, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest
