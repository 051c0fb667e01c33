"""LViT and images/+masks/ layouts, layout detection, `lsms convert`, and the shared real datasets."""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lsms.data import detect_layout, load_image_folder, load_lvit, load_manifest, load_samples, read_mask

SHARED = Path(__file__).parents[1].parent / "shared" / "data"


def _xlsx(path: Path, rows: list[tuple[object, object]]) -> None:
    import openpyxl

    wb = openpyxl.Workbook()
    ws = wb.active
    ws.append(["Image", "Description"])
    for row in rows:
        ws.append(list(row))
    wb.save(path)


def _img(path: Path, value: int, size: tuple[int, int] = (8, 10)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.full(size, value, np.uint8)
    if path.suffix == ".tif":
        import tifffile

        tifffile.imwrite(path, a)
    else:
        Image.fromarray(a).save(path)


def _mask(path: Path, size: tuple[int, int] = (8, 10)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.zeros(size, np.uint8)
    m[2:5, 3:6] = 255
    Image.fromarray(m).save(path)


def make_lvit(root: Path) -> Path:
    """Train: plain names; Val: QaTa-style mask_<image> masks; Test: .tif images named .png in the sheet."""
    tr = root / "Train_Folder"
    for i in range(3):
        _img(tr / "img" / f"t{i}.png", 10 * i)
        _mask(tr / "labelcol" / f"t{i}.png")
    _xlsx(tr / "Train_text.xlsx", [(f"t{i}.png", f"Lesion {i} in the  left lung") for i in range(3)])
    va = root / "Val_Folder"
    _img(va / "img" / "covid_1.png", 50)
    _mask(va / "labelcol" / "mask_covid_1.png")
    _img(va / "img" / "covid_2.png", 60)
    _mask(va / "labelcol" / "mask_covid_2.png")
    _xlsx(va / "Val_text.xlsx", [("mask_covid_1.png", "Bilateral infection."), ("covid_2.png", "Right lower zone.")])
    te = root / "Test_Folder"
    _img(te / "img" / "n1.tif", 70)
    _mask(te / "labelcol" / "n1.png")
    _xlsx(te / "Test_text.xlsx", [("n1.png", "Nuclei.")])
    return root


def test_lvit_reader_and_variants(tmp_path: Path) -> None:
    root = make_lvit(tmp_path / "lvit")
    assert detect_layout(root) == "lvit"
    recs = load_lvit(root)
    assert Counter(r.split for r in recs) == {"train": 3, "val": 2, "test": 1}
    by_id = {r.id: r for r in recs}
    assert by_id["t1"].text == "Lesion 1 in the left lung"  # whitespace normalised
    assert by_id["covid_1"].mask == "Val_Folder/labelcol/mask_covid_1.png" and by_id["covid_1"].text == "Bilateral infection."
    assert by_id["covid_2"].image == "Val_Folder/img/covid_2.png"
    assert by_id["n1"].image == "Test_Folder/img/n1.tif" and by_id["n1"].mask_path.is_file()
    assert [r.id for r in load_samples(root, split="val")] == ["covid_1", "covid_2"]


def test_lvit_empty_description_and_missing_file(tmp_path: Path) -> None:
    root = make_lvit(tmp_path / "a")
    _xlsx(root / "Train_Folder" / "Train_text.xlsx", [("t0.png", "ok"), ("t1.png", "  "), ("t2.png", "ok")])
    with pytest.raises(ValueError, match=r"Train_text\.xlsx row 3: empty 'Description' for image t1\.png"):
        load_lvit(root)
    root = make_lvit(tmp_path / "b")
    (root / "Train_Folder" / "labelcol" / "t2.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"labelcol/t2\.png: no mask for image t2\.png"):
        load_samples(root)
    _xlsx(root / "Val_Folder" / "Val_text.xlsx", [("gone.png", "x")])
    with pytest.raises(FileNotFoundError, match=r"img/gone\.png: image named in .*Val_text\.xlsx row 2 not found"):
        load_lvit(root, split="val")
    _xlsx(root / "Test_Folder" / "Test_text.xlsx", [])
    (root / "Test_Folder" / "Test_text.xlsx").unlink()
    with pytest.raises(FileNotFoundError, match=r"Test_text\.xlsx: spreadsheet missing"):
        load_lvit(root, split="test")


def test_lvit_bad_header(tmp_path: Path) -> None:
    import openpyxl

    root = make_lvit(tmp_path / "lvit")
    wb = openpyxl.Workbook()
    wb.active.append(["name", "text"])
    wb.save(root / "Train_Folder" / "Train_text.xlsx")
    with pytest.raises(ValueError, match=r"Train_text\.xlsx: the first sheet needs a header row with columns 'Image' and 'Description'"):
        load_lvit(root, split="train")


def test_image_folder_flat_and_split(tmp_path: Path) -> None:
    for sp, n in (("train", 3), ("val", 1)):
        for i in range(n):
            _img(tmp_path / "k" / sp / "images" / f"{sp}{i}.jpg", 100)
            _mask(tmp_path / "k" / sp / "masks" / f"{sp}{i}.png")
    assert detect_layout(tmp_path / "k") == "folder"
    recs = load_image_folder(tmp_path / "k")
    assert Counter(r.split for r in recs) == {"train": 3, "val": 1} and all(r.text == "" for r in recs)
    _img(tmp_path / "flat" / "images" / "a.png", 1)
    _mask(tmp_path / "flat" / "masks" / "a.png")
    assert [(r.id, r.split) for r in load_samples(tmp_path / "flat")] == [("a", "train")]
    _img(tmp_path / "flat" / "images" / "b.png", 1)
    with pytest.raises(FileNotFoundError, match=r"masks/b\.png: no mask for image .*images/b\.png"):
        load_samples(tmp_path / "flat")


def test_unknown_layout_and_missing_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="dataset path not found"):
        load_samples(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty: not a dataset folder; expected one of"):
        load_samples(tmp_path / "empty")


def _run(module: str, argv: list[str]) -> int:
    import importlib

    mod = importlib.import_module(module)
    parser = argparse.ArgumentParser()
    mod.add_arguments(parser)
    return mod.run(parser.parse_args(argv))


def test_convert_lvit_writes_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_lvit(tmp_path / "lvit")
    assert _run("lsms.convert", ["lvit", str(root), str(tmp_path / "out"), "--modality", "XR"]) == 0
    assert "train 3" in capsys.readouterr().out
    recs = load_manifest(tmp_path / "out")
    assert len(recs) == 6 and {r.modality for r in recs} == {"XR"}
    r = next(x for x in recs if x.id == "covid_1")
    assert r.image == "images/val/covid_1.png" and r.mask == "masks/val/covid_1.png" and r.extra["source"]
    assert (r.image_path.read_bytes() == (root / "Val_Folder/img/covid_1.png").read_bytes())
    assert np.unique(np.array(Image.open(r.mask_path))).tolist() == [0, 255]
    assert read_mask(r.mask_path).sum() == 9
    with pytest.raises(ValueError, match="output folder is not empty"):
        _run("lsms.convert", ["lvit", str(root), str(tmp_path / "out")])


def _need(name: str) -> Path:
    path = SHARED / name
    if not path.is_dir():
        pytest.skip(f"shared dataset {path} is absent (CI places shared/ beside the repository)")
    return path


def test_shared_btxrd_lvit_counts() -> None:
    with pytest.raises(ValueError, match=r"Train_text\.xlsx row \d+: field 'image' .*IMG000683.* appears in splits "
                       r"\['train', 'val'\] .*Val_text\.xlsx row \d+.*--allow-split-leak"):
        load_samples(_need("btxrd"))  # two byte-identical radiographs in train and val (docs/data.md)
    recs = load_samples(_need("btxrd"), allow_split_leak=True)
    assert Counter(r.split for r in recs) == {"train": 1306, "val": 280}
    assert all(r.text for r in recs)


def test_shared_kvasir_folder_counts() -> None:
    recs = load_samples(_need("kvasir-seg"))
    # The issue says 700 + 100, but the shared copy holds 698 train image/mask pairs (ls | wc -l); 700 was
    # a round figure. Assert what is on disk.
    assert Counter(r.split for r in recs) == {"train": 698, "val": 100}


def test_shared_check_under_a_minute() -> None:
    from lsms.data.check import check_dataset

    for name in ("kvasir-seg", "btxrd"):
        start = time.perf_counter()
        report = check_dataset(_need(name), workers=2)
        assert time.perf_counter() - start < 60
        assert sum(report.counts.values()) == {"kvasir-seg": 798, "btxrd": 1586}[name]
        if name == "kvasir-seg":
            assert report.ok, report.format_text()
        else:  # two byte-identical radiographs sit in both train and val of the shared BTXRD copy
            assert {p.code for p in report.errors} == {"split-leak"} and len(report.errors) == 2
