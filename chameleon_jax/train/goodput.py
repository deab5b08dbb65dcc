"""Goodput: which part of a run's wall-clock time trained the model, and where the rest went.

    goodput = Goodput()                        # when the run starts
    with goodput.measure("restore"): ...       # time outside the loop, by cause
    goodput.loop_started()
    goodput.add("data_wait", seconds)          # time inside the loop that is not a training step
    metrics.update(goodput.metrics())          # goodput/*, cumulative since the run started

Inside the loop every second is either lost to a named cause (compile, checkpoint, data_wait, eval) or
productive: dispatching and running train steps. Before it, restore and everything unnamed (imports,
init, mesh) are lost time too. So productive + compile + checkpoint + data_wait + eval + restore + other
equals wall time, and `goodput/productive_fraction` is productive over wall. Each process start counts
from zero: after a preemption, the restarted process reports its own restore and compile again.
"""
from __future__ import annotations

import contextlib
import time

# Causes of lost time inside the training loop, and before it.
IN_LOOP = ("compile", "checkpoint", "data_wait", "eval")
BEFORE_LOOP = ("restore",)


class Goodput:
    def __init__(self, clock=time.perf_counter):
        self._clock = clock
        self.start = clock()
        self.seconds = dict.fromkeys(IN_LOOP + BEFORE_LOOP, 0.0)
        self._loop_start: float | None = None

    def add(self, cause: str, seconds: float) -> None:
        if cause not in self.seconds:
            raise KeyError(f"unknown goodput cause {cause!r}; one of {sorted(self.seconds)}")
        self.seconds[cause] += seconds

    @contextlib.contextmanager
    def measure(self, cause: str):
        t = self._clock()
        try:
            yield
        finally:
            self.add(cause, self._clock() - t)

    def loop_started(self) -> None:
        self._loop_start = self._clock()

    def metrics(self) -> dict[str, float]:
        now = self._clock()
        wall = now - self.start
        in_loop = now - self._loop_start if self._loop_start is not None else 0.0
        productive = max(in_loop - sum(self.seconds[c] for c in IN_LOOP), 0.0)
        out = {f"goodput/{cause}_s": s for cause, s in self.seconds.items()}
        out["goodput/productive_s"] = productive
        out["goodput/other_s"] = wall - productive - sum(self.seconds.values())
        out["goodput/wall_s"] = wall
        out["goodput/productive_fraction"] = productive / wall if wall > 0 else 0.0
        return out
