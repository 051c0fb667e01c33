"""DICOM: one file (or one frame of a multi-frame file) through pydicom, and a series folder through SimpleITK.
Values are returned in the stored physical unit (HU for CT: RescaleSlope and RescaleIntercept applied)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from lsms.data.formats.base import (
    Geometry,
    ImageData,
    ImageReader,
    ImageReadError,
    ReadLimits,
    Volume,
    bit_depth,
    check_file_bytes,
    check_index,
    finish,
    first_line,
    pick,
)


class DicomReader(ImageReader):
    """A file is parsed whole (bounded by ``max_file_bytes``) but only the frame asked for is decoded; a series
    folder is loaded whole (bounded by ``max_volume_voxels``), sorted along the slice normal."""

    name = "DICOM"
    suffixes = (".dcm", ".dicom")
    media_types = ("application/dicom",)
    series = True

    def sniff(self, path: Path) -> bool:
        try:
            with path.open("rb") as f:
                f.seek(128)
                return f.read(4) == b"DICM"
        except OSError:
            return False

    def read(self, path: Path, slice_index: int | None, limits: ReadLimits, series_uid: str | None = None) -> ImageData:
        if path.is_dir():
            return _read_series(path, slice_index, series_uid, limits)
        return _read_file(path, slice_index, limits)

    def depth(self, path: Path, limits: ReadLimits) -> int | None:
        if path.is_dir():
            return len(_series_files(path, None)[1])
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True)
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        limits.check(path, "max_image_pixels", rows * cols, f"each frame declares {rows} x {cols} pixels")
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        return frames if frames > 1 else None

    def open_volume(self, path: Path, limits: ReadLimits, series_uid: str | None = None) -> Volume | None:
        if not path.is_dir():
            return None  # a multi-frame file decodes one frame at a time
        try:
            _, files = _series_files(path, series_uid)
            img, modality = _load_series(path, files, limits)
        except ImageReadError:
            raise
        except Exception as err:
            raise ImageReadError(f"{path}: cannot read the DICOM series ({type(err).__name__}: {first_line(err)})") from err
        return Volume(path, len(files), lambda k: _series_slice(img, path, k, modality))


def _numbers(ds: Any, path: Path, keyword: str, count: int | None = None) -> list[float] | None:
    """A numeric tag's values, checked finite (and there being ``count`` of them); None when absent."""
    if keyword not in ds or ds[keyword].value in (None, ""):
        return None
    from pydicom.multival import MultiValue

    value = ds[keyword].value
    values = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
    try:
        numbers = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ImageReadError(f"{path}: DICOM tag {keyword} = {value!r} is not numeric") from None
    if (count is not None and len(numbers) != count) or not all(math.isfinite(v) for v in numbers):
        raise ImageReadError(f"{path}: DICOM tag {keyword} = {value!r}; expected {count or 1} finite number(s)")
    return numbers


def _read_file(path: Path, slice_index: int | None, limits: ReadLimits) -> ImageData:
    import pydicom
    from pydicom.pixels import apply_color_lut, pixel_array

    check_file_bytes(path, limits)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    rows, cols = ds.get("Rows"), ds.get("Columns")
    if not rows or not cols:
        raise ImageReadError(f"{path}: the DICOM file has no image (Rows/Columns missing or 0)")
    limits.check(path, "max_image_pixels", int(rows) * int(cols), f"each frame declares {rows} x {cols} pixels")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    slice_index = pick(path, slice_index, frames, "a multi-frame DICOM", "frames")
    slope = (_numbers(ds, path, "RescaleSlope", 1) or [1.0])[0]
    intercept = (_numbers(ds, path, "RescaleIntercept", 1) or [0.0])[0]
    if slope == 0:
        raise ImageReadError(f"{path}: DICOM RescaleSlope is 0, so every pixel would read as the intercept; fix the tag")
    ps = _numbers(ds, path, "PixelSpacing", 2) or _numbers(ds, path, "ImagerPixelSpacing", 2)
    if ps is not None and min(ps) <= 0:
        raise ImageReadError(f"{path}: DICOM pixel spacing {ps} must be positive; fix PixelSpacing")
    palette = str(ds.get("PhotometricInterpretation", "")).strip() == "PALETTE COLOR"
    if palette and not all(f"{c}PaletteColorLookupTableDescriptor" in ds for c in ("Red", "Green", "Blue")):
        raise ImageReadError(f"{path}: a PALETTE COLOR DICOM without its colour table (the Red/Green/Blue Palette "
                             "Color Lookup Table tags), so its colours are unknown; re-export the file with its table")
    pydicom_log = logging.getLogger("pydicom")
    level = pydicom_log.level
    pydicom_log.setLevel(logging.CRITICAL + 1)  # a failed decode is logged with a traceback; the error below says it
    try:
        raw = pixel_array(path, index=slice_index if frames > 1 else None)  # one frame only is decoded
        if palette:
            raw = apply_color_lut(raw, ds)  # indices -> (H, W, 3) colours
    except Exception as err:  # pydicom raises several types for damaged or compressed files
        raise ImageReadError(
            f"{path}: cannot read the DICOM pixel data ({first_line(err)}); for compressed transfer syntaxes install "
            "pylibjpeg or gdcm support, or convert the file"
        ) from err
    finally:
        pydicom_log.setLevel(level)
    arr = raw.astype(np.float32) * np.float32(slope) + np.float32(intercept)  # stored value -> HU (CT)
    spacing = None if ps is None else (ps[0], ps[1])
    geometry = None
    iop = _numbers(ds, path, "ImageOrientationPatient", 6)
    ipp = _numbers(ds, path, "ImagePositionPatient", 3)
    if frames == 1 and iop is not None and ipp is not None and spacing is not None:
        row, col = np.array(iop[:3], float), np.array(iop[3:], float)
        normal = np.cross(row, col)
        thickness = (_numbers(ds, path, "SliceThickness", 1) or [1.0])[0]
        thickness = thickness if thickness > 0 else 1.0  # only the written mask's z spacing; one slice
        direction = np.stack([row, col, normal], axis=1)  # columns are the x, y, z axis directions
        geometry = Geometry(
            size=(int(raw.shape[-1]), int(raw.shape[-2]), 1), spacing=(spacing[1], spacing[0], thickness),
            origin=tuple(ipp), direction=tuple(float(v) for v in direction.ravel()), slice_index=0,
        )
    return ImageData(
        finish(arr, path, "DICOM image"), path, "dicom", spacing=spacing,
        modality=str(ds.get("Modality", "") or "") or None,
        bit_depth=bit_depth(raw.dtype) if palette else int(ds.get("BitsStored", 0) or 0) or None,
        geometry=geometry,
    )


