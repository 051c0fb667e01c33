"""Checkpoints: a plain dict of tensors and plain containers, saved atomically, loaded without running code.

Layout (nanoGPT style, the config travels inside)::

    {
        "format": "lsms-checkpoint", "format_version": 3, "lsms_version": "0.1.0",
        "spec": ModelSpec.to_dict(),              # network config + input contract: each input setting once
        "run": {...},                             # the training settings, less what the spec holds
        "model": state_dict,                      # tensors only
        "optimizer": optimizer.state_dict(),      # or None (exported / best-only checkpoints keep it too)
        "scaler": grad_scaler.state_dict(),       # or None (no fp16 loss scaling)
        "amp": {"setting": "auto", "dtype": "bf16", "reason": str},  # mixed precision chosen (optional: fp32)
        "epoch": int,                              # epochs finished
        "step": int,                               # optimiser steps done; the LR schedule is a pure function of it
        "batch_in_epoch": int,                     # batches of the current epoch already used (mid-epoch saves)
        "rng": {"python": ..., "numpy": ..., "torch": ..., "cuda": [...]},
        "metrics": {...}, "best": {"metric": str, "value": float, "epoch": int},
        "time_spent": {"wall_s": float, "cpu_s": float},   # the run's time so far, over resumes
    }

The :class:`~lsms.spec.ModelSpec` (``spec_of``) holds the model config (the network is rebuilt from it), the
preprocessing (image size, channels, intensity) and the thresholds; ``run`` is the
:class:`~lsms.config.RunConfig` tree without the model and without the data settings the spec holds resolved
(:data:`SPEC_DATA_KEYS`); :func:`run_config` puts them back from the spec. Older files are converted on
reading, each by one converter: format 1 (lsms 0.1: flat ``config["model"]``, ``config["train"]``,
``config["loss"]``) by :func:`upgrade_v1` to format 2 (``config["run"]``, the whole tree, and
``config["preprocessing"]``), and that by :func:`upgrade_v2` to format 3; no other code sees an older format.

Why ``torch.load(weights_only=True)``: a pickle can run any code while it is read. The restricted
unpickler only rebuilds tensors and plain containers (dict, list, tuple, str, int, float, bool, None), so
a checkpoint from a stranger cannot execute anything; everything saved here is kept to those types
(:mod:`lsms.seeding` stores NumPy's RNG state as a tensor for that reason).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from lsms import __version__
from lsms.config import RunConfig, upgrade_flat_model, upgrade_flat_settings
from lsms.model import build
from lsms.spec import ModelSpec

FORMAT = "lsms-checkpoint"
FORMAT_VERSION = 3
SPEC_DATA_KEYS = ("image_size", "in_channels", "window", "context_slices")  # data settings a checkpoint keeps resolved, in its spec
CHECKPOINT_NAMES = ("best.pt", "last.pt")  # the order a run folder is searched in


# --------------------------------------------------------------------------- saving


def save_checkpoint(checkpoint: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``checkpoint`` to ``path`` atomically.

    The dict goes to a temporary file in the same folder, which is flushed and fsync'ed and then renamed
    over ``path`` (``os.replace`` is atomic on POSIX and Windows). A crash or a full disk while saving leaves
    the previous file at ``path`` untouched; the temporary file is removed on failure.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)  # make the rename itself durable
    return path


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- loading


def resolve_checkpoint(run_or_checkpoint: str | os.PathLike, prefer: str = "best") -> Path:
    """A checkpoint file, or a run folder (its ``best.pt``, else ``last.pt``), -> the checkpoint path."""
    path = Path(run_or_checkpoint).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        names = (f"{prefer}.pt",) + tuple(n for n in CHECKPOINT_NAMES if n != f"{prefer}.pt")
        for name in names:
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(
            f"no checkpoint in run folder {str(path)!r}: expected {' or '.join(names)} (written by 'lsms train')"
        )
    raise FileNotFoundError(f"checkpoint or run folder {str(path)!r} does not exist")


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint dict safely (``weights_only=True``: no code from the file is ever run).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not an lsms checkpoint, is damaged, or holds anything but tensors and plain
            containers (which is what a malicious pickle would need).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    _verify_archive(path)
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # UnpicklingError for forbidden globals, RuntimeError for damaged zips, ...
        raise ValueError(
            f"cannot load checkpoint {str(path)!r} safely: {type(err).__name__}: {_first_line(err)}. "
            "Only lsms checkpoints (tensors and plain containers) are accepted; the file was not executed."
        ) from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not an lsms checkpoint (no 'format': {FORMAT!r} entry)")
    if checkpoint.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{str(path)!r} was written by a newer lsms (checkpoint format {checkpoint['format_version']}, "
            f"this lsms reads up to {FORMAT_VERSION}); upgrade lsms"
        )
    if checkpoint.get("format_version", 1) == 1:
        checkpoint = upgrade_v1(checkpoint)
    if checkpoint["format_version"] == 2:
        checkpoint = upgrade_v2(checkpoint)
    _check_sections(checkpoint, path)
    checkpoint["path"] = str(path)  # where it came from, for the errors of what is built from it
    return checkpoint


def upgrade_v1(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """A format-1 checkpoint (flat model, train and loss configs of lsms 0.1) -> format 2 (the RunConfig tree).

    The saved model config is the full one the weights were built with, so it wins over the training
    settings' ``preset`` and ``model_overrides``; tensors, optimiser and RNG states are unchanged.
    """
    config = checkpoint.get("config") if isinstance(checkpoint.get("config"), dict) else {}
    section = {k: v if isinstance(v, dict) else None for k, v in config.items()}  # malformed: missing, an error
    run, _ = upgrade_flat_settings(dict(section.get("train") or {}))
    if section.get("model") is not None:
        run["model"] = upgrade_flat_model(dict(section["model"]))
    if section.get("loss") is not None:
        run["loss"] = dict(section["loss"])
    return {**checkpoint, "format_version": 2,
            "config": {"run": run, "preprocessing": section.get("preprocessing")}}  # None when absent: an error


def upgrade_v2(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """A format-2 checkpoint (``config["run"]``: the whole settings tree; ``config["preprocessing"]``) -> format
    3: the spec (model config, preprocessing, the existence thresholds its ``metrics`` chose) and the settings
    without what the spec holds. Tensors, optimiser and RNG states are unchanged."""
    config = checkpoint.get("config") if isinstance(checkpoint.get("config"), dict) else {}
    run = dict(config.get("run")) if isinstance(config.get("run"), dict) else None
    model = run.pop("model", None) if run is not None else None
    if isinstance(model, dict) and model.get("arch", "lsms") == "lsms":
        model = {"block_norm": "batch", **model}  # saved before the setting existed: BatchNorm, the default then
    if run is not None and isinstance(run.get("data"), dict):
        run["data"] = {k: v for k, v in run["data"].items() if k not in SPEC_DATA_KEYS}
    metrics = checkpoint.get("metrics") if isinstance(checkpoint.get("metrics"), dict) else {}
    thresholds = {name: float(metrics[key]) for name, key in (("existence_threshold", "existence_threshold"),
                                                               ("max_prob_threshold", "existence_threshold_max_prob"))
                  if isinstance(metrics.get(key), (int, float)) and not isinstance(metrics.get(key), bool)}
    spec = {"model": model, "preprocessing": config.get("preprocessing"), **thresholds}  # None parts: an error
    rest = {k: v for k, v in checkpoint.items() if k != "config"}
    return {**rest, "format_version": FORMAT_VERSION, "spec": spec, "run": run}


def _verify_archive(path: Path) -> None:
    """Check every member's CRC of a zip-format checkpoint (``torch.load`` does not: a flipped byte in the
    weights would load as a silently different model). Legacy non-zip checkpoints are left to ``torch.load``."""
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        raise ValueError(f"checkpoint {str(path)!r} is damaged ({_first_line(err)}); copy it again") from None
    if bad is not None:
        raise ValueError(f"checkpoint {str(path)!r} is damaged: the CRC of {bad!r} does not match; copy it again")


def _check_sections(checkpoint: dict[str, Any], path: Path) -> None:
    """The sections every use of a checkpoint needs, present and of the right kind; errors name the key."""
    if not isinstance(checkpoint.get("model"), dict) or not all(
        isinstance(v, torch.Tensor) for v in checkpoint["model"].values()
    ):
        raise ValueError(f"checkpoint {str(path)!r}: 'model' (the weights, a dict of tensors) is missing or malformed")
    spec = checkpoint.get("spec")
    for where, section in (("'run'", checkpoint.get("run")), ("'spec'", spec),
                           ("'spec' -> 'model'", (spec or {}).get("model") if isinstance(spec, dict) else None),
                           ("'spec' -> 'preprocessing'", spec.get("preprocessing") if isinstance(spec, dict) else None)):
        if not isinstance(section, dict):
            raise ValueError(f"checkpoint {str(path)!r}: {where} is missing; it was not written by lsms train")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else ""


# --------------------------------------------------------------------------- assembling a checkpoint


def make_checkpoint(model: torch.nn.Module, spec: ModelSpec, run: RunConfig, *,
                    optimizer: torch.optim.Optimizer | None = None, scaler: torch.amp.GradScaler | None = None,
                    amp: dict[str, str] | None = None, epoch: int = 0, step: int = 0, batch_in_epoch: int = 0,
                    rng: list[dict[str, Any]] | None = None, metrics: dict[str, Any] | None = None,
                    best: dict[str, Any] | None = None, time_spent: dict[str, float] | None = None) -> dict[str, Any]:
    """The checkpoint dict of the layout above (weights on the CPU; ``optimizer`` None for inference-only files).
    ``spec`` is stored with the existence thresholds of ``metrics`` (the validation it was saved after);
    ``time_spent``: the run's wall and CPU seconds so far, over all its sessions (a resume continues them)."""
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "lsms_version": __version__,
        "spec": spec.with_thresholds(metrics or {}).to_dict(), "run": stored_run(run),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "amp": amp or {"setting": run.amp, "dtype": "fp32", "reason": "not recorded"},
        "epoch": epoch, "step": step, "batch_in_epoch": batch_in_epoch, "rng": rng if rng is not None else [],
        "metrics": metrics or {}, "best": best or {}, "time_spent": time_spent or {},
    }


