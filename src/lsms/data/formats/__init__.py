"""Image formats: one :class:`ImageReader` per format, and the registry that picks the reader of a path.

Every place that asks "which format is this file?" asks here: :func:`~lsms.data.read_image` and the other
readers, the dataset layouts (which files in a folder are images, and a file's stem), ``lsms predict`` (folders,
series, output names) and ``lsms serve`` (uploads). A format's endings live on its class only.

Adding a format is one class: subclass :class:`ImageReader` (``name``, ``suffixes``, ``read``, and ``depth`` if
a file can hold several slices) and add an instance to :data:`READERS`; a plugin or a test can
:func:`register` one at run time instead.
"""

from __future__ import annotations

from pathlib import Path

from lsms.data.formats.arrays import NumpyReader
from lsms.data.formats.base import ImageReader, ImageReadError
from lsms.data.formats.dicom import DicomReader
from lsms.data.formats.nifti import NiftiReader
from lsms.data.formats.pillow import JpegReader, PillowReader
from lsms.data.formats.tiff import TiffReader

# The registry, in order of preference: when a folder holds one stem in several formats, the first reader's
# file is the image (for masks, lossless formats come before lossy ones).
READERS: list[ImageReader] = [PillowReader(), JpegReader(), TiffReader(), NumpyReader(), NiftiReader(), DicomReader()]


def register(reader: ImageReader) -> ImageReader:
    """Add a reader at the end of :data:`READERS` (an ending already claimed is an error); returns it."""
    if not isinstance(reader, ImageReader):
        raise TypeError(f"register takes an ImageReader instance, got {type(reader).__name__}")
    for suffix in reader.suffixes:
        if not suffix.startswith(".") or suffix != suffix.lower():
            raise ValueError(f"{type(reader).__name__}.suffixes: {suffix!r} must be lower case and start with '.'")
        taken = next((r for r in READERS if suffix in r.suffixes), None)
        if taken is not None:
            raise ValueError(f"{type(reader).__name__}: the ending {suffix!r} is read by {type(taken).__name__} "
                             "already; unregister that reader first")
    READERS.append(reader)
    return reader


def unregister(reader: ImageReader) -> None:
    """Remove a reader added by :func:`register`."""
    READERS.remove(reader)


def _by_suffix(name: str) -> tuple[ImageReader, str] | None:
    """(reader, ending) for the longest registered ending of ``name`` (``.nii.gz`` before a ``.gz``)."""
    lower = name.lower()
    found = [(r, s) for r in READERS for s in r.suffixes if lower.endswith(s)]
    return max(found, key=lambda rs: len(rs[1])) if found else None


def find_reader(path: Path) -> ImageReader | None:
    """The reader of ``path``: a folder's is the first series reader; a file's by its ending, else by sniffing
    its first bytes; None when no reader claims it."""
    if path.is_dir():
        return next((r for r in READERS if r.series), None)
    found = _by_suffix(path.name)
    if found is not None:
        return found[0]
    return next((r for r in READERS if r.sniff(path)), None) if path.is_file() else None


def reader_for(path: Path) -> ImageReader:
    """:func:`find_reader`, raising :class:`ImageReadError` with the supported formats when none claims ``path``."""
    reader = find_reader(path)
    if reader is None:
        names = [r.name for r in READERS]
        raise ImageReadError(f"{path}: unsupported image format {path.suffix.lower()!r}; use "
                             f"{', '.join(names[:-1])} or {names[-1]}")
    return reader


def mask_writer(path: Path) -> ImageReader:
    """The reader that writes a mask to ``path`` (by its ending); a ``ValueError`` naming the endings otherwise."""
    found = _by_suffix(path.name)
    if found is None or not found[0].writes_masks:
        writers = [r for r in READERS if r.writes_masks]
        raise ValueError(f"{path}: masks in an input's geometry are written as {' or '.join(r.name for r in writers)}; "
                         f"name the output {' or '.join(s for r in writers for s in r.suffixes)}")
    return found[0]


def image_suffixes() -> tuple[str, ...]:
    """Every registered ending, in registry order."""
    return tuple(s for r in READERS for s in r.suffixes)


def is_image_name(name: str) -> bool:
    """Whether a file name ends in a registered ending."""
    return _by_suffix(name) is not None


def is_series_file(path: Path) -> bool:
    """Whether ``path`` is a file of a format whose folders are one volume (a slice of a DICOM series)."""
    reader = find_reader(path)
    return path.is_file() and reader is not None and reader.series


def image_stem(name: str) -> str:
    """``name`` without its registered ending (``ct.nii.gz`` -> ``ct``), else without its last suffix."""
    found = _by_suffix(name)
    return name[: -len(found[1])] if found else Path(name).stem


def preference(name: str, mask: bool = False) -> tuple[int, int]:
    """Sort key among files of one stem: registry order, then the reader's order of endings; with ``mask``,
    lossy formats last (a JPEG mask has grey edges). Unregistered names come last."""
    found = _by_suffix(name)
    if found is None:
        return (2 * len(READERS), 0)
    reader, suffix = found
    rank = READERS.index(reader) + (len(READERS) if mask and reader.lossy else 0)
    return (rank, reader.suffixes.index(suffix))
