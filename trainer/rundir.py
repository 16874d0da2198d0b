"""The run directory: one owner for its file names, its logs' records and how they are read.

Every command that writes or reads a run (training, resume, ``eval``, ``report``, ``predict``,
``export``, the demo) goes through :class:`RunDir` and :func:`read_log`; no other module spells a
file name. ::

    RUN/config.json           the resolved TrainConfig (config.py)
    RUN/versions.json         package, torch, DALI, PIL, numpy, python, GPUs, git revision
    RUN/metrics.jsonl         training's own log: kinds "train", "eval", "alert", "epoch_end"
    RUN/evals.jsonl           evaluations of saved checkpoints (``alexnet-train eval``): kind "checkpoint_eval"
    RUN/tensorboard/          metrics.jsonl's scalars as TensorBoard events (tensorboardX)
    RUN/checkpoints/last.pt   the newest checkpoint (every epoch, every N minutes or steps, at a stop)
    RUN/checkpoints/epoch-XXXX.pt   each epoch's end (``--keep-epochs N`` keeps the newest N)
    RUN/checkpoints/best.pt   the epoch with the lowest validation top-1 error
    RUN/report/               ``alexnet-train report``'s figures and report.md
    RUN/preview.png           an augmentation preview sheet, included in the report when present

A checkpoint's contents (its keys) are defined in checkpoint.py, with its format version.

Records: one JSON object per line, each with ``kind`` and ``schema`` (:data:`SCHEMA`); a reader
refuses a record of another schema in one line (runs written before schemas existed included).
Errors are fractions (0.25 is 25%). The fields of each kind (:data:`RECORDS`):

* ``train`` (a log point, every ``--log-every-steps``): ``step`` optimiser steps done; ``epoch`` the
  epoch the step belongs to (0-based: the epochs completed before it); ``epoch_progress`` the fraction of
  that epoch done; ``loss`` the mean training loss over the interval; ``lr``; ``images_per_s`` over the
  interval. Optional: ``weight_norm`` and ``grad_norm``, {layer: norm} (health.py).
* ``eval`` (training's own centre-crop validation at an epoch's end, §4.1): ``split`` ("val"),
  ``ten_crop`` (false), ``step``, ``epoch`` (epochs completed), ``top1_err``, ``top5_err``, ``images``.
* ``alert`` (health.py's warnings): ``alert`` ("stalled" or "exploding"), ``step``, ``loss``, ``message``.
* ``epoch_end``: ``epoch`` (epochs completed), ``step``.
* ``checkpoint_eval`` (evals.jsonl): ``checkpoint`` (its path), ``dataset`` (the --data-dir evaluated
  on), ``split``, ``ten_crop``, ``step`` and ``epoch`` (the checkpoint's), ``top1_err``, ``top5_err``, ``images``.

Every record also carries ``time`` (Unix seconds); metrics.jsonl's also ``elapsed_s``, the run's
training time in seconds when the values were taken (a resumed run adds the killed run's time).
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from alexnet.pipeline import dali
from alexnet.pipeline.artifacts import atomic_write_bytes
from alexnet.pipeline.errors import AlexnetError

RUNS_DIR = Path("runs")  # where a run goes without --run-dir: runs/<UTC timestamp>
CHECKPOINT_DIR = "checkpoints"
LAST = "last.pt"
BEST = "best.pt"

SCHEMA = 1
RECORDS: dict[str, tuple[str, ...]] = {
    "train": ("step", "epoch", "epoch_progress", "loss", "lr", "images_per_s"),
    "eval": ("split", "ten_crop", "step", "epoch", "top1_err", "top5_err", "images"),
    "alert": ("alert", "step", "loss", "message"),
    "epoch_end": ("epoch", "step"),
    "checkpoint_eval": (
        "checkpoint",
        "dataset",
        "split",
        "ten_crop",
        "step",
        "epoch",
        "top1_err",
        "top5_err",
        "images",
    ),
}
# feed_wait_s, feed_wait_share: the step's wait for its batches over the interval (s, share of its time);
# memory: on GPUs, {device: {peak_allocated_gib, peak_reserved_gib}} (trainer/health.py).
OPTIONAL = {"train": ("weight_norm", "grad_norm", "feed_wait_s", "feed_wait_share", "memory")}


def record(kind: str, **fields: Any) -> dict[str, Any]:
    """A record of ``kind`` with exactly its fields (:data:`RECORDS`): a writer cannot drift from the schema."""
    need, allowed = set(RECORDS[kind]), set(RECORDS[kind]) | set(OPTIONAL.get(kind, ()))
    if not need <= set(fields) <= allowed:
        raise ValueError(
            f"a {kind!r} record has the fields {sorted(need)} (optional {sorted(allowed - need)}), not {sorted(fields)}"
        )
    return {"kind": kind, "schema": SCHEMA, **fields}


def epoch_name(epoch: int) -> str:
    return f"epoch-{epoch:04d}.pt"


def epoch_checkpoints(folder: Path) -> list[Path]:
    """The ``epoch-XXXX.pt`` files in ``folder``, oldest epoch first (other names are left alone)."""
    found = [(p.stem.removeprefix("epoch-"), p) for p in Path(folder).glob("epoch-*.pt")]
    return [p for n, p in sorted((int(n), p) for n, p in found if n.isdigit())]


def _under(*parts: str) -> property:
    return property(lambda self: self.root.joinpath(*parts))


@dataclass(frozen=True)
class RunDir:
    """The paths of one run directory (module docstring): each name is spelled here only."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    config = _under("config.json")
    versions = _under("versions.json")
    metrics = _under("metrics.jsonl")
    evals = _under("evals.jsonl")
    tensorboard = _under("tensorboard")
    checkpoints = _under(CHECKPOINT_DIR)
    last = _under(CHECKPOINT_DIR, LAST)
    best = _under(CHECKPOINT_DIR, BEST)
    report = _under("report")
    preview = _under("preview.png")

    def epoch_checkpoint(self, epoch: int) -> Path:
        return self.checkpoints / epoch_name(epoch)

    @classmethod
    def of_checkpoint(cls, checkpoint: Path) -> RunDir | None:
        """The run a checkpoint sits in (``RUN/checkpoints/NAME.pt``), or None."""
        parent = Path(checkpoint).resolve().parent
        return cls(parent.parent) if parent.name == CHECKPOINT_DIR else None


