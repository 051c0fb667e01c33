"""One 3D answer per sentence (lsms.volumes.assemble), lsms predict on volumes, and the DICOM-SEG it writes."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from lsms.cli import main
from lsms.data.formats.dicom_seg import segment_label, write_dicom_seg
from lsms.data.readers import read_volume
from lsms.predict import Predictor, threshold_mask
from lsms.synth.geometry import max_diameter_mm
from lsms.volumes import assemble, lesion_volume_ml, stated_diameter_mm, voxel_spacing

from toy_data import make_untrained_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_untrained_checkpoint(tmp_path_factory.mktemp("model") / "model.pt", in_channels=1)


def _blobs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Probabilities (8, 16, 16) with two separate blobs: a (slices 1..3) and b (slices 4..6)."""
    prob = np.full((8, 16, 16), 0.05, np.float32)
    a = np.zeros(prob.shape, bool)
    a[1:4, 2:6, 2:6] = True
    b = np.zeros(prob.shape, bool)
    b[4:7, 9:13, 9:13] = True
    return prob, a, b


# --------------------------------------------------------------------------- the assembly rule


def test_the_component_the_probabilities_favour_is_kept_alone():
    prob, a, b = _blobs()
    prob[a], prob[b] = 0.6, 0.9
    existence = np.full(8, 0.8)
    existence[5] = 0.95
    answer = assemble(prob, existence, threshold=0.5, existence_threshold=0.5)
    assert np.array_equal(answer.mask, b)
    assert (answer.present, answer.components, answer.kept) == (True, 2, 1)
    assert answer.score == pytest.approx(0.95)  # the highest existence over the slices b spans


def test_slice_existence_weights_the_choice():
    """A larger blob on slices where the model says the lesion is absent loses to a smaller one where it is there."""
    prob, a, b = _blobs()
    a[1:4, 2:8, 2:8] = True  # 108 voxels against b's 48
    prob[a], prob[b] = 0.9, 0.9
    existence = np.array([0.1, 0.1, 0.1, 0.1, 0.9, 0.9, 0.9, 0.1])
    answer = assemble(prob, existence, 0.5, None)
    assert np.array_equal(answer.mask, b) and answer.score == pytest.approx(0.9)
    answer = assemble(prob, np.full(8, 0.5), 0.5, None)  # equal existence and probability: the first in scan order
    assert np.array_equal(answer.mask, a)


def test_a_large_faint_component_loses_to_a_small_sure_one():
    """The score is the component's best slice, not a sum over its voxels: size and length do not count."""
    prob, a, b = _blobs()
    a[0:4, 2:8, 2:8] = True  # 144 voxels at 0.7 (100.8 summed) against b's 48 at 0.9 (43.2)
    prob[a], prob[b] = 0.7, 0.9
    answer = assemble(prob, np.full(8, 0.8), 0.5, None)
    assert np.array_equal(answer.mask, b) and answer.kept == 1
    prob[b] = 0.65  # now a is the surer one
    assert np.array_equal(assemble(prob, np.full(8, 0.8), 0.5, None).mask, a)


def test_components_touching_diagonally_across_slices_are_one_lesion():
    prob = np.zeros((3, 8, 8), np.float32)
    prob[0, 2, 2] = prob[1, 3, 3] = prob[2, 4, 4] = 0.9  # a corner-to-corner chain through three slices
    answer = assemble(prob, np.ones(3), 0.5, None)
    assert (answer.components, int(answer.mask.sum())) == (1, 3)


def test_below_the_existence_threshold_the_mask_is_withheld():
    prob, a, b = _blobs()
    prob[a], prob[b] = 0.6, 0.9
    answer = assemble(prob, np.full(8, 0.3), 0.5, existence_threshold=0.4)
    assert (answer.present, answer.components, answer.kept, int(answer.mask.sum())) == (False, 2, 0, 0)
    assert answer.score == pytest.approx(0.3)
    assert assemble(prob, np.full(8, 0.3), 0.5, existence_threshold=0.0).present  # 0: never withheld


