"""How an image file becomes a stored 256x256 record's pixels (§2), and which PIL does it.

The builder (``alexnet-prep build-lmdb``) stores what these functions return, re-encoded as JPEG;
``alexnet-train predict`` feeds users' photos through the same two steps, so a photo is
preprocessed exactly as a training record was made.

- ``decode_image``: decode with PIL (pillow-simd); for JPEGs at least ``DRAFT_MIN_FACTOR`` x 2
  times larger than needed, decode at 1/2, 1/4 or 1/8 scale with libjpeg's DCT scaling
  (``Image.draft``), never below ``DRAFT_MIN_FACTOR`` x 256 on the shorter side, so the final
  resize still reduces by at least 2x. Measured against the full decode
  (``tests/test_build_lmdb.py::test_draft_within_tolerance``): mean absolute difference below
  ``DRAFT_TOLERANCE`` grey levels. Every mode (CMYK, grayscale, palette, RGBA, PNG named .JPEG)
  becomes RGB; 16-bit greyscale is scaled to 8 bits (PIL would clip it); a gzip-wrapped file (a few of
  ILSVRC-2010's members, still so in a tree extracted by hand) is unwrapped first. ``decode_source`` also
  says how the file was converted (``CONVERSIONS``), which the builder counts. EXIF orientation is ignored: pixels are used as coded, as the ImageNet reference
  loaders (PIL in torchvision's ImageFolder, Caffe's convert_imageset, cuda-convnet2) do;
- ``resize_centre_crop``: "rescale the image such that the shorter side was of length 256, and
  then cropped out the central 256x256 patch", with PIL's antialiased bilinear filter
  (``RESAMPLE_NAME``, torchvision's ImageNet ``Resize(256)``; the paper names none). Smaller images
  are upscaled. Only the central window is computed: ``resize(..., box=...)`` maps the crop back
  to source coordinates, identical (to float rounding) to resizing the whole image and cropping.

PIL is imported only when used, so importing this module stays cheap.

    python -m alexnet.pipeline.images [--require-simd]

prints the active PIL; with ``--require-simd`` it fails when plain Pillow (installed later, it
shadows pillow-simd: both install the same ``PIL`` package) is the active one.
"""

from __future__ import annotations

import gzip
import io
import math
import sys
import warnings
import zlib

from . import constants as C

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# Decode at reduced DCT scale only while the decoded shorter side stays >= this many times
# RESIZE_SHORTER; the final antialiased resize then still reduces by >= 2x, which keeps the
# result within DRAFT_TOLERANCE of a full decode (measured in tests/test_build_lmdb.py).
DRAFT_MIN_FACTOR = 2
DRAFT_TOLERANCE = 1.0  # grey levels, mean abs difference over the 256x256x3 crop (measured 0.17-0.53)
RESAMPLE_NAME = "bilinear"  # PIL's antialiased triangle filter (torchvision's Resize default)
GZIP_MAGIC = b"\x1f\x8b"
# How a kept source file was converted on its way to an RGB JPEG (counted by the builder): unwrapped from
# gzip, another format under an image name (its format in lower case, e.g. "png"), or another colour mode.
CONVERSIONS = ("gzip", "png", "cmyk", "grey")
_MODE_KINDS = {"CMYK": "cmyk", "L": "grey", "LA": "grey", "1": "grey"}  # and WIDE_GREY_MODES: "grey"


# Greyscale modes of more than 8 bits (16-bit PNGs and TIFFs). PIL's convert("RGB") clips their values
# at 255 instead of scaling them: a 16-bit photo would be nearly all white.
WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _grey_to_8_bits(im):
    """A 16-bit greyscale image scaled to 8 bits (v * 255 / 65535, rounded), as mode "L"."""
    import numpy as np
    from PIL import Image

    wide = np.asarray(im, dtype=np.float64)  # "I" holds 16-bit sources as 32-bit integers
    return Image.fromarray(np.clip(np.rint(wide * (255 / 65535)), 0, 255).astype(np.uint8))


class Rejected(Exception):
    """A source file that cannot become a record; the message is the reason."""


def centre_crop_box(width: int, height: int) -> tuple[tuple[int, int], tuple[float, float, float, float]]:
    """The resized size (shorter side 256) and the central 256x256 window in source coordinates."""
    if width <= height:
        new_w, new_h = C.RESIZE_SHORTER, max(C.RESIZE_SHORTER, round(height * C.RESIZE_SHORTER / width))
    else:
        new_w, new_h = max(C.RESIZE_SHORTER, round(width * C.RESIZE_SHORTER / height)), C.RESIZE_SHORTER
    left, top = (new_w - C.STORED_SIZE) // 2, (new_h - C.STORED_SIZE) // 2
    sx, sy = width / new_w, height / new_h
    box = (left * sx, top * sy, (left + C.STORED_SIZE) * sx, (top + C.STORED_SIZE) * sy)
    return (new_w, new_h), box


