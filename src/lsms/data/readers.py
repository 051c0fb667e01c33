"""Readers for 2D images as users have them, and writing a predicted mask back with the input's geometry.

Supported: PNG/JPEG/BMP (8-bit grey or RGB, 16-bit grey or colour), TIFF (one page, or one page of a
multi-page file by slice index), NumPy ``.npy``/``.npz``, NIfTI (a 2D image or one axial slice of a 3D
volume), DICOM (one file, one frame of a multi-frame file, or a series folder plus a slice index). DICOM
values are returned in the stored physical unit (HU for CT: RescaleSlope and RescaleIntercept applied).
Arrays are returned unscaled; intensity scaling is :mod:`lsms.data.intensity`'s job.

Bounded reading: each reader first learns the size a file declares (its header only) and compares it with
:class:`ReadLimits` before allocating anything, and a volume is read one slice at a time where the format
allows (NIfTI through nibabel's array proxy, ``.npy`` memory-mapped, one TIFF page, one DICOM frame).
Whatever library fails underneath, the caller gets an :class:`ImageReadError` whose message starts with
the file. ``docs/reliability.md`` lists the limits.

Orientation: a NIfTI or DICOM-series slice is ``array[k]`` of the volume in SimpleITK's (z, y, x) order:
rows follow the volume's y axis, columns its x axis, with no flipping (NIfTI voxels are read with nibabel,
which gives them as (x, y, z), and transposed to that order).
"""

from __future__ import annotations

import functools
import gzip
import math
import os
import warnings
import zipfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import IO, Any

import numpy as np

PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
TIFF_SUFFIXES = (".tif", ".tiff")
NUMPY_SUFFIXES = (".npy", ".npz")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIXES = (".dcm", ".dicom")


class ImageReadError(ValueError):
    """A file could not be read as an image; the message starts with the file and says why."""


class ImageTooLargeError(ImageReadError):
    """A file declares more pixels, voxels or bytes than :class:`ReadLimits` allow."""


@dataclass(frozen=True)
class ReadLimits:
    """Sizes a file may declare; checked against its header before any pixel is allocated.

    Each limit is a setting: pass a ``ReadLimits`` to :func:`read_image`, or set the environment variable
    named in :data:`LIMIT_ENV` (read at every call, so it also reaches DataLoader workers and the processes
    of ``lsms check``).

    Attributes:
        max_image_pixels: pixels of the 2D image (or slice) a read returns. Default 2**25 = 33.5 M
            (8192 x 4096); the float32 array of an RGB image that size is 400 MB.
        max_volume_voxels: voxels of a volume that has to be read whole (a DICOM series, a 3D array in an
            ``.npz``). Default 2**28 = 268 M (512 x 512 x 1024; 512 MB as int16).
        max_file_bytes: size of a file that is parsed whole (PNG/JPEG/BMP/GIF, DICOM, ``.npz``). NIfTI,
            ``.npy`` and TIFF are read one slice or page at a time and are not bounded by it. Default 2**30
            (1 GiB).
    """

    max_image_pixels: int = 2**25
    max_volume_voxels: int = 2**28
    max_file_bytes: int = 2**30

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ReadLimits.{f.name} must be a positive integer, got {value!r}")

    @classmethod
    def from_env(cls) -> ReadLimits:
        """The defaults, overridden by ``LSMS_MAX_IMAGE_PIXELS``, ``LSMS_MAX_VOLUME_VOXELS``, ``LSMS_MAX_FILE_BYTES``."""
        values: dict[str, int] = {}
        for name, var in LIMIT_ENV.items():
            raw = os.environ.get(var)
            if raw is None or not raw.strip():
                continue
            try:
                number = float(raw)  # 1e9 and 1000000000 both work
            except ValueError:
                number = math.nan
            if not (math.isfinite(number) and number >= 1 and number == int(number)):
                raise ValueError(f"environment variable {var}={raw!r} must be a positive whole number")
            values[name] = int(number)
        return cls(**values)

    def check(self, path: Path, name: str, amount: int, what: str) -> None:
        """Raise :class:`ImageTooLargeError` when ``amount`` exceeds the limit ``name``."""
        limit = getattr(self, name)
        if amount > limit:
            raise ImageTooLargeError(
                f"{path}: {what} = {amount:,}, above the limit {name} = {limit:,}; if the file is genuine, raise "
                f"the limit (environment variable {LIMIT_ENV[name]}, see docs/reliability.md)"
            )