def stored_run(run: RunConfig) -> dict[str, Any]:
    """The settings tree as a checkpoint (and ``RUN/config.json``) holds it: without the model and the data
    settings of :data:`SPEC_DATA_KEYS`, which the spec holds."""
    tree = run.to_dict()
    del tree["model"]
    tree["data"] = {k: v for k, v in tree["data"].items() if k not in SPEC_DATA_KEYS}
    return tree


def spec_of(checkpoint: dict[str, Any]) -> ModelSpec:
    """The :class:`~lsms.spec.ModelSpec` a checkpoint holds; errors name the checkpoint's file."""
    return ModelSpec.from_dict(dict(checkpoint["spec"]), _named(checkpoint))


def _named(checkpoint: dict[str, Any]) -> str:
    return f"checkpoint {checkpoint['path']!r}" if checkpoint.get("path") else "checkpoint spec"


def run_config(checkpoint: dict[str, Any]) -> RunConfig:
    """The settings a checkpoint was trained with: its ``run`` with the model and the resolved data settings
    (image size, channels, CT window) put back from its spec."""
    spec = spec_of(checkpoint)
    tree = dict(checkpoint["run"])
    prep = spec.preprocessing
    window = None
    if prep.intensity == "window":
        window = prep.window or "{:g},{:g}".format(*prep.window_width_level)
    tree["data"] = {**tree.get("data", {}), "image_size": prep.image_size[0], "in_channels": prep.in_channels,
                    "window": window, "context_slices": prep.context_slices}
    return RunConfig.from_dict({**tree, "model": spec.model.to_dict()}, where="checkpoint settings")


