"""RefLiver-Synth volumes: 3 patients x 16 slices of 64 px (10 mm apart), re-derived from the written files."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image

from lsms.synth import SynthConfig, VolumeConfig, generate_volume_dataset, load_phrasing, render_volume
from lsms.synth.anatomy import SEGMENTS
from lsms.synth.expressions import LesionFacts, confusable, true_relations
from lsms.synth.generate import facts_of, negative_mode, split_of_patients
from lsms.synth.lesions import section_mask
from lsms.synth.negatives import Negative, describes_nothing

SMALL = dict(patients=3, image_size=64, variants=1)
VCFG = VolumeConfig(slices=16, slice_mm=10.0, dicom=True)
SEG_RE = re.compile(r"segment (IVa|IVb|VIII|VII|VI|V|III|II|I|4a|4b|[1-8])\b")
ARABIC = {"1": "I", "2": "II", "3": "III", "4a": "IVa", "4b": "IVb", "5": "V", "6": "VI", "7": "VII", "8": "VIII"}
SIZE_RE = re.compile(r"(\d+(?:\.\d+)?) (mm|cm)\b")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _nifti(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj).transpose(2, 1, 0)  # (col, row, slice) -> (Z, H, W)


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        d = tmp_path_factory.mktemp(f"volumes_{name}")
        generate_volume_dataset(SynthConfig(seed=seed, **SMALL), VCFG, d, progress=False)
        out[name] = d
    return out


@pytest.fixture(scope="module")
def volumes(sets: dict[str, Path]) -> dict[str, object]:
    """Set "a"'s volumes re-rendered (liver, segment map, organs, lesion bodies), by volume id."""
    cfg = SynthConfig(seed=1, **SMALL)
    splits = split_of_patients(cfg)
    vs = [render_volume(cfg, VCFG, i, load_phrasing(), [], negative_mode(cfg, splits[i])) for i in range(cfg.patients)]
    return {v.volume_id: v for v in vs}


def test_same_seed_byte_identical_other_seed_differs(sets: dict[str, Path]) -> None:
    a, b, c = _files(sets["a"]), _files(sets["b"]), _files(sets["c"])
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []
    assert any(k.startswith("dicom/") for k in a) and any(k.endswith(".nii.gz") for k in a)
    assert a["volumes.jsonl"] != c["volumes.jsonl"] and a["volumes/p0000.nii.gz"] != c["volumes/p0000.nii.gz"]


def test_manifests_load_and_name_their_files(sets: dict[str, Path]) -> None:
    from lsms.data import load_manifest, load_samples

    root = sets["a"]
    vol = load_manifest(root / "volumes.jsonl")
    flat = load_samples(root)  # the 2D set: what `lsms train OUT` reads (volumes.jsonl is not picked up)
    assert vol and flat and all(r.image.endswith(".npy") for r in flat)
    assert len(flat) == len(_jsonl(root / "manifest.jsonl"))
    for r in _jsonl(root / "volumes.jsonl"):
        for key in ("image", "mask", "instances", "all_mask", "dicom"):
            assert (root / r[key]).exists(), (r["id"], key)
        assert r["spacing"] == [350 / 64] * 2 and r["slice_mm"] == 10.0 and r["depth"] == 16
    assert sum("negative" in r for r in _jsonl(root / "volumes.jsonl")) > 0


def test_slices_are_the_volumes_slices(sets: dict[str, Path]) -> None:
    root = sets["a"]
    vols = {}
    for r in _jsonl(root / "manifest.jsonl"):
        v = r["volume"]
        if v not in vols:
            vols[v] = (_nifti(root / f"volumes/{v}.nii.gz"), _nifti(root / f"volumes/{v}_instances.nii.gz"))
        image, inst = vols[v]
        k = r["volume_slice"]
        assert r["volume_image"] == f"volumes/{v}.nii.gz"  # where a 2.5D model reads the neighbouring slices
        assert np.array_equal(np.load(root / r["image"]), image[k])
        assert np.array_equal(np.asarray(Image.open(root / r["instances"])), inst[k])
        mask = np.asarray(Image.open(root / r["mask"])) > 0
        assert np.array_equal(mask, inst[k] == r["target_instance"] if r["target_instance"] else np.zeros_like(mask))
    assert len(vols) == 3


