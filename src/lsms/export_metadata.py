"""The metadata an ``lsms export`` file carries (:class:`ExportMetadata`): written by :mod:`lsms.export`, read
by the exported-file backends of :mod:`lsms.backends`."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, ClassVar

from lsms.settings import DictRoundTrip
from lsms.spec import ModelSpec


@dataclass(frozen=True)
class ExportMetadata(DictRoundTrip):
    """What an exported file carries besides the network: everything prediction needs.

    Attributes:
        export_format: ``onnx`` or ``torchscript``.
        spec: the :class:`~lsms.spec.ModelSpec` of the exported graph: the model config (its ``max_tokens`` the
            export's), the preprocessing (its ``image_size`` the export's), the thresholds. The checkpoint's,
            except for an export's own ``--image-size`` / ``--max-tokens``.
        batch: the fixed batch size, or None (any batch).
        quantize: None (fp32) or ``int8``.
        inputs: graph input names in order.
        outputs: graph output names in order (``logits``, then ``existence`` for a model with an existence head).
        source / epoch: the checkpoint it was exported from and its epoch.
    """

    settings_name: ClassVar[str] = "export metadata fields"
    KEY: ClassVar[str] = "lsms"  # ONNX metadata_props key
    FILE: ClassVar[str] = "lsms.json"  # TorchScript extra file
    FORMAT: ClassVar[str] = "lsms-export"
    VERSION: ClassVar[int] = 3  # 2: ``outputs`` (an existence head's output); 3: the input settings in ``spec``

    export_format: str
    spec: ModelSpec
    batch: int | None
    quantize: str | None = None
    inputs: tuple[str, ...] = ("image", "input_ids", "attention_mask")
    outputs: tuple[str, ...] = ("logits",)
    source: str = ""
    epoch: int | None = None
    lsms_version: str = ""
    format: str = FORMAT
    format_version: int = VERSION

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | None, path: str | os.PathLike) -> ExportMetadata:
        """Parse the metadata of the exported file ``path`` (files of every earlier version too); errors name the
        file and what to do."""
        if not text:
            raise ValueError(f"{path}: no lsms metadata in this file: it was not written by 'lsms export' "
                             "(export the checkpoint with 'lsms export RUN --out FILE')")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: damaged lsms metadata ({err})") from None
        if not isinstance(data, dict) or data.get("format") != cls.FORMAT:
            raise ValueError(f"{path}: the metadata is not lsms export metadata (no 'format': {cls.FORMAT!r})")
        if data.get("format_version", 0) > cls.VERSION:
            raise ValueError(f"{path}: exported by a newer lsms (format {data['format_version']}, this lsms reads "
                             f"up to {cls.VERSION}); upgrade lsms")
        if data.get("format_version", 1) < 3:
            data = upgrade_v2(data)
        return cls.from_dict(data, f"{path}: lsms metadata")


def upgrade_v2(data: dict[str, Any]) -> dict[str, Any]:
    """Metadata of format 1 or 2 (the input settings as separate fields: ``model``, ``preprocessing``,
    ``image_size``, ``max_tokens``, ``threshold``, ``existence_threshold``) -> format 3 (one ``spec``)."""
    data = dict(data)
    model = dict(data.pop("model", None) or {})
    max_tokens = data.pop("max_tokens", None)
    if max_tokens is not None and isinstance(model.get("text"), dict):
        model["text"] = {**model["text"], "max_tokens": max_tokens}
    data.pop("image_size", None)  # the preprocessing's, which has the export's size
    spec = {"model": model, "preprocessing": data.pop("preprocessing", None), "threshold": data.pop("threshold", 0.5),
            "existence_threshold": data.pop("existence_threshold", None)}
    return {**data, "spec": spec, "format_version": 3}


__all__ = ["ExportMetadata", "upgrade_v2"]
