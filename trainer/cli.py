"""``alexnet-train``: train the 2012 network, evaluate a checkpoint, or measure throughput.

A thin click layer: parse, build a :class:`~alexnet.trainer.config.TrainConfig`, call one function
in :mod:`alexnet.trainer.train`. ``alexnet-train report RUN_DIR`` is a lazily imported subcommand.
"""

from __future__ import annotations

import math
from pathlib import Path

import click

from alexnet.pipeline import constants as C
from alexnet.pipeline.cli_common import LazyGroup, data_dir_option, version_option
from alexnet.pipeline.errors import AlexnetError

from . import constants as TC
from .config import CONFIG_FILE, MEAN_MODES, SCHEDULES, TrainConfig, merge_for_resume
from .stop import exit_status

COMMANDS = {
    "report": "alexnet.trainer.report:report_command",
    "predict": "alexnet.trainer.infer_cli:predict_command",
    "export": "alexnet.trainer.infer_cli:export_command",
}

EPILOG = """\b
Examples:
  alexnet-train --data-dir /data/imagenet-lmdb                 # the paper's recipe, GPUs chosen by count
  alexnet-train --gpus 0,1 --run-dir runs/a                    # one column per GPU (§3.2)
  alexnet-train --gpus 0 --bf16 --channels-last --run-dir runs/b
  alexnet-train --run-dir runs/a --resume                      # continue a killed run exactly
  alexnet-train --gpus cpu --batch-size 32 --max-steps 200     # a short CPU run
  alexnet-train --eval-only --ten-crop --checkpoint runs/a/checkpoints/best.pt
  alexnet-train --benchmark --gpus 0 --bf16                    # images/s: synthetic vs pipeline
  alexnet-train report runs/a                                  # figures and report.md
  alexnet-train predict --checkpoint runs/a/checkpoints/best.pt photo.jpg   # top-5 classes
  alexnet-train export --checkpoint runs/a/checkpoints/best.pt --out alexnet.pt2
  torchrun --nproc-per-node 2 -m alexnet.trainer.cli --gpus 0,1   # 2 replicas x 2 GPUs (DDP)
"""

# CLI option name -> TrainConfig field (options not listed map to the same name).
FIELD_OF = {"threads": "num_threads"}


class _TrainGroup(LazyGroup):
    """LazyGroup whose lazy subcommands may be absent without breaking training or --help."""

    def get_command(self, ctx, name):
        try:
            return super().get_command(ctx, name)
        except ImportError:
            return None


def _parse_epochs(_ctx, _param, value):
    if value is None:
        return None
    try:
        out = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter("expected comma-separated epoch numbers, e.g. 30,60,80") from None
    return out


@click.group(
    cls=_TrainGroup,
    lazy_commands=COMMANDS,
    invoke_without_command=True,
    epilog=EPILOG,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
)
@data_dir_option
@click.option(
    "--run-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Run directory [default: runs/<UTC timestamp>; with --resume: the newest run under runs/].",
)
@click.option(
    "--gpus",
    default="auto",
    show_default=True,
    help="'cpu', '0' (both columns on GPU 0), '0,1' (one column per GPU). auto: '0,1' with 2+ GPUs, "
    "'0' with one, else cpu. Under torchrun: per replica, offset by LOCAL_RANK.",
)
@click.option(
    "--epochs",
    type=click.IntRange(min=0),
    default=TC.EPOCHS,
    show_default=True,
    help="Passes over the training set (0: no epoch limit, use --max-steps).",
)
@click.option(
    "--max-steps",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Stop after this many optimiser steps (0: no limit).",
)
@click.option(
    "--time-limit-minutes",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Stop (with a checkpoint, exit 0, resumable) after this wall-clock time; 0: none.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=TC.BATCH_SIZE,
    show_default=True,
    help="Global batch (§5: 128), split evenly over torchrun replicas.",
)
@click.option("--lr", type=float, default=TC.BASE_LR, show_default=True, help="Initial learning rate (§5).")
@click.option("--momentum", type=float, default=TC.MOMENTUM, show_default=True)
@click.option(
    "--weight-decay", type=float, default=TC.WEIGHT_DECAY, show_default=True, help="On weights; biases are not decayed."
)
@click.option(
    "--schedule",
    type=click.Choice(SCHEDULES),
    default="plateau",
    show_default=True,
    help="plateau: /10 when val top-1 stops improving, 3 times (§5); step: /10 at --step-epochs.",
)
@click.option(
    "--step-epochs",
    callback=_parse_epochs,
    default="30,60,80",
    show_default=True,
    help="Epochs at which the step schedule divides the rate by 10.",
)
@click.option(
    "--plateau-patience",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="Evaluations without improvement before the plateau schedule divides the rate.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Init, dropout and pipeline randomness.")
