"""Malformed inputs for the fuzz suite (``tests/test_fuzz.py``): small files of every supported format,
broken the ways damaged or hostile data is -- cut short, bytes flipped, sizes declared far beyond the data,
integrity fields that lie. Every file is a few kB; the sizes they *declare* reach tens of GiB.
"""

from __future__ import annotations

import gzip
import io
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np

HUGE = 60_000  # a side length: 60000 x 60000 = 3.6 G pixels, far above every default limit


# --------------------------------------------------------------------------- valid seeds


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bytes(width: int, height: int, depth: int, colour: int, rows: bytes, plte: bytes | None = None) -> bytes:
    """A PNG from raw scanlines (each already prefixed by its filter byte)."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    body = _png_chunk(b"IHDR", ihdr) + (_png_chunk(b"PLTE", plte) if plte else b"")
    return b"\x89PNG\r\n\x1a\n" + body + _png_chunk(b"IDAT", zlib.compress(rows)) + _png_chunk(b"IEND", b"")


def dicom_bytes(stored: np.ndarray, **tags) -> bytes:
    """A CT DICOM file (explicit VR little endian) of ``stored`` uint16 frames; ``tags`` override defaults."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3", "1.2.3.4"
    ds.Modality = "CT"
    ds.Rows, ds.Columns = stored.shape[-2:]
    if stored.ndim == 3:
        ds.NumberOfFrames = stored.shape[0]
    ds.PixelSpacing = [0.75, 0.5]
    ds.ImagePositionPatient = [0.0, 0.0, 0.0]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleSlope, ds.RescaleIntercept = 1.0, -1024.0
    ds.PixelData = stored.astype(np.uint16).tobytes()
    for key, value in tags.items():
        setattr(ds, key, value)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def nifti_bytes(data_xyz: np.ndarray, zooms: tuple[float, ...] | None = None, gz: bool = False) -> bytes:
    import nibabel as nib

    img = nib.Nifti1Image(data_xyz, np.eye(4))
    if zooms is not None:
        img.header.set_zooms(zooms)
    raw = img.to_bytes()
    return gzip.compress(raw, mtime=0) if gz else raw


