"""Readers for 2D images as users have them, and writing a predicted mask back with the input's geometry.

Supported: PNG/JPEG/BMP (8-bit grey or RGB, 16-bit grey), TIFF, NumPy ``.npy``/``.npz``, NIfTI (a 2D image or
one axial slice of a 3D volume), DICOM (one file, or a series folder plus a slice index). DICOM values are
returned in the stored physical unit (HU for CT: RescaleSlope and RescaleIntercept applied). Arrays are
returned unscaled; intensity scaling is :mod:`lsms.data.intensity`'s job.

Orientation: NIfTI and DICOM series are read with SimpleITK, so a slice is ``array[k]`` of the volume in
SimpleITK's (z, y, x) order: rows follow the volume's y axis, columns its x axis, with no flipping.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
TIFF_SUFFIXES = (".tif", ".tiff")
NUMPY_SUFFIXES = (".npy", ".npz")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIXES = (".dcm", ".dicom")


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


def _finish(array: np.ndarray, path: Path, what: str) -> np.ndarray:
    """Squeeze to (H, W) or (H, W, C) with C in 1..4 and convert to float32; errors name the file."""
    a = np.asarray(array)
    if a.dtype == bool:
        a = a.astype(np.uint8)
    if a.dtype.kind not in "uif":
        raise ValueError(f"{path}: {what} has dtype {a.dtype}; expected numbers")
    while a.ndim > 2 and a.shape[0] == 1:
        a = a[0]
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)  # (C, H, W) -> (H, W, C)
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (1, 2, 3, 4)):
        raise ValueError(
            f"{path}: {what} has shape {tuple(np.asarray(array).shape)}; expected a 2D image (H, W) or (H, W, C) "
            "with up to 4 channels (for volumes give a slice index)"
        )
    if min(a.shape[:2]) < 1:
        raise ValueError(f"{path}: {what} is empty (shape {a.shape})")
    return a.astype(np.float32, copy=False)


def _read_pil(path: Path) -> ImageData:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            elif mode in ("LA", "PA"):
                im = im.convert("L")
            elif mode == "CMYK" or mode == "YCbCr":
                im = im.convert("RGB")
            arr = np.array(im)
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"{path}: cannot decode the image ({err}); the file is truncated or not an image") from err
    if arr.ndim == 3 and arr.shape[-1] == 4 and np.all(arr[..., 3] == arr[..., 3].flat[0]):
        arr = arr[..., :3]  # constant alpha carries nothing
    fmt = "jpeg" if path.suffix.lower() in (".jpg", ".jpeg") else path.suffix.lower().lstrip(".")
    bits = 16 if mode.startswith("I;16") else (32 if mode in ("I", "F") else 8)
    return ImageData(_finish(arr, path, "image"), path, fmt, bit_depth=None if mode == "F" else bits)


def _read_tiff(path: Path) -> ImageData:
    import tifffile

    try:
        arr = tifffile.imread(path)
    except Exception as err:  # tifffile raises many types for damaged files
        raise ValueError(f"{path}: cannot decode the TIFF ({err}); the file is truncated or not a TIFF") from err
    return ImageData(_finish(arr, path, "TIFF image"), path, "tiff", bit_depth=_bits(arr.dtype))


def _read_numpy(path: Path, slice_index: int | None) -> ImageData:
    try:
        if _suffix(path) == ".npz":
            with np.load(path, allow_pickle=False) as z:
                keys = list(z.keys())
                if not keys:
                    raise ValueError(f"{path}: the .npz archive holds no arrays")
                key = next((k for k in ("image", "arr_0", "data") if k in keys), keys[0])
                arr = z[key]
        else:
            arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        if str(path) in str(err):
            raise
        raise ValueError(f"{path}: cannot read the NumPy file ({err})") from err
    if slice_index is not None:
        if arr.ndim != 3:
            raise ValueError(f"{path}: slice_index={slice_index} given but the array is {arr.ndim}D {arr.shape}")
        _check_index(path, slice_index, arr.shape[0])
        arr = arr[slice_index]  # (Z, H, W) -> (H, W)
    return ImageData(_finish(arr, path, "array"), path, _suffix(path).lstrip("."), bit_depth=_bits(arr.dtype))


def _check_index(path: Path, index: int, n: int) -> None:
    if not 0 <= index < n:
        raise ValueError(f"{path}: slice index {index} is out of range; the volume has {n} slices (0..{n - 1})")


def _geometry(img, slice_index: int) -> Geometry:  # img: SimpleITK.Image
    return Geometry(
        size=tuple(int(s) for s in img.GetSize()), spacing=tuple(float(s) for s in img.GetSpacing()),
        origin=tuple(float(s) for s in img.GetOrigin()), direction=tuple(float(s) for s in img.GetDirection()),
        slice_index=slice_index,
    )


def _from_sitk(img, path: Path, fmt: str, slice_index: int | None, modality: str | None = None) -> ImageData:
    import SimpleITK as sitk

    arr = sitk.GetArrayViewFromImage(img)  # (z, y, x) or (y, x), maybe with a trailing component axis
    dim = img.GetDimension()
    spacing = img.GetSpacing()
    if dim == 3 and img.GetNumberOfComponentsPerPixel() == 1:
        if slice_index is None:
            if img.GetSize()[2] != 1:
                raise ValueError(
                    f"{path}: this is a 3D volume with {img.GetSize()[2]} slices; give a slice index "
                    "(`slice_index` in the manifest or the reader argument)"
                )
            slice_index = 0
        _check_index(path, slice_index, arr.shape[0])
        arr = arr[slice_index]
    elif dim == 2:
        if slice_index not in (None, 0):
            raise ValueError(f"{path}: slice_index={slice_index} given but the image is 2D")
        slice_index = 0
    elif dim > 3:
        raise ValueError(f"{path}: {dim}D images are not supported; give a 2D image or a 3D volume")
    bits = _bits(np.dtype(arr.dtype))
    return ImageData(
        _finish(np.array(arr), path, "image"), path, fmt, spacing=(float(spacing[1]), float(spacing[0])),
        modality=modality, bit_depth=bits, geometry=_geometry(img, slice_index),
    )


def _read_nifti(path: Path, slice_index: int | None) -> ImageData:
    import SimpleITK as sitk

    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise ValueError(f"{path}: cannot read the NIfTI file ({str(err).strip().splitlines()[-1]})") from err
    return _from_sitk(img, path, "nifti", slice_index)


def _read_dicom_file(path: Path, slice_index: int | None) -> ImageData:
    import pydicom

    try:
        ds = pydicom.dcmread(path)
        raw = ds.pixel_array
    except Exception as err:  # pydicom raises several types for damaged or compressed files
        raise ValueError(
            f"{path}: cannot read the DICOM pixel data ({err}); for compressed transfer syntaxes install "
            "pylibjpeg or gdcm support, or convert the file"
        ) from err
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1:
        if slice_index is None:
            raise ValueError(f"{path}: multi-frame DICOM with {frames} frames; give a slice index")
        _check_index(path, slice_index, frames)
        raw = raw[slice_index]
    elif slice_index not in (None, 0):
        raise ValueError(f"{path}: slice_index={slice_index} given but the DICOM file holds one image")
    slope = float(getattr(ds, "RescaleSlope", 1) or 1)
    intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
    arr = raw.astype(np.float32) * slope + intercept  # stored value -> HU (CT)
    spacing = None
    geometry = None
    ps = getattr(ds, "PixelSpacing", None) or getattr(ds, "ImagerPixelSpacing", None)
    if ps is not None:
        spacing = (float(ps[0]), float(ps[1]))
    iop = getattr(ds, "ImageOrientationPatient", None)
    ipp = getattr(ds, "ImagePositionPatient", None)
    if frames == 1 and iop is not None and ipp is not None and spacing is not None:
        row, col = np.array(iop[:3], float), np.array(iop[3:], float)
        normal = np.cross(row, col)
        thickness = float(getattr(ds, "SliceThickness", 1) or 1)
        direction = np.stack([row, col, normal], axis=1)  # columns are the x, y, z axis directions
        geometry = Geometry(
            size=(int(raw.shape[-1]), int(raw.shape[-2]), 1), spacing=(spacing[1], spacing[0], thickness),
            origin=tuple(float(v) for v in ipp), direction=tuple(float(v) for v in direction.ravel()), slice_index=0,
        )
    return ImageData(
        _finish(arr, path, "DICOM image"), path, "dicom", spacing=spacing,
        modality=str(getattr(ds, "Modality", "")) or None, bit_depth=int(getattr(ds, "BitsStored", 0) or 0) or None,
        geometry=geometry,
    )


def _read_dicom_series(folder: Path, slice_index: int | None, series_uid: str | None) -> ImageData:
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    uids = list(reader.GetGDCMSeriesIDs(str(folder)))
    if not uids:
        raise ValueError(f"{folder}: no DICOM series found in this folder")
    if series_uid is None:
        if len(uids) > 1:
            raise ValueError(f"{folder}: the folder holds {len(uids)} DICOM series {uids}; choose one with series_uid")
        series_uid = uids[0]
    elif series_uid not in uids:
        raise ValueError(f"{folder}: no series {series_uid!r}; the folder holds {uids}")
    files = reader.GetGDCMSeriesFileNames(str(folder), series_uid)  # sorted along the slice normal
    if slice_index is None:
        if len(files) != 1:
            raise ValueError(f"{folder}: a DICOM series of {len(files)} slices; give a slice index (0..{len(files) - 1})")
        slice_index = 0
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        img = reader.Execute()  # RescaleSlope/Intercept applied: CT in HU
    except RuntimeError as err:
        raise ValueError(f"{folder}: cannot read the DICOM series ({str(err).strip().splitlines()[-1]})") from err
    modality = reader.GetMetaData(0, "0008|0060").strip() if reader.HasMetaDataKey(0, "0008|0060") else None
    return _from_sitk(img, folder, "dicom-series", slice_index, modality=modality or None)


def is_dicom(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def read_image(
    path: str | Path, slice_index: int | None = None, series_uid: str | None = None, slice_if_volume: bool = False
) -> ImageData:
    """Read a 2D image (or one slice of a volume) from any supported format.

    Args:
        path: an image file, or a folder holding one DICOM series.
        slice_index: slice of a 3D NIfTI volume, a (Z, H, W) NumPy array, a multi-frame DICOM or a DICOM
            series (0 = first along the slice normal).
        series_uid: which series when a folder holds several.
        slice_if_volume: apply ``slice_index`` only when the file holds a volume and ignore it for a 2D image
            (for masks: a series slice may have a plain 2D PNG mask).

    Returns:
        The image and its metadata.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the file cannot be decoded or is not a 2D image; the message names the file.
    """
    path = Path(path)
    if slice_if_volume and slice_index is not None and not _holds_volume(path):
        slice_index = None
    if path.is_dir():
        return _read_dicom_series(path, slice_index, series_uid)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image file not found")
    suffix = _suffix(path)
    if suffix in NIFTI_SUFFIXES:
        return _read_nifti(path, slice_index)
    if suffix in DICOM_SUFFIXES or (suffix not in PIL_SUFFIXES + TIFF_SUFFIXES + NUMPY_SUFFIXES and is_dicom(path)):
        return _read_dicom_file(path, slice_index)
    if slice_index not in (None, 0) and suffix not in NUMPY_SUFFIXES:
        raise ValueError(f"{path}: slice_index={slice_index} given but {suffix} files hold one 2D image")
    if suffix in TIFF_SUFFIXES:
        return _read_tiff(path)
    if suffix in NUMPY_SUFFIXES:
        return _read_numpy(path, slice_index)
    if suffix in PIL_SUFFIXES:
        return _read_pil(path)
    raise ValueError(
        f"{path}: unsupported image format {suffix!r}; use PNG, JPEG, TIFF, NPY/NPZ, NIfTI (.nii/.nii.gz) or DICOM"
    )


def _holds_volume(path: Path) -> bool:
    """Whether ``path`` is (probably) a 3D volume: a folder, a 3D NIfTI/NumPy array or multi-frame DICOM."""
    if path.is_dir():
        return True
    suffix = _suffix(path)
    try:
        if suffix in NIFTI_SUFFIXES:
            import SimpleITK as sitk

            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            return reader.GetDimension() >= 3 and reader.GetSize()[2] > 1
        if suffix == ".npy":
            return np.load(path, mmap_mode="r", allow_pickle=False).ndim == 3
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return any(z[k].ndim == 3 for k in z.keys())
        if suffix in DICOM_SUFFIXES:
            import pydicom

            return int(getattr(pydicom.dcmread(path, stop_before_pixels=True), "NumberOfFrames", 1) or 1) > 1
    except Exception:  # unreadable: let read_image report it with its own message
        return True
    return False


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
        raise ValueError(f"{img.path}: the mask holds NaN or inf values")
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
        raise ValueError(f"{img.path}: an instance label map must be single-channel, got shape {a.shape}")
    if not np.isfinite(a).all() or (a < 0).any() or (a != np.round(a)).any():
        raise ValueError(f"{img.path}: an instance label map must hold non-negative integers")
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
