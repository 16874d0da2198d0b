"""Preemption: SIGTERM, SIGUSR1 and Ctrl-C stop a run after its current step, with a checkpoint.

Schedulers send SIGTERM before they kill a job (SLURM can also send SIGUSR1 ahead of a time limit,
``--signal=USR1@120``). torchrun forwards SIGTERM and SIGINT to its workers, and SIGUSR1 only when
started with ``--signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1``; it kills its workers 30 s
after forwarding (``--shutdown-timeout``). The first signal only sets a flag. The trainer then
finishes the step in flight, and:

* in one process, stops after that step;
* with several replicas, stops at the next log point (every ``--log-every-steps``) or epoch end,
  where the replicas already agree on stopping: one replica's signal stops them all at the same step.

A signal during an epoch's last step or its evaluation takes effect after that evaluation and the
epoch's checkpoint, so that the resumed run follows the same schedule.

It writes ``checkpoints/last.pt`` (model, optimiser, schedule, every replica's loader position) and
exits with status 128 + the signal's number (143 for SIGTERM, 138 for SIGUSR1, 130 for Ctrl-C).
Running the same command with ``--resume`` continues exactly. A second signal exits at once with the
same status; checkpoints are written atomically, so the previous good one is kept. Signals within
``REPEAT_WINDOW_S`` of the first count as one: a scheduler that signals every process of a job while
srun or torchrun forwards the same signal delivers it twice within milliseconds.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
REPEAT_WINDOW_S = 2.0


def exit_status(name: str) -> int:
    """The documented exit status of a run stopped by signal ``name`` ("SIGTERM", ...)."""
    return 128 + int(signal.Signals[name])


class StopSignals:
    """Context manager: while active, the first of ``SIGNALS`` sets :attr:`received` (its name)."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._first_at = 0.0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, _frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            if time.monotonic() - self._first_at < REPEAT_WINDOW_S:  # the same event delivered twice
                sys.stderr.write(f"\n{name} within {REPEAT_WINDOW_S:g} s of the first: taken as the same signal\n")
                return
            sys.stderr.write(f"\n{name} again: exiting now; the last checkpoint written is kept\n")
            sys.stderr.flush()
            os._exit(128 + signum)
        self.received, self._first_at = name, time.monotonic()
        sys.stderr.write(
            f"\n{name} received: stopping after the current step with a checkpoint (a second signal exits at once)\n"
        )
        sys.stderr.flush()