def newest_run() -> RunDir | None:
    """The newest run under :data:`RUNS_DIR` with a last.pt (timestamped names sort by time)."""
    runs = sorted(p.parent.parent for p in RUNS_DIR.glob(f"*/{CHECKPOINT_DIR}/{LAST}"))
    return RunDir(runs[-1]) if runs else None


def default_run_dir() -> Path:
    return RUNS_DIR / datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")


# --------------------------------------------------------------------------- reading


def read_log(path: Path, *, tolerate_torn_tail: bool = False) -> list[dict[str, Any]]:
    """The records of a log (metrics.jsonl or evals.jsonl), checked: JSON objects of this :data:`SCHEMA`
    with a known kind and its fields. One line naming the file and line otherwise. ``tolerate_torn_tail``:
    a last line cut short by a kill is dropped (resume rewrites the log)."""
    path = Path(path)
    if not path.is_file():
        raise AlexnetError(f"no {path.name} in {path.parent} (is this a run directory written by alexnet-train?)")
    lines = path.read_text().splitlines()
    out = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if tolerate_torn_tail and lineno == len(lines):
                break
            raise AlexnetError(f"{path}:{lineno}: not a JSON line ({e.msg})") from None
        out.append(_checked(rec, f"{path}:{lineno}"))
    return out


def _checked(rec: Any, where: str) -> dict[str, Any]:
    if not isinstance(rec, dict):
        raise AlexnetError(f"{where}: expected a JSON object")
    if rec.get("schema") != SCHEMA:
        found = f"schema {rec['schema']}" if "schema" in rec else "no schema version (a run from before schemas)"
        raise AlexnetError(f"{where}: a record of {found}; this alexnet-train reads schema {SCHEMA}: start a new run")
    kind = rec.get("kind")
    if kind not in RECORDS:
        raise AlexnetError(f"{where}: unknown record kind {kind!r} (known: {', '.join(RECORDS)})")
    missing = [k for k in RECORDS[kind] if k not in rec]
    if missing:
        raise AlexnetError(f"{where}: a {kind!r} record without {', '.join(missing)}")
    return rec


