"""NumPy ``.npy`` (memory-mapped: one slice of a (Z, H, W) array is read) and ``.npz`` (parsed whole)."""

from __future__ import annotations

import math
import zipfile
from pathlib import Path
from typing import IO

import numpy as np

from lsms.data.formats.base import (
    ImageData,
    ImageReader,
    ImageReadError,
    ReadLimits,
    bit_depth,
    check_file_bytes,
    check_index,
    finish,
    first_line,
    pixel_count,
)

COLOUR_CHANNELS = (1, 3, 4)  # a 3D array whose last axis is one of these is a 2D image (H, W, C)
MIN_SLICE_SIDE = 8  # a 3D array with a smaller last or middle axis is not taken for a volume's slices


class NumpyReader(ImageReader):
    """A 2D array, a colour image (H, W, C), or a slice of a (Z, H, W) array; pickled (object) arrays are refused.
    In an ``.npz`` the array named ``image``, ``arr_0`` or ``data`` is read, else the first."""

    name = "NPY/NPZ"
    suffixes = (".npy", ".npz")

    def read(self, path: Path, slice_index: int | None, limits: ReadLimits, series_uid: str | None = None) -> ImageData:
        npz = path.name.lower().endswith(".npz")
        try:
            arr = _read_npz(path, slice_index, limits) if npz else _read_npy(path, slice_index, limits)
        except ImageReadError:
            raise
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as err:
            raise ImageReadError(f"{path}: cannot read the NumPy file ({first_line(err)})") from err
        return ImageData(finish(arr, path, "array"), path, "npz" if npz else "npy", bit_depth=bit_depth(arr.dtype))

    def depth(self, path: Path, limits: ReadLimits) -> int | None:
        if path.name.lower().endswith(".npz"):
            with zipfile.ZipFile(path) as z, z.open(_npz_member(z, path) + ".npy") as f:
                shape, _ = _npy_header(f, path)
        else:
            with path.open("rb") as f:
                shape, _ = _npy_header(f, path)
        if len(shape) != 3 or shape[-1] in COLOUR_CHANNELS:
            return None  # (H, W) or a colour image (H, W, C)
        if min(shape[1:]) < MIN_SLICE_SIDE:
            raise ImageReadError(
                f"{path}: the array's shape {shape} is ambiguous: lsms reads (H, W), (H, W, C) with C = 1, 3 or 4, or "
                f"a volume (D, H, W) with H and W at least {MIN_SLICE_SIDE}; save it in one of these layouts")
        _numpy_piece(path, shape, 0, limits)
        return shape[0]


def _read_npz(path: Path, slice_index: int | None, limits: ReadLimits) -> np.ndarray:
    check_file_bytes(path, limits)
    with zipfile.ZipFile(path) as z:
        member = _npz_member(z, path) + ".npy"
        with z.open(member) as f:
            shape, _ = _npy_header(f, path)
        _numpy_piece(path, shape, slice_index, limits)
        limits.check(path, "max_volume_voxels", math.prod(shape), f"the array {member} declares shape {shape}, values")
        with z.open(member) as f:  # the zip's CRC is verified when the member has been read
            arr = np.lib.format.read_array(f, allow_pickle=False)
    return arr[slice_index] if slice_index is not None else arr  # (Z, H, W) -> (H, W)


def _read_npy(path: Path, slice_index: int | None, limits: ReadLimits) -> np.ndarray:
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
    return np.array(mapped[slice_index] if slice_index is not None else mapped)  # reads only that slice


def _npy_header(f: IO[bytes], path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) from an ``.npy`` stream positioned at its start; leaves it at the first data byte."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(f)
        read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, _, dtype = read(f)
    except zipfile.BadZipFile as err:  # a small .npz member is read (and its CRC checked) in one go
        raise ImageReadError(f"{path}: the .npz archive is damaged ({first_line(err)})") from err
    except Exception as err:  # ValueError, SyntaxError, tokenize.TokenError ... for a garbled header
        raise ImageReadError(f"{path}: not a valid .npy array header ({first_line(err)})") from err
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
        check_index(path, slice_index, shape[0])
        piece = shape[1:]
    else:
        piece = shape
    limits.check(path, "max_image_pixels", pixel_count(piece), f"the array declares shape {piece}, pixels")
    return piece


def _npz_member(z: zipfile.ZipFile, path: Path) -> str:
    keys = [n[:-4] for n in z.namelist() if n.endswith(".npy")]
    if not keys:
        raise ImageReadError(f"{path}: the .npz archive holds no arrays")
    return next((k for k in ("image", "arr_0", "data") if k in keys), keys[0])
