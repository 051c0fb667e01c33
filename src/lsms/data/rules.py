"""The rules a dataset's records follow: one home for ``lsms check``, loading (:func:`lsms.data.load_samples`,
behind ``lsms train`` and ``lsms evaluate``) and the torch dataset, so that what check calls an error loading
refuses, and what check calls a warning loading warns about.

- **dataset rules** (:func:`dataset_problems`, no pixel read): records mixing modalities, and split leaks: the
  same patient, or the same image (one file, or byte-identical files) in two splits. Leaks make the numbers of
  a validation or test split dishonest.
- **sample rules** (:func:`read_sample`, on the files of one record): missing or unreadable files, a mask or an
  instance map that is a folder, sizes that differ from the image's, NaN/inf, a ``target_instance`` absent from
  its instance map or contradicted by its mask (errors); an empty or non-binary mask, a constant image
  (warnings).

The line rules of a manifest (JSON, fields, duplicate ids, empty text) are :mod:`lsms.data.manifest`'s.
Every message starts with where the record was read (``manifest.jsonl:12``) and names the field.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections import defaultdict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lsms.data.manifest import SPLITS, Record
from lsms.data.problems import Problem
from lsms.data.readers import ImageData, binary_mask, read_image, read_label_map, read_mask_image

LEAK_HINT = "move them to one split (splits are by patient)"


# ------------------------------------------------------------------------------------------- dataset rules


def dataset_problems(records: list[Record], source: str | Path) -> list[Problem]:
    """Every rule over a whole dataset (all its splits): modalities, then split leaks."""
    return [*modality_problems(records, source), *leak_problems(records)]


def modality_problems(records: list[Record], source: str | Path) -> list[Problem]:
    """Two named modalities are an error (one preprocessing cannot serve them); a modality on only some records a
    warning."""
    named = sorted({r.modality for r in records if r.modality})
    if len(named) > 1:
        counts = ", ".join(f"{m}: {sum(r.modality == m for r in records)}" for m in named)
        return [Problem("error", "mixed-modality", f"{source}: the samples mix modalities ({counts}); one model's "
                        "preprocessing cannot serve them all: split the dataset by modality", str(source))]
    if named and any(not r.modality for r in records):
        n = sum(not r.modality for r in records)
        return [Problem("warning", "mixed-modality", f"{source}: {n} sample(s) have no modality while the others are "
                        f"{named[0]!r}; set 'modality' on every record", str(source))]
    return []


def leak_problems(records: list[Record]) -> list[Problem]:
    """Split leaks found without decoding: one patient, one image file or byte-identical image files in two
    splits (a volume's slices share its file: one scan, one patient)."""
    problems = split_leaks(records, {r.id: r.patient for r in records}, "patient", "the same patient")
    keys = file_keys(records)
    return problems + split_leaks(records, keys, "image", "the same image file (or a byte-identical copy)")


def split_leaks(records: list[Record], key_of: dict[str, Hashable | None], name: str, what: str) -> list[Problem]:
    """One ``split-leak`` error per key whose records lie in more than one split.

    Args:
        records: the records of every split.
        key_of: record id -> what must not cross splits (None: no key).
        name: the field the key comes from, named in the message.
        what: the key in words.
    """
    groups: dict[Hashable, list[Record]] = defaultdict(list)
    for r in records:
        if (key := key_of.get(r.id)) is not None:
            groups[key].append(r)
    problems = []
    for group in groups.values():
        splits = [sp for sp in SPLITS if any(r.split == sp for r in group)]
        if len(splits) > 1:
            first = next(r for r in group if r.split == splits[0])
            shown = ", ".join(f"{sp}: {next(r.source for r in group if r.split == sp)}" for sp in splits)
            value = f" {getattr(first, name)!r}" if name == "patient" else f" ({first.image})"
            problems.append(Problem(
                "error", "split-leak", f"{first.source}: field {name!r}{value}: {what} appears in splits {splits} "
                f"({shown}); {LEAK_HINT}", str(first.image_path), first.id,
            ))
    return problems


def file_keys(records: list[Record]) -> dict[str, Hashable]:
    """record id -> what identifies its image file: its real path, or for regular files of a byte size that
    recurs in another split, the hash of their bytes (only those are read, so a large dataset costs a ``stat``
    per file)."""
    real = {r.id: os.path.realpath(r.image_path) for r in records}
    by_size: dict[int, set[str]] = defaultdict(set)
    splits_of: dict[str, set[str]] = defaultdict(set)
    for r in records:
        splits_of[real[r.id]].add(r.split)
    for path in splits_of:
        try:
            st = os.stat(path)
        except (OSError, ValueError):  # missing: the sample rules report it
            continue
        if stat.S_ISREG(st.st_mode):
            by_size[st.st_size].add(path)
    digest: dict[str, str] = {}
    for paths in by_size.values():
        if len(paths) > 1 and len(set().union(*(splits_of[p] for p in paths))) > 1:
            digest.update((p, d) for p in paths if (d := _file_digest(p)) is not None)
    return {rid: digest.get(path, path) for rid, path in real.items()}


def _file_digest(path: str) -> str | None:
    h = hashlib.blake2b(digest_size=16)
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError:
        return None
    return "bytes:" + h.hexdigest()


# ------------------------------------------------------------------------------------------- sample rules


@dataclass
class SampleFiles:
    """One record's files as read, with what the sample rules found.

    Attributes:
        image: the image (None when it could not be read).
        mask: the mask image as stored (None when it could not be read).
        instances: the instance label map, when the record has one and it could be read.
        problems: errors and warnings, each naming the record's line and field.
    """

    image: ImageData | None = None
    mask: ImageData | None = None
    instances: np.ndarray | None = None
    problems: list[Problem] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]


