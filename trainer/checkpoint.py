"""Checkpoints: written atomically, read back without unpickling arbitrary objects.

A checkpoint is one ``torch.save`` of a dict holding only tensors and plain containers (dict,
list, str, int, float, bool, None), so ``torch.load(weights_only=True)`` reads it. Values that are
not of those kinds (numpy arrays, numpy scalars, bytes, tuples: the pipeline's position and the
numpy/python RNG states) are encoded by :func:`to_safe` into tagged dicts of tensors and decoded
back exactly by :func:`from_safe`.

The layout is :data:`KEYS` (``FORMAT_VERSION`` 3): each key with what it holds, written by
``Trainer._payload`` (train.py) and checked by :meth:`Checkpointer.save`. The files' names are
rundir.py's; last.pt and best.pt are hard links to (or copies of) an epoch file where they can be,
so pruning an epoch file never removes their contents.
"""

from __future__ import annotations

import errno
import os
import random
import secrets
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alexnet.pipeline.errors import AlexnetError

from .rundir import LAST, RunDir, epoch_checkpoints

FORMAT_VERSION = 3
KEYS = {
    "format_version": "int, FORMAT_VERSION (added by save_checkpoint)",
    "model": "canonical state dict (any placement loads it)",
    "optimizer": "PaperSGD state dict (velocities)",
    "schedule": "the schedule's state_dict (schedule.py)",
    "epoch": "completed epochs (int)",
    "step": "optimiser steps done (int)",
    "batch_in_epoch": "steps done in the current epoch (0 at an epoch boundary)",
    "world_size": "replicas that wrote it",
    "rng": "one entry per replica: its generators (torch, CUDA, numpy, python)",
    "loader": "the loader's position: epoch, records consumed, seed (the same on every replica)",
    "scaler": "fp16's loss scaler state (its scale), else None",
    "config": "the run's config dict (config.py)",
    "best_top1_err": "best centre-crop validation top-1 error so far (or None)",
    "last_eval": "the last validation's result: top1_err, top5_err, images (or {})",
    "elapsed_s": "the run's training time so far in seconds (a resumed run adds the killed run's)",
    "loss_watch": "health.py's LossWatch state (first loss, intervals near chance, alerts raised)",
    "dataset": "what inference needs: classes, class_names, mean_image (dataset_entry)",
    "reason": "why it was written: 'epoch', 'periodic', 'signal', 'max_steps', 'time_limit', ...",
}

_TAG = "__alexnet_safe__"


class Checkpointer:
    """Writes a run's checkpoints: last.pt, epoch files, best.pt, pruning (``enabled``: the main replica)."""

    def __init__(self, run_dir: Path, keep_epochs: int, enabled: bool = True):
        self.run = RunDir(run_dir)
        self.dir, self.last = self.run.checkpoints, self.run.last
        self.keep_epochs, self.enabled = keep_epochs, enabled

    def save(self, payload: dict[str, Any], *, epoch: int | None = None, is_best: bool = False) -> None:
        """``last.pt``; at an epoch's end (``epoch`` given) the epoch file, with last.pt and best.pt linked to it."""
        if set(payload) != set(KEYS) - {"format_version"}:
            raise ValueError(f"checkpoint payload keys {sorted(payload)} differ from checkpoint.KEYS")
        if epoch is None:
            save_checkpoint(self.last, payload)
            return
        epoch_path = self.run.epoch_checkpoint(epoch)
        save_checkpoint(epoch_path, payload)
        link_or_copy(epoch_path, self.last)
        if is_best:
            link_or_copy(epoch_path, self.run.best)
        if self.keep_epochs:
            prune_epoch_checkpoints(self.dir, self.keep_epochs)


def link_or_copy(src: Path, dst: Path) -> None:
    """Make ``dst`` the same file as ``src`` atomically (hard link, else a copy), never half-written."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except OSError as e:  # a copy that fills the disk: dst keeps its previous contents
        tmp.unlink(missing_ok=True)
        raise AlexnetError(_write_failure(dst, e)) from None


def prune_epoch_checkpoints(ckpt_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` (>= 1) ``epoch-XXXX.pt`` files; returns what was deleted."""
    if keep < 1:
        raise ValueError("keep must be at least 1")
    doomed = epoch_checkpoints(ckpt_dir)[:-keep]
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed


# --------------------------------------------------------------------------- safe encoding


