"""NIfTI through nibabel (a 2D image or one axial slice of a 3D volume, read through the array proxy) and
SimpleITK (the geometry, in its LPS convention); masks are written in an input's geometry as NIfTI.

Orientation: a slice is ``array[k]`` of the volume in SimpleITK's (z, y, x) order: rows follow the volume's y
axis, columns its x axis, with no flipping (nibabel gives voxels as (x, y, z); they are transposed to that order).
"""

from __future__ import annotations

import functools
import gzip
import math
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from lsms.data.formats.base import (
    Geometry,
    ImageData,
    ImageReader,
    ImageReadError,
    ReadLimits,
    bit_depth,
    check_index,
    finish,
    first_line,
)


class NiftiReader(ImageReader):
    """One slice at a time; the header's sizes, spacing and data length are checked before reading. Writes masks."""

    name = "NIfTI (.nii/.nii.gz)"
    suffixes = (".nii", ".nii.gz")
    writes_masks = True

    def read(self, path: Path, slice_index: int | None, limits: ReadLimits, series_uid: str | None = None) -> ImageData:
        import SimpleITK as sitk

        img, (_, _, nz) = _nifti_header(path, limits)
        if nz > 1 or len(img.shape) >= 3:
            if slice_index is None:
                if nz != 1:
                    raise ImageReadError(f"{path}: this is a 3D volume with {nz} slices; give a slice index "
                                         "(`slice_index` in the manifest or the reader argument)")
                slice_index = 0
            check_index(path, slice_index, nz)
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
        reader.ReadImageInformation()  # the geometry, in SimpleITK's (LPS) convention, for write_mask
        geometry = Geometry(
            size=tuple(int(s) for s in reader.GetSize()), spacing=tuple(float(s) for s in reader.GetSpacing()),
            origin=tuple(float(s) for s in reader.GetOrigin()), direction=tuple(float(s) for s in reader.GetDirection()),
            slice_index=slice_index,
        )
        spacing = geometry.spacing
        return ImageData(
            finish(arr, path, "image"), path, "nifti", spacing=(float(spacing[1]), float(spacing[0])),
            bit_depth=bit_depth(img.header.get_data_dtype()), geometry=geometry,
        )

    def depth(self, path: Path, limits: ReadLimits) -> int | None:
        img, (_, _, nz) = _nifti_header(path, limits)
        return nz if len(img.shape) >= 3 else None

    def write_mask(self, volume: np.ndarray, geometry: Geometry, path: Path) -> Path:
        import SimpleITK as sitk

        img = sitk.GetImageFromArray(volume)
        img.SetSpacing(geometry.spacing)
        img.SetOrigin(geometry.origin)
        img.SetDirection(geometry.direction)
        path.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(img, str(path), useCompression=path.name.lower().endswith(".nii.gz"))
        return path

    def uncompressed(self, path: Path, max_bytes: int, folder: Path | None = None) -> Path | None:
        """A ``.nii.gz`` decompressed next to it (or into ``folder``) as ``.nii``; None for a ``.nii``."""
        if not path.name.lower().endswith(".nii.gz"):
            return None
        out = (folder or path.parent) / path.name[:-3]
        try:
            with gzip.open(path, "rb") as src, open(out, "wb") as dst:
                n = 0
                while chunk := src.read(1 << 20):
                    n += len(chunk)
                    if n > max_bytes:
                        raise ValueError("too large")
                    dst.write(chunk)
        except (OSError, EOFError, ValueError, zlib.error):
            out.unlink(missing_ok=True)
            return None
        return out


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
    from nibabel.openers import ImageOpener

    img = nib.load(str(path))  # header only; the data stays on disk behind img.dataobj
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise ImageReadError(f"{path}: not a NIfTI image ({type(img).__name__})")
    with ImageOpener(str(path)) as f:  # nibabel's loaded header has sizeof_hdr, vox_offset and zero pixdims repaired
        raw = type(img.header).from_fileobj(f, check=False)
    if int(raw["sizeof_hdr"]) != type(raw).sizeof_hdr:  # 348 for NIfTI-1, 540 for NIfTI-2
        version = 2 if isinstance(img, nib.Nifti2Image) else 1
        raise ImageReadError(f"{path}: the header size field sizeof_hdr is {int(raw['sizeof_hdr'])}, not "
                             f"{type(raw).sizeof_hdr} as NIfTI-{version} requires; the header is damaged or this is "
                             "not a NIfTI file")
    if not float(raw["vox_offset"]) >= type(raw).single_vox_offset:
        raise ImageReadError(f"{path}: the header puts the voxel data at byte {float(raw['vox_offset']):g} "
                             f"(vox_offset), inside the {type(raw).single_vox_offset}-byte header; the header is "
                             "damaged (a .nii file's data starts after its header)")
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
    zooms = [float(z) for z in raw["pixdim"][1 : len(dims) + 1]]
    if not all(math.isfinite(z) and z > 0 for z in zooms):
        raise ImageReadError(f"{path}: voxel spacing (pixdim) {zooms} must be positive numbers; fix the header")
    offset = int(img.dataobj.offset)
    need = offset + math.prod(shape) * img.header.get_data_dtype().itemsize
    if path.name.lower().endswith(".nii.gz"):
        st = path.stat()
        try:
            have = _gzip_data_length(str(path), st.st_mtime_ns, st.st_size)
        except (OSError, EOFError) as err:
            raise ImageReadError(f"{path}: the compressed data is damaged or cut short ({first_line(err)})") from err
    else:
        have = path.stat().st_size
    if have < need:
        raise ImageReadError(f"{path}: the file holds {max(0, have - offset):,} of the {need - offset:,} data bytes its "
                             "header declares; it is truncated")
    return img, (nx, ny, nz)
