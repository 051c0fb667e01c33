"""Typed data settings of a training run (the ``data`` node of :class:`lsms.config.RunConfig`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from lsms.data.augment import Augmentation
from lsms.data.intensity import parse_window
from lsms.data.manifest import TEXT_LEVELS
from lsms.model.config import check_image_size
from lsms.settings import DictRoundTrip


@dataclass(frozen=True)
class DataConfig(DictRoundTrip):
    """What the network is trained on and how samples are read."""

    settings_name: ClassVar[str] = "data settings"

    path: str = ""  # manifest folder, LViT-layout folder, or images/ + masks/ folder
    image_size: int = 256
    in_channels: int | None = None  # None: 1 for CT manifests, 3 otherwise; the model gets the same number
    window: str | None = None  # CT only: a named window (liver, abdomen, ...) or "WIDTH,LEVEL" in HU; None: liver
    # 2.5D: the image with this many neighbouring slices of its volume on each side as channels (in_channels
    # 2 * context_slices + 1); the records must name their volume (Record.context_source). 0: 2D
    context_slices: int = 0
    train_split: str = "train"
    val_split: str = "val"
    text_level: str = "full"  # full | half | quarter | none  (training expressions)
    # train-time text augmentation: share of training items that get one of their record's ``variants``
    # (paraphrases written by ``lsms synth``: other phrasing files, details dropped or reordered) instead of
    # its expression; records without variants keep theirs
    paraphrase_p: float = 0.0
    augment: bool = False  # the paper trains without augmentation
    augmentation: Augmentation = field(default_factory=Augmentation)  # what augment does (patches, flips, ...)
    group_by_image: bool = False  # batches hold several expressions of the same image (referring signal)
    num_workers: int = 0
    eval_batch_size: int | None = None  # None: optim.batch_size
    allow_outside_root: bool = False  # read dataset files that resolve outside the dataset folder
    allow_split_leak: bool = False  # train on splits sharing a patient or an image (a warning instead of an error)

    def __post_init__(self) -> None:
        check_image_size(self.image_size, what="data.image_size (--image-size)")
        if self.text_level not in TEXT_LEVELS:
            raise ValueError(f"data.text_level must be one of {', '.join(TEXT_LEVELS)}, got {self.text_level!r}")
        if not 0.0 <= self.paraphrase_p <= 1.0:
            raise ValueError(f"data.paraphrase_p must be in [0, 1], got {self.paraphrase_p}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.augmentation.seed != 0:
            raise ValueError("data.augmentation.seed: the augmentation draws from the run's seed; set 'seed' instead")
        if isinstance(self.context_slices, bool) or not isinstance(self.context_slices, int) or self.context_slices < 0:
            raise ValueError(f"data.context_slices must be a non-negative integer, got {self.context_slices!r}")
        if self.context_slices and self.in_channels not in (None, self.channels):
            raise ValueError(f"data.context_slices={self.context_slices} gives {self.channels} input channels (the slice "
                             f"and its neighbours); leave in_channels unset or make it {self.channels}, got {self.in_channels}")
        if not self.context_slices and self.in_channels not in (None, 1, 3):
            raise ValueError(f"data.in_channels must be 1, 3 or null (from the modality), got {self.in_channels}")
        if self.window is not None:
            parse_window(self.window)  # a bad window is an error now, not after the data are read

    @property
    def channels(self) -> int | None:
        """The input channels these settings fix: ``2 * context_slices + 1`` for 2.5D, else ``in_channels`` (None:
        from the modality)."""
        return 2 * self.context_slices + 1 if self.context_slices else self.in_channels


__all__ = ["DataConfig"]
