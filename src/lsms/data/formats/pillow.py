"""PNG, BMP, GIF and JPEG through Pillow: 8-bit grey or colour, 16-bit grey, and 16-bit colour PNG through
SimpleITK (Pillow would reduce it to 8 bits)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from lsms.data.formats.base import (
    LIMIT_ENV,
    ImageData,
    ImageReader,
    ImageReadError,
    ImageTooLargeError,
    ReadLimits,
    check_file_bytes,
    check_signature,
    finish,
    first_line,
)


class PillowReader(ImageReader):
    """One 2D image per file, parsed whole (bounded by ``max_file_bytes``); a constant alpha channel is dropped."""

    name = "PNG"
    suffixes = (".png", ".bmp", ".gif")

    def image_format(self, path: Path) -> str:
        """``ImageData.format`` of a file: its ending without the dot."""
        return path.suffix.lower().lstrip(".")

    def read(self, path: Path, slice_index: int | None, limits: ReadLimits, series_uid: str | None = None) -> ImageData:
        from PIL import Image

        if slice_index not in (None, 0):
            raise ImageReadError(f"{path}: slice_index={slice_index} given but {path.suffix.lower()} files hold one "
                                 "2D image")
        check_file_bytes(path, limits)
        fmt = self.image_format(path)
        check_signature(path, fmt.upper())  # a TIFF renamed .png is not decoded as whatever Pillow finds inside
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own, lower limit applies below
                self.check_integrity(path)
                with Image.open(path) as im:
                    w, h = im.size
                    limits.check(path, "max_image_pixels", w * h, f"the image declares {h} x {w} pixels")
                    png = _png_depth_and_colour(path)
                    if png is not None and png[0] == 16 and png[1] in (2, 4, 6):
                        return _read_png16_colour(path, fmt, colour_type=png[1])
                    arr, mode = _pil_pixels(im, path)
        except ImageReadError:
            raise
        except Image.DecompressionBombError as err:  # Pillow's own ceiling, above ours: refused before we saw the size
            raise ImageTooLargeError(
                f"{path}: {err}; that is above the limit max_image_pixels = {limits.max_image_pixels:,} "
                f"(environment variable {LIMIT_ENV['max_image_pixels']}, see docs/reliability.md)") from err
        except (OSError, SyntaxError, ValueError) as err:
            raise ImageReadError(f"{path}: cannot decode the image ({err}); the file is truncated or not an image") from err
        if arr.ndim == 3 and arr.shape[-1] == 4 and np.all(arr[..., 3] == arr[..., 3].flat[0]):
            arr = arr[..., :3]  # constant alpha carries nothing
        bits = 16 if mode.startswith("I;16") else (32 if mode in ("I", "F") else 8)
        return ImageData(finish(arr, path, "image"), path, fmt, bit_depth=None if mode == "F" else bits)

    def check_integrity(self, path: Path) -> None:
        """Raise for damage the decoder passes over (checked before decoding): Pillow's ``verify`` checks a PNG's chunk
        CRCs and its end chunk (IEND), which decoding the pixels does not need."""
        from PIL import Image

        with Image.open(path) as im:
            im.verify()


class JpegReader(PillowReader):
    """JPEG: read as the other Pillow formats; lossy, so a JPEG mask is thresholded at half its maximum."""

    name = "JPEG"
    suffixes = (".jpg", ".jpeg")
    lossy = True

    def image_format(self, path: Path) -> str:
        return "jpeg"

    def check_integrity(self, path: Path) -> None:
        """Raise for a damaged marker structure: the decoder reads as many bytes as the image needs and passes over
        the rest, so garbage in the image data would otherwise decode as a picture."""
        damage = _jpeg_damage(path.read_bytes())
        if damage:
            raise ImageReadError(f"{path}: the JPEG is damaged ({damage}); re-export it from its source")


_JPEG_AFTER_SCAN = {0xC4, 0xCC, 0xD9, 0xDA, 0xDB, 0xDC, 0xDD, 0xFE, *range(0xE0, 0xF0)}  # markers a scan may end at


def _jpeg_damage(data: bytes) -> str | None:
    """What is wrong with a JPEG's structure, or None: segments that follow each other by their lengths, image data
    (after each start-of-scan) holding only stuffed 0xFF 0x00 bytes and restart markers, and an end marker (EOI)."""
    i, n = 2, len(data)  # after the start marker (SOI)
    while True:
        if i + 1 >= n or data[i] != 0xFF:
            return f"no marker at byte {i}; the file is cut short or its segments are damaged"
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        if marker == 0xD9:  # end of image
            return None
        if i + 4 > n:
            return "the file is cut short"
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
        if marker != 0xDA:
            continue
        while True:  # the entropy-coded image data of a scan, up to the next marker
            i = data.find(b"\xff", i)
            if i < 0 or i + 1 >= n:
                return "the image data has no end marker; the file is cut short"
            after = data[i + 1]
            if after == 0x00 or 0xD0 <= after <= 0xD7:  # a stuffed 0xFF value, a restart marker
                i += 2
            elif after == 0xFF:
                i += 1
            elif after in _JPEG_AFTER_SCAN:
                break
            else:
                return f"the image data holds the invalid marker 0xFF{after:02X} at byte {i}"


def _png_depth_and_colour(path: Path) -> tuple[int, int] | None:
    """(bit depth, colour type) from a PNG's IHDR chunk; None for other files."""
    with path.open("rb") as f:
        head = f.read(26)
    if len(head) < 26 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    return head[24], head[25]


def _pil_pixels(im: Any, path: Path) -> tuple[np.ndarray, str]:
    """Decode an opened Pillow image (one frame, palette applied) -> (array, the file's mode)."""
    frames = int(getattr(im, "n_frames", 1) or 1)
    if frames > 1:
        raise ImageReadError(f"{path}: the file holds {frames} frames; lsms reads one 2D image per file (save the "
                             "frame you need on its own, or use a multi-page TIFF with a slice index)")
    im.load()
    mode = im.mode
    if mode == "P":
        if im.palette is None:
            raise ImageReadError(f"{path}: an indexed-colour image without its palette (no PLTE chunk), so its colours "
                                 "are unknown; re-save it as grey or RGB")
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif mode in ("LA", "PA"):
        im = im.convert("L")
    elif mode in ("CMYK", "YCbCr"):
        im = im.convert("RGB")
    return np.array(im), mode


def _read_png16_colour(path: Path, fmt: str, colour_type: int) -> ImageData:
    """16-bit RGB(A) or grey+alpha PNG: Pillow would reduce it to 8 bits, so SimpleITK (libpng) decodes it."""
    import SimpleITK as sitk

    try:
        arr = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))  # (H, W, C) uint16
    except RuntimeError as err:
        raise ImageReadError(f"{path}: cannot decode the 16-bit PNG ({first_line(err)})") from err
    if colour_type == 4:
        arr = arr[..., 0]  # grey + alpha: the grey channel, as for 8-bit LA
    elif arr.ndim == 3 and arr.shape[-1] == 4 and np.all(arr[..., 3] == arr[..., 3].flat[0]):
        arr = arr[..., :3]
    return ImageData(finish(arr, path, "image"), path, fmt, bit_depth=16)
