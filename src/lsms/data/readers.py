"""Reading 2D images as users have them, and writing a predicted mask back with the input's geometry.

Supported: PNG/JPEG/BMP (8-bit grey or RGB, 16-bit grey or colour), TIFF (one page, or one page of a
multi-page file by slice index), NumPy ``.npy``/``.npz``, NIfTI (a 2D image or one axial slice of a 3D
volume), DICOM (one file, one frame of a multi-frame file, or a series folder plus a slice index). DICOM
values are returned in the stored physical unit (HU for CT: RescaleSlope and RescaleIntercept applied).
Arrays are returned unscaled; intensity scaling is :mod:`lsms.data.intensity`'s job.

Each format is one :class:`~lsms.data.formats.base.ImageReader` in :mod:`lsms.data.formats`, whose registry
picks the reader of a path; the functions here are the same for every format.

Bounded reading: each reader first learns the size a file declares (its header only) and compares it with
:class:`ReadLimits` before allocating anything, and a volume is read one slice at a time where the format
allows (NIfTI through nibabel's array proxy, ``.npy`` memory-mapped, one TIFF page, one DICOM frame).
Whatever library fails underneath, the caller gets an :class:`ImageReadError` whose message starts with
the file. ``docs/reliability.md`` lists the limits.

Orientation: a NIfTI or DICOM-series slice is ``array[k]`` of the volume in SimpleITK's (z, y, x) order:
rows follow the volume's y axis, columns its x axis, with no flipping.
"""

from __future__ import annotations

import tempfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lsms.data.formats import find_reader, mask_writer, reader_for
from lsms.data.formats.base import (
    LIMIT_ENV,
    Geometry,
    ImageData,
    ImageReadError,
    ImageTooLargeError,
    ReadLimits,
    Volume,
    check_index,
    first_line,
)

__all__ = [
    "LIMIT_ENV", "Geometry", "ImageData", "ImageReadError", "ImageTooLargeError", "ReadLimits", "Volume",
    "VolumeCache", "binary_mask", "context_stack", "read_image", "read_label_map", "read_mask", "read_mask_image", "read_volume", "volume_depth", "write_mask_like",
]


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
        if not path.is_dir() and not path.is_file():
            raise ImageReadError(f"{path}: not a regular file or a DICOM series folder")
        return reader_for(path).read(path, slice_index, limits, series_uid)
    except (ImageReadError, FileNotFoundError):
        raise
    except MemoryError:
        raise ImageReadError(f"{path}: out of memory while reading; lower the limits in docs/reliability.md") from None
    except Exception as err:  # any library's failure on a damaged file becomes one error naming the file
        raise ImageReadError(f"{path}: cannot read the file ({type(err).__name__}: {first_line(err)})") from err


