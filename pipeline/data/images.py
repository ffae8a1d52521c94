"""Image files -> RGB PIL images, or one clear error naming the file.

Every failure a file on disk can cause (missing, unreadable, empty, truncated, corrupt, not an
image, a decompression bomb) becomes ``BadImageError``, so callers (feature extraction) can
record the image as skipped instead of crashing half-way through a dataset.

Conversion choices:
- Alpha (RGBA, LA, PA, palette transparency) is dropped, not composited: the colour channels are
  kept as stored, as torchvision's ``pil_loader`` and open_clip's preprocessing do.
- 16-bit greyscale (I;16*, I) is scaled from 0..65535 to 0..255; float (F) is clipped to 0..255.
- CMYK, YCbCr, LAB, HSV, 1-bit, L and P go through PIL's own ``convert("RGB")``.
- EXIF orientation is NOT applied: dataset annotations refer to the stored pixel grid.
- The format is sniffed from the content, so a JPEG named ``.png`` loads.

``read_for_device`` is the decode workers' side of extract.transforms "device": a complete RGB or
greyscale JPEG comes back as its bytes (decoded later on the backbone's device, with the same
orientation rule), anything else as ``load_image`` gives it, reasons for bad files included.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.errors import BadImageError

# PIL's own warning threshold (~89.5 MP, 256 MiB of RGB): far above any dataset image (COCO is
# <= 640 px a side). PIL itself only warns up to twice this; here it is an error.
MAX_PIXELS = 89_478_485
JPEG_START, JPEG_END = b"\xff\xd8\xff", b"\xff\xd9"  # SOI + the first marker's 0xff; EOI


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(img, dtype=np.float64) / 257.0  # 65535 -> 255
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        arr = np.clip(np.rint(np.asarray(img, dtype=np.float64)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # PIL warns when a transparent palette goes straight to RGB
    return img.convert("RGB")


def load_image(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open, fully decode and convert to RGB; any failure raises ``BadImageError``."""
    path = Path(path)
    if not path.is_file():
        raise BadImageError(path, "no such file" if not path.exists() else "not a regular file")
    if path.stat().st_size == 0:
        raise BadImageError(path, "empty file (0 bytes)")
    try:
        # No warnings.catch_warnings() here: it is not thread-safe, and the size check below
        # already rejects what PIL would only warn about.
        with Image.open(path) as img:
            width, height = img.size  # header only: nothing decoded yet
            if width < 1 or height < 1:
                raise BadImageError(path, f"zero-size image {width}x{height}")
            if width * height > max_pixels:
                raise BadImageError(path, f"declared size {width}x{height} exceeds {max_pixels} "
                                    "pixels (possible decompression bomb)")
            img.load()  # decode every pixel now: truncation and corruption surface here
            return _to_rgb(img)
    except BadImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadImageError(path, f"decompression bomb: {err}") from err
    except Exception as err:  # decoders raise OSError, SyntaxError, struct.error, zlib.error, ...
        raise BadImageError(path, f"{type(err).__name__}: {err}") from err


def read_for_device(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> bytes | Image.Image:
    """A JPEG the device decoder can take -> its bytes; anything else -> ``load_image(path)``.

    Taken as bytes: a regular file that starts like a JPEG, ends with the EOI marker (a truncated
    file does not: it goes to PIL, which reports it exactly as load_image does), whose header
    declares L or RGB pixels within ``max_pixels``. Only the header is parsed here. CMYK/YCCK
    JPEGs, other formats and every doubtful file take the PIL path: same pixels, same reasons.
    """
    path = Path(path)
    try:
        data = path.read_bytes() if path.is_file() else b""
    except OSError:  # unreadable: load_image says why
        data = b""
    if data.startswith(JPEG_START) and data.endswith(JPEG_END) and _plain_jpeg(data, max_pixels):
        return data
    return load_image(path, max_pixels)


def _plain_jpeg(data: bytes, max_pixels: int) -> bool:
    """Its header declares L or RGB pixels within max_pixels (any doubt: False, PIL decides)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            return img.mode in ("L", "RGB") and 0 < width * height <= max_pixels
    except Exception:
        return False