LIMIT_ENV = {
    "max_image_pixels": "LSMS_MAX_IMAGE_PIXELS",
    "max_volume_voxels": "LSMS_MAX_VOLUME_VOXELS",
    "max_file_bytes": "LSMS_MAX_FILE_BYTES",
}


@dataclass
class Geometry:
    """Spatial frame of a NIfTI/DICOM input, enough to write a mask that overlays it (SimpleITK convention).

    Attributes:
        size: voxels along x, y (and z for volumes).
        spacing: mm per voxel along the same axes.
        origin: position of the first voxel (LPS, mm).
        direction: direction cosines, row-major, ``len(size) ** 2`` values.
        slice_index: which z slice the 2D image is (0 for a 2D input).
    """

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    slice_index: int = 0


@dataclass
class ImageData:
    """A 2D image as read from disk.

    Attributes:
        array: float32 (H, W) or (H, W, C) in the file's units (HU for CT DICOM, raw values otherwise).
        path: the file (or series folder) it came from.
        format: ``png``, ``jpeg``, ``tiff``, ``npy``, ``nifti``, ``dicom``, ``dicom-series``, ...
        spacing: pixel spacing (row, column) in mm when the file says so.
        modality: DICOM Modality (``CT``, ``MR``, ``CR``, ...) when known.
        bit_depth: bits per sample of the stored integers (8, 16, ...), None for floats.
        geometry: for NIfTI and DICOM inputs, what :func:`write_mask_like` needs.
    """

    array: np.ndarray
    path: Path
    format: str
    spacing: tuple[float, float] | None = None
    modality: str | None = None
    bit_depth: int | None = None
    geometry: Geometry | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W)."""
        return int(self.array.shape[0]), int(self.array.shape[1])


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _bits(dtype: np.dtype) -> int | None:
    return None if dtype.kind == "f" else int(dtype.itemsize * 8)


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[-1].strip() if lines else type(err).__name__


def _pixels(shape: tuple[int, ...]) -> int:
    """Pixels of an image of ``shape`` ((H, W), (H, W, C) or (C, H, W) with C <= 4; else every value)."""
    n = math.prod(int(s) for s in shape)
    if len(shape) == 3 and min(shape[0], shape[-1]) <= 4:
        n //= max(1, shape[-1] if shape[-1] <= 4 else shape[0])
    return n


def _finish(array: np.ndarray, path: Path, what: str) -> np.ndarray:
    """Squeeze to (H, W) or (H, W, C) with C in 1..4 and convert to float32; errors name the file."""
    a = np.asarray(array)
    if a.dtype == bool:
        a = a.astype(np.uint8)
    if a.dtype.kind not in "uif":
        raise ImageReadError(f"{path}: {what} has dtype {a.dtype}; expected numbers")
    while a.ndim > 2 and a.shape[0] == 1:
        a = a[0]
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)  # (C, H, W) -> (H, W, C)
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (1, 2, 3, 4)):
        raise ImageReadError(
            f"{path}: {what} has shape {tuple(np.asarray(array).shape)}; expected a 2D image (H, W) or (H, W, C) "
            "with up to 4 channels (for volumes give a slice index)"
        )
    if min(a.shape[:2]) < 1:
        raise ImageReadError(f"{path}: {what} is empty (shape {a.shape})")
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf, which the NaN/inf checks report
        return a.astype(np.float32, copy=False)


def _check_index(path: Path, index: int, n: int, what: str = "slices") -> None:
    if not 0 <= index < n:
        raise ImageReadError(f"{path}: slice index {index} is out of range; the volume has {n} {what} (0..{n - 1})")


def _pick(path: Path, slice_index: int | None, n: int, container: str, unit: str) -> int:
    """Which of the ``n`` pages/frames of a file to read: an index is needed when there are several."""
    if n > 1:
        if slice_index is None:
            raise ImageReadError(f"{path}: {container} with {n} {unit}; give a slice index (0..{n - 1})")
        _check_index(path, slice_index, n, unit)
        return slice_index
    if slice_index not in (None, 0):
        raise ImageReadError(f"{path}: slice_index={slice_index} given but the file holds one image")
    return 0


def _check_file_bytes(path: Path, limits: ReadLimits) -> None:
    limits.check(path, "max_file_bytes", path.stat().st_size, "the file size in bytes")


# --------------------------------------------------------------------------- PNG / JPEG / BMP / GIF


def _png_depth_and_colour(path: Path) -> tuple[int, int] | None:
    """(bit depth, colour type) from a PNG's IHDR chunk; None for other files."""
    with path.open("rb") as f:
        head = f.read(26)
    if len(head) < 26 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    return head[24], head[25]