def to_safe(obj: Any) -> Any:
    """Encode ``obj`` with tensors and plain containers only (exactly reversible by from_safe)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, np.generic):
        return {_TAG: "npscalar", "dtype": obj.dtype.str, "data": _bytes_tensor(obj.tobytes())}
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise TypeError("object arrays cannot go into a checkpoint")
        arr = np.ascontiguousarray(obj)
        return {_TAG: "ndarray", "dtype": arr.dtype.str, "shape": list(arr.shape), "data": _bytes_tensor(arr.tobytes())}
    if isinstance(obj, bytes | bytearray):
        return {_TAG: "bytes", "data": _bytes_tensor(bytes(obj))}
    if isinstance(obj, tuple):
        return {_TAG: "tuple", "items": [to_safe(v) for v in obj]}
    if isinstance(obj, list):
        return [to_safe(v) for v in obj]
    if isinstance(obj, dict):
        if not all(isinstance(k, str | int) for k in obj):
            raise TypeError(f"checkpoint dict keys must be str or int, got {sorted({type(k).__name__ for k in obj})}")
        if _TAG in obj:
            raise TypeError(f"the key {_TAG!r} is reserved")
        return {k: to_safe(v) for k, v in obj.items()}
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint")


def from_safe(obj: Any) -> Any:
    if isinstance(obj, list):
        return [from_safe(v) for v in obj]
    if isinstance(obj, dict):
        tag = obj.get(_TAG)
        if tag is None:
            return {k: from_safe(v) for k, v in obj.items()}
        if tag == "bytes":
            return obj["data"].numpy().tobytes()
        if tag == "tuple":
            return tuple(from_safe(v) for v in obj["items"])
        if tag == "ndarray":
            raw = obj["data"].numpy().tobytes()
            return np.frombuffer(raw, dtype=np.dtype(obj["dtype"])).reshape(obj["shape"]).copy()
        if tag == "npscalar":
            return np.frombuffer(obj["data"].numpy().tobytes(), dtype=np.dtype(obj["dtype"]))[0]
        raise AlexnetError(f"checkpoint holds an unknown encoded value {tag!r}")
    return obj


def _bytes_tensor(b: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(b), dtype=torch.uint8) if b else torch.empty(0, dtype=torch.uint8)


# --------------------------------------------------------------------------- RNG states


def rng_state() -> dict[str, Any]:
    """Every generator the training step draws from: torch CPU (dropout on CPU), every CUDA
    device's (dropout on GPU), numpy's and python's global ones."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        n = min(len(cuda), torch.cuda.device_count())
        for i in range(n):
            torch.cuda.set_rng_state(cuda[i], device=i)


