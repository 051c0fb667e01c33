"""TIFF through tifffile: one page, or one page of a multi-page file by slice index."""

from __future__ import annotations

from pathlib import Path

from lsms.data.formats.base import (
    ImageData,
    ImageReader,
    ImageReadError,
    ReadLimits,
    bit_depth,
    finish,
    first_line,
    pick,
    pixel_count,
)


class TiffReader(ImageReader):
    """A page at a time: only the page read is bounded (by ``max_image_pixels``), not the file."""

    name = "TIFF"
    suffixes = (".tif", ".tiff")

    def read(self, path: Path, slice_index: int | None, limits: ReadLimits, series_uid: str | None = None) -> ImageData:
        import tifffile

        try:
            with tifffile.TiffFile(path) as tif:
                page = tif.pages[pick(path, slice_index, len(tif.pages), "a multi-page TIFF", "pages")]
                shape = tuple(int(s) for s in page.shape)
                limits.check(path, "max_image_pixels", pixel_count(shape), f"the page declares shape {shape}, pixels")
                arr = page.asarray()
        except ImageReadError:
            raise
        except Exception as err:  # tifffile raises many types for damaged files
            raise ImageReadError(f"{path}: cannot decode the TIFF ({first_line(err)}); the file is truncated or not a "
                                 "TIFF") from err
        return ImageData(finish(arr, path, "TIFF image"), path, "tiff", bit_depth=bit_depth(arr.dtype))

    def depth(self, path: Path, limits: ReadLimits) -> int | None:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            n = len(tif.pages)
            shape = tuple(int(s) for s in tif.pages[0].shape)
        limits.check(path, "max_image_pixels", pixel_count(shape), f"the page declares shape {shape}, pixels")
        return n if n > 1 else None
