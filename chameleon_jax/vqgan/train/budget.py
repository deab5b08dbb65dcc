"""Fitting a VQ-GAN run to a wall-clock budget (`train.fit_to_budget`, `train.time_budget_s`)."""
from __future__ import annotations

import json

import jax
import ml_collections
from etils import epath


class BudgetPlan:
    """With `train.fit_to_budget`, sizes the schedule to the wall-clock budget on the machine at hand.

    The step time is measured over the warm-up (whose learning rates do not depend on the schedule's
    length), and the run is planned to end, fully decayed, within `train.time_budget_s` with a margin;
    `train.steps` is then an upper bound, and the decay lengths scale with the planned steps. At each
    checkpoint the plan is checked against the recent step time and shortened if the machine slowed
    down, so a slow spell costs steps rather than a run cut off at a high learning rate. The plan is
    kept in workdir/schedule.json, so a resumed run follows the schedule it started with.
    """

    MARGIN = 0.9  # planned time / time left: room for noise and checkpoint writes

    def __init__(self, config, workdir):
        self._config, self._file = config, epath.Path(workdir) / "schedule.json"
        self.enabled = bool(config.train.get("fit_to_budget", False) and config.train.get("time_budget_s", 0))
        if self.enabled and jax.process_count() > 1:
            # each host would time its own steps and could plan a different length: the hosts' step
            # counts would diverge and the collectives hang
            raise ValueError(f"train.fit_to_budget plans from one host's step time, but {jax.process_count()} "
                             "processes are running: set --config.train.fit_to_budget=False and size "
                             "train.steps / optim.decay_steps yourself")
        self.steps = config.train.steps
        self._planned = False
        if self.enabled and self._file.exists():
            self.steps, self._planned = json.loads(self._file.read_text())["steps"], True
        self._mark = None  # (done, elapsed) where the current timing window began
        self._restart = False  # a new plan recompiles the step: start the next window after that

    def config(self):
        c = ml_collections.ConfigDict(self._config.to_dict())
        if self.steps != c.train.steps:
            scale = self.steps / c.train.steps
            for o in (c.optim, c.disc_optim):
                o.decay_steps = max(1, round(o.decay_steps * scale))
        return c

    def wants_timing(self, done: int, start: int) -> bool:
        if not self.enabled:
            return False
        warm = max(self._config.optim.warmup_steps, 10)
        return done == start + 1 or self._restart or (not self._planned and done == start + warm) or \
            done % self._config.checkpoint.every == 0

    def update(self, done: int, start: int, elapsed: float) -> bool:
        """Called (after a device sync) at the points `wants_timing` picks; True if the plan changed."""
        mark, self._mark = self._mark, (done, elapsed)
        if mark is None or done == start + 1 or self._restart:  # those steps included compilation
            self._restart = False
            return False
        per_step = (elapsed - mark[1]) / (done - mark[0])
        left = self._config.train.time_budget_s - elapsed
        if self._planned and done + left / per_step >= self.steps:
            return False  # still on time (the margin is kept for new plans, so it does not compound)
        new = min(self._config.train.steps, max(done + 1, done + int(self.MARGIN * left / per_step)))
        changed = new != self.steps
        self.steps, self._planned, self._restart = new, True, changed
        if jax.process_index() == 0:
            self._file.write_text(json.dumps({"steps": new, "seconds_per_step": per_step, "at_step": done}))
        return changed
