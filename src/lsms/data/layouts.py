"""Dataset layouts users have, and :func:`load_samples`, which recognises them.

- **manifest**: the project's format (a folder with ``manifest.jsonl``; ``docs/dataset-format.md``).
- **LViT**: ``Train_Folder``/``Val_Folder``/``Test_Folder``, each with ``img/``, ``labelcol/`` and
  ``<Split>_text.xlsx`` (columns ``Image``, ``Description``). Known variants handled: QaTa-COV19 masks named
  ``mask_<image>``, spreadsheet keys naming ``.png`` where the image is ``.tif`` (matched by file stem), and
  spreadsheet keys naming the mask (``mask_<image>``) instead of the image.
- **folder**: ``images/`` + ``masks/`` (Kvasir-SEG style), either directly or under ``train/``, ``val/``,
  ``test/``; masks are matched to images by file stem; no text (``text = ""``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

from lsms.data.formats import image_stem, is_image_name, preference
from lsms.data.manifest import MANIFEST_NAME, SPLITS, Record, manifest_path, outside_root, parse_manifest
from lsms.data.problems import Problem, raise_first
from lsms.data.rules import dataset_problems

log = logging.getLogger(__name__)

LVIT_FOLDERS = {"train": "Train_Folder", "val": "Val_Folder", "test": "Test_Folder"}
_IMAGE_DIRS = ("images", "image", "imgs", "img")
_MASK_DIRS = ("masks", "mask", "labels", "label")


def _index(folder: Path) -> dict[str, list[str]]:
    """stem -> file names in ``folder`` that a reader claims by their ending (sorted; hidden files ignored)."""
    out: dict[str, list[str]] = {}
    for p in sorted(folder.iterdir()):
        name = p.name
        if name.startswith(".") or not p.is_file() or not is_image_name(name):
            continue
        out.setdefault(image_stem(name), []).append(name)
    return out


def _pick(names: list[str], mask: bool = False) -> str:
    """The file of one stem to use: the first in the readers' order (for a mask, lossless formats first)."""
    return min(names, key=lambda n: preference(n, mask))


def _find_mask(masks: dict[str, list[str]], stem: str) -> str | None:
    for key in (stem, f"mask_{stem}", f"{stem}_mask", f"{stem}_segmentation"):
        if key in masks:
            return _pick(masks[key], mask=True)
    return None


def _unique_id(stem: str, used: set[str]) -> str:
    rid, n = stem, 1
    while rid in used:
        n += 1
        rid = f"{stem}~{n}"
    used.add(rid)
    return rid


# ----------------------------------------------------------------------------------------------- LViT


def is_lvit(root: Path) -> bool:
    return root.is_dir() and any((root / f).is_dir() for f in LVIT_FOLDERS.values())


def _spreadsheet(folder: Path, split_name: str) -> Path | None:
    expected = folder / f"{split_name}_text.xlsx"
    if expected.is_file():
        return expected
    others = sorted(p for p in folder.glob("*.xlsx") if not p.name.startswith(("~$", ".")))
    return others[0] if len(others) == 1 else None


def _read_text_rows(xlsx: Path) -> list[tuple[int, object, object]]:
    """(spreadsheet row number, Image cell, Description cell) for every non-empty row."""
    import openpyxl

    try:
        wb = openpyxl.load_workbook(xlsx, read_only=True, data_only=True)
    except Exception as err:  # openpyxl raises zipfile/KeyError/... on damaged files
        raise ValueError(f"{xlsx}: cannot read the spreadsheet ({err})") from err
    try:
        ws = wb.worksheets[0]
        rows = ws.iter_rows(values_only=True)
        header = next(rows, None)
        names = [str(h).strip().lower() if h is not None else "" for h in (header or ())]
        if "image" not in names or "description" not in names:
            raise ValueError(
                f"{xlsx}: the first sheet needs a header row with columns 'Image' and 'Description'; found {list(header or ())}"
            )
        ci, cd = names.index("image"), names.index("description")
        out = []
        for number, row in enumerate(rows, start=2):
            image = row[ci] if ci < len(row) else None
            text = row[cd] if cd < len(row) else None
            if (image is None or str(image).strip() == "") and (text is None or str(text).strip() == ""):
                continue
            out.append((number, image, text))
        return out
    finally:
        wb.close()