def _read_pil(path: Path, limits: ReadLimits) -> ImageData:
    from PIL import Image

    _check_file_bytes(path, limits)
    fmt = "jpeg" if path.suffix.lower() in (".jpg", ".jpeg") else path.suffix.lower().lstrip(".")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own, lower limit applies below
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
        raise ImageTooLargeError(f"{path}: {err}; that is above the limit max_image_pixels = {limits.max_image_pixels:,} "
                             f"(environment variable {LIMIT_ENV['max_image_pixels']}, see docs/reliability.md)") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageReadError(f"{path}: cannot decode the image ({err}); the file is truncated or not an image") from err
    if arr.ndim == 3 and arr.shape[-1] == 4 and np.all(arr[..., 3] == arr[..., 3].flat[0]):
        arr = arr[..., :3]  # constant alpha carries nothing
    bits = 16 if mode.startswith("I;16") else (32 if mode in ("I", "F") else 8)
    return ImageData(_finish(arr, path, "image"), path, fmt, bit_depth=None if mode == "F" else bits)


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
        raise ImageReadError(f"{path}: cannot decode the 16-bit PNG ({_first_line(err)})") from err
    if colour_type == 4:
        arr = arr[..., 0]  # grey + alpha: the grey channel, as for 8-bit LA
    elif arr.ndim == 3 and arr.shape[-1] == 4 and np.all(arr[..., 3] == arr[..., 3].flat[0]):
        arr = arr[..., :3]
    return ImageData(_finish(arr, path, "image"), path, fmt, bit_depth=16)


# --------------------------------------------------------------------------- TIFF


def _read_tiff(path: Path, slice_index: int | None, limits: ReadLimits) -> ImageData:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[_pick(path, slice_index, len(tif.pages), "a multi-page TIFF", "pages")]
            shape = tuple(int(s) for s in page.shape)
            limits.check(path, "max_image_pixels", _pixels(shape), f"the page declares shape {shape}, pixels")
            arr = page.asarray()
    except ImageReadError:
        raise
    except Exception as err:  # tifffile raises many types for damaged files
        raise ImageReadError(f"{path}: cannot decode the TIFF ({_first_line(err)}); the file is truncated or not a TIFF") from err
    return ImageData(_finish(arr, path, "TIFF image"), path, "tiff", bit_depth=_bits(arr.dtype))


# --------------------------------------------------------------------------- NumPy


def _npy_header(f: IO[bytes], path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) from an ``.npy`` stream positioned at its start; leaves it at the first data byte."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(f)
        read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, _, dtype = read(f)
    except zipfile.BadZipFile as err:  # a small .npz member is read (and its CRC checked) in one go
        raise ImageReadError(f"{path}: the .npz archive is damaged ({_first_line(err)})") from err
    except Exception as err:  # ValueError, SyntaxError, tokenize.TokenError ... for a garbled header
        raise ImageReadError(f"{path}: not a valid .npy array header ({_first_line(err)})") from err
    if dtype.hasobject:
        raise ImageReadError(f"{path}: the array holds Python objects (a pickle); lsms reads numeric arrays only")
    if any(int(s) < 1 for s in shape) or not shape:
        raise ImageReadError(f"{path}: the array is empty or a scalar (shape {tuple(shape)})")
    return tuple(int(s) for s in shape), dtype


def _numpy_piece(path: Path, shape: tuple[int, ...], slice_index: int | None, limits: ReadLimits) -> tuple[int, ...]:
    """Check the slice request against ``shape`` and the pixel limit; returns the shape of what is read."""
    if slice_index is not None:
        if len(shape) != 3:
            raise ImageReadError(f"{path}: slice_index={slice_index} given but the array is {len(shape)}D {shape}")
        _check_index(path, slice_index, shape[0])
        piece = shape[1:]
    else:
        piece = shape
    limits.check(path, "max_image_pixels", _pixels(piece), f"the array declares shape {piece}, pixels")
    return piece


def _npz_member(z: zipfile.ZipFile, path: Path) -> str:
    keys = [n[:-4] for n in z.namelist() if n.endswith(".npy")]
    if not keys:
        raise ImageReadError(f"{path}: the .npz archive holds no arrays")
    return next((k for k in ("image", "arr_0", "data") if k in keys), keys[0])


