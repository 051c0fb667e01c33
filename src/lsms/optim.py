"""Optimisation: AdamW parameter groups, the learning-rate schedule, mixed precision, and one training step.

:func:`train_step` is the one optimiser step of the project: the training loop and the demo's step timing
both call it.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lsms.config import OptimConfig
from lsms.losses import other_lesions
from lsms.model.encoder import LanguageGuidedBranch


def lr_at(step: int, total_steps: int, base_lr: float, warmup_steps: int = 0, power: float = 0.9,
          min_lr: float = 0.0, time_fraction: float = 0.0) -> float:
    """Learning rate at optimiser step ``step`` (0-based): linear warm-up, then poly decay (power 0.9).

    ``lr = min_lr + (base_lr - min_lr) * (1 - t) ** power`` with ``t`` the fraction of post-warm-up steps done,
    or ``time_fraction`` (the share of the time limit used; ``optim.schedule: time``) when that is larger.
    """
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    return min_lr + (base_lr - min_lr) * (1.0 - progress_at(step, total_steps, warmup_steps, time_fraction)) ** power


def progress_at(step: int, total_steps: int, warmup_steps: int = 0, time_fraction: float = 0.0) -> float:
    """The share of training done after the warm-up, in [0, 1]: of the post-warm-up steps, or ``time_fraction``
    when that is larger; 0 during the warm-up. The poly decay of :func:`lr_at` and the other lesions' weight
    (:func:`lsms.losses.other_lesion_weight_at`) follow it."""
    if step < warmup_steps:
        return 0.0
    decay_steps = max(1, total_steps - warmup_steps)
    return min(1.0, max((step - warmup_steps) / decay_steps, time_fraction))


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
    """AdamW groups: {visual, language gates, text encoder} x {decay, no decay}; ``lr_scale`` is applied by the
    schedule.

    No weight decay on norm weights and biases (every 1-D parameter) when ``no_decay_norm_bias`` is set;
    the text encoder (parameters under ``text_encoder``) gets ``text_lr`` (or ``lr * text_lr_scale``), the
    language gates (:attr:`~lsms.model.encoder.LanguageGuidedBranch.gate`) ``lr * gate_lr_scale``.
    """
    text_scale = (cfg.text_lr / cfg.lr) if cfg.text_lr is not None else cfg.text_lr_scale
    gates = {id(m.gate) for m in model.modules() if isinstance(m, LanguageGuidedBranch)}
    scales = {"visual": 1.0, "gate": cfg.gate_lr_scale, "text": text_scale}
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_text = name.startswith("text_encoder.") or ".text_encoder." in name
        # the gates get their own group only when their rate differs: the default keeps the groups (and so the
        # optimiser states of earlier checkpoints) as they were
        kind = "text" if is_text else "gate" if id(p) in gates and cfg.gate_lr_scale != 1.0 else "visual"
        no_decay = cfg.no_decay_norm_bias and p.ndim <= 1
        groups.setdefault((kind, no_decay), []).append(p)
    return [
        {"params": params, "weight_decay": 0.0 if no_decay else cfg.weight_decay, "lr_scale": scales[kind],
         "name": kind + ("_no_decay" if no_decay else "")}
        for (kind, no_decay), params in sorted(groups.items())
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; fused (one kernel for all tensors, ~5x faster than the per-tensor loop on
    CPU) where PyTorch has a fused kernel for the device."""
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                             **({"fused": True} if fused else {}))


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def dtype_name(dtype: torch.dtype | None) -> str:
    """``bf16``, ``fp16`` or ``fp32`` (None: full precision): the name :data:`AMP_DTYPES` gives the dtype."""
    return next((name for name, d in AMP_DTYPES.items() if d == dtype), "fp32")


