"""Pod-wide preemption: whichever host gets the notice, every host saves the same step and exits.

A preemption or maintenance notice reaches a TPU VM or a GKE pod as SIGTERM, on some hosts and not
others, and the hosts of a job must save the same step (each writes its part of the checkpoint).

- One process: a Python handler sets a flag; the loop saves at the next step boundary.
- Several processes (jax.distributed): jax's preemption sync manager owns SIGTERM. Its notifier tells the
  coordination service, which picks a sync-point id no host has passed (the largest id any host has
  asked about, 0 before any, + 1); `multihost_utils.reached_preemption_sync_point(id)` turns True on
  every host at that id. The ids are this process's count of questions (module-level, as jax's state
  is), not train steps: every host asks the same questions in the same order, so the counts agree. A
  notice while a run resumed at step k restores or compiles thus picks id 1, the loop's first question;
  with train steps as ids it picked 1 too, a step that run never asks about, and the signal was lost.
  StopSignal asks id 0 on entering (right after jax.distributed.initialize, in the train program).
  No collective runs per step: a step-by-step all-gather of the flag would make every host wait for
  each step's device work before dispatching the next. A Python SIGTERM handler would replace the
  notifier's, so only SIGINT gets one here, and it re-raises itself as SIGTERM for the notifier.

A host that dies without notice cannot take part: the coordination service misses its heartbeats and
stops every other process after `heartbeat_timeout_seconds` of jax.distributed.initialize (chameleon_jax
.train's --heartbeat_timeout_s; 100 s by default), so a pod never hangs on a dead peer.
"""
from __future__ import annotations

import itertools
import logging
import signal

import jax
import numpy as np
from jax._src import distributed
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

# Sync-point ids asked about in this process, 0, 1, 2, ...; the same sequence on every process.
_sync_ids = itertools.count()


def _sync_manager_running() -> bool:
    return (jax.process_count() > 1 and distributed.global_state.client is not None
            and distributed.global_state.preemption_sync_manager is not None)


class StopSignal:
    """`with StopSignal() as stop: ... if stop.agreed(): save and exit`.

    Enter it as early as the program can (right after jax.distributed.initialize) and pass it down, so a
    signal during task building, restore or the first compile is honoured at the first step boundary."""

    def __init__(self):
        self.received = None
        self._previous = {}
        self._pod = False

    def __enter__(self):
        self._pod = _sync_manager_running()
        for sig in (signal.SIGINT,) if self._pod else (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers, no preemption saves
                pass
        if self._pod:
            self._reached_next_sync_point()  # id 0
        return self

    @staticmethod
    def _reached_next_sync_point() -> bool:
        return multihost_utils.reached_preemption_sync_point(next(_sync_ids))

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C aborts without saving
        self.received = signal.Signals(signum).name
        log.warning("%s received: saving a checkpoint at an agreed step boundary, then exiting", self.received)
        if self._pod:
            signal.raise_signal(signal.SIGTERM)  # to the sync manager's notifier, which tells every host

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self) -> bool:
        """True on every process at the same call once any process got a signal.

        Call it once per step, at the step boundary, on every process (the calls are the sync points)."""
        if not self._pod:
            flag = self.received is not None
            if jax.process_count() == 1:
                return flag
            # Several processes without the sync manager (jax_enable_preemption_service off): agree by an
            # all-gather of the flag, which waits for each step's device work.
            return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))
        if self._reached_next_sync_point():
            self.received = self.received or "SIGTERM (on some host)"
            return True
        return False
