"""Data: the manifest format, image readers, dataset layouts, preprocessing, torch dataset and checks."""

from lsms.data.augment import Augmentation, swap_left_right
from lsms.data.config import DataConfig
from lsms.data.dataset import Collator, SampleError, SegmentationDataset, SkipLog
from lsms.data.intensity import (
    CT_WINDOWS,
    Preprocessing,
    apply_window,
    default_preprocessing,
    percentile_scale,
    preprocess_image,
    resize_image,
    resize_labels,
)
from lsms.data.layouts import detect_layout, load_image_folder, load_lvit, load_samples, scan_samples
from lsms.data.manifest import (
    MANIFEST_NAME,
    TEXT_LEVELS,
    Record,
    common_modality,
    load_manifest,
    write_manifest,
)
from lsms.data.problems import Problem
from lsms.data.readers import (
    Geometry,
    ImageData,
    Volume,
    read_image,
    read_label_map,
    read_mask,
    read_volume,
    write_mask_like,
)

__all__ = [
    "CT_WINDOWS", "MANIFEST_NAME", "TEXT_LEVELS", "Augmentation", "Collator", "DataConfig", "Geometry", "ImageData", "Preprocessing", "Problem",
    "Record", "SampleError", "common_modality", "SegmentationDataset", "SkipLog", "apply_window", "default_preprocessing",
    "detect_layout", "load_image_folder", "load_lvit", "load_manifest", "load_samples", "percentile_scale",
    "preprocess_image", "read_image", "read_label_map", "read_mask", "resize_image", "resize_labels",
    "scan_samples", "swap_left_right", "write_manifest", "write_mask_like", "Volume", "read_volume",
]
