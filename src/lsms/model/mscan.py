"""Import SegNeXt MSCAN ImageNet weights onto the LSMS visual branch (for users who have the file).

MSCAN key names (SegNeXt ``mscan.py``) map onto LSMS as follows; everything else is reported, not loaded:

| MSCAN | LSMS |
|---|---|
| ``patch_embed1.proj.{0,1,3,4}`` (stem) | ``encoder.stages.0.down.proj.{0,1,3,4}`` |
| ``patch_embed{i}.proj`` / ``.norm`` (i >= 2) | ``encoder.stages.{i-1}.down.conv`` / ``.norm`` |
| ``block{i}.{j}.attn.spatial_gating_unit.conv0`` (5x5) | ``...blocks.{j}.svla.conv5x5`` |
| ``...spatial_gating_unit.conv{k}_1`` / ``conv{k}_2`` (1xd / dx1) | ``...svla.conv_units.{u}.conv_w`` / ``conv_h`` where d_u = d |
| ``...spatial_gating_unit.conv3`` (1x1) | ``...svla.mix`` |
| ``block{i}.{j}.mlp.{fc1,dwconv.dwconv,fc2}`` | ``...blocks.{j}.ffn.{fc1,dwconv,fc2}`` |

Not loaded: ``attn.proj_1/proj_2`` and ``layer_scale_*`` (no counterpart in LSMS's encoder block),
``block.norm1/norm2`` (pre-norm in MSCAN, post-norm in LSMS: same shape, different statistics),
the per-stage LayerNorms ``norm{i}`` and any decode head. A stem for other than 3 input channels is
adapted by summing the RGB filters (1 channel) or repeating them (timm's rule).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from lsms.model.lsms import LSMS

_BLOCK = re.compile(r"block(\d+)\.(\d+)\.(.+)")
_STRIP = re.compile(r"attn\.spatial_gating_unit\.conv(\d)_([12])\.(.+)")
_FIXED = {
    "attn.spatial_gating_unit.conv0.": "svla.conv5x5.",
    "attn.spatial_gating_unit.conv3.": "svla.mix.",
    "mlp.fc1.": "ffn.fc1.",
    "mlp.dwconv.dwconv.": "ffn.dwconv.",
    "mlp.fc2.": "ffn.fc2.",
}
_SKIP_REASON = {
    "attn.proj_1": "no counterpart in LSMS",
    "attn.proj_2": "no counterpart in LSMS",
    "layer_scale": "no counterpart in LSMS",
    "norm1": "pre-norm in MSCAN, post-norm in LSMS",
    "norm2": "pre-norm in MSCAN, post-norm in LSMS",
}


@dataclass
class ImportReport:
    """What an MSCAN import did: loaded (source -> target), skipped source keys with the reason, and
    target parameters of the visual branch left at their initial values."""

    loaded: dict[str, str] = field(default_factory=dict)
    adapted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    not_loaded: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"loaded {len(self.loaded)} MSCAN tensors ({len(self.adapted)} adapted), skipped "
                f"{len(self.skipped)}, {len(self.not_loaded)} visual-branch tensors keep their initial values")


def _read_state_dict(source: str | Path | dict[str, Tensor]) -> dict[str, Tensor]:
    if isinstance(source, dict):
        state = source
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"MSCAN checkpoint {path} does not exist")
        # weights_only: a checkpoint from a stranger cannot run code while loading
        state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    return {k.removeprefix("backbone."): v for k, v in state.items() if isinstance(v, Tensor)}


def _target_key(key: str, kernels: tuple[int, ...], tensor: Tensor) -> tuple[str | None, str]:
    """LSMS key for one MSCAN key, or (None, reason)."""
    if m := re.fullmatch(r"patch_embed1\.proj\.([0134])\.(.+)", key):
        return f"encoder.stages.0.down.proj.{m[1]}.{m[2]}", ""
    if m := re.fullmatch(r"patch_embed(\d)\.(proj|norm)\.(.+)", key):
        return f"encoder.stages.{int(m[1]) - 1}.down.{'conv' if m[2] == 'proj' else 'norm'}.{m[3]}", ""
    if not (m := _BLOCK.fullmatch(key)):
        return None, "not part of the MSCAN encoder blocks (stage norm or head)"
    prefix, rest = f"encoder.stages.{int(m[1]) - 1}.blocks.{m[2]}.", m[3]
    for src, dst in _FIXED.items():
        if rest.startswith(src):
            return prefix + dst + rest[len(src):], ""
    if s := _STRIP.fullmatch(rest):
        d = tensor.shape[-1] if s[2] == "1" else tensor.shape[-2]  # conv_1 is 1 x d, conv_2 is d x 1
        if s[3] == "bias":  # a bias has no kernel: read d from MSCAN's fixed order 7, 11, 21
            d = (7, 11, 21)[int(s[1])]
        if d not in kernels:
            return None, f"ConvUnit d={d} is not in this model's conv_kernels {kernels}"
        return f"{prefix}svla.conv_units.{kernels.index(d)}.{'conv_w' if s[2] == '1' else 'conv_h'}.{s[3]}", ""
    for name, reason in _SKIP_REASON.items():
        if rest.startswith(name):
            return None, reason
    return None, "unknown MSCAN key"


def load_mscan_weights(model: LSMS, source: str | Path | dict[str, Tensor]) -> ImportReport:
    """Copy the matching MSCAN conv weights into ``model`` in place and report what was and was not loaded."""
    state = _read_state_dict(source)
    target = model.state_dict()
    report = ImportReport()
    update: dict[str, Tensor] = {}
    for key, tensor in state.items():
        dst, reason = _target_key(key, model.config.conv_kernels, tensor)
        if dst is None:
            report.skipped[key] = reason
            continue
        if dst not in target:
            report.skipped[key] = f"{dst} does not exist in this model"
            continue
        want = target[dst].shape
        if dst == "encoder.stages.0.down.proj.0.weight" and tensor.shape != want and tensor.shape[1] == 3:
            tensor = tensor.sum(1, keepdim=True) if want[1] == 1 else tensor.repeat(1, -(-want[1] // 3), 1, 1)[:, : want[1]] * 3 / want[1]
            report.adapted.append(key)
        if tensor.shape != want:
            report.skipped[key] = f"shape {tuple(tensor.shape)} != {tuple(want)} of {dst}"
            continue
        update[dst] = tensor.to(target[dst].dtype)
        report.loaded[key] = dst
    model.load_state_dict(update, strict=False)
    report.not_loaded = [k for k in target if k.startswith("encoder.") and k not in update]
    return report
