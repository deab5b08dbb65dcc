"""VQ-GAN training data: Grain pipelines of image batches, {"images": float32 [B, S, S, 3] in [-1, 1]}.

Two kinds (`config.data.kind`):

    shapes   procedural scenes (`data/shapes.py`); batch k is a pure function of (seed, k), so the
             smoke recipe sees the same batches however it is resumed
    images   real images through the pretokenize readers' inputs (`data/readers.py`), comma-separated
             in `data.inputs`: image folders (captions not needed), JSONL files whose documents name
             images, webdataset-style .tar shards (or folders of them). Each image gets the official
             preprocessing (`vqgan/images.py`: EXIF, alpha on white, shorter side to `image_size` with
             LANCZOS, centre crop). The images are shuffled with `data.seed`, reshuffled every epoch.
             A file that cannot be decoded is skipped and logged, never a crash.

Each process iterates its own slice (rows global batch / process count); the iterator's
get_state/set_state (Grain) makes resumes exact. The held-out set: the shapes `val` split, or for
images `eval.inputs` if given, else `eval.num_images` images held back from `data.inputs`.
"""
from __future__ import annotations

import logging
import os
import tarfile
import threading

import grain
import jax
import numpy as np

from chameleon_jax.data import readers, shapes
from chameleon_jax.vqgan import images as images_lib

log = logging.getLogger(__name__)

_BATCHES = 2**40  # shapes batches are made on demand: virtually unbounded


# ------------------------------------------------------------------------------------------- shapes
def shapes_batch(data_config, step: int, batch_size: int) -> np.ndarray:
    """Images float32 [B, S, S, 3] in [-1, 1] for `step` (global batch): a pure function of (seed, step)."""
    d = data_config
    uniform = d.get("uniform_scenes", False)  # every distinct scene equally likely (shapes.sample_scene)
    scenes, index = [], step * batch_size * 4
    while len(scenes) < batch_size:
        s = shapes.sample_scene(d.seed, index, uniform=uniform)
        index += 1
        if shapes.split_of(s) == "train":
            scenes.append(s)
    return shapes.render_batch(scenes, d.image_size).astype(np.float32) / 127.5 - 1.0


class ShapesBatches:
    """Random-access source: step -> this process's rows of that step's global batch."""

    def __init__(self, data_config, batch_size: int, process_index: int = 0, process_count: int = 1):
        self.config, self.batch_size = data_config, batch_size
        self.rows = batch_size // process_count
        self.first = process_index * self.rows

    def __len__(self) -> int:
        return _BATCHES

    def __getitem__(self, step: int) -> dict:
        return {"images": shapes_batch(self.config, int(step), self.batch_size)[self.first:self.first + self.rows]}

    def __repr__(self) -> str:  # Grain validates a restored source by its repr; keep it stable
        d = self.config
        return (f"ShapesBatches(seed={d.seed}, batch_size={self.batch_size}, image_size={d.image_size}, "
                f"uniform={d.get('uniform_scenes', False)}, rows={self.first}:{self.first + self.rows})")


# ------------------------------------------------------------------------------------------- images
class TarMember(tuple):
    """(tar path, member name): an image inside a shard, read when it is used."""

    def __new__(cls, tar: str, member: str):
        return super().__new__(cls, (tar, member))


_open_tars = threading.local()  # per loader thread: tarfile objects are not thread-safe


def _read_member(ref: TarMember) -> bytes:
    tars = _open_tars.__dict__.setdefault("tars", {})
    if ref[0] not in tars:
        tars[ref[0]] = tarfile.open(ref[0])
    return tars[ref[0]].extractfile(ref[1]).read()


def _tar_images(path: str) -> list[TarMember]:
    try:
        with tarfile.open(path) as tar:
            names = [m.name for m in tar if m.isfile()]
    except (tarfile.TarError, OSError, EOFError) as e:
        log.warning("skipping unreadable tar shard %s: %s", path, e)
        return []
    return [TarMember(path, n) for n in sorted(names) if n.lower().endswith(readers.IMAGE_EXTENSIONS)]


def _document_images(doc: readers.Document) -> list:
    segments = list(doc.segments) + [s for _, turn in doc.turns for s in turn]
    return [ref for kind, ref in segments if kind == "image"]


