"""``lsms train``: train LSMS on a manifest or LViT-layout folder, on one process or many (torchrun + DDP).

The loop is :func:`_train`, one function to read top to bottom (nanoGPT style), entered through :func:`train`
(which starts the processes and holds the run folder's lock). Settings are the one typed tree
:class:`~lsms.config.RunConfig`; the learning rate is the pure function :func:`~lsms.optim.lr_at` of the step;
one optimiser step is :func:`~lsms.optim.train_step`; a checkpoint is the plain dict described in
:mod:`lsms.checkpoint`, with the run's settings and preprocessing inside.

Run folder (``--out RUN``)::

    RUN/config.json       every setting (the RunConfig tree and the preprocessing)
    RUN/last.pt           written at the end of each epoch (and every --save-every steps): --resume RUN
    RUN/best.pt           the epoch with the best validation score (--best-metric, default Dice)
    RUN/metrics.csv       one row per epoch: train losses, learning rate, validation metrics, time
    RUN/log.jsonl         the same as JSON lines, plus a line every --log-every steps
    RUN/tensorboard/      TensorBoard scalars (tensorboard --logdir RUN)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from lsms import distributed as D
from lsms.checkpoint import (
    load_checkpoint,
    make_checkpoint,
    model_from_checkpoint,
    resolve_checkpoint,
    run_config,
    save_checkpoint,
    spec_of,
    stored_run,
)
from lsms.config import PAPER_LR, RunConfig, chosen_settings, short_metavars
from lsms.data import TEXT_LEVELS, Collator, SegmentationDataset
from lsms.data.config import DataConfig
from lsms.data.loaders import build_datasets, make_loader, train_sampler
from lsms.evaluate import evaluate_model
from lsms.existence import refit_existence_head
from lsms.losses import LSMSLoss, other_lesion_weight_at
from lsms.model import MODELS, build
from lsms.optim import (
    AMP_DTYPES,
    TrainingStep,
    build_optimizer,
    choose_amp,
    dtype_name,
    lr_at,
    probe_step_seconds,
    progress_at,
    train_step,
)
from lsms.runlog import RunLog
from lsms.runs import changed_settings, check_run_folder, resume_settings, run_folder
from lsms.seeding import rng_state, seed_everything, set_rng_state
from lsms.spec import check_memory, model_for
from lsms.text import resolve_text_encoder

log = logging.getLogger(__name__)

# settings a resumed run cannot change: its checkpoint's model and preprocessing embody them
FIXED_ON_RESUME = ("model", "data.image_size", "data.in_channels", "data.window", "data.context_slices")


def train(cfg: RunConfig, resume: str | Path | None = None, on_step: Callable[[int], None] | None = None,
          overwrite: bool = False, given: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train as ``cfg`` says; returns the final summary (best and last validation metrics, paths).

    Args:
        cfg: the settings.
        resume: a run folder or ``last.pt`` to continue from. Its saved settings are restored; the settings in
            ``given`` override them (logged); those of :data:`FIXED_ON_RESUME` cannot change.
        on_step: called with the global step after every optimiser step (tests use it to stop a run).
        overwrite: start over in an ``out`` folder that already holds a run (otherwise refused).
        given: the tree of settings the caller chose (the command line's flags, file and recipe); None: those of
            ``cfg`` that differ from the defaults.
    """
    env = D.init_distributed(cfg.device)
    try:
        with contextlib.ExitStack() as hold:  # the run folder's lock, held until training ends
            return _train(cfg, env, resume, on_step, hold, overwrite, given)
    finally:
        D.cleanup()