def volume_depth(path: str | Path, limits: ReadLimits | None = None) -> int | None:
    """Number of slices of a volume input (3D NIfTI, (Z, H, W) NumPy array, multi-page TIFF, multi-frame DICOM,
    DICOM series folder); None for a 2D image or a file no reader claims. Reads headers only.

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
        raise ImageReadError(f"{path}: cannot read the header ({type(err).__name__}: {first_line(err)})") from err


def _depth(path: Path, limits: ReadLimits) -> int | None:
    reader = find_reader(path)
    return None if reader is None else reader.depth(path, limits)


def read_volume(path: str | Path, series_uid: str | None = None, limits: ReadLimits | None = None) -> Volume:
    """Open any input for slice-by-slice reading (a 2D image is a volume of one slice).

    Raises:
        FileNotFoundError: the path does not exist.
        ImageReadError: unreadable, or larger than ``limits``; the message starts with the file.
    """
    path = Path(path)
    limits = limits or ReadLimits.from_env()
    reader = find_reader(path) if path.exists() else None
    volume = None if reader is None else reader.open_volume(path, limits, series_uid)
    if volume is not None:
        return volume
    depth = volume_depth(path, limits)
    if depth is None:
        image = read_image(path, limits=limits)
        return Volume(path, 1, lambda k: image)
    read_image(path, slice_index=0, limits=limits)  # an unreadable file fails now
    return Volume(path, depth, lambda k: read_image(path, slice_index=k, limits=limits))


def open_volume_unpacked(path: str | Path, scratch: Path) -> Volume:
    """:func:`read_volume` for reading every slice: a ``.nii.gz`` is decompressed once into the folder ``scratch``
    first (bounded by ``max_volume_voxels``), since reading one of its slices decompresses every slice before it
    (the whole file read again for each slice). The caller removes ``scratch``."""
    path = Path(path)
    reader = find_reader(path)
    limit = ReadLimits.from_env().max_volume_voxels * 8  # bytes: the largest voxel type, float64
    plain = reader.uncompressed(path, limit, scratch) if reader is not None and path.is_file() else None
    return read_volume(plain or path)


def context_stack(read: Callable[[int], np.ndarray], index: int, depth: int, context: int) -> np.ndarray:
    """The 2.5D input of slice ``index`` of a volume of ``depth`` slices: the slice and ``context`` neighbours on
    each side, in slice order, as the channels of one image (H, W, 2 * context + 1); past either end of the volume
    the end slice stands in. ``read(k)`` gives slice k as a grey (H, W) array."""
    slices = [read(min(max(k, 0), depth - 1)) for k in range(index - context, index + context + 1)]
    shapes = {a.shape for a in slices}
    if len(shapes) != 1 or slices[0].ndim != 2:
        raise ImageReadError(f"slices {index - context}..{index + context} of the volume are not grey images of one "
                             f"size (shapes {sorted(shapes)}); 2.5D input stacks grey slices")
    return np.stack(slices, axis=-1)


class VolumeCache:
    """Whole volumes, each read once and kept, for the neighbouring slices of many slices (2.5D training and
    evaluation read each volume once, not once per slice: a ``.nii.gz`` is decompressed from its start for every
    slice read). Beyond ``max_bytes`` the least recently used volume is dropped. Local to a process: a copy sent to
    a DataLoader worker starts empty."""

    def __init__(self, max_bytes: int = 2 << 30):
        self.max_bytes = max_bytes
        self._arrays: OrderedDict[Path, np.ndarray] = OrderedDict()

    def __getstate__(self) -> dict[str, int]:
        return {"max_bytes": self.max_bytes}

    def __setstate__(self, state: dict[str, int]) -> None:
        self.__init__(state["max_bytes"])  # type: ignore[misc]

    def volume(self, path: str | Path) -> np.ndarray:
        """The volume at ``path`` as (Z, H, W), read through :func:`open_volume_unpacked` (bounded reading)."""
        path = Path(path)
        if path in self._arrays:
            self._arrays.move_to_end(path)
            return self._arrays[path]
        with tempfile.TemporaryDirectory(prefix="lsms-volume-") as scratch:
            volume = open_volume_unpacked(path, Path(scratch))
            array = np.stack([np.asarray(volume.slice(k).array) for k in range(volume.depth)])
        if array.ndim != 3:
            raise ImageReadError(f"{path}: its slices are not grey images (shape {array.shape}); 2.5D input stacks "
                                 "grey slices")
        self._arrays[path] = array
        while len(self._arrays) > 1 and sum(a.nbytes for a in self._arrays.values()) > self.max_bytes:
            self._arrays.popitem(last=False)
        return array

    def context(self, path: str | Path, index: int, context: int) -> np.ndarray:
        """:func:`context_stack` of slice ``index`` of the volume at ``path``."""
        array = self.volume(path)
        check_index(Path(path), index, len(array))
        return context_stack(array.__getitem__, index, len(array), context)


def _holds_volume(path: Path, limits: ReadLimits) -> bool:
    """Whether ``path`` holds more than one slice; an unreadable header counts as yes (read_image reports it)."""
    try:
        depth = _depth(path, limits)
    except Exception:
        return True
    return path.is_dir() or (depth is not None and depth > 1)


def read_mask(path: str | Path, slice_index: int | None = None) -> np.ndarray:
    """Read a binary mask: any non-zero pixel is lesion (lossy formats such as JPEG: above half the maximum, for
    artefacts).

    Colour masks count a pixel as lesion when any channel is non-zero. ``slice_index`` applies only when
    the mask file is a volume (a DICOM-series slice may have a 2D PNG mask).

    Returns:
        bool (H, W).
    """
    return binary_mask(read_mask_image(path, slice_index))


def binary_mask(img: ImageData) -> np.ndarray:
    """The bool (H, W) lesion mask of a mask image as :func:`read_mask` reads it."""
    a = img.array
    if a.ndim == 3:
        a = a.max(axis=-1)
    if not np.isfinite(a).all():
        raise ImageReadError(f"{img.path}: the mask holds NaN or inf values")
    if reader_for(img.path).lossy:
        return a > 127.5  # lossy compression leaves grey ringing around 0/255 edges
    return a > 0


def read_mask_image(path: str | Path, slice_index: int | None = None) -> ImageData:
    """The image a mask file holds, as :func:`read_mask` reads it (``slice_index`` applies to a mask volume only).

    Raises:
        ImageReadError: also when no ``slice_index`` is given and the file holds several slices (a volume, or a
            (C, H, W) array that would otherwise be read as channels and merged into one mask).
    """
    depth = None if slice_index is not None else volume_depth(path)
    if depth is not None and depth > 1:
        raise ImageReadError(f"{path}: a 2D mask is expected but the file holds {depth} slices; give the record's "
                             "slice_index to take one slice of a mask volume, or save the mask as one (H, W) image")
    return read_image(path, slice_index=slice_index, slice_if_volume=True)


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
    """Write a 2D mask in the geometry of a NIfTI or DICOM input (as NIfTI), so viewers overlay it exactly.

    For a volume input the output is a volume of the same size with the mask in the input's slice and zeros
    elsewhere; for a 2D input it is 2D.

    Args:
        mask: (H, W) mask at the input's resolution (bool or integer labels).
        reference: the :class:`ImageData` that was predicted on, or its :class:`Geometry`.
        path: output file ending in ``.nii`` or ``.nii.gz``.

    Returns:
        The written path.
    """
    path = Path(path)
    geometry = reference.geometry if isinstance(reference, ImageData) else reference
    if geometry is None:
        src = reference.path if isinstance(reference, ImageData) else "reference"
        raise ValueError(
            f"{src}: this input has no spatial geometry (only NIfTI and DICOM do); save the mask as PNG instead"
        )
    writer = mask_writer(path)
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
    return writer.write_mask(_in_volume({geometry.slice_index: m}, geometry, m.dtype, path), geometry, path)


def write_volume_mask(masks: dict[int, np.ndarray], geometry: Geometry, path: str | Path) -> Path:
    """Write predicted slices (slice index -> (H, W) mask) into a zero volume with the input's size, spacing, origin
    and direction; ``path`` ends in ``.nii`` or ``.nii.gz``.

    Raises:
        ImageTooLargeError: the input's size is above ``max_volume_voxels`` (:meth:`ReadLimits.from_env`).
    """
    path = Path(path)
    writer = mask_writer(path)
    return writer.write_mask(_in_volume(masks, geometry, np.dtype(np.uint8), path), geometry, path)


def _in_volume(masks: dict[int, np.ndarray], geometry: Geometry, dtype: np.dtype, path: Path) -> np.ndarray:
    """The slices in a zero array of the geometry's size: (z, y, x) for a volume, (y, x) for a 2D input; a size
    above ``max_volume_voxels`` is refused before anything is allocated (the size comes from the input's header)."""
    w, h = geometry.size[0], geometry.size[1]
    depth = geometry.size[2] if len(geometry.size) == 3 else 1
    ReadLimits.from_env().check(path, "max_volume_voxels", depth * h * w,
                                f"voxels of the mask volume in the input's size ({w} x {h} x {depth})")
    vol = np.zeros((depth, h, w), dtype)  # (z, y, x)
    for k, m in masks.items():
        vol[k] = m
    return vol if len(geometry.size) == 3 else vol[0]