def native_bf16() -> tuple[bool, str]:
    """(whether this CPU multiplies bf16 in hardware, the evidence): x86 ``avx512_bf16`` or ``amx_bf16``, or
    Arm ``bf16`` (``/proc/cpuinfo`` flags on Linux). Without it bf16 is emulated and slower than fp32."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line.split(":", 1)[1].split() for line in f
                          if line.startswith(("flags", "Features"))), [])
    except OSError:
        return False, "no /proc/cpuinfo to read the CPU's bf16 capability from"
    if found := [f for f in ("amx_bf16", "avx512_bf16", "bf16") if f in flags]:
        return True, f"CPU flag {found[0]}"
    return False, "the CPU has no avx512_bf16, amx_bf16 or bf16 flag"


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype an explicit ``amp`` setting means on ``device`` (None: full precision); ``auto`` on a
    GPU is bf16 where supported, else fp16. ``auto`` on a CPU needs a measurement: :func:`choose_amp`."""
    if amp == "off":
        return None
    if amp == "auto":
        if device.type != "cuda":
            raise ValueError("amp 'auto' on a CPU is chosen by measuring the step: use choose_amp")
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    dtype = AMP_DTYPES[amp]
    if device.type == "cpu" and dtype == torch.float16:
        raise ValueError("amp fp16 needs a GPU; use --amp bf16 or --amp off on CPU")
    return dtype


AUTO_BF16_MIN_GAIN = 1.1  # bf16 must make the step at least this much faster to be chosen on a CPU


def choose_amp(amp: str, device: torch.device, probe: Callable[[torch.dtype | None], float] | None = None,
               agree: Callable[[float], float] = float) -> tuple[torch.dtype | None, str]:
    """(autocast dtype, why) for the ``amp`` setting on ``device``.

    ``auto`` on a CPU: fp32 unless the CPU has native bf16 (:func:`native_bf16`) **and** ``probe`` (CPU seconds
    of a few training steps in a dtype) shows bf16 at least :data:`AUTO_BF16_MIN_GAIN` times faster. ``agree``
    makes every process of a distributed run take the same decision (e.g. the mean of their speed-ups).
    """
    if amp != "auto" or device.type != "cpu":
        dtype = amp_dtype(amp, device)
        return dtype, f"--amp {amp}" + (f" on {device.type}" if amp == "auto" else "")
    native, evidence = native_bf16()
    if not native:
        return None, f"fp32: {evidence} (bf16 would be emulated)"
    if probe is None:
        return None, f"fp32: {evidence}, but no step was measured"
    fp32, bf16 = probe(None), probe(torch.bfloat16)
    gain = agree(fp32 / max(bf16, 1e-9))
    verdict = "bf16" if gain >= AUTO_BF16_MIN_GAIN else "fp32"
    why = (f"{verdict}: {evidence}; measured step {fp32:.3f} CPU-s in fp32, {bf16:.3f} in bf16 ({gain:.2f}x; "
           f"bf16 needs >= {AUTO_BF16_MIN_GAIN}x)")
    return (torch.bfloat16 if verdict == "bf16" else None), why