def _train(cfg: RunConfig, env: D.DistEnv, resume: str | Path | None, on_step: Callable[[int], None] | None,
           hold: contextlib.ExitStack, overwrite: bool, given: dict[str, Any] | None) -> dict[str, Any]:
    cfg, checkpoint, same_run = resumed(RunConfig.from_dict(cfg.to_dict()), resume, env, given)  # a copy
    device, out = env.device, Path(cfg.out)
    check_training_memory(cfg, device)
    hold.enter_context(run_folder(out, resume=same_run, overwrite=overwrite, enabled=env.is_main))
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.set_num_threads(cfg.threads or torch.get_num_threads())
    seed_everything(cfg.seed)  # same seed on every rank: identical initial weights

    # ---- data, model (and its spec: resolved once, after the dataset scan), loss, optimiser
    saved = None if checkpoint is None else spec_of(checkpoint)
    preprocessing, train_set, val_set = build_datasets(cfg.data, cfg.seed, saved and saved.preprocessing)
    model, spec = (model_from_checkpoint(checkpoint), saved) if saved else model_for(cfg.model, preprocessing)
    model.to(device)
    loss = cfg.loss if cfg.model.use_text else dataclasses.replace(cfg.loss, contrastive_weight=0.0)
    criterion = LSMSLoss(loss)
    step_module: nn.Module = TrainingStep(model, criterion)
    optimizer = build_optimizer(model, cfg.optim, device)
    collate = Collator(model.tokenizer)
    dtype, amp = mixed_precision(cfg, checkpoint, step_module, train_set, collate, device, env)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    # ---- where we are
    o = cfg.optim
    steps_per_epoch, total_steps = step_counts(len(train_set), o, env.world_size)
    epoch, step, batch_in_epoch = 0, 0, 0
    best = {"metric": cfg.best_metric, "value": -math.inf, "epoch": -1}
    if checkpoint is not None:
        epoch, step, batch_in_epoch, best = restore(checkpoint, optimizer, scaler, env, cfg.seed, best)
    else:
        seed_everything(cfg.seed + env.rank)  # per-rank randomness for dropout, NMF bases, loss sampling
    if env.distributed:
        step_module = wrap_ddp(step_module, model, criterion, device)

    logs = RunLog(out, env.is_main, resume=checkpoint is not None, progress=cfg.progress)
    if env.is_main:
        config = {"spec": spec.to_dict(), "run": stored_run(cfg)}  # as a checkpoint holds them
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        log.info("training %s (%s parameters) on %s x %d, %d train / %d val samples, %d steps/epoch, %d epochs; "
                 "mixed precision %s (--amp %s): %s", cfg.model.preset, f"{sum(p.numel() for p in model.parameters()):,}",
                 device, env.world_size, len(train_set), len(val_set or []), steps_per_epoch, o.epochs, amp["dtype"],
                 cfg.amp, amp["reason"])

    def save(kind: str, metrics: dict[str, Any] | None = None) -> None:
        D.broadcast_buffers(model, env)
        rng = D.gather_objects(rng_state(), env)  # collective: every rank calls save
        if env.is_main:
            save_checkpoint(make_checkpoint(
                model, spec, cfg, optimizer=optimizer if kind == "last" else None, scaler=scaler, amp=amp,
                epoch=epoch, step=step, batch_in_epoch=batch_in_epoch, rng=rng, metrics=metrics, best=best,
                time_spent=budget.spent(),
            ), out / f"{kind}.pt")
        D.barrier(env)

    sampler = train_sampler(train_set, cfg.data, o.batch_size, env, cfg.seed)
    val_loader = None if val_set is None else make_loader(
        val_set, cfg.data.eval_batch_size or o.batch_size, env, cfg.data.num_workers, tokenizer=model.tokenizer)
    budget = TimeBudget(cfg.time_limit_minutes, cfg.time_clock, env, checkpoint and checkpoint.get("time_spent"))
    time_up, last_metrics, nonfinite, refit = False, {}, {}, None  # nonfinite: epoch -> val samples with inf/NaN logits

    while epoch < o.epochs and step < total_steps and not time_up:
        loader = epoch_loader(train_set, sampler, collate, cfg, epoch, batch_in_epoch, steps_per_epoch, device)
        step_module.train()
        meter = EpochMeter(env.world_size)
        bar = logs.bar(total=len(loader), desc=f"epoch {epoch + 1}/{o.epochs}")
        for batch in loader:
            meter.arrived(batch)
            lr, weight = schedule_at(step, total_steps, cfg, budget.fraction(o.schedule))
            values = train_step(step_module, optimizer, scaler, to_device(batch, device), lr, o.grad_clip, dtype, weight)
            step, batch_in_epoch = step + 1, batch_in_epoch + 1
            images_per_s = meter.add(values, batch["image"].shape[0], step)
            if bar is not None:
                bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_s:.1f}")
                bar.update(1)
            if step % cfg.log_every == 0:
                logs.step(epoch, step, lr, values, images_per_s)
                meter.logged()
            if cfg.save_every and step % cfg.save_every == 0 and batch_in_epoch < steps_per_epoch:
                save("last")
            if on_step is not None:
                on_step(step)
            time_up = budget.is_up(step)
            if time_up or step >= total_steps:  # the time limit, or optim.max_steps reached mid-epoch
                break
            meter.asked()
        if bar is not None:
            bar.close()
        meter.warn_truncated(epoch, model.tokenizer, env)
        if batch_in_epoch >= steps_per_epoch:
            epoch, batch_in_epoch = epoch + 1, 0
        train_means = meter.means(env)

        # ---- validation: every sample exactly once over all ranks, rank 0's BatchNorm statistics
        metrics: dict[str, Any] = {}
        last = epoch >= o.epochs or step >= total_steps or time_up
        if last:  # [addition] the existence head fit anew on the frozen network
            refit = refit_existence_head(model, refit_loader(train_set, cfg, env, model.tokenizer), cfg.existence_refit_steps,
                                         env, dtype)
        if val_loader is not None and (epoch % cfg.val_every == 0 or last):
            metrics = last_metrics = validate(model, val_loader, env, dtype, logs.progress)
        if metrics.get("n_nonfinite_logits"):
            nonfinite[epoch] = metrics["n_nonfinite_logits"]
        score = metrics.get(cfg.best_metric)
        improved = score is not None and score > best["value"]
        if improved:
            best = {"metric": cfg.best_metric, "value": float(score), "epoch": epoch, "step": step}
        last_lr = schedule_at(max(step - 1, 0), total_steps, cfg, budget.fraction(o.schedule))[0]
        logs.epoch(epoch, step, last_lr, train_means, metrics, budget.wall_s(), improved, epoch_state(model, budget))
        save("last", metrics)
        if improved:
            save("best", metrics)
    best_refit = None if refit is None or best.get("step", step) == step else refit_best(  # best.pt is older
        model, spec, out / "best.pt", refit_loader(train_set, cfg, env, model.tokenizer), val_loader, cfg, env, dtype)
    logs.close()
    summary = {"epoch": epoch, "step": step, "best": best, "last_metrics": last_metrics, "amp": amp,
               "nonfinite_logits_by_epoch": nonfinite, "existence_refit": refit, "existence_refit_best": best_refit,
               "time_s": budget.wall_s(), "cpu_s": budget.cpu_s(), "out": str(out), "stopped_early": time_up}
    return finish(summary, out, env)


