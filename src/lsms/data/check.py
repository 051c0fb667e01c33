"""Dataset integrity checks behind ``lsms check``: every rule of :mod:`lsms.data.manifest` (the lines) and
:mod:`lsms.data.rules` (the dataset and each sample's files, shared with loading), over every record, and
what only a full read can tell: images of identical decoded pixels in two splits, and text length.

Errors (exit status 1): invalid manifest line (bad JSON, not UTF-8, bad field), missing or unreadable file
(damaged, truncated, above a size limit of :class:`lsms.data.readers.ReadLimits`, zero spacing, RescaleSlope
0), a file outside the dataset folder, image/mask (or instance map) size mismatch, NaN/inf pixels, duplicate
ids, empty text in a dataset that has text, a split leak (a patient, a file, a byte-identical copy or the same
decoded pixels in two splits), a ``target_instance`` absent from its instance map or contradicted by its mask,
two modalities in one dataset, an empty dataset.
Warnings: non-binary mask (e.g. lossy JPEG masks; read as "above half the maximum"), empty mask, constant
image, text longer than the tokenizer keeps (it would be truncated), images without text rows or masks,
a modality set on some records only, a modality read after normalising (``"CT "``, ``"ct"``).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lsms.data.layouts import scan_samples
from lsms.data.manifest import SPLITS, Record, empty_text_problems, expressions
from lsms.data.problems import Problem
from lsms.data.rules import file_keys, read_sample, split_leaks


@dataclass
class CheckReport:
    """What ``lsms check`` found.

    Attributes:
        path: the dataset checked.
        layout: ``manifest``, ``lvit`` or ``folder``.
        counts: samples per split (records that could be listed; unreadable files still count).
        problems: every finding, errors first.
        has_text: whether any sample has a non-empty expression.
        max_tokens: the tokenizer limit texts were measured against (None when text was not checked).
        token_lengths: the sentences' token counts (special tokens included) against ``max_tokens``: ``texts``,
            ``median``, ``p95``, ``max`` and ``over`` (how many are longer); None when text was not checked.
        seconds: wall time of the check.
    """

    path: str
    layout: str
    counts: dict[str, int]
    problems: list[Problem] = field(default_factory=list)
    has_text: bool = False
    max_tokens: int | None = None
    token_lengths: dict[str, int] | None = None
    seconds: float = 0.0

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        by_code = Counter(f"{p.severity}:{p.code}" for p in self.problems)
        return {
            "path": self.path, "layout": self.layout, "ok": self.ok, "counts": self.counts,
            "total": sum(self.counts.values()), "errors": len(self.errors), "warnings": len(self.warnings),
            "by_code": dict(sorted(by_code.items())), "has_text": self.has_text, "max_tokens": self.max_tokens,
            "token_lengths": self.token_lengths, "seconds": round(self.seconds, 2), "problems": [p.to_dict() for p in self.problems],
        }

    def format_text(self, limit: int = 30) -> str:
        """Human-readable report; at most ``limit`` problems listed per kind."""
        lines = [f"{self.path} ({self.layout} layout)"]
        lines.append("  " + ", ".join(f"{sp}: {n}" for sp, n in self.counts.items()) + f"  (total {sum(self.counts.values())})")
        lines.append(f"  text: {'yes' if self.has_text else 'none (classical segmentation)'}")
        if (t := self.token_lengths) is not None:
            lines.append(f"  tokens per sentence: median {t['median']}, 95th percentile {t['p95']}, max {t['max']} "
                         f"({t['texts']} sentences); max_tokens {self.max_tokens} cuts {t['over']}"
                         + (f": raise --max-tokens to {t['max']} to keep every one whole" if t["over"] else ""))
        groups: dict[str, list[Problem]] = defaultdict(list)
        for p in self.problems:
            groups[f"{p.severity} [{p.code}]"].append(p)
        for key, items in groups.items():
            lines.append(f"{key}: {len(items)}")
            for p in items[:limit]:
                lines.append(f"  {p.message}")
            if len(items) > limit:
                lines.append(f"  ... {len(items) - limit} more (use --json for all)")
        verdict = "OK" if self.ok else "FAILED"
        lines.append(f"{verdict}: {len(self.errors)} error(s), {len(self.warnings)} warning(s) in {self.seconds:.1f} s")
        return "\n".join(lines)


def _check_record(r: Record) -> tuple[list[Problem], str | None]:
    """Read one record's files (the sample rules of :mod:`lsms.data.rules`); returns its problems and a hash of
    the decoded image pixels."""
    sample = read_sample(r)
    if sample.image is None:
        return sample.problems, None
    a = sample.image.array
    digest = hashlib.blake2b(np.ascontiguousarray(a).tobytes() + str(a.shape).encode(), digest_size=16).hexdigest()
    return sample.problems, digest


def _check_chunk(records: list[Record]) -> list[tuple[list[Problem], str | None]]:
    return [_check_record_safely(r) for r in records]


def _check_record_safely(r: Record) -> tuple[list[Problem], str | None]:
    """:func:`_check_record`, with anything unforeseen reported against the record instead of ending the check."""
    try:
        return _check_record(r)
    except Exception as err:
        message = f"{r.image_path}: checking sample {r.id!r} failed ({type(err).__name__}: {err})"
        return [Problem("error", "unreadable", message, str(r.image_path), r.id, r.split)], None


def _pixel_leaks(records: list[Record], pixels: dict[str, str | None]) -> list[Problem]:
    """Split leaks of images with identical decoded pixels in files that are not the same bytes (those, and
    one file in two splits, are :func:`lsms.data.rules.leak_problems`', found at every load)."""
    files = file_keys(records)
    groups: dict[str, set] = defaultdict(set)
    for r in records:
        if pixels.get(r.id) is not None:
            groups[pixels[r.id]].add(files[r.id])
    copies = {rid: digest if len(groups[digest]) > 1 else None for rid, digest in pixels.items() if digest is not None}
    return split_leaks(records, copies, "image", "the same image (identical decoded pixels)")


def _text_problems(records: list[Record], tokenizer: Any | None
                   ) -> tuple[list[Problem], bool, dict[str, int] | None]:
    texts_of = expressions(records)
    has_text = any(t.strip() for _, _, t in texts_of)
    if not has_text:
        return [], False, None
    problems = empty_text_problems(records)
    stats = None
    if tokenizer is not None:
        unique = sorted({t for _, _, t in texts_of if t.strip()})
        counted = tokenizer.hf(tokenizer.normalized(unique), add_special_tokens=True)["input_ids"]
        lengths = dict(zip(unique, (len(ids) for ids in counted), strict=True))
        every = np.array([lengths[t] for _, _, t in texts_of if t.strip()])
        stats = {"texts": int(every.size), "median": int(np.median(every)), "p95": int(np.percentile(every, 95)),
                 "max": int(every.max()), "over": int((every > tokenizer.max_tokens).sum())}
        for r, lvl, t in texts_of:
            n = lengths.get(t, 0)
            if n > tokenizer.max_tokens:
                problems.append(Problem(
                    "warning", "long-text", f"sample {r.id!r}: the {lvl} text has {n} tokens, the tokenizer keeps "
                    f"{tokenizer.max_tokens}; it would be truncated (raise max_tokens or shorten it)", None, r.id, r.split,
                ))
    return problems, True, stats


def check_dataset(
    path: str | Path, split: str | None = None, tokenizer: Any | None = None, workers: int = 0,
    allow_outside_root: bool = False,
) -> CheckReport:
    """Check every sample of a dataset in any supported layout.

    Args:
        path: the dataset folder (manifest, LViT or images/ + masks/).
        split: check one split only.
        tokenizer: an :class:`lsms.text.Tokenizer` to measure text length; None skips that check.
        workers: processes reading files (0 = up to 8, one per CPU core).
        allow_outside_root: also check files that resolve outside the dataset folder (otherwise they are
            reported as ``outside-root`` errors and never opened).

    Returns:
        The report; ``report.ok`` is False when there is any error.
    """
    start = time.perf_counter()
    layout, records, problems = scan_samples(path, split, allow_outside_root)
    counts = {sp: n for sp in SPLITS if (n := sum(r.split == sp for r in records))}

    workers = workers or min(8, os.cpu_count() or 1)
    if workers > 1 and len(records) > 64:
        size = max(16, len(records) // (workers * 4))
        chunks = [records[i : i + size] for i in range(0, len(records), size)]
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = [res for chunk in pool.map(_check_chunk, chunks) for res in chunk]
    else:
        results = _check_chunk(records)

    pixels: dict[str, str | None] = {}
    for r, (found, digest) in zip(records, results, strict=True):
        problems.extend(found)
        pixels[r.id] = digest
    problems.extend(_pixel_leaks(records, pixels))

    already = {(p.code, p.id) for p in problems if p.code == "empty-text"}
    text_found, has_text, token_lengths = _text_problems(records, tokenizer)
    problems.extend(p for p in text_found if (p.code, p.id) not in already)
    problems.sort(key=lambda p: p.severity != "error")  # stable: errors first, original order kept
    return CheckReport(
        path=str(path), layout=layout, counts=counts, problems=problems, has_text=has_text,
        max_tokens=None if tokenizer is None or not has_text else int(tokenizer.max_tokens),
        token_lengths=token_lengths, seconds=time.perf_counter() - start,
    )