def scan_lvit(root: str | Path, split: str | None = None) -> tuple[list[Record], list[Problem]]:
    """Read an LViT-layout dataset, collecting problems instead of stopping at the first.

    Record paths are relative to ``root`` (e.g. ``Train_Folder/img/x.png``), ids are the image stems.
    """
    root = Path(root)
    records: list[Record] = []
    problems: list[Problem] = []
    used: set[str] = set()
    splits = [split] if split else list(LVIT_FOLDERS)
    for sp in splits:
        folder = root / LVIT_FOLDERS[sp]
        if not folder.is_dir():
            continue
        split_name = LVIT_FOLDERS[sp].split("_")[0]
        img_dir, mask_dir = folder / "img", folder / "labelcol"
        for d in (img_dir, mask_dir):
            if not d.is_dir():
                problems.append(Problem("error", "missing-file", f"{d}: folder missing; LViT splits hold img/ and labelcol/", str(d), split=sp))
        xlsx = _spreadsheet(folder, split_name)
        if xlsx is None:
            problems.append(Problem(
                "error", "missing-file", f"{folder / (split_name + '_text.xlsx')}: spreadsheet missing; LViT splits "
                "describe each image in <Split>_text.xlsx with columns Image and Description", str(folder), split=sp,
            ))
        if xlsx is None or not img_dir.is_dir() or not mask_dir.is_dir():
            continue
        images, masks = _index(img_dir), _index(mask_dir)
        try:
            rows = _read_text_rows(xlsx)
        except ValueError as err:
            problems.append(Problem("error", "unreadable", str(err), str(xlsx), split=sp))
            continue
        listed: set[str] = set()
        for number, key, desc in rows:
            where = f"{xlsx} row {number}"
            name = Path(str(key).strip()).name if key is not None else ""
            if not name:
                problems.append(Problem("error", "invalid-record", f"{where}: empty 'Image' cell", str(xlsx), split=sp))
                continue
            stem = image_stem(name)
            candidates = [stem, stem[5:]] if stem.startswith("mask_") else [stem]
            found = next((c for c in candidates if c in images), None)
            if found is None:
                problems.append(Problem(
                    "error", "missing-file", f"{img_dir / name}: image named in {where} not found in {img_dir}",
                    str(img_dir / name), stem, sp,
                ))
                continue
            image_name = name if name in images[found] else _pick(images[found])
            mask_name = _find_mask(masks, found)
            if mask_name is None:
                problems.append(Problem(
                    "error", "missing-file", f"{mask_dir / (found + '.png')}: no mask for image {image_name} "
                    f"(looked for {found}.*, mask_{found}.* in {mask_dir})", str(mask_dir), found, sp,
                ))
                continue
            text = "" if desc is None else " ".join(str(desc).split())
            rid = _unique_id(found, used)
            if not text:
                problems.append(Problem(
                    "error", "empty-text", f"{xlsx} row {number}: empty 'Description' for image {image_name}",
                    str(xlsx), rid, sp,
                ))
            listed.add(found)
            records.append(Record(
                id=rid, image=f"{LVIT_FOLDERS[sp]}/img/{image_name}", mask=f"{LVIT_FOLDERS[sp]}/labelcol/{mask_name}",
                text=text, split=sp, root=root, origin=where,
            ))
        unlisted = sorted(set(images) - listed)
        if unlisted:
            problems.append(Problem(
                "warning", "unlisted-image", f"{img_dir}: {len(unlisted)} image(s) have no row in {xlsx.name} and are "
                f"left out, e.g. {unlisted[:3]}", str(img_dir), split=sp,
            ))
    if not records and not problems:
        wanted = LVIT_FOLDERS[split] if split else "Train_Folder, Val_Folder or Test_Folder"
        why = "no samples found in" if is_lvit(root) else "not an LViT dataset: there is no"
        hint = "" if is_lvit(root) else " (an images/ + masks/ dataset is the 'folder' layout)"
        problems.append(Problem("error", "empty-dataset", f"{root}: {why} {wanted}{hint}", str(root), split=split))
    return records, problems