# --------------------------------------------------------------------------- the loop's helpers


def refit_best(model: nn.Module, spec: Any, path: Path, loader: DataLoader, val_loader: DataLoader | None,
               cfg: RunConfig, env: D.DistEnv, dtype: torch.dtype | None) -> dict[str, Any] | None:
    """[addition] The existence head of a ``best.pt`` saved before the last step, fit anew on its own network.

    The refit after the last step fits the last network's head; a best checkpoint of an earlier epoch would keep
    the head trained alongside (on the demo 10 AUROC points worse: docs/training.md). Its weights are loaded into
    ``model``, the head is fit anew (:func:`~lsms.existence.refit_existence_head`), the existence thresholds are
    chosen again on val, and ``best.pt`` is written again with them (its step, epoch and metric unchanged)."""
    checkpoint = load_checkpoint(path)  # every rank: rank 0 wrote it before the barrier of save()
    model.load_state_dict(checkpoint["model"])
    done = refit_existence_head(model, loader, cfg.existence_refit_steps, env, dtype)
    metrics = checkpoint["metrics"] if val_loader is None else validate(model, val_loader, env, dtype, False)
    if env.is_main:
        log.info("best.pt (step %d) is older than the last step: its existence head fit anew on its network "
                 "and its thresholds chosen again on val", checkpoint["step"])
        checkpoint.pop("path")
        save_checkpoint({**checkpoint, "spec": spec.with_thresholds(metrics).to_dict(), "metrics": metrics,
                         "model": {k: v.detach().cpu() for k, v in model.state_dict().items()}}, path)
    D.barrier(env)
    return done


def schedule_at(step: int, total_steps: int, cfg: RunConfig, time_fraction: float) -> tuple[float, float]:
    """(learning rate, the other lesions' weight in the focal term) at optimiser step ``step``: both follow the
    share of training done (:func:`~lsms.optim.lr_at`, :func:`~lsms.losses.other_lesion_weight_at`)."""
    o = cfg.optim
    lr = lr_at(step, total_steps, o.lr, o.warmup_steps, o.poly_power, o.min_lr, time_fraction)
    return lr, other_lesion_weight_at(cfg.loss, progress_at(step, total_steps, o.warmup_steps, time_fraction))


def epoch_state(model: nn.Module, budget: TimeBudget) -> dict[str, float]:
    """The metrics.csv columns beside the losses: the run's CPU seconds so far and, for a text model, how open
    the language gates are per stage (:meth:`~lsms.model.encoder.LanguageGuidedEncoder.language_gates`)."""
    read = getattr(getattr(model, "encoder", None), "language_gates", None)  # LSMS only, not the U-Nets
    gates = read() if read is not None else None
    return {"cpu_s": round(budget.cpu_s(), 1),
            **{f"language_gate_{i}": round(g, 5) for i, g in enumerate(gates or [], start=1)}}


def step_counts(samples: int, o: Any, world_size: int) -> tuple[int, int]:
    """(optimiser steps per epoch, steps of the whole run) for ``samples`` training samples and optim settings ``o``."""
    per_epoch = samples // (o.batch_size * world_size)
    if per_epoch < 1:
        raise ValueError(f"{samples} training samples are fewer than one batch ({o.batch_size} x "
                         f"{world_size} processes); lower --batch-size")
    return per_epoch, min(o.epochs * per_epoch, o.max_steps or o.epochs * per_epoch)


def epoch_loader(train_set: Any, sampler: Any, collate: Collator, cfg: RunConfig, epoch: int, batch_in_epoch: int,
                 steps_per_epoch: int, device: torch.device) -> DataLoader:
    """The training batches of ``epoch`` still to run (from ``batch_in_epoch`` on: a mid-epoch resume)."""
    sampler.set_epoch(epoch)  # a new shuffle each epoch, the same on every rank
    train_set.set_epoch(epoch)  # augmentation draws depend on (seed, epoch, index): resumable
    batch = cfg.optim.batch_size
    indices = list(sampler)[: steps_per_epoch * batch][batch_in_epoch * batch:]
    return DataLoader(train_set, batch_size=batch, sampler=indices, collate_fn=collate,
                      num_workers=cfg.data.num_workers, drop_last=True, pin_memory=device.type == "cuda",
                      generator=torch.Generator().manual_seed(cfg.seed + epoch))  # not the global RNG


