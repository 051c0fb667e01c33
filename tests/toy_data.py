"""A tiny referring dataset in the manifest format, for training/evaluation/prediction tests.

Each image holds two bright discs (left and right); one record per disc, its text naming the side, so a
model must read the text to pick the right one. 64x64 grey PNGs, instance maps, train/val splits.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

TINY_TEXT = dict(model_type="bert", hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)


def make_toy_dataset(root: str | Path, n_images: int = 8, n_val: int = 4, size: int = 64, seed: int = 0) -> Path:
    root = Path(root)
    for sub in ("images", "masks", "instances"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    lines = []
    for i in range(n_images + n_val):
        split = "train" if i < n_images else "val"
        image = rng.normal(60, 10, (size, size))
        instances = np.zeros((size, size), np.uint8)
        for k, cx in enumerate((size * 0.3, size * 0.7), start=1):
            cy = rng.uniform(size * 0.3, size * 0.7)
            r = rng.uniform(size * 0.08, size * 0.15)
            disc = (yy - cy) ** 2 + (xx - cx + rng.uniform(-3, 3)) ** 2 < r**2
            image[disc] += 120
            instances[disc] = k
        name = f"img{i:03d}"
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / "images" / f"{name}.png")
        Image.fromarray(instances).save(root / "instances" / f"{name}.png")
        for k, side in ((1, "left"), (2, "right")):
            Image.fromarray(((instances == k) * 255).astype(np.uint8)).save(root / "masks" / f"{name}_{k}.png")
            text = f"the round lesion on the {side} side of the image"
            lines.append({
                "id": f"{name}_{k}", "image": f"images/{name}.png", "mask": f"masks/{name}_{k}.png", "text": text,
                "texts": {"full": text, "half": f"lesion on the {side}", "quarter": "a lesion"},
                "split": split, "instances": f"instances/{name}.png", "target_instance": k,
                "patient": name, "modality": "XR",
            })
    with open(root / "manifest.jsonl", "w", encoding="utf-8") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")
    return root


def add_negatives(root: str | Path) -> Path:
    """Adds to a toy dataset one negative expression per image: a sentence about a lesion that is not there
    (the toy images hold no square), with an empty mask and ``target_instance`` 0."""
    root = Path(root)
    lines = [json.loads(x) for x in (root / "manifest.jsonl").read_text().splitlines()]
    images = {}
    for r in lines:
        images.setdefault(r["image"], r)
    for image, r in images.items():
        name = Path(image).stem
        size = np.asarray(Image.open(root / r["mask"])).shape
        Image.fromarray(np.zeros(size, np.uint8)).save(root / "masks" / f"{name}_none.png")
        lines.append({"id": f"{name}_none", "image": image, "mask": f"masks/{name}_none.png",
                      "text": "the square lesion in the middle of the image", "split": r["split"],
                      "instances": r["instances"], "target_instance": 0, "patient": r["patient"], "modality": "XR",
                      "negative": "type"})
    with open(root / "manifest.jsonl", "w", encoding="utf-8") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")
    return root


def tiny_model() -> dict:
    """A very small LSMS with a tiny random text encoder, as settings (plain data)."""
    return dict(preset="tiny", widths=[16, 32, 32, 64], depths=[1, 1, 1, 1], ham_channels=32, head_channels=32,
                nmf_rank=4, conv_kernels=[7], text={"hf_config": dict(TINY_TEXT), "pretrained": False})


def tiny_train_settings(dataset: Path, out: Path, /, **overrides) -> dict:
    """The settings tree (plain data) of a seconds-long CPU run; ``overrides`` deep-merge into it
    (``optim={"epochs": 1}``, ``save_every=2``). fp32 (``amp: off``): ``auto`` would time the step to choose,
    and a choice that depends on the machine's load cannot give the same numbers twice."""
    from lsms.config import merge_into

    tree = dict(
        out=str(out), model=tiny_model(), data={"path": str(dataset), "image_size": 64},
        optim={"epochs": 2, "batch_size": 4, "lr": 1e-3, "warmup_steps": 2},
        device="cpu", amp="off", progress=False, log_every=1, seed=0,
    )
    return merge_into(tree, overrides)


def tiny_run_config(dataset: Path, out: Path, /, **overrides):
    """:func:`tiny_train_settings` as a RunConfig."""
    from lsms.config import RunConfig

    return RunConfig.from_dict(tiny_train_settings(dataset, out, **overrides))


def make_untrained_checkpoint(path: str | Path, in_channels: int = 1, image_size: int = 64, ct: bool = True,
                              model=None, use_text: bool = True, context_slices: int = 0) -> Path:
    """A loadable checkpoint of a tiny random model, or of ``model`` (prediction tests need no training); with
    ``context_slices`` a 2.5D model (``2 * context_slices + 1`` channels)."""
    import dataclasses

    import torch

    from lsms.checkpoint import make_checkpoint, save_checkpoint
    from lsms.config import RunConfig
    from lsms.data import default_preprocessing
    from lsms.model import build, model_config_from_dict
    from lsms.spec import ModelSpec

    torch.manual_seed(0)
    if model is None:
        model = build(model_config_from_dict({**tiny_model(), "in_channels": in_channels, "use_text": use_text}))
    prep = default_preprocessing("CT" if ct else None, image_size, in_channels=in_channels)
    prep = dataclasses.replace(prep, context_slices=context_slices)
    return save_checkpoint(make_checkpoint(model, ModelSpec(model.config, prep), RunConfig(model=model.config)), path)


def make_text_sensitive_checkpoint(path: str | Path) -> Path:
    """A tiny random CT model (liver window, 64 px) whose language branches are open.

    A fresh LSMS starts with every language-guided branch closed (w_f's InstanceNorm scale 0), so an untrained
    model ignores the sentence; random scales make two sentences give two different masks, as a trained
    model does.
    """
    import torch

    from lsms.checkpoint import load_checkpoint, save_checkpoint

    make_untrained_checkpoint(path, in_channels=1)
    ckpt = load_checkpoint(path)
    g = torch.Generator().manual_seed(0)
    for key, value in ckpt["model"].items():
        if key.endswith("language.w_f.1.weight"):
            ckpt["model"][key] = torch.randn(value.shape, generator=g)
    return save_checkpoint(ckpt, path)