def by_kind(records: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r for r in records if r["kind"] == kind]


# --------------------------------------------------------------------------- writing


def say(is_main: bool, msg: str) -> None:
    """A line on stderr from the main replica only."""
    if is_main:
        print(msg, file=sys.stderr, flush=True)


def git_revision() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def versions() -> dict[str, Any]:
    from importlib import metadata

    from alexnet.pipeline.cli_common import package_version

    def dist_version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    try:
        from alexnet.pipeline.images import pil_summary

        pil = pil_summary()
    except ImportError:
        pil = "not installed"
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "alexnet": package_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "dali": dali.installed(),
        "pil": pil,
        "numpy": dist_version("numpy"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "gpus": gpus,
        "git_revision": git_revision(),
    }


class MetricsLog:
    """``metrics.jsonl`` (append, flushed per line) and, if tensorboardX is importable, TensorBoard."""

    def __init__(
        self, run_dir: Path, enabled: bool, t0: float, elapsed_before: float = 0.0, resume_step: int | None = None
    ) -> None:
        # elapsed_s counts the run's whole training time: a resumed run adds the killed run's time.
        # resume_step: the checkpoint's step; TensorBoard drops the killed run's later events
        # (purge_step), as truncate_metrics drops its later metrics lines.
        self.enabled, self.t0, self.elapsed_before = enabled, t0, elapsed_before
        run = RunDir(run_dir)
        self.path = run.metrics
        self.tb = None
        self.note = ""
        if not enabled:
            return
        run.root.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a", buffering=1)  # noqa: SIM115 - closed in close()
        try:
            from tensorboardX import SummaryWriter  # a dependency; a broken install only loses TensorBoard
        except ImportError:
            self.note = "note: tensorboardX is not importable, TensorBoard logs skipped (pip install tensorboardX)"
        else:
            purge = None if resume_step is None else resume_step + 1
            # tensorboardX names files by the second and the host: a nanosecond suffix keeps a resumed
            # run's file apart from the killed run's (and after it in name order, as TensorBoard reads them).
            self.tb = SummaryWriter(
                str(run.tensorboard), purge_step=purge, flush_secs=30, filename_suffix=f".{time.time_ns()}"
            )

    def stamp(self) -> dict[str, float]:
        """When a line's values were taken (the trainer writes a train line one log interval later)."""
        return {"elapsed_s": round(self.elapsed(), 3), "time": round(time.time(), 3)}

    def write(self, rec: dict[str, Any], stamp: dict[str, float] | None = None) -> None:
        if not self.enabled:
            return
        rec = {**rec, **(stamp or self.stamp())}
        self.file.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            step = rec.get("step", 0)
            if rec.get("kind") == "train":
                for key in ("loss", "lr", "images_per_s"):
                    self.tb.add_scalar(f"train/{key}", rec[key], step)
                for group in ("weight_norm", "grad_norm"):
                    for layer, value in rec.get(group, {}).items():
                        self.tb.add_scalar(f"{group}/{layer}", value, step)
            elif rec.get("kind") == "alert":
                self.tb.add_text(f"alert/{rec['alert']}", rec["message"], step)
            elif rec.get("kind") == "eval":
                for key in ("top1_err", "top5_err"):
                    self.tb.add_scalar(f"{rec['split']}/{key}", rec[key], step)

    def elapsed(self) -> float:
        return self.elapsed_before + time.monotonic() - self.t0

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def truncate_metrics(run: RunDir, step: int) -> None:
    """On resume, drop records the killed run wrote after the checkpoint (they will be redone), and a last
    line the kill cut short. A log of another schema is refused (:func:`read_log`)."""
    if not run.metrics.exists():
        return
    kept = [json.dumps(rec) for rec in read_log(run.metrics, tolerate_torn_tail=True) if int(rec["step"]) <= step]
    atomic_write_bytes(run.metrics, ("\n".join(kept) + "\n" if kept else "").encode())


def append_eval(run: RunDir, rec: dict[str, Any]) -> None:
    """One ``checkpoint_eval`` record appended to the run's evals.jsonl (never to training's own log)."""
    run.root.mkdir(parents=True, exist_ok=True)
    with run.evals.open("a") as f:
        f.write(json.dumps({**rec, "time": round(time.time(), 3)}) + "\n")