# what ``time_clock`` counts: wall time, or this process's CPU time (all its threads; not data-loading worker
# processes), which a busy machine does not shorten
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


class TimeBudget:
    """The run's time limit (``time_limit_minutes``, 0: none) on its clock (``time_clock``), counted from the
    run's start over all its sessions: ``spent`` (a checkpoint's ``time_spent``) is the time of the sessions
    before a resume, so a resumed run stops, and its time schedule ends, where one uninterrupted run would."""

    def __init__(self, limit_minutes: float, clock: str, env: D.DistEnv, spent: dict[str, float] | None = None):
        self.limit_minutes, self.clock_name, self.env = limit_minutes, clock, env
        self.before = {"wall_s": 0.0, "cpu_s": 0.0, **(spent or {})}
        self.wall0, self.cpu0 = CLOCKS["wall"](), CLOCKS["cpu"]()

    def used_s(self) -> float:
        """Seconds on the run's clock so far, earlier sessions included."""
        return self.wall_s() if self.clock_name == "wall" else self.cpu_s()

    def fraction(self, schedule: str) -> float:
        """The share of the limit used, for ``optim.schedule: time`` (the mean over ranks: the same on every
        rank); 0 for another schedule."""
        if schedule != "time":
            return 0.0
        return D.all_reduce_mean(min(1.0, self.used_s() / (60 * self.limit_minutes)), self.env)

    def is_up(self, step: int) -> bool:
        """Whether the limit has passed on any rank; says so (rank 0)."""
        up = bool(self.limit_minutes) and D.any_rank(self.used_s() > 60 * self.limit_minutes, self.env)
        if up and self.env.is_main:
            log.warning("time limit of %.1f %s minutes reached at step %d; stopping", self.limit_minutes,
                        "CPU" if self.clock_name == "cpu" else "wall-clock", step)
        return up

    def wall_s(self) -> float:
        return self.before["wall_s"] + CLOCKS["wall"]() - self.wall0

    def cpu_s(self) -> float:
        return self.before["cpu_s"] + CLOCKS["cpu"]() - self.cpu0

    def spent(self) -> dict[str, float]:
        """What a checkpoint stores as ``time_spent``."""
        return {"wall_s": self.wall_s(), "cpu_s": self.cpu_s()}


def refit_loader(train_set: Any, cfg: RunConfig, env: D.DistEnv, tokenizer: Any) -> DataLoader:
    """The train split in order, without augmentation or paraphrases, for :func:`refit_existence_head`."""
    plain = SegmentationDataset(train_set.records, train_set.preprocessing, text_level=train_set.text_level)
    return make_loader(plain, cfg.data.eval_batch_size or cfg.optim.batch_size, env, cfg.data.num_workers,
                       tokenizer=tokenizer)


def validate(model: nn.Module, loader: DataLoader, env: D.DistEnv, dtype: torch.dtype | None,
             progress: bool) -> dict[str, Any]:
    """The validation summary (rank 0's BatchNorm statistics on every rank). With negative expressions in
    val, the existence thresholds are chosen here and saved with the model."""
    D.broadcast_buffers(model, env)
    return evaluate_model(model, loader, env.device, env, amp=dtype, progress=progress, existence_threshold="choose",
                          max_prob_threshold="choose")["summary"]


class EpochMeter:
    """One epoch's running account: loss sums, the time the steps waited for data, truncated sentences, and
    images per second since the last logged step."""

    def __init__(self, world_size: int):
        self.world_size, self.sums, self.batches = world_size, {}, 0
        self.waited, self.truncated, self.sentences = 0.0, 0, 0
        self.t_asked = self.t_logged = time.perf_counter()
        self.seen = 0

    def arrived(self, batch: dict[str, Any]) -> None:
        """A batch came from the loader: count the wait and its truncated sentences."""
        self.waited += time.perf_counter() - self.t_asked
        if "truncated" in batch:
            self.truncated += int(batch["truncated"].sum())
            self.sentences += len(batch["truncated"])

    def add(self, values: dict[str, float], images: int, step: int) -> float:
        """The losses of the step just made (any inf/NaN stops the run); returns images per second."""
        if not all(math.isfinite(v) for v in values.values()):
            raise RuntimeError(
                f"non-finite loss at step {step} ({values}); lower --lr, raise --warmup-steps or use --amp off")
        self.batches += 1
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.seen += images * self.world_size
        return self.seen / max(time.perf_counter() - self.t_logged, 1e-9)

    def warn_truncated(self, epoch: int, tokenizer: Any, env: D.DistEnv) -> None:
        if self.truncated and env.is_main:
            log.warning("epoch %d: %d of %d training expressions were truncated to %d tokens (raise max_tokens; "
                        "'lsms check DATA --max-tokens N' lists the token lengths)", epoch + 1, self.truncated,
                        self.sentences, tokenizer.max_tokens)

    def logged(self) -> None:
        self.t_logged, self.seen = time.perf_counter(), 0

    def asked(self) -> None:
        self.t_asked = time.perf_counter()

    def means(self, env: D.DistEnv) -> dict[str, float]:
        """Per-step means over all ranks, ``data_wait_s`` (the data loader's share of a step) included."""
        sums = {**self.sums, "data_wait_s": self.waited}
        return {k: D.all_reduce_mean(v / max(self.batches, 1), env) for k, v in sums.items()}


