"""Torch dataset, augmentation and collation for training and evaluation.

Every item is a dict that PyTorch's default collation can batch:

| key | type | meaning |
|---|---|---|
| ``image`` | float32 (C, H, W) | preprocessed image (:func:`lsms.data.intensity.preprocess_image`) |
| ``mask`` | float32 (1, H, W) | target mask in {0, 1}, resized nearest |
| ``instances`` | int64 (H, W) | instance label map; all ``-1`` when the record has none |
| ``target_instance`` | int | label of the referred lesion; ``-1`` when the record has none |
| ``text`` | str | the expression at ``text_level`` (possibly with left/right swapped by a flip) |
| ``coords`` | float32 (2, H, W) | only with spatial augmentation: (x, y) in [-1, 1] of each pixel in the whole image |
| ``id`` | str | record id |
| ``negative`` | str | how a negative expression misses (the manifest's ``negative`` field, e.g. ``type``); else ``""`` |
| ``skipped`` | str | ids of bad samples this item stands in for (``on_error="skip"``), comma-joined; else ``""`` |

Tokenisation happens in :class:`Collator`, at batch time.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from lsms.data.augment import Augmentation, draw
from lsms.data.intensity import Preprocessing, input_mismatch, preprocess_image, resize_labels
from lsms.data.manifest import TEXT_LEVELS, Record
from lsms.data.readers import ImageReadError, VolumeCache, binary_mask
from lsms.data.rules import read_sample

log = logging.getLogger(__name__)

PARAPHRASE_STREAM = 1  # (seed, epoch, index, 1): the paraphrase draw, apart from the augmentation's (seed, epoch, index)


class SampleError(ValueError):
    """A sample could not be loaded; the message names the record and the file."""


class SegmentationDataset(Dataset):
    """Images, masks and expressions from :class:`Record` s, preprocessed for the model.

    Args:
        records: the samples (from :func:`lsms.data.load_samples`).
        preprocessing: how images become model input (saved with the model).
        augment: ``False``, ``True`` (default :class:`Augmentation`) or an :class:`Augmentation`.
        text_level: ``full``, ``half``, ``quarter`` or ``none`` (``""``; for classical segmentation).
            ``half``/``quarter`` fall back to ``text`` for records without ``texts``.
        on_error: ``raise`` stops at the first bad sample with its file and problem; ``skip`` replaces it by
            the next good one, logs it, lists it in the item's ``skipped`` key and in :attr:`skipped`.
        paraphrase_p: train-time text augmentation at ``text_level`` full: the share of items given one of their
            record's ``variants`` (paraphrases) instead of the expression; drawn from (seed, epoch, index) only.
        seed: the run's seed (for ``paraphrase_p``; the augmentation carries its own).
    """

    def __init__(
        self,
        records: list[Record],
        preprocessing: Preprocessing,
        augment: bool | Augmentation = False,
        text_level: str = "full",
        on_error: str = "raise",
        paraphrase_p: float = 0.0,
        seed: int = 0,
    ):
        if text_level not in TEXT_LEVELS:
            raise ValueError(f"text_level must be one of {', '.join(TEXT_LEVELS)}, got {text_level!r}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if not records:
            raise ValueError("the dataset has no records; check the data path and split")
        self.records = list(records)
        self.preprocessing = preprocessing
        self.augmentation = Augmentation() if augment is True else (augment or None)
        self.text_level = text_level
        self.on_error = on_error
        self.paraphrase_p = paraphrase_p
        self.seed = seed
        self.epoch = 0
        self.skipped: dict[str, str] = {}  # id -> problem, in this process
        self._warned: set[str] = set()  # the warning kinds logged already (once per dataset and worker)
        self._volumes = VolumeCache()  # 2.5D input (preprocessing.context_slices): the volumes the slices are from

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Change the augmentation draw (call once per epoch; workers see it from the next epoch's iterator)."""
        self.epoch = epoch

    def text_of(self, index: int) -> str:
        """The expression item ``index`` gets this epoch: the record's text at ``text_level``, or with
        ``paraphrase_p`` (level full) sometimes one of its ``variants``."""
        r = self.records[index]
        variants = r.extra.get("variants") if self.paraphrase_p and self.text_level == "full" else None
        if variants:
            rng = np.random.default_rng([self.seed, self.epoch, index, PARAPHRASE_STREAM])
            if rng.random() < self.paraphrase_p:
                return str(variants[int(rng.integers(len(variants)))])
        return r.text_at(self.text_level)

    def load(self, index: int) -> dict[str, Any]:
        """Read and preprocess one record; raises :class:`SampleError` naming the record and file."""
        r = self.records[index]
        prep = self.preprocessing
        sample = read_sample(r)  # the sample rules lsms check applies: an error there is an error here
        if sample.errors:
            raise SampleError(f"sample {r.id!r} ({r.split}): {sample.errors[0].message}")
        self._warn_once(sample.problems)
        image, instances = sample.image, sample.instances
        assert image is not None and sample.mask is not None
        mask = binary_mask(sample.mask)
        mismatch = input_mismatch(image.array, image.modality or r.modality, prep)
        if mismatch and "input-mismatch" not in self._warned:
            self._warned.add("input-mismatch")  # once per dataset (and worker): the cause is the data set, not a file
            log.warning("%s: %s (further such images are not reported)", r.image_path, mismatch)
        array = self._context(r, image.array) if prep.context_slices else image.array
        try:
            x = preprocess_image(array, prep)
        except ValueError as err:
            raise SampleError(f"sample {r.id!r} ({r.split}): {r.source}: field 'image': {err}") from err
        m = resize_labels(torch.from_numpy(mask.astype(np.uint8)), prep.image_size)
        text = self.text_of(index)
        if instances is not None:
            inst = resize_labels(torch.from_numpy(instances), prep.image_size)
            target = int(r.target_instance) if r.target_instance is not None else -1
        else:
            inst = torch.full(prep.image_size, -1, dtype=torch.int64)
            target = -1
        item = {"image": x.float(), "mask": m[None].float(), "instances": inst, "target_instance": target,
                "text": text, "id": r.id, "negative": str(r.extra.get("negative") or ""),
                "diameter_mm": r.diameter_mm or math.nan, "skipped": ""}  # NaN: no diameter stated
        if self.augmentation is not None:
            view = draw(self.augmentation, self.epoch, index, x, m, inst, text)
            item.update(image=view.image.float(), mask=view.mask[None].float(), instances=view.instances, text=view.text)
            if view.coords is not None:
                item["coords"] = view.coords
        return item

    def _context(self, r: Record, centre: np.ndarray) -> np.ndarray:
        """The 2.5D input of record ``r`` (H, W, 2c + 1): its image with its volume's neighbouring slices
        (:func:`lsms.data.readers.context_stack`); the record's own image is the middle channel."""
        c = self.preprocessing.context_slices
        where = f"sample {r.id!r} ({r.split})"
        source = r.context_source
        if source is None:
            raise SampleError(f"{where}: the model reads {2 * c + 1} neighbouring slices of a volume (context_slices="
                              f"{c}) but the record names no volume; give 'slice_index' into a volume image, or "
                              "'volume_image' and 'volume_slice' (lsms synth --volumes writes them)")
        path, k = source
        try:
            stack = self._volumes.context(path, k, c)
        except (ImageReadError, FileNotFoundError) as err:
            raise SampleError(f"{where}: {r.source}: the volume of its slice: {err}") from err
        if stack.shape[:2] != centre.shape:
            raise SampleError(f"{where}: slice {k} of {path} is {stack.shape[:2]} pixels but the record's image is "
                              f"{centre.shape}; 'volume_image' must be the volume the image was taken from")
        stack = stack.astype(np.result_type(stack, centre), copy=False)
        stack[..., c] = centre
        return stack

    def _warn_once(self, problems: list) -> None:
        """A sample rule's warning (empty mask, ...), logged for the first sample of each kind only."""
        for p in problems:
            if p.code not in self._warned:
                self._warned.add(p.code)
                log.warning("%s (further %s warnings are not reported; lsms check lists them all)", p.message, p.code)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self.on_error == "raise":
            return self.load(index)
        bad: list[str] = []
        for step in range(len(self.records)):
            j = (index + step) % len(self.records)
            try:
                item = self.load(j)
            except SampleError as err:
                rid = self.records[j].id
                if rid not in self.skipped:
                    log.warning("skipping bad sample: %s", err)
                self.skipped[rid] = str(err)
                bad.append(rid)
                continue
            item["skipped"] = ",".join(bad)
            return item
        raise SampleError(f"all {len(self.records)} samples failed to load; first problem: {next(iter(self.skipped.values()))}")


