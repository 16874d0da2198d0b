"""Soak: does a long run leak? Train on the CPU for >= 1,000 steps and watch the process's memory.

A 90-epoch run must not die of a slow leak (a growing list of tensors, a DALI pipeline rebuilt and
kept, a metrics buffer never cleared). This script trains in this process with ``alexnet-train``'s
own ``train()`` on a small sample (``make-sample``, built with the real tools) at batch 16, with a
centre-crop evaluation every ``--eval-every`` epochs and the epoch checkpoints the trainer writes,
while a thread samples every ``--interval`` seconds:

- ``RssAnon`` from ``/proc/PID/status``, summed over the process and its reader processes: anonymous
  memory (heap, tensors, DALI's host buffers), not the page cache of the LMDB files it reads;
- on a GPU host also ``torch.cuda.memory_allocated()`` (the caching allocator's live tensors).

It prints the growth after the first epoch and its evaluation (they allocate the model, the
optimiser's velocities, DALI's buffers, the val loader): the median of the last 10% of the samples
minus the median of the first 10% after the first evaluation (medians, because serialising a
checkpoint briefly takes about twice its size), with the trend in MB per hour. Goal: growth < 50 MB.

    .venv/bin/python benchmarks/soak.py                     # 1,000 steps: about half an hour on 2 cores
    .venv/bin/python benchmarks/soak.py --steps 60 --train-per-class 10 --eval-every 1   # a quick check

The sample, run and samples go under ``--work`` (default ``/tmp/alexnet-soak``; the sample is kept,
the run starts afresh each time); ``soak.json`` there holds every sample.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

import click

GOAL_MB = 50.0


def rss_anon_mb() -> float:
    """RssAnon (MB) summed over this process and its children (DALI's reader processes are children
    since the reads left the training thread: a leak there counts too)."""
    from bench_build_lmdb import _tree_pids

    total_kb = 0
    for pid in _tree_pids(os.getpid()):
        with contextlib.suppress(OSError):  # a child that has just exited
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    total_kb += int(line.split()[1])
    return total_kb / 1024


class Sampler(threading.Thread):
    """Samples (time, RssAnon MB, CUDA allocated MB or None) every ``interval`` seconds until stopped."""

    def __init__(self, interval: float, cuda: bool):
        super().__init__(daemon=True)
        self.interval, self.cuda = interval, cuda
        self.samples: list[tuple[float, float, float | None]] = []
        self.done = threading.Event()

    def sample(self) -> None:
        cuda = None
        if self.cuda:
            import torch

            cuda = torch.cuda.memory_allocated(0) / 2**20
        self.samples.append((time.time(), rss_anon_mb(), cuda))

    def run(self) -> None:
        while not self.done.wait(self.interval):
            self.sample()


def build_sample(work: Path, train_per_class: int, val_per_class: int) -> Path:
    """make-sample, build-lmdb and pca-stats, through the real commands (skipped when already done)."""
    from click.testing import CliRunner

    from alexnet.tools.cli import main as prep

    sample, data = work / "sample", work / "data"
    steps = []
    if not (sample / "sample_info.json").exists():
        shutil.rmtree(sample, ignore_errors=True)
        steps.append(
            [
                "make-sample",
                str(sample),
                "--classes",
                "10",
                "--train-per-class",
                str(train_per_class),
                "--val-per-class",
                str(val_per_class),
            ]
        )
    if not (data / "stats.json").exists():
        steps += [
            ["build-lmdb", str(sample), "--data-dir", str(data), "--workers", "1"],
            ["pca-stats", "--data-dir", str(data)],
        ]
    for args in steps:
        click.secho("$ alexnet-prep " + " ".join(args), bold=True, err=True)
        r = CliRunner().invoke(prep, args, catch_exceptions=False)
        if r.exit_code != 0:
            raise SystemExit(f"soak: alexnet-prep {args[0]} failed: {r.output.strip()}")
    return data


def warmed_up(run: Path) -> float | None:
    """When everything a run allocates exists: the first evaluation's line (after at least one epoch:
    the model, the velocities, the train and val loaders), or None if the run never got there."""
    from alexnet.trainer.rundir import RunDir, by_kind, read_log

    evals = by_kind(read_log(RunDir(run).metrics, tolerate_torn_tail=True), "eval")
    return float(evals[0]["time"]) if evals else None


def growth(samples: list[tuple[float, float, float | None]], t1: float, column: int) -> dict[str, float] | None:
    """Medians of the first and the last 10% of the samples after ``t1`` (medians: a checkpoint's
    serialisation is a transient of about twice its size), their difference, the peak, and the trend."""
    after = [(s[0], s[column]) for s in samples if s[0] >= t1 and s[column] is not None]
    if len(after) < 20:
        return None
    n = max(len(after) // 10, 2)
    first, last = statistics.median(v for _, v in after[:n]), statistics.median(v for _, v in after[-n:])
    hours = (after[-n // 2][0] - after[n // 2][0]) / 3600
    return {
        "start_mb": first,
        "end_mb": last,
        "growth_mb": last - first,
        "peak_mb": max(v for _, v in after),
        "mb_per_hour": (last - first) / hours if hours > 0 else 0.0,
    }


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--work",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("/tmp/alexnet-soak"),
    show_default=True,
    help="Folder for the sample, the dataset, the run and soak.json.",
)
@click.option("--steps", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option(
    "--train-per-class",
    type=click.IntRange(min=2),
    default=40,
    show_default=True,
    help="Of 10 classes: 400 images, 25 steps per epoch at batch 16.",
)
@click.option("--val-per-class", type=click.IntRange(min=1), default=4, show_default=True)
@click.option(
    "--eval-every", type=click.IntRange(min=1), default=2, show_default=True, help="Epochs between evaluations."
)
@click.option(
    "--interval", type=click.FloatRange(min=0.1), default=2.0, show_default=True, help="Seconds between samples."
)
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True, help="DALI threads.")
def main(
    work: Path,
    steps: int,
    batch_size: int,
    train_per_class: int,
    val_per_class: int,
    eval_every: int,
    interval: float,
    threads: int,
) -> None:
    """Train >= 1,000 CPU steps at batch 16 and report the growth of anonymous memory after epoch 1."""
    import torch

    from alexnet.trainer.config import TrainConfig
    from alexnet.trainer.train import train

    work.mkdir(parents=True, exist_ok=True)
    data, run = build_sample(work, train_per_class, val_per_class), work / "run"
    shutil.rmtree(run, ignore_errors=True)  # a fresh run: one process's memory from its start
    cuda = torch.cuda.is_available()
    cfg = TrainConfig.create(
        data_dir=str(data),
        run_dir=str(run),
        gpus="0" if cuda else "cpu",
        batch_size=batch_size,
        epochs=0,
        max_steps=steps,
        num_threads=threads,
        progress=False,
        eval_every_epochs=eval_every,
        keep_epochs=1,
        checkpoint_minutes=0.0,
        stop_after_last_plateau=False,  # the plateau schedule would end a soak early
    )
    sampler = Sampler(interval, cuda)
    sampler.sample()
    sampler.start()
    t0 = time.monotonic()
    summary = train(cfg)
    sampler.done.set()
    sampler.join()
    sampler.sample()
    report(work, run, sampler, summary, time.monotonic() - t0, cuda)


def report(work: Path, run: Path, sampler: Sampler, summary: dict, seconds: float, cuda: bool) -> None:
    samples = sampler.samples
    t1 = warmed_up(run)
    host = growth(samples, t1, 1) if t1 is not None else None
    device = growth(samples, t1, 2) if t1 is not None and cuda else None
    out = {
        "steps": summary["steps"],
        "epochs": summary["epochs_completed"],
        "seconds": round(seconds, 1),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "rss_anon": host,
        "cuda_allocated": device,
        "goal_mb": GOAL_MB,
        "samples": samples,
    }
    (work / "soak.json").write_text(json.dumps(out, indent=1) + "\n")
    click.echo(
        f"soak: {summary['steps']} steps, {summary['epochs_completed']} epochs in {seconds / 60:.1f} min, "
        f"{len(samples)} samples; {work / 'soak.json'}"
    )
    if host is None:
        click.echo("  fewer than 20 samples after the first evaluation: run more steps (or a smaller --interval)")
        return
    for name, g in (("RssAnon", host), ("CUDA allocated", device)):
        if g is not None:
            verdict = "ok" if g["growth_mb"] < GOAL_MB else "OVER THE GOAL"
            click.echo(
                f"  {name:<15}: {g['start_mb']:8.1f} MB after the first epoch and evaluation, "
                f"{g['end_mb']:8.1f} MB at the end: growth {g['growth_mb']:+.1f} MB "
                f"({g['mb_per_hour']:+.1f} MB/h; peak {g['peak_mb']:.1f} MB while a checkpoint is "
                f"serialised)  goal < {GOAL_MB:.0f} MB: {verdict}"
            )


if __name__ == "__main__":
    main()