def finish(summary: dict[str, Any], out: Path, env: D.DistEnv) -> dict[str, Any]:
    """Warn about validation epochs with inf/NaN logits, write ``summary.json`` (rank 0), return the summary."""
    nonfinite = summary["nonfinite_logits_by_epoch"]
    if nonfinite and env.is_main:
        log.warning("validation gave inf/NaN logits in %d of the evaluated epochs (samples per epoch: %s): the model "
                    "diverges on them (docs/model.md, block_norm; BatchNorm blocks are the usual cause)",
                    len(nonfinite), ", ".join(f"epoch {e}: {n}" for e, n in nonfinite.items()))
    if env.is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def mixed_precision(cfg: RunConfig, checkpoint: dict[str, Any] | None, step_module: nn.Module, train_set: Any,
                    collate: Collator, device: torch.device, env: D.DistEnv
                    ) -> tuple[torch.dtype | None, dict[str, str]]:
    """(autocast dtype, the checkpoint's ``amp`` record: setting, dtype, why) of a run: a resumed ``auto`` run
    keeps its checkpoint's choice; a new one measures its first batch in fp32 and bf16 on a throwaway copy of
    the model (:func:`lsms.optim.choose_amp`)."""
    saved = (checkpoint or {}).get("amp")
    if cfg.amp == "auto" and saved and saved.get("setting") == "auto":
        dtype, reason = AMP_DTYPES.get(saved["dtype"]), f"kept from the checkpoint ({saved['reason']})"
    else:
        probe = None
        if cfg.amp == "auto" and device.type == "cpu":
            n = min(cfg.optim.batch_size, len(train_set))
            probe = probe_step_seconds(step_module, to_device(collate([train_set[i] for i in range(n)]), device))
        dtype, reason = choose_amp(cfg.amp, device, probe, agree=lambda gain: D.all_reduce_mean(gain, env))
    return dtype, {"setting": cfg.amp, "dtype": dtype_name(dtype), "reason": reason}



def resumed(cfg: RunConfig, resume: str | Path | None, env: D.DistEnv, given: dict[str, Any] | None = None
            ) -> tuple[RunConfig, dict[str, Any] | None, bool]:
    """(settings, checkpoint, whether ``out`` is the resumed run's own folder): without ``resume`` ``cfg``, None,
    False; else the checkpoint's settings with those in ``given`` (None: what ``cfg`` changes from the defaults)
    over them, and ``out`` the checkpoint's folder unless given."""
    if resume is None:
        return cfg, None, False
    path = resolve_checkpoint(resume, prefer="last")
    checkpoint = load_checkpoint(path, map_location="cpu")
    if checkpoint.get("optimizer") is None:
        raise ValueError(f"{path} has no optimiser state (a best.pt or exported model); resume from last.pt")
    if missing := [k for k in ("epoch", "step", "batch_in_epoch", "rng") if k not in checkpoint]:
        raise ValueError(f"{path}: the checkpoint lacks {missing}; it cannot be resumed")
    chosen = given if given is not None else changed_settings(cfg.to_dict(), RunConfig().to_dict())
    tree = resume_settings(run_config(checkpoint).to_dict(), chosen, FIXED_ON_RESUME, strict=given is not None)
    tree["out"] = chosen.get("out", str(path.parent))
    if env.is_main:
        log.info("resuming from %s (epoch %d, step %d)", path, checkpoint["epoch"], checkpoint["step"])
    cfg = RunConfig.from_dict(tree)
    return cfg, checkpoint, Path(cfg.out).resolve() == path.parent.resolve()


def restore(checkpoint: dict[str, Any], optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
            env: D.DistEnv, seed: int, best: dict[str, Any]) -> tuple[int, int, int, dict[str, Any]]:
    """Optimiser, loss scaler and RNG states from ``checkpoint``; returns (epoch, step, batch_in_epoch, best)."""
    optimizer.load_state_dict(checkpoint["optimizer"])
    if checkpoint.get("scaler"):
        scaler.load_state_dict(checkpoint["scaler"])
    states = checkpoint["rng"]
    if not isinstance(states, list):
        set_rng_state(states)
    elif len(states) == env.world_size:  # one per rank
        set_rng_state(states[env.rank])
    else:
        log.warning("checkpoint has RNG states for %d processes, running %d: reseeding", len(states), env.world_size)
        seed_everything(seed + 1000 * checkpoint["step"] + env.rank)
    return checkpoint["epoch"], checkpoint["step"], checkpoint["batch_in_epoch"], dict(checkpoint.get("best") or best)