def _read_numpy(path: Path, slice_index: int | None, limits: ReadLimits) -> ImageData:
    try:
        if _suffix(path) == ".npz":
            _check_file_bytes(path, limits)
            with zipfile.ZipFile(path) as z:
                member = _npz_member(z, path) + ".npy"
                with z.open(member) as f:
                    shape, dtype = _npy_header(f, path)
                _numpy_piece(path, shape, slice_index, limits)
                limits.check(path, "max_volume_voxels", math.prod(shape), f"the array {member} declares shape {shape}, values")
                with z.open(member) as f:  # the zip's CRC is verified when the member has been read
                    arr = np.lib.format.read_array(f, allow_pickle=False)
            if slice_index is not None:
                arr = arr[slice_index]  # (Z, H, W) -> (H, W)
        else:
            with path.open("rb") as f:
                shape, dtype = _npy_header(f, path)
                offset = f.tell()
            need = offset + math.prod(shape) * dtype.itemsize
            have = path.stat().st_size
            if have < need:
                raise ImageReadError(f"{path}: the file holds {have - offset:,} of the {need - offset:,} data bytes its "
                                     "header declares; it is truncated")
            _numpy_piece(path, shape, slice_index, limits)
            mapped = np.load(path, mmap_mode="r", allow_pickle=False)
            arr = np.array(mapped[slice_index] if slice_index is not None else mapped)  # reads only that slice
    except ImageReadError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as err:
        raise ImageReadError(f"{path}: cannot read the NumPy file ({_first_line(err)})") from err
    return ImageData(_finish(arr, path, "array"), path, _suffix(path).lstrip("."), bit_depth=_bits(arr.dtype))


# --------------------------------------------------------------------------- NIfTI


@functools.lru_cache(maxsize=32)
def _gzip_data_length(name: str, mtime_ns: int, size: int) -> int:
    """Bytes a gzip file decompresses to, streamed (verifies its CRC); cached per file version."""
    n = 0
    with gzip.open(name, "rb") as f:
        while chunk := f.read(1 << 20):
            n += len(chunk)
    return n


def _nifti_header(path: Path, limits: ReadLimits) -> tuple[Any, tuple[int, ...]]:
    """(nibabel image, (nx, ny, nz)) after checking the header: sizes, data length, spacing."""
    import nibabel as nib

    img = nib.load(str(path))  # header only; the data stays on disk behind img.dataobj
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise ImageReadError(f"{path}: not a NIfTI image ({type(img).__name__})")
    shape = tuple(int(s) for s in img.shape)
    if len(shape) < 2 or any(s < 1 for s in shape):
        raise ImageReadError(f"{path}: the header declares shape {shape} (dim field); a NIfTI image needs at least "
                             "two non-empty dimensions")
    dims = list(shape)
    while len(dims) > 3 and dims[-1] == 1:
        dims.pop()
    if len(dims) > 3:
        raise ImageReadError(f"{path}: a {len(dims)}D NIfTI (shape {shape}) is not supported; give a 2D image or a 3D volume")
    nx, ny, nz = dims[0], dims[1], dims[2] if len(dims) == 3 else 1
    limits.check(path, "max_image_pixels", nx * ny, f"each slice declares {ny} x {nx} pixels")
    from nibabel.openers import ImageOpener

    with ImageOpener(str(path)) as f:  # nibabel's loaded header has zero pixdims already replaced by 1
        raw = type(img.header).from_fileobj(f, check=False)
    zooms = [float(z) for z in raw["pixdim"][1 : len(dims) + 1]]
    if not all(math.isfinite(z) and z > 0 for z in zooms):
        raise ImageReadError(f"{path}: voxel spacing (pixdim) {zooms} must be positive numbers; fix the header")
    offset = int(img.dataobj.offset)
    need = offset + math.prod(shape) * img.header.get_data_dtype().itemsize
    if _suffix(path) == ".nii.gz":
        st = path.stat()
        try:
            have = _gzip_data_length(str(path), st.st_mtime_ns, st.st_size)
        except (OSError, EOFError) as err:
            raise ImageReadError(f"{path}: the compressed data is damaged or cut short ({_first_line(err)})") from err
    else:
        have = path.stat().st_size
    if have < need:
        raise ImageReadError(f"{path}: the file holds {max(0, have - offset):,} of the {need - offset:,} data bytes its "
                             "header declares; it is truncated")
    return img, (nx, ny, nz)