def test_a_2_5d_item_is_its_slice_between_the_volumes_neighbouring_slices(sets: dict[str, Path]) -> None:
    """``context_slices=1``: channels (k-1, k, k+1) of the slice's volume, each as the 2D model would see that
    slice (the end slice repeated past either end); a record naming no volume is refused with what to give."""
    import dataclasses

    import torch

    from lsms.data import SegmentationDataset, default_preprocessing, load_samples, preprocess_image
    from lsms.data.dataset import SampleError

    root = sets["a"]
    records = load_samples(root, split="train")
    flat = default_preprocessing("CT", 64, in_channels=1)
    slices, items = SegmentationDataset(records, flat), SegmentationDataset(
        records, dataclasses.replace(flat, in_channels=3, context_slices=1))
    volumes: dict[str, np.ndarray] = {}
    for i, r in enumerate(records):
        vol = volumes.setdefault(r.volume_image, _nifti(root / r.volume_image))
        x, k = items[i]["image"], r.volume_slice
        assert x.shape == (3, 64, 64) and torch.equal(x[1], slices[i]["image"][0])
        for channel, j in ((0, max(k - 1, 0)), (2, min(k + 1, len(vol) - 1))):
            assert torch.allclose(x[channel], preprocess_image(vol[j], flat)[0], atol=1e-6)
    bare = dataclasses.replace(records[0], volume_image=None, volume_slice=None)
    with pytest.raises(SampleError, match=r"reads 3 neighbouring slices of a volume .* names no volume; give"):
        SegmentationDataset([bare], items.preprocessing)[0]


def test_masks_are_their_instance_inside_liver_disjoint_bodies(sets: dict[str, Path], volumes: dict) -> None:
    root = sets["a"]
    for r in _jsonl(root / "volumes.jsonl"):
        v = volumes[r["volume_id"]]
        inst = _nifti(root / r["instances"])
        assert np.array_equal(inst, v.instances)
        mask = _nifti(root / r["mask"]) > 0
        k = r["target_instance"]
        assert np.array_equal(mask, inst == k) if k else not mask.any()
        assert np.array_equal(_nifti(root / r["all_mask"]) > 0, inst > 0)
        if k:
            zs = np.flatnonzero(mask.any(axis=(1, 2)))
            assert r["attributes"]["z_extent"] == [zs[0], zs[-1]] and len(zs) >= 2  # a body over several slices
    grid_size = SMALL["image_size"]
    for v in volumes.values():
        assert not (v.instances > 0)[~v.liver].any()  # inside the liver
        bodies = []
        for les in v.lesions:  # each body on its own, from its geometry: none overlaps another
            body = np.zeros(v.instances.shape, dtype=bool)
            for z in range(VCFG.slices):
                sec = les.section(z * VCFG.slice_mm)
                if sec is not None:
                    from lsms.synth.geometry import Grid

                    win, m = section_mask(sec, Grid(grid_size, 350 / grid_size))
                    body[z][win] |= m
            bodies.append(body)
        assert (np.sum(bodies, axis=0) <= 1).all() if bodies else True
        for label, body in enumerate(bodies, start=1):
            assert np.array_equal(body, v.instances == label)


def _brute_diameter(mask: np.ndarray, spacing: tuple[float, ...]) -> float:
    pts = np.argwhere(mask) * np.asarray(spacing)
    return float(np.sqrt(((pts[:, None] - pts[None]) ** 2).sum(-1).max()))


def _brute_distance(a: np.ndarray, b: np.ndarray, spacing: tuple[float, ...]) -> float:
    if not b.any():
        return float("inf")
    pa, pb = np.argwhere(a) * np.asarray(spacing), np.argwhere(b) * np.asarray(spacing)
    return float(np.sqrt(((pa[:, None] - pb[None]) ** 2).sum(-1).min()))