def wrap_ddp(step_module: nn.Module, model: nn.Module, criterion: LSMSLoss, device: torch.device) -> nn.Module:
    """DistributedDataParallel around model + loss. Unused parameters exist when the text encoder is trained
    (BERT's pooler: its output is not used) and text_proj when the contrastive weight is 0."""
    uses_text = model.config.use_text
    find_unused = uses_text and (any(p.requires_grad for p in model.text_encoder.parameters())
                                 or criterion.config.contrastive_weight == 0)
    return nn.parallel.DistributedDataParallel(
        step_module, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=find_unused)


def check_model_settings(cfg: RunConfig) -> None:
    """Build the model ``cfg`` asks for on the ``meta`` device: every model setting and the token limit are
    checked in a second, without allocating or loading weights (of a pretrained text encoder only the config is
    read), after the memory its batches ask for (:func:`check_training_memory`)."""
    check_training_memory(cfg, D.pick_device(cfg.device))
    model = cfg.model
    text = getattr(model, "text", None)
    if model.use_text and text is not None and text.pretrained and text.hf_config is None:
        from transformers import AutoConfig  # late: transformers is slow to import

        hf_config = AutoConfig.from_pretrained(resolve_text_encoder(text.encoder)).to_diff_dict()
        model = dataclasses.replace(model, text=dataclasses.replace(text, pretrained=False, hf_config=hf_config))
    with torch.device("meta"):
        build(dataclasses.replace(model, in_channels=cfg.data.channels or model.in_channels))  # only a check


def check_training_memory(cfg: RunConfig, device: torch.device | str) -> None:
    """Refuse, before any data is read, a batch whose activations would pass the memory limit
    (:func:`lsms.spec.check_memory`): training on ``--batch-size`` images at ``--image-size`` (or the augmentation's
    patches), validation on ``--eval-batch-size`` images at ``--image-size``."""
    data, batch = cfg.data, cfg.optim.batch_size
    side = data.augmentation.patch_size if data.augment and data.augmentation.patch_size else data.image_size
    what = "--augmentation patch_size" if side != data.image_size else "--image-size"
    check_memory(cfg.model, (side, side), batch, training=True, device=device,
                 source=f"{what} {side} with --batch-size {batch}", fix=f"use a smaller {what} or --batch-size")
    eval_batch = data.eval_batch_size or batch
    check_memory(cfg.model, (data.image_size, data.image_size), eval_batch, training=False, device=device,
                 source=f"--image-size {data.image_size} with --eval-batch-size {eval_batch}",
                 fix="use a smaller --image-size or --eval-batch-size")


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}




