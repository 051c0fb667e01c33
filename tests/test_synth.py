"""RefLiver-Synth: the spec's properties on small generated sets (4 patients x 3 slices at 128 px)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from scipy.ndimage import distance_transform_edt

from lsms.synth import SynthConfig, generate_dataset, load_phrasing, render_slice
from lsms.synth.anatomy import SEGMENTS
from lsms.synth.expressions import FAR_MM, NEAR_MM, POSITION_MARGIN_MM, RANK_RATIO, SIZE_DISTINCT

SMALL = dict(patients=4, slices_per_patient=3, image_size=128, val_share=0.25, test_share=0.25)
ARABIC = {"1": "I", "2": "II", "3": "III", "4a": "IVa", "4b": "IVb", "5": "V", "6": "VI", "7": "VII", "8": "VIII"}
SEG_RE = re.compile(r"segment (IVa|IVb|VIII|VII|VI|V|III|II|I|4a|4b|[1-8])\b")
SIZE_RE = re.compile(r"(\d+(?:\.\d+)?) (mm|cm)\b")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _manifest(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]


def _lesion_records(root: Path) -> list[dict]:
    """The records of lesions (negatives, which describe absent lesions, have tests of their own)."""
    return [r for r in _manifest(root) if "negative" not in r]


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        d = tmp_path_factory.mktemp(f"synth_{name}")
        generate_dataset(SynthConfig(seed=seed, **SMALL), d, progress=False)
        out[name] = d
    return out


@pytest.fixture(scope="module")
def slices(sets: dict[str, Path]) -> dict[str, object]:
    """Re-rendered slices of set "a" (liver mask, segment map, organs) keyed by slice id."""
    cfg = SynthConfig.from_dict(json.loads((sets["a"] / "dataset.json").read_text())["settings"])
    out = {}
    for i in range(cfg.patients):
        for j in range(cfg.slices_per_patient):
            s = render_slice(cfg, i, j)
            out[s.slice_id] = s
    return out


def test_same_seed_byte_identical_other_seed_differs(sets: dict[str, Path]) -> None:
    a, b, c = _files(sets["a"]), _files(sets["b"]), _files(sets["c"])
    assert a.keys() == b.keys()
    assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]]
    assert a["manifest.jsonl"] != c["manifest.jsonl"]
    imgs = [k for k in a if k.startswith("images/") and k in c]
    assert imgs and all(a[k] != c[k] for k in imgs)


def test_files_and_format(sets: dict[str, Path]) -> None:
    root = sets["a"]
    recs = _manifest(root)
    assert len({r["id"] for r in recs}) == len(recs)
    summary = json.loads((root / "dataset.json").read_text())
    assert summary["counts"]["expressions"] == len(recs) and summary["seed"] == summary["settings"]["seed"]
    assert (root / "README.md").is_file() and (root / "card" / "contact_sheet.png").is_file()
    for r in _lesion_records(root):
        img = np.load(root / r["image"])
        assert img.dtype == np.int16 and img.shape == (128, 128)
        assert r["modality"] == "CT" and r["text"] == r["texts"]["full"] and r["spacing"] == [350 / 128] * 2
        assert set(r["texts"]) == set(r["unique"]) == {"full", "half", "quarter"}
        # soft tissue at portal-venous phase: air, fat and enhanced organs all present
        assert img.min() <= -900 and img.max() >= 300


def test_masks_inside_liver_disjoint_and_target_is_instance(sets: dict[str, Path], slices: dict) -> None:
    root = sets["a"]
    by_slice: dict[str, list[dict]] = {}
    for r in _lesion_records(root):
        by_slice.setdefault(r["slice_id"], []).append(r)
    for sid, recs in by_slice.items():
        inst = np.asarray(Image.open(root / recs[0]["instances"]))
        s = slices[sid]
        assert np.array_equal(inst, s.instances)
        masks = [np.asarray(Image.open(root / r["mask"])) for r in recs]
        total = np.zeros(inst.shape, dtype=int)
        for r, m in zip(recs, masks, strict=True):
            assert set(np.unique(m)) <= {0, 255} and m.any()
            assert np.array_equal(m > 0, inst == r["target_instance"])
            assert not (m > 0)[~s.anatomy.liver].any(), f"{r['id']} leaves the liver"
            total += m > 0
        assert total.max() == 1  # disjoint
        assert sorted(r["target_instance"] for r in recs) == list(range(1, int(inst.max()) + 1))
        all_mask = np.asarray(Image.open(root / recs[0]["all_mask"]))
        assert np.array_equal(all_mask > 0, inst > 0)


def _measure(mask: np.ndarray, spacing: float) -> tuple[float, tuple[float, float]]:
    rows, cols = np.nonzero(mask)
    return 2 * np.sqrt(rows.size * spacing**2 / np.pi), (rows.mean(), cols.mean())


def _relation_holds(rel: dict, k: int, inst: np.ndarray, kinds: dict[int, str], s, spacing: float) -> bool:
    labels = sorted(kinds)
    diam = {j: _measure(inst == j, spacing)[0] for j in labels}
    cen = {j: _measure(inst == j, spacing)[1] for j in labels}
    kind = rel["kind"]
    if kind in ("larger_of_type", "smaller_of_type", "largest", "smallest"):
        group = [j for j in labels if kind in ("largest", "smallest") or kinds[j] == kinds[k]]
        d = sorted((diam[j] for j in group), reverse=True)
        if rel["count"] != len(group) or len(group) < 2:
            return False
        if kind in ("larger_of_type", "largest"):
            return diam[k] == d[0] and d[0] >= RANK_RATIO * d[1] - 0.1  # 0.1: rounding of the stored diameter
        return diam[k] == d[-1] and d[-2] >= RANK_RATIO * d[-1] - 0.1
    if kind.startswith("most_"):
        axis, sign = {"most_anterior": (0, -1), "most_posterior": (0, 1), "most_right": (1, -1), "most_left": (1, 1)}[kind]
        others = [sign * cen[j][axis] for j in labels if j != k]
        return (sign * cen[k][axis] - max(others)) * spacing >= POSITION_MARGIN_MM - 1e-6
    organ = s.anatomy.gallbladder if kind == "near_gallbladder" else s.anatomy.ivc
    dist = distance_transform_edt(~organ, sampling=spacing)
    near = {j: dist[inst == j].min() for j in labels}
    return near[k] <= NEAR_MM + 1e-6 and all(near[j] >= FAR_MM - 1e-6 for j in labels if j != k)


def test_full_expressions_true_and_unique(sets: dict[str, Path], slices: dict) -> None:
    root = sets["a"]
    ph = load_phrasing()
    recs = _lesion_records(root)
    by_slice: dict[str, list[dict]] = {}
    for r in recs:
        by_slice.setdefault(r["slice_id"], []).append(r)
    n_rel = 0
    for sid, group in by_slice.items():
        s = slices[sid]
        inst = s.instances
        spacing = group[0]["spacing"][0]
        kinds = {r["target_instance"]: r["attributes"]["type"] for r in group}
        for r in group:
            a, text, k = r["attributes"], r["texts"]["full"], r["target_instance"]
            d, (cr, cc) = _measure(inst == k, spacing)
            # size: the stored diameter and the one in the text agree with the mask
            assert abs(a["diameter_mm"] - d) <= 0.05 + 1e-9
            sizes = SIZE_RE.findall(text)
            assert len(sizes) == 1, text
            val, unit = sizes[0]
            tol = 0.05 if "." in val and unit == "mm" else 0.5
            assert abs(float(val) * (10 if unit == "cm" else 1) - d) <= tol + 0.05 + 1e-9, (text, d)
            # segment (from the centroid on the re-rendered segment map) and lobe / side
            seg = SEGMENTS[s.anatomy.segments[int(round(cr)), int(round(cc))] - 1]
            assert a["segment"] == seg
            said = SEG_RE.findall(text)
            assert said and {ARABIC.get(x, x) for x in said} == {seg}, (text, seg)
            for lobe in ("right", "left", "caudate"):
                if re.search(rf"\b{lobe} (hepatic |liver )?lobe", text):
                    assert a["lobe"] == lobe, text
            # type: one of its nouns
            nouns = [w for pair in ph["nouns"][a["type"]] for w in pair]  # singular, or plural in a relation
            assert any(w in text or w[0].upper() + w[1:] in text for w in nouns), text
            # stated relation re-derived from the masks (and the anatomy for gallbladder / IVC)
            for rel in a["relations"]:
                n_rel += 1
                assert _relation_holds(rel, k, inst, kinds, s, spacing), (text, rel)
            # uniqueness: no other lesion fits every stated attribute, unless a relation is stated
            assert r["unique"]["full"]
            if not a["relations"]:
                for o in group:
                    if o is r:
                        continue
                    b = o["attributes"]
                    big, small = max(a["diameter_mm"], b["diameter_mm"]), min(a["diameter_mm"], b["diameter_mm"])
                    same = all(a[f] == b[f] for f in ("type", "segment", "shape", "boundary", "density", "enhancement"))
                    assert not (same and big < SIZE_DISTINCT * small), (text, o["texts"]["full"])
    assert n_rel > 0


def test_splits_disjoint_by_patient(sets: dict[str, Path]) -> None:
    recs = _manifest(sets["a"])
    split_of: dict[str, set[str]] = {}
    for r in recs:
        split_of.setdefault(r["patient"], set()).add(r["split"])
    assert all(len(v) == 1 for v in split_of.values())
    assert {next(iter(v)) for v in split_of.values()} == {"train", "val", "test"}


def test_multi_lesion_share_is_a_setting() -> None:
    def share(value: float) -> float:
        cfg = SynthConfig(patients=8, slices_per_patient=6, image_size=96, multi_lesion_share=value, seed=3)
        counts = [len(render_slice(cfg, i, j).facts) for i in range(cfg.patients) for j in range(cfg.slices_per_patient)]
        assert min(counts) >= 1 and max(counts) <= cfg.max_lesions
        return float(np.mean(np.asarray(counts) >= 2))

    assert abs(share(0.6) - 0.6) <= 0.17
    assert share(0.0) == 0.0
    assert share(1.0) >= 0.85


def test_convention_patient_right_on_image_left(slices: dict) -> None:
    for s in slices.values():
        cols = np.nonzero(s.anatomy.liver)[1]
        assert cols.mean() < s.image.shape[1] / 2  # the liver (patient's right) is on the image left
        right = s.anatomy.segments[s.anatomy.segments > 0]
        assert right.size


def test_phrasing_file_swaps_wording(tmp_path: Path) -> None:
    ph = load_phrasing()
    ph["nouns"]["cyst"] = [["water bubble", "water bubbles"]]
    ph["generic"] = [["blob", "blobs"]]
    ph["nouns"] = {k: v if k == "cyst" else [["thing", "things"]] for k, v in ph["nouns"].items()}
    path = tmp_path / "alt.yaml"
    path.write_text(yaml.safe_dump(ph))
    cfg = SynthConfig(patients=1, slices_per_patient=4, image_size=96, lesion_types=("cyst",), phrasing=str(path))
    texts = [t["full"] for j in range(4) for t in render_slice(cfg, 0, j).texts]
    assert texts and all("water bubble" in t for t in texts)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"nouns": {}}))
    with pytest.raises(ValueError, match="lacks the keys"):
        load_phrasing(bad)


@pytest.mark.parametrize("kwargs, word", [
    (dict(max_lesions=5), "lesions-per-slice"),
    (dict(multi_lesion_share=1.5), "multi-lesion-share"),
    (dict(lesion_types=("tumor",)), "lesion-types"),
    (dict(diameter_mm=(50.0, 10.0)), "diameter-mm"),
    (dict(val_share=0.6, test_share=0.5), "val-share"),
    (dict(patients=0), "patients"),
    (dict(negative_share=1.2), "negative-share"),
    (dict(variants=-1), "variants"),
])
def test_bad_settings_name_the_option(kwargs: dict, word: str) -> None:
    with pytest.raises(ValueError, match=word):
        SynthConfig(**kwargs)


def test_cli(tmp_path: Path) -> None:
    from lsms.cli import main

    out = tmp_path / "ds"
    assert main(["synth", str(out), "--patients", "2", "--slices-per-patient", "2", "--image-size", "96",
                 "--no-progress", "--lesion-types", "cyst,fnh"]) == 0
    recs = _manifest(out)
    assert recs and {r["attributes"]["type"] for r in recs} <= {"cyst", "fnh"}
    assert main(["synth", str(out), "--patients", "2"]) == 2  # not empty, no --overwrite