@click.option(
    "--threads",
    "--workers",
    "threads",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="DALI CPU threads per replica.",
)
@click.option(
    "--prefetch", type=click.IntRange(min=1), default=3, show_default=True, help="Batches the pipeline prepares ahead."
)
@click.option(
    "--hw-decoder-load",
    type=click.FloatRange(0.0, 1.0),
    default=0.9,
    show_default=True,
    help="GPU: share of JPEGs sent to the hardware decoder (the rest decode on the GPU's cores).",
)
@click.option(
    "--pipelines",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="DALI pipelines per replica, taken in turn (0: 2 on a GPU, 1 on the CPU); not changeable on --resume.",
)
@click.option(
    "--decoder",
    type=click.Choice(("auto", "mixed", "cpu")),
    default="auto",
    show_default=True,
    help="JPEG decoding: auto = nvJPEG ('mixed') on a GPU; 'cpu' decodes with the DALI threads on the host.",
)
@click.option("--roi-decode", is_flag=True, help="Decode only the 224 crop window when training (same pixels).")
@click.option(
    "--mean",
    type=click.Choice(MEAN_MODES),
    default="image",
    show_default=True,
    help="Subtract the mean image (§2) or the per-channel mean.",
)
@click.option(
    "--lighting-scale",
    type=click.Choice(C.LIGHTING_SCALES),
    default=C.DEFAULT_LIGHTING_SCALE,
    show_default=True,
    help="§4.1 PCA lighting convention (see docs/DEVIATIONS.md).",
)
@click.option(
    "--lrn",
    type=click.Choice(TC.LRN_FORMS),
    default=TC.DEFAULT_LRN,
    show_default=True,
    help="§3.3 response normalisation: 'authors' (alpha/5, as their code ran it) or 'paper-text' (alpha as written).",
)
@click.option("--bf16", is_flag=True, help="bfloat16 autocast (speed; not the paper's arithmetic).")
@click.option("--channels-last", is_flag=True, help="NHWC memory format for the convolutions.")
@click.option(
    "--cuda-graph/--no-cuda-graph",
    default=True,
    show_default=True,
    help="Replay each step as one CUDA graph (one GPU, no torchrun; else eager): no launch overhead.",
)
@click.option("--eval-every-epochs", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--log-every-steps", type=click.IntRange(min=1), default=10, show_default=True)
@click.option(
    "--stall-intervals",
    type=click.IntRange(min=0),
    default=50,
    show_default=True,
    help="Warn once when the logged loss stays within --stall-band x ln(classes) of ln(classes) this many "
    "times in a row (0: off; docs/TRAINING.md).",
)
@click.option("--stall-band", type=click.FloatRange(min=0), default=0.05, show_default=True)
@click.option(
    "--explode-factor",
    type=click.FloatRange(min=0),
    default=3.0,
    show_default=True,
    help="Warn once when a logged loss exceeds this multiple of the first (0: off).",
)
@click.option(
    "--checkpoint-minutes",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    help="Write checkpoints/last.pt every N minutes too (0: only at epoch ends).",
)
@click.option(
    "--checkpoint-every-steps",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Write checkpoints/last.pt every N steps too (0: off).",
)
@click.option(
    "--keep-epochs",
    type=click.IntRange(min=0),
    default=3,
    show_default=True,
    help="Keep only the newest N epoch-XXXX.pt checkpoints (about 0.5 GB each at 1000 classes); best.pt and last.pt "
    "always stay (0: keep all).",
)
@click.option("--resume", is_flag=True, help="Continue the run in --run-dir from checkpoints/last.pt.")
@click.option("--eval-only", is_flag=True, help="Evaluate --checkpoint on val (centre crop) and exit.")
@click.option("--ten-crop", is_flag=True, help="With --eval-only: also the ten-patch test of §4.1.")
@click.option(
    "--checkpoint",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Checkpoint for --eval-only [default: RUN_DIR/checkpoints/last.pt].",
)
@click.option("--benchmark", is_flag=True, help="Print training images/s on synthetic and on pipeline batches.")
@click.option(
    "--benchmark-steps",
    type=click.IntRange(min=1),
    default=20,
    show_default=True,
    help="Timed steps per side of --benchmark (after 3 warm-up steps; 1 when fewer than 10).",
)
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@version_option("alexnet-train")
@click.pass_context
def main(ctx: click.Context, **opts) -> None:
    """Train the 2012 two-column AlexNet on an LMDB dataset with the paper's recipe (§5).

    Writes RUN_DIR/config.json, versions.json, metrics.jsonl, tensorboard/ and checkpoints/ (last.pt, epoch-XXXX.pt,
    best.pt). A NaN or infinite loss stops the run with exit status 1 and keeps the last good checkpoint.
    """
    if ctx.invoked_subcommand is not None:
        return
    from . import train as T

    eval_only, ten_crop, checkpoint, bench = (
        opts.pop("eval_only"),
        opts.pop("ten_crop"),
        opts.pop("checkpoint"),
        opts.pop("benchmark"),
    )
    bench_steps = opts.pop("benchmark_steps")
    if ten_crop and not eval_only:
        raise click.UsageError("--ten-crop goes with --eval-only")
    if eval_only and bench:
        raise click.UsageError("--eval-only and --benchmark are separate modes; give one")
    config, given = _build_config(ctx, opts)

    if bench:
        res = T.benchmark(config, warmup=3 if bench_steps >= 10 else 1, steps=bench_steps)
        click.echo(res["device_note"], err=True)
        click.echo(
            f"training images/s at batch {res['batch_size']} ({'bf16' if res['bf16'] else 'fp32'}"
            f"{', channels_last' if res['channels_last'] else ''}):\n"
            f"  synthetic batches : {res['synthetic_images_per_s']:9.1f}\n"
            f"  pipeline batches  : {res['pipeline_images_per_s']:9.1f}\n"
            f"  ratio             : {res['ratio']:9.3f}  (goal >= 0.95: the pipeline keeps up)"
        )
        return

    if eval_only:
        if checkpoint is None:
            if config.run_dir is None or not config.run_dir:
                raise click.UsageError("--eval-only needs --checkpoint PATH (or --run-dir with checkpoints/last.pt)")
            checkpoint = Path(config.run_dir) / "checkpoints" / "last.pt"
        res = T.evaluate_checkpoint(config, checkpoint, ten_crop=ten_crop)
        click.echo(f"checkpoint {res['checkpoint']} (step {res['step']}, epoch {res['epoch']}), val:")
        for key, label in (("centre_crop", "centre crop"), ("ten_crop", "ten patches (§4.1)")):
            if key in res:
                r = res[key]
                click.echo(
                    f"  {label:<19}: top-1 error {100 * r['top1_err']:6.2f}%  top-5 error {100 * r['top5_err']:6.2f}%"
                    f"  ({r['images']} images)"
                )
        return

    _fit(T, config, given)


def _fit(T, config: TrainConfig, given: dict) -> None:
    """Train (or resume) and exit with 128 + the signal's number when a signal stopped the run."""
    if config.resume:
        run_dir = Path(config.run_dir) if config.run_dir else _newest_run()
        if (run_dir / CONFIG_FILE).exists():  # else nothing was saved yet: train() starts the run
            saved = TrainConfig.load(run_dir / CONFIG_FILE)
            config = merge_for_resume(saved, {**given, "run_dir": str(run_dir)})
    s = T.train(config)
    _print_summary(s)
    if s["stop_reason"] == "signal":  # trainer/stop.py
        name = s["signal"] or "SIGTERM"  # a replica stopped by another replica's signal
        click.echo(f"stopped by {name}: continue with the same command and --resume")
        raise SystemExit(exit_status(name))


def _build_config(ctx: click.Context, opts: dict) -> tuple[TrainConfig, dict]:
    """The config from every option, and the dict of options the user actually gave."""
    from click.core import ParameterSource

    values = {}
    given = {}
    for name, value in opts.items():
        if name == "no_progress":
            field, value = "progress", not value
        else:
            field = FIELD_OF.get(name, name)
        if isinstance(value, Path):
            value = str(value)
        if name == "run_dir" and value is None:
            value = ""
        values[field] = value
        if ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT):
            given[field] = value
    values["step_epochs"] = values["step_epochs"] or ()
    given.pop("resume", None)
    return TrainConfig(**values), given


def _newest_run() -> Path:
    from .train import RUNS_DIR

    runs = sorted(p.parent.parent for p in RUNS_DIR.glob("*/checkpoints/last.pt"))
    if not runs:
        raise AlexnetError(f"--resume: no run with checkpoints/last.pt under {RUNS_DIR}/; give --run-dir")
    click.echo(f"resuming the newest run: {runs[-1]}", err=True)
    return runs[-1]


def _pct(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}%"


def _print_summary(s: dict) -> None:
    rate = f"{s['images_per_s']:.1f}" if s.get("images_per_s") else "-"
    click.echo(
        f"done ({s['stop_reason']}): {s['steps']} steps, {s['epochs_completed']} epochs, "
        f"{s['elapsed_s'] / 60:.1f} min, {rate} images/s\n"
        f"  final train loss {s['final_loss']:.4f}, lr {s['lr']:g}\n"
        f"  val (centre crop): top-1 error {_pct(s['val_top1_err'])}, top-5 error {_pct(s['val_top5_err'])}, "
        f"best top-1 {_pct(s['best_top1_err'])}\n"
        f"  run: {s['run_dir']}   checkpoint: {s['checkpoint']}"
    )


if __name__ == "__main__":
    main()