def load_lvit(root: str | Path, split: str | None = None) -> list[Record]:
    """Read an LViT-layout dataset; raises on the first error (missing file, empty description, ...)."""
    records, problems = scan_lvit(root, split)
    _log_warnings(problems)
    raise_first(problems)
    return records


# ------------------------------------------------------------------------------------- images/ + masks/


def _pair_dirs(folder: Path) -> tuple[Path, Path] | None:
    img = next((folder / d for d in _IMAGE_DIRS if (folder / d).is_dir()), None)
    msk = next((folder / d for d in _MASK_DIRS if (folder / d).is_dir()), None)
    return (img, msk) if img is not None and msk is not None else None


def folder_splits(root: Path) -> dict[str, tuple[Path, Path]]:
    """split -> (images dir, masks dir); a root with images/ + masks/ directly counts as ``train``."""
    if not root.is_dir():
        return {}
    out = {sp: pair for sp in SPLITS if (pair := _pair_dirs(root / sp)) is not None}
    if not out and (pair := _pair_dirs(root)) is not None:
        out["train"] = pair
    return out


def scan_image_folder(root: str | Path, split: str | None = None) -> tuple[list[Record], list[Problem]]:
    """Read an ``images/`` + ``masks/`` dataset (no text), collecting problems."""
    root = Path(root)
    records: list[Record] = []
    problems: list[Problem] = []
    used: set[str] = set()
    for sp, (img_dir, mask_dir) in folder_splits(root).items():
        if split and sp != split:
            continue
        images, masks = _index(img_dir), _index(mask_dir)
        matched: set[str] = set()
        for stem, names in images.items():
            image_name = _pick(names)
            mask_name = _find_mask(masks, stem)
            if mask_name is None:
                problems.append(Problem(
                    "error", "missing-file", f"{mask_dir / (stem + '.png')}: no mask for image {img_dir / image_name}",
                    str(mask_dir), stem, sp,
                ))
                continue
            matched.add(image_stem(mask_name))
            records.append(Record(
                id=_unique_id(stem, used), image=str((img_dir / image_name).relative_to(root)),
                mask=str((mask_dir / mask_name).relative_to(root)), text="", split=sp, root=root,
            ))
        orphans = sorted(set(masks) - matched)
        if orphans:
            problems.append(Problem(
                "warning", "unlisted-image", f"{mask_dir}: {len(orphans)} mask(s) have no image, e.g. {orphans[:3]}",
                str(mask_dir), split=sp,
            ))
    if not records and not any(p.severity == "error" for p in problems):
        problems.append(Problem("error", "empty-dataset", f"{root}: no image/mask pairs found" + (f" in split {split!r}" if split else ""), str(root), split=split))
    return records, problems


def load_image_folder(root: str | Path, split: str | None = None) -> list[Record]:
    """Read an ``images/`` + ``masks/`` dataset (Kvasir-SEG style); text is ``""``."""
    records, problems = scan_image_folder(root, split)
    _log_warnings(problems)
    raise_first(problems)
    return records


# ------------------------------------------------------------------------------------------ dispatch


