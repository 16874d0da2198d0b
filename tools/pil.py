"""Which PIL is active: pillow-simd (wanted) or plain Pillow (it shadows pillow-simd when installed later).

Both distributions install the same ``PIL`` package; whichever was installed last wins.
pillow-simd reports versions like ``12.1.1.post0``.

    python -m alexnet.tools.pil [--require-simd]
"""

from __future__ import annotations

import sys
import warnings


def pil_info() -> dict[str, str | bool]:
    import PIL
    from PIL import features

    version = PIL.__version__
    simd = ".post" in version
    try:
        jpeg = features.version("jpg") or "unknown"
    except Exception:  # pragma: no cover - very old Pillow
        jpeg = "unknown"
    return {"version": version, "simd": simd, "libjpeg": str(jpeg), "name": "pillow-simd" if simd else "Pillow"}


def pil_summary() -> str:
    info = pil_info()
    return f"{info['name']} {info['version']} (libjpeg {info['libjpeg']})"


def warn_if_shadowed() -> bool:
    """Warn when plain Pillow is the active PIL; returns True when pillow-simd is active."""
    info = pil_info()
    if not info["simd"]:
        warnings.warn(
            f"plain Pillow {info['version']} is the active PIL: it has shadowed pillow-simd, so image "
            "decoding and resizing run slower. Reinstall with: pip install --force-reinstall --no-binary "
            "pillow-simd pillow-simd",
            stacklevel=2,
        )
    return bool(info["simd"])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    info = pil_info()
    print(f"active PIL: {pil_summary()}")
    if "--require-simd" in argv and not info["simd"]:
        print("error: plain Pillow has shadowed pillow-simd (see README, 'pillow-simd')", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