def image_refs(inputs: list[str]) -> list:
    """Every image of `inputs` (folders, JSONL, tar shards), in the readers' fixed order."""
    refs = []
    try:
        units = readers.plan(inputs, docs_per_shard=1 << 30)
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"data inputs {inputs}: {e}; point --config.data.inputs at image folders, JSONL "
                         "files or .tar shards (comma-separated)") from e
    for unit in units:
        if unit.kind == "folder":  # captions are for pretokenize; the tokenizer needs only the pixels
            names = sorted(f for f in os.listdir(unit.path) if f.lower().endswith(readers.IMAGE_EXTENSIONS))
            refs += [os.path.join(unit.path, f) for f in names]
        elif unit.kind == "tar":
            refs += _tar_images(unit.path)
        else:
            for item in readers.read(unit):
                if item.document is None:
                    log.warning("skipping %s: %s", item.key, item.error)
                else:
                    refs += _document_images(item.document)
    if not refs:
        raise ValueError(f"data.inputs {inputs} hold no images ({'/'.join(readers.IMAGE_EXTENSIONS)}); "
                         "point --config.data.inputs at an image folder, a JSONL file or .tar shards")
    return refs


def load(ref, size: int) -> np.ndarray:
    """One image ref -> float32 [size, size, 3] in [-1, 1]; raises BadImage."""
    if isinstance(ref, TarMember):
        try:
            ref = _read_member(ref)
        except (tarfile.TarError, OSError, KeyError) as e:
            raise images_lib.BadImage(f"{ref[0]}:{ref[1]}: {type(e).__name__}: {e}") from e
    return images_lib.load_image(ref, size)


class _Load:
    """ref -> {"images": [S, S, 3]}, or None (a logged skip) if the file cannot be decoded."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, ref):
        try:
            return {"images": load(ref, self.size)}
        except images_lib.BadImage as e:
            log.warning("skipping an image that cannot be decoded: %s", e)
            return None


def split_inputs(data_config, eval_config) -> tuple[list, list]:
    """(training refs, held-out refs). Without eval.inputs, eval.num_images images chosen by data.seed
    are held back from training."""
    refs = image_refs(_paths(data_config.inputs, "data.inputs"))
    n_eval = int(eval_config.get("num_images", 0))
    if eval_config.get("inputs", ""):
        return refs, image_refs(_paths(eval_config.inputs, "eval.inputs"))[:n_eval]
    if n_eval >= len(refs):
        raise ValueError(f"data.inputs hold {len(refs)} images, too few to hold back eval.num_images={n_eval}; "
                         "lower eval.num_images or give held-out images in eval.inputs")
    held = set(np.random.default_rng(data_config.seed).permutation(len(refs))[:n_eval].tolist())
    return [r for i, r in enumerate(refs) if i not in held], [refs[i] for i in sorted(held)]


def _paths(value, name: str) -> list[str]:
    paths = [p.strip() for p in (value.split(",") if isinstance(value, str) else value) if p.strip()]
    if not paths:
        raise ValueError(f"{name} is empty: set --config.{name}=/path/to/images (comma-separate several)")
    return paths


# ------------------------------------------------------------------------------------------ pipelines
def make_iterator(data_config, eval_config=None, *, batch_size: int):
    """The resumable iterator of this process's image batches for `config.data`."""
    kind = data_config.get("kind", "shapes")
    count, index = jax.process_count(), jax.process_index()
    if batch_size % count:
        raise ValueError(f"train.batch_size={batch_size} does not split over {count} processes; "
                         f"use a multiple of {count}")
    threads = int(data_config.get("threads", 2))
    if kind == "shapes":  # one element is a whole batch: `threads` batches are drawn ahead
        ds = grain.MapDataset.source(ShapesBatches(data_config, batch_size, index, count))
        return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=threads)))
    if kind == "images":
        train_refs, _ = split_inputs(data_config, eval_config or {})
        rows = batch_size // count
        ds = (grain.MapDataset.source(train_refs).shuffle(seed=int(data_config.seed)).repeat(None)
              [index::count].map(_Load(int(data_config.image_size))))
        # Undecodable images come out as None, which the iterator drops before batching.
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(threads, 2 * rows)))
        return iter(ds.batch(rows, drop_remainder=True))
    raise ValueError(f"config.data.kind={kind!r}; choose 'shapes' (procedural scenes) or 'images' "
                     "(data.inputs: image folders, JSONL, tar shards)")


def eval_images(data_config, eval_config) -> tuple[np.ndarray, list | None]:
    """The held-out images float32 [N, S, S, 3] and, for shapes, their scenes (for the analyzer).

    Shapes: distinct `val` scenes (`shapes.iter_split(unique=True)`): plain draws repeat the few
    single-object scenes so often that one of them decided ~6% of the score."""
    size = int(data_config.image_size)
    if data_config.get("kind", "shapes") == "shapes":
        scenes = list(shapes.iter_split("val", data_config.seed, eval_config.num_images, unique=True))
        return shapes.render_batch(scenes, size).astype(np.float32) / 127.5 - 1.0, scenes
    _, held = split_inputs(data_config, eval_config)
    loaded = [_Load(size)(ref) for ref in held]
    kept = [x["images"] for x in loaded if x is not None]
    if not kept:
        raise ValueError("no held-out image could be decoded; check eval.inputs / data.inputs")
    return np.stack(kept), None
