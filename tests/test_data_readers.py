"""Readers: pixel values and metadata from files written here, and errors that name the file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lsms.data import formats, read_image, read_label_map, read_mask, write_mask_like
from lsms.data.formats.base import Geometry, ImageData, ImageReader, ImageReadError, ReadLimits
from lsms.data.formats.dicom import DicomReader
from lsms.data.formats.nifti import NiftiReader


def _ramp(h: int = 6, w: int = 8, scale: int = 1) -> np.ndarray:
    return (np.arange(h * w).reshape(h, w) * scale).astype(np.int64)


def test_png_8bit_grey_and_rgb(tmp_path: Path) -> None:
    grey = _ramp().astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "g.png")
    img = read_image(tmp_path / "g.png")
    assert img.array.dtype == np.float32 and img.array.shape == (6, 8) and img.bit_depth == 8
    np.testing.assert_array_equal(img.array, grey)
    rgb = np.stack([grey, 255 - grey, np.full_like(grey, 7)], axis=-1)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    img = read_image(tmp_path / "c.png")
    assert img.array.shape == (6, 8, 3) and img.format == "png"
    np.testing.assert_array_equal(img.array[..., 1], 255 - grey)
    assert img.array[0, 0, 2] == 7


def test_png_16bit(tmp_path: Path) -> None:
    a = _ramp(scale=1000).astype(np.uint16)  # up to 47000: needs 16 bits
    Image.fromarray(a).save(tmp_path / "x16.png")
    img = read_image(tmp_path / "x16.png")
    assert img.bit_depth == 16 and img.array.max() == 47000
    np.testing.assert_array_equal(img.array, a)


def test_jpeg_is_close(tmp_path: Path) -> None:
    a = np.full((16, 16), 120, np.uint8)
    Image.fromarray(a).save(tmp_path / "x.jpg", quality=95)
    img = read_image(tmp_path / "x.jpg")
    assert img.format == "jpeg" and img.array.shape == (16, 16)
    assert np.abs(img.array - 120).max() <= 2


def test_valid_jpeg_variants_pass_the_structure_check(tmp_path: Path) -> None:
    g = np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)
    Image.fromarray(g).save(tmp_path / "restart.jpg", restart_marker_blocks=2)  # restart markers in the image data
    Image.fromarray(g).save(tmp_path / "progressive.jpg", progressive=True)  # several scans
    Image.fromarray(g).save(tmp_path / "comment.jpg", comment=b"lsms", icc_profile=b"x" * 100)
    for name in ("restart.jpg", "progressive.jpg", "comment.jpg"):
        assert read_image(tmp_path / name).array.shape == (64, 80, 3)


def test_tiff_float_and_uint16(tmp_path: Path) -> None:
    import tifffile

    f = np.linspace(-1, 1, 48, dtype=np.float32).reshape(6, 8)
    tifffile.imwrite(tmp_path / "f.tif", f)
    np.testing.assert_array_equal(read_image(tmp_path / "f.tif").array, f)
    u = _ramp(scale=999).astype(np.uint16)
    tifffile.imwrite(tmp_path / "u.tiff", u)
    img = read_image(tmp_path / "u.tiff")
    assert img.bit_depth == 16 and img.format == "tiff"
    np.testing.assert_array_equal(img.array, u)


def test_npy_npz_and_int16_hu(tmp_path: Path) -> None:
    hu = np.array([[-1000, -45], [30, 105]], dtype=np.int16)  # synthetic CT is stored as int16 HU
    np.save(tmp_path / "ct.npy", hu)
    img = read_image(tmp_path / "ct.npy")
    np.testing.assert_array_equal(img.array, hu.astype(np.float32))
    assert img.bit_depth == 16
    np.savez(tmp_path / "ct.npz", image=hu)
    np.testing.assert_array_equal(read_image(tmp_path / "ct.npz").array, hu)
    vol = np.stack([hu, hu + 1, hu + 2])
    np.save(tmp_path / "vol.npy", vol)
    np.testing.assert_array_equal(read_image(tmp_path / "vol.npy", slice_index=2).array, hu + 2)


def _nifti(path: Path, data_zyx: np.ndarray, spacing: tuple[float, ...], origin: tuple[float, ...]) -> None:
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(data_zyx)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    sitk.WriteImage(img, str(path))


def test_nifti_2d(tmp_path: Path) -> None:
    a = _ramp().astype(np.int16) - 20
    _nifti(tmp_path / "a.nii.gz", a, (0.7, 0.8), (1.0, 2.0))
    img = read_image(tmp_path / "a.nii.gz")
    np.testing.assert_array_equal(img.array, a)
    assert img.spacing == pytest.approx((0.8, 0.7))  # (row, column) = (y, x)
    assert img.format == "nifti" and img.geometry is not None and img.geometry.size == (8, 6)


def test_nifti_3d_slice_and_mask_written_back(tmp_path: Path) -> None:
    import SimpleITK as sitk

    vol = np.stack([_ramp().astype(np.int16) + 100 * k for k in range(4)])  # (z, y, x)
    _nifti(tmp_path / "v.nii.gz", vol, (0.5, 0.6, 2.5), (10.0, -20.0, 30.0))
    img = read_image(tmp_path / "v.nii.gz", slice_index=2)
    np.testing.assert_array_equal(img.array, vol[2])
    with pytest.raises(ValueError, match=r"v\.nii\.gz.*3D volume with 4 slices"):
        read_image(tmp_path / "v.nii.gz")
    with pytest.raises(ValueError, match=r"v\.nii\.gz.*slice index 9 is out of range"):
        read_image(tmp_path / "v.nii.gz", slice_index=9)
    mask = np.zeros((6, 8), bool)
    mask[1:3, 2:5] = True
    out = write_mask_like(mask, img, tmp_path / "pred.nii.gz")
    back = sitk.ReadImage(str(out))
    assert back.GetSize() == (8, 6, 4)
    assert back.GetSpacing() == pytest.approx((0.5, 0.6, 2.5)) and back.GetOrigin() == pytest.approx((10.0, -20.0, 30.0))
    arr = sitk.GetArrayFromImage(back)
    assert arr[2].sum() == 6 and arr.sum() == 6
    with pytest.raises(ValueError, match="resize the prediction back"):
        write_mask_like(np.zeros((3, 3), bool), img, tmp_path / "bad.nii.gz")
    png = read_image(_png(tmp_path / "p.png"))
    with pytest.raises(ValueError, match=r"p\.png.*no spatial geometry"):
        write_mask_like(mask, png, tmp_path / "x.nii.gz")


def test_mask_volume_above_the_voxel_limit_is_refused_before_allocating(tmp_path: Path, monkeypatch) -> None:
    from lsms.data.readers import ImageTooLargeError, write_volume_mask

    geometry = Geometry(size=(1024, 1024, 1024), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
                        direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    with pytest.raises(ImageTooLargeError, match=r"m\.nii\.gz: voxels of the mask volume .*1024 x 1024 x 1024.*"
                                                 r"max_volume_voxels = 268,435,456"):
        write_volume_mask({0: np.zeros((1024, 1024), bool)}, geometry, tmp_path / "m.nii.gz")
    monkeypatch.setenv("LSMS_MAX_VOLUME_VOXELS", "10")
    small = Geometry(size=(4, 3, 2), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=geometry.direction)
    with pytest.raises(ImageTooLargeError, match="max_volume_voxels = 10"):
        write_volume_mask({0: np.zeros((3, 4), bool)}, small, tmp_path / "m.nii.gz")
    assert not (tmp_path / "m.nii.gz").exists()


def _png(path: Path, a: np.ndarray | None = None) -> Path:
    Image.fromarray(np.zeros((6, 8), np.uint8) if a is None else a).save(path)
    return path


def _dicom(path: Path, stored: np.ndarray, slope: float, intercept: float, z: float = 0.0, series: str = "1.2.3.4") -> None:
    from fuzz_inputs import dicom_bytes

    path.write_bytes(dicom_bytes(
        stored, RescaleSlope=slope, RescaleIntercept=intercept, SeriesInstanceUID=series, PatientID="p1",
        InstanceNumber=int(z) + 1, SliceThickness=2.0, ImagePositionPatient=[-10.0, -20.0, z],
    ))


def test_dicom_file_in_hu(tmp_path: Path) -> None:
    stored = np.array([[0, 1000], [1024, 2048], [3000, 4095]], dtype=np.uint16)
    _dicom(tmp_path / "ct.dcm", stored, slope=2.0, intercept=-1024.0)
    img = read_image(tmp_path / "ct.dcm")
    np.testing.assert_array_equal(img.array, stored * 2.0 - 1024.0)  # HU = stored * slope + intercept
    assert img.array[0, 0] == -1024 and img.array[1, 0] == 1024
    assert img.modality == "CT" and img.spacing == (0.75, 0.5) and img.format == "dicom"
    assert img.geometry is not None and img.geometry.origin == (-10.0, -20.0, 0.0)


def test_dicom_series_slice_and_mask_written_back(tmp_path: Path) -> None:
    import SimpleITK as sitk

    series = tmp_path / "series"
    series.mkdir()
    for k in (2, 0, 1):  # written out of order; read sorted along the slice normal
        _dicom(series / f"s{k}.dcm", np.full((4, 5), 1000 + 10 * k, np.uint16), slope=1.0, intercept=-1024.0, z=2.0 * k)
    img = read_image(series, slice_index=1)
    np.testing.assert_array_equal(img.array, np.full((4, 5), 1010 - 1024.0))
    assert img.format == "dicom-series" and img.modality == "CT"
    assert img.spacing == pytest.approx((0.75, 0.5))
    with pytest.raises(ValueError, match=r"series.*3 slices; give a slice index"):
        read_image(series)
    mask = np.zeros((4, 5), np.uint8)
    mask[0, 0] = 1
    back = sitk.ReadImage(str(write_mask_like(mask, img, tmp_path / "m.nii.gz")))
    assert back.GetSize() == (5, 4, 3) and back.GetOrigin() == pytest.approx((-10.0, -20.0, 0.0))
    assert back.GetSpacing() == pytest.approx((0.5, 0.75, 2.0))
    assert sitk.GetArrayFromImage(back)[1, 0, 0] == 1 and sitk.GetArrayFromImage(back).sum() == 1


def test_read_volume_slices_equal_read_image(tmp_path: Path) -> None:
    import SimpleITK as sitk

    from lsms.data import read_volume

    series = tmp_path / "series"
    series.mkdir()
    for k in (2, 0, 1):
        _dicom(series / f"s{k}.dcm", np.full((4, 5), 1000 + 10 * k, np.uint16), slope=1.0, intercept=-1024.0, z=2.0 * k)
    sitk.WriteImage(sitk.GetImageFromArray(np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5)),
                    str(tmp_path / "v.nii.gz"))
    _png(tmp_path / "a.png")
    for path, depth in ((series, 3), (tmp_path / "v.nii.gz", 3), (tmp_path / "a.png", 1)):
        volume = read_volume(path)
        assert volume.depth == depth
        for k in range(depth):
            got, want = volume.slice(k), read_image(path, slice_index=k if depth > 1 else None)
            np.testing.assert_array_equal(got.array, want.array)
            assert got.geometry == want.geometry and got.format == want.format and got.modality == want.modality
        with pytest.raises(ValueError, match="out of range"):
            volume.slice(depth)


def test_volume_cache_reads_each_volume_once_and_stacks_neighbours(tmp_path: Path, monkeypatch) -> None:
    """2.5D input: slice k with its neighbours in slice order, the end slice repeated past either end; each volume
    read once while it fits, the least recently used dropped beyond the limit; a pickled copy starts empty."""
    import pickle

    import SimpleITK as sitk

    from lsms.data import readers
    from lsms.data.readers import VolumeCache

    for name in ("a", "b"):  # slice k holds the value k (+ 100 for b)
        vol = (np.arange(5, dtype=np.int16)[:, None, None] + (100 if name == "b" else 0)) * np.ones((1, 4, 6), np.int16)
        sitk.WriteImage(sitk.GetImageFromArray(vol), str(tmp_path / f"{name}.nii.gz"))
    reads = []
    unpacked = readers.open_volume_unpacked
    monkeypatch.setattr(readers, "open_volume_unpacked", lambda path, scratch: reads.append(path) or unpacked(path, scratch))
    cache = VolumeCache(max_bytes=5 * 4 * 6 * 2)  # one volume of int16
    a = tmp_path / "a.nii.gz"
    assert cache.context(a, 0, 1).shape == (4, 6, 3)
    assert [cache.context(a, k, 1)[0, 0].tolist() for k in (0, 2, 4)] == [[0, 0, 1], [1, 2, 3], [3, 4, 4]]
    assert cache.context(a, 1, 2)[0, 0].tolist() == [0, 0, 1, 2, 3] and reads == [a]
    assert cache.context(tmp_path / "b.nii.gz", 3, 0)[0, 0].tolist() == [103]
    cache.context(a, 3, 1)  # b pushed a out: read again
    assert reads == [a, tmp_path / "b.nii.gz", a]
    assert pickle.loads(pickle.dumps(cache)).__dict__["_arrays"] == {}
    with pytest.raises(ValueError, match="out of range"):
        cache.context(a, 5, 1)


def test_masks_and_label_maps(tmp_path: Path) -> None:
    m = np.zeros((6, 8), np.uint8)
    m[2:4, 2:4] = 255
    np.testing.assert_array_equal(read_mask(_png(tmp_path / "m.png", m)), m > 0)
    np.testing.assert_array_equal(read_mask(_png(tmp_path / "m01.png", (m > 0).astype(np.uint8))), m > 0)
    Image.fromarray(m).save(tmp_path / "m.jpg", quality=60)  # lossy: grey ringing, read as > 127
    assert read_mask(tmp_path / "m.jpg").sum() == 4
    labels = np.zeros((6, 8), np.uint8)
    labels[0, 0], labels[5, 7] = 1, 2
    lm = read_label_map(_png(tmp_path / "l.png", labels))
    assert lm.dtype == np.int64 and lm[5, 7] == 2


def test_shapes_are_not_misread(tmp_path: Path) -> None:
    from lsms.data.readers import volume_depth

    Image.fromarray(np.array([[[10, 20, 30]]], np.uint8)).save(tmp_path / "pixel.png")  # 1 x 1 RGB
    assert read_image(tmp_path / "pixel.png").array.tolist() == [[[10.0, 20.0, 30.0]]]
    np.save(tmp_path / "rgb.npy", np.zeros((40, 50, 3), np.uint8))  # (H, W, C): one colour image, not 40 slices
    assert volume_depth(tmp_path / "rgb.npy") is None and read_image(tmp_path / "rgb.npy").array.shape == (40, 50, 3)
    np.save(tmp_path / "odd.npy", np.zeros((40, 50, 5), np.float32))
    with pytest.raises(ImageReadError, match=r"odd\.npy: the array's shape \(40, 50, 5\) is ambiguous: .*\(H, W\), "
                                             r"\(H, W, C\) with C = 1, 3 or 4, or a volume \(D, H, W\)"):
        volume_depth(tmp_path / "odd.npy")
    m = np.zeros((4, 16, 16), np.uint8)
    m[2, 3, 3] = 1
    np.save(tmp_path / "m4.npy", m)
    with pytest.raises(ImageReadError, match=r"m4\.npy: a 2D mask is expected but the file holds 4 slices"):
        read_mask(tmp_path / "m4.npy")
    assert read_mask(tmp_path / "m4.npy", slice_index=2).sum() == 1  # a mask volume, sliced on purpose


def test_dicom_palette_colour_and_a_quiet_failed_decode(tmp_path: Path, caplog) -> None:
    import io
    import logging

    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    from fuzz_inputs import dicom_bytes

    red = np.arange(256, dtype=np.uint16) * 256  # a 16-bit colour table: index i -> (256 i, 0, 65535 - 256 i)
    (tmp_path / "pal.dcm").write_bytes(dicom_bytes(
        np.zeros((2, 2), np.uint16), PixelData=bytes([0, 1, 2, 255]), PhotometricInterpretation="PALETTE COLOR", BitsAllocated=8,
        BitsStored=8, HighBit=7, RescaleIntercept=0.0, RedPaletteColorLookupTableDescriptor=[256, 0, 16],
        GreenPaletteColorLookupTableDescriptor=[256, 0, 16], BluePaletteColorLookupTableDescriptor=[256, 0, 16],
        RedPaletteColorLookupTableData=red.tobytes(), GreenPaletteColorLookupTableData=np.zeros(256, np.uint16).tobytes(),
        BluePaletteColorLookupTableData=(65535 - red).tobytes(),
    ))
    img = read_image(tmp_path / "pal.dcm")
    assert img.array.shape == (2, 2, 3) and img.array[1, 1].tolist() == [65280.0, 0.0, 255.0] and img.bit_depth == 16
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(np.zeros((8, 8), np.uint16), BitsAllocated=8, BitsStored=8, HighBit=7)))
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([b"\xff\xd8\xff" + bytes(range(200))])  # a JPEG frame of garbage
    ds["PixelData"].VR = "OB"
    ds.save_as(tmp_path / "garbage.dcm", enforce_file_format=True)
    with caplog.at_level(logging.DEBUG), pytest.raises(ImageReadError, match=r"garbage\.dcm: cannot read the DICOM pixel"):
        read_image(tmp_path / "garbage.dcm")
    assert [r for r in caplog.records if r.name.startswith("pydicom") and r.levelno >= logging.ERROR] == []
    assert logging.getLogger("pydicom").level == logging.WARNING  # restored


def test_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nothere\.png: image file not found"):
        read_image(tmp_path / "nothere.png")
    data = (_png(tmp_path / "full.png", np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))).read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.png: cannot decode the image .*truncated"):
        read_image(tmp_path / "cut.png")
    (tmp_path / "x.xyz").write_bytes(b"hello")
    with pytest.raises(ValueError, match=r"x\.xyz: unsupported image format"):
        read_image(tmp_path / "x.xyz")
    np.save(tmp_path / "bad.npy", np.zeros((2, 3, 4, 5)))
    with pytest.raises(ValueError, match=r"bad\.npy: array has shape"):
        read_image(tmp_path / "bad.npy")


def test_series_slice_with_2d_png_mask_and_volume_mask(tmp_path: Path) -> None:
    import json

    from lsms.data import Preprocessing, SegmentationDataset, load_manifest
    from lsms.data.check import check_dataset

    series = tmp_path / "ds" / "series"
    series.mkdir(parents=True)
    for k in range(3):
        _dicom(series / f"s{k}.dcm", np.full((4, 5), 1024 + 30 * k, np.uint16), 1.0, -1024.0, z=2.0 * k)
    m = np.zeros((4, 5), np.uint8)
    m[1:3, 1:3] = 255
    _png(tmp_path / "ds" / "m.png", m)
    vol = np.zeros((3, 4, 5), np.uint8)
    vol[2, 0, 0] = 1
    _nifti(tmp_path / "ds" / "mvol.nii.gz", vol, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    lines = [
        {"id": "a", "image": "series", "mask": "m.png", "text": "", "split": "train", "slice_index": 1, "modality": "CT"},
        {"id": "b", "image": "series", "mask": "mvol.nii.gz", "text": "", "split": "train", "slice_index": 2},  # one scan: one split
    ]
    (tmp_path / "ds" / "manifest.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    recs = load_manifest(tmp_path / "ds")
    ds = SegmentationDataset(recs, Preprocessing(image_size=(4, 5), in_channels=1, intensity="window", window_width=120, window_level=0))
    a, b = ds[0], ds[1]
    assert a["image"][0, 0, 0] == pytest.approx(0.75)  # slice 1: 30 HU in W120 L0
    assert a["mask"].sum() == 4 and b["mask"].sum() == 1 and b["mask"][0, 0, 0] == 1
    report = check_dataset(tmp_path / "ds", workers=1)
    assert report.ok, report.format_text()


# --------------------------------------------------------------------------- a new format is one class


class ToyReader(ImageReader):
    """``.toy``: a text file, ``TOY`` then one line per row of whitespace-separated integers."""

    name = "toy"
    suffixes = (".toy",)

    def __init__(self) -> None:
        self.reads: list[Path] = []

    def read(self, path: Path, slice_index: int | None, limits: ReadLimits, series_uid: str | None = None) -> ImageData:
        lines = path.read_text().splitlines()
        if not lines or lines[0] != "TOY":
            raise ImageReadError(f"{path}: not a toy image (the first line must be TOY)")
        arr = np.array([[int(v) for v in line.split()] for line in lines[1:]], dtype=np.uint8)
        limits.check(path, "max_image_pixels", arr.size, f"the image declares {arr.shape[0]} x {arr.shape[1]} pixels")
        self.reads.append(path)
        return ImageData(arr.astype(np.float32), path, "toy", bit_depth=8)


def _toy(path: Path, a: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("TOY\n" + "\n".join(" ".join(str(int(v)) for v in row) for row in a) + "\n")
    return path


@pytest.fixture
def toy_reader():
    reader = formats.register(ToyReader())
    yield reader
    formats.unregister(reader)
    assert not formats.is_image_name("x.toy")


def test_a_registered_format_reads_through_check_and_predict(toy_reader: ToyReader, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from lsms.cli import main

    from toy_data import make_untrained_checkpoint

    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    lines = []
    for i, split in enumerate(("train", "train", "val")):
        image = rng.integers(0, 200, (12, 16))
        mask = np.zeros((12, 16), np.uint8)
        mask[3 + i : 7 + i, 4:9] = 255
        _toy(data / "images" / f"{i}.toy", image)
        Image.fromarray(mask).save(data / f"{i}_mask.png")
        lines.append(json.dumps({"id": f"s{i}", "image": f"images/{i}.toy", "mask": f"{i}_mask.png",
                                 "text": "the lesion", "split": split}))
    (data / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["check", str(data), "--no-text-check", "--workers", "1"]) == 0
    assert "OK: 0 error(s)" in capsys.readouterr().out
    assert {p.name for p in toy_reader.reads} == {"0.toy", "1.toy", "2.toy"}

    ckpt = make_untrained_checkpoint(tmp_path / "model.pt", in_channels=1, ct=False)
    out = tmp_path / "out"
    assert main(["predict", str(ckpt), str(data / "images" / "0.toy"), "--text", "the lesion", "--out", str(out),
                 "--device", "cpu"]) == 0
    mask = np.array(Image.open(out / "0_mask.png"))  # named by the stem without the registered ending
    assert mask.shape == (12, 16) and set(np.unique(mask)) <= {0, 255}
    assert main(["predict", str(ckpt), str(data / "images"), "--text", "the lesion", "--out", str(tmp_path / "all"),
                 "--device", "cpu"]) == 0  # a folder: its .toy files are the images
    assert sorted(p.name for p in (tmp_path / "all").glob("*_mask.png")) == ["0_mask.png", "1_mask.png", "2_mask.png"]


def test_a_registered_format_joins_layouts_and_messages(toy_reader: ToyReader, tmp_path: Path) -> None:
    from lsms.data import load_samples

    _toy(tmp_path / "images" / "a.toy", np.full((4, 5), 9))
    (tmp_path / "masks").mkdir()
    Image.fromarray(np.full((4, 5), 255, np.uint8)).save(tmp_path / "masks" / "a.png")
    (r,) = load_samples(tmp_path)
    assert r.image.endswith("a.toy") and read_mask(r.mask_path).all()
    (tmp_path / "x.xyz").write_text("?")
    with pytest.raises(ImageReadError, match=r"use PNG, JPEG, TIFF, NPY/NPZ, NIfTI \(\.nii/\.nii\.gz\), DICOM or toy"):
        read_image(tmp_path / "x.xyz")
    with pytest.raises(ValueError, match=r"the ending '\.toy' is read by ToyReader already"):
        formats.register(ToyReader())


def test_registry_picks_by_longest_ending_then_sniff(tmp_path: Path) -> None:
    assert formats.image_stem("CT.Nii.Gz") == "CT" and formats.image_stem("a.b.png") == "a.b"
    assert formats.image_stem("notes.txt") == "notes"
    assert isinstance(formats.find_reader(tmp_path / "x.nii.gz"), NiftiReader)
    assert isinstance(formats.find_reader(tmp_path), DicomReader)  # a folder: a DICOM series
    (tmp_path / "IM0001").write_bytes(b"\0" * 128 + b"DICM")
    assert formats.is_series_file(tmp_path / "IM0001") and formats.find_reader(tmp_path / "x.gz") is None
    names = ["a.jpg", "a.npy", "a.png", "a.tif"]
    assert min(names, key=formats.preference) == "a.png"
    assert min(["a.jpg", "a.tif"], key=lambda n: formats.preference(n, mask=True)) == "a.tif"
