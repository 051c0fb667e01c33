"""Training augmentation: determinism, lesion-centred patches, positions, text-consistent flips, the recipes."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from lsms.data import Augmentation, Preprocessing, Record, SegmentationDataset, swap_left_right
from lsms.data.augment import draw, sample_view
from lsms.model.encoder import coordinate_grid
from lsms.train import add_arguments, config_from_args

from conftest import SHARED_DATA
from toy_data import make_toy_dataset

BTXRD = SHARED_DATA / "btxrd"
# the region phrases of BTXRD's descriptions (shared/data/README.md) and a real description around them
BTXRD_REGIONS = {  # region words -> the words after a horizontal flip
    "central region": "central region", "upper region": "upper region", "lower region": "lower region",
    "left side": "right side", "right side": "left side", "upper-left region": "upper-right region",
    "upper-right region": "upper-left region", "lower-left region": "lower-right region",
    "lower-right region": "lower-left region",
}


def _sample(h=64, w=64, lesion=((30, 40),), channels=3):
    image = torch.arange(channels * h * w, dtype=torch.float32).reshape(channels, h, w) / (h * w)
    mask = torch.zeros(h, w, dtype=torch.uint8)
    for y, x in lesion:
        mask[y, x] = 1
    instances = mask.long()
    return image, mask, instances


def test_draw_is_a_function_of_seed_epoch_and_index():
    aug = Augmentation(patch_size=32, spatial_p=1.0, scale=(0.7, 1.4), rotation=30, contrast=0.2, brightness=0.1,
                       gamma=(0.7, 1.5), noise=0.05, hflip_p=0.5, vflip_p=0.5, seed=3)
    image, mask, inst = _sample()
    a = draw(aug, 2, 5, image, mask, inst, "")
    b = draw(aug, 2, 5, image.clone(), mask.clone(), inst.clone(), "")
    for x, y in ((a.image, b.image), (a.mask, b.mask), (a.instances, b.instances), (a.coords, b.coords)):
        assert torch.equal(x, y)
    c = draw(aug, 3, 5, image, mask, inst, "")
    assert not torch.equal(a.image, c.image)  # another epoch, another draw


@pytest.mark.parametrize("seed", range(40))
def test_foreground_patch_never_loses_its_lesion(seed):
    # one-pixel lesions, also at the image border, under strong zoom-out / zoom-in and any rotation
    rng = np.random.default_rng(seed)
    lesion = (int(rng.integers(0, 96)), int(rng.choice([0, 1, 50, 94, 95])))
    image, mask, inst = _sample(96, 96, lesion=(lesion,))
    aug = Augmentation(patch_size=32, foreground_p=1.0, spatial_p=1.0, scale=(0.5, 2.0), rotation=180, seed=seed)
    view = draw(aug, seed, 0, image, mask, inst, "")
    assert view.mask.shape == (32, 32) and view.image.shape == (3, 32, 32) and view.coords.shape == (2, 32, 32)
    assert view.mask[16, 16] == 1  # the chosen lesion pixel lands on the patch centre
    assert view.instances[16, 16] == 1


def test_uniform_patches_cover_the_image_and_pad_outside():
    image, mask, inst = _sample(64, 96, lesion=())
    inst[:] = -1  # no instance map
    aug = Augmentation(patch_size=32, foreground_p=0.0)
    view = sample_view(aug, np.random.default_rng(0), image, mask, inst)
    assert view[2].eq(-1).all()  # "no instances" stays -1, padding too
    # without zoom or rotation a patch is an exact crop: its pixels are the image's, its coords the grid's
    grid = coordinate_grid(1, 64, 96)[0]
    x0 = int(((view[3][0, 0, 0] + 1) * 96 - 1) / 2 + 0.5)
    y0 = int(((view[3][1, 0, 0] + 1) * 64 - 1) / 2 + 0.5)
    torch.testing.assert_close(view[0], image[:, y0:y0 + 32, x0:x0 + 32])
    torch.testing.assert_close(view[3], grid[:, y0:y0 + 32, x0:x0 + 32])


def test_whole_image_view_is_the_identity_and_its_coords_are_the_model_grid():
    image, mask, inst = _sample(64, 64)
    aug = Augmentation(patch_size=64, foreground_p=0.0, hflip_p=0.0)
    view = draw(aug, 0, 0, image, mask, inst, "the lesion")
    assert torch.equal(view.image, image) and torch.equal(view.mask, mask) and torch.equal(view.instances, inst)
    torch.testing.assert_close(view.coords, coordinate_grid(1, 64, 64)[0])


def test_horizontal_flip_swaps_text_and_keeps_positions_of_the_mirrored_image():
    image, mask, inst = _sample(64, 64, lesion=((20, 5),))  # lesion near the left edge
    aug = Augmentation(patch_size=64, foreground_p=0.0, hflip_p=1.0, text_flip="swap")
    view = draw(aug, 0, 0, image, mask, inst, "located in the upper-left region")
    assert view.text == "located in the upper-right region"
    assert torch.equal(view.image, image.flip(-1)) and view.mask[20, 58] == 1
    # coords describe the mirrored image: the lesion is now at x > 0, as "right" says
    torch.testing.assert_close(view.coords, coordinate_grid(1, 64, 64)[0])
    assert view.coords[0, 20, 58] > 0
    refused = draw(Augmentation(hflip_p=1.0), 0, 0, image, mask, inst, "the right lesion")  # default: refuse
    assert refused.text == "the right lesion" and torch.equal(refused.image, image)


def test_vertical_flip_only_without_text():
    image, mask, inst = _sample()
    aug = Augmentation(hflip_p=0.0, vflip_p=1.0)
    assert torch.equal(draw(aug, 0, 0, image, mask, inst, "").image, image.flip(-2))
    with_text = draw(aug, 0, 0, image, mask, inst, "a lesion of the lower limb")
    assert torch.equal(with_text.image, image) and with_text.text == "a lesion of the lower limb"


@pytest.mark.parametrize("region", sorted(BTXRD_REGIONS))
def test_text_flip_on_btxrd_region_phrases(region):
    text = f"One malignant osteosarcoma lesion in the tibia of the lower limb (lateral view), located in the {region}."
    swapped = swap_left_right(text)
    assert swapped == text.replace(region, BTXRD_REGIONS[region])  # only the region's side changes
    assert swap_left_right(swapped) == text


@pytest.mark.skipif(not BTXRD.is_dir(), reason=f"BTXRD not found at {BTXRD}")
def test_text_flip_on_every_real_btxrd_description():
    from lsms.data import load_samples

    texts = [r.text for split in ("train", "val") for r in load_samples(BTXRD, split=split, allow_split_leak=True)]
    assert len(texts) == 1586
    for text in texts:
        swapped = swap_left_right(text)
        words, new = text.lower().split(), swapped.lower().split()
        assert len(words) == len(new)
        assert swapped.count("left") == text.count("right") and swapped.count("right") == text.count("left")
        # upper/lower (region or anatomy such as "lower limb") never change under a horizontal flip
        assert [w for w in new if "upper" in w or "lower" in w] == [
            w.replace("left", "#").replace("right", "left").replace("#", "right") for w in words
            if "upper" in w or "lower" in w]
        assert swap_left_right(swapped) == text


def test_dataset_patches_and_resume(tmp_path):
    data = make_toy_dataset(tmp_path / "toy", n_images=4, n_val=0)
    from lsms.data import load_samples

    records: list[Record] = load_samples(data, split="train")
    prep = Preprocessing(image_size=(64, 64), in_channels=1)
    aug = Augmentation(patch_size=32, spatial_p=0.5, scale=(0.8, 1.25), rotation=10, text_flip="swap", seed=7)
    ds = SegmentationDataset(records, prep, augment=aug)
    ds.set_epoch(4)
    item = ds[3]
    assert item["image"].shape == (1, 32, 32) and item["mask"].shape == (1, 32, 32) and item["coords"].shape == (2, 32, 32)
    again = SegmentationDataset(records, prep, augment=aug)  # a resumed run: new process, same epoch
    again.set_epoch(4)
    other = again[3]
    assert torch.equal(item["image"], other["image"]) and item["text"] == other["text"]
    assert "coords" not in SegmentationDataset(records, prep)[0]  # whole images: the model's default grid


@pytest.mark.parametrize("bad, message", [
    (dict(patch_size=48), "multiple of 32"), (dict(foreground_p=1.5), "foreground_p"),
    (dict(scale=(1.2, 0.8)), "scale"), (dict(rotation=float("nan")), "rotation"), (dict(text_flip="mirror"), "text_flip"),
])
def test_bad_augmentation_settings(bad, message):
    with pytest.raises(ValueError, match=message):
        Augmentation(**bad)


def _args(*argv):
    p = argparse.ArgumentParser()
    add_arguments(p)
    return config_from_args(p.parse_args(list(argv)))


def test_recipes():
    real = _args("data", "--recipe", "real")
    aug = real.data.augmentation
    assert real.data.augment and aug.patch_size == 224 and aug.text_flip == "swap"
    assert (real.model.coord_embed, real.model.output_stride, real.data.image_size) == (True, 2, 448)
    # flags override the recipe, key by key for the mappings
    mixed = _args("data", "--recipe", "real", "--augmentation", "patch_size=128", "--model", "coord_embed=false",
                  "--image-size", "256")
    assert mixed.data.augmentation.patch_size == 128 and mixed.data.augmentation.rotation == 15
    assert (mixed.model.coord_embed, mixed.model.output_stride, mixed.data.image_size) == (False, 2, 256)
    assert _args("data", "--paper-recipe") == _args("data", "--recipe", "paper")
    assert _args("data", "--recipe", "paper").optim.lr == 3e-5
    cpu = _args("data", "--recipe", "real-cpu")  # whole images: the patch is the image, never re-centred
    assert (cpu.data.image_size, cpu.data.augmentation.patch_size, cpu.data.augmentation.foreground_p) == (224, 224, 0)
    assert cpu.data.augmentation.spatial_p == 0 and cpu.data.augmentation.text_flip == "swap" and cpu.model.coord_embed
    with pytest.raises(ValueError, match="unknown recipe 'fast'.*paper.*real"):
        _args("data", "--recipe", "fast")
    with pytest.raises(ValueError, match="patch_size"):
        _args("data", "--recipe", "real", "--augmentation", "patch_size=100")