def _series_files(folder: Path, series_uid: str | None) -> tuple[str, list[str]]:
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    uids = list(reader.GetGDCMSeriesIDs(str(folder)))
    if not uids:
        raise ImageReadError(f"{folder}: no DICOM series found in this folder")
    if series_uid is None:
        if len(uids) > 1:
            raise ImageReadError(f"{folder}: the folder holds {len(uids)} DICOM series {uids}; choose one with series_uid")
        series_uid = uids[0]
    elif series_uid not in uids:
        raise ImageReadError(f"{folder}: no series {series_uid!r}; the folder holds {uids}")
    return series_uid, list(reader.GetGDCMSeriesFileNames(str(folder), series_uid))  # sorted along the normal


def _read_series(folder: Path, slice_index: int | None, series_uid: str | None, limits: ReadLimits) -> ImageData:
    _, files = _series_files(folder, series_uid)
    if slice_index is None:
        if len(files) != 1:
            raise ImageReadError(f"{folder}: a DICOM series of {len(files)} slices; give a slice index (0..{len(files) - 1})")
        slice_index = 0
    check_index(folder, slice_index, len(files))
    img, modality = _load_series(folder, files, limits)
    return _series_slice(img, folder, slice_index, modality)


def _load_series(folder: Path, files: list[str], limits: ReadLimits):  # -> (SimpleITK.Image, modality)
    """The whole series (sorted files) as one image, after checking the sizes its first file declares."""
    import SimpleITK as sitk

    first = sitk.ImageFileReader()
    first.SetFileName(files[0])
    first.ReadImageInformation()
    w, h = first.GetSize()[:2]
    limits.check(folder, "max_image_pixels", w * h, f"each slice declares {h} x {w} pixels")
    limits.check(folder, "max_volume_voxels", w * h * len(files), f"the series declares {len(files)} x {h} x {w} voxels")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        img = reader.Execute()  # RescaleSlope/Intercept applied: CT in HU
    except RuntimeError as err:
        raise ImageReadError(f"{folder}: cannot read the DICOM series ({first_line(err)})") from err
    modality = reader.GetMetaData(0, "0008|0060").strip() if reader.HasMetaDataKey(0, "0008|0060") else None
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise ImageReadError(f"{folder}: expected a series of grey 2D slices, got a {img.GetDimension()}D image with "
                             f"{img.GetNumberOfComponentsPerPixel()} components")
    spacing = img.GetSpacing()
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ImageReadError(f"{folder}: voxel spacing {spacing} must be positive; fix PixelSpacing / slice positions")
    return img, modality or None


def _series_slice(img: Any, folder: Path, slice_index: int, modality: str | None) -> ImageData:
    """Slice ``slice_index`` of a loaded series, with the series' geometry (slices are (z, y, x)[k])."""
    import SimpleITK as sitk

    spacing = img.GetSpacing()
    arr = sitk.GetArrayViewFromImage(img)[slice_index]  # (z, y, x) -> (y, x)
    geometry = Geometry(
        size=tuple(int(s) for s in img.GetSize()), spacing=tuple(float(s) for s in spacing),
        origin=tuple(float(s) for s in img.GetOrigin()), direction=tuple(float(s) for s in img.GetDirection()),
        slice_index=slice_index,
    )
    return ImageData(
        finish(np.array(arr), folder, "image"), folder, "dicom-series", spacing=(float(spacing[1]), float(spacing[0])),
        modality=modality, bit_depth=bit_depth(np.dtype(arr.dtype)), geometry=geometry,
    )
