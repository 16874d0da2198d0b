"""The step's arithmetic (``--precision``): one place that says what each choice computes.

* ``fp32``: the paper's arithmetic. On a GPU TF32 is turned off for matmuls and cuDNN convolutions
  alike, so every product is a full float32 one.
* ``bf16``: bfloat16 autocast for the forward pass, float32 master weights, velocities, loss and
  LRN denominators (model.py), TF32 for what stays float32. No loss scaling needed (bf16 has
  float32's range).
* ``fp16``: float16 autocast with loss scaling (``torch.amp.GradScaler``), for GPUs without bf16
  (V100, T4). The scaler reads its overflow flag on the host each step, so this step is never
  captured as a CUDA graph (step.py falls back to eager and says so).
* ``auto``: ``bf16`` on a GPU, ``fp32`` on the CPU (docs/DEVIATIONS.md T4).

On a GPU the model and its inputs are channels_last (NHWC: cuDNN's fast layout for these
convolutions); on the CPU they stay NCHW. evaluate.py and step.py use :func:`autocast`.
"""

from __future__ import annotations

import contextlib

import torch

from alexnet.pipeline.errors import AlexnetError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
_LOADER_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` made concrete for ``device`` (bf16 on a GPU, fp32 elsewhere); other values as given."""
    if precision not in PRECISIONS:
        raise AlexnetError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    return precision


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context of ``precision`` (``auto`` resolved for ``device``): a no-op for fp32.

    No weight-cast cache: each weight is cast once per step anyway, and a CUDA-graph capture must not
    keep cached casts."""
    dtype = _AUTOCAST.get(resolve_precision(precision, device))
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype, cache_enabled=False)


def channels_last(device: torch.device) -> bool:
    """NHWC for the model and its inputs: on GPUs (cuDNN's fast layout), not on the CPU."""
    return torch.device(device).type == "cuda"


def loader_dtype(precision: str, device: torch.device) -> str:
    """The dtype the loader delivers images in for this step: half the bytes under bf16 and fp16."""
    return _LOADER_DTYPE[resolve_precision(precision, device)]


def set_tf32(precision: str, device: torch.device) -> None:
    """TF32 on for bf16/fp16 runs (what stays float32 runs as TF32), off for fp32 (the paper's
    arithmetic), for matmuls and cuDNN convolutions both. Process-wide: torch's switches are global."""
    if torch.device(device).type != "cuda":
        return
    tf32 = resolve_precision(precision, device) != "fp32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
