"""lsms predict / Predictor: PNG, NIfTI volume (slice range) and DICOM series inputs; output size and geometry."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lsms.cli import main
from lsms.metrics import check_threshold
from lsms.predict import Predictor, parse_slices, threshold_mask
from lsms.serve import ServeError
from lsms.serve.app import _check_threshold

from toy_data import make_untrained_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_untrained_checkpoint(tmp_path_factory.mktemp("model") / "model.pt", in_channels=1)


def _rows(out: Path) -> list[dict]:
    return list(csv.DictReader(open(out / "predictions.csv")))


def test_predict_png_writes_mask_of_input_size(ckpt, tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (50, 70), dtype=np.uint8)).save(tmp_path / "x.png")
    Image.fromarray(rng.integers(0, 255, (33, 41, 3), dtype=np.uint8)).save(tmp_path / "rgb.png")
    out = tmp_path / "out"
    assert main(["predict", str(ckpt), str(tmp_path / "x.png"), str(tmp_path / "rgb.png"), "--text",
                 "a cyst in segment VI", "--out", str(out), "--probability", "--features", "--device", "cpu",
                 "--allow-modality-mismatch"]) == 0  # rgb.png is a photo for a CT model: marked, not refused
    mask = np.array(Image.open(out / "x_mask.png"))
    assert mask.shape == (50, 70) and set(np.unique(mask)) <= {0, 255}
    assert np.array(Image.open(out / "rgb_mask.png")).shape == (33, 41)
    for name in ("x_overlay.png", "x_prob.png", "x_features.png", "rgb_overlay.png"):
        assert (out / name).is_file(), name
    rows = _rows(out)
    assert len(rows) == 2 and rows[0]["text"] == "a cyst in segment VI"
    assert rows[0]["warning"] == "" and rows[1]["warning"].startswith("MEANINGLESS: the model reads CT")
    assert int(rows[0]["area_px"]) == int((mask > 0).sum())


def _nifti(path: Path, vol_zyx: np.ndarray):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(vol_zyx)
    img.SetSpacing((0.7, 0.8, 2.5))
    img.SetOrigin((10.0, -20.0, 30.0))
    img.SetDirection((0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(img, str(path))
    return img


def test_predict_nifti_volume_slice_range_keeps_geometry(ckpt, tmp_path):
    import SimpleITK as sitk

    vol = np.random.default_rng(1).normal(60, 40, (5, 40, 48)).astype(np.int16)  # (z, y, x), HU
    ref = _nifti(tmp_path / "ct.nii.gz", vol)
    out = tmp_path / "out"
    assert main(["predict", str(ckpt), str(tmp_path / "ct.nii.gz"), "--slices", "1:3", "--text", "the lesion",
                 "--out", str(out), "--threshold", "0.3", "--device", "cpu"]) == 0
    back = sitk.ReadImage(str(out / "ct_mask.nii.gz"))
    assert back.GetSize() == ref.GetSize() == (48, 40, 5)
    assert back.GetSpacing() == pytest.approx(ref.GetSpacing())
    assert back.GetOrigin() == pytest.approx(ref.GetOrigin())
    assert back.GetDirection() == pytest.approx(ref.GetDirection())
    arr = sitk.GetArrayFromImage(back)
    rows = _rows(out)
    assert [int(r["slice"]) for r in rows] == [1, 2]
    for r in rows:
        assert arr[int(r["slice"])].sum() == int(r["area_px"])
    assert arr[[0, 3, 4]].sum() == 0  # slices outside the range stay empty
    assert (out / "ct_z0001_overlay.png").is_file()


def test_predict_refuses_a_mask_volume_above_the_voxel_limit(ckpt, tmp_path, monkeypatch):
    vol = np.zeros((5, 40, 48), np.int16)  # 9,600 voxels: the output mask volume has the input's size
    _nifti(tmp_path / "ct.nii.gz", vol)
    monkeypatch.setenv("LSMS_MAX_VOLUME_VOXELS", "1000")
    out = tmp_path / "out"
    assert main(["predict", str(ckpt), str(tmp_path / "ct.nii.gz"), "--slices", "1:2", "--text", "the lesion",
                 "--out", str(out), "--device", "cpu"]) == 1
    (row,) = _rows(out)
    assert row["error"].startswith(str(tmp_path / "ct.nii.gz")) and "max_volume_voxels = 1,000" in row["error"]
    assert not (out / "ct_mask.nii.gz").exists()


def _dicom(path: Path, stored: np.ndarray, z: float):
    from fuzz_inputs import dicom_bytes

    path.write_bytes(dicom_bytes(stored, PatientID="p1", InstanceNumber=int(z) + 1, SliceThickness=2.0,
                                 ImagePositionPatient=[-10.0, -20.0, z]))


def test_predict_dicom_series_writes_nifti_in_series_geometry(ckpt, tmp_path):
    import SimpleITK as sitk

    series = tmp_path / "series"
    series.mkdir()
    rng = np.random.default_rng(2)
    for k in range(3):
        _dicom(series / f"s{k}.dcm", rng.integers(900, 1200, (36, 30)), z=2.0 * k)
    out = tmp_path / "out"
    assert main(["predict", str(ckpt), str(series), "--text", "the lesion", "--out", str(out),
                 "--device", "cpu"]) == 0
    back = sitk.ReadImage(str(out / "series_mask.nii.gz"))
    assert back.GetSize() == (30, 36, 3)
    assert back.GetSpacing() == pytest.approx((0.5, 0.75, 2.0))
    assert back.GetOrigin() == pytest.approx((-10.0, -20.0, 0.0))
    assert len(_rows(out)) == 3


def test_predictor_in_memory_and_pairs_csv(ckpt, tmp_path):
    predictor = Predictor.from_checkpoint(ckpt, device="cpu")
    hu = np.random.default_rng(3).normal(60, 30, (45, 61)).astype(np.float32)
    a = predictor.predict(hu, "the larger cyst", features=True)
    b = predictor.predict(hu, "the larger cyst")
    assert a.mask.shape == a.probability.shape == (45, 61) and a.mask.dtype == bool
    # the same network: with features the full decoder runs, without it the logits-only path (another float order)
    np.testing.assert_allclose(a.probability, b.probability, atol=1e-5)
    np.testing.assert_array_equal(a.mask, b.mask)
    assert len(a.features) == 4 and all(f.shape == (45, 61) for f in a.features)
    with pytest.raises(ValueError, match="image must be"):
        predictor.predict(np.zeros((2, 3, 4, 5)), "x")

    Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / "im.png")
    (tmp_path / "pairs.csv").write_text("image,text\nim.png,the left lesion\nim.png,the right lesion\n")
    out = tmp_path / "out"
    assert main(["predict", str(ckpt), "--pairs", str(tmp_path / "pairs.csv"), "--out", str(out), "--device", "cpu"]) == 0
    assert (out / "im_t0_mask.png").is_file() and (out / "im_t1_mask.png").is_file()
    assert [r["text"] for r in _rows(out)] == ["the left lesion", "the right lesion"]


@pytest.mark.parametrize("bad", [0.0, 1.0, 2.0])
def test_every_threshold_is_checked_alike(ckpt, bad):
    """The predictor, the mask, the backends and the viewer refuse a threshold with the one check's message."""
    with pytest.raises(ValueError) as expected:
        check_threshold(bad)
    for call in (lambda: Predictor(None, threshold=bad), lambda: threshold_mask(np.zeros((2, 2)), bad),
                 lambda: Predictor.from_checkpoint(ckpt, device="cpu", threshold=bad)):
        with pytest.raises(ValueError) as err:
            call()
        assert str(err.value) == str(expected.value)
    with pytest.raises(ServeError) as served:
        _check_threshold(bad)
    assert served.value.status == 400 and str(expected.value) in str(served.value)


