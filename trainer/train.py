"""The training run (§5): :class:`Trainer` builds, restores, then trains epoch by epoch.

``train(config) -> summary`` runs (or resumes) one run directory (files: rundir.py, checkpoint.py).
Read :class:`Trainer` top to bottom: ``__init__`` builds the model, optimiser, schedule, step and
loaders; :meth:`~Trainer.restore` loads a checkpoint; :meth:`~Trainer.fit` loops over epochs;
:meth:`~Trainer.train_epoch` over batches, each one optimiser step; :meth:`~Trainer.end_epoch`
evaluates, steps the schedule and writes the epoch's checkpoint. The step (step.py), when to stop
(stop.py), checkpoints (checkpoint.py) and metrics (rundir.py) each live in their own module.

No host synchronisation between log points: the loss accumulates on the device; at a log point the
interval's mean loss and the layers' norms (health.py) start their copy to the host
(:class:`LogPoint`) and the previous interval's are read, checked and written to metrics.jsonl, one
interval late. Before any checkpoint or epoch end (:meth:`Trainer._flush`) every interval up to the
step is read and checked: a checkpoint never holds a non-finite loss or weights.

Exactness of ``--resume``: the checkpoint carries the model, the optimiser's velocities, the
schedule, the counters, every generator the step draws from (torch CPU and CUDA: dropout; numpy;
python) and the pipeline's position. On the CPU a run killed after a checkpoint and resumed ends
with bitwise the same weights as an uninterrupted run (tested). On GPUs cuDNN's algorithm choice
and atomics make runs close, not bitwise (on an H100 in bf16, 60 steps after a resume: losses
within 0.001, weights within 0.007).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from alexnet.pipeline import locks
from alexnet.pipeline.artifacts import atomic_write_json, check_shards, read_manifest, read_mean_image, read_stats
from alexnet.pipeline.errors import AlexnetError

from . import checkpoint as ckpt_io
from . import distributed as D
from .config import TrainConfig
from .evaluate import evaluate
from .health import (
    FeedInterval,
    FeedWait,
    FeedWatch,
    HostCopy,
    LayerNorms,
    LossWatch,
    device_memory,
)
from .model import LEARNED_LAYERS
from .optim import create_optimizer, set_lr
from .replica import (
    Replica,
    build_model,
    create_loader_for,
    replica_seed,
    seed_everything,
    start_replica,
)
from .rundir import MetricsLog, RunDir, default_run_dir, record, truncate_metrics, versions
from .schedule import create_schedule
from .step import create_step
from .stop import IntervalRead, StopPolicy, StopSignals


@dataclass
class RunState:
    epoch: int = 0  # completed epochs
    step: int = 0  # optimiser steps done
    batch_in_epoch: int = 0  # steps done in the current epoch
    best_top1_err: float | None = None
    last_eval: dict[str, Any] = field(default_factory=dict)
    elapsed_before: float = 0.0  # seconds the run had taken before this process resumed it
    images: int = 0  # images trained on in this process (for the mean rate)
    train_seconds: float = 0.0
    last_loss: float = float("nan")


@dataclass
class LogPoint:
    """A log point's metrics.jsonl train line: the host's fields taken at the log point; the mean loss
    and (on the main replica) the layers' norms on their way to the host, read one interval later."""

    record: dict[str, Any]  # "loss" (and the norms) filled in when read
    stamp: dict[str, float]  # elapsed_s and time at the log point
    first: int  # the interval's first step
    values: HostCopy
    feed: FeedInterval  # the step's waits for its batches, in seconds when read
    interval_s: float  # the interval's host time


