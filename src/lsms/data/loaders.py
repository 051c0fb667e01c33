"""Datasets and loaders of a run: the train / val datasets its :class:`DataConfig` asks for, the training
sampler, and the evaluation loader (every sample exactly once over the processes, in order)."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from lsms.data.config import DataConfig
from lsms.data.dataset import Collator, SegmentationDataset
from lsms.data.intensity import Preprocessing, default_preprocessing, parse_window
from lsms.data.layouts import load_samples
from lsms.distributed import DistEnv, GroupedSampler, ShardSampler

log = logging.getLogger(__name__)


def build_datasets(cfg: DataConfig, seed: int, preprocessing: Preprocessing | None = None
                   ) -> tuple[Preprocessing, SegmentationDataset, SegmentationDataset | None]:
    """(preprocessing, train dataset, val dataset or None). A resumed run passes its saved ``preprocessing``."""
    if not cfg.path:
        raise ValueError("no training data: give DATA (a manifest folder, LViT-layout folder or images/ + masks/)")
    allowed = {"allow_outside_root": cfg.allow_outside_root, "allow_split_leak": cfg.allow_split_leak}
    train_records = load_samples(cfg.path, split=cfg.train_split, **allowed)
    try:
        val_records = load_samples(cfg.path, split=cfg.val_split, **allowed)
    except ValueError as err:
        if "no samples" not in str(err):
            raise
        log.warning("no %r split in %s: training without validation (best.pt follows nothing)", cfg.val_split, cfg.path)
        val_records = []
    if preprocessing is None:
        named = sorted({r.modality for r in train_records + val_records if r.modality})
        if len(named) > 1:
            raise ValueError(f"{cfg.path}: the {cfg.train_split} and {cfg.val_split} splits mix modalities {named}; "
                             "one preprocessing cannot serve them all")
        modality = named[0] if named else None  # records without one are taken to share it (lsms check warns)
        is_ct = modality is not None and modality.upper() == "CT"
        channels = cfg.channels or (1 if is_ct else 3)
        preprocessing = default_preprocessing(modality, cfg.image_size, in_channels=channels)
        preprocessing = dataclasses.replace(preprocessing, context_slices=cfg.context_slices)
        if cfg.window is not None:
            if not is_ct:
                raise ValueError(f"--window applies to CT data (modality CT); {cfg.path} has modality {modality!r}")
            preprocessing = dataclasses.replace(preprocessing, **parse_window(cfg.window))
    # draws depend on (seed, epoch, index) only
    augment = dataclasses.replace(cfg.augmentation, seed=seed) if cfg.augment else False
    train_set = SegmentationDataset(train_records, preprocessing, augment=augment, text_level=cfg.text_level,
                                    paraphrase_p=cfg.paraphrase_p, seed=seed)
    val_set = SegmentationDataset(val_records, preprocessing, augment=False, text_level="full") if val_records else None
    return preprocessing, train_set, val_set


def train_sampler(train_set: SegmentationDataset, cfg: DataConfig, batch_size: int, env: DistEnv,
                  seed: int) -> Sampler[int]:
    """This rank's shuffled training indices; with ``group_by_image`` the expressions of one image share a batch."""
    if cfg.group_by_image:
        groups: dict[tuple[str, Any], list[int]] = {}
        for i, r in enumerate(train_set.records):
            groups.setdefault((str(r.image_path), r.slice_index), []).append(i)
        return GroupedSampler(list(groups.values()), batch_size, env.rank, env.world_size, seed)
    return DistributedSampler(train_set, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=seed,
                              drop_last=True)


def make_loader(dataset, batch_size: int, env: DistEnv, num_workers: int = 0, tokenizer=None) -> DataLoader:
    """Evaluation loader: this rank's shard of ``dataset`` in order, no padding, no shuffling."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return DataLoader(
        dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), env.rank, env.world_size),
        collate_fn=Collator(tokenizer), num_workers=num_workers, pin_memory=env.device.type == "cuda",
        generator=torch.Generator().manual_seed(0),  # worker seeds must not draw from (and shift) the global RNG
    )


__all__ = ["build_datasets", "make_loader", "train_sampler"]
