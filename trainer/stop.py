"""When a run stops: :class:`StopPolicy` (limits, a non-finite loss) and preemption by signals.

Preemption: SIGTERM, SIGUSR1 and Ctrl-C stop a run after its current step, with a checkpoint.

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

It writes ``checkpoints/last.pt`` (model, optimiser, schedule, the loader's position, every replica's generators) and
exits with status 128 + the signal's number (143 for SIGTERM, 138 for SIGUSR1, 130 for Ctrl-C).
Running the same command with ``--resume`` continues exactly. A second signal exits at once with the
same status; checkpoints are written atomically, so the previous good one is kept. Signals within
``REPEAT_WINDOW_S`` of the first count as one: a scheduler that signals every process of a job while
srun or torchrun forwards the same signal delivers it twice within milliseconds.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import NamedTuple

from alexnet.pipeline.errors import AlexnetError

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


class NonFiniteLoss(AlexnetError):
    """The loss became NaN or infinite; the run stops and keeps its last good checkpoint."""


class Flags(NamedTuple):
    """What could stop a run or call for a checkpoint, as one replica sees it; agreed (:meth:`StopPolicy._agree`):
    each is True on every replica if it is True on any."""

    non_finite: bool = False  # a value read (the loss, the layers' norms) is NaN or infinite
    checkpoint_due: bool = False  # --checkpoint-minutes have passed since the last checkpoint
    time_up: bool = False  # --time-limit-minutes have passed since the run started
    signalled: bool = False  # one of SIGNALS arrived


@dataclass
class StepDecision:
    checkpoint: bool = False  # write checkpoints/last.pt now
    stop: str = ""  # why the run stops after this step ("" = it goes on)


@dataclass(frozen=True)
class IntervalRead:
    """A log interval's values as read on the host: the mean loss over steps ``first`` .. ``last`` and
    whether every value read (the loss; on the main replica also the layers' norms after step ``last``) is finite."""

    loss: float
    first: int
    last: int
    finite: bool


class StopPolicy:
    """When a run stops, and when it writes a periodic checkpoint: max steps, epochs, the schedule's
    end, the time limit, a non-finite loss or weights, and the signals above.

    Every decision that could differ between replicas (the clock, a signal seen by one of them, a
    non-finite value) is agreed collectively at a log point, a checkpoint or an epoch end, so that all
    replicas stop at the same step. The agreement is a host operation (gloo, distributed.any_flags):
    it does not wait for the GPU. The values checked at a log point are the previous interval's (the
    trainer reads them one interval late); before any checkpoint the trainer reads and checks (:meth:`check`)
    every value up to the current step, so no checkpoint is written from non-finite weights.
    """

    def __init__(self, run, signals: StopSignals, info, t0: float, last_path, step: int):
        self.run, self.signals, self.info, self.t0 = run, signals, info, t0
        self.last_path = last_path  # checkpoints/last.pt, named when a non-finite value stops the run
        self.last_checkpoint, self.last_good_step = time.monotonic(), step

    def before_epoch(self, epoch: int, step: int, schedule_done: bool) -> str:
        if self.run.epochs and epoch >= self.run.epochs:
            return "epochs"
        return "schedule" if schedule_done else self.max_steps(step)

    def max_steps(self, step: int) -> str:
        return "max_steps" if self.run.max_steps and step >= self.run.max_steps else ""

    def _time_up(self, now: float) -> bool:
        return bool(self.run.time_limit_minutes) and now - self.t0 >= 60 * self.run.time_limit_minutes

    def after_step(self, step: int, log_point: bool, read: IntervalRead | None = None) -> StepDecision:
        """After optimiser step ``step``. At a log point the replicas agree on every flag, and ``read``
        (None before the first one is read) is checked; between log points nothing is agreed."""
        now = time.monotonic()
        signalled = self.signals.received is not None
        if log_point:
            minutes = self.run.checkpoint_minutes
            flags = self._agree(
                Flags(
                    non_finite=read is not None and not read.finite,
                    checkpoint_due=bool(minutes) and now - self.last_checkpoint >= 60 * minutes,
                    time_up=self._time_up(now),
                    signalled=signalled,
                )
            )
        else:  # several replicas: a signal waits for the next point where they agree
            flags = Flags(signalled=signalled and not self.info.enabled)
        if flags.non_finite and read is not None:  # (every replica has read at the same log points)
            self._stop_non_finite(read)
        every = self.run.checkpoint_every_steps
        stop = "time_limit" if flags.time_up else "signal" if flags.signalled else self.max_steps(step)
        return StepDecision(checkpoint=flags.checkpoint_due or bool(every and step % every == 0), stop=stop)

    def check(self, read: IntervalRead) -> None:
        """Before a checkpoint or an epoch's end: raises :class:`NonFiniteLoss` if any replica read a
        non-finite value."""
        if self._agree(Flags(non_finite=not read.finite)).non_finite:
            self._stop_non_finite(read)

    def _stop_non_finite(self, read: IntervalRead) -> None:
        kept = self.last_path if self.last_path.exists() else "(none written yet)"
        what = (
            f"the loss became {read.loss} between steps {read.first} and {read.last}"
            if not math.isfinite(read.loss)
            else f"the weights or their gradients became non-finite by step {read.last}"
        )
        raise NonFiniteLoss(
            f"{what}; stopped. The last good checkpoint is kept: {kept} (step {self.last_good_step}). "
            "Lower --lr, or check the data."
        )

    def at_epoch_end(self) -> str:
        """After the epoch's evaluation and checkpoint: the time limit or a signal, agreed."""
        flags = self._agree(Flags(time_up=self._time_up(time.monotonic()), signalled=self.signals.received is not None))
        return "time_limit" if flags.time_up else "signal" if flags.signalled else ""

    def saved(self, step: int) -> None:
        self.last_checkpoint, self.last_good_step = time.monotonic(), step

    def _agree(self, flags: Flags) -> Flags:
        """``flags`` agreed over the replicas (all of them call it at the same point): one all-reduce of
        every field, whichever this point uses."""
        from . import distributed as D  # torch: imported when a run starts, not by the CLI's --help

        return Flags._make(D.any_flags(list(flags), self.info))
