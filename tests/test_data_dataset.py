"""SegmentationDataset items, text levels, flips and text, error policy, and the tokenising Collator."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, default_collate

from lsms.data import (
    Augmentation,
    Collator,
    Preprocessing,
    SampleError,
    SegmentationDataset,
    SkipLog,
    load_manifest,
    swap_left_right,
)

H, W = 12, 16


def make_dataset(root: Path) -> Path:
    """Three samples: CT npy with instances and texts, an RGB PNG with a left/right text, one with neither."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    hu = np.full((H, W), 30, np.int16)
    hu[:, : W // 2] = -45  # left half dark in the liver window
    np.save(root / "images/ct.npy", hu)
    inst = np.zeros((H, W), np.uint8)
    inst[1:4, 1:4], inst[6:9, 10:14] = 1, 2
    Image.fromarray(inst).save(root / "masks/ct_inst.png")
    Image.fromarray((inst == 2).astype(np.uint8) * 255).save(root / "masks/ct.png")
    Image.fromarray(np.full((H, W, 3), 200, np.uint8)).save(root / "images/rgb.png")
    m = np.zeros((H, W), np.uint8)
    m[:, W - 3 :] = 255
    Image.fromarray(m).save(root / "masks/rgb.png")
    lines = [
        {"id": "ct", "image": "images/ct.npy", "mask": "masks/ct.png", "split": "train", "modality": "CT",
         "text": "The larger lesion in the right lobe", "texts": {"half": "right lobe lesion"},
         "instances": "masks/ct_inst.png", "target_instance": 2},
        {"id": "rgb", "image": "images/rgb.png", "mask": "masks/rgb.png", "text": "Polyp on the Left", "split": "train"},
        {"id": "plain", "image": "images/rgb.png", "mask": "masks/rgb.png", "text": "a polyp", "split": "val"},
    ]
    (root / "manifest.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root


def test_items_types_shapes_and_values(tmp_path: Path) -> None:
    recs = load_manifest(make_dataset(tmp_path / "d"))
    prep = Preprocessing(image_size=(6, 8), in_channels=3, intensity="window", window="liver")
    ds = SegmentationDataset(recs, prep)
    item = ds[0]
    assert item["image"].shape == (3, 6, 8) and item["image"].dtype == torch.float32
    assert item["mask"].shape == (1, 6, 8) and item["mask"].dtype == torch.float32
    assert set(item["mask"].unique().tolist()) <= {0.0, 1.0} and item["mask"].sum() > 0
    assert item["instances"].shape == (6, 8) and item["instances"].dtype == torch.int64
    assert set(item["instances"].unique().tolist()) == {0, 1, 2} and item["target_instance"] == 2
    assert torch.equal(item["mask"][0].bool(), item["instances"] == 2)  # nearest resize keeps them aligned
    assert item["image"][0, 0, 0] == 0.0 and item["image"][0, 0, -1] == 0.5  # -45 HU / 30 HU in W150 L30
    assert item["text"] == "The larger lesion in the right lobe" and item["id"] == "ct"
    no_inst = ds[1]
    assert no_inst["target_instance"] == -1 and bool((no_inst["instances"] == -1).all())
    batch = default_collate([ds[0], ds[1], ds[2]])  # mixed records still collate
    assert batch["image"].shape == (3, 3, 6, 8) and batch["target_instance"].tolist() == [2, -1, -1]


def test_text_levels(tmp_path: Path) -> None:
    recs = load_manifest(make_dataset(tmp_path / "d"))
    prep = Preprocessing(image_size=4)
    assert SegmentationDataset(recs, prep, text_level="half")[0]["text"] == "right lobe lesion"
    assert SegmentationDataset(recs, prep, text_level="quarter")[0]["text"] == recs[0].text  # falls back
    assert SegmentationDataset(recs, prep, text_level="none")[1]["text"] == ""
    with pytest.raises(ValueError, match="text_level must be"):
        SegmentationDataset(recs, prep, text_level="most")


def test_swap_left_right() -> None:
    assert swap_left_right("Right femur, left of the LEFT knee; leftmost") == "Left femur, right of the RIGHT knee; rightmost"
    assert swap_left_right("bright cleft") == "bright cleft"


def test_flip_swaps_or_refuses_never_silent(tmp_path: Path) -> None:
    recs = load_manifest(make_dataset(tmp_path / "d"))
    prep = Preprocessing(image_size=(H, W), intensity="range")
    plain = SegmentationDataset(recs, prep)[1]
    swap = SegmentationDataset(recs, prep, augment=Augmentation(hflip_p=1.0, text_flip="swap"))[1]
    assert swap["text"] == "Polyp on the Right" and torch.equal(swap["mask"], plain["mask"].flip(-1))
    refuse = SegmentationDataset(recs, prep, augment=Augmentation(hflip_p=1.0))[1]  # default policy: refuse
    assert refuse["text"] == "Polyp on the Left" and torch.equal(refuse["mask"], plain["mask"])
    no_text = SegmentationDataset([dataclasses.replace(recs[2], text="")], prep, augment=Augmentation(hflip_p=1.0))[0]
    assert torch.equal(no_text["mask"], plain["mask"].flip(-1))  # nothing to contradict: flipped
    a = SegmentationDataset(recs, prep, augment=Augmentation(hflip_p=0.5, contrast=0.2, seed=3, text_flip="swap"))
    b = SegmentationDataset(recs, prep, augment=Augmentation(hflip_p=0.5, contrast=0.2, seed=3, text_flip="swap"))
    assert all(torch.equal(a[i]["image"], b[i]["image"]) for i in range(3))  # seeded
    with pytest.raises(ValueError, match="text_flip must be one of swap, refuse"):
        Augmentation(text_flip="mirror")


def _break(root: Path) -> None:
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(root / "masks/rgb.png")  # wrong size


def test_on_error_raise_names_sample_and_file(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "d")
    _break(root)
    ds = SegmentationDataset(load_manifest(root), Preprocessing(image_size=4))
    with pytest.raises(SampleError, match=r"sample 'rgb' \(train\): .*manifest\.jsonl:\d+: field 'mask': .*masks/rgb\.png: mask size \(5, 5\) differs from image size \(12, 16\)"):
        ds[1]
    np.save(root / "images/ct.npy", np.full((H, W), np.nan, np.float32))
    with pytest.raises(SampleError, match=r"sample 'ct'.*field 'image': .*images/ct\.npy: 192 NaN/inf pixel value"):
        ds[0]
    (root / "images/rgb.png").unlink()
    with pytest.raises(SampleError, match=r"sample 'plain'.*images/rgb\.png: image file not found"):
        ds[2]


def test_on_error_skip_reports_which(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_dataset(tmp_path / "d")
    _break(root)
    ds = SegmentationDataset(load_manifest(root), Preprocessing(image_size=4), on_error="skip")
    log = SkipLog()
    for batch in DataLoader(ds, batch_size=2, collate_fn=Collator()):
        log.update(batch)
        assert batch["image"].shape[0] == len(batch["id"])
    assert log.summary() == "2 sample(s) skipped: plain, rgb"  # both use the broken masks/rgb.png
    assert "rgb" in ds.skipped and "mask size" in ds.skipped["rgb"]
    assert "skipping bad sample" in caplog.text


def test_collator_tokenises(tmp_path: Path) -> None:
    from lsms.text import Tokenizer

    recs = load_manifest(make_dataset(tmp_path / "d"))
    ds = SegmentationDataset(recs, Preprocessing(image_size=8))
    batch = Collator(Tokenizer(max_tokens=8))([ds[0], ds[1], {**ds[2], "text": ""}])
    assert batch["input_ids"].shape[0] == 3 and batch["input_ids"].shape[1] <= 8
    assert batch["attention_mask"].dtype == torch.int64 and batch["attention_mask"][2].sum() == 2  # "" = CLS SEP
    assert batch["truncated"].tolist() == [True, False, False]
    assert batch["mask"].shape == (3, 1, 8, 8) and batch["text"][1] == "Polyp on the Left"