# --------------------------------------------------------------------------- files


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Atomically write ``payload``: streamed into a temporary file in the same folder (not through an
    in-memory copy, which doubled the process's memory while saving), fsync, rename. A failed write (a
    full disk) removes the temporary file and leaves the previous checkpoint as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    safe = to_safe({"format_version": FORMAT_VERSION, **payload})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for any file
        with os.fdopen(fd, "wb") as f:
            torch.save(safe, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save's writer reports a failed write as a RuntimeError
        tmp.unlink(missing_ok=True)
        raise AlexnetError(_write_failure(path, e)) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_failure(path: Path, e: Exception) -> str:
    if isinstance(e, OSError):
        full, why = e.errno == errno.ENOSPC, e.strerror or type(e).__name__
    else:
        full = path.parent.is_dir() and shutil.disk_usage(path.parent).free < (64 << 20)
        why = os.strerror(errno.ENOSPC) if full else (str(e).strip().splitlines() or [type(e).__name__])[0]
    fix = "free some space" if full else "choose a writable --run-dir"
    return (
        f"cannot write checkpoint {path}: {why}; {fix} and run the same command with --resume "
        "(the previous checkpoint is unchanged)"
    )


ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since PyTorch 1.6
PICKLE_MAGIC = b"\x80"  # the legacy (pickle) format


def read_checkpoint_file(path: Path) -> Any:
    """The raw object of a ``torch.save`` file, loaded with ``weights_only=True`` onto the CPU; a file that
    is missing, a directory, empty, of another format or damaged is one line naming it and the fix."""
    path = Path(path)
    if path.is_dir():
        raise AlexnetError(f"{path} is a directory, not a checkpoint: give a file such as {RunDir(path).last}")
    if not path.is_file():
        raise AlexnetError(f"no checkpoint at {path}: give the path of a .pt file written by alexnet-train")
    try:
        with path.open("rb") as f:
            head = f.read(64)
    except OSError as e:
        raise AlexnetError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    if not head:
        raise AlexnetError(f"cannot read checkpoint {path}: the file is empty (a write cut short?); {_other(path)}")
    if not head.startswith((ZIP_MAGIC, PICKLE_MAGIC)):
        first = (head[:24].decode("utf-8", "replace").splitlines() or [""])[0]
        start = repr(first) if first.strip() and first.isprintable() else "binary data"
        raise AlexnetError(f"cannot read checkpoint {path}: not a PyTorch file (it begins {start}); {_other(path)}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load's errors on damaged input vary: each becomes the same one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0]
        raise AlexnetError(f"cannot read checkpoint {path}: truncated or damaged ({first}); {_other(path)}") from None


def _other(path: Path) -> str:
    """The fix for an unreadable checkpoint: another one, naming the newest epoch file beside it."""
    epochs = [p for p in epoch_checkpoints(path.parent) if p.name != path.name and p.stat().st_size > 0]
    if epochs:
        return f"use another checkpoint, e.g. {epochs[-1]} (for --resume: copy it over {path.parent / LAST})"
    return "give a checkpoint written by alexnet-train"


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read an alexnet-train checkpoint (:func:`read_checkpoint_file`) and decode it (:func:`from_safe`)."""
    raw = read_checkpoint_file(path)
    if not isinstance(raw, dict) or "model" not in raw:
        raise AlexnetError(f"{path} is not an alexnet-train checkpoint ({_what(raw)}); {_other(Path(path))}")
    ckpt = from_safe(raw)
    version = ckpt.get("format_version")
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise AlexnetError(
            f"{path} was written by a newer alexnet-train (checkpoint format {version}; this one reads format "
            f"{FORMAT_VERSION}): upgrade alexnet (pip install -U) to use it"
        )
    if version != FORMAT_VERSION:
        raise AlexnetError(f"{path} has checkpoint format {version}; this alexnet-train reads format {FORMAT_VERSION}")
    return ckpt


def _what(raw: Any) -> str:
    """What a file that is not ours holds, in a few words (a bare state dict is the usual case)."""
    if isinstance(raw, dict) and raw and all(isinstance(v, torch.Tensor) for v in raw.values()):
        first = next(iter(raw))
        return (
            f"a bare state dict of {len(raw)} tensors, e.g. {first!r}, as torchvision's models save; no 'model' entry"
        )
    return "no 'model' entry"


# Settings a model depends on: eval, predict and export take them from the checkpoint; an option that
# says otherwise is refused.
CHECKPOINT_DECIDES = ("mean", "lrn", "lighting_scale", "precision")


def saved_setting(ck: dict[str, Any], name: str) -> Any:
    """A field of the run config saved in checkpoint ``ck`` (None when it is not there)."""
    for section in (ck.get("config") or {}).values():
        if isinstance(section, dict) and name in section:
            return section[name]
    return None


def checkpoint_precision(ck: dict[str, Any]) -> str:
    """The ``--precision`` the model was trained with (precision.py; ``auto`` resolves per device)."""
    return saved_setting(ck, "precision") or "auto"


def refuse_contradictions(path: Path, ck: dict[str, Any], given: dict[str, Any]) -> None:
    """One line for a typed option that contradicts the checkpoint's setting (the checkpoint decides)."""
    for name in CHECKPOINT_DECIDES:
        saved = saved_setting(ck, name)
        if name in given and saved is not None and given[name] != saved:
            flag = name.replace("_", "-")
            raise AlexnetError(
                f"{path} was trained with --{flag} {saved}, not {given[name]}: the checkpoint decides; drop --{flag}"
            )


def dataset_entry(manifest, mean_image, channel_mean=None) -> dict[str, Any]:
    """A checkpoint's ``dataset`` entry: what inference needs besides the weights (classes, their
    names, the mean to subtract), so that predict and export work without the dataset.

    ``channel_mean`` (RGB): a run trained with ``--mean channel`` subtracts it at every pixel, so the
    entry's mean image is that colour everywhere.
    """
    if channel_mean is not None:
        mean_image = np.broadcast_to(np.asarray(channel_mean, dtype=np.float32), np.shape(mean_image))
    return {
        "classes": list(manifest.classes),
        "class_names": list(manifest.class_names),
        "mean_image": torch.from_numpy(np.ascontiguousarray(mean_image, dtype=np.float32)),
    }