class SkipLog:
    """Collects the ``skipped`` ids of batches (works with DataLoader workers) and summarises them."""

    def __init__(self) -> None:
        self.ids: set[str] = set()

    def update(self, batch: dict[str, Any]) -> None:
        for joined in batch.get("skipped", []):
            if joined:
                self.ids.update(joined.split(","))

    def summary(self) -> str:
        """``"no samples skipped"`` or ``"N sample(s) skipped: a, b, ..."``."""
        if not self.ids:
            return "no samples skipped"
        ids = sorted(self.ids)
        more = f" ... (+{len(ids) - 20})" if len(ids) > 20 else ""
        return f"{len(ids)} sample(s) skipped: {', '.join(ids[:20])}{more}"


class Collator:
    """Batches dataset items and tokenises their texts (``collate_fn`` of a DataLoader).

    Args:
        tokenizer: an :class:`lsms.text.Tokenizer`; None for classical segmentation (no ``input_ids``).

    Returns (when called):
        ``image`` (B, C, H, W), ``mask`` (B, 1, H, W), ``instances`` (B, H, W), ``target_instance`` (B,),
        ``text``/``id``/``negative``/``skipped`` lists, ``coords`` (B, 2, H, W) when the items have them, and with a tokenizer ``input_ids``/``attention_mask`` (B, T) and
        ``truncated`` (B,).
    """

    def __init__(self, tokenizer: Any | None = None):
        self.tokenizer = tokenizer

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        if not items:
            raise ValueError("cannot collate an empty batch")
        batch: dict[str, Any] = {
            "image": torch.stack([it["image"] for it in items]),
            "mask": torch.stack([it["mask"] for it in items]),
            "instances": torch.stack([it["instances"] for it in items]),
            "target_instance": torch.tensor([it["target_instance"] for it in items], dtype=torch.int64),
            "text": [it["text"] for it in items],
            "id": [it["id"] for it in items],
            "negative": [it.get("negative", "") for it in items],
            "diameter_mm": [it.get("diameter_mm", math.nan) for it in items],
            "skipped": [it.get("skipped", "") for it in items],
        }
        if "coords" in items[0]:
            batch["coords"] = torch.stack([it["coords"] for it in items])
        if self.tokenizer is not None:
            batch.update(self.tokenizer(batch["text"]))
        return batch