def _refacts(inst: np.ndarray, segments: np.ndarray, gb: np.ndarray, ivc: np.ndarray, spacing: tuple[float, ...],
             kinds: dict[int, str], looks: dict[int, dict]) -> list[LesionFacts]:
    """Facts re-measured from an instance map (2D or 3D) and the re-rendered anatomy, by brute force."""
    out = []
    for k in sorted(int(x) for x in np.unique(inst) if x):
        m = inst == k
        c = np.argwhere(m).mean(0)
        seg = SEGMENTS[int(segments[tuple(int(round(x)) for x in c)]) - 1]
        d = _brute_diameter(m, spacing) if m.ndim == 3 else 2 * np.sqrt(m.sum() * spacing[0] ** 2 / np.pi)
        far = 25.0 if m.ndim == 3 else float("inf")  # volumes report organ distances beyond 25 mm as inf
        dist = [x if x <= far else float("inf") for x in (_brute_distance(m, gb, spacing), _brute_distance(m, ivc, spacing))]
        lk = looks.get(k, {"shape": "", "boundary": "", "density": "", "enhancement": ""})
        out.append(LesionFacts(index=k, kind=kinds[k], segment=seg, lobe="", diameter_mm=round(d, 1),
                               area_px=int(m.sum()), centroid=(float(c[-2]), float(c[-1])), dist_gallbladder_mm=dist[0],
                               dist_ivc_mm=dist[1], **lk))
    for a, f in enumerate(out):
        f.relations = true_relations(out, a, spacing[-1])
    return out


def _check_group(group: list[dict], facts: list[LesionFacts]) -> int:
    """Every lesion sentence of a volume / slice is true of its lesion (segment, size, relations re-derived) and
    unique; every negative matches none. Returns the number of relations that hold."""
    by_label = {f.index: a for a, f in enumerate(facts)}
    n_rel = 0
    for r in group:
        a, text = r["attributes"], r["text"]
        if "negative" in r:
            neg = Negative(r["negative"], facts_of(a, 0), a["slots"]["full"], (a["relations"] or [None])[0])
            assert describes_nothing(facts, neg), (r["id"], text)
            continue
        i = by_label[r["target_instance"]]
        f = facts[i]
        assert a["segment"] == f.segment and abs(a["diameter_mm"] - f.diameter_mm) <= 0.05 + 1e-9, (r["id"], a, f)
        said = SEG_RE.findall(text)
        assert said and {ARABIC.get(x, x) for x in said} == {f.segment}, text
        val, unit = SIZE_RE.findall(text)[0]
        assert abs(float(val) * (10 if unit == "cm" else 1) - f.diameter_mm) <= 0.55, (text, f.diameter_mm)
        assert a["relations_true"] == f.relations, (text, a["relations_true"], f.relations)  # every one that holds
        n_rel += len(f.relations)
        for rel in a["relations"]:
            assert rel in f.relations, (text, rel, f.relations)
        if not a["relations"]:
            assert confusable(facts, i, a["slots"]["full"]) == [], text
        assert r["unique"]["full"]
    return n_rel


def test_volume_sentences_true_unique_negatives_absent(sets: dict[str, Path], volumes: dict) -> None:
    root = sets["a"]
    recs = _jsonl(root / "volumes.jsonl")
    n_rel = 0
    for vid, v in volumes.items():
        group = [r for r in recs if r["volume_id"] == vid]
        lesions = [r for r in group if "negative" not in r]
        kinds = {k: les.kind for k, les in enumerate(v.lesions, start=1)}
        looks = {r["target_instance"]: {s: r["attributes"][s] for s in ("shape", "boundary", "density", "enhancement")}
                 for r in lesions}
        facts = _refacts(v.instances, v.segments, v.gallbladder, v.ivc, (10.0, 350 / 64, 350 / 64), kinds, looks)
        assert len(lesions) == len(facts) == group[0]["n_lesions"]
        n_rel += _check_group(group, facts)
    assert n_rel > 0


