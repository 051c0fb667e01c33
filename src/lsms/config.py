"""The one tree of settings of a training run: :class:`RunConfig` (model, data, optim, loss, running knobs).

Every node is a typed dataclass with the one dict round trip of :mod:`lsms.settings`; the tree goes whole into
``RUN/config.json`` and into every checkpoint, and ``lsms train --config FILE`` reads the same tree from YAML::

    model: {preset: tiny, decoder: last, text: {freeze: true}}   # a registered model + overrides
    data: {path: data/refliver, image_size: 128, window: "200,80"}
    optim: {epochs: 20, lr: 2.0e-3}
    loss: {contrastive_weight: 0.125}
    seed: 0

Settings files and checkpoints written before the tree (flat keys: ``lr``, ``image_size``, ``preset``,
``model_overrides``, ...) are read through :func:`upgrade_flat_settings`, which names every moved key.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from lsms.data.config import DataConfig
from lsms.losses import LossConfig
from lsms.metrics import SCORE_NAMES
from lsms.model.config import BASELINES, MODELS, ModelConfig, model_config_from_dict, tiny
from lsms.settings import DictRoundTrip, check_finite

log = logging.getLogger(__name__)

PAPER_LR = 3e-5  # the paper's AdamW learning rate (fine-tuning from ImageNet / BERT weights)
RECIPES_DIR = Path(__file__).parent / "recipes"  # named settings files: --recipe NAME
MAX_SEED = 2**63 - 1  # torch seeds are 64-bit; the per-rank and per-epoch seeds (seed + k) stay below 2**64


@dataclass(frozen=True)
class OptimConfig(DictRoundTrip):
    """AdamW and its schedule (paper: AdamW, wd 0.01, poly power 0.9, lr 3e-5, 100 epochs, batch 16).

    The default learning rate (1e-3) is for training the visual branch from scratch, as is the only option
    here (no ImageNet weights); the paper's 3e-5 (``--lr 3e-5`` or ``--paper-recipe``) fine-tunes pretrained
    weights and learns far too slowly from random initialisation.
    """

    settings_name: ClassVar[str] = "optim settings"

    epochs: int = 50
    # stop after this many optimiser steps, mid-epoch if need be; the schedule ends there (None: epochs x
    # steps per epoch). What a time budget sets: the demo measures its step time and gives the steps that fit
    max_steps: int | None = None
    # "steps": warm-up, then poly decay over the steps; "time": the decay also follows the run's time limit
    # (time_limit_minutes): the learning rate is the lower of the two, so the schedule ends when the time does
    # however fast the steps run (a shared machine) -- what a fixed time budget needs (the demo)
    schedule: str = "steps"
    batch_size: int = 8  # per process
    lr: float = 1e-3
    text_lr: float | None = None  # text-encoder lr; None: lr * text_lr_scale
    text_lr_scale: float = 0.1
    # learning rate of the language gates (the scale of w_f's InstanceNorm, which starts at
    # model.language_gate_init) as a multiple of lr: how fast the language branch can open
    gate_lr_scale: float = 1.0
    weight_decay: float = 0.01
    no_decay_norm_bias: bool = True  # no weight decay on norm weights and biases (1-D parameters)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 100
    poly_power: float = 0.9
    min_lr: float = 0.0
    grad_clip: float = 1.0  # max global gradient norm; 0 = off

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(self.betas))  # frozen: normalised once, here
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"optim.{name} must be >= 1, got {getattr(self, name)}")
        if self.schedule not in ("steps", "time"):
            raise ValueError(f"optim.schedule must be 'steps' or 'time', got {self.schedule!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"optim.max_steps must be >= 1 (or null: epochs x steps per epoch), got {self.max_steps}")
        for name in ("lr", "text_lr_scale", "gate_lr_scale", "poly_power"):
            if getattr(self, name) <= 0:
                raise ValueError(f"optim.{name} must be > 0, got {getattr(self, name)}")
        for name in ("warmup_steps", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ValueError(f"optim.{name} must be >= 0, got {getattr(self, name)}")
        check_finite(self, "optim.")


@dataclass(frozen=True)
class RunConfig(DictRoundTrip):
    """Every setting of a training run. A YAML file (``--config``) may hold any part of it; flags override it."""

    settings_name: ClassVar[str] = "run settings"

    out: str = "runs/lsms"
    model: ModelConfig = field(default_factory=tiny)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:1 | mps
    amp: str = "auto"  # auto (bf16/fp16 on CUDA, off elsewhere) | bf16 | fp16 | off
    deterministic: bool = False  # torch.use_deterministic_algorithms (slower on GPU)
    threads: int = 0  # CPU threads per process (torch.set_num_threads); 0 = torch's default
    val_every: int = 1  # validate every N epochs (and after the last)
    best_metric: str = "Dice"
    save_every: int = 0  # also write last.pt every N steps (mid-epoch resume); 0 = only at epoch ends
    log_every: int = 10
    time_limit_minutes: float = 0.0  # stop (validate, save) once this much training time has passed; 0 = none
    time_clock: str = "wall"  # what time_limit_minutes counts: wall | cpu (this process's CPU time, all threads)
    progress: bool = True  # tqdm progress bars
    # [addition] after the last step the existence head is fit anew on the frozen network for this many full-batch
    # steps over the train split (lsms.existence); 0: keep the head as trained alongside the network
    existence_refit_steps: int = 300

    def __post_init__(self) -> None:
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be between 0 and 2**63-1 ({MAX_SEED}), got {self.seed}")
        if self.amp not in ("auto", "bf16", "fp16", "off"):
            raise ValueError(f"amp must be auto, bf16, fp16 or off, got {self.amp!r}")
        for name in ("val_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("save_every", "time_limit_minutes", "threads", "existence_refit_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.time_clock not in ("wall", "cpu"):
            raise ValueError(f"time_clock must be 'wall' or 'cpu', got {self.time_clock!r}")
        check_finite(self)
        if self.optim.schedule == "time" and not self.time_limit_minutes:
            raise ValueError("optim.schedule 'time' decays the learning rate over the time limit: set time_limit_minutes "
                             "(--time-limit)")
        if self.best_metric not in SCORE_NAMES:
            raise ValueError(f"best_metric {self.best_metric!r} is not a validation score; choose one of {list(SCORE_NAMES)}")

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "") -> RunConfig:
        """The tree from plain data; ``model`` names a registered model (``preset``) plus overrides."""
        data = dict(data)
        model = data.pop("model", None)
        config = super().from_dict(data, where)
        if model is not None:
            config = dataclasses.replace(
                config, model=model if not isinstance(model, dict) else model_config_from_dict(_fitting(model)))
        return config


def _fitting(model: dict[str, Any]) -> dict[str, Any]:
    """A baseline takes the model settings it has and logs the ones it has not (a recipe's LSMS switches such
    as ``output_stride`` do not exist in a U-Net); an LSMS model takes them all (an unknown one is an error)."""
    name = model.get("preset", "tiny")
    if name not in BASELINES:
        return model
    fields = {f.name for f in dataclasses.fields(MODELS[name]())}
    if skipped := sorted(set(model) - fields):
        log.warning("model settings %s do not exist in the %s baseline; ignored", skipped, name)
    return {k: v for k, v in model.items() if k in fields}


# --------------------------------------------------------------------------- settings written before the tree

# flat key of lsms 0.1 (TrainConfig, LSMSConfig) -> its path in the tree
FLAT_KEYS: dict[str, str] = {
    "data": "data.path", "image_size": "data.image_size", "in_channels": "data.in_channels",
    "window": "data.window", "train_split": "data.train_split", "val_split": "data.val_split",
    "text_level": "data.text_level", "augment": "data.augment", "augmentation": "data.augmentation",
    "group_by_image": "data.group_by_image",
    "num_workers": "data.num_workers", "eval_batch_size": "data.eval_batch_size",
    **{k: f"optim.{k}" for k in ("epochs", "batch_size", "lr", "text_lr", "text_lr_scale", "weight_decay",
                                 "no_decay_norm_bias", "betas", "warmup_steps", "poly_power", "min_lr", "grad_clip")},
    "preset": "model.preset", "use_text": "model.use_text", "model_overrides": "model",
    "text_encoder": "model.text.encoder", "freeze_text": "model.text.freeze", "max_tokens": "model.text.max_tokens",
}
# flat text fields of a 0.1 model config -> their names in TextConfig
FLAT_TEXT_KEYS = {"text_encoder": "encoder", "text_config": "hf_config", "pretrained_text": "pretrained",
                  "freeze_text": "freeze", "max_tokens": "max_tokens"}


def upgrade_flat_model(flat: dict[str, Any]) -> dict[str, Any]:
    """A model config dict of lsms 0.1 (text fields flat: ``text_encoder``, ``text_config``, ...) -> the tree's."""
    model = {k: v for k, v in flat.items() if k not in FLAT_TEXT_KEYS}
    text = {new: flat[old] for old, new in FLAT_TEXT_KEYS.items() if old in flat}
    if text:
        model["text"] = {**model.get("text", {}), **text}
    return model


