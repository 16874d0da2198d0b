"""The run's configuration: one tree of frozen dataclasses, every default written once (§5's values).

    TrainConfig
      run    RunSettings   where (data, run directory, devices), how long, logging, checkpoints
      data   DataConfig    the pipeline's settings (pipeline/loader.py): threads, decoder, mean, lighting, shuffle
      model  ModelConfig   the network's form and arithmetic (LRN form, precision, CUDA graphs, compile)
      optim  OptimConfig   §5's recipe: batch, rate, momentum, decay, schedule

Every field name is unique across the sections, so the command line is flat (``--lr``,
``--num-threads``): ``alexnet-train``'s options are generated from these fields (their metadata
holds the help text), so a default cannot drift between the CLI and the config. The resolved tree is
saved as ``RUN/config.json``; :meth:`TrainConfig.load` reads it back, refusing unknown keys and
wrong types with one line. Each section validates its own fields once, in ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from alexnet.pipeline.cli_common import field_problems, opt
from alexnet.pipeline.errors import AlexnetError
from alexnet.pipeline.loader import DataConfig

from . import constants as TC
from .precision import PRECISIONS

SCHEDULES = ("plateau", "step")

# Fields that may differ between the saved config and a ``--resume`` command line: how long to
# run, where the data and devices are, how often to log or save, and how fast the pipeline works.
# Everything else would change the computation, so a resumed run refuses it.
RESUME_MUTABLE = frozenset(
    {
        *("data_dir", "run_dir", "gpus", "epochs", "max_steps", "time_limit_minutes", "resume", "progress"),
        *("checkpoint_minutes", "checkpoint_every_steps", "keep_epochs", "log_every_steps"),
        *("stall_intervals", "stall_band", "explode_factor", "cuda_graph", "compile"),
        *("num_threads", "workers", "prefetch", "hw_decoder_load", "roi_decode", "decoder", "pipelines"),
    }
)


def _check(obj: Any, extra: list[str] | None = None) -> None:
    problems = field_problems(obj) + (extra or [])
    if problems:
        raise AlexnetError("invalid training config: " + "; ".join(problems))


@dataclass(frozen=True)
class RunSettings:
    data_dir: str = opt("data", "Dataset directory (manifest.json, stats.json, LMDB shards); env ALEXNET_DATA_DIR.")
    run_dir: str = opt("", "Run directory [default: runs/<UTC timestamp>; with --resume: the newest run under runs/].")
    gpus: str = opt(
        "auto",
        "'cpu', '0' (both columns on GPU 0), '0,1' (one column per GPU). auto: '0,1' with 2+ GPUs, '0' with one, "
        "else cpu. Under torchrun: per replica, offset by LOCAL_RANK.",
    )
    seed: int = opt(0, "Init, dropout and the pipeline's order and draws.")
    epochs: int = opt(
        TC.EPOCHS, "Passes over the training set (§5: 'roughly 90'; 0: no limit, use --max-steps).", min=0
    )
    max_steps: int = opt(0, "Stop after this many optimiser steps (0: no limit).", min=0)
    time_limit_minutes: float = opt(
        0.0, "Stop (with a checkpoint, exit 0, resumable) after this wall time; 0: none.", min=0
    )
    eval_every_epochs: int = opt(1, "Centre-crop validation every N epochs (drives the plateau schedule).", min=1)
    log_every_steps: int = opt(10, "A metrics.jsonl train line (and the non-finite loss check) every N steps.", min=1)
    stall_intervals: int = opt(
        50,
        "Warn once when the logged loss stays near ln(classes) this many times in a row (0: off; docs/TRAINING.md).",
        min=0,
    )
    stall_band: float = opt(0.05, "'Near' for --stall-intervals: within this fraction of ln(classes).", min=0)
    explode_factor: float = opt(3.0, "Warn once when a logged loss exceeds this multiple of the first (0: off).", min=0)
    checkpoint_minutes: float = opt(
        30.0, "Also write checkpoints/last.pt every N minutes (0: only at epoch ends).", min=0
    )
    checkpoint_every_steps: int = opt(0, "Also write checkpoints/last.pt every N steps (0: off).", min=0)
    keep_epochs: int = opt(
        3,
        "Keep only the newest N epoch-XXXX.pt (about 0.5 GB each at 1000 classes); best.pt and last.pt stay "
        "(0: keep all).",
        min=0,
    )
    resume: bool = opt(False, "Continue the run in --run-dir from checkpoints/last.pt (exactly).")
    progress: bool = opt(True, "Progress bars on stderr.")
    num_classes: int = opt(0, "Filled from the dataset's manifest at start.", min=0, cli=False)

    def __post_init__(self) -> None:
        _check(self, ["give epochs or max_steps"] if self.epochs == 0 and self.max_steps == 0 else [])


@dataclass(frozen=True)
class ModelConfig:
    lrn: str = opt(
        TC.DEFAULT_LRN,
        "§3.3 response normalisation: 'authors' (alpha/5, as their code ran it) or 'paper-text' "
        "(alpha as written; docs/DEVIATIONS.md N6).",
        choices=TC.LRN_FORMS,
    )
    precision: str = opt(
        "auto",
        "auto: bf16 on a GPU, fp32 on the CPU. fp32: the paper's arithmetic (TF32 off); bf16: autocast, "
        "fp32 weights and LRN denominators, TF32; fp16: autocast with loss scaling (GPUs without bf16). "
        "docs/DEVIATIONS.md T4.",
        choices=PRECISIONS,
    )
    cuda_graph: bool = opt(True, "Replay each step as one CUDA graph (one GPU, one process; else eager).")
    compile: bool = opt(
        False,
        "torch.compile the forward pass (fused kernels; CUDA graphs and DDP still apply). Compiling "
        "takes a minute and needs a C compiler.",
    )

    def __post_init__(self) -> None:
        _check(self)


@dataclass(frozen=True)
class OptimConfig:
    batch_size: int = opt(TC.BATCH_SIZE, "GLOBAL images per step (§5: 128), split evenly over replicas.", min=1)
    lr: float = opt(TC.BASE_LR, "Initial learning rate epsilon (§5), inside the velocity.", min=1e-12)
    momentum: float = opt(TC.MOMENTUM, "§5 momentum, in [0, 1).", min=0, max=1, max_open=True)
    weight_decay: float = opt(TC.WEIGHT_DECAY, "§5 weight decay, on weights (biases are not decayed).", min=0)
    schedule: str = opt(
        "plateau",
        "plateau: /10 when val top-1 stops improving, 3 times (§5); step: /10 at --step-epochs.",
        choices=SCHEDULES,
    )
    lr_drop_factor: float = opt(TC.LR_DROP_FACTOR, "Factor of each drop (§5: divided by 10).", min=0)
    lr_drops: int = opt(TC.LR_DROPS, "Drops before termination (§5: three).", min=0)
    plateau_patience: int = opt(3, "Evaluations without improvement before a plateau drop (a choice).", min=1)
    plateau_min_delta: float = opt(1e-3, "Improvement of val top-1 error (fraction) that counts.", min=0)
    step_epochs: tuple[int, ...] = opt((30, 60, 80), "Epochs at which the step schedule divides the rate.")
    stop_after_last_plateau: bool = opt(True, "Plateau: stop when the error stalls after the last drop (§5).")

    def __post_init__(self) -> None:
        _check(self, [] if self.momentum < 1 else ["momentum must be < 1"])


SECTIONS = {"run": RunSettings, "data": DataConfig, "model": ModelConfig, "optim": OptimConfig}
SECTION_OF = {f.name: name for name, cls in SECTIONS.items() for f in fields(cls)}


@dataclass(frozen=True)
class TrainConfig:
    run: RunSettings = field(default_factory=RunSettings)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    @classmethod
    def create(cls, **flat: Any) -> TrainConfig:
        """The defaults with some fields changed, by their flat names (``TrainConfig.create(lr=0.001)``)."""
        return cls().replace(**flat)

    def replace(self, **flat: Any) -> TrainConfig:
        unknown = sorted(set(flat) - set(SECTION_OF))
        if unknown:
            raise AlexnetError(f"unknown config field(s): {', '.join(unknown)}")
        changes = {}
        for section in SECTIONS:
            mine = {k: v for k, v in flat.items() if SECTION_OF[k] == section}
            if mine:
                changes[section] = dataclasses.replace(getattr(self, section), **mine)
        return dataclasses.replace(self, **changes)

    def flat(self) -> dict[str, Any]:
        return {k: getattr(getattr(self, s), k) for k, s in SECTION_OF.items()}

    # ---- JSON round trip

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # tuples become lists

    @classmethod
    def from_dict(cls, d: Any, *, source: str = "config") -> TrainConfig:
        """Build from a dict (a saved config.json); unknown keys and wrong types fail loudly."""
        if not isinstance(d, dict) or not all(isinstance(v, dict) for v in d.values()):
            raise AlexnetError(f"{source}: expected an object of sections {', '.join(SECTIONS)}")
        unknown = sorted(set(d) - set(SECTIONS))
        if unknown:
            raise AlexnetError(f"{source}: unknown section(s) {', '.join(unknown)} (known: {', '.join(SECTIONS)})")
        flat = {}
        for section, values in d.items():
            hints = typing.get_type_hints(SECTIONS[section])
            extra = sorted(set(values) - set(hints))
            if extra:
                raise AlexnetError(f"{source}: unknown key(s) {', '.join(extra)} in section {section}")
            flat.update({k: _coerce(k, v, hints[k], source) for k, v in values.items()})
        return cls.create(**flat)

    def save(self, path: Path) -> None:
        from alexnet.pipeline.artifacts import atomic_write_json

        atomic_write_json(Path(path), self.to_dict())

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise AlexnetError(f"no saved config at {path}") from None
        except (OSError, ValueError) as e:
            raise AlexnetError(f"cannot read {path}: {e}") from None
        return cls.from_dict(d, source=str(path))


def _coerce(name: str, value: Any, hint: Any, source: str) -> Any:
    """One JSON value checked against the field's annotation (ints are accepted for floats)."""
    if typing.get_origin(hint) is tuple:
        (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
        if isinstance(value, list | tuple):
            return tuple(_coerce(name, v, item, source) for v in value)
    elif hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    elif type(value) is hint:
        return value
    raise AlexnetError(f"{source}: {name} = {value!r} has the wrong type (expected {getattr(hint, '__name__', hint)})")


def merge_for_resume(saved: TrainConfig, given: dict[str, Any]) -> TrainConfig:
    """The saved run config with the options given on the command line that may change on resume.

    ``given`` holds only options the user typed (flat names). A differing value for a field that
    changes the computation (lr, batch size, seed, ...) is refused: the resumed run would not
    continue the killed one.
    """
    current = saved.flat()
    changed = {k: v for k, v in given.items() if current[k] != v}
    refused = sorted(k for k in changed if k not in RESUME_MUTABLE)
    if refused:
        detail = ", ".join(f"{k} (saved {current[k]!r}, given {changed[k]!r})" for k in refused)
        raise AlexnetError(f"--resume continues the saved run; these options differ from it: {detail}")
    return saved.replace(**changed, resume=True)