def train(config: TrainConfig) -> dict[str, Any]:
    """Train (or resume) one run; returns a summary dict."""
    t0 = time.monotonic()
    world = D.dist_info_from_env().world_size
    if config.optim.batch_size % world:  # before joining the group: every replica refuses alike
        raise AlexnetError(
            f"--batch-size {config.optim.batch_size} is the global batch and must divide evenly over "
            f"{world} replicas: give a multiple of {world}"
        )
    replica = start_replica(config.run.gpus)
    try:
        # SIGTERM, SIGUSR1, Ctrl-C: stop after the step, with a checkpoint
        with StopSignals() as signals, hold_run(config, replica) as config:
            return Trainer(prepare_run(config, replica), replica, signals, t0).fit()
    finally:
        D.destroy_process_group()


@contextlib.contextmanager
def hold_run(config: TrainConfig, replica: Replica):
    """The run's locks (pipeline/locks.py), before anything is read or written: the data directory
    shared by every replica, the run directory exclusively by the main replica (for the whole job on
    several nodes). Every replica learns whether all were granted, so a refusal stops them all with
    the same line. Yields the config with its run directory resolved."""
    info = replica.info
    run_dir = Path(D.broadcast_object(config.run.run_dir or str(default_run_dir()), info))
    with contextlib.ExitStack() as stack:
        mine: Exception | None = None
        try:
            stack.enter_context(locks.hold(Path(config.run.data_dir), locks.SHARED, "alexnet-train (reading)"))
            if info.is_main:
                stack.enter_context(locks.hold(run_dir, locks.EXCLUSIVE, "alexnet-train (training)"))
        except (AlexnetError, OSError) as e:
            mine = e
        refused = [m for m in D.all_gather_objects(None if mine is None else str(mine), info) if m]
        if mine is not None:
            raise mine
        if refused:
            raise AlexnetError(refused[0])
        yield config.replace(run_dir=str(run_dir))


def prepare_run(config: TrainConfig, replica: Replica) -> TrainConfig:
    """The config resolved for this run: run directory, devices, classes; refuses a clash with a saved run."""
    info = replica.info
    manifest = read_manifest(Path(config.run.data_dir))
    if "train" not in manifest.splits:
        raise AlexnetError(f"the dataset at {config.run.data_dir} has no train split")
    for split in manifest.splits:  # a manifest that no longer matches its shards: one line, before any work
        check_shards(Path(config.run.data_dir), manifest, split)
    run_dir = Path(config.run.run_dir)  # resolved by hold_run
    last_path = RunDir(run_dir).last
    if info.restart:  # torchrun restarted the group after a failure: continue, --resume or not
        found = last_path.exists()
        replica.say(
            f"torchrun restart {info.restart}: "
            + ("resuming from the last checkpoint" if found else f"no checkpoint at {last_path}: starting afresh")
        )
        config = config.replace(resume=found)
    elif config.run.resume and not last_path.exists():  # a requeued job that always passes --resume
        replica.say(f"nothing to resume at {last_path}: starting the run")
        config = config.replace(resume=False)
    elif not config.run.resume and last_path.exists():
        raise AlexnetError(
            f"{run_dir} already holds a run (checkpoints/last.pt): add --resume to continue it, or choose another --run-dir"
        )
    pipelines = config.data.resolved_pipelines(str(replica.devices[0]))  # recorded resolved
    return config.replace(
        run_dir=str(run_dir), gpus=replica.gpus, num_classes=len(manifest.classes), pipelines=pipelines
    )


