"""Scalar metrics to `metrics.jsonl` and TensorBoard (tensorboardX), written by process 0 only.

    writer = MetricsWriter(workdir, resume_step=step)
    writer.write(step, {"train/loss": 2.3, "perf/mfu": 0.21})
    read_metrics(workdir)   # -> list of dicts, one per write, each with "step"

On resume from step s, records after s (written by the interrupted run past its last checkpoint) are
dropped from metrics.jsonl, so the file reads like one uninterrupted run.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path


def read_metrics(workdir) -> list[dict]:
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _drop_after(path: Path, step: int) -> None:
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)


class MetricsWriter:
    def __init__(self, workdir, *, enabled: bool = True, resume_step: int = 0, tensorboard: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self.path = workdir / "metrics.jsonl"
        _drop_after(self.path, resume_step)
        self._file = self.path.open("a")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(workdir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)

    def write(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "time": time.time()}
        for k, v in scalars.items():
            v = float(v)
            record[k] = v if math.isfinite(v) else str(v)  # JSON has no NaN/Inf
            if self._tb is not None:
                self._tb.add_scalar(k, v, int(step))
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
