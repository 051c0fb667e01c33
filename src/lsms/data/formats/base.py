"""What every image format shares: the :class:`ImageReader` interface, the data a read returns, the size limits
and errors, and the checks each reader applies to what a file declares."""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import ClassVar

import numpy as np


class ImageReadError(ValueError):
    """A file could not be read as an image; the message starts with the file and says why."""


class ImageTooLargeError(ImageReadError):
    """A file declares more pixels, voxels or bytes than :class:`ReadLimits` allow."""


@dataclass(frozen=True)
class ReadLimits:
    """Sizes a file may declare, checked against its header before any pixel is allocated, and the memory a setting
    may ask for, checked against an estimate before the network runs.

    Each limit is a setting: pass a ``ReadLimits`` to :func:`~lsms.data.read_image`, or set the environment
    variable named in :data:`LIMIT_ENV` (read at every call, so it also reaches DataLoader workers and the
    processes of ``lsms check``).

    Attributes:
        max_image_pixels: pixels of the 2D image (or slice) a read returns. Default 2**25 = 33.5 M
            (8192 x 4096); the float32 array of an RGB image that size is 400 MB.
        max_volume_voxels: voxels of a volume that has to be read whole (a DICOM series, a 3D array in an
            ``.npz``). Default 2**28 = 268 M (512 x 512 x 1024; 512 MB as int16).
        max_file_bytes: size of a file that is parsed whole (PNG/JPEG/BMP/GIF, DICOM, ``.npz``). NIfTI,
            ``.npy`` and TIFF are read one slice or page at a time and are not bounded by it. Default 2**30
            (1 GiB).
        max_tensor_bytes: the network's activations for one step at the image size and batch a setting or a
            checkpoint asks for, as :func:`lsms.model.activation_bytes` estimates them (``lsms train``,
            ``evaluate``, ``predict``, ``serve``, ``export``, ``profile``). Default 2**32 (4 GiB: the default
            training settings, ``tiny`` at 256 px in batches of 8, are estimated at 2.2 GiB); on a CUDA device,
            when the environment variable is not set, the device's memory instead.
    """

    max_image_pixels: int = 2**25
    max_volume_voxels: int = 2**28
    max_file_bytes: int = 2**30
    max_tensor_bytes: int = 2**32

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ReadLimits.{f.name} must be a positive integer, got {value!r}")

    @classmethod
    def from_env(cls) -> ReadLimits:
        """The defaults, overridden by ``LSMS_MAX_IMAGE_PIXELS``, ``LSMS_MAX_VOLUME_VOXELS``, ``LSMS_MAX_FILE_BYTES``,
        ``LSMS_MAX_TENSOR_BYTES``."""
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

    def check(self, path: Path | str, name: str, amount: int, what: str,
              fix: str = "if the file is genuine, raise the limit") -> None:
        """Raise :class:`ImageTooLargeError` when ``amount`` exceeds the limit ``name``; the message starts with
        ``path`` (the file, or the setting) and ends with ``fix`` and the environment variable that raises it."""
        limit = getattr(self, name)
        if amount > limit:
            raise ImageTooLargeError(
                f"{path}: {what} = {amount:,}, above the limit {name} = {limit:,}; {fix} "
                f"(environment variable {LIMIT_ENV[name]}, see docs/reliability.md)"
            )


