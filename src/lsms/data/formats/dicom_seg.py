"""A predicted mask as a DICOM Segmentation (SEG) of the DICOM series it was predicted on, through highdicom.

The SEG is a binary segmentation with one segment, the lesion the sentence refers to: it references the source
series (its SeriesInstanceUID and every SOP instance a frame lies on), shares their FrameOfReferenceUID, and
carries the sentence (SegmentLabel: up to 64 characters, cut at a word; SegmentDescription: the whole sentence,
up to 1024) and the algorithm (lsms and its version). Frame ``k`` of the mask lies on slice ``k`` of the series as
:class:`~lsms.data.formats.dicom.DicomReader` orders it (along the slice normal); highdicom takes each frame's
position and orientation from its source image, so viewers overlay the SEG on the series exactly.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from lsms.data.formats.base import ImageReadError, first_line
from lsms.data.formats.dicom import _series_files

LABEL_CHARS = 64  # LO
DESCRIPTION_CHARS = 1024  # ST


def segment_label(text: str, limit: int = LABEL_CHARS) -> str:
    """The sentence as a DICOM LO value: one line, no backslash, at most ``limit`` characters (cut at a word, with
    "..." when cut); "lesion" for an empty sentence."""
    flat = re.sub(r"\s+", " ", text.replace("\\", "/")).strip()
    if not flat:
        return "lesion"
    if len(flat) <= limit:
        return flat
    cut = flat[: limit - 3]
    if " " in cut and flat[limit - 3] != " ":
        cut = cut.rsplit(" ", 1)[0]
    return cut.rstrip() + "..."


def write_dicom_seg(mask: np.ndarray, series: Path, path: Path, text: str, version: str,
                    series_uid: str | None = None) -> Path:
    """Write ``mask`` as a DICOM-SEG of the DICOM series in the folder ``series``, atomically.

    Args:
        mask: bool (Z, H, W), one frame per slice of the series in the reader's order.
        series: the series folder the mask was predicted on.
        path: the output file (``.dcm``).
        text: the sentence (the segment's label and description).
        version: the lsms version (the algorithm's version and the software version).
        series_uid: which series when the folder holds several.

    Raises:
        ValueError: the mask does not have the series' shape; the message names both.
    """
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    _, files = _series_files(Path(series), series_uid)
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    shape = (len(files), int(sources[0].Rows), int(sources[0].Columns))
    if mask.shape != shape:
        raise ValueError(f"{path}: the mask is {mask.shape} but the series {series} is {shape} (slices, rows, "
                         "columns); predict all of its slices in its own geometry")
    if "FrameOfReferenceUID" not in sources[0]:
        raise ImageReadError(f"{series}: the series has no FrameOfReferenceUID, so a segmentation cannot be placed on "
                             "it; write the mask as NIfTI (--format nifti)")
    algorithm = hd.AlgorithmIdentificationSequence(name="lsms", version=version,
                                                   family=codes.cid7162.ArtificialIntelligence)
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label=segment_label(text),
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm)
    segment.SegmentDescription = text[:DESCRIPTION_CHARS]  # ST: the whole sentence
    # the same mask of the same sentence on the same series gets the same UIDs (deterministic output)
    entropy = [sources[0].SeriesInstanceUID, text, version, hashlib.sha256(np.packbits(mask)).hexdigest()]
    hd_log = logging.getLogger("highdicom")
    level = hd_log.level
    hd_log.setLevel(max(level, logging.WARNING))  # it logs every module it copies at INFO
    try:
        seg = _segmentation(sources, mask, segment, text, version, entropy)
    except (AttributeError, KeyError, TypeError, ValueError) as err:  # a source image highdicom cannot derive from
        raise ImageReadError(f"{series}: cannot make a DICOM Segmentation of this series ({type(err).__name__}: "
                             f"{first_line(err)}); write the mask as NIfTI (--format nifti)") from err
    finally:
        hd_log.setLevel(level)
    if not text.isascii():
        seg.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: the sentence's characters as typed
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        seg.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _segmentation(sources: list, mask: np.ndarray, segment: Any, text: str, version: str, entropy: list[str]) -> Any:
    """highdicom's Segmentation of ``sources`` holding ``mask`` as ``segment``, with UIDs from ``entropy``."""
    import highdicom as hd
    import pydicom

    return hd.seg.Segmentation(
        source_images=sources, pixel_array=mask.astype(np.uint8), segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=pydicom.uid.generate_uid(entropy_srcs=[*entropy, "series"]),
        series_number=1000 + int(sources[0].get("SeriesNumber") or 0) % 1000,
        sop_instance_uid=pydicom.uid.generate_uid(entropy_srcs=[*entropy, "instance"]), instance_number=1,
        manufacturer="lsms", manufacturer_model_name="lsms referring lesion segmentation", software_versions=version,
        device_serial_number="none", content_label="LESION", content_description=segment_label(text),
        series_description=segment_label(f"lsms: {text}"), omit_empty_frames=bool(mask.any()))