def upgrade_flat_settings(flat: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Settings of lsms 0.1 (one flat mapping) -> (the tree's nested dict, the moves as "old -> new" lines).

    Keys that are already in the tree's form pass through unchanged, so a file may mix both.
    """
    tree: dict[str, Any] = {}
    moved: list[str] = []
    overrides = flat.get("model_overrides") or {}
    for key, value in flat.items():
        if key == "model_overrides" or (key == "data" and isinstance(value, dict)) or key not in FLAT_KEYS:
            if key != "model_overrides":
                merge_into(tree, {key: value})
            continue
        moved.append(f"{key} -> {FLAT_KEYS[key]}")
        set_path(tree, FLAT_KEYS[key], value)
    if overrides:
        moved.append("model_overrides -> model")
        model = tree.setdefault("model", {})
        merge_into(model, upgrade_flat_model(dict(overrides)))  # over the flat text keys, as 0.1 did
    model = tree.get("model")
    if isinstance(model, dict) and model.get("preset") in BASELINES:
        model.pop("use_text", None)  # a baseline's name says whether it reads text (0.1 ignored the flag too)
    return tree, moved


def set_path(tree: dict[str, Any], path: str, value: Any) -> None:
    """``set_path(d, "optim.lr", 1e-3)``: d["optim"]["lr"] = 1e-3, creating the mappings on the way."""
    *parents, last = path.split(".")
    for key in parents:
        node = tree.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"setting {key!r} must be a mapping to hold {path!r}, got {node!r}")
        tree = node
    tree[last] = value


def short_metavars(parser: argparse.ArgumentParser) -> None:
    """Flags whose ``dest`` is a settings path show the last part in --help (``--lr LR``, not ``--lr OPTIM.LR``)."""
    for action in parser._actions:
        if action.metavar is None and action.choices is None and "." in action.dest and action.nargs != 0:
            action.metavar = action.dest.rsplit(".", 1)[1].upper()


def merge_into(tree: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Deep merge: mappings merge key by key, anything else replaces."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            merge_into(tree[key], value)
        else:
            tree[key] = value
    return tree


def load_settings_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML settings file: (part of) the :class:`RunConfig` tree as plain data (no code is run).

    Keys may use dashes for underscores; flat keys of lsms 0.1 are moved to their places in the tree (logged).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"settings file {str(path)!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except UnicodeDecodeError:
        raise ValueError(f"settings file {str(path)!r} is not UTF-8 text; save it as UTF-8") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"settings file {str(path)!r}{at}: not valid YAML ({problem}); write setting: value "
                         "pairs (see docs/training.md)") from None
    if not isinstance(data, dict):
        raise ValueError(f"settings file {str(path)!r} must hold a mapping of setting: value, got {type(data).__name__}")
    data = _underscores(data)
    known = {f.name for f in dataclasses.fields(RunConfig)} | set(FLAT_KEYS)
    if unknown := sorted(set(data) - known):
        raise ValueError(f"unknown settings {unknown} in {str(path)!r}; known settings: "
                         f"{sorted(f.name for f in dataclasses.fields(RunConfig))}")
    tree, moved = upgrade_flat_settings(data)
    if moved:
        log.warning("%s uses the flat settings of lsms 0.1; read them at their new places: %s. "
                    "Write them nested (e.g. 'optim: {lr: 0.001}') to silence this.", path, ", ".join(moved))
    RunConfig.from_dict(tree, where=str(path))  # every error now, naming the file and the key
    return tree


def chosen_settings(flags: dict[str, Any], recipe: str | None = None, settings_file: str | None = None,
                    model: list[str] | None = None, loss: list[str] | None = None,
                    augmentation: list[str] | None = None) -> dict[str, Any]:
    """The settings of a command line as the tree of the settings chosen (no defaults; ``RunConfig.from_dict``
    adds them): ``recipe`` <- ``settings_file`` <- ``flags`` (a mapping of settings paths, ``{"optim.lr": 1e-3}``;
    other keys are ignored) <- KEY=VALUE lists for the model, the loss and the augmentation. Mappings merge key
    by key. A resumed run takes these over its saved ones."""
    tree: dict[str, Any] = {}
    if recipe:
        merge_into(tree, load_recipe(recipe))
    if settings_file:
        merge_into(tree, load_settings_file(settings_file))
    top = {f.name for f in dataclasses.fields(RunConfig)}
    for key, value in flags.items():
        if "." in key or key in top:
            set_path(tree, key, value)
    for key, value in key_values(model, "--model").items():
        if "." in key:
            set_path(tree, f"model.{key}", value)
        else:  # flat text names of lsms 0.1 (text_config=...) land in model.text
            merge_into(tree.setdefault("model", {}), upgrade_flat_model({key: value}))
    for key, value in key_values(loss, "--loss").items():
        set_path(tree, f"loss.{key}", value)
    for key, value in key_values(augmentation, "--augmentation").items():
        set_path(tree, f"data.augmentation.{key}", value)
    return tree


def key_values(items: list[str] | None, what: str) -> dict[str, Any]:
    """``["decoder=last", "conv_kernels=[7]"]`` -> ``{"decoder": "last", "conv_kernels": [7]}`` (YAML values)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"{what} settings are KEY=VALUE, got {item!r} (e.g. --model decoder=last)")
        key, value = item.split("=", 1)
        out[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return out


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def load_recipe(name: str) -> dict[str, Any]:
    """A named recipe: ``src/lsms/recipes/NAME.yaml`` (a settings file, as ``--config`` reads)."""
    path = RECIPES_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown recipe {name!r}; choose one of {recipe_names()}")
    return load_settings_file(path)


def _underscores(data: Any) -> Any:
    if isinstance(data, dict):
        return {str(k).replace("-", "_"): _underscores(v) for k, v in data.items()}
    return data


__all__ = [
    "FLAT_KEYS", "PAPER_LR", "RECIPES_DIR", "OptimConfig", "chosen_settings", "key_values", "load_recipe", "recipe_names",
    "RunConfig", "load_settings_file", "merge_into",
    "set_path", "short_metavars", "upgrade_flat_model", "upgrade_flat_settings",
]