def inference_dtype(trained: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for running a model trained in ``trained`` (``bf16``, ``fp16`` or ``fp32``) on
    ``device``: the training's choice where the device computes it natively, else fp32. Masks in bf16 agree with
    fp32 on >= 99 % of pixels (tests/test_train.py states the bound)."""
    if trained == "bf16" and (device.type == "cuda" or (device.type == "cpu" and native_bf16()[0])):
        return torch.bfloat16
    if trained == "fp16" and device.type == "cuda":
        return torch.float16
    return None


def probe_step_seconds(step_module: nn.Module, batch: dict[str, Any], steps: int = 2
                       ) -> Callable[[torch.dtype | None], float]:
    """A probe for :func:`choose_amp`: median CPU seconds of forward + backward of ``batch`` (after one warm-up)
    on a throwaway copy of ``step_module``, so the weights, buffers, gradients and random state of the run are
    untouched."""
    def probe(dtype: torch.dtype | None) -> float:
        module = copy.deepcopy(step_module).train()
        rng = torch.get_rng_state()
        times = []
        for _ in range(steps + 1):
            start = time.process_time()
            with autocast(batch["image"].device, dtype):
                losses = module(batch["image"], batch["mask"], batch.get("input_ids"), batch.get("attention_mask"),
                                batch.get("coords"))
            losses["loss"].backward()
            times.append(time.process_time() - start)
        torch.set_rng_state(rng)
        return statistics.median(times[1:])

    return probe


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Mixed precision in ``dtype`` on ``device``; None: full precision (a no-op context)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class TrainingStep(nn.Module):
    """Model + loss in one module, so that DistributedDataParallel sees the whole forward.

    DDP only synchronises gradients of computations that go through its wrapped ``forward``; the loss needs
    :meth:`LSMS.forward_features` (decoder features and text embedding for the contrastive term), so the
    wrapped forward computes the losses directly. The losses run outside autocast, in float32: under autocast
    the contrastive loss's einsums would otherwise run in bf16/fp16 despite the ``.float()`` casts.
    """

    def __init__(self, model: nn.Module, criterion: nn.Module):
        super().__init__()
        self.model = model
        self.criterion = criterion

    def forward(self, image: torch.Tensor, mask: torch.Tensor, input_ids: torch.Tensor | None,
                attention_mask: torch.Tensor | None, coords: torch.Tensor | None = None,
                others: torch.Tensor | None = None, other_weight: float | None = None) -> dict[str, torch.Tensor]:
        """image (B, C, H, W), mask (B, 1, H, W), ids/mask (B, T), coords (B, 2, H, W) of training patches,
        others (B, 1, H, W) the lesions the sentence does not name and the weight of their pixels (None: the
        loss config's) -> the loss dict of :class:`LSMSLoss`."""
        out = self.model.forward_features(image, input_ids, attention_mask, coords)
        use_contrastive = out.text_embedding is not None and self.criterion.config.contrastive_weight > 0
        with torch.autocast(device_type=image.device.type, enabled=False):
            return self.criterion(
                out.logits.float(), mask,
                features=out.decoder.float() if use_contrastive else None,
                text_embedding=out.text_embedding.float() if use_contrastive else None,
                existence=out.existence.float() if out.existence is not None else None, others=others,
                other_weight=other_weight,
            )


def train_step(step_module: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               batch: dict[str, Any], lr: float, grad_clip: float = 0.0,
               dtype: torch.dtype | None = None, other_weight: float | None = None) -> dict[str, float]:
    """One optimiser step on ``batch`` (already on the device) at learning rate ``lr``; returns the losses.
    ``other_weight``: the weight of the other lesions' pixels in the focal term at this step
    (:func:`lsms.losses.other_lesion_weight_at`; None: the loss config's ``other_lesion_weight``).

    Each parameter group runs at ``lr * lr_scale`` (:func:`param_groups`); gradients are clipped to a global
    norm of ``grad_clip`` (0: off); ``scaler`` scales fp16 losses (a disabled scaler passes them through).
    """
    for g in optimizer.param_groups:
        g["lr"] = lr * g["lr_scale"]
    image = batch["image"]
    instances, target = batch.get("instances"), batch.get("target_instance")
    others = None if instances is None or target is None else other_lesions(instances, target)
    with autocast(image.device, dtype):
        losses = step_module(image, batch["mask"], batch.get("input_ids"), batch.get("attention_mask"),
                             batch.get("coords"), others, other_weight)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(losses["loss"]).backward()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(step_module.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return {k: float(v.detach()) for k, v in losses.items()}


__all__ = ["AUTO_BF16_MIN_GAIN", "TrainingStep", "amp_dtype", "autocast", "choose_amp", "dtype_name", "inference_dtype",
           "native_bf16",
           "probe_step_seconds", "build_optimizer", "lr_at", "param_groups", "progress_at", "train_step"]
