"""A `jax.profiler` trace of chosen train steps, written into the run's workdir (buckets included).

`profile.steps = "10:13"` traces steps 10, 11 and 12 (the step numbers the metrics log, end excluded).
Every process writes its own trace to WORKDIR/profile/process_<i>/plugins/profile/<run>/: an XPlane file
for TensorBoard's profile plugin or XProf (`tensorboard --logdir WORKDIR/profile`) and a Perfetto trace
(`perfetto_trace.json.gz`, open it at ui.perfetto.dev). Each step shows as a `train` step annotation.

The profiler writes through the local file system only, so the trace goes to a local temporary folder
first and is copied to the workdir (etils.epath: gs:// and other object stores) when the last step is done.
"""
from __future__ import annotations

import contextlib
import logging
import pathlib
import shutil
import tempfile

import jax
from etils import epath

from chameleon_jax import storage
# The spec is parsed where the config is validated; the profiler reads it the same way.
from chameleon_jax.config import parse_profile_steps as parse_steps

log = logging.getLogger(__name__)


class StepProfiler:
    """Starts the trace before the first chosen step and stops it once the last one has run."""

    def __init__(self, steps: str, workdir):
        self.steps = parse_steps(steps)
        self.target = epath.Path(workdir) / "profile" / f"process_{jax.process_index()}"
        self._local: str | None = None

    @property
    def active(self) -> bool:
        return self._local is not None

    @contextlib.contextmanager
    def step(self, number: int):
        """Around the dispatch of train step `number` (1-based)."""
        if self.steps is not None and number == self.steps.start and not self.active:
            self._local = tempfile.mkdtemp(prefix="profile_")
            jax.profiler.start_trace(self._local, create_perfetto_trace=True)
            log.info("profiling steps %d..%d into %s", self.steps.start, self.steps.stop - 1, self.target)
        if self.active:
            with jax.profiler.StepTraceAnnotation("train", step_num=number):
                yield
        else:
            yield

    def after(self, number: int, outputs) -> None:
        """After dispatching step `number`: ends the trace once the last chosen step's work is done."""
        if self.active and number >= self.steps.stop - 1:
            jax.block_until_ready(outputs)  # dispatch is asynchronous: wait for the device work to be traced
            self.close()

    def close(self) -> None:
        """Stops a running trace (also when the run ends early) and copies it to the workdir."""
        if not self.active:
            return
        jax.profiler.stop_trace()
        local, self._local = pathlib.Path(self._local), None  # always this machine's temporary folder
        for f in local.rglob("*"):
            if f.is_file():
                dest = self.target / f.relative_to(local)
                dest.parent.mkdir(parents=True, exist_ok=True)
                storage.upload(f, dest)  # whole objects: object stores have no append
        shutil.rmtree(local, ignore_errors=True)
        log.info("profile written to %s", self.target)