def test_slice_sentences_true_of_what_the_slice_shows(sets: dict[str, Path], volumes: dict) -> None:
    root = sets["a"]
    by_slice: dict[str, list[dict]] = {}
    for r in _jsonl(root / "manifest.jsonl"):
        by_slice.setdefault(r["slice_id"], []).append(r)
    n_rel = 0
    for group in by_slice.values():
        v, k = volumes[group[0]["volume"]], group[0]["volume_slice"]
        inst = np.asarray(Image.open(root / group[0]["instances"]))
        kinds = {j: les.kind for j, les in enumerate(v.lesions, start=1)}
        looks = {j: {s: getattr(les, s) for s in ("shape", "boundary", "density", "enhancement")}
                 for j, les in enumerate(v.lesions, start=1)}
        facts = _refacts(inst, v.segments[k], v.gallbladder[k], v.ivc[k], (350 / 64, 350 / 64), kinds, looks)
        assert group[0]["n_lesions"] == len(facts)
        n_rel += _check_group(group, facts)
    assert len(by_slice) > 5 and n_rel > 0


def test_nifti_geometry_and_lsms_reader(sets: dict[str, Path]) -> None:
    from lsms.data import read_image

    root = sets["a"]
    img = nib.load(root / "volumes/p0001.nii.gz")
    s = 350 / 64
    assert img.shape == (64, 64, 16) and np.allclose(img.header.get_zooms(), (s, s, 10.0))
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")  # columns to the patient's left, rows posterior, slices up
    expected = np.array([[-s, 0, 0, (32 - 0.5) * s], [0, -s, 0, (32 - 0.5) * s], [0, 0, 10, -75.0], [0, 0, 0, 1]])
    assert np.allclose(img.affine, expected) and np.allclose(img.get_qform(), expected)
    assert int(img.header["qform_code"]) == int(img.header["sform_code"]) == 1
    vol = _nifti(root / "volumes/p0001.nii.gz")
    assert vol.dtype == np.int16
    for k in (0, 9, 15):
        data = read_image(root / "volumes/p0001.nii.gz", slice_index=k)
        assert np.array_equal(data.array, vol[k]) and np.allclose(data.spacing, (s, s))