class Trainer:
    """One replica's training run; see the module docstring for the reading order."""

    def __init__(self, config: TrainConfig, replica: Replica, signals: StopSignals, t0: float):
        self.config, self.replica, self.t0 = config, replica, t0
        self.info, run = replica.info, config.run
        self.run_dir = Path(run.run_dir)
        self.data_dir = Path(run.data_dir)
        self.model = build_model(config, replica, run.num_classes)
        if self.info.rank:  # dropout masks of their own on the other replicas
            seed_everything(replica_seed(run.seed, self.info.rank))
        self.optimizer = create_optimizer(self.model, config.optim.lr, config.optim.momentum, config.optim.weight_decay)
        self.schedule = create_schedule(config.optim)
        self.step_fn = create_step(
            self.model, self.optimizer, config.model, list(replica.devices), self.info.world_size
        )
        self.step_note = self.step_fn.note  # what the step runs (precision, graph, compile), for the first line
        self.scaler = self.step_fn.scaler  # fp16's loss scaler (its scale is part of an exact resume), else None
        self.train_loader = create_loader_for(config, "train", replica)
        self.train_loader.static_input = self.step_fn.static_input  # bf16: the cast writes the graph's input
        self.val_loader = None  # built at the first evaluation
        self.state = RunState()
        self.watch = LossWatch(run.num_classes, run.stall_intervals, run.stall_band, run.explode_factor)
        self.checkpoints = ckpt_io.Checkpointer(self.run_dir, run.keep_epochs, self.info.is_main)
        self.resumed = run.resume and self.restore()
        self.stop = StopPolicy(run, signals, self.info, t0, self.checkpoints.last, self.state.step)
        self.metrics = self._open_run_dir()
        self.dataset_entry = self._dataset_entry()
        self.has_val = "val" in read_manifest(self.data_dir).splits
        self.bar, self.epoch_len = None, 1
        self.norms = LayerNorms(self.model, LEARNED_LAYERS) if self.info.is_main else None
        self.pending: LogPoint | None = None  # the last log point's values, read at the next one
        self.feed = FeedWait(replica.devices[0])
        self.feed_watch = FeedWatch()
        self._reset_meter()

    # ------------------------------------------------------------------ build and restore
    def restore(self) -> bool:
        """Model, optimiser, schedule, counters, generators and pipeline position from last.pt."""
        path, state = self.checkpoints.last, self.state
        ck = ckpt_io.load_checkpoint(path)
        fc8 = ck["model"].get("fc8.weight")
        if fc8 is not None and fc8.shape[0] != self.config.run.num_classes:
            raise AlexnetError(
                f"{path} was trained on {fc8.shape[0]} classes, the dataset at {self.data_dir} has "
                f"{self.config.run.num_classes}: resume with the dataset it was trained on (--data-dir)"
            )
        self.model.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        try:
            self.schedule.load_state_dict(ck["schedule"])
        except ValueError as e:
            raise AlexnetError(f"{path}: {e}") from None
        state.epoch, state.step, state.batch_in_epoch = int(ck["epoch"]), int(ck["step"]), int(ck["batch_in_epoch"])
        state.best_top1_err, state.last_eval = ck.get("best_top1_err"), dict(ck.get("last_eval") or {})
        state.elapsed_before = float(ck.get("elapsed_s") or 0.0)
        self.watch.load_state_dict(ck.get("loss_watch") or {})
        if self.scaler is not None and ck.get("scaler"):
            self.scaler.load_state_dict(ck["scaler"])
        self._restore_replica(ck)
        if self.train_loader.note:  # the buffer shuffle replays or restarts the epoch
            self.replica.say(f"note: {self.train_loader.note}")
        if self.train_loader.consumed == 0:  # restarted (the buffer shuffle with another replica count)
            state.batch_in_epoch = 0
        self.replica.say(
            f"resuming at step {state.step} from {path} (epoch {state.epoch}, +{state.batch_in_epoch} batches)"
        )
        return True

    def _restore_replica(self, ck: dict) -> None:
        """The loader's position and this replica's generators. The position (epoch, records consumed,
        seed) is the same on every replica and continues the epoch's permutation with any replica
        count; the dropout generators are per replica, so another count seeds them afresh."""
        self.train_loader.load_state_dict(ck["loader"])
        if int(ck["world_size"]) == self.info.world_size:
            ckpt_io.set_rng_state(ck["rng"][self.info.rank])
        else:
            seed_everything(replica_seed(self.config.run.seed, self.info.rank, self.state.step))

    def _open_run_dir(self) -> MetricsLog:
        if self.info.is_main:
            run = RunDir(self.run_dir)
            run.root.mkdir(parents=True, exist_ok=True)
            self.config.replace(resume=False).save(run.config)  # --resume is a command, not the run
            atomic_write_json(run.versions, versions())
            # Records after the checkpoint (all of them for a restart that starts afresh: they will be redone).
            truncate_metrics(run, self.state.step if self.resumed else -1)
        metrics = MetricsLog(
            self.run_dir,
            self.info.is_main,
            self.t0,
            self.state.elapsed_before,
            resume_step=self.state.step if self.resumed or self.info.restart else None,
        )
        if metrics.note:
            self.replica.say(metrics.note)
        return metrics

    def _dataset_entry(self) -> dict | None:
        """What predict and export need besides the weights (classes, names, the mean subtracted)."""
        if not self.info.is_main:
            return None
        channel = read_stats(self.data_dir).mean_rgb if self.config.data.mean == "channel" else None
        return ckpt_io.dataset_entry(read_manifest(self.data_dir), read_mean_image(self.data_dir), channel)

    # ------------------------------------------------------------------ the run
    def fit(self) -> dict[str, Any]:
        replica = self.replica
        replica.say(
            replica.note + (f"; {self.info.world_size} replicas" if self.info.enabled else "") + f"; {self.step_note}"
        )
        self.model.train()
        reason = ""
        try:
            while not reason:
                reason = self.stop.before_epoch(self.state.epoch, self.state.step, self.schedule.done)
                if reason:
                    break
                reason = self.train_epoch()
                if reason:
                    self.save(reason)
                    break
                self.end_epoch()
                reason = self.stop.at_epoch_end()
        finally:
            if self.bar is not None:
                self.bar.close()
            self.metrics.close()
        return self.summary(reason)

    def train_epoch(self) -> str:
        """The rest of the current epoch; returns why the run stops within it ("" if it finished)."""
        state, run = self.state, self.config.run
        set_lr(self.optimizer, self.schedule.start_epoch(state.epoch))
        # len(loader): the batches left from its position, the same on every replica (pipeline/order.py).
        self.epoch_len = state.batch_in_epoch + len(self.train_loader)
        self._open_bar()
        t, steps0, reason = time.monotonic(), state.step, ""
        for images, labels in self.feed.batches(self.train_loader):
            self._meter_add(self.step_fn(images, labels))
            state.step += 1
            state.batch_in_epoch += 1
            self.bar.update(1)
            reason = self.after_step()
            if reason:
                break
        if not run.max_steps or reason:
            self.bar.close()
        state.train_seconds += time.monotonic() - t
        state.images += (state.step - steps0) * self.config.optim.batch_size
        return reason

    def after_step(self) -> str:
        """Log point, periodic checkpoint and stop decision after one step (none at the epoch's last step:
        the epoch's end evaluates, checkpoints and decides). No host synchronisation between log points;
        at a log point the previous interval's values are read, checked and written."""
        step = self.state.step
        log_point = step % self.config.run.log_every_steps == 0
        previous = self.pending
        if log_point:
            self.pending = self._log_point()  # this interval's values start their copy before the read
        read = self._read(previous) if log_point and previous is not None else None
        decision = self.stop.after_step(step, log_point, read)
        if read is not None:
            self._write(previous)
        if self.state.batch_in_epoch >= self.epoch_len:
            return ""
        if decision.checkpoint:
            self.save("periodic")
        return decision.stop

    def end_epoch(self) -> None:
        state = self.state
        self._flush()
        state.epoch += 1
        state.batch_in_epoch = 0
        self.metrics.write(record("epoch_end", epoch=state.epoch, step=state.step))
        is_best = False
        if self.has_val and state.epoch % self.config.run.eval_every_epochs == 0:
            is_best = self.evaluate()
        self.save("epoch", epoch_end=True, is_best=is_best)

    def evaluate(self) -> bool:
        """Centre-crop validation (§4.1), the schedule's observation; True if it is the best so far."""
        cfg, state = self.config, self.state
        if self.val_loader is None:
            self.val_loader = create_loader_for(cfg, "val", self.replica)
        res = evaluate(
            self.model, self.val_loader, precision=cfg.model.precision, info=self.info, progress=cfg.run.progress
        )
        state.last_eval = res
        self.metrics.write(record("eval", split="val", ten_crop=False, step=state.step, epoch=state.epoch, **res))
        is_best = state.best_top1_err is None or res["top1_err"] < state.best_top1_err
        if is_best:
            state.best_top1_err = res["top1_err"]
        event = self.schedule.observe(res["top1_err"])
        note = {"drop": " -> divided by 10 (plateau)", "done": " -> stalled after the last drop: stop"}.get(
            event or "", ""
        )
        self.replica.say(
            f"epoch {state.epoch}: val top-1 error {100 * res['top1_err']:.2f}%, top-5 {100 * res['top5_err']:.2f}% "
            f"(centre crop, {res['images']} images), lr {self.schedule.lr:g}{note}"
        )
        return is_best

    # ------------------------------------------------------------------ checkpoints
    def save(self, reason: str, *, epoch_end: bool = False, is_best: bool = False) -> None:
        """A checkpoint of every replica's state (gathered to the main replica, which writes it)."""
        D.peers_alive(self.info)  # a lost replica: exit at once (restarted by torchrun), never a partial checkpoint
        if not epoch_end:
            self._flush()  # no checkpoint from non-finite weights
        state = self.state
        rngs = D.all_gather_objects(ckpt_io.rng_state(), self.info)  # dropout streams differ per replica
        if self.checkpoints.enabled:  # the main replica writes; the others only add their generators
            self.checkpoints.save(
                self._payload(reason, rngs), epoch=state.epoch if epoch_end else None, is_best=is_best
            )
        self.stop.saved(state.step)

    def _payload(self, reason: str, rngs: list) -> dict[str, Any]:
        state = self.state
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "epoch": state.epoch,
            "step": state.step,
            "batch_in_epoch": state.batch_in_epoch,
            "world_size": self.info.world_size,
            "rng": rngs,
            "loader": self.train_loader.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "config": self.config.to_dict(),
            "best_top1_err": state.best_top1_err,
            "last_eval": state.last_eval,
            "elapsed_s": state.elapsed_before + time.monotonic() - self.t0,
            "loss_watch": self.watch.state_dict(),
            "dataset": self.dataset_entry,
            "reason": reason,
        }

    # ------------------------------------------------------------------ metrics and progress
    def _reset_meter(self) -> None:
        self.loss_sum = torch.zeros((), device=self.model.output_device)
        self.loss_steps = 0
        self.last_log_time, self.last_log_step = time.monotonic(), self.state.step

    def _meter_add(self, loss: torch.Tensor) -> None:
        self.loss_sum += loss  # on the device: no synchronisation per step
        self.loss_steps += 1

    def _log_point(self) -> LogPoint:
        """The interval since the last log point: its host figures now; its mean loss and the layers'
        norms after this step computed on the device (one tensor) and copied to the host without waiting."""
        state, now = self.state, time.monotonic()
        interval_s = max(now - self.last_log_time, 1e-9)
        rate = self.config.optim.batch_size * (state.step - self.last_log_step) / interval_s
        values = (self.loss_sum / max(self.loss_steps, 1)).reshape(1)
        if self.norms is not None:
            values = torch.cat([values, self.norms.compute(values.device)])
        line = record(
            "train",
            step=state.step,
            epoch=state.epoch,
            epoch_progress=round(state.batch_in_epoch / self.epoch_len, 4),
            loss=None,
            lr=self.schedule.lr,
            images_per_s=round(rate, 2),
        )
        memory = device_memory(self.replica.devices)
        if memory:
            line["memory"] = memory
        point = LogPoint(
            line, self.metrics.stamp(), self.last_log_step + 1, HostCopy(values), self.feed.take(), interval_s
        )
        self._reset_meter()
        return point

    def _read(self, point: LogPoint) -> IntervalRead:
        """The interval's values on the host (waits for their copy only), into its line."""
        values = point.values.read()
        point.record["loss"] = values[0]
        wait = point.feed.seconds()  # its events completed before the values' copy
        point.record.update(feed_wait_s=round(wait, 4), feed_wait_share=round(min(wait / point.interval_s, 1.0), 4))
        norms = self.norms.as_dict(values[1:]) if self.norms is not None else {}
        point.record.update(norms)
        # The loss and the weights decide; not the gradients: under --precision fp16 the loss scaler skips a
        # step whose gradients overflowed (inf) by design, and a NaN gradient reaches the weights a step later.
        finite = all(math.isfinite(v) for v in [values[0], *norms.get("weight_norm", {}).values()])
        return IntervalRead(values[0], point.first, point.record["step"], finite)

    def _flush(self) -> None:
        """Before a checkpoint or an epoch's end: read, check and write every interval up to this step
        (a checkpoint synchronises anyway), so that no checkpoint holds non-finite weights."""
        points = [self.pending, self._log_point() if self.loss_steps else None]
        self.pending = None
        for point in points:
            if point is not None:
                self.stop.check(self._read(point))  # raises on a non-finite value
                self._write(point)

    def _write(self, point: LogPoint) -> None:
        """One metrics.jsonl train line (with the layers' norms), alerts, the progress bar's figures."""
        rec = point.record
        self.state.last_loss = loss = rec["loss"]
        self.metrics.write(rec, point.stamp)
        feed = self.feed_watch.observe(point.first, rec["step"], rec["feed_wait_share"], loss)
        for alert in [*self.watch.observe(rec["step"], loss), *feed]:
            self.replica.say(alert["message"])
            self.metrics.write(alert, point.stamp)
        if self.bar is not None:
            figures = {"img/s": f"{rec['images_per_s']:.0f}", "loss": f"{loss:.4f}", "lr": f"{rec['lr']:g}"}
            figures["wait"] = f"{100 * rec['feed_wait_share']:.0f}%"
            if "memory" in rec:
                peak = max(m["peak_allocated_gib"] for m in rec["memory"].values())
                figures["mem"] = f"{peak:.1f}G"
            self.bar.set_postfix(figures)

    def _open_bar(self) -> None:
        """One bar per epoch; with --max-steps one bar for the whole run (its ETA is the run's)."""
        from tqdm import tqdm

        run, state = self.config.run, self.state
        if self.bar is not None and run.max_steps:
            return
        total, done = (run.max_steps, state.step) if run.max_steps else (self.epoch_len, state.batch_in_epoch)
        desc = "steps" if run.max_steps else f"epoch {state.epoch + 1}" + (f"/{run.epochs}" if run.epochs else "")
        self.bar = tqdm(
            total=total,
            initial=done,
            unit="step",
            dynamic_ncols=True,
            desc=desc,
            file=sys.stderr,
            disable=not (run.progress and self.info.is_main),
        )

    def summary(self, reason: str) -> dict[str, Any]:
        state = self.state
        return {
            "run_dir": str(self.run_dir),
            "gpus": self.replica.gpus,
            "world_size": self.info.world_size,
            "stop_reason": reason,
            "signal": self.stop.signals.received,
            "steps": state.step,
            "epochs_completed": state.epoch,
            "final_loss": state.last_loss,
            "lr": self.schedule.lr,
            "val_top1_err": state.last_eval.get("top1_err"),
            "val_top5_err": state.last_eval.get("top5_err"),
            "best_top1_err": state.best_top1_err,
            "images_per_s": state.images / state.train_seconds if state.train_seconds else None,
            "elapsed_s": time.monotonic() - self.t0,
            "checkpoint": str(self.checkpoints.last),
        }
