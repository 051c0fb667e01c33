"""One home for the plain-data round trip of the typed settings dataclasses (model, run, data, loss, synth)."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, ClassVar, TypeVar

T = TypeVar("T", bound="DictRoundTrip")


class DictRoundTrip:
    """Mixin for dataclasses: ``to_dict`` (nested settings become dicts and tuples lists, so JSON, YAML and
    checkpoints hold plain data) and ``from_dict`` (nested settings and tuple fields restored; an unknown key is
    an error naming it and where it sits, never silently dropped).

    A field typed as another settings class is read with that class's ``from_dict``.
    """

    settings_name: ClassVar[str] = "settings"

    def to_dict(self) -> dict[str, Any]:
        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
        if not isinstance(data, dict):
            raise ValueError(f"{where or cls.settings_name} must be a mapping of setting: value, got {data!r}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ValueError(f"unknown {cls.settings_name} {unknown}{f' in {where}' if where else ''}; "
                             f"known: {sorted(fields)}")
        hints = typing.get_type_hints(cls)
        return cls(**{k: _typed(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()})


def check_finite(settings: Any, prefix: str = "") -> None:
    """Every float of a settings dataclass (alone or in a tuple) is a finite number: ``nan`` passes every
    comparison a ``__post_init__`` makes, so it is refused here, naming the field."""
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if any(isinstance(v, float) and not math.isfinite(v) for v in (value if isinstance(value, tuple) else (value,))):
            raise ValueError(f"{prefix}{f.name} must be a finite number, got {value}")


def plain(value: Any) -> Any:
    """Settings as plain data: settings dataclasses as dicts, tuples as lists (what JSON and YAML hold)."""
    if isinstance(value, DictRoundTrip):
        return value.to_dict()
    if isinstance(value, (tuple, list)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def _yaml_hint(value: Any) -> str:
    """Why a number may have arrived as text: YAML 1.1 reads ``1e-4`` (no dot) as a string."""
    try:
        float(value)
    except (TypeError, ValueError):
        return ""
    return " (YAML reads a number such as 1e-4 without a dot as text: write 1.0e-4)" if isinstance(value, str) else ""


def _typed(hint: Any, value: Any, where: str) -> Any:
    """A plain value read back as the type ``hint`` asks for (settings classes, tuples); others unchanged.

    A number setting (``int``, ``float``, either or None) refuses anything else, naming it: ``epochs: ten`` in a
    settings file would otherwise fail later inside a comparison or a library.
    """
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else (hint,)
    if set(options) & {int, float} and set(options) <= {int, float, type(None)}:
        whole = float not in options
        if value is None and type(None) not in options or value is not None and (
                isinstance(value, bool) or not isinstance(value, int if whole else (int, float))):
            raise ValueError(f"setting {where} must be {'a whole number' if whole else 'a number'}"
                             f"{' or null' if type(None) in options else ''}, got {value!r}{_yaml_hint(value)}")
    classes = [o for o in options if isinstance(o, type) and issubclass(o, DictRoundTrip)]
    if len(classes) == 1 and isinstance(value, dict):
        return classes[0].from_dict(value, where)
    if isinstance(value, list) and any(typing.get_origin(o) is tuple for o in options):
        return tuple(value)
    return value