def resize_centre_crop(im):
    """§2: shorter side -> 256, central 256x256 patch, computed in one resampling pass."""
    from PIL import Image

    _, box = centre_crop_box(*im.size)
    return im.resize((C.STORED_SIZE, C.STORED_SIZE), Image.Resampling.BILINEAR, box=box)


def decode_image(data: bytes, *, draft: bool = True):
    """Bytes -> RGB PIL image (draft-decoded when much larger than needed). Raises ``Rejected``."""
    return decode_source(data, draft=draft)[0]


def decode_source(data: bytes, *, draft: bool = True):
    """``(RGB PIL image, how it was converted)``: ``decode_image`` and the kinds of ``CONVERSIONS`` it took."""
    kinds = []
    if data[:2] == GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise Rejected(f"undecodable (a broken gzip wrapper: {e})") from None
        kinds.append("gzip")
    im = _loaded(data, draft)
    if min(im.size) < 1:
        raise Rejected("empty image")
    if im.format != "JPEG":
        kinds.append(str(im.format).lower())
    if im.mode != "RGB":
        kinds.append(_MODE_KINDS.get(im.mode, "grey" if im.mode in WIDE_GREY_MODES else im.mode.lower()))
    if im.mode in WIDE_GREY_MODES:
        im = _grey_to_8_bits(im)
    return (im if im.mode == "RGB" else _converted(im)), tuple(kinds)


def decode_record(data: bytes, *, rgb_only: bool = False):
    """A stored record's image (a 256x256 JPEG) as uint8 ``[256, 256, 3]`` RGB: the one decoder of stored
    records (pca-stats, verify, the report's figures). Grayscale and CMYK JPEGs become RGB, as DALI's
    ``output_type=RGB`` does, unless ``rgb_only`` (verify: build-lmdb stores RGB only). Raises
    ``Rejected`` saying what the record holds instead."""
    import numpy as np

    try:
        im = _loaded(data, draft=False)
    except Rejected as e:
        raise Rejected(f"JPEG does not decode ({e})") from None
    if im.format != "JPEG" or im.size != (C.STORED_SIZE, C.STORED_SIZE) or (rgb_only and im.mode != "RGB"):
        raise Rejected(
            f"image is {im.format} {im.mode} {im.size[0]}x{im.size[1]}, expected "
            f"{'RGB ' if rgb_only else ''}JPEG {C.STORED_SIZE}x{C.STORED_SIZE}"
        )
    return np.asarray(im if im.mode == "RGB" else _converted(im))


def _loaded(data: bytes, draft: bool):
    """The decoded PIL image in its own mode; ``Rejected`` with the reason when it cannot be."""
    from PIL import Image

    if not data:
        raise Rejected("zero-byte file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning, EXIF and palette warnings
            im = Image.open(io.BytesIO(data))
            if draft and im.format == "JPEG":
                w, h = im.size
                need = DRAFT_MIN_FACTOR * C.RESIZE_SHORTER / min(w, h)
                if need <= 0.5:  # DCT scaling picks the largest 1/k keeping both sides >= the request
                    im.draft("RGB", (math.ceil(w * need), math.ceil(h * need)))
            im.load()
    except Exception as e:
        raise _rejected(e) from None
    return im


def _converted(im):
    """``im`` in RGB (conversion can fail on a broken palette: a rejection too)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return im.convert("RGB")
    except Exception as e:
        raise _rejected(e) from None


def _rejected(e: Exception) -> Exception:
    """What a PIL failure means for the file (anything else is raised as it is)."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(e, UnidentifiedImageError):
        return Rejected("not an image (format not recognised)")
    if isinstance(e, Image.DecompressionBombError):
        return Rejected(f"too large ({e})")
    if isinstance(e, (OSError, SyntaxError, ValueError, EOFError)):
        text = str(e)
        reason = "truncated" if "truncated" in text.lower() or isinstance(e, EOFError) else "undecodable"
        return Rejected(f"{reason} ({text})" if text else reason)
    return e


# --------------------------------------------------------------------------- which PIL


def pil_info() -> dict[str, str | bool]:
    """The active PIL: version, whether it is pillow-simd (versions like ``12.1.1.post0``), its libjpeg."""
    import PIL
    from PIL import features

    version = PIL.__version__
    simd = ".post" in version
    jpeg = features.version("jpg") or "unknown"
    return {"version": version, "simd": simd, "libjpeg": str(jpeg), "name": "pillow-simd" if simd else "Pillow"}


def pil_summary() -> str:
    info = pil_info()
    return f"{info['name']} {info['version']} (libjpeg {info['libjpeg']})"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    print(f"active PIL: {pil_summary()}")
    if "--require-simd" in argv and not pil_info()["simd"]:
        print("error: plain Pillow has shadowed pillow-simd (see README, 'pillow-simd')", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
