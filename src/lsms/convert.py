"""``lsms convert {lvit,folder} SRC OUT``: write a dataset in the project's manifest format.

Images are copied byte for byte (or hard-linked with ``--link``); masks are re-encoded as 0/255 PNG (the
manifest format's mask convention), so JPEG or 0/1 masks become clean binary files.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from lsms.data.layouts import load_image_folder, load_lvit
from lsms.data.manifest import Record, load_manifest, write_manifest
from lsms.data.readers import read_mask

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("layout", choices=["lvit", "folder"], help="source layout: LViT (Train_Folder/...) or images/ + masks/")
    parser.add_argument("src", help="source dataset folder")
    parser.add_argument("out", help="output folder (created; must be empty or absent)")
    parser.add_argument("--modality", help="modality written to every record (e.g. XR, CT, endoscopy)")
    parser.add_argument("--link", action="store_true", help="hard-link images instead of copying (same file system)")
    parser.add_argument("--split", choices=["train", "val", "test"], help="convert one split only")


def convert(layout: str, src: str | Path, out: str | Path, modality: str | None = None, link: bool = False,
            split: str | None = None) -> Path:
    """Convert an LViT or images/ + masks/ dataset to a manifest folder; returns the manifest path.

    Raises:
        FileNotFoundError / ValueError: the source has errors (the first one, naming its file) or ``out`` is
            not empty.
    """
    src, out = Path(src), Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out}: output folder is not empty; choose a new folder")
    if out.resolve() == src.resolve():
        raise ValueError(f"{out}: output folder must differ from the source")
    records = load_lvit(src, split) if layout == "lvit" else load_image_folder(src, split)
    new: list[Record] = []
    for r in records:
        image_rel = f"images/{r.split}/{Path(r.image).name}"
        mask_rel = f"masks/{r.split}/{r.id}.png"
        (out / image_rel).parent.mkdir(parents=True, exist_ok=True)
        (out / mask_rel).parent.mkdir(parents=True, exist_ok=True)
        if link:
            os.link(r.image_path, out / image_rel)
        else:
            shutil.copyfile(r.image_path, out / image_rel)
        mask = read_mask(r.mask_path)
        Image.fromarray(mask.astype(np.uint8) * 255).save(out / mask_rel)
        new.append(Record(id=r.id, image=image_rel, mask=mask_rel, text=r.text, split=r.split, modality=modality,
                          extra={"source": str(Path(r.image))}, root=out))
    path = write_manifest(out, new)
    log.info("wrote %d records to %s", len(new), path)
    return path


def run(args: argparse.Namespace) -> int:
    path = convert(args.layout, args.src, args.out, modality=args.modality, link=args.link, split=args.split)
    counts = Counter(r.split for r in load_manifest(path.parent))
    print(f"{path}: " + ", ".join(f"{sp} {n}" for sp, n in sorted(counts.items())))
    return 0