def _read_nifti(path: Path, slice_index: int | None, limits: ReadLimits) -> ImageData:
    import SimpleITK as sitk

    img, (_, _, nz) = _nifti_header(path, limits)
    if nz > 1 or len(img.shape) >= 3:
        if slice_index is None:
            if nz != 1:
                raise ImageReadError(f"{path}: this is a 3D volume with {nz} slices; give a slice index "
                                     "(`slice_index` in the manifest or the reader argument)")
            slice_index = 0
        _check_index(path, slice_index, nz)
        index = (slice(None), slice(None), slice_index) + (0,) * (len(img.shape) - 3)
    else:
        if slice_index not in (None, 0):
            raise ImageReadError(f"{path}: slice_index={slice_index} given but the image is 2D")
        slice_index = 0
        index = (slice(None), slice(None))
    data = np.asarray(img.dataobj[index])  # (x, y): only this slice is read from disk
    if data.dtype.names:  # RGB NIfTI: a structured dtype of components
        data = np.stack([data[n] for n in data.dtype.names], axis=-1)  # (x, y, C)
    arr = np.swapaxes(data, 0, 1)  # (x, y[, C]) -> (y, x[, C]), SimpleITK's order
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()  # the geometry, in SimpleITK's (LPS) convention, for write_mask_like
    geometry = Geometry(
        size=tuple(int(s) for s in reader.GetSize()), spacing=tuple(float(s) for s in reader.GetSpacing()),
        origin=tuple(float(s) for s in reader.GetOrigin()), direction=tuple(float(s) for s in reader.GetDirection()),
        slice_index=slice_index,
    )
    spacing = geometry.spacing
    return ImageData(
        _finish(arr, path, "image"), path, "nifti", spacing=(float(spacing[1]), float(spacing[0])),
        bit_depth=_bits(img.header.get_data_dtype()), geometry=geometry,
    )


# --------------------------------------------------------------------------- DICOM


def _dicom_numbers(ds: Any, path: Path, keyword: str, count: int | None = None) -> list[float] | None:
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


