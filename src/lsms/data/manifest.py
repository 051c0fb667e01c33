"""The project's dataset format: a folder with ``manifest.jsonl``, one :class:`Record` per line.

See ``docs/dataset-format.md`` for the field table. Records are validated on load; every error names the
manifest file, the line number and the field.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lsms.data.problems import Problem, raise_first

MANIFEST_NAME = "manifest.jsonl"
SPLITS = ("train", "val", "test")
WRITTEN_LEVELS = ("full", "half", "quarter")  # the expressions a manifest record can hold
TEXT_LEVELS = (*WRITTEN_LEVELS, "none")  # what a model can be given: "none" is an empty sentence
_KNOWN = (
    "id", "image", "mask", "text", "split", "texts", "instances", "target_instance", "attributes",
    "spacing", "patient", "modality", "slice_index", "volume_image", "volume_slice",
)


@dataclass
class Record:
    """One (image, expression, target mask) sample.

    Paths are relative to ``root`` (the dataset folder); ``root`` itself is not written to the manifest.

    Attributes:
        id: unique sample id.
        image: image file, or a DICOM series folder (then ``slice_index`` picks the slice).
        mask: target mask (any non-zero pixel is lesion).
        text: the referring expression; ``""`` for datasets without text.
        split: ``train``, ``val`` or ``test``.
        texts: expression at several levels of detail (keys from ``full``, ``half``, ``quarter``).
        instances: instance label map (0 = background, k = lesion k).
        target_instance: label of the referred lesion in ``instances``; 0 for a negative expression (it
            describes a lesion that is not in the image; the mask is empty).
        attributes: structured attributes of the referred lesion.
        spacing: pixel spacing (row, column) in mm.
        patient: patient id (splits are by patient).
        modality: ``CT``, ``XR``, ``endoscopy``, ... (chooses the default preprocessing).
        slice_index: slice of a 3D NIfTI volume or a DICOM series.
        volume_image: the volume a 2D slice image was taken from (a 2.5D model reads the neighbouring slices
            there); with ``volume_slice``, which slice it is.
        volume_slice: the slice's index in its volume.
        extra: unknown manifest fields, kept and written back unchanged.
        root: the dataset folder the paths are relative to.
        origin: where the record was read (``manifest.jsonl:12``, ``Train_text.xlsx row 5``); not written.
    """

    id: str
    image: str
    mask: str
    text: str
    split: str
    texts: dict[str, str] | None = None
    instances: str | None = None
    target_instance: int | None = None
    attributes: dict[str, Any] | None = None
    spacing: tuple[float, float] | None = None
    patient: str | None = None
    modality: str | None = None
    slice_index: int | None = None
    volume_image: str | None = None
    volume_slice: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    root: Path = field(default_factory=Path)
    origin: str = field(default="", compare=False, repr=False)

    @property
    def source(self) -> str:
        """Where the record was read, for messages: its manifest line (or spreadsheet row), else its image."""
        return self.origin or str(self.image_path)

    @property
    def image_path(self) -> Path:
        return self.root / self.image

    @property
    def mask_path(self) -> Path:
        return self.root / self.mask

    @property
    def instances_path(self) -> Path | None:
        return None if self.instances is None else self.root / self.instances

    @property
    def volume_image_path(self) -> Path | None:
        return None if self.volume_image is None else self.root / self.volume_image

    @property
    def context_source(self) -> tuple[Path, int] | None:
        """(volume file, slice index) a 2.5D model reads the neighbouring slices from: ``volume_image`` and
        ``volume_slice`` where set, else the image itself when ``slice_index`` picks a slice of it; None for a 2D
        image without a volume."""
        if self.volume_image_path is not None and self.volume_slice is not None:
            return self.volume_image_path, self.volume_slice
        if self.slice_index is not None:
            return self.image_path, self.slice_index
        return None

    @property
    def diameter_mm(self) -> float | None:
        """The referred lesion's largest diameter in mm where the record states it (``attributes.diameter_mm``, as
        RefLiver-Synth writes it: in the slice for a 2D record, in 3D for a volume record); None for a negative
        or where it is not given."""
        value = (self.attributes or {}).get("diameter_mm")
        if self.target_instance == 0 or isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        return float(value) if math.isfinite(value) and value > 0 else None

    def text_at(self, level: str) -> str:
        """The expression at ``level`` (``full``/``half``/``quarter``/``none``); falls back to ``text``."""
        if level == "none":
            return ""
        if level not in TEXT_LEVELS:
            raise ValueError(f"text level must be one of {', '.join(TEXT_LEVELS)}; got {level!r}")
        if level == "full":
            return self.text
        return (self.texts or {}).get(level, self.text)

    def to_json(self) -> dict[str, Any]:
        """The manifest line as a dict: required fields, the optional ones that are set, then ``extra``."""
        out: dict[str, Any] = {"id": self.id, "image": self.image, "mask": self.mask, "text": self.text, "split": self.split}
        for name in _KNOWN[5:]:
            value = getattr(self, name)
            if value is not None:
                out[name] = list(value) if name == "spacing" else value
        for key, value in self.extra.items():
            out.setdefault(key, value)
        return out


def _check_str(line: dict[str, Any], name: str, where: str, required: bool) -> str | None:
    value = line.get(name)
    if value is None:
        if required:
            raise ValueError(f"{where}: required field {name!r} is missing")
        return None
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {name!r} must be a string, got {type(value).__name__} {value!r}")
    return value


def normalize_modality(value: str | None) -> str | None:
    """A manifest's modality as it is compared: surrounding spaces dropped, ``CT`` in any case spelt ``CT``
    (``"CT "`` or ``"ct"`` would otherwise not choose the CT window); an empty one is no modality."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    return "CT" if value.upper() == "CT" else value


