"""``alexnet-train``: fit (the default), ``eval``, ``bench``, ``report``, ``predict``, ``export``.

A thin click layer: the training options are generated from the config tree (config.py), one per
field, so their defaults and help are the dataclasses'. A command builds a
:class:`~alexnet.trainer.config.TrainConfig` (the defaults, or ``--config FILE``, with the options
typed on the command line over it) and calls one function. Each command takes only the options
that apply to it (``EVAL_OPTIONS``, ``BENCH_OPTIONS``), drawn from the same fields.

A name means the same thing in both tools: ``--workers`` is a number of processes (alexnet-prep's
decoding processes; alexnet-train's LMDB reader processes), ``--num-threads``/``--threads`` the
DALI threads of one pipeline.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Collection
from dataclasses import fields
from pathlib import Path

import click

from alexnet.pipeline import locks
from alexnet.pipeline.artifacts import DATA_DIR_ENV
from alexnet.pipeline.cli_common import LazyGroup, field_option, version_option
from alexnet.pipeline.errors import AlexnetError

from .config import SECTIONS, TrainConfig, merge_for_resume
from .rundir import RUNS_DIR, RunDir, newest_run
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
  alexnet-train --gpus 0 --precision fp32 --run-dir runs/b
  alexnet-train --run-dir runs/a --resume                      # continue a killed run exactly
  alexnet-train --config runs/a/config.json --run-dir runs/a2 --seed 1   # re-run a run, one field changed
  alexnet-train --gpus cpu --batch-size 32 --max-steps 200     # a short CPU run
  alexnet-train eval --ten-crop --checkpoint runs/a/checkpoints/best.pt
  alexnet-train eval --split test --checkpoint runs/a/checkpoints/best.pt   # ILSVRC-2010's test set (Table 1)
  alexnet-train eval --checkpoint runs/a/checkpoints/best.pt --checkpoint runs/b/checkpoints/best.pt   # averaged (§6)
  alexnet-train bench --gpus 0                                 # images/s: synthetic vs pipeline
  alexnet-train report runs/a                                  # figures and report.md
  alexnet-train predict --checkpoint runs/a/checkpoints/best.pt photo.jpg   # top-5 classes
  alexnet-train export --checkpoint runs/a/checkpoints/best.pt --out alexnet.pt2
  torchrun --nproc-per-node 2 -m alexnet.trainer.cli --gpus 0,1   # 2 replicas x 2 GPUs (DDP)
"""
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


def _option(f, hint, override: dict | None = None):
    """The click option of config field ``f`` (pipeline/cli_common.py makes it; ``--data-dir`` also reads
    $ALEXNET_DATA_DIR)."""
    env = {"envvar": DATA_DIR_ENV, "show_envvar": True} if f.name == "data_dir" else {}
    return field_option(f, hint, override, **env)


def _config_options(command, only: Collection[str] | None = None, *, config_file: bool = True, overrides=None):
    """One option per config field (all sections, or the fields named in ``only``), in the sections' order;
    with ``config_file`` also ``--config FILE``; ``overrides``: {field: the command's own help and default}."""
    overrides = overrides or {}
    for cls in reversed(SECTIONS.values()):
        hints = typing.get_type_hints(cls)
        for f in reversed(fields(cls)):
            if f.metadata.get("cli", True) and (only is None or f.name in only):
                command = _option(f, hints[f.name], overrides.get(f.name))(command)
    if not config_file:
        return command
    return click.option(
        "--config",
        "config_file",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="Start from this config.json (a run's), then apply the options given here.",
    )(command)


def config_options(only: Collection[str] | None = None, *, config_file: bool = True, overrides=None):
    """The decorator adding :func:`_config_options`."""
    return lambda command: _config_options(command, only, config_file=config_file, overrides=overrides)


def _names(cls) -> set[str]:
    return {f.name for f in fields(cls)}