def read_sample(r: Record) -> SampleFiles:
    """Read a record's image, mask and instance map and apply the sample rules (module docstring)."""
    out = SampleFiles()

    def add(severity: str, code: str, name: str, message: str) -> None:
        path = (r.instances_path or r.mask_path) if name == "target_instance" else getattr(r, f"{name}_path")
        out.problems.append(Problem(severity, code, f"{r.source}: field {name!r}: {message}", str(path), r.id, r.split))

    out.image = _read(r, "image", lambda p: read_image(p, slice_index=r.slice_index), add)
    if out.image is not None:
        a = out.image.array
        finite = np.isfinite(a)
        if not finite.all():
            add("error", "nan-inf", "image", f"{r.image_path}: {int((~finite).sum())} NaN/inf pixel value(s)")
        elif float(a.max()) == float(a.min()):
            add("warning", "constant-image", "image", f"{r.image_path}: every pixel is {float(a.min()):g}")
    if r.volume_image_path is not None and not r.volume_image_path.exists():
        add("warning", "missing-volume", "volume_image", f"{r.volume_image_path} not found: a 2.5D model "
            "(--context-slices) cannot read this slice's neighbours (2D training does not need it)")
    out.mask = _read(r, "mask", lambda p: read_mask_image(p, slice_index=r.slice_index), add)
    if r.instances_path is not None:
        out.instances = _read(r, "instances", lambda p: read_label_map(p, slice_index=r.slice_index), add)
    for name, what, shape in (("mask", "mask", None if out.mask is None else out.mask.shape),
                              ("instances", "instance map", None if out.instances is None else out.instances.shape)):
        if out.image is not None and shape is not None and shape != out.image.shape:
            add("error", "size-mismatch", name, f"{getattr(r, f'{name}_path')}: {what} size {shape} differs from image "
                f"size {out.image.shape} ({r.image_path.name}); it must match its image pixel for pixel")
    _mask_rules(r, out, add)
    return out


def _read(r: Record, name: str, reader: Callable[[Path], object], add) -> object | None:
    path = getattr(r, f"{name}_path")
    try:
        mode = path.stat().st_mode
    except OSError:
        mode = None  # missing: the reader says so
    if mode is not None and stat.S_ISDIR(mode) and name != "image":  # an image may be a DICOM series folder
        add("error", "unreadable", name, f"{path} is a folder; give the {name} file")
        return None
    if mode is not None and not stat.S_ISDIR(mode) and not stat.S_ISREG(mode):  # reading a FIFO would block
        add("error", "unreadable", name, f"{path} is neither a file nor a folder (a FIFO, socket or device)")
        return None
    try:
        return reader(path)
    except FileNotFoundError as err:
        add("error", "missing-file", name, str(err))
    except (ValueError, OSError) as err:
        add("error", "unreadable", name, str(err))
    return None


def _mask_rules(r: Record, out: SampleFiles, add) -> None:
    """What the mask and ``target_instance`` say must agree with each other and with the instance map."""
    if out.mask is None:
        return
    m = out.mask.array.max(axis=-1) if out.mask.array.ndim == 3 else out.mask.array
    if not np.isfinite(m).all():
        add("error", "nan-inf", "mask", f"{r.mask_path}: the mask holds NaN/inf")
        return
    lesion = bool(binary_mask(out.mask).any())
    target = r.target_instance
    if out.instances is not None and target and not (out.instances == target).any():
        add("error", "missing-instance", "target_instance", f"{target} does not occur in the instance map "
            f"{r.instances_path}; the expression refers to a lesion the map does not hold")
    elif target and not lesion:
        add("error", "missing-instance", "target_instance", f"{target} names a lesion but the mask {r.mask_path} is "
            "empty; give the lesion's mask, or target_instance 0 for a negative expression")
    elif target == 0 and lesion:
        add("error", "mask-mismatch", "target_instance", f"0 marks a negative expression (no such lesion in the "
            f"image) but the mask {r.mask_path} holds lesion pixels; empty the mask or name the lesion's label")
    elif target is None and not lesion:
        add("warning", "empty-mask", "mask", f"{r.mask_path}: the mask has no lesion pixel")
    top = float(m.max())
    grey = int(((m != 0) & (m != top)).sum())
    if grey:
        add("warning", "non-binary-mask", "mask", f"{r.mask_path}: {grey} pixel(s) are neither 0 nor {top:g}; "
            f"{'JPEG masks are read as > 127' if out.mask.format == 'jpeg' else 'any non-zero pixel counts as lesion'}; "
            "save masks as 0/255 PNG")