# --------------------------------------------------------------------------- command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags write into the settings tree: each ``dest`` is the setting's path (``optim.lr``)."""
    S = argparse.SUPPRESS  # absent flags stay absent, so a --config file's values are not overridden by defaults
    d = RunConfig()
    p.add_argument("data.path", nargs="?", default=S, metavar="DATA",
                   help="dataset folder: manifest.jsonl, LViT layout (Train_Folder/...) or images/ + masks/")
    p.add_argument("--out", default=S, metavar="RUN", help=f"run folder for checkpoints and logs (default {d.out})")
    p.add_argument("--config", metavar="YAML",
                   help="settings file: the settings tree (e.g. 'optim: {epochs: 20}', see docs/training.md); "
                        "flat keys of lsms 0.1 ('epochs: 20') still load; flags override it")
    p.add_argument("--resume", metavar="RUN_OR_CHECKPOINT",
                   help="continue a run from its last.pt, with its saved settings (flags given again override them)")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an --out folder that already holds a run (deletes its checkpoints and logs)")
    p.add_argument("--recipe", metavar="NAME",
                   help="a named settings file under src/lsms/recipes/: 'paper' (base, lr 3e-5, 100 epochs, batch 16, "
                        "480x480; meant for fine-tuning), 'real' (real 2D images from scratch, long budgets: "
                        "lesion-centred patches, scale/rotation/flip/intensity augmentation, positions, 1/2-resolution "
                        "output), 'real-cpu' (the same without patches and scale/rotation, whole 224 px images: "
                        "faster learning in an hour of CPU) or 'demo' (the demo's: tiny with the existence head, CT "
                        "slices at 128 px, 2 CPU cores); docs/training.md; --config and flags override it")
    p.add_argument("--paper-recipe", action="store_true", help="the same as --recipe paper")
    g = p.add_argument_group("model")
    g.add_argument("--preset", dest="model.preset", default=S, choices=list(MODELS),
                   help=f"LSMS size, or a baseline: unet (MONAI BasicUNet, no text), film-unet (FiLM text fusion) "
                        f"(default {d.model.preset})")
    g.add_argument("--text", dest="model.use_text", action=argparse.BooleanOptionalAction, default=S,
                   help="use the referring expressions (--no-text: classical segmentation, no language branch)")
    g.add_argument("--text-encoder", dest="model.text.encoder", default=S,
                   help=f"text model: package default, folder or hub id (default {d.model.text.encoder})")
    g.add_argument("--freeze-text", dest="model.text.freeze", action=argparse.BooleanOptionalAction, default=S,
                   help="keep the text encoder fixed")
    g.add_argument("--max-tokens", dest="model.text.max_tokens", type=int, default=S,
                   help=f"tokens per expression (default {d.model.text.max_tokens})")
    g.add_argument("--model", dest="model_overrides", action="append", metavar="KEY=VALUE",
                   help="any field of the model's config, repeatable: --model decoder=last --model conv_kernels=[11] "
                        "--model text.freeze=true")
    _data_arguments(p.add_argument_group("data"), d.data)
    g = p.add_argument_group("optimisation")
    o = d.optim
    g.add_argument("--epochs", dest="optim.epochs", type=int, default=S, help=f"(default {o.epochs})")
    g.add_argument("--max-steps", dest="optim.max_steps", type=int, default=S,
                   help="stop after this many optimiser steps, mid-epoch if need be; the learning-rate schedule "
                        "ends there (default: epochs x steps per epoch)")
    g.add_argument("--schedule", dest="optim.schedule", choices=("steps", "time"), default=S,
                   help="'time': the learning rate also decays over --time-limit, so the schedule ends with the time "
                        "however fast the steps run (default: steps)")
    g.add_argument("--batch-size", dest="optim.batch_size", type=int, default=S, help=f"per process (default {o.batch_size})")
    g.add_argument("--lr", dest="optim.lr", type=float, default=S, help=f"peak learning rate (default {o.lr}; paper {PAPER_LR})")
    g.add_argument("--text-lr", dest="optim.text_lr", type=float, default=S,
                   help="text-encoder learning rate (default lr x --text-lr-scale)")
    g.add_argument("--text-lr-scale", dest="optim.text_lr_scale", type=float, default=S, help=f"(default {o.text_lr_scale})")
    g.add_argument("--gate-lr-scale", dest="optim.gate_lr_scale", type=float, default=S,
                   help=f"learning rate of the language gates as a multiple of --lr: how fast the language branch "
                        f"opens from its closed start (default {o.gate_lr_scale})")
    g.add_argument("--weight-decay", dest="optim.weight_decay", type=float, default=S,
                   help=f"AdamW weight decay (default {o.weight_decay})")
    g.add_argument("--no-decay-norm-bias", dest="optim.no_decay_norm_bias", action="store_const", const=True, default=S,
                   help="no weight decay on norm weights and biases (the default)")
    g.add_argument("--decay-norm-bias", dest="optim.no_decay_norm_bias", action="store_const", const=False, default=S,
                   help="weight decay on every parameter")
    g.add_argument("--warmup-steps", dest="optim.warmup_steps", type=int, default=S,
                   help=f"linear warm-up steps (default {o.warmup_steps})")
    g.add_argument("--poly-power", dest="optim.poly_power", type=float, default=S, help=f"poly decay power (default {o.poly_power})")
    g.add_argument("--min-lr", dest="optim.min_lr", type=float, default=S,
                   help=f"learning rate the poly decay ends at (default {o.min_lr:g})")
    g.add_argument("--grad-clip", dest="optim.grad_clip", type=float, default=S,
                   help=f"max gradient norm, 0 = off (default {o.grad_clip})")
    g.add_argument("--loss", dest="loss_overrides", action="append", metavar="KEY=VALUE",
                   help="LossConfig field, repeatable: --loss contrastive_weight=0.125")
    g.add_argument("--existence-refit-steps", dest="existence_refit_steps", type=int, default=S,
                   help="after the last step, fit the existence head anew on the frozen network over the train split "
                        "for N full-batch steps (default 300; 0: keep the head as trained alongside)")
    g = p.add_argument_group("running")
    g.add_argument("--seed", type=int, default=S, help="random seed, 0 to 2**63-1 (default 0)")
    g.add_argument("--device", default=S, help="auto (default), cpu, cuda, cuda:N, mps")
    g.add_argument("--amp", default=S, choices=("auto", "bf16", "fp16", "off"),
                   help="mixed precision (auto: bf16/fp16 on CUDA, off on CPU)")
    g.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=S,
                   help="deterministic algorithms only (slower on GPU; default off)")
    g.add_argument("--threads", type=int, default=S, help="CPU threads per process (default: torch's choice)")
    g.add_argument("--val-every", type=int, default=S, help="validate every N epochs")
    g.add_argument("--best-metric", default=S,
                   help="validation metric that picks best.pt (default Dice; e.g. mIoU, referring_accuracy)")
    g.add_argument("--save-every", type=int, default=S, help="also save last.pt every N steps (0 = epoch ends)")
    g.add_argument("--log-every", type=int, default=S, help="log train losses every N steps")
    g.add_argument("--time-limit", dest="time_limit_minutes", type=float, default=S,
                   help="stop after this many minutes of training (validate and save first), counted over --resume: "
                        "a resumed run gets what is left; --time-clock says which minutes")
    g.add_argument("--time-clock", dest="time_clock", choices=("wall", "cpu"), default=S,
                   help="what --time-limit (and --schedule time) counts: 'wall' (default) or 'cpu', this process's CPU "
                        "time over all its threads, so that runs on a busy machine get equal compute")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=S, help="tqdm progress bars")
    short_metavars(p)


