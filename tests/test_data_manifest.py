"""The manifest format: round trip, unknown fields kept, validation errors naming line and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lsms.data import Record, load_manifest, load_samples, write_manifest


def _line(**over: object) -> dict:
    base = {"id": "a", "image": "images/a.npy", "mask": "masks/a.png", "text": "a cyst", "split": "train"}
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def _write(folder: Path, lines: list[dict | str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    text = "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n"
    (folder / "manifest.jsonl").write_text(text)
    return folder


def test_round_trip_keeps_optional_and_unknown_fields(tmp_path: Path) -> None:
    full = _line(
        texts={"full": "a cyst", "half": "cyst", "quarter": "lesion"}, instances="inst/a.png", target_instance=2,
        attributes={"type": "cyst", "diameter_mm": 7.5}, spacing=[0.7, 0.7], patient="p1", modality="CT",
        unique={"half": True}, all_mask="masks/a_all.png", all_text="two cysts",
    )
    _write(tmp_path / "d", [full, _line(id="b", image="images/b.npy", text="a lesion", split="val")])
    recs = load_manifest(tmp_path / "d")
    assert [r.id for r in recs] == ["a", "b"]
    a = recs[0]
    assert a.spacing == (0.7, 0.7) and a.target_instance == 2 and a.modality == "CT"
    assert a.extra == {"unique": {"half": True}, "all_mask": "masks/a_all.png", "all_text": "two cysts"}
    assert a.image_path == tmp_path / "d" / "images/a.npy"
    assert a.text_at("half") == "cyst" and a.text_at("none") == "" and recs[1].text_at("quarter") == "a lesion"
    write_manifest(tmp_path / "e", recs)
    assert [json.loads(x) for x in (tmp_path / "e" / "manifest.jsonl").read_text().splitlines()][0] == full
    assert not list((tmp_path / "e").glob(".manifest-*"))  # the temporary file was renamed into place
    assert load_samples(tmp_path / "e", split="val")[0].id == "b"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (_line(id=None), r":2: required field 'id' is missing"),
        (_line(split="training"), r":2: field 'split' must be one of train, val, test, got 'training'"),
        (_line(text=3), r":2: field 'text' must be a string, got int"),
        (_line(spacing=[0.7]), r":2: field 'spacing' must be \[row_mm, col_mm\]"),
        (_line(target_instance=1), r":2: field 'target_instance' is set but 'instances'"),
        (_line(texts={"third": "x"}), r":2: field 'texts' has unknown level"),
        (_line(volume_image="volumes/a.nii.gz"), r":2: field 'volume_image' is set but 'volume_slice'"),
        (_line(volume_image="volumes/a.nii.gz", volume_slice=-1), r":2: field 'volume_slice' must be a non-negative"),
        (_line(id="first"), r":2: field 'id' 'first' repeats line 1"),
        ("{not json", r":2: not valid JSON"),
    ],
)
def test_validation_names_line_and_field(tmp_path: Path, line: dict | str, message: str) -> None:
    _write(tmp_path, [_line(id="first"), line])
    with pytest.raises(ValueError, match=r"manifest\.jsonl" + message):
        load_manifest(tmp_path)


def test_missing_manifest_and_duplicate_write(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no manifest here"):
        load_manifest(tmp_path)
    r = Record(id="x", image="i.png", mask="m.png", text="", split="train")
    with pytest.raises(ValueError, match=r"duplicate ids \['x'\]"):
        write_manifest(tmp_path, [r, r])
    assert not (tmp_path / "manifest.jsonl").exists()


def test_common_modality() -> None:
    from lsms.data import common_modality

    def rec(m: str | None) -> Record:
        return Record(id="x", image="i", mask="m", text="", split="train", modality=m)

    assert common_modality([rec("CT"), rec("CT")]) == "CT" and common_modality([rec(None)]) is None
    with pytest.raises(ValueError, match=r"records mix modalities \['CT', 'XR'\]"):
        common_modality([rec("CT"), rec("XR")])


def test_modality_is_normalised_and_check_warns(tmp_path: Path) -> None:
    from lsms.data import default_preprocessing
    from lsms.data.check import check_dataset

    _write(tmp_path, [_line(modality="CT "), _line(id="b", modality="ct"), _line(id="c", modality="CT")])
    records = load_manifest(tmp_path)
    assert [r.modality for r in records] == ["CT", "CT", "CT"]
    assert default_preprocessing(records[0].modality).intensity == "window"  # the CT window, not percentiles
    found = {(p.code, p.id): p for p in check_dataset(tmp_path, workers=1).problems}
    assert found[("modality-normalized", "a")].severity == "warning"
    assert "manifest.jsonl:1: field 'modality' 'CT ' is read as 'CT'" in found[("modality-normalized", "a")].message
    assert ("modality-normalized", "b") in found and ("modality-normalized", "c") not in found
    assert ("mixed-modality", None) not in found


def test_empty_text_is_refused_at_load_as_check_does(tmp_path: Path) -> None:
    from lsms.data.check import check_dataset

    _write(tmp_path / "d", [_line(), _line(id="b", text="")])
    with pytest.raises(ValueError, match=r"manifest\.jsonl:2: sample 'b' has an empty text while the dataset has text"):
        load_samples(tmp_path / "d", split="train")
    found = [p for p in check_dataset(tmp_path / "d", workers=1).problems if p.code == "empty-text"]
    assert [(p.id, p.severity) for p in found] == [("b", "error")]  # reported once, by the same rule
    _write(tmp_path / "e", [_line(texts={"half": " "})])
    with pytest.raises(ValueError, match=r"manifest\.jsonl:1: sample 'a' has an empty texts\.half"):
        load_manifest(tmp_path / "e")
    _write(tmp_path / "f", [_line(text=""), _line(id="b", text="")])  # no text at all: legal
    assert len(load_manifest(tmp_path / "f")) == 2


def test_the_volume_of_a_slice_is_where_a_2_5d_model_reads_its_neighbours(tmp_path: Path) -> None:
    """``volume_image`` + ``volume_slice`` name it; a slice of a volume image names itself; a plain 2D image none;
    a ``volume_image`` outside the dataset folder is refused like any other file."""
    from lsms.data.manifest import outside_root

    lines = [_line(id="s", volume_image="volumes/v.nii.gz", volume_slice=4), _line(id="v", image="ct.nii.gz", slice_index=7),
             _line(id="p"), _line(id="o", volume_image="../v.nii.gz", volume_slice=0)]
    s, v, p, o = load_manifest(_write(tmp_path / "d", lines))
    assert s.context_source == (tmp_path / "d" / "volumes/v.nii.gz", 4)
    assert v.context_source == (tmp_path / "d" / "ct.nii.gz", 7) and p.context_source is None
    assert [name for name, _, _ in outside_root(o)] == ["volume_image"] and outside_root(s) == []
    write_manifest(tmp_path / "e", [s])
    assert json.loads((tmp_path / "e" / "manifest.jsonl").read_text())["volume_slice"] == 4
