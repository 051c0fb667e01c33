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
    assert {("empty-mask", "empty"), ("non-binary-mask", "grey"), ("long-text", "grey")} <= found
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
    assert "manifest.jsonl:10: field 'id' 'good' repeats line 1" in msg["duplicate-id"]
    assert not report.ok and report.counts == {"train": 6, "val": 1, "test": 2}
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
    assert out["counts"] == {"train": 6, "val": 1, "test": 2} and out["ok"] is False
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