# Each command takes the options that apply to it (a name means the same in every command).
# eval: where the data and the devices are, how fast the loader works, the batch; the settings a model
# depends on come from its checkpoint, and --mean and --lrn are accepted only to confirm them.
TRAIN_ONLY_DATA = {"lighting_scale", "shuffle", "roi_decode"}  # the training pipeline's draws and order
EVAL_OPTIONS = {"data_dir", "run_dir", "gpus", "progress", "batch_size", "lrn"} | (
    _names(SECTIONS["data"]) - TRAIN_ONLY_DATA
)
# eval reads some fields in its own terms; the settings its checkpoint decides have no default of their own.
_DECIDED = "The checkpoint decides; given, it must match the checkpoint's (else refused)."
EVAL_HELP = {
    "run_dir": {
        "help": "The run whose evals.jsonl gets the result; without --checkpoint its checkpoints/last.pt is "
        "evaluated.  [default: the run the checkpoint sits in]",
        "show_default": False,
    },
    "batch_size": {"help": "Images per evaluation batch (global), split evenly over replicas."},
    "mean": {"default": None, "show_default": False, "help": f"Mean subtracted: image or channel. {_DECIDED}"},
    "lrn": {"default": None, "show_default": False, "help": f"§3.3 response normalisation form. {_DECIDED}"},
}
# bench: one training step's data, model and optimiser settings, on the devices chosen.
BENCH_OPTIONS = (
    {"data_dir", "gpus", "seed", "batch_size", "lr", "momentum", "weight_decay"}
    | _names(SECTIONS["data"])
    | _names(SECTIONS["model"])
)


def build_config(ctx: click.Context, opts: dict) -> tuple[TrainConfig, dict]:
    """The config (defaults or ``--config``, then the typed options), and the typed options."""
    config_file = opts.pop("config_file", None)
    given = {name: value for name, value in opts.items() if _typed(ctx, name)}
    if config_file and given.get("resume"):
        raise click.UsageError("--config starts a new run from a saved config; --resume continues the run in --run-dir")
    # A saved config starts a new run: the directory, the resume flag and the class count were its run's.
    base = (
        TrainConfig.load(config_file).replace(run_dir="", resume=False, num_classes=0) if config_file else TrainConfig()
    )
    return base.replace(**given), given


def _typed(ctx: click.Context, name: str, *, env: bool = True) -> bool:
    """Whether option ``name`` was given on the command line (or, with ``env``, by its variable)."""
    from click.core import ParameterSource

    sources = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT) if env else (ParameterSource.COMMANDLINE,)
    return ctx.get_parameter_source(name) in sources


@click.group(
    cls=LazyGroup, lazy_commands=COMMANDS, invoke_without_command=True, epilog=EPILOG, context_settings=CONTEXT
)
@config_options()
@version_option("alexnet-train")
@click.pass_context
def main(ctx: click.Context, **opts) -> None:
    """Train the 2012 two-column AlexNet on an LMDB dataset with the paper's recipe (§5).

    Writes RUN_DIR/config.json, versions.json, metrics.jsonl, tensorboard/ and checkpoints/ (last.pt,
    epoch-XXXX.pt, best.pt). A NaN or infinite loss stops the run with exit status 1 and keeps the last
    good checkpoint. Other commands: eval, bench, report, predict, export (alexnet-train COMMAND --help).
    """
    if ctx.invoked_subcommand is not None:
        typed = [name for name in opts if _typed(ctx, name, env=False)]
        if typed:
            raise click.UsageError(
                f"options go after the command: alexnet-train {ctx.invoked_subcommand} "
                f"--{typed[0].replace('_', '-')} ..."
            )
        return
    from .train import train

    config, given = build_config(ctx, opts)
    if config.run.resume:
        config = _resumed(config, given)
    s = train(config)
    _print_summary(s)
    if s["stop_reason"] == "signal":  # trainer/stop.py
        name = s["signal"] or "SIGTERM"  # a replica stopped by another replica's signal
        click.echo(f"stopped by {name}: continue with the same command and --resume")
        raise SystemExit(exit_status(name))


def _resumed(config: TrainConfig, given: dict) -> TrainConfig:
    """The saved run's config with the typed options that may change on resume."""
    run = RunDir(config.run.run_dir) if config.run.run_dir else _newest_run()
    if not run.config.exists():  # nothing saved yet: train() starts the run
        return config.replace(run_dir=str(run.root), resume=True)
    saved = TrainConfig.load(run.config)
    return merge_for_resume(saved, {**{k: v for k, v in given.items() if k != "resume"}, "run_dir": str(run.root)})


