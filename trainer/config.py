"""The training run's configuration: one frozen dataclass, the paper's values as defaults (§5).

``alexnet-train`` options map one to one onto these fields; the resolved config is written into
the run directory as ``config.json`` and read back on ``--resume`` by :meth:`TrainConfig.from_dict`,
which refuses unknown keys and wrong types with one clear line.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from alexnet.pipeline import constants as C
from alexnet.pipeline.errors import AlexnetError

from . import constants as TC

SCHEDULES = ("plateau", "step")
MEAN_MODES = ("image", "channel")
CONFIG_FILE = "config.json"

# Fields that may differ between the saved config and a ``--resume`` command line: how long to
# run, where the data and devices are, and how often to log or save. Everything else would
# change the computation, so a resumed run refuses it.
RESUME_MUTABLE = frozenset(
    {
        "data_dir",
        "run_dir",
        "gpus",
        "epochs",
        "max_steps",
        "time_limit_minutes",
        "checkpoint_minutes",
        "checkpoint_every_steps",
        "keep_epochs",
        "log_every_steps",
        "stall_intervals",
        "stall_band",
        "explode_factor",
        "num_threads",
        "prefetch",
        "hw_decoder_load",
        "roi_decode",
        "decoder",
        "cuda_graph",
        "resume",
        "progress",
    }
)


@dataclass(frozen=True)
class TrainConfig:
    # --- where
    data_dir: str = "data"  # dataset directory (manifest.json, stats.json, LMDB shards)
    run_dir: str = ""  # run directory; "" = runs/<UTC timestamp>, chosen at start
    gpus: str = "auto"  # "cpu", "0" (both columns on one GPU), "0,1" (one column per GPU); "auto" = by count
    # --- how long
    epochs: int = TC.EPOCHS  # passes over the training set (§5: "roughly 90 cycles")
    max_steps: int = 0  # optimiser steps; 0 = no limit (stops at whichever of epochs/max_steps comes first)
    time_limit_minutes: float = 0.0  # wall-clock budget, minutes; 0 = none (checkpoints, exits 0, resumable)
    # --- §5 recipe
    batch_size: int = TC.BATCH_SIZE  # GLOBAL images per step (split evenly across torchrun replicas)
    lr: float = TC.BASE_LR  # epsilon, inside the velocity (paper's update)
    momentum: float = TC.MOMENTUM
    weight_decay: float = TC.WEIGHT_DECAY  # on weights (conv and fc kernels); biases are not decayed
    schedule: str = "plateau"  # "plateau": /10 when val top-1 stops improving; "step": /10 at step_epochs
    lr_drop_factor: float = TC.LR_DROP_FACTOR
    lr_drops: int = TC.LR_DROPS  # §5: the rate was divided three times before termination
    plateau_patience: int = 3  # epochs without improvement before a drop (a choice; the paper gives none)
    plateau_min_delta: float = 1e-3  # improvement in val top-1 error (fraction) that counts
    step_epochs: tuple[int, ...] = (30, 60, 80)  # "step" schedule: epochs at which lr drops (a choice)
    stop_after_last_plateau: bool = True  # plateau: stop when the error stalls after the last drop (§5)
    seed: int = 0  # model init, dropout and the pipeline's shuffling/augmentation
    # --- pipeline
    num_threads: int = 4  # DALI CPU threads per replica
    prefetch: int = 3  # batches queued ahead by the loader (3 keeps an H100 fed, benchmarks/RESULTS.md)
    roi_decode: bool = False  # decode only the 224 crop window (bit-identical pixels; faster on some GPUs)
    hw_decoder_load: float = 0.9  # GPU: share of JPEGs for the hardware decoder (DALI default 0.65; 0.9 measured best)
    pipelines: int = 0  # DALI pipelines per replica, taken in turn; 0 = auto: 2 on a GPU, 1 on the CPU
    decoder: str = "auto"  # JPEG decoding: "auto" (nvJPEG "mixed" on a GPU), "mixed", or "cpu" (host threads)
    mean: str = "image"  # subtract the per-pixel mean image (§2) or the per-channel mean
    lighting_scale: str = C.DEFAULT_LIGHTING_SCALE  # §4.1 PCA lighting convention (see constants.py)
    lrn: str = TC.DEFAULT_LRN  # §3.3 response normalisation: "authors" (alpha / n) or "paper-text"
    # --- speed options (not the paper's arithmetic)
    bf16: bool = False  # bfloat16 autocast for forward and loss
    channels_last: bool = False  # NHWC memory format for conv layers
    cuda_graph: bool = True  # replay each step as one CUDA graph where possible (one GPU, no torchrun)
    # --- evaluation, logging, checkpoints
    eval_every_epochs: int = 1  # centre-crop validation every N epochs (drives the plateau schedule)
    log_every_steps: int = 10  # metrics.jsonl train line (and non-finite loss check) every N steps
    stall_intervals: int = 50  # warn once when the logged loss sits near ln(classes) this many times in a row; 0 = off
    stall_band: float = 0.05  # "near": within this fraction of ln(classes)
    explode_factor: float = 3.0  # warn once when a logged loss exceeds this multiple of the first; 0 = off
    checkpoint_minutes: float = 30.0  # also write checkpoints/last.pt every N minutes; 0 = only per epoch
    checkpoint_every_steps: int = 0  # also every N steps; 0 = off
    keep_epochs: int = 3  # keep only the newest N epoch-XXXX.pt (best.pt and last.pt stay); 0 = keep all
    resume: bool = False  # continue from RUN_DIR/checkpoints/last.pt
    progress: bool = True  # tqdm progress bar on stderr
    num_classes: int = 0  # filled from the dataset manifest at start (0 = not yet resolved)

    def __post_init__(self) -> None:
        problems = []
        for name in ("epochs", "max_steps", "plateau_patience", "lr_drops", "num_threads", "num_classes", "pipelines",
                     "stall_intervals", "stall_band", "explode_factor"):  # fmt: skip
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0")
        for name in ("batch_size", "eval_every_epochs", "log_every_steps"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1")
        if not 0.0 <= self.hw_decoder_load <= 1.0:
            problems.append("hw_decoder_load must be in [0, 1]")
        if self.decoder not in ("auto", "mixed", "cpu"):
            problems.append("decoder must be auto, mixed or cpu")
        if self.prefetch < 1:
            problems.append("prefetch must be >= 1")
        if self.lr <= 0:
            problems.append("lr must be > 0")
        if not 0 <= self.momentum < 1:
            problems.append("momentum must be in [0, 1)")
        if self.weight_decay < 0:
            problems.append("weight_decay must be >= 0")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule must be one of {', '.join(SCHEDULES)}")
        if self.mean not in MEAN_MODES:
            problems.append(f"mean must be one of {', '.join(MEAN_MODES)}")
        if self.lrn not in TC.LRN_FORMS:
            problems.append(f"lrn must be one of {', '.join(TC.LRN_FORMS)}")
        if self.lighting_scale not in C.LIGHTING_SCALES:
            problems.append(f"lighting_scale must be one of {', '.join(C.LIGHTING_SCALES)}")
        if self.epochs == 0 and self.max_steps == 0:
            problems.append("give epochs or max_steps")
        if problems:
            raise AlexnetError("invalid training config: " + "; ".join(problems))

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    # ---- JSON round trip

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["step_epochs"] = list(self.step_epochs)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "config") -> TrainConfig:
        """Build from a dict (a saved config.json); unknown keys and wrong types fail loudly."""
        if not isinstance(d, dict):
            raise AlexnetError(f"{source}: expected a JSON object, found {type(d).__name__}")
        hints = typing.get_type_hints(cls)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise AlexnetError(f"{source}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        kwargs = {}
        for name, value in d.items():
            kwargs[name] = _coerce(name, value, hints[name], source)
        return cls(**kwargs)

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
    """Check one JSON value against the field's annotation (ints are accepted for floats)."""

    def bad() -> AlexnetError:
        return AlexnetError(f"{source}: {name} = {value!r} has the wrong type (expected {_type_name(hint)})")

    origin = typing.get_origin(hint)
    if hint is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad()
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise bad()
        return value
    if origin is tuple:
        (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
        if not isinstance(value, list | tuple):
            raise bad()
        return tuple(_coerce(name, v, item, source) for v in value)
    raise AssertionError(f"unsupported annotation {hint!r} for {name}")  # pragma: no cover - a coding error


def _type_name(hint: Any) -> str:
    if isinstance(hint, type):
        return hint.__name__
    if isinstance(hint, types.GenericAlias):
        return str(hint)
    return repr(hint)


def merge_for_resume(saved: TrainConfig, given: dict[str, Any]) -> TrainConfig:
    """The saved run config with the options given on the command line that may change on resume.

    ``given`` holds only options the user typed. A differing value for a field that changes the
    computation (lr, batch size, seed, ...) is refused: the resumed run would not continue the
    killed one.
    """
    changed = {k: v for k, v in given.items() if getattr(saved, k) != v}
    refused = sorted(k for k in changed if k not in RESUME_MUTABLE)
    if refused:
        detail = ", ".join(f"{k} (saved {getattr(saved, k)!r}, given {changed[k]!r})" for k in refused)
        raise AlexnetError(f"--resume continues the saved run; these options differ from it: {detail}")
    return saved.replace(**changed, resume=True)


__all__ = ["CONFIG_FILE", "RESUME_MUTABLE", "SCHEDULES", "TrainConfig", "merge_for_resume"]