def _data_arguments(g: argparse._ArgumentGroup, dd: DataConfig) -> None:
    """The data group of :func:`add_arguments` (``dd``: the defaults)."""
    S = argparse.SUPPRESS
    g.add_argument("--image-size", dest="data.image_size", type=int, default=S,
                   help=f"model input side in pixels, a multiple of 32, at least 64 (default {dd.image_size})")
    g.add_argument("--in-channels", dest="data.in_channels", type=int, default=S, choices=(1, 3),
                   help="input channels (default 1 for CT, else 3)")
    g.add_argument("--context-slices", dest="data.context_slices", type=int, default=S, metavar="N",
                   help="2.5D: give the model each slice with N neighbouring slices of its volume on each side as "
                        "channels (2N+1; the records name their volume, as lsms synth --volumes writes them; default "
                        "0: 2D)")
    g.add_argument("--window", dest="data.window", default=S,
                   help="CT intensity window: a name (liver, abdomen, ...) or WIDTH,LEVEL in HU")
    g.add_argument("--train-split", dest="data.train_split", default=S, help=f"(default {dd.train_split})")
    g.add_argument("--val-split", dest="data.val_split", default=S, help=f"(default {dd.val_split})")
    g.add_argument("--text-level", dest="data.text_level", default=S, choices=TEXT_LEVELS, help="training expressions")
    g.add_argument("--augment", dest="data.augment", action=argparse.BooleanOptionalAction, default=S,
                   help="training augmentation (paper: none)")
    g.add_argument("--augmentation", dest="augmentation_overrides", action="append", metavar="KEY=VALUE",
                   help="Augmentation field, repeatable: --augmentation patch_size=224 --augmentation text_flip=swap "
                        "(fields: hflip_p, vflip_p, text_flip, patch_size, foreground_p, spatial_p, scale, rotation, "
                        "contrast, brightness, gamma, noise)")
    g.add_argument("--num-workers", dest="data.num_workers", type=int, default=S,
                   help="data-loading processes per training process")
    g.add_argument("--group-by-image", dest="data.group_by_image", action=argparse.BooleanOptionalAction, default=S,
                   help="put the expressions of one image in the same batch (same image, different sentences)")
    g.add_argument("--eval-batch-size", dest="data.eval_batch_size", type=int, default=S,
                   help="images per validation forward pass (default: --batch-size)")
    g.add_argument("--allow-outside-root", dest="data.allow_outside_root", action="store_const", const=True, default=S,
                   help="read files the dataset names outside its folder (off by default: an error)")
    g.add_argument("--allow-split-leak", dest="data.allow_split_leak", action="store_const", const=True, default=S,
                   help="train on a dataset whose splits share a patient or an image, with a warning (off by default: "
                        "an error; validation numbers would overstate the model)")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The settings of ``lsms train``'s command line (:func:`lsms.config.chosen_settings` over the defaults)."""
    return RunConfig.from_dict(chosen_from_args(args))


def chosen_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The tree of settings ``lsms train``'s command line chose (recipe, file, flags; no defaults)."""
    flags = vars(args)
    recipe = "paper" if flags.get("paper_recipe") else flags.get("recipe")
    return chosen_settings(flags, recipe=recipe, settings_file=flags.get("config"), model=flags.get("model_overrides"),
                           loss=flags.get("loss_overrides"), augmentation=flags.get("augmentation_overrides"))


def run(args: argparse.Namespace) -> int:
    chosen = chosen_from_args(args)
    cfg = RunConfig.from_dict(chosen)  # every value checked now, before any work
    main_process = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 owns the run folder
    path = None
    if args.resume:  # the run's saved settings (DATA, --out, ...) are restored; what is given again wins
        path = resolve_checkpoint(args.resume, prefer="last")  # resolved once: train takes the file
        out = Path(chosen.get("out", path.parent))
        if main_process:
            check_run_folder(out, resume=out.resolve() == path.parent.resolve(), overwrite=args.overwrite)
    else:
        if not cfg.data.path:
            raise ValueError("give DATA (a dataset folder), a --config file with 'data: {path: ...}', or --resume RUN")
        if main_process:
            check_run_folder(Path(cfg.out), resume=False, overwrite=args.overwrite)
        check_model_settings(cfg)
    summary = train(cfg, resume=path, overwrite=args.overwrite, given=chosen)
    best = summary["best"]
    if best["epoch"] >= 0:
        log.info("best %s %.4f at epoch %d; checkpoints in %s", best["metric"], best["value"], best["epoch"], summary["out"])
    return 0