def test_the_stated_size_picks_the_lesion_of_that_diameter():
    """Two cysts, the 4 mm one marked a little more surely: "the 12 mm cyst" gets the 12 mm one in mode 3d, the
    sure one without the size (3d-no-size, no spacing, no size in the sentence, two sizes in it)."""
    prob = np.full((8, 32, 32), 0.05, np.float32)
    small, large = np.zeros(prob.shape, bool), np.zeros(prob.shape, bool)
    small[3:5, 2:4, 2:4] = True  # 2 x 2 x 2 voxels of 2 mm: 3.5 mm between its farthest centres
    large[1:7, 14:21, 14:21] = True  # 6 x 7 x 7 voxels: (10, 12, 12) mm between the extreme centres, 19.7 mm
    prob[small], prob[large] = 0.9, 0.8
    spacing = (2.0, 2.0, 2.0)
    assert max_diameter_mm(large, spacing) == pytest.approx(19.7) and max_diameter_mm(small, spacing) == pytest.approx(3.5)
    existence = np.full(8, 0.9)
    answer = assemble(prob, existence, 0.5, None, "3d", "The 20 mm cyst in segment VI.", spacing)
    assert np.array_equal(answer.mask, large) and answer.components == 2
    assert np.array_equal(assemble(prob, existence, 0.5, None, "3d", "A 2.0 cm cyst.", spacing).mask, large)
    for mode, text, at in [("3d-no-size", "The 20 mm cyst.", spacing), ("3d", "The 20 mm cyst.", None),
                           ("3d", "The larger cyst.", spacing), ("3d", "A 4 mm cyst, not the 20 mm one.", spacing)]:
        assert np.array_equal(assemble(prob, existence, 0.5, None, mode, text, at).mask, small), (mode, text, at)
    # a size far from both: the nearer one wins (ln(70 / 19.7) = 1.3 against ln(70 / 3.5) = 3.0)
    assert np.array_equal(assemble(prob, existence, 0.5, None, "3d", "a 7 cm cyst", spacing).mask, large)
    with pytest.raises(ValueError, match="spacing must be three positive mm values"):
        assemble(prob, existence, 0.5, None, "3d", "a 7 cm cyst", (2.0, 0.0, 2.0))


def test_the_largest_diameter_of_flat_and_thin_masks():
    """One slice thick (the convex hull in its plane), one voxel wide, one voxel: the distances between voxel
    centres, without building a distance matrix of every voxel."""
    flat = np.zeros((3, 400, 400), bool)
    flat[1, 10:390, 20:380] = True  # 144,400 voxels on one slice
    assert max_diameter_mm(flat, (5.0, 0.5, 0.5)) == pytest.approx(round(0.5 * np.hypot(379, 359), 1))
    line = np.zeros((4, 4, 300), bool)
    line[2, 1, :] = True
    assert max_diameter_mm(line, (2.0, 1.0, 0.7)) == pytest.approx(round(0.7 * 299, 1))
    assert max_diameter_mm(np.ones((1, 1, 1), bool), (1.0, 1.0, 1.0)) == 0.0
    assert max_diameter_mm(np.zeros((2, 3, 4), bool), (1.0, 1.0, 1.0)) == 0.0


@pytest.mark.parametrize("text, mm", [("a cyst of 27 mm in segment VI", 27.0), ("2.7 cm lesion", 27.0),
                                      ("a 27x18 mm mass", 27.0), ("27 \u00d7 18 \u00d7 9 mm", 27.0),
                                      ("12 millimetres across", 12.0), ("a 12-mm nodule", 12.0),
                                      ("Segment 7 cyst, 1.5cm.", 15.0), ("12 mm; 12 mm on the prior", 12.0),
                                      ("the larger cyst", None), ("a 12 mm cyst beside a 30 mm one", None),
                                      ("0 mm", None), ("segment 7, 3 cmm", None)])
def test_the_size_a_sentence_states(text, mm):
    assert stated_diameter_mm(text) == mm


def test_the_answer_reports_its_largest_diameter():
    prob, a, b = _blobs()
    prob[b] = 0.9
    answer = assemble(prob, np.ones(8), 0.5, None)
    summary = answer.summary(spacing=(1.0, 1.0, 3.0))  # x, y, z: b spans 4 x 4 pixels and 3 slices
    assert summary["diameter_mm"] == pytest.approx(float(np.sqrt(3 * 3 + 3 * 3 + 6 * 6)), abs=0.05)
    assert voxel_spacing((1.0, 2.0, 3.0)) == (3.0, 2.0, 1.0) and voxel_spacing((1.0, 2.0)) is None
    assert answer.summary()["diameter_mm"] is None