def test_predict_errors(ckpt, tmp_path, capsys):
    assert main(["predict", str(ckpt), str(tmp_path / "missing.png"), "--text", "x", "--out", str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    assert main(["predict", str(ckpt), str(tmp_path / "a.png"), "--out", str(tmp_path)]) == 2
    assert "--text" in capsys.readouterr().err
    for flags, message in ((["--slices", "a:b"], "--slices takes N or START:STOP"), (["--threshold", "1"], "--threshold")):
        assert main(["predict", "no-such-model", str(tmp_path / "a.png"), "--text", "x", "--out", str(tmp_path), *flags]) == 2
        assert message in capsys.readouterr().err  # named before the model is looked for
    assert parse_slices("2:4", 5, Path("v")) == [2, 3] and parse_slices("-1", 5, Path("v")) == [4]
    with pytest.raises(ValueError, match="outside the volume"):
        parse_slices("7", 5, Path("v"))


def test_pairs_file_not_utf8_is_named(tmp_path):
    from lsms.predict import expand_inputs

    pairs = tmp_path / "pairs.csv"
    pairs.write_bytes(b"image,text\nimg.png,caf\xe9\n")
    with pytest.raises(ValueError, match=r"--pairs file '.*pairs\.csv' is not UTF-8 text; save the CSV as UTF-8"):
        expand_inputs([], None, str(pairs), None)


def test_repeated_text_asks_each_sentence_of_every_image(ckpt, tmp_path):
    Image.fromarray(np.zeros((40, 48), np.uint8)).save(tmp_path / "x.png")
    out = tmp_path / "out"
    assert main(["predict", str(ckpt), str(tmp_path / "x.png"), "--text", "the left cyst", "--text", "the right cyst",
                 "--out", str(out), "--device", "cpu", "--existence-threshold", "0"]) == 0
    rows = _rows(out)
    assert [r["text"] for r in rows] == ["the left cyst", "the right cyst"]
    assert len({r["mask"] for r in rows}) == 2 and all(Path(r["mask"]).is_file() for r in rows)


def test_an_image_of_another_kind_is_refused_unless_allowed(ckpt, tmp_path, capsys):
    """A CT model (liver window, 1 channel) given an RGB photo or an MR DICOM: lsms predict and the Predictor refuse
    it naming the model's input contract and the input; with the override the result is marked meaningless. A
    model of other images given a CT DICOM alike; a CT DICOM for the CT model passes."""
    from fuzz_inputs import dicom_bytes
    from lsms.data import read_image
    from lsms.predict import InputMismatchError, Predictor

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "frame.jpg")
    stored = rng.integers(900, 1200, (40, 48)).astype(np.uint16)
    (tmp_path / "mr.dcm").write_bytes(dicom_bytes(stored, Modality="MR"))
    (tmp_path / "ct.dcm").write_bytes(dicom_bytes(stored))
    out = tmp_path / "out"
    assert main(["predict", str(ckpt), str(tmp_path / "frame.jpg"), str(tmp_path / "mr.dcm"), str(tmp_path / "ct.dcm"),
                 "--text", "the cyst", "--out", str(out), "--existence-threshold", "0", "--device", "cpu"]) == 1
    rows = {Path(r["input"]).name: r for r in _rows(out)}
    contract = "the model reads CT (modality CT, 1 channel, HU through the liver window W 150 L 30)"
    assert rows["frame.jpg"]["error"].startswith(f"{tmp_path / 'frame.jpg'}: {contract} but this is a colour (RGB) JPEG")
    assert "--allow-modality-mismatch" in rows["frame.jpg"]["error"] and not (out / "frame_mask.png").exists()
    assert f"{contract} but this is a DICOM image of modality MR" in rows["mr.dcm"]["error"]
    assert rows["ct.dcm"]["error"] == "" and rows["ct.dcm"]["warning"] == ""

    allowed = tmp_path / "allowed"
    assert main(["predict", str(ckpt), str(tmp_path / "frame.jpg"), "--text", "the cyst", "--out", str(allowed),
                 "--existence-threshold", "0", "--device", "cpu", "--allow-modality-mismatch"]) == 0
    row = _rows(allowed)[0]
    assert row["error"] == "" and row["warning"].startswith(f"MEANINGLESS: {contract} but this is a colour (RGB)")
    assert "WARNING: 1 prediction(s) of images the model was not trained on" in capsys.readouterr().out

    predictor = Predictor.from_checkpoint(ckpt, "cpu")
    with pytest.raises(InputMismatchError, match=r"frame\.jpg: the model reads CT .* colour \(RGB\) JPEG"):
        predictor.predict(read_image(tmp_path / "frame.jpg"), "the cyst")
    with pytest.raises(InputMismatchError, match=r"colour \(RGB\) image"):  # a raw array: its shape tells
        predictor.predict(np.zeros((40, 48, 3), np.float32), "the cyst")
    assert predictor.predict(read_image(tmp_path / "ct.dcm"), "the cyst").warning is None
    marked = Predictor.from_checkpoint(ckpt, "cpu", allow_modality_mismatch=True)
    assert "modality MR" in marked.predict(read_image(tmp_path / "mr.dcm"), "the cyst").warning

    photo_model = make_untrained_checkpoint(tmp_path / "photo.pt", in_channels=3, ct=False)
    with pytest.raises(InputMismatchError, match=r"reads images other than CT \(3 channels, each scaled by its "
                                                 r"percentiles\) but this is a CT DICOM image"):
        Predictor.from_checkpoint(photo_model, "cpu").predict(read_image(tmp_path / "ct.dcm"), "the cyst")
