"""Scalars to `metrics.jsonl` and TensorBoard (tensorboardX), images to PNGs and TensorBoard; process 0 writes.

    writer = MetricsWriter(workdir, resume_step=step)
    writer.write(step, {"train/loss": 2.3, "perf/mfu": 0.21})
    writer.write_image(step, "eval/reconstructions", grid)   # uint8 [H, W, 3]: TensorBoard + a PNG
    read_metrics(workdir)   # -> list of dicts, one per write, each with "step"

On resume from step s, records after s (written by the interrupted run past its last checkpoint) are
dropped from metrics.jsonl, so the file reads like one uninterrupted run.

The workdir may be an object store (gs://), which has no append: there metrics.jsonl is rewritten whole
at each write (it stays small: one line per logging window; durable before the checkpoint that follows
it), and TensorBoard events are written to a local folder that is uploaded at most every 30 s and at
close (`storage.MirroredDir`): a killed run's last half minute of events may be missing there.
"""
from __future__ import annotations

import io
import json
import math
import sys
import time

import numpy as np
from etils import epath

from chameleon_jax import storage


def read_metrics(workdir) -> list[dict]:
    path = epath.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _drop_after(path: epath.Path, step: int) -> list[str]:
    """Keeps the records up to `step` (rewriting the file whole); returns them, one line each."""
    if not path.exists():
        return []
    keep = [line + "\n" for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= step]
    storage.write_atomic(path, "".join(keep))
    return keep


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported without torch.

    tensorboardX imports torch whenever it is installed, only to accept torch tensors (never passed
    here). With torch present (the `peers` extra) that import was 3.7 s of every training process's
    start-up, 4.7 s against 1.0 s for tensorboardX as a whole (`python -X importtime`, 2026-12-02). A
    None entry in sys.modules makes that optional import fail at once; a torch already imported is used.
    """
    if "torch" in sys.modules or "tensorboardX.writer" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class MetricsWriter:
    def __init__(self, workdir, *, enabled: bool = True, resume_step: int = 0, tensorboard: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        workdir = epath.Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self.path = workdir / "metrics.jsonl"
        self._images = workdir / "images"
        lines = _drop_after(self.path, resume_step)
        # Locally, append; on an object store, keep every line here and rewrite the object at each write.
        self._lines = None if not storage.is_remote(self.path) else lines
        self._file = self.path.open("a") if self._lines is None else None
        self._tb = None
        if tensorboard:
            SummaryWriter = _summary_writer_class()
            # tensorboardX's own gs:// writer is broken (no `buffer` attribute); it writes a local mirror,
            # uploaded at most every 30 s (each upload rewrites the event file whole) and at close.
            self._tb_dir = storage.MirroredDir(workdir / "tensorboard", prefix="tensorboard-", min_interval_s=30)
            self._tb = SummaryWriter(self._tb_dir.local, purge_step=resume_step + 1 if resume_step else None)

    def write(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "time": time.time()}
        for k, v in scalars.items():
            v = float(v)
            record[k] = v if math.isfinite(v) else str(v)  # JSON has no NaN/Inf
            if self._tb is not None:
                self._tb.add_scalar(k, v, int(step))
        if self._lines is None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        else:
            self._lines.append(json.dumps(record) + "\n")
            storage.write_atomic(self.path, "".join(self._lines))
        if self._tb is not None:
            self._tb.flush()
            self._tb_dir.sync()

    def write_image(self, step: int, tag: str, image) -> epath.Path | None:
        """A uint8 [H, W, 3] image to TensorBoard and to DIR/images/<tag>_<step>.png (for a look without
        TensorBoard); returns the PNG's path."""
        if not self.enabled:
            return None
        from PIL import Image

        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"write_image takes uint8 [H, W, 3]; got {image.dtype} {image.shape} "
                             "(vqgan.images.to_uint8 converts decoder output)")
        png = io.BytesIO()
        Image.fromarray(image).save(png, format="PNG")
        self._images.mkdir(parents=True, exist_ok=True)
        path = self._images / f"{tag.replace('/', '_')}_{int(step):06d}.png"
        path.write_bytes(png.getvalue())  # one whole object: works on an object store too
        if self._tb is not None:
            self._tb.add_image(tag, image, int(step), dataformats="HWC")
            self._tb.flush()
            self._tb_dir.sync()
        return path

    def close(self) -> None:
        if not self.enabled:
            return
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb_dir.close()  # the last upload of the events