def test_dicom_series_same_geometry(sets: dict[str, Path]) -> None:
    from lsms.data import read_volume

    root = sets["a"]
    vol = _nifti(root / "volumes/p0002.nii.gz")
    files = [pydicom.dcmread(p) for p in sorted((root / "dicom/p0002").glob("*.dcm"))]
    files.sort(key=lambda d: int(d.InstanceNumber))
    assert len(files) == 16
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        assert len({str(getattr(d, key)) for d in files}) == 1
    assert len({str(d.SOPInstanceUID) for d in files}) == 16
    nii = nib.load(root / "volumes/p0002.nii.gz").affine
    for k, d in enumerate(files):
        assert d.Modality == "CT" and d.SOPClassUID == pydicom.uid.CTImageStorage
        hu = d.pixel_array.astype(np.int32) * int(d.RescaleSlope) + int(d.RescaleIntercept)
        assert np.array_equal(hu, vol[k])
        assert [float(x) for x in d.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert np.allclose([float(x) for x in d.PixelSpacing], [350 / 64] * 2) and float(d.SliceThickness) == 10.0
        ras = nii @ np.array([0, 0, k, 1.0])  # voxel (col 0, row 0, slice k) in RAS; DICOM is LPS
        assert np.allclose([float(x) for x in d.ImagePositionPatient], [-ras[0], -ras[1], ras[2]], atol=1e-5)
    series = read_volume(root / "dicom/p0002")
    assert series.depth == 16
    for k in (0, 7, 15):  # the lsms reader sorts along the normal: the NIfTI's slice order
        assert np.array_equal(series.slice(k).array, vol[k])


def test_splits_by_patient(sets: dict[str, Path]) -> None:
    root = sets["a"]
    split_of: dict[str, set[str]] = {}
    for r in _jsonl(root / "volumes.jsonl") + _jsonl(root / "manifest.jsonl"):
        split_of.setdefault(r["patient"], set()).add(r["split"])
    assert all(len(s) == 1 for s in split_of.values())
    assert {next(iter(s)) for s in split_of.values()} == {"train", "val", "test"}


def test_cli_volumes(tmp_path: Path) -> None:
    from lsms.cli import main

    out = tmp_path / "vol"
    assert main(["synth", str(out), "--volumes", "--patients", "1", "--image-size", "64", "--volume-slices", "8",
                 "--slice-mm", "10", "--no-progress", "--variants", "0"]) == 0
    assert (out / "volumes.jsonl").is_file() and _nifti(out / "volumes/p0000.nii.gz").shape == (8, 64, 64)
    assert json.loads((out / "dataset.json").read_text())["volumes"]["settings"]["slices"] == 8
    assert main(["synth", str(tmp_path / "flat"), "--dicom"]) == 2  # volume options need --volumes
    with pytest.raises(ValueError, match="--slice-mm"):
        VolumeConfig(slice_mm=0.1)


# --- off-slice negatives: a slice paired with the volume sentence of a lesion that is not on it ---------------

VCFG_OFF = replace(VCFG, off_slice_negatives=2)


@pytest.fixture(scope="module")
def off_sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for name, vcfg in (("k2", VCFG_OFF), ("k2b", VCFG_OFF), ("k0", replace(VCFG, off_slice_negatives=0))):
        d = tmp_path_factory.mktemp(f"volumes_{name}")
        generate_volume_dataset(SynthConfig(seed=1, **SMALL), vcfg, d, progress=False)
        out[name] = d
    return out


def test_off_slice_zero_is_the_default_and_k_is_deterministic(sets: dict[str, Path], off_sets: dict[str, Path]) -> None:
    default, k0 = _files(sets["a"]), _files(off_sets["k0"])
    assert default.keys() == k0.keys() and [k for k in default if default[k] != k0[k]] == []
    assert "off_slice" not in default["dataset.json"].decode() and b"off_slice" not in default["manifest.jsonl"]
    a, b = _files(off_sets["k2"]), _files(off_sets["k2b"])
    assert a.keys() == b.keys() and [k for k in a if a[k] != b[k]] == []


def test_off_slice_adds_records_and_changes_nothing_else(sets: dict[str, Path], off_sets: dict[str, Path]) -> None:
    before, after = _files(sets["a"]), _files(off_sets["k2"])
    changed = [k for k in before if before[k] != after[k]]
    assert sorted(changed) == ["README.md", "dataset.json", "manifest.jsonl"]
    added = set(after) - set(before)
    assert "masks/empty.png" in added and all(re.fullmatch(r"(images|instances|all)/p\d{4}_z\d{3}\.(npy|png)|masks/empty\.png", k)
                                              for k in added), added
    old, new = _jsonl(sets["a"] / "manifest.jsonl"), _jsonl(off_sets["k2"] / "manifest.jsonl")
    off = [r for r in new if r.get("negative") == "off_slice"]
    assert [r for r in new if r.get("negative") != "off_slice"] == old  # same records, same order
    assert off and {r["split"] for r in off} == {"train", "val"}  # the test split is untouched
    assert [r for r in new if r["split"] == "test"] == [r for r in old if r["split"] == "test"]
    assert all(len([r for r in off if r["slice_id"] == s]) <= 2 for s in {r["slice_id"] for r in off})  # K per slice
    summary = json.loads(after["dataset.json"])["volumes"]
    assert summary["settings"]["off_slice_negatives"] == 2
    assert sum(summary["off_slice"]["records"].values()) == len(off)
    assert f"train {summary['off_slice']['records']['train']}" in after["README.md"].decode()


def test_off_slice_lesion_absent_mask_empty_sentence_of_the_volume(off_sets: dict[str, Path]) -> None:
    from lsms.data import load_samples

    root = off_sets["k2"]
    volume_records = {r["id"]: r for r in _jsonl(root / "volumes.jsonl")}
    records = _jsonl(root / "manifest.jsonl")
    off = [r for r in records if r.get("negative") == "off_slice"]
    instances = {v: _nifti(root / f"volumes/{v}_instances.nii.gz") for v in {r["volume"] for r in off}}
    images = {v: _nifti(root / f"volumes/{v}.nii.gz") for v in instances}
    blank = set()
    for r in off:
        v, k, vr = r["volume"], r["volume_slice"], volume_records[r["off_slice_of"]]
        label = vr["target_instance"]
        assert vr["volume_id"] == v and label > 0
        assert not (instances[v][k] == label).any(), r["id"]  # the paired lesion has no voxel on the slice
        assert (instances[v] == label).any()  # ... but is in the volume
        assert r["target_instance"] == 0 and not np.asarray(Image.open(root / r["mask"])).any()
        assert r["text"] == vr["texts"]["full"] and all(vr["texts"][lvl] == t for lvl, t in r["texts"].items())
        assert all(vr["unique"][lvl] for lvl in r["texts"])  # only levels that single the lesion out in the volume
        assert np.array_equal(np.load(root / r["image"]), images[v][k])
        assert np.array_equal(np.asarray(Image.open(root / r["instances"])), instances[v][k])
        if not instances[v][k].any():
            blank.add(r["slice_id"])
            assert r["n_lesions"] == 0 and r["all_text"] == ""
            assert len([x for x in records if x["slice_id"] == r["slice_id"]]) == min(2, vr["n_lesions"])
    assert blank and len({r["mask"] for r in off}) == 1  # lesion-free slices appear; one shared empty mask
    assert len(load_samples(root)) == len(records)  # the 2D set loads with the dataset rules


def test_off_slice_does_not_read_as_a_visible_lesion(off_sets: dict[str, Path], volumes: dict) -> None:
    """The paired sentence's type and location fit no lesion section on the slice (facts re-derived)."""
    root = off_sets["k2"]
    for r in _jsonl(root / "manifest.jsonl"):
        if r.get("negative") != "off_slice":
            continue
        v, k = volumes[r["volume"]], r["volume_slice"]
        inst = np.asarray(Image.open(root / r["instances"]))
        kinds = {j: les.kind for j, les in enumerate(v.lesions, start=1)}
        facts = _refacts(inst, v.segments[k], v.gallbladder[k], v.ivc[k], (350 / 64, 350 / 64), kinds, {})
        a = r["attributes"]
        assert describes_nothing(facts, Negative("off_slice", facts_of(a, 0), a["slots"]["full"], None)), r["id"]


def test_off_slice_option_checked(tmp_path: Path) -> None:
    from lsms.cli import main

    assert main(["synth", str(tmp_path / "flat"), "--off-slice-negatives", "1"]) == 2  # needs --volumes
    with pytest.raises(ValueError, match="--off-slice-negatives"):
        VolumeConfig(off_slice_negatives=-1)
    assert VolumeConfig.from_dict(VolumeConfig(off_slice_negatives=3).to_dict()).off_slice_negatives == 3
    assert "off_slice_negatives" not in VolumeConfig().to_dict()


def test_draw_off_slice_pairs_only_absent_lesions_that_read_as_nothing_visible() -> None:
    from lsms.synth.off_slice import blank_slices, draw_off_slice

    def facts(index: int, kind: str, segment: str) -> LesionFacts:
        return LesionFacts(index=index, kind=kind, segment=segment, lobe="right", diameter_mm=20.0, area_px=10,
                           centroid=(1.0, 1.0), shape="round", boundary="clear", density="fluid", enhancement="none",
                           dist_gallbladder_mm=float("inf"), dist_ivc_mm=float("inf"))

    volume = [facts(1, "cyst", "VI"), facts(2, "cyst", "VI"), facts(3, "hcc", "VII")]
    slots = [["type", "location", "size"]] * 3
    section = np.zeros((8, 8), dtype=np.uint8)
    section[2:4, 2:4] = 2  # lesion 2 is on the slice, its section reads "a cyst in segment VI"
    rng = np.random.default_rng(0)
    assert draw_off_slice(volume, slots, section, [facts(2, "cyst", "VI")], 5, rng) == [3]  # 1 reads as lesion 2
    assert draw_off_slice(volume, slots, section, [facts(2, "cyst", "V")], 5, rng) == [1, 3]
    assert len(draw_off_slice(volume, slots, np.zeros_like(section), [], 2, rng)) == 2  # at most K
    inst = np.zeros((10, 4, 4), dtype=np.uint8)
    inst[[3, 5], 1, 1] = 1
    liver = np.zeros((10, 4, 4), dtype=bool)
    liver[1:9] = True
    assert blank_slices(inst, liver) == [1, 7]  # lesion-free slices 1, 2, 4, 6, 7, 8 of the liver: every 4th


# --- on-slice sentences: a slice paired with the volume sentence of a lesion it shows, its section the target ------


def test_on_slice_sentences_target_the_lesions_section(sets: dict[str, Path], tmp_path: Path) -> None:
    from lsms.cli import main
    from lsms.data import load_samples

    root = tmp_path / "on"
    generate_volume_dataset(SynthConfig(seed=1, **SMALL), replace(VCFG, on_slice_sentences=True), root, progress=False)
    before, after = _files(sets["a"]), _files(root)
    assert after.keys() == before.keys()  # no new file: the targets are the slices' own masks
    assert sorted(k for k in before if before[k] != after[k]) == ["README.md", "dataset.json", "manifest.jsonl"]
    old, new = _jsonl(sets["a"] / "manifest.jsonl"), _jsonl(root / "manifest.jsonl")
    on = [r for r in new if "on_slice_of" in r]
    assert [r for r in new if "on_slice_of" not in r] == old  # the other records as they were, in order
    assert on and {r["split"] for r in on} == {"train", "val"}  # the test split is untouched
    volume_records = {r["id"]: r for r in _jsonl(root / "volumes.jsonl")}
    by_slice: dict[str, list[dict]] = {}
    for r in old:
        by_slice.setdefault(r["slice_id"], []).append(r)
    for r in on:
        vr = volume_records[r["on_slice_of"]]
        label = vr["target_instance"]
        assert r["target_instance"] == label > 0 and "negative" not in r and vr["volume_id"] == r["volume"]
        assert r["text"] == vr["texts"]["full"] and all(vr["unique"][lvl] for lvl in r["texts"])
        section = np.asarray(Image.open(root / r["instances"])) == label
        assert section.any() and np.array_equal(np.asarray(Image.open(root / r["mask"])) > 0, section)
        # the slice's own sentence about the same lesion is there too, with the same target
        assert [x["mask"] for x in by_slice[r["slice_id"]] if x["target_instance"] == label] == [r["mask"]]
    # every lesion a train/val slice describes, and that has a volume sentence, gets one
    described = {(r["slice_id"], r["target_instance"]) for r in old if r["split"] != "test" and r["target_instance"]
                 and f"{r['volume']}_l{r['target_instance']}" in volume_records}
    assert {(r["slice_id"], r["target_instance"]) for r in on} == described
    summary = json.loads((root / "dataset.json").read_text())["volumes"]
    assert summary["settings"]["on_slice_sentences"] is True and sum(summary["on_slice"]["records"].values()) == len(on)
    assert "on_slice_sentences" not in VolumeConfig().to_dict()
    assert len(load_samples(root)) == len(new)
    assert main(["synth", str(tmp_path / "flat"), "--on-slice-sentences"]) == 2  # needs --volumes