# --------------------------------------------------------------------------- model from a checkpoint


def model_from_checkpoint(checkpoint: dict[str, Any], device: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild the model (LSMS or a baseline) a checkpoint describes and load its weights (eval mode). Its text
    encoder is checked first (:meth:`~lsms.spec.ModelSpec.check_text_source`: a hub id needs the opt-in)."""
    spec = spec_of(checkpoint)
    spec.check_text_source(_named(checkpoint))
    cfg = dataclasses.replace(spec.model, text=dataclasses.replace(spec.model.text, pretrained=False))  # weights: the state dict
    _check_weights_fit(cfg, checkpoint["model"], _named(checkpoint))
    model = build(cfg)
    model.load_state_dict(checkpoint["model"])
    return model.to(device).eval()


def _check_weights_fit(cfg: Any, weights: dict[str, torch.Tensor], where: str) -> None:
    """Compare the stored weights with the model ``cfg`` describes, built on the ``meta`` device (no memory is
    allocated, so a config declaring enormous sizes costs nothing); any difference is an error naming tensors."""
    with torch.device("meta"):
        skeleton = build(cfg)
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    stored = {k: tuple(v.shape) for k, v in weights.items()}
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    wrong = [f"{k} {stored[k]} (config: {expected[k]})" for k in sorted(expected.keys() & stored.keys())
             if expected[k] != stored[k]]
    if missing or unexpected or wrong:
        def some(items: list[str]) -> str:
            return ", ".join(items[:4]) + (f" ... (+{len(items) - 4})" if len(items) > 4 else "") or "none"

        raise ValueError(
            f"{where}: the weights do not fit the model its config describes "
            f"(missing: {some(missing)}; unexpected: {some(unexpected)}; other shapes: {some(wrong)})"
        )


def load_trained(run_or_checkpoint: str | os.PathLike, device: torch.device | str = "cpu", prefer: str = "best",
                 image_size: int | None = None, batch: int = 1):
    """(model in eval mode, its :class:`~lsms.spec.ModelSpec`, checkpoint dict) from a run folder or checkpoint.

    Before the model is built, inference on ``batch`` images at ``image_size`` (a command's ``--image-size``; None:
    the checkpoint's) is checked against the memory limit (:func:`lsms.spec.check_memory`): the error names the
    checkpoint or the setting.
    """
    path = resolve_checkpoint(run_or_checkpoint, prefer=prefer)
    checkpoint = load_checkpoint(path, map_location="cpu")
    spec = spec_of(checkpoint)
    if image_size is None:
        source, fix = f"{_named(checkpoint)}: its image size", "if the file is genuine, run it at a smaller size " \
            "(lsms export --image-size N)"
    else:
        source, fix = f"--image-size {image_size}", "use a smaller --image-size"
    if batch > 1:
        source, fix = f"{source} with batch {batch}", f"use a smaller batch; {fix}"
    spec.with_input(image_size=image_size).check_memory(batch, source=source, fix=fix, device=device)
    return model_from_checkpoint(checkpoint, device), spec, checkpoint