def detect_layout(path: str | Path) -> str:
    """``manifest``, ``lvit`` or ``folder``; raises with the accepted layouts when none fits."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: dataset path not found")
    if p.is_file():
        if p.suffix == ".jsonl":
            return "manifest"
        raise ValueError(f"{p}: a dataset is a folder (or its {MANIFEST_NAME}), not a single file")
    if (p / MANIFEST_NAME).is_file():
        return "manifest"
    if is_lvit(p):
        return "lvit"
    if folder_splits(p):
        return "folder"
    raise ValueError(
        f"{p}: not a dataset folder; expected one of: {MANIFEST_NAME} (lsms format), Train_Folder/Val_Folder/"
        "Test_Folder with img/ labelcol/ and <Split>_text.xlsx (LViT), or images/ + masks/ (optionally under "
        "train/ val/ test/)"
    )


def scan_samples(
    path: str | Path, split: str | None = None, allow_outside_root: bool = False
) -> tuple[str, list[Record], list[Problem]]:
    """Detect the layout and read it leniently: (layout, records, problems).

    Records whose files resolve outside the dataset folder (absolute paths, ``..``, symbolic links to
    elsewhere) are dropped with an ``outside-root`` error unless ``allow_outside_root``; nothing outside is
    opened. The dataset rules of :mod:`lsms.data.rules` (modalities, split leaks) see every split, also when
    ``split`` keeps one: a leak concerns the dataset, whichever split is asked for.
    """
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    layout = detect_layout(path)
    if layout == "manifest":
        records, problems = parse_manifest(path)
    elif layout == "lvit":
        records, problems = scan_lvit(path)
    else:
        records, problems = scan_image_folder(path)
    if not allow_outside_root:
        records = [r for r in records if not _outside(r, layout, path, problems)]
    problems.extend(dataset_problems(records, manifest_path(path) if layout == "manifest" else path))
    if split:
        records = [r for r in records if r.split == split]
        problems = [p for p in problems if p.split in (None, split)]
    if not records and not any(p.severity == "error" for p in problems):
        where = f" in split {split!r}" if split else ""
        problems.append(Problem("error", "empty-dataset", f"{path}: no samples{where}", str(path), split=split))
    return layout, records, problems


def _outside(r: Record, layout: str, path: str | Path, problems: list[Problem]) -> bool:
    found = outside_root(r)
    source = manifest_path(path) if layout == "manifest" else Path(path)
    for name, rel, real in found:
        problems.append(Problem(
            "error", "outside-root", f"{r.origin or source}: sample {r.id!r}: field {name!r} ({rel}) resolves to {real}, outside the "
            f"dataset folder {os.path.realpath(r.root)}; move the file into the dataset, or pass --allow-outside-root "
            "if you trust this dataset", str(source), r.id, r.split,
        ))
    return bool(found)


def load_samples(path: str | Path, split: str | None = None, allow_outside_root: bool = False,
                 allow_split_leak: bool = False) -> list[Record]:
    """Load a dataset in any supported layout (manifest folder, LViT, images/ + masks/).

    Args:
        path: the dataset folder (or its ``manifest.jsonl``).
        split: keep only ``train``, ``val`` or ``test``.
        allow_outside_root: accept files that resolve outside the dataset folder (off by default).
        allow_split_leak: load a dataset whose splits share a patient or an image, with a warning (off by default:
            the numbers of its validation and test splits would be dishonest).

    Returns:
        The records, paths resolvable through ``record.image_path`` / ``record.mask_path``.

    Raises:
        FileNotFoundError: the path, or a file the layout names, is missing.
        ValueError: the layout is not recognised, a record is invalid (the message names file and line), a file
            lies outside the dataset folder, the records mix modalities, or a patient or an image is in two splits.
    """
    _, records, problems = scan_samples(path, split, allow_outside_root)
    problems = [_leak_at_load(p, allow_split_leak) if p.code == "split-leak" else p for p in problems]
    _log_warnings(problems)
    raise_first(problems)
    if not records:
        raise ValueError(f"{manifest_path(path) if Path(path).is_file() else path}: the dataset has no samples")
    return records


def _leak_at_load(p: Problem, allowed: bool) -> Problem:
    if allowed:
        return dataclasses.replace(p, severity="warning", message=f"{p.message} (loaded anyway: allow_split_leak; the "
                                   "validation and test numbers of this dataset overstate the model)")
    return dataclasses.replace(p, message=f"{p.message}; or load it anyway with --allow-split-leak (lsms train, "
                               "lsms evaluate)")


def _log_warnings(problems: list[Problem]) -> None:
    for p in problems:
        if p.severity == "warning":
            log.warning("%s", p.message)
