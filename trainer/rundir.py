"""The run directory's files, apart from config.json (config.py) and checkpoints (checkpoint.py)::

RUN/versions.json      package, torch, DALI, PIL, python, git revision
RUN/metrics.jsonl      one JSON object per line (kind "train", "eval" or "alert")
RUN/tensorboard/       TensorBoard event files (tensorboardX): the same scalars
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from alexnet.pipeline import dali
from alexnet.pipeline.artifacts import atomic_write_bytes

METRICS_FILE = "metrics.jsonl"
VERSIONS_FILE = "versions.json"
TENSORBOARD_DIR = "tensorboard"
RUNS_DIR = Path("runs")


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
        self.path = run_dir / METRICS_FILE
        self.tb = None
        self.note = ""
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
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
                str(run_dir / TENSORBOARD_DIR), purge_step=purge, flush_secs=30, filename_suffix=f".{time.time_ns()}"
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
            else:
                tag = f"{rec.get('split', 'val')}{'_ten_crop' if rec.get('ten_crop') else ''}"
                for key in ("top1_err", "top5_err"):
                    self.tb.add_scalar(f"{tag}/{key}", rec[key], step)

    def elapsed(self) -> float:
        return self.elapsed_before + time.monotonic() - self.t0

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop lines the killed run wrote after the checkpoint (they will be redone)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a half-written last line from the kill
        if int(rec.get("step", 0)) <= step:
            kept.append(line)
    atomic_write_bytes(path, ("\n".join(kept) + "\n" if kept else "").encode())


def default_run_dir() -> Path:
    return RUNS_DIR / datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
