"""The one module that knows DALI's pip distributions: import DALI, or say which extra installs it.

DALI ships one wheel per CUDA major (``nvidia-dali-cuda130``, ``nvidia-dali-cuda120``); the CUDA 13
build also runs in its CPU-only mode on machines without a GPU. The package installs one of them
through an extra (setup.cfg): ``pip install '.[cuda13]'`` or ``'.[cuda12]'``.
"""

from __future__ import annotations

from importlib import metadata

from .errors import AlexnetError

# extra -> distribution, newest CUDA first
DISTRIBUTIONS = {"cuda13": "nvidia-dali-cuda130", "cuda12": "nvidia-dali-cuda120"}
MISSING = (
    "NVIDIA DALI is not installed: install this package with the extra for your CUDA major, "
    "pip install 'alexnet[cuda13]' (CUDA 13, or a CPU-only machine) or 'alexnet[cuda12]' (CUDA 12) "
    "(from a checkout: pip install -e '.[cuda13]')"
)


def installed() -> str:
    """``"nvidia-dali-cuda130 2.4.0"`` for the installed DALI build(s), or ``"not installed"``."""
    found = []
    for dist in DISTRIBUTIONS.values():
        try:
            found.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            continue
    return ", ".join(found) or "not installed"


def require() -> None:
    """Import DALI, or raise one clear line naming the extra to install."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        raise AlexnetError(MISSING) from None