def test_empty_volume_is_not_present():
    existence = np.linspace(0.1, 0.4, 5)
    for mode in ("3d", "3d-no-size", "slices"):
        answer = assemble(np.full((5, 6, 7), 0.2, np.float32), existence, 0.5, 0.5, mode=mode)
        assert (answer.present, answer.components, answer.kept, answer.mask.shape) == (False, 0, 0, (5, 6, 7))
        assert not answer.mask.any() and answer.score == pytest.approx(0.4)


def test_slices_mode_is_per_slice_thresholding_with_each_slices_existence():
    rng = np.random.default_rng(0)
    prob = rng.random((6, 12, 10)).astype(np.float32)
    existence = rng.random(6)
    answer = assemble(prob, existence, 0.4, 0.5, mode="slices")
    expected = np.stack([threshold_mask(p, 0.4) & (e >= 0.5) for p, e in zip(prob, existence)])
    assert np.array_equal(answer.mask, expected)
    assert answer.present and answer.score == pytest.approx(existence.max())
    assert answer.components == answer.kept == ndimage.label(expected, np.ones((3, 3, 3)))[1]
    assert np.array_equal(assemble(prob, existence, 0.4, None, "slices").mask, prob > 0.4)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="volume mode must be one of 3d, 3d-no-size, slices"):
        assemble(np.zeros((2, 3, 3)), np.zeros(2), mode="2d")
    with pytest.raises(ValueError, match=r"probability must be \(Z, H, W\) and existence \(Z,\)"):
        assemble(np.zeros((2, 3, 3)), np.zeros(3))
    with pytest.raises(ValueError, match="threshold"):
        assemble(np.zeros((2, 3, 3)), np.zeros(2), threshold=1.0)
    assert lesion_volume_ml(1000, (0.5, 0.5, 4.0)) == pytest.approx(1.0) and lesion_volume_ml(5, (1.0, 1.0)) is None


# --------------------------------------------------------------------------- DICOM-SEG


