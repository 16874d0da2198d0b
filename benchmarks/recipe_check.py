"""Does the paper's recipe learn? Train from scratch on the CPU at alexnet-train's defaults.

The paper's recipe as the trainer runs it by default: batch 128, lr 0.01 inside the velocity,
momentum 0.9, weight decay 5e-4 on the weights, the §5 init, the plateau schedule, dropout as the
paper ran it. Two runs side by side, identical but for the response normalisation:
``--lrn authors`` (the default, alpha / 5 as the authors' code computed it) and ``--lrn paper-text``.

The sample is drawn by ``make-sample`` (10 classes, with ImageNet's awkward files) and built with the
real tools: by default 500 training and 50 validation images per class; ``--train-per-class 100
--val-per-class 20`` is the demo's sample. Each run logs the loss every step and
evaluates the centre crop at every epoch end. The script prints the curves in numbers and
writes ``recipe_check.png`` (loss and val error of both runs) and ``recipe_check.json``.

    .venv/bin/python benchmarks/recipe_check.py                 # 120 steps each, about 30 min on 2 cores
    .venv/bin/python benchmarks/recipe_check.py --train-per-class 100 --val-per-class 20 --out demo_sample.png

Interrupted, it resumes: the same command continues each run from its last checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import click

from alexnet.trainer.plots import Axes, Series, hstack, line_plot
from alexnet.trainer.rundir import RunDir, by_kind, read_log

ROOT = Path(__file__).resolve().parent
FORMS = ("authors", "paper-text")
COLOURS = {"authors": (0, 114, 178), "paper-text": (213, 94, 0)}


def _bin(name: str) -> str:
    exe = Path(sys.executable).parent / name
    return str(exe) if exe.exists() else name


def _run(args: list[str], env: dict[str, str] | None = None) -> None:
    click.secho("$ " + " ".join(args), bold=True)
    subprocess.run(args, check=True, env={**os.environ, **(env or {})})


def build_sample(work: Path, train_per_class: int, val_per_class: int) -> Path:
    sample, data = work / "sample", work / "data"
    if not (sample / "sample_info.json").exists():
        _run(
            [
                _bin("alexnet-prep"),
                "make-sample",
                str(sample),
                "--classes",
                "10",
                "--awkward",
                "--train-per-class",
                str(train_per_class),
                "--val-per-class",
                str(val_per_class),
            ]
        )
    if not (data / "stats.json").exists():
        _run([_bin("alexnet-prep"), "build-lmdb", str(sample), "--data-dir", str(data)])
        _run([_bin("alexnet-prep"), "pca-stats", "--data-dir", str(data)])
    return data


def train(data: Path, run: Path, lrn: str, steps: int, threads: int) -> None:
    """alexnet-train at its defaults (the paper's recipe) but for the CPU, the length and the LRN form."""
    args = [
        _bin("alexnet-train"),
        "--data-dir",
        str(data),
        "--run-dir",
        str(run),
        "--gpus",
        "cpu",
        "--max-steps",
        str(steps),
        "--log-every-steps",
        "1",
        "--lrn",
        lrn,
        "--threads",
        "1",
        "--checkpoint-minutes",
        "5",
    ]
    if RunDir(run).last.exists():
        args.append("--resume")
    # One DALI thread decodes ahead; torch takes the other threads.
    _run(args, {"OMP_NUM_THREADS": str(threads)})


def curves(run: Path) -> dict:
    records = read_log(RunDir(run).metrics)
    train = {rec["step"]: rec["loss"] for rec in by_kind(records, "train")}
    evals = [(rec["epoch"], rec["step"], rec["top1_err"]) for rec in by_kind(records, "eval")]
    return {"loss": train, "val_top1_err": evals}


def summary_rows(results: dict[str, dict], steps: int) -> list[str]:
    marks = [1, 10, 50, steps]
    head = "| LRN | " + " | ".join(f"loss step {m}" for m in marks) + " | val top-1 error per epoch (%) |"
    rows = [head, "|" + "---|" * (len(marks) + 2)]
    for lrn, c in results.items():
        losses = [f"{c['loss'][m]:.3f}" if m in c["loss"] else "-" for m in marks]
        errs = ", ".join(f"{100 * e:.1f}" for _, _, e in c["val_top1_err"])
        rows.append(f"| {lrn} | " + " | ".join(losses) + f" | {errs} |")
    return rows


def figure(results: dict[str, dict], out: Path, num_classes: int) -> None:
    loss = line_plot(
        [
            Series(f"lrn {k}", sorted(c["loss"]), [c["loss"][s] for s in sorted(c["loss"])], color=COLOURS[k])
            for k, c in results.items()
        ],
        Axes("Training loss, paper's defaults (batch 128, lr 0.01)", "step", "cross-entropy loss"),
    )
    err = line_plot(
        [
            Series(
                f"lrn {k}",
                [s for _, s, _ in c["val_top1_err"]],
                [100 * e for _, _, e in c["val_top1_err"]],
                color=COLOURS[k],
                markers=True,
            )
            for k, c in results.items()
        ],
        Axes(
            "Val top-1 error (centre crop)",
            "step",
            "error (%)",
            ylim=(0.0, 100.0),
            hlines=((100 * (1 - 1 / num_classes), "chance"),),
        ),
    )
    hstack([loss, err]).save(out)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--work",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path.home() / ".cache" / "alexnet" / "recipe-check",
    show_default=True,
    help="Sample, dataset and runs (reused and resumed).",
)
@click.option("--steps", type=click.IntRange(min=1), default=120, show_default=True, help="Optimiser steps per run.")
@click.option("--train-per-class", type=click.IntRange(min=13), default=500, show_default=True)
@click.option("--val-per-class", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True, help="torch threads.")
@click.option(
    "--out", type=click.Path(dir_okay=False, path_type=Path), default=ROOT / "recipe_check.png", show_default=True
)
def main(work: Path, steps: int, train_per_class: int, val_per_class: int, threads: int, out: Path) -> None:
    """Train the paper's recipe from scratch on the CPU with both LRN forms and print the curves."""
    work = work / f"sample-{train_per_class}-{val_per_class}"
    data = build_sample(work, train_per_class, val_per_class)
    results = {}
    for lrn in FORMS:
        run = work / f"run-{lrn}-{steps}"
        train(data, run, lrn, steps, threads)
        results[lrn] = curves(run)
    num_classes = len(json.loads((data / "manifest.json").read_text())["classes"])
    figure(results, out, num_classes)
    out.with_suffix(".json").write_text(
        json.dumps(
            {
                k: {"loss": {str(s): v for s, v in c["loss"].items()}, "val_top1_err": c["val_top1_err"]}
                for k, c in results.items()
            },
            indent=1,
        )
        + "\n"
    )
    click.echo(
        f"\nchance: {100 * (1 - 1 / num_classes):.1f}% top-1 error, loss ln({num_classes}) = "
        f"{math.log(num_classes):.3f}"
    )
    click.echo("\n".join(summary_rows(results, steps)))
    click.echo(f"\nfigure: {out}")


if __name__ == "__main__":
    main()