def seeds(folder: Path) -> list[Path]:
    """One small valid file per supported format (the starting points of the mutations)."""
    import tifffile
    from PIL import Image

    rng = np.random.default_rng(0)
    grey = rng.integers(0, 255, (20, 24), dtype=np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    out = []

    def put(name: str, data: bytes | None = None) -> Path:
        path = folder / name
        if data is not None:
            path.write_bytes(data)
        out.append(path)
        return path

    Image.fromarray(grey).save(put("grey.png"))
    Image.fromarray(np.stack([grey, grey[::-1], 255 - grey], -1)).save(put("rgb.png"))
    Image.fromarray(grey.astype(np.uint16) * 257).save(put("grey16.png"))
    Image.fromarray(grey).save(put("photo.jpg"), quality=90)
    Image.fromarray(grey).save(put("grey.bmp"))
    Image.fromarray(grey).convert("P").save(put("indexed.gif"))
    tifffile.imwrite(put("grey.tif"), grey)
    tifffile.imwrite(put("float.tiff"), grey.astype(np.float32) / 7, compression="zlib")
    np.save(put("hu.npy"), grey.astype(np.int16) - 1000)
    np.savez(put("hu.npz"), image=grey.astype(np.int16))
    put("vol.nii", nifti_bytes(rng.integers(-100, 100, (24, 20, 3)).astype(np.int16)))
    put("vol.nii.gz", nifti_bytes(rng.integers(-100, 100, (24, 20, 3)).astype(np.int16), gz=True))
    put("ct.dcm", dicom_bytes(grey.astype(np.uint16) * 8))
    return out


# --------------------------------------------------------------------------- mutations


def mutations(seed: Path, flips: int, rng: np.random.Generator) -> list[tuple[str, bytes]]:
    """(name suffix, bytes): the seed cut at seven places, ``flips`` copies with one to four bytes changed
    (half of them inside the first 512 bytes, where headers are), an empty file and random bytes."""
    data = seed.read_bytes()
    n = len(data)
    out = [(f"cut{c}", data[:c]) for c in sorted({0, 1, 8, n // 10, n // 2, n * 9 // 10, n - 1})]
    for i in range(flips):
        buf = bytearray(data)
        for _ in range(int(rng.integers(1, 5))):
            pos = int(rng.integers(0, min(n, 512))) if i % 2 == 0 else int(rng.integers(0, n))
            buf[pos] = int(rng.integers(0, 256))
        out.append((f"flip{i}", bytes(buf)))
    out.append(("random", rng.integers(0, 256, n, dtype=np.uint8).tobytes()))
    return out


def write_mutations(seed_paths: list[Path], folder: Path, flips: int, seed: int = 0) -> list[Path]:
    """Write every mutation of every seed into ``folder``, keeping the seed's suffix (so it reaches its reader)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in seed_paths:
        suffix = ".nii.gz" if s.name.endswith(".nii.gz") else s.suffix
        stem = s.name[: -len(suffix)]
        for tag, data in mutations(s, flips, rng):
            path = folder / f"{stem}-{tag}{suffix}"
            path.write_bytes(data)
            paths.append(path)
    return paths


# --------------------------------------------------------------------------- crafted cases


def _patch_tiff_size(data: bytes, width: int, height: int) -> bytes:
    """Rewrite ImageWidth (256) and ImageLength (257) of a classic little-endian TIFF's first IFD."""
    buf = bytearray(data)
    ifd = struct.unpack_from("<I", buf, 4)[0]
    for i in range(struct.unpack_from("<H", buf, ifd)[0]):
        entry = ifd + 2 + 12 * i
        tag, kind = struct.unpack_from("<HH", buf, entry)
        if tag in (256, 257):
            value = width if tag == 256 else height
            if kind == 3:
                struct.pack_into("<H", buf, entry + 8, min(value, 65535))
            else:
                struct.pack_into("<I", buf, entry + 8, value)
    return bytes(buf)


def _patch_jpeg_size(data: bytes, width: int, height: int) -> bytes:
    buf = bytearray(data)
    sof = buf.find(b"\xff\xc0")
    struct.pack_into(">HH", buf, sof + 5, height, width)
    return bytes(buf)


def _jpeg_with_garbage(data: bytes) -> bytes:
    """A JPEG whose image data (after the start-of-scan segment) is 2 kB of random bytes, its end marker kept."""
    buf = bytearray(data)
    sos = buf.find(b"\xff\xda")
    start = sos + 2 + struct.unpack_from(">H", buf, sos + 2)[0]
    buf[start + 10 : -2] = np.random.default_rng(0).integers(0, 256, 2048, dtype=np.uint8).tobytes()
    return bytes(buf)


def _npy_with_header(header: dict, payload: bytes) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue() + payload


def crafted(folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, what reading it must do): ``limit`` (an error naming the size limit), ``error:<text>``
    (an error containing text), or ``ok`` (read; see the test for the value checks)."""
    import tifffile
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    cases: dict[str, tuple[Path, str]] = {}

    def put(name: str, data: bytes, expect: str) -> None:
        path = folder / name
        path.write_bytes(data)
        cases[name] = (path, expect)

    grey = np.arange(20 * 24, dtype=np.uint8).reshape(20, 24)
    # -- sizes declared far beyond the data (memory must not follow them)
    put("huge.png", png_bytes(13000, 13000, 8, 0, b"\x00" * 13001 * 4), "limit")
    jpg = io.BytesIO()
    Image.fromarray(grey).save(jpg, format="JPEG")
    put("huge.jpg", _patch_jpeg_size(jpg.getvalue(), HUGE, HUGE), "limit")
    tif = io.BytesIO()
    tifffile.imwrite(tif, grey)
    put("huge.tif", _patch_tiff_size(tif.getvalue(), HUGE, HUGE), "limit")
    put("huge.npy", _npy_with_header({"descr": "<f8", "fortran_order": False, "shape": (HUGE, HUGE)}, b"\0" * 64), "error:truncated")
    put("huge-slices.npy", _npy_with_header({"descr": "<f4", "fortran_order": False, "shape": (4, HUGE, HUGE)}, b""), "error:truncated")
    member = _npy_with_header({"descr": "<f8", "fortran_order": False, "shape": (HUGE, HUGE)}, b"\0" * 64)
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("image.npy", member)
    put("huge-member.npz", zbuf.getvalue(), "limit")
    put("huge.nii", _nifti_header_only((13000, 13000, 1), np.float32), "limit")
    put("huge-volume.nii.gz", gzip.compress(_nifti_header_only((512, 512, 32_000), np.float64) + b"\0" * 4096), "error:truncated")
    put("huge.dcm", dicom_bytes(np.zeros((2, 2), np.uint16), Rows=65535, Columns=65535, NumberOfFrames=1000), "limit")
    # -- exceptions libraries raise that readers must translate
    put("bomb.png", png_bytes(20000, 20000, 1, 0, zlib.compress(b"\0" * 100)), "limit")
    put("garbage-header.npy", b"\x93NUMPY\x01\x00" + struct.pack("<H", 118) + b"{'descr': '<f8', 'shape': (3," + b"'" * 88, "error:header")
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    put("pickle.npy", pickled.getvalue(), "error:Python objects")
    put("notzip.npz", b"PK\x03\x04" + b"\x00" * 100, "error:")
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("image.npy", _npy_with_header({"descr": "|u1", "fortran_order": False, "shape": (20, 24)}, grey.tobytes()))
    crc = bytearray(zbuf.getvalue())
    crc[200] ^= 0xFF  # inside the stored member's data: only the CRC can tell
    put("crc.npz", bytes(crc), "error:")
    # -- integrity: the file lies about itself
    vol = np.arange(20 * 30 * 10, dtype=np.float32).reshape(20, 30, 10)
    put("short.nii", nifti_bytes(vol)[: 352 + 100], "error:truncated")
    full_gz = nifti_bytes(vol, gz=True)
    put("halfcut.nii.gz", full_gz[: len(full_gz) // 2], "error:damaged or cut short")
    nan = vol.copy()
    nan[3, 4, 1] = np.nan
    put("nan.nii.gz", nifti_bytes(nan, gz=True), "nan")
    put("dim0.nii", _patch_nifti_dim(nifti_bytes(vol), 2, 0), "error:shape")
    put("pixdim0.nii", nifti_bytes(vol, zooms=(0.0, 0.0, 1.0)), "error:spacing")
    put("4d.nii", nifti_bytes(np.zeros((4, 4, 3, 2), np.float32)), "error:4D")
    put("vox-offset0.nii", _patch_nifti(nifti_bytes(vol), 108, "<f", 0.0), "error:inside the 352-byte header")
    put("sizeof-hdr.nii", _patch_nifti(nifti_bytes(vol), 0, "<i", 1234), "error:sizeof_hdr is 1234, not 348")
    put("slope0.dcm", dicom_bytes(grey.astype(np.uint16), RescaleSlope=0), "error:RescaleSlope")
    put("spacing0.dcm", dicom_bytes(grey.astype(np.uint16), PixelSpacing=[0, 0]), "error:spacing")
    put("short-pixels.dcm", dicom_bytes(grey.astype(np.uint16))[:-300], "error:")
    put("nopalette.png", png_bytes(8, 8, 8, 3, b"".join(b"\0" + bytes(range(8)) for _ in range(8))), "error:palette")
    put("no-iend.png", png_bytes(8, 8, 8, 0, b"".join(b"\0" + bytes(range(8)) for _ in range(8)))[:-12], "error:truncated PNG")
    put("tiff-named.png", tif.getvalue(), "error:the file is TIFF, not PNG as its ending .png says")
    put("garbage-data.jpg", _jpeg_with_garbage(jpg.getvalue()), "error:the JPEG is damaged (the image data holds the invalid marker")
    put("palette-no-table.dcm", dicom_bytes(grey.astype(np.uint16), PhotometricInterpretation="PALETTE COLOR"),
        "error:PALETTE COLOR DICOM without its colour table")
    rows16 = b"".join(b"\0" + struct.pack(">HHH", 65535, 0, 4660) * 8 for _ in range(8))
    put("rgb16.png", png_bytes(8, 8, 16, 2, rows16), "rgb16")
    pages = io.BytesIO()
    with tifffile.TiffWriter(pages) as w:
        for k in range(4):
            w.write(np.full((6, 8), k, np.uint8))
    put("pages.tif", pages.getvalue(), "error:4 pages")
    gif = io.BytesIO()
    frames = [Image.fromarray(np.full((6, 8), k * 40, np.uint8)) for k in range(3)]
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    put("anim.gif", gif.getvalue(), "error:3 frames")
    put("multiframe.dcm", dicom_bytes(np.stack([grey.astype(np.uint16) + k for k in range(3)])), "error:3 frames")
    return cases


def _nifti_header_only(shape: tuple[int, ...], dtype: type) -> bytes:
    """A NIfTI-1 header (and the 4-byte extension flag) declaring ``shape``, with no voxel data."""
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header["vox_offset"] = 352
    return header.binaryblock + b"\0\0\0\0"


def _patch_nifti_dim(data: bytes, axis: int, value: int) -> bytes:
    return _patch_nifti(data, 40 + 2 * (axis + 1), "<h", value)  # dim[0] is at byte 40


def _patch_nifti(data: bytes, offset: int, fmt: str, value: float) -> bytes:
    """Overwrite one NIfTI-1 header field (sizeof_hdr at byte 0, dim at 40, vox_offset at 108)."""
    buf = bytearray(data)
    struct.pack_into(fmt, buf, offset, value)
    return bytes(buf)
