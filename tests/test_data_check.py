"""`lsms check`: every kind of problem is found and named, JSON has counts and problems, exit status."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lsms.data.check import check_dataset


def _png(path: Path, a: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)
    return path.name


def make_bad(root: Path) -> Path:
    rng = np.random.default_rng(0)
    good = rng.integers(0, 255, (8, 8), dtype=np.uint8)
    m = np.zeros((8, 8), np.uint8)
    m[2:5, 2:5] = 255
    _png(root / "img/good.png", good)
    _png(root / "img/other.png", rng.integers(0, 255, (8, 8), dtype=np.uint8))
    _png(root / "img/copy.png", good)  # same pixels as good.png, in another split
    _png(root / "img/small.png", good[:6])
    np.save(root / "img/nan.npy", np.full((8, 8), np.nan, np.float32))
    data = (root / "img/good.png").read_bytes()
    (root / "img/cut.png").write_bytes(data[: len(data) // 2])
    _png(root / "msk/m.png", m)
    _png(root / "msk/empty.png", np.zeros((8, 8), np.uint8))
    grey = m.copy()
    grey[0, 0] = 100
    _png(root / "msk/grey.png", grey)
    rows = [
        ("good", "img/good.png", "msk/m.png", "a lesion", "train"),
        ("leak", "img/copy.png", "msk/m.png", "a lesion", "val"),
        ("small", "img/small.png", "msk/m.png", "a lesion", "train"),
        ("nan", "img/nan.npy", "msk/m.png", "a lesion", "train"),
        ("cut", "img/cut.png", "msk/m.png", "a lesion", "train"),
        ("gone", "img/gone.png", "msk/m.png", "a lesion", "train"),
        ("notext", "img/other.png", "msk/m.png", "", "train"),
        ("empty", "img/other.png", "msk/empty.png", "a lesion", "test"),
        ("grey", "img/other.png", "msk/grey.png", "word " * 40, "test"),
    ]
    lines = [json.dumps({"id": i, "image": a, "mask": b, "text": t, "split": s}) for i, a, b, t, s in rows]
    lines.append(json.dumps({"id": "slice", "image": "img/other.png", "mask": "msk/m.png", "text": "a lesion",
                             "split": "test", "volume_image": "vol/gone.nii.gz", "volume_slice": 3}))
    lines.append(json.dumps({"id": "good", "image": "img/good.png", "mask": "msk/m.png", "text": "x", "split": "train"}))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return root


class _CountingTokenizer:
    """Stands in for lsms.text.Tokenizer: one token per word plus CLS/SEP."""

    max_tokens = 32

    def hf(self, texts: list[str], add_special_tokens: bool = True) -> dict[str, list[list[int]]]:
        return {"input_ids": [[0] * (len(t.split()) + 2) for t in texts]}

    def normalized(self, texts: list[str]) -> list[str]:
        return list(texts)


def test_every_problem_is_found_and_named(tmp_path: Path) -> None:
    report = check_dataset(make_bad(tmp_path / "d"), tokenizer=_CountingTokenizer(), workers=1)
    found = {(p.code, p.id) for p in report.problems}
    expected_errors = {
        ("duplicate-id", "good"), ("split-leak", "good"), ("size-mismatch", "small"), ("nan-inf", "nan"),
        ("unreadable", "cut"), ("missing-file", "gone"), ("empty-text", "notext"),
    }
    assert expected_errors <= found
    assert {("empty-mask", "empty"), ("non-binary-mask", "grey"), ("long-text", "grey"), ("missing-volume", "slice")} <= found
    lengths = report.token_lengths
    assert lengths["over"] >= 1 and lengths["max"] > 32 >= lengths["median"] and lengths["texts"] >= lengths["over"]
    assert f"max_tokens 32 cuts {lengths['over']}: raise --max-tokens to {lengths['max']}" in report.format_text()
    msg = {p.code: p.message for p in report.problems}
    assert "msk/m.png: mask size (8, 8) differs from image size (6, 8) (small.png)" in msg["size-mismatch"]
    assert "nan.npy: 64 NaN/inf pixel value(s)" in msg["nan-inf"]
    assert "cut.png: cannot decode the image" in msg["unreadable"]
    assert "gone.png: image file not found" in msg["missing-file"]
    assert "sample 'notext' has an empty text" in msg["empty-text"]
    assert "42 tokens, the tokenizer keeps 32" in msg["long-text"]
    assert "manifest.jsonl:11: field 'id' 'good' repeats line 1" in msg["duplicate-id"]
    assert "vol/gone.nii.gz not found: a 2.5D model (--context-slices) cannot read" in msg["missing-volume"]
    assert not report.ok and report.counts == {"train": 6, "val": 1, "test": 3}
    assert all(p.severity == "error" for p in report.problems[: len(report.errors)])  # errors first


def _run(argv: list[str]) -> int:
    from lsms import check

    parser = argparse.ArgumentParser()
    check.add_arguments(parser)
    return check.run(parser.parse_args(argv))


def test_cli_json_and_exit_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = make_bad(tmp_path / "bad")
    assert _run([str(bad), "--json", "--no-text-check", "--workers", "1"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["counts"] == {"train": 6, "val": 1, "test": 3} and out["ok"] is False
    assert out["errors"] == len([p for p in out["problems"] if p["severity"] == "error"]) >= 7
    assert {"severity", "code", "message", "file", "id", "split"} == set(out["problems"][0])

    ok = tmp_path / "ok"
    for i in range(3):
        _png(ok / "train/images" / f"{i}.png", np.full((8, 8), 10 * i, np.uint8))
        m = np.zeros((8, 8), np.uint8)
        m[1:3, 1:3] = 255
        _png(ok / "train/masks" / f"{i}.png", m)
    assert _run([str(ok)]) == 0
    text = capsys.readouterr().out
    assert "train: 3" in text and "OK: 0 error(s)" in text and "none (classical segmentation)" in text


def _records_dataset(root: Path) -> Path:
    """Records whose files break the dataset and sample rules: a patient and a byte-identical image in two splits,
    a target_instance absent from its map, one contradicted by an empty mask, a negative with lesion pixels."""
    rng = np.random.default_rng(1)
    inst = np.zeros((8, 8), np.uint8)
    inst[2:5, 2:5] = 1
    m = (inst * 255).astype(np.uint8)
    for name in ("a", "b", "c", "d", "e", "f"):
        _png(root / f"img/{name}.png", rng.integers(0, 255, (8, 8), dtype=np.uint8))
    (root / "img/a_copy.png").write_bytes((root / "img/a.png").read_bytes())
    _png(root / "msk/m.png", m)
    _png(root / "msk/empty.png", np.zeros((8, 8), np.uint8))
    _png(root / "inst/i.png", inst)
    rows = [
        dict(id="a", image="img/a.png", split="train", patient="p1"),
        dict(id="copy", image="img/a_copy.png", split="test", patient="p9"),  # the same bytes as a.png
        dict(id="b", image="img/b.png", split="val", patient="p1"),  # p1 is in train too
        dict(id="absent", image="img/c.png", split="train", patient="p2", instances="inst/i.png", target_instance=2),
        dict(id="emptied", image="img/d.png", split="train", patient="p3", instances="inst/i.png", target_instance=1,
             mask="msk/empty.png"),
        dict(id="negative", image="img/e.png", split="train", patient="p4", instances="inst/i.png", target_instance=0),
        dict(id="good", image="img/f.png", split="train", patient="p5", instances="inst/i.png", target_instance=1),
    ]
    lines = [json.dumps({"mask": "msk/m.png", "text": "a lesion", **r}) for r in rows]
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_leaks_and_instances_are_one_rule_for_check_load_and_training(tmp_path: Path) -> None:
    from lsms.data import DataConfig, SampleError, SegmentationDataset, default_preprocessing, load_samples
    from lsms.data.loaders import build_datasets

    root = _records_dataset(tmp_path / "d")
    report = check_dataset(root, workers=1)
    msg = {(p.code, p.id): p.message for p in report.errors}
    assert set(msg) == {("split-leak", "a"), ("missing-instance", "absent"), ("missing-instance", "emptied"),
                        ("mask-mismatch", "negative")}
    leaks = [p.message for p in report.errors if p.code == "split-leak"]
    assert any("manifest.jsonl:1: field 'patient' 'p1': the same patient appears in splits ['train', 'val'] "
               "(train: " in m and "manifest.jsonl:3)" in m for m in leaks)
    assert any("manifest.jsonl:1: field 'image' (img/a.png): the same image file (or a byte-identical copy) appears "
               "in splits ['train', 'test']" in m and "manifest.jsonl:2" in m for m in leaks)
    assert "manifest.jsonl:4: field 'target_instance': 2 does not occur in the instance map" in msg[("missing-instance", "absent")]
    assert "manifest.jsonl:5: field 'target_instance': 1 names a lesion but the mask" in msg[("missing-instance", "emptied")]
    assert "manifest.jsonl:6: field 'target_instance': 0 marks a negative" in msg[("mask-mismatch", "negative")]

    # loading (any split) refuses the leak with check's message; training refuses before any step
    for split in ("train", "val", "test"):
        with pytest.raises(ValueError, match=r"manifest\.jsonl:1: field '(patient|image)'.*--allow-split-leak"):
            load_samples(root, split=split)
    with pytest.raises(ValueError, match=r"split-leak|appears in splits"):
        build_datasets(DataConfig(path=str(root), image_size=64), seed=0)
    train = load_samples(root, split="train", allow_split_leak=True)
    preprocessing, train_set, val_set = build_datasets(DataConfig(path=str(root), image_size=64, allow_split_leak=True), 0)
    assert val_set is not None and [r.id for r in val_set.records] == ["b"]

    # the sample rules: the torch dataset refuses what check calls an error, naming line and field
    ds = SegmentationDataset(train, default_preprocessing(None, 64))
    by_id = {r.id: i for i, r in enumerate(train)}
    for rid, line in (("absent", 4), ("emptied", 5), ("negative", 6)):
        with pytest.raises(SampleError, match=rf"sample '{rid}' \(train\): .*manifest\.jsonl:{line}: field 'target_instance'"):
            ds.load(by_id[rid])
    assert ds.load(by_id["good"])["target_instance"] == 1


def test_duplicates_are_refused_at_load_as_check_reports(tmp_path: Path) -> None:
    from lsms.data import load_samples

    root = _records_dataset(tmp_path / "d")
    good = json.dumps({"id": "good", "image": "img/f.png", "mask": "msk/m.png", "text": "x", "split": "train"})
    (root / "manifest.jsonl").write_text(good + "\n" + good + "\n" + good.replace('"text"', '"id": "z", "text"') + "\n")
    with pytest.raises(ValueError, match=r"manifest\.jsonl:2: field 'id' 'good' repeats line 1.*and 1 more error"):
        load_samples(root)
    found = {(p.code, p.message.split(": ", 1)[0].rsplit("/", 1)[-1]) for p in check_dataset(root, workers=1).errors}
    assert found == {("duplicate-id", "manifest.jsonl:2"), ("invalid-record", "manifest.jsonl:3")}
    assert "field 'id' appears twice" in next(p.message for p in check_dataset(root, workers=1).errors
                                             if p.code == "invalid-record")