MAX_INDEX = 2**31 - 1  # the largest slice index or instance label a record may name (a label map is int32 at most)
PATH_FIELDS = ("image", "mask", "instances")


def _check_index(line: dict[str, Any], name: str, where: str, what: str) -> int | None:
    value = line.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_INDEX):
        raise ValueError(f"{where}: field {name!r} must be {what} (0..{MAX_INDEX}), got {value!r}")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads`` hook: a key given twice in one object is an error (JSON keeps the last one silently)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"field {key!r} appears twice in the object; keep one")
        out[key] = value
    return out


def parse_line(raw: str, where: str) -> Any:
    """One manifest line as JSON; every way a line can be malformed (bad JSON, nesting too deep for the parser,
    a number too long to read, a repeated key) is a ``ValueError`` naming ``where``."""
    try:
        return json.loads(raw, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
    except RecursionError:
        raise ValueError(f"{where}: the JSON is nested too deeply to read; a record is one flat object") from None
    except ValueError as err:  # a repeated key (the hook's message), or an integer of thousands of digits
        if "digits" in str(err):
            err = ValueError(f"a number has more digits than JSON numbers are read with ({str(err).split(';')[0]})")
        raise ValueError(f"{where}: {err}") from None


def _encodable(value: Any) -> bool:
    """Whether every string in a parsed JSON value is valid Unicode (JSON allows lone surrogates, UTF-8 does not)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(value, dict):
        return all(_encodable(k) and _encodable(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_encodable(v) for v in value)
    return True


def record_from_json(line: dict[str, Any], root: Path, where: str) -> Record:
    """Validate one parsed manifest line and build its :class:`Record`.

    Args:
        line: the parsed JSON object.
        root: dataset folder the paths are relative to.
        where: ``"<file>:<line>"`` prefix for error messages.

    Raises:
        ValueError: a required field is missing or a field has the wrong type or value.
    """
    if not isinstance(line, dict):
        raise ValueError(f"{where}: each line must be a JSON object, got {type(line).__name__}")
    for name, value in line.items():
        if not _encodable(value):
            raise ValueError(f"{where}: field {name!r} holds a lone surrogate escape (e.g. \\ud800) that is not valid "
                             "Unicode text; fix the string")
    rid, image, mask, text, split = (_check_str(line, n, where, True) for n in ("id", "image", "mask", "text", "split"))
    assert rid is not None and image is not None and mask is not None and text is not None and split is not None
    if not rid:
        raise ValueError(f"{where}: field 'id' is empty")
    for name, value in (("image", image), ("mask", mask)):
        if not value:
            raise ValueError(f"{where}: field {name!r} is empty; give a path relative to the dataset folder")
    for name in PATH_FIELDS:
        if "\x00" in (line.get(name) or ""):
            raise ValueError(f"{where}: field {name!r} holds a NUL character, which no file name can; fix the path")
    if split not in SPLITS:
        raise ValueError(f"{where}: field 'split' must be one of {', '.join(SPLITS)}, got {split!r}")
    texts = line.get("texts")
    if texts is not None:
        if not isinstance(texts, dict) or not all(isinstance(v, str) for v in texts.values()):
            raise ValueError(f"{where}: field 'texts' must be an object of strings, e.g. {{\"full\": ..., \"half\": ...}}")
        bad = sorted(set(texts) - set(WRITTEN_LEVELS))
        if bad:
            raise ValueError(f"{where}: field 'texts' has unknown level(s) {bad}; use {', '.join(WRITTEN_LEVELS)}")
    variants = line.get("variants")
    if variants is not None and (not isinstance(variants, list) or not all(isinstance(v, str) and v for v in variants)):
        raise ValueError(f"{where}: field 'variants' must be a list of non-empty strings (paraphrases of 'text')")
    instances = _check_str(line, "instances", where, False)
    target = _check_index(line, "target_instance", where, "a positive integer label (0: the expression refers to no "
                          "lesion of the image, a negative)")
    if target is not None and instances is None:
        raise ValueError(f"{where}: field 'target_instance' is set but 'instances' (the label map) is missing")
    attributes = line.get("attributes")
    if attributes is not None and not isinstance(attributes, dict):
        raise ValueError(f"{where}: field 'attributes' must be an object, got {type(attributes).__name__}")
    spacing = line.get("spacing")
    if spacing is not None:
        ok = isinstance(spacing, list) and len(spacing) == 2 and all(
            isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) and s > 0 for s in spacing
        )
        if not ok:
            raise ValueError(f"{where}: field 'spacing' must be [row_mm, col_mm] with two positive numbers, got {spacing!r}")
        spacing = (float(spacing[0]), float(spacing[1]))
    slice_index = _check_index(line, "slice_index", where, "a non-negative integer")
    volume_image = _check_str(line, "volume_image", where, False)
    volume_slice = _check_index(line, "volume_slice", where, "a non-negative integer")
    if volume_image is not None and volume_slice is None:
        raise ValueError(f"{where}: field 'volume_image' is set but 'volume_slice' (which slice of it) is missing")
    return Record(
        id=rid, image=image, mask=mask, text=text, split=split, texts=texts, instances=instances,
        target_instance=target, attributes=attributes, spacing=spacing,
        patient=_check_str(line, "patient", where, False), modality=normalize_modality(_check_str(line, "modality", where, False)),
        slice_index=slice_index, volume_image=volume_image, volume_slice=volume_slice,
        extra={k: v for k, v in line.items() if k not in _KNOWN}, root=root, origin=where,
    )


def expressions(records: list[Record]) -> list[tuple[Record, str, str]]:
    """Every written expression: (record, level, text) for ``text`` and each level in ``texts``."""
    return [(r, lvl, (r.texts or {}).get(lvl, r.text) if lvl != "full" else r.text)
            for r in records for lvl in WRITTEN_LEVELS if lvl == "full" or (r.texts and lvl in r.texts)]


def empty_text_problems(records: list[Record], where: dict[str, str] | None = None) -> list[Problem]:
    """The one empty-text rule: in a dataset that has text, every expression must have some.

    Args:
        records: the whole dataset (a dataset without any text is legal: every sample gets an empty sentence).
        where: ``"<file>:<line>"`` of each record id, named in the message; the dataset folder otherwise.
    """
    found = expressions(records)
    if not any(t.strip() for _, _, t in found):
        return []
    return [
        Problem("error", "empty-text", f"{(where or {}).get(r.id, str(r.root))}: sample {r.id!r} has an empty "
                f"{'text' if lvl == 'full' else f'texts.{lvl}'} while the dataset has text; write its expression or "
                "remove the record", str(r.root), r.id, r.split)
        for r, lvl, t in found if not t.strip()
    ]


def manifest_path(folder: str | Path) -> Path:
    """``folder/manifest.jsonl`` (``folder`` may also be the manifest file itself)."""
    path = Path(folder)
    return path if path.suffix == ".jsonl" else path / MANIFEST_NAME


def parse_manifest(folder: str | Path) -> tuple[list[Record], list[Problem]]:
    """Read every line of a manifest, collecting problems instead of stopping at the first.

    Returns:
        The valid records, one error per bad line (invalid JSON or field, duplicate id, an empty text in a
        dataset with text: :func:`empty_text_problems`) and a warning per
        modality that was normalised (see :func:`normalize_modality`).
    """
    path = manifest_path(folder)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest here; a dataset folder needs a {MANIFEST_NAME} (see docs/dataset-format.md)")
    records: list[Record] = []
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    with path.open("rb") as f:
        for number, raw_bytes in enumerate(f, start=1):
            where = f"{path}:{number}"
            try:
                raw = raw_bytes.decode("utf-8")
            except UnicodeDecodeError as err:
                problems.append(Problem("error", "invalid-record", f"{where}: not UTF-8 text (byte {err.start + 1} of the "
                                        "line); save the manifest as UTF-8", str(path)))
                continue
            if not raw.strip():
                continue
            try:
                line = parse_line(raw, where)
                record = record_from_json(line, path.parent, where)
            except ValueError as err:
                problems.append(Problem("error", "invalid-record", str(err), str(path)))
                continue
            except Exception as err:  # a line nobody foresaw is reported against its line, never ending the read
                problems.append(Problem("error", "invalid-record", f"{where}: cannot read the record "
                                        f"({type(err).__name__}: {err})", str(path)))
                continue
            if record.id in seen:
                problems.append(Problem(
                    "error", "duplicate-id", f"{where}: field 'id' {record.id!r} repeats line {seen[record.id]}; ids must be unique",
                    str(path), record.id, record.split,
                ))
                continue
            seen[record.id] = number
            records.append(record)
            if line.get("modality") != record.modality:
                problems.append(Problem("warning", "modality-normalized", f"{where}: field 'modality' {line['modality']!r} "
                                        f"is read as {record.modality!r}; write it so", str(path), record.id, record.split))
    problems.extend(empty_text_problems(records, {rid: f"{path}:{number}" for rid, number in seen.items()}))
    return records, problems


def load_manifest(folder: str | Path) -> list[Record]:
    """Load and validate ``folder/manifest.jsonl``.

    Raises:
        FileNotFoundError: there is no manifest.
        ValueError: a line is invalid; the message names the file, the line number and the field.
    """
    records, problems = parse_manifest(folder)
    raise_first(problems)
    if not records:
        raise ValueError(f"{manifest_path(folder)}: the manifest has no records")
    return records


def write_manifest(folder: str | Path, records: list[Record]) -> Path:
    """Write ``folder/manifest.jsonl`` atomically (a temporary file, then ``os.replace``).

    Returns:
        The manifest path.
    """
    path = manifest_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ValueError(f"{path}: cannot write duplicate ids {dup}; make each record's id unique")
    fd, tmp = tempfile.mkstemp(prefix=".manifest-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r.to_json(), ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def outside_root(record: Record) -> list[tuple[str, str, Path]]:
    """The (field, path, where it resolves) of a record's files that lie outside its dataset folder.

    A path is outside when it is absolute, climbs out with ``..``, or is (or passes through) a symbolic link
    to elsewhere. Only names are resolved (``os.path.realpath``); no file is opened.
    """
    root = Path(os.path.realpath(record.root))
    found = []
    for name in ("image", "mask", "instances", "volume_image"):
        rel = getattr(record, name)
        if rel is None:
            continue
        real = Path(os.path.realpath(record.root / rel))
        if Path(rel).is_absolute() or not real.is_relative_to(root):
            found.append((name, rel, real))
    return found


def common_modality(records: list[Record]) -> str | None:
    """The one modality all records share (None when unset); chooses the default preprocessing.

    Raises:
        ValueError: records mix modalities (one preprocessing cannot serve, say, CT and photos).
    """
    found = sorted({r.modality for r in records if r.modality})
    if len(found) > 1:
        raise ValueError(f"records mix modalities {found}; give an explicit Preprocessing or train on one modality")
    if found and any(r.modality is None for r in records):
        raise ValueError(f"some records have modality {found[0]!r} and some none; set 'modality' on every record")
    return found[0] if found else None