def _read_dicom_file(path: Path, slice_index: int | None, limits: ReadLimits) -> ImageData:
    import pydicom
    from pydicom.pixels import pixel_array

    _check_file_bytes(path, limits)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    rows, cols = ds.get("Rows"), ds.get("Columns")
    if not rows or not cols:
        raise ImageReadError(f"{path}: the DICOM file has no image (Rows/Columns missing or 0)")
    limits.check(path, "max_image_pixels", int(rows) * int(cols), f"each frame declares {rows} x {cols} pixels")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    slice_index = _pick(path, slice_index, frames, "a multi-frame DICOM", "frames")
    slope = (_dicom_numbers(ds, path, "RescaleSlope", 1) or [1.0])[0]
    intercept = (_dicom_numbers(ds, path, "RescaleIntercept", 1) or [0.0])[0]
    if slope == 0:
        raise ImageReadError(f"{path}: DICOM RescaleSlope is 0, so every pixel would read as the intercept; fix the tag")
    ps = _dicom_numbers(ds, path, "PixelSpacing", 2) or _dicom_numbers(ds, path, "ImagerPixelSpacing", 2)
    if ps is not None and min(ps) <= 0:
        raise ImageReadError(f"{path}: DICOM pixel spacing {ps} must be positive; fix PixelSpacing")
    try:
        raw = pixel_array(path, index=slice_index if frames > 1 else None)  # one frame only is decoded
    except Exception as err:  # pydicom raises several types for damaged or compressed files
        raise ImageReadError(
            f"{path}: cannot read the DICOM pixel data ({_first_line(err)}); for compressed transfer syntaxes install "
            "pylibjpeg or gdcm support, or convert the file"
        ) from err
    arr = raw.astype(np.float32) * np.float32(slope) + np.float32(intercept)  # stored value -> HU (CT)
    spacing = None if ps is None else (ps[0], ps[1])
    geometry = None
    iop = _dicom_numbers(ds, path, "ImageOrientationPatient", 6)
    ipp = _dicom_numbers(ds, path, "ImagePositionPatient", 3)
    if frames == 1 and iop is not None and ipp is not None and spacing is not None:
        row, col = np.array(iop[:3], float), np.array(iop[3:], float)
        normal = np.cross(row, col)
        thickness = (_dicom_numbers(ds, path, "SliceThickness", 1) or [1.0])[0]
        thickness = thickness if thickness > 0 else 1.0  # only the written mask's z spacing; one slice
        direction = np.stack([row, col, normal], axis=1)  # columns are the x, y, z axis directions
        geometry = Geometry(
            size=(int(raw.shape[-1]), int(raw.shape[-2]), 1), spacing=(spacing[1], spacing[0], thickness),
            origin=tuple(ipp), direction=tuple(float(v) for v in direction.ravel()), slice_index=0,
        )
    return ImageData(
        _finish(arr, path, "DICOM image"), path, "dicom", spacing=spacing,
        modality=str(ds.get("Modality", "") or "") or None, bit_depth=int(ds.get("BitsStored", 0) or 0) or None,
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


def _read_dicom_series(folder: Path, slice_index: int | None, series_uid: str | None, limits: ReadLimits) -> ImageData:
    _, files = _series_files(folder, series_uid)
    if slice_index is None:
        if len(files) != 1:
            raise ImageReadError(f"{folder}: a DICOM series of {len(files)} slices; give a slice index (0..{len(files) - 1})")
        slice_index = 0
    _check_index(folder, slice_index, len(files))
    img, modality = _load_dicom_series(folder, files, limits)
    return _series_slice(img, folder, slice_index, modality)


def _load_dicom_series(folder: Path, files: list[str], limits: ReadLimits):  # -> (SimpleITK.Image, modality)
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
        raise ImageReadError(f"{folder}: cannot read the DICOM series ({_first_line(err)})") from err
    modality = reader.GetMetaData(0, "0008|0060").strip() if reader.HasMetaDataKey(0, "0008|0060") else None
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise ImageReadError(f"{folder}: expected a series of grey 2D slices, got a {img.GetDimension()}D image with "
                             f"{img.GetNumberOfComponentsPerPixel()} components")
    spacing = img.GetSpacing()
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ImageReadError(f"{folder}: voxel spacing {spacing} must be positive; fix PixelSpacing / slice positions")
    return img, modality or None


def _series_slice(img: Any, folder: Path, slice_index: int, modality: str | None) -> ImageData:
    """Slice ``slice_index`` of a loaded series, with the series' geometry."""
    import SimpleITK as sitk

    spacing = img.GetSpacing()
    arr = sitk.GetArrayViewFromImage(img)[slice_index]  # (z, y, x) -> (y, x)
    geometry = Geometry(
        size=tuple(int(s) for s in img.GetSize()), spacing=tuple(float(s) for s in spacing),
        origin=tuple(float(s) for s in img.GetOrigin()), direction=tuple(float(s) for s in img.GetDirection()),
        slice_index=slice_index,
    )
    return ImageData(
        _finish(np.array(arr), folder, "image"), folder, "dicom-series", spacing=(float(spacing[1]), float(spacing[0])),
        modality=modality, bit_depth=_bits(np.dtype(arr.dtype)), geometry=geometry,
    )


def is_dicom(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


# --------------------------------------------------------------------------- entry points


def read_image(
    path: str | Path, slice_index: int | None = None, series_uid: str | None = None, slice_if_volume: bool = False,
    limits: ReadLimits | None = None,
) -> ImageData:
    """Read a 2D image (or one slice of a volume) from any supported format.

    Args:
        path: an image file, or a folder holding one DICOM series.
        slice_index: slice of a 3D NIfTI volume, a (Z, H, W) NumPy array, a multi-page TIFF, a multi-frame
            DICOM or a DICOM series (0 = first along the slice normal).
        series_uid: which series when a folder holds several.
        slice_if_volume: apply ``slice_index`` only when the file holds a volume and ignore it for a 2D image
            (for masks: a series slice may have a plain 2D PNG mask).
        limits: size limits (default: :meth:`ReadLimits.from_env`).

    Returns:
        The image and its metadata.

    Raises:
        FileNotFoundError: the path does not exist.
        ImageReadError: (a ``ValueError``) the file cannot be decoded, declares more than ``limits`` allow, is
            damaged or is not a 2D image; the message starts with the file.
    """
    path = Path(path)
    limits = limits or ReadLimits.from_env()
    if not path.exists():
        raise FileNotFoundError(f"{path}: image file not found")
    try:
        if slice_if_volume and slice_index is not None and not _holds_volume(path, limits):
            slice_index = None
        return _read(path, slice_index, series_uid, limits)
    except (ImageReadError, FileNotFoundError):
        raise
    except MemoryError:
        raise ImageReadError(f"{path}: out of memory while reading; lower the limits in docs/reliability.md") from None
    except Exception as err:  # any library's failure on a damaged file becomes one error naming the file
        raise ImageReadError(f"{path}: cannot read the file ({type(err).__name__}: {_first_line(err)})") from err


def _read(path: Path, slice_index: int | None, series_uid: str | None, limits: ReadLimits) -> ImageData:
    if path.is_dir():
        return _read_dicom_series(path, slice_index, series_uid, limits)
    if not path.is_file():
        raise ImageReadError(f"{path}: not a regular file or a DICOM series folder")
    suffix = _suffix(path)
    if suffix in NIFTI_SUFFIXES:
        return _read_nifti(path, slice_index, limits)
    if suffix in DICOM_SUFFIXES or (suffix not in PIL_SUFFIXES + TIFF_SUFFIXES + NUMPY_SUFFIXES and is_dicom(path)):
        return _read_dicom_file(path, slice_index, limits)
    if suffix in TIFF_SUFFIXES:
        return _read_tiff(path, slice_index, limits)
    if suffix in NUMPY_SUFFIXES:
        return _read_numpy(path, slice_index, limits)
    if suffix in PIL_SUFFIXES:
        if slice_index not in (None, 0):
            raise ImageReadError(f"{path}: slice_index={slice_index} given but {suffix} files hold one 2D image")
        return _read_pil(path, limits)
    raise ImageReadError(
        f"{path}: unsupported image format {suffix!r}; use PNG, JPEG, TIFF, NPY/NPZ, NIfTI (.nii/.nii.gz) or DICOM"
    )


def volume_depth(path: str | Path, limits: ReadLimits | None = None) -> int | None:
    """Number of slices of a volume input (3D NIfTI, (Z, H, W) NumPy array, multi-page TIFF, multi-frame DICOM,
    DICOM series folder); None for a 2D image. Reads headers only.

    Raises:
        FileNotFoundError: the path does not exist.
        ImageReadError: the header cannot be read; the message names the file.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: input not found")
    try:
        return _depth(path, limits or ReadLimits.from_env())
    except (ImageReadError, FileNotFoundError):
        raise
    except Exception as err:
        raise ImageReadError(f"{path}: cannot read the header ({type(err).__name__}: {_first_line(err)})") from err


def _depth(path: Path, limits: ReadLimits) -> int | None:
    if path.is_dir():
        return len(_series_files(path, None)[1])
    suffix = _suffix(path)
    if suffix in NIFTI_SUFFIXES:
        img, (_, _, nz) = _nifti_header(path, limits)
        return nz if len(img.shape) >= 3 else None
    if suffix in NUMPY_SUFFIXES:
        if suffix == ".npy":
            with path.open("rb") as f:
                shape, _ = _npy_header(f, path)
        else:
            with zipfile.ZipFile(path) as z, z.open(_npz_member(z, path) + ".npy") as f:
                shape, _ = _npy_header(f, path)
        _numpy_piece(path, shape, 0 if len(shape) == 3 else None, limits)
        return shape[0] if len(shape) == 3 else None
    if suffix in TIFF_SUFFIXES:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            n = len(tif.pages)
            shape = tuple(int(s) for s in tif.pages[0].shape)
        limits.check(path, "max_image_pixels", _pixels(shape), f"the page declares shape {shape}, pixels")
        return n if n > 1 else None
    if suffix in DICOM_SUFFIXES or (suffix not in PIL_SUFFIXES and is_dicom(path)):
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True)
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        limits.check(path, "max_image_pixels", rows * cols, f"each frame declares {rows} x {cols} pixels")
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        return frames if frames > 1 else None
    return None


@dataclass
class Volume:
    """A volume opened for slice-by-slice access (a viewer's slice slider): ``slice(k)`` equals
    ``read_image(path, k)``. A DICOM series is read once and kept in memory (reading slice k alone would read
    the whole series again); NIfTI, NumPy, TIFF and multi-frame DICOM read only slice k at each call.

    Attributes:
        path: the file or series folder.
        depth: number of slices (1 for a 2D image).
    """

    path: Path
    depth: int
    _read: Any  # Callable[[int], ImageData]

    def slice(self, index: int) -> ImageData:
        _check_index(self.path, index, self.depth)
        return self._read(index)


def read_volume(path: str | Path, series_uid: str | None = None, limits: ReadLimits | None = None) -> Volume:
    """Open any input for slice-by-slice reading (a 2D image is a volume of one slice).

    Raises:
        FileNotFoundError: the path does not exist.
        ImageReadError: unreadable, or larger than ``limits``; the message starts with the file.
    """
    path = Path(path)
    limits = limits or ReadLimits.from_env()
    if path.is_dir():
        try:
            _, files = _series_files(path, series_uid)
            img, modality = _load_dicom_series(path, files, limits)
        except ImageReadError:
            raise
        except Exception as err:
            raise ImageReadError(f"{path}: cannot read the DICOM series ({type(err).__name__}: {_first_line(err)})") from err
        return Volume(path, len(files), lambda k: _series_slice(img, path, k, modality))
    depth = volume_depth(path, limits)
    if depth is None:
        image = read_image(path, limits=limits)
        return Volume(path, 1, lambda k: image)
    read_image(path, slice_index=0, limits=limits)  # an unreadable file fails now
    return Volume(path, depth, lambda k: read_image(path, slice_index=k, limits=limits))


def _holds_volume(path: Path, limits: ReadLimits) -> bool:
    """Whether ``path`` holds more than one slice; an unreadable header counts as yes (read_image reports it)."""
    try:
        depth = _depth(path, limits)
    except Exception:
        return True
    return path.is_dir() or (depth is not None and depth > 1)


def read_mask(path: str | Path, slice_index: int | None = None) -> np.ndarray:
    """Read a binary mask: any non-zero pixel is lesion (JPEG masks: above half the maximum, for artefacts).

    Colour masks count a pixel as lesion when any channel is non-zero. ``slice_index`` applies only when
    the mask file is a volume (a DICOM-series slice may have a 2D PNG mask).

    Returns:
        bool (H, W).
    """
    img = read_image(path, slice_index=slice_index, slice_if_volume=True)
    a = img.array
    if a.ndim == 3:
        a = a.max(axis=-1)
    if not np.isfinite(a).all():
        raise ImageReadError(f"{img.path}: the mask holds NaN or inf values")
    if img.format == "jpeg":
        return a > 127.5  # lossy compression leaves grey ringing around 0/255 edges
    return a > 0


def read_label_map(path: str | Path, slice_index: int | None = None) -> np.ndarray:
    """Read an instance label map (0 = background, k = lesion k).

    Returns:
        int64 (H, W).
    """
    img = read_image(path, slice_index=slice_index, slice_if_volume=True)
    a = img.array
    if a.ndim != 2:
        raise ImageReadError(f"{img.path}: an instance label map must be single-channel, got shape {a.shape}")
    if not np.isfinite(a).all() or (a < 0).any() or (a != np.round(a)).any():
        raise ImageReadError(f"{img.path}: an instance label map must hold non-negative integers")
    return a.astype(np.int64)


def write_mask_like(mask: np.ndarray, reference: ImageData | Geometry, path: str | Path) -> Path:
    """Write a 2D mask as NIfTI in the geometry of a NIfTI or DICOM input, so viewers overlay it exactly.

    For a volume input the output is a volume of the same size with the mask in the input's slice and zeros
    elsewhere; for a 2D input it is 2D.

    Args:
        mask: (H, W) mask at the input's resolution (bool or integer labels).
        reference: the :class:`ImageData` that was predicted on, or its :class:`Geometry`.
        path: output file ending in ``.nii`` or ``.nii.gz``.

    Returns:
        The written path.
    """
    import SimpleITK as sitk

    path = Path(path)
    geometry = reference.geometry if isinstance(reference, ImageData) else reference
    if geometry is None:
        src = reference.path if isinstance(reference, ImageData) else "reference"
        raise ValueError(
            f"{src}: this input has no spatial geometry (only NIfTI and DICOM do); save the mask as PNG instead"
        )
    if _suffix(path) not in NIFTI_SUFFIXES:
        raise ValueError(f"{path}: write_mask_like writes NIfTI; name the output .nii or .nii.gz")
    m = np.asarray(mask)
    if m.ndim == 3 and m.shape[0] == 1:
        m = m[0]
    h, w = geometry.size[1], geometry.size[0]
    if m.shape != (h, w):
        raise ValueError(
            f"{path}: mask shape {m.shape} differs from the input's {(h, w)}; resize the prediction back to the "
            "input size (nearest neighbour) before writing"
        )
    m = m.astype(np.uint8) if m.dtype == bool or m.max(initial=0) < 256 else m.astype(np.int32)
    if len(geometry.size) == 3:
        vol = np.zeros((geometry.size[2], h, w), dtype=m.dtype)  # (z, y, x)
        vol[geometry.slice_index] = m
        img = sitk.GetImageFromArray(vol)
    else:
        img = sitk.GetImageFromArray(m)
    img.SetSpacing(geometry.spacing)
    img.SetOrigin(geometry.origin)
    img.SetDirection(geometry.direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path), useCompression=_suffix(path) == ".nii.gz")
    return path
