"""One home for the plain-data round trip of the typed settings dataclasses (model, training, data, synth)."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, TypeVar

T = TypeVar("T", bound="DictRoundTrip")


class DictRoundTrip:
    """Mixin for dataclasses: ``to_dict`` (tuples become lists, so JSON and checkpoints hold plain data) and
    ``from_dict`` (tuple fields restored; an unknown key is an error naming it, never silently dropped)."""

    settings_name: ClassVar[str] = "settings"

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ValueError(f"unknown {cls.settings_name} {unknown}; known: {sorted(fields)}")
        return cls(**{k: tuple(v) if isinstance(v, list) and _is_tuple(fields[k]) else v for k, v in data.items()})


def _is_tuple(field: dataclasses.Field) -> bool:
    annotation = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "")
    return str(annotation).startswith("tuple")
