"""A dataset problem found while reading or checking, with the file it concerns."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class Problem:
    """One finding about a dataset.

    Attributes:
        severity: ``error`` (the data is wrong) or ``warning`` (legal but suspicious).
        code: short machine-readable kind, e.g. ``missing-file``, ``size-mismatch``, ``empty-text``.
        message: what is wrong and, where useful, how to fix it; starts with the file it concerns.
        file: the file concerned, when there is one.
        id: the sample id, when there is one.
        split: the sample's split, when known.
    """

    severity: str
    code: str
    message: str
    file: str | None = None
    id: str | None = None
    split: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.severity}: [{self.code}] {self.message}"


def first_error(problems: list[Problem]) -> Problem | None:
    """The first error-severity problem, if any."""
    return next((p for p in problems if p.severity == "error"), None)


def raise_first(problems: list[Problem], hint: str = "run `lsms check` to list them all") -> None:
    """Raise the first error as ``FileNotFoundError`` (missing file) or ``ValueError``, counting the rest."""
    errors = [p for p in problems if p.severity == "error"]
    if not errors:
        return
    message = errors[0].message
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error(s); {hint})"
    if errors[0].code == "missing-file":
        raise FileNotFoundError(message)
    raise ValueError(message)