def write_series(folder: Path, hu: np.ndarray, thickness: float = 2.5) -> tuple[str, str, list[str]]:
    """A CT series of (Z, H, W) HU slices, z increasing with k, files named in reverse order; returns its series UID,
    frame of reference UID and SOP instance UIDs (slice order)."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    series_uid, frame_uid, study_uid = generate_uid(), generate_uid(), generate_uid()
    uids = []
    for k, hu_slice in enumerate(hu):
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "p1", "Synthetic^Patient", "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", ""
        ds.ReferringPhysicianName, ds.Manufacturer = "", "synthetic"
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 3, k + 1
        ds.Rows, ds.Columns = hu_slice.shape
        ds.PixelSpacing, ds.SliceThickness = [0.8, 0.7], thickness
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-100.0, -120.0, 30.0 + thickness * k]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit, ds.PixelRepresentation = 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1.0, -1024.0
        ds.PixelData = (np.asarray(hu_slice) + 1024).astype(np.uint16).tobytes()
        ds.save_as(folder / f"img{len(hu) - k:03d}.dcm", enforce_file_format=True)
        uids.append(ds.SOPInstanceUID)
    return series_uid, frame_uid, uids


def test_dicom_seg_references_the_series_and_maps_back_onto_its_frames(tmp_path):
    import highdicom as hd
    import pydicom

    series_uid, frame_uid, uids = write_series(tmp_path / "series", np.zeros((5, 20, 24)))
    mask = np.zeros((5, 20, 24), bool)
    mask[1, 2:6, 3:9] = True
    mask[3, 10:12, 4:5] = True
    text = "the larger of the two hypodense cysts in segment VI, next to the right hepatic vein, café"
    path = write_dicom_seg(mask, tmp_path / "series", tmp_path / "out" / "seg.dcm", text, "0.1.0")

    ds = pydicom.dcmread(path)
    assert ds.Modality == "SEG" and ds.SegmentationType == "BINARY" and ds.FrameOfReferenceUID == frame_uid
    (ref,) = ds.ReferencedSeriesSequence
    assert ref.SeriesInstanceUID == series_uid
    assert {r.ReferencedSOPInstanceUID for r in ref.ReferencedInstanceSequence} == set(uids)
    (segment,) = ds.SegmentSequence
    assert segment.SegmentDescription == text and len(segment.SegmentLabel) <= 64
    assert segment.SegmentLabel == "the larger of the two hypodense cysts in segment VI, next to..."
    assert segment.SegmentAlgorithmType == "AUTOMATIC" and segment.SegmentAlgorithmName == "lsms"
    assert segment.SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion == "0.1.0"
    frames = {f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID: ds.pixel_array[i]
              for i, f in enumerate(ds.PerFrameFunctionalGroupsSequence)}
    assert set(frames) == {uids[1], uids[3]}  # empty frames are left out
    for k in (1, 3):
        assert np.array_equal(frames[uids[k]].astype(bool), mask[k])

    seg = hd.seg.segread(path)
    back = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1])  # (Z, H, W, 1)
    assert np.array_equal(back[..., 0].astype(bool), mask)
    write_dicom_seg(mask, tmp_path / "series", tmp_path / "again.dcm", text, "0.1.0")
    assert pydicom.dcmread(tmp_path / "again.dcm").SOPInstanceUID == ds.SOPInstanceUID  # deterministic UIDs
    with pytest.raises(ValueError, match=r"the mask is \(4, 20, 24\) but the series .* is \(5, 20, 24\)"):
        write_dicom_seg(mask[:4], tmp_path / "series", tmp_path / "bad.dcm", text, "0.1.0")


def test_dicom_seg_of_a_series_highdicom_cannot_derive_from_is_refused_by_name(tmp_path):
    from fuzz_inputs import dicom_bytes

    (tmp_path / "bare").mkdir()
    for k in range(2):  # no FrameOfReferenceUID, no patient or study module
        (tmp_path / "bare" / f"s{k}.dcm").write_bytes(dicom_bytes(np.zeros((8, 8)), ImagePositionPatient=[0.0, 0.0, k]))
    with pytest.raises(ValueError, match=r"bare: the series has no FrameOfReferenceUID.*--format nifti"):
        write_dicom_seg(np.zeros((2, 8, 8), bool), tmp_path / "bare", tmp_path / "seg.dcm", "x", "0.1.0")
    for k in range(2):
        (tmp_path / "bare" / f"s{k}.dcm").write_bytes(dicom_bytes(
            np.zeros((8, 8)), ImagePositionPatient=[0.0, 0.0, k], FrameOfReferenceUID="1.2.3.9"))
    with pytest.raises(ValueError, match=r"bare: cannot make a DICOM Segmentation of this series \(.*--format nifti"):
        write_dicom_seg(np.zeros((2, 8, 8), bool), tmp_path / "bare", tmp_path / "seg.dcm", "x", "0.1.0")
    assert not list(tmp_path.glob("*seg.dcm*"))


def test_segment_label_fits_lo():
    assert segment_label("  the   cyst\\left ") == "the cyst/left"
    assert segment_label("") == "lesion"
    long = "word " * 30
    assert len(segment_label(long)) <= 64 and segment_label(long).endswith("word...")


# --------------------------------------------------------------------------- lsms predict on volumes


def _csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _nifti(path: Path) -> None:
    import SimpleITK as sitk

    vol = np.random.default_rng(1).normal(60, 40, (6, 40, 48)).astype(np.int16)  # (z, y, x) HU
    img = sitk.GetImageFromArray(vol)
    img.SetSpacing((0.7, 0.8, 2.5))
    img.SetOrigin((10.0, -20.0, 30.0))
    img.SetDirection((0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(img, str(path))


def test_predict_nifti_one_3d_answer_per_sentence_in_the_input_geometry(ckpt, tmp_path):
    import SimpleITK as sitk

    _nifti(tmp_path / "ct.nii.gz")
    out = tmp_path / "out"
    assert main(["predict", str(ckpt), str(tmp_path / "ct.nii.gz"), "--slices", "1:5", "--text", "the lesion",
                 "--out", str(out), "--threshold", "0.45", "--batch-size", "3", "--device", "cpu"]) == 0
    ref, back = sitk.ReadImage(str(tmp_path / "ct.nii.gz")), sitk.ReadImage(str(out / "ct_mask.nii.gz"))
    assert back.GetSize() == ref.GetSize() and back.GetSpacing() == pytest.approx(ref.GetSpacing())
    assert back.GetOrigin() == pytest.approx(ref.GetOrigin())
    assert back.GetDirection() == pytest.approx(ref.GetDirection())
    mask = sitk.GetArrayFromImage(back).astype(bool)

    predictor = Predictor.from_checkpoint(ckpt, device="cpu", threshold=0.45)
    ((prob, existence),) = predictor.predict_volume(read_volume(tmp_path / "ct.nii.gz"), [1, 2, 3, 4], ["the lesion"], 3)
    expected = assemble(prob, existence, 0.45, predictor.existence_threshold)
    assert np.array_equal(mask[1:5], expected.mask) and not mask[[0, 5]].any()
    assert ndimage.label(mask, np.ones((3, 3, 3)))[1] == int(expected.present)
    (row,) = _csv(out / "volumes.csv")
    assert row["slices"] == "1:5" and row["mode"] == "3d" and row["present"] == str(expected.present)
    assert int(row["voxels"]) == int(mask.sum()) and int(row["components"]) == expected.components
    assert float(row["volume_ml"]) == pytest.approx(mask.sum() * 0.7 * 0.8 * 2.5 / 1000, abs=1e-3)
    assert mask.any() and float(row["diameter_mm"]) == max_diameter_mm(mask, (2.5, 0.8, 0.7))  # z, y, x
    slices = _csv(out / "predictions.csv")
    assert [int(r["slice"]) for r in slices] == [1, 2, 3, 4]
    assert [int(r["area_px"]) for r in slices] == [int(m.sum()) for m in mask[1:5]]


def test_a_2_5d_model_reads_each_slice_between_its_neighbours(tmp_path, monkeypatch):
    """``context_slices=1``: the network gets slices (k-1, k, k+1) as its channels, each as a 2D model would see
    that slice, the end slice repeated past either end of the volume; a 2D image is refused, naming what to give."""
    import dataclasses

    import torch

    from lsms.data import preprocess_image

    predictor = Predictor.from_checkpoint(make_untrained_checkpoint(tmp_path / "m.pt", in_channels=3, context_slices=1),
                                          device="cpu")
    seen = []
    answer = predictor.backend.answer
    monkeypatch.setattr(predictor.backend, "answer", lambda x, *a: seen.append(x) or answer(x, *a))
    _nifti(tmp_path / "ct.nii.gz")
    volume = read_volume(tmp_path / "ct.nii.gz")
    predictor.predict_volume(volume, list(range(6)), ["the lesion"], batch_size=4)
    x = torch.cat(seen)  # (6, 3, 64, 64)
    flat = dataclasses.replace(predictor.preprocessing, in_channels=1, context_slices=0)
    alone = [preprocess_image(volume.slice(k).array, flat)[0] for k in range(6)]
    for k in range(6):
        for channel, j in enumerate((max(k - 1, 0), k, min(k + 1, 5))):
            assert torch.allclose(x[k, channel], alone[j], atol=1e-6)
    with pytest.raises(ValueError, match="2.5D.*give it a volume"):
        predictor.predict(volume.slice(2), "the lesion")


def test_predict_slices_mode_is_slice_by_slice_prediction(ckpt, tmp_path):
    import SimpleITK as sitk

    _nifti(tmp_path / "ct.nii.gz")
    out = tmp_path / "out"
    assert main(["predict", str(ckpt), str(tmp_path / "ct.nii.gz"), "--text", "the lesion", "--out", str(out),
                 "--volume-mode", "slices", "--batch-size", "1", "--threshold", "0.45", "--device", "cpu"]) == 0
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "ct_mask.nii.gz"))).astype(bool)
    predictor = Predictor.from_checkpoint(ckpt, device="cpu", threshold=0.45)
    volume = read_volume(tmp_path / "ct.nii.gz")
    expected = np.stack([predictor.predict(volume.slice(k), "the lesion").mask for k in range(6)])
    assert np.array_equal(mask, expected)
    (row,) = _csv(out / "volumes.csv")
    assert row["mode"] == "slices" and int(row["voxels"]) == int(expected.sum())


def test_predict_dicom_series_writes_a_dicom_seg_and_refuses_it_for_nifti(ckpt, tmp_path, capsys):
    import highdicom as hd

    rng = np.random.default_rng(2)
    series_uid, frame_uid, uids = write_series(tmp_path / "series", rng.normal(60, 40, (4, 36, 30)))
    out = tmp_path / "out"
    assert main(["predict", str(ckpt), str(tmp_path / "series"), "--text", "the lesion", "--text", "the other one",
                 "--format", "dicom-seg", "--format", "nifti", "--existence-threshold", "0", "--threshold", "0.45",
                 "--out", str(out), "--device", "cpu"]) == 0
    rows = _csv(out / "volumes.csv")
    assert [(r["text"], Path(r["seg"]).name) for r in rows] == [("the lesion", "series_t0_seg.dcm"),
                                                                ("the other one", "series_t1_seg.dcm")]
    import SimpleITK as sitk

    for row in rows:
        seg = hd.seg.segread(row["seg"])
        assert seg.FrameOfReferenceUID == frame_uid and seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
        assert seg.SegmentSequence[0].SegmentDescription == row["text"]
        nifti = sitk.GetArrayFromImage(sitk.ReadImage(row["mask"])).astype(bool)  # (z, y, x), z along the normal
        back = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1],
                                                 skip_overlap_checks=True)[..., 0].astype(bool)
        assert np.array_equal(back, nifti) and int(row["voxels"]) == int(nifti.sum())

    nifti_input = tmp_path / "ct.nii.gz"
    _nifti(nifti_input)
    assert main(["predict", str(ckpt), str(nifti_input), "--text", "x", "--format", "dicom-seg", "--out",
                 str(tmp_path / "o2"), "--device", "cpu"]) == 2
    assert "--format dicom-seg needs a DICOM series folder" in capsys.readouterr().err
    assert main(["predict", str(ckpt), str(nifti_input), "--text", "x", "--batch-size", "0", "--out",
                 str(tmp_path / "o3")]) == 2
    assert "--batch-size must be at least 1" in capsys.readouterr().err


def test_a_batch_above_the_memory_limit_is_refused_naming_batch_size(ckpt, tmp_path, monkeypatch, capsys):
    from lsms.checkpoint import load_checkpoint, spec_of
    from lsms.model import activation_bytes

    _nifti(tmp_path / "ct.nii.gz")  # 6 slices
    spec = spec_of(load_checkpoint(ckpt))
    one = activation_bytes(spec.model, *spec.image_size, 1)
    monkeypatch.setenv("LSMS_MAX_TENSOR_BYTES", str(2 * one))
    args = ["predict", str(ckpt), str(tmp_path / "ct.nii.gz"), "--text", "x", "--device", "cpu"]
    assert main([*args, "--batch-size", "4", "--out", str(tmp_path / "o1")]) == 2
    assert "--batch-size 4: the estimated memory" in capsys.readouterr().err
    assert main([*args, "--batch-size", "1", "--out", str(tmp_path / "o2")]) == 0

    from lsms.serve import ServeError, Viewer

    viewer = Viewer(Predictor.from_checkpoint(ckpt, "cpu"), root=tmp_path / "sessions")
    (tmp_path / "sessions").mkdir()
    try:
        sid = viewer.new_session()["sid"]
        viewer.open_upload(sid, [("ct.nii.gz", (tmp_path / "ct.nii.gz").read_bytes())])
        with pytest.raises(ServeError, match="Whole volume: the estimated memory") as err:
            viewer.start_volume(sid, ["x"], 0.5)
        assert err.value.status == 413 and viewer.volume_progress(sid) == {"state": "none"}
    finally:
        viewer.close()


# --------------------------------------------------------------------------- lsms serve: the 3D answer, NIfTI and SEG


def test_viewer_offers_the_3d_answer_as_nifti_and_dicom_seg_equal_to_lsms_predict(ckpt, tmp_path):
    import threading
    import urllib.request
    from urllib.parse import urlencode

    import highdicom as hd
    import SimpleITK as sitk

    from lsms.serve import ServeError, Viewer, ViewerServer

    rng = np.random.default_rng(3)
    series_uid, _, uids = write_series(tmp_path / "series", rng.normal(60, 40, (10, 36, 30)))  # 2 batches of 8
    text, threshold = "the lesion", 0.45
    cli = tmp_path / "cli"
    assert main(["predict", str(ckpt), str(tmp_path / "series"), "--text", text, "--threshold", str(threshold),
                 "--format", "nifti", "--format", "dicom-seg", "--out", str(cli), "--device", "cpu"]) == 0
    (row,) = _csv(cli / "volumes.csv")

    viewer = Viewer(Predictor.from_checkpoint(ckpt, "cpu"), root=tmp_path / "sessions")
    (tmp_path / "sessions").mkdir()
    srv = ViewerServer(viewer, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        sid = viewer.new_session()["sid"]
        files = [(f"series/{p.name}", p.read_bytes()) for p in sorted((tmp_path / "series").iterdir())]
        assert viewer.open_upload(sid, files)["dicom_seg"] is True
        with pytest.raises(ServeError, match="run Whole volume with this sentence first") as err:
            viewer.mask_dicom_seg(sid, text, threshold)
        assert err.value.status == 409
        viewer.start_volume(sid, [text], threshold)
        for _ in range(600):
            progress = viewer.volume_progress(sid)
            if progress["state"] != "running":
                break
            threading.Event().wait(0.05)
        assert progress["state"] == "finished" and progress["done"] == progress["total"] == 10
        (answer,) = progress["answers"]
        assert {k: str(v) for k, v in answer.items() if k in ("present", "voxels", "components", "kept")} == \
            {k: row[k] for k in ("present", "voxels", "components", "kept")}
        shown = viewer.predict(sid, 4, [text], threshold)["results"][0]
        assert shown["volume"]["voxels"] == int(row["voxels"])

        served = tmp_path / "served.nii.gz"
        served.write_bytes(viewer.mask_nifti(sid, text, threshold))
        nifti = sitk.GetArrayFromImage(sitk.ReadImage(str(cli / "series_mask.nii.gz")))
        assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(served))), nifti)
        assert shown["area_px"] == int(nifti[4].sum())

        query = urlencode({"sid": sid, "text": text, "threshold": threshold, "name": "series_seg.dcm"})
        with urllib.request.urlopen(f"{srv.url}api/mask.seg.dcm?{query}", timeout=60) as r:
            assert r.status == 200 and r.headers["Content-Type"] == "application/dicom"
            (tmp_path / "served.dcm").write_bytes(r.read())
        seg = hd.seg.segread(tmp_path / "served.dcm")
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
        back = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1])[..., 0]
        assert np.array_equal(back.astype(bool), nifti.astype(bool))
        assert hd.seg.segread(row["seg"]).SOPInstanceUID == seg.SOPInstanceUID  # the same object (UIDs from content)

        _nifti(tmp_path / "ct.nii.gz")
        viewer.open_upload(sid, [("ct.nii.gz", (tmp_path / "ct.nii.gz").read_bytes())])
        with pytest.raises(ServeError, match="is not a DICOM series") as err:
            viewer.mask_dicom_seg(sid, text, threshold)
        assert err.value.status == 400
    finally:
        srv.shutdown()
        srv.server_close()


# --------------------------------------------------------------------------- lsms evaluate --volumes


@pytest.fixture(scope="module")
def volume_data(tmp_path_factory) -> Path:
    from lsms.synth import SynthConfig, VolumeConfig, generate_volume_dataset

    data = tmp_path_factory.mktemp("volume_data")
    generate_volume_dataset(SynthConfig(seed=3, patients=3, image_size=64, variants=1, multi_lesion_share=1.0),
                            VolumeConfig(slices=12, slice_mm=10.0), data, progress=False)
    return data


def _volume_records(data: Path) -> list:
    from lsms.data.manifest import load_manifest

    return [r for r in load_manifest(data / "volumes.jsonl") if r.split == "test"]


def test_evaluate_volumes_scores_a_perfect_answer_one_in_both_modes(ckpt, volume_data, monkeypatch):
    """An oracle for the model (each sentence's probabilities = its target volume, existence 1 on its slices and
    0.2 elsewhere): 3D Dice 1, referring accuracy 1, every negative empty and ranked below every positive, in every
    assembly mode; the instance map lines up with the slices the model sees."""
    from lsms.evaluate import evaluate_volumes

    records = _volume_records(volume_data)
    targets = {r.text: np.stack([read_volume(r.mask_path).slice(k).array > 0 for k in range(12)]) for r in records}

    def oracle(self, volume, slices, texts, batch_size=8, progress=None):
        assert slices == list(range(volume.depth))
        return [(targets[t].astype(np.float32), np.where(targets[t].any(axis=(1, 2)), 1.0, 0.2)) for t in texts]

    monkeypatch.setattr(Predictor, "predict_volume", oracle)
    result = evaluate_volumes(ckpt, volume_data, split="test")
    negatives = sum(r.target_instance == 0 for r in records)
    assert 0 < negatives < len(records)
    for mode in ("3d", "3d-no-size", "slices"):
        s = result["summary"][mode]
        assert s["n_images"] == len(records) and len(result["records"][mode]) == len(records)
        assert s["Dice"] == 1.0 and s["referring_accuracy_multi"] == 1.0
        assert s["existence_AUROC"] == 1.0 and s["n_negative"] == negatives
        by_size = [k for k in s if k.startswith("n_positive_of_size_")]  # every positive in one size band
        assert by_size and sum(s[k] for k in by_size) == len(records) - negatives
        assert all(s[k.replace("n_positive", "Dice_positive")] == 1.0 for k in by_size)


def test_evaluate_volumes_cli_writes_every_mode_and_repeats_itself(ckpt, volume_data, tmp_path, capsys):
    """The command end to end with a real (untrained) model: one per-volume CSV per mode, one row per volume
    sentence, a summary with every mode; the same numbers twice."""
    import json

    summaries = []
    for k in range(2):
        out = tmp_path / f"eval{k}"
        assert main(["evaluate", str(ckpt), str(volume_data), "--split", "test", "--volumes", "--out", str(out),
                     "--device", "cpu"]) == 0
        summaries.append(json.loads((out / "summary.json").read_text())["volumes"])
        for mode in ("3d", "3d-no-size", "slices"):
            assert len(_csv(out / f"per_volume_{mode}.csv")) == len(_volume_records(volume_data))
    assert set(summaries[0]) == {"3d", "3d-no-size", "slices"} and summaries[0] == summaries[1]
    assert "assembled in 3D" in capsys.readouterr().out
    assert main(["evaluate", str(ckpt), str(tmp_path), "--volumes", "--out", str(tmp_path / "x")]) == 2
    assert "volumes.jsonl does not exist" in capsys.readouterr().err


def test_train_2_5d_on_the_slices_of_volumes_then_evaluate_the_volumes(volume_data, tmp_path, capsys):
    """``lsms train --context-slices 1`` on a volume set's 2D slices: the checkpoint's spec reads 3 neighbouring
    slices, its settings give the choice back, and ``lsms evaluate --volumes`` predicts through it."""
    import json

    import yaml

    from lsms.checkpoint import load_checkpoint, run_config, spec_of

    from toy_data import tiny_train_settings

    assert main(["train", str(volume_data), "--context-slices", "1", "--in-channels", "1"]) == 2
    assert "context_slices=1 gives 3 input channels" in capsys.readouterr().err
    run = tmp_path / "run"
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(tiny_train_settings(volume_data, run, optim={"epochs": 1})))
    assert main(["train", str(volume_data), "--config", str(tmp_path / "s.yaml"), "--context-slices", "1"]) == 0
    checkpoint = load_checkpoint(run / "last.pt")
    prep = spec_of(checkpoint).preprocessing
    assert (prep.context_slices, prep.in_channels, spec_of(checkpoint).in_channels) == (1, 3, 3)
    assert run_config(checkpoint).data.context_slices == 1
    assert main(["evaluate", str(run), str(volume_data), "--split", "test", "--volumes", "--out", str(tmp_path / "e"),
                 "--device", "cpu"]) == 0
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())["volumes"]
    assert summary["3d"]["n_images"] == len(_volume_records(volume_data))