LIMIT_ENV = {
    "max_image_pixels": "LSMS_MAX_IMAGE_PIXELS",
    "max_volume_voxels": "LSMS_MAX_VOLUME_VOXELS",
    "max_file_bytes": "LSMS_MAX_FILE_BYTES",
    "max_tensor_bytes": "LSMS_MAX_TENSOR_BYTES",
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
        geometry: for NIfTI and DICOM inputs, what :func:`~lsms.data.write_mask_like` needs.
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
    _read: Callable[[int], ImageData]

    def slice(self, index: int) -> ImageData:
        check_index(self.path, index, self.depth)
        return self._read(index)


class ImageReader(ABC):
    """One file format: which files it claims, how it reads an image, a slice and a volume's depth, and (where the
    format can hold one) how it writes a mask.

    A reader is picked by :func:`lsms.data.formats.reader_for`: by the file's ending (``suffixes``), else by
    ``sniff`` for files whose ending no reader claims, and for a folder the first reader with ``series``. Every
    method checks what the file declares against ``limits`` before allocating pixels, and raises
    :class:`ImageReadError` (message starting with the file) for anything it cannot read; other exceptions are
    wrapped into one by :func:`~lsms.data.read_image`.

    Attributes:
        name: how error messages name the format (``"NIfTI (.nii/.nii.gz)"``).
        suffixes: lower-case file endings, dot included (``".nii.gz"``).
        media_types: MIME types a browser may give such files (the viewer's upload filter).
        series: a folder of such files is one volume (a DICOM series); ``read``, ``depth`` and
            ``open_volume`` then also take the folder.
        lossy: the format compresses with loss, so a mask stored in it has grey edges (JPEG).
        writes_masks: :meth:`write_mask` is implemented (a mask in the geometry of a NIfTI/DICOM input).
    """

    name: ClassVar[str]
    suffixes: ClassVar[tuple[str, ...]] = ()
    media_types: ClassVar[tuple[str, ...]] = ()
    series: ClassVar[bool] = False
    lossy: ClassVar[bool] = False
    writes_masks: ClassVar[bool] = False

    def sniff(self, path: Path) -> bool:
        """Whether a file whose ending no reader claims is in this format (from its first bytes)."""
        return False

    @abstractmethod
    def read(self, path: Path, slice_index: int | None, limits: ReadLimits, series_uid: str | None = None) -> ImageData:
        """The 2D image, or slice ``slice_index`` of a volume (None: the file must hold one image); ``series_uid``
        picks the series of a folder that holds several (``series`` readers only)."""

    def depth(self, path: Path, limits: ReadLimits) -> int | None:
        """Slices of a volume (from the header only); None for a 2D image."""
        return None

    def open_volume(self, path: Path, limits: ReadLimits, series_uid: str | None = None) -> Volume | None:
        """A :class:`Volume` for a format that must load the whole volume to read one slice; None (the default)
        when slices are read one at a time."""
        return None

    def uncompressed(self, path: Path, max_bytes: int, folder: Path | None = None) -> Path | None:
        """A decompressed copy of a compressed file, written next to it (or into ``folder``), whose slices then
        read without decompressing those before them (for a viewer or a volume prediction that reads many); None
        (the default) where slices read directly already, or when the data is damaged or unpacks to more than
        ``max_bytes``."""
        return None

    def write_mask(self, volume: np.ndarray, geometry: Geometry, path: Path) -> Path:
        """Write a (z, y, x) or (y, x) label array in ``geometry`` to ``path``; only where ``writes_masks``."""
        raise ValueError(f"{path}: masks cannot be written as {self.name}")


# --------------------------------------------------------------------------- checks the readers share


def bit_depth(dtype: np.dtype) -> int | None:
    """Bits per stored integer; None for floats."""
    return None if dtype.kind == "f" else int(dtype.itemsize * 8)


def first_line(err: BaseException) -> str:
    """The last non-empty line of a library's error message (the one that says what failed)."""
    lines = str(err).strip().splitlines()
    return lines[-1].strip() if lines else type(err).__name__


def pixel_count(shape: tuple[int, ...]) -> int:
    """Pixels of an image of ``shape`` ((H, W), (H, W, C) or (C, H, W) with C <= 4; else every value)."""
    n = math.prod(int(s) for s in shape)
    if len(shape) == 3 and min(shape[0], shape[-1]) <= 4:
        n //= max(1, shape[-1] if shape[-1] <= 4 else shape[0])
    return n


def finish(array: np.ndarray, path: Path, what: str) -> np.ndarray:
    """Squeeze to (H, W) or (H, W, C) with C in 1..4 and convert to float32; errors name the file."""
    a = np.asarray(array)
    if a.dtype == bool:
        a = a.astype(np.uint8)
    if a.dtype.kind not in "uif":
        raise ImageReadError(f"{path}: {what} has dtype {a.dtype}; expected numbers")
    while a.shape[0] == 1 and (a.ndim > 3 or (a.ndim == 3 and a.shape[-1] not in (3, 4))):
        a = a[0]  # (1, H, W) -> (H, W); a 1-row colour image (1, W, 3) stays colour
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


def check_index(path: Path, index: int, n: int, what: str = "slices") -> None:
    """Raise when ``index`` is not one of the ``n`` slices (pages, frames) of ``path``."""
    if not 0 <= index < n:
        raise ImageReadError(f"{path}: slice index {index} is out of range; the volume has {n} {what} (0..{n - 1})")


def pick(path: Path, slice_index: int | None, n: int, container: str, unit: str) -> int:
    """Which of the ``n`` pages/frames of a file to read: an index is needed when there are several."""
    if n > 1:
        if slice_index is None:
            raise ImageReadError(f"{path}: {container} with {n} {unit}; give a slice index (0..{n - 1})")
        check_index(path, slice_index, n, unit)
        return slice_index
    if slice_index not in (None, 0):
        raise ImageReadError(f"{path}: slice_index={slice_index} given but the file holds one image")
    return 0


SIGNATURES = {  # the first bytes of every file of a format
    "PNG": (b"\x89PNG\r\n\x1a\n",),
    "JPEG": (b"\xff\xd8\xff",),
    "GIF": (b"GIF87a", b"GIF89a"),
    "BMP": (b"BM",),
    "TIFF": (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"),
    "NumPy": (b"\x93NUMPY",),
    "gzip": (b"\x1f\x8b",),
    "zip": (b"PK\x03\x04",),
}


def check_signature(path: Path, expected: str) -> None:
    """Raise when the file does not start with the signature of the format ``expected`` (a key of
    :data:`SIGNATURES`) that its ending names; the message says which format it holds when that is known."""
    with path.open("rb") as f:
        head = f.read(8)
    if head.startswith(SIGNATURES[expected]):
        return
    found = next((name for name, starts in SIGNATURES.items() if head.startswith(starts)), None)
    if found is not None:
        raise ImageReadError(f"{path}: the file is {found}, not {expected} as its ending {path.suffix.lower()} "
                             "says; rename it to its format's ending")
    raise ImageReadError(f"{path}: not a {expected} file (it does not start with the {expected} signature); the file is "
                         "damaged or not an image")


def check_file_bytes(path: Path, limits: ReadLimits) -> None:
    """Raise :class:`ImageTooLargeError` for a file larger than ``max_file_bytes`` (formats parsed whole)."""
    limits.check(path, "max_file_bytes", path.stat().st_size, "the file size in bytes")