@main.command("eval", context_settings=CONTEXT)
@config_options(EVAL_OPTIONS, config_file=False, overrides=EVAL_HELP)
@click.option(
    "--checkpoint",
    "checkpoints",
    type=click.Path(dir_okay=False, path_type=Path),
    multiple=True,
    help="Checkpoint to evaluate; repeated: the average of their softmax outputs (§6's averaged CNNs) "
    "[default: RUN_DIR/checkpoints/last.pt].",
)
@click.option("--ten-crop", is_flag=True, help="Also the ten-patch test of §4.1.")
@click.option(
    "--split",
    type=click.Choice(["val", "test"]),
    default="val",
    show_default=True,
    help="The split to score: test is ILSVRC-2010's test set (the paper's Table 1) or ImageNetV2's images, "
    "which training never reads.",
)
@click.pass_context
def eval_command(ctx: click.Context, checkpoints: tuple[Path, ...], ten_crop: bool, split: str, **opts) -> None:
    """Top-1 and top-5 error of a checkpoint (or of several, averaged) on val or test: centre crop, and with
    --ten-crop the ten patches. Each model runs with the settings saved in its checkpoint (mean, LRN form,
    precision). A test set of a subset of the model's classes (ImageNetV2) is scored with its full output."""
    from .evaluate import evaluate_checkpoints

    config, given = build_config(ctx, opts)
    if not checkpoints:
        if not config.run.run_dir:
            raise click.UsageError("give --checkpoint PATH (or --run-dir with checkpoints/last.pt)")
        checkpoints = (RunDir(config.run.run_dir).last,)
    with locks.hold(Path(config.run.data_dir), locks.SHARED, "alexnet-train eval"):  # the run dir: no lock
        res = evaluate_checkpoints(config, list(checkpoints), ten_crop=ten_crop, given=given, split=split)
    on = f"{split} ({res['classes']})" if res["classes"] else split
    if len(checkpoints) == 1:
        click.echo(f"checkpoint {res['checkpoint']} (step {res['step']}, epoch {res['epoch']}), {on}:")
    else:
        click.echo(f"the average of {len(checkpoints)} checkpoints' softmax outputs (§6), {on}:")
    for key, label in (("centre_crop", "centre crop"), ("ten_crop", "ten patches (§4.1)")):
        if key in res:
            r = res[key]
            click.echo(
                f"  {label:<19}: top-1 error {100 * r['top1_err']:6.2f}%  top-5 error "
                f"{100 * r['top5_err']:6.2f}%  ({r['images']} images)"
            )


@main.command("bench", context_settings=CONTEXT)
@config_options(BENCH_OPTIONS)
@click.option(
    "--steps",
    type=click.IntRange(min=1),
    default=20,
    show_default=True,
    help="Timed steps per side (after 3 warm-up steps; 1 when fewer than 10).",
)
@click.pass_context
def bench_command(ctx: click.Context, steps: int, **opts) -> None:
    """Training images/s on synthetic batches and on the pipeline's batches (goal: ratio >= 0.95)."""
    from .bench import benchmark

    config, _ = build_config(ctx, opts)
    res = benchmark(config, warmup=3 if steps >= 10 else 1, steps=steps)
    click.echo(res["device_note"], err=True)
    click.echo(
        f"training images/s at batch {res['batch_size']} ({res['step']}):\n"
        f"  synthetic batches : {res['synthetic_images_per_s']:9.1f}\n"
        f"  pipeline batches  : {res['pipeline_images_per_s']:9.1f}\n"
        f"  ratio             : {res['ratio']:9.3f}  (goal >= 0.95: the pipeline keeps up)"
    )


def _newest_run() -> RunDir:
    run = newest_run()
    if run is None:
        raise AlexnetError(f"--resume: no run with checkpoints/last.pt under {RUNS_DIR}/; give --run-dir")
    click.echo(f"resuming the newest run: {run.root}", err=True)
    return run


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
