"""``lsms demo``: the project's main job, end to end on the embedded RefLiver-Synth benchmark.

1. generate a RefLiver-Synth dataset (CT slices, 1-4 liver lesions, one expression per lesion, paraphrases of
   each for train-time text augmentation, and for a share of slices a *negative* sentence describing a lesion
   that is not there), and the same test expressions in the held-out wording (``phrasings-heldout.yaml``,
   never used in training);
2. train the ``tiny`` LSMS within a time budget (default: all of it in at most 15 minutes on 2 CPU cores);
3. evaluate on the test split with full, half, quarter and no text ("no text" = the same text model given an
   empty sentence, so it cannot know which lesion is meant), in both wordings, and the existence score on the
   negative sentences;
4. write a report folder: ``README.md`` (settings, timings, metrics table, targets), overlays of one slice
   segmented twice with two different sentences, the stage feature maps, and the training curves.

The training recipe (``src/lsms/recipes/demo.yaml``, ``DemoConfig.train``; ``lsms train --recipe demo`` reads the
same file) was tuned for 2 CPU cores; see docs/training.md for the measurements.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from lsms.config import RunConfig, load_recipe, set_path, short_metavars
from lsms.data import Collator, load_samples, read_image, read_mask
from lsms.data.loaders import build_datasets
from lsms.evaluate import evaluate_levels
from lsms.losses import LSMSLoss
from lsms.optim import TrainingStep, build_optimizer, train_step
from lsms.pictures import heat_map, save_feature_maps, save_overlay
from lsms.predict import Predictor
from lsms.seeding import seed_everything
from lsms.settings import DictRoundTrip
from lsms.spec import model_for
from lsms.train import train

log = logging.getLogger(__name__)

TARGETS = {"dice_full": 0.88, "referring_accuracy_multi_full": 0.95, "heldout_drop": 0.03, "existence_AUROC": 0.95,
           "negative_mask_rate": 0.05, "positive_dice_loss": 0.01}


@dataclass(frozen=True)
class DemoConfig(DictRoundTrip):
    """Settings of the demo: the synthetic data, the training run (``train``) and the time budget.

    The image size, seed, device and progress bars are the training run's (``train.data.image_size``, ...);
    the data are generated at that size with that seed.
    """

    settings_name: ClassVar[str] = "demo settings"

    out: str = "demo-report"
    # data (RefLiver-Synth)
    patients: int = 100
    slices_per_patient: int = 8
    fov_mm: float = 280.0  # field of view: 2.2 mm per pixel at 128 px
    diameter_mm: tuple[float, float] = (25.0, 60.0)  # lesions of at least ~11 px at 128 px (benchmark: 8..60)
    multi_lesion_share: float = 0.7
    # slices that also get a sentence describing a lesion not on them: half, for the existence head (with the
    # recipe's Dice over lesions only: +6 AUROC points, segmentation as good; docs/training.md)
    negative_share: float = 0.5
    variants: int = 4  # paraphrases per expression (train-time text augmentation: train.data.paraphrase_p)
    heldout_phrasing: str | None = "phrasings-heldout.yaml"  # test expressions reworded with it; None: skip
    # training
    train: RunConfig = field(default_factory=lambda: RunConfig.from_dict(load_recipe("demo")))  # recipes/demo.yaml
    epochs: int | None = None  # None: as many as the time budget allows (measured), at most max_epochs
    max_epochs: int = 12
    # running
    budget_minutes: float = 15.0  # generation + training + evaluation + report
    # kept free for the last validation, the evaluation in both wordings and the report (measured on a loaded
    # machine: 0.2 + 0.9-1.1 + 0.1 min)
    eval_reserve_minutes: float = 1.5


# --------------------------------------------------------------------------- steps


def synth_config(cfg: DemoConfig):
    """The demo's RefLiver-Synth settings (also used by ``lsms serve`` for its bundled test slices)."""
    from lsms.synth import SynthConfig  # deferred on purpose: the synth package imports SciPy

    return SynthConfig(patients=cfg.patients, slices_per_patient=cfg.slices_per_patient, seed=cfg.train.seed,
                       image_size=cfg.train.data.image_size, fov_mm=cfg.fov_mm, diameter_mm=tuple(cfg.diameter_mm),
                       multi_lesion_share=cfg.multi_lesion_share, negative_share=cfg.negative_share,
                       variants=cfg.variants)


def generate_data(cfg: DemoConfig, folder: Path) -> dict[str, Any]:
    """The dataset, and with ``heldout_phrasing`` its expressions reworded (``folder/manifest-NAME.jsonl``)."""
    from lsms.synth import generate_dataset
    from lsms.synth.generate import rephrase_dataset

    info = generate_dataset(synth_config(cfg), folder, overwrite=True, progress=cfg.train.progress)
    if cfg.heldout_phrasing:
        info["heldout_manifest"] = str(rephrase_dataset(folder, cfg.heldout_phrasing, seed=cfg.train.seed))
    return info


def evaluate_demo(run: Path, data: Path, heldout: str | None, device: str, progress: bool) -> dict[str, dict]:
    """Test-split results: {"template": {level: result}, "heldout": {level: result}}.

    Dice, referring accuracy etc. are over the positive expressions (negatives are left out of those means:
    empty policy "skip"); the existence metrics (the template wording at full text, where the negatives are
    evaluated) cover both.
    """
    kw = {"batch_size": 16, "device": device, "progress": progress, "empty_policy": "skip"}
    out = {"template": evaluate_levels(run, data, "test", negatives_at=("full",), **kw)}
    if heldout:
        out["heldout"] = evaluate_levels(run, heldout, "test", levels=("full", "half", "quarter"), negatives_at=(),
                                         **kw)
    return out


def train_config(cfg: DemoConfig, data: Path, run: Path, time_limit_minutes: float) -> RunConfig:
    """The demo's training run on the generated ``data``, written to ``run``."""
    t = cfg.train
    return dataclasses.replace(t, out=str(run), data=dataclasses.replace(t.data, path=str(data)),
                               optim=dataclasses.replace(t.optim, epochs=cfg.epochs or 1),
                               time_limit_minutes=max(time_limit_minutes, 0.5))


def measure_step_seconds(train_cfg: RunConfig, steps: int = 3) -> tuple[float, int, int, int]:
    """Seconds per training step on this machine, the best thread count, steps per epoch and val size.

    Runs the real model, loss and optimiser step (:func:`lsms.optim.train_step`) on real batches (a throwaway
    copy) with all cores and with one thread (on a machine shared with other jobs, OpenMP threads that
    spin-wait for a descheduled partner can make all-core steps many times slower than one thread), and keeps
    the faster. The demo takes the thread count from it; its learning-rate schedule follows the time limit
    (``optim.schedule: time``), so a machine that slows down after the measurement still ends the schedule.
    """
    seed_everything(train_cfg.seed)
    prep, train_set, val_set = build_datasets(train_cfg.data, train_cfg.seed)
    model, _ = model_for(train_cfg.model, prep)
    step = TrainingStep(model, LSMSLoss(train_cfg.loss)).train()
    opt = build_optimizer(model, train_cfg.optim, torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    collate = Collator(model.tokenizer)
    bs = train_cfg.optim.batch_size
    default_threads = torch.get_num_threads()
    candidates = [train_cfg.threads] if train_cfg.threads else sorted({1, default_threads})
    best = (float("inf"), candidates[0])
    for threads in candidates:
        torch.set_num_threads(threads)
        times: list[float] = []
        for i in range(steps + 1):  # the first step warms up
            t = time.perf_counter()
            batch = collate([train_set[(i * bs + j) % len(train_set)] for j in range(bs)])
            train_step(step, opt, scaler, batch, train_cfg.optim.lr, train_cfg.optim.grad_clip)
            times.append(time.perf_counter() - t)
            if i >= 1 and times[-1] > 1.5 * best[0]:
                break  # clearly slower than the best so far (e.g. spinning threads on a busy machine)
        seconds = sum(times[1:]) / max(len(times) - 1, 1)
        log.info("calibration: %.2f s per step with %d thread(s)", seconds, threads)
        best = min(best, (seconds, threads))
    torch.set_num_threads(default_threads)
    return best[0], best[1], len(train_set) // bs, len(val_set) if val_set is not None else 0


def refit_minutes(train_cfg: RunConfig, steps_per_epoch: int, step_seconds: float) -> float:
    """Minutes the existence head's refit after the last step takes (:mod:`lsms.existence`: one forward pass
    over the train split), estimated from the measured training step: **[decision]** a forward is a third of a
    training step (forward + backward + update); 0 without the head or the refit."""
    if not (getattr(train_cfg.model, "existence_head", False) and train_cfg.existence_refit_steps):
        return 0.0
    return steps_per_epoch * step_seconds / 3 / 60


def pick_showcase(records: list[dict[str, Any]], samples: list) -> tuple[Any, Any] | None:
    """Two expressions of one multi-lesion test slice, both referred correctly, with the best worse Dice."""
    by_id = {r["id"]: r for r in records}
    slices: dict[str, list] = {}
    for s in samples:
        if s.id in by_id and (s.extra.get("n_lesions") or 0) >= 2:
            slices.setdefault(str(s.extra.get("slice_id", s.image)), []).append(s)
    best, best_score = None, -1.0
    for group in slices.values():
        good = sorted((s for s in group if by_id[s.id]["referred_hit"]), key=lambda s: -(by_id[s.id]["dice"] or 0))
        if len(good) >= 2:
            score = min(by_id[good[0].id]["dice"] or 0, by_id[good[1].id]["dice"] or 0)
            if score > best_score:
                best, best_score = (good[0], good[1]), score
    if best is None:  # fall back: any multi-lesion slice
        for group in slices.values():
            if len(group) >= 2:
                return group[0], group[1]
    return best


def plot_curves(run: Path, path: Path) -> Path | None:
    import matplotlib  # deferred on purpose: only the report's figure needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log_path = run / "log.jsonl"
    if not log_path.is_file():
        return None
    lines = [json.loads(x) for x in log_path.read_text().splitlines() if x.strip()]
    steps = [x for x in lines if x.get("kind") == "step"]
    epochs = [x for x in lines if x.get("kind") == "epoch"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for key in ("loss", "focal", "dice", "contrastive", "existence"):
        if key != "existence" or any(x.get(key) for x in steps):  # existence: a model with the head
            axes[0].plot([x["step"] for x in steps], [x[key] for x in steps], label=key, lw=1)
    axes[0].set_yscale("log")
    axes[0].set_title("training losses")
    axes[0].set_xlabel("step")
    axes[0].legend(fontsize=7)
    axes[1].plot([x["step"] for x in steps], [x["lr"] for x in steps], lw=1)
    axes[1].set_title("learning rate (warm-up + poly 0.9)")
    axes[1].set_xlabel("step")
    for key, label in (("val_Dice", "val Dice"), ("val_mIoU", "val mIoU"),
                       ("val_referring_accuracy_multi", "val referring acc. (multi-lesion)")):
        pts = [(x["step"], x[key]) for x in epochs if isinstance(x.get(key), (int, float))]
        if pts:
            axes[2].plot(*zip(*pts, strict=True), marker="o", label=label)
    axes[2].set_ylim(0, 1)
    axes[2].set_title("validation (each epoch)")
    axes[2].set_xlabel("step")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_pictures(run: Path, data: Path, results: dict, report: Path, device: str) -> dict[str, str]:
    """Overlays (one slice, two sentences, two lesions) and feature maps; returns {name: relative path}."""
    out: dict[str, str] = {}
    samples = load_samples(data, "test")
    pair = pick_showcase(results["full"]["records"], samples)
    if pair is None:
        log.warning("no multi-lesion slice in the test split: no overlay figure")
        return out
    predictor = Predictor.from_checkpoint(run, device=device)
    image = read_image(pair[0].image_path)
    texts = [s.text_at("full") for s in pair]
    preds = [predictor.predict(image, t) for t in texts]
    truths = [read_mask(s.mask_path) for s in pair]
    none = predictor.predict(image, "")
    red, blue, yellow = (1.0, 0.25, 0.25), (0.2, 0.75, 1.0), (1.0, 0.85, 0.1)
    save_overlay(image.array, predictor.preprocessing,
                 [truths[0], truths[1], None, preds[0].mask, preds[1].mask, none.mask],
                 [f"ground truth 1: {texts[0]}", f"ground truth 2: {texts[1]}", "the slice",
                  f"LSMS given sentence 1 (Dice {_dice(preds[0].mask, truths[0]):.2f})",
                  f"LSMS given sentence 2 (Dice {_dice(preds[1].mask, truths[1]):.2f})",
                  "LSMS given no text (empty sentence)"],
                 report / "overlay_two_sentences.png", ncols=3, colours=[red, blue, yellow, red, blue, yellow],
                 title=f"test slice {pair[0].extra.get('slice_id', '')}: one image, two sentences, two lesions")
    out["overlay"] = "overlay_two_sentences.png"
    size = image.shape
    empty = predictor.stage_features(image, "")
    for i, t in enumerate(texts):
        name = f"features_sentence{i + 1}.png"
        with_text = predictor.stage_features(image, t)
        maps = [heat_map(a, size) for a in with_text]
        changed = [heat_map(a - b, size) for a, b in zip(with_text, empty, strict=True)]
        save_feature_maps(image.array, predictor.preprocessing, maps, report / name, caption=t,
                          rows=[("|F(sentence) - F(no text)|", changed)], mask=truths[i])
        out[f"features{i + 1}"] = name
    out["dice"] = [_dice(p.mask, g) for p, g in zip(preds, truths, strict=True)]
    out["texts"] = texts
    out["no_text_area"] = int(np.asarray(none.mask).sum())
    return out


def _drop(a: dict, b: dict, level: str, key: str) -> float | None:
    x, y = a[level]["summary"].get(key), b[level]["summary"].get(key)
    return None if x is None or y is None else x - y


def _dice(pred, truth) -> float:
    denom = int(pred.sum()) + int(truth.sum())
    return float(2 * (pred & truth).sum() / denom) if denom else 1.0


# --------------------------------------------------------------------------- report


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else ("–" if v is None else str(v))


def metrics_table(results: dict[str, dict[str, Any]]) -> str:
    cols = [("Dice", "Dice"), ("mIoU", "mIoU"), ("oIoU", "oIoU"), ("P@0.5", "P@0.5"), ("P@0.7", "P@0.7"),
            ("P@0.9", "P@0.9"), ("referring_accuracy", "ref. acc."), ("referring_accuracy_multi", "ref. acc. multi"),
            ("n_scored", "n"), ("n_empty_prediction", "empty pred.")]
    head = "| text | " + " | ".join(c[1] for c in cols) + " |"
    rule = "|---" * (len(cols) + 1) + "|"
    rows = [f"| {level} | " + " | ".join(_fmt(r["summary"].get(k)) for k, _ in cols) + " |"
            for level, r in results.items()]
    return "\n".join([head, rule, *rows])


def target_checks(both: dict[str, dict]) -> list[tuple[str, bool]]:
    """The demo's targets (:data:`TARGETS`) against the test results of :func:`evaluate_demo`."""
    results = both["template"]
    full, none = results["full"]["summary"], results["none"]["summary"]

    def at_least(value: Any, bound: float) -> bool:
        return value is not None and value >= bound

    checks = [
        (f"Dice with full text >= {TARGETS['dice_full']}", at_least(full.get("Dice"), TARGETS["dice_full"])),
        (f"referring accuracy on multi-lesion slices (full text) >= {TARGETS['referring_accuracy_multi_full']}",
         at_least(full.get("referring_accuracy_multi"), TARGETS["referring_accuracy_multi_full"])),
        ("no text much worse (Dice at least 0.2 lower)",
         None not in (full.get("Dice"), none.get("Dice")) and full["Dice"] - none["Dice"] >= 0.2),
    ]
    if "heldout" in both:
        held = both["heldout"]["full"]["summary"]
        for key, name in (("Dice", "Dice"), ("referring_accuracy_multi", "referring accuracy (multi)")):
            ok = None not in (full.get(key), held.get(key)) and full[key] - held[key] <= TARGETS["heldout_drop"]
            checks.append((f"held-out wording: {name} drop <= {TARGETS['heldout_drop'] * 100:g} points", ok))
    if full.get("existence_AUROC") is not None:
        checks += [
            (f"existence AUROC >= {TARGETS['existence_AUROC']}", at_least(full["existence_AUROC"], TARGETS["existence_AUROC"])),
            (f"masks drawn on <= {TARGETS['negative_mask_rate']:.0%} of negative sentences (at the threshold chosen on val)",
             full["negative_mask_rate"] <= TARGETS["negative_mask_rate"]),
            (f"positives lose <= {TARGETS['positive_dice_loss'] * 100:g} point of Dice at that threshold",
             full["Dice_positive"] - full["Dice_positive_at_threshold"] <= TARGETS["positive_dice_loss"]),
        ]
    return checks


def existence_table(summary: dict[str, Any]) -> str:
    """One row per existence score: the model's (the existence head's, if it has one) and, beside a head, the
    highest mask probability; then the model's score by kind of negative, where the data name the kinds."""
    keys = [("existence_threshold", "threshold (chosen on val)"), ("negative_mask_rate", "negatives with a mask"),
            ("positive_miss_rate", "positives without one"), ("Dice_positive", "Dice (positives)"),
            ("Dice_positive_at_threshold", "Dice (positives) at the threshold")]
    head = "existence_AUROC_max_prob" in summary
    scores = [("", "existence head" if head else "highest mask probability")]
    if head:
        scores.append(("_max_prob", "highest mask probability"))
    rows = []
    for suffix, name in scores:
        auroc = _fmt(summary.get(f"existence_AUROC{suffix}"))
        low, high = summary.get(f"existence_AUROC_low{suffix}"), summary.get(f"existence_AUROC_high{suffix}")
        if low is not None and high is not None:
            auroc += f" ({_fmt(low)}-{_fmt(high)})"
        rows.append(f"| {name} | {auroc} | " + " | ".join(_fmt(summary.get(k + suffix)) for k, _ in keys) + " |")
    kinds = [k.removeprefix("n_negative_of_") for k in summary if k.startswith("n_negative_of_")]
    by_kind = "; ".join(f"{kind} ({summary[f'n_negative_of_{kind}']}): AUROC "
                        f"{_fmt(summary.get(f'existence_AUROC_of_{kind}'))}, "
                        f"{_fmt(summary.get(f'negative_mask_rate_of_{kind}'))} with a mask" for kind in kinds)
    return "\n".join([
        "| score | AUROC (95 % CI) | " + " | ".join(k[1] for k in keys) + " |", "|---" * (len(keys) + 2) + "|", *rows,
        "", f"{summary.get('n_positive')} positive and {summary.get('n_negative')} negative sentences."
        + (f" The {scores[0][1]} by kind of negative (how the sentence misses): {by_kind}." if kinds else "")])


def write_report(report: Path, cfg: DemoConfig, train_cfg: RunConfig, data_info: dict, train_summary: dict,
                 both: dict, pictures: dict, timings: dict[str, float]) -> Path:
    results = both["template"]
    checks = target_checks(both)
    counts = data_info.get("counts", {})
    lines = [
        "# LSMS demo: referring liver-lesion segmentation on RefLiver-Synth",
        "",
        "Generated by `lsms demo` (`make demo`). A procedural CT benchmark (RefLiver-Synth) was generated, the "
        f"`{train_cfg.model.preset}` LSMS was trained on its train split and evaluated on its **test split** (patients never "
        "seen in training) with the full, half and quarter expressions and with no text.",
        "",
        "## Results (test split)",
        "",
        metrics_table(results),
        "",
        "Dice / mIoU: means over the expressions of lesions (sigmoid > 0.5; negative sentences are scored below); "
        "oIoU: cumulative IoU; P@t: share with IoU >= t; "
        "ref. acc.: share of expressions whose prediction overlaps the referred lesion more than any other lesion "
        "(multi: on slices with 2+ lesions). **No text** is the same text model given an empty sentence for every "
        "image: it cannot know which lesion is meant, so on multi-lesion slices it can at best guess.",
        "",
    ]
    if "heldout" in both:
        lines += [
            f"### The same test expressions in held-out wording (`{cfg.heldout_phrasing}`, never used in training)",
            "",
            metrics_table(both["heldout"]),
            "",
            "Drop from the template wording: " + ", ".join(
                f"{level} Dice {_fmt(_drop(results, both['heldout'], level, 'Dice'))}, ref. acc. multi "
                f"{_fmt(_drop(results, both['heldout'], level, 'referring_accuracy_multi'))}"
                for level in both["heldout"]) + ".",
            "",
        ]
    full = results["full"]["summary"]
    if full.get("existence_AUROC") is not None:
        lines += [
            "### Sentences that match nothing (negatives)",
            "",
            "Test sentences describing a lesion that is not on the slice (another type, another segment, or a "
            "relation no lesion satisfies; empty target). The existence score is the existence head's probability "
            "(with the highest mask probability beside it for comparison); below the threshold chosen on the "
            "validation split the mask is withheld (\"not found\").",
            "",
            existence_table(full),
            "",
        ]
    lines += [
        "### Targets",
        "",
        *[f"- [{'x' if ok else ' '}] {name}" for name, ok in checks],
        "",
    ]
    if pictures.get("overlay"):
        d = pictures.get("dice", [])
        lines += [
            "## One slice, two sentences",
            "",
            "The same test slice segmented twice, each time with the sentence of a different lesion (top row: the "
            "ground truth of each sentence; bottom row: LSMS's predictions, and with no text). Dice of the two "
            "predictions: "
            + ", ".join(f"{x:.3f}" for x in d) + ".",
            "",
            f"![overlay]({pictures['overlay']})",
            "",
            "## Feature maps",
            "",
            "For each sentence (the referred lesion outlined in red): top row, the mean absolute activation of "
            "the four encoder stages F1..F4 (strides 4..32; cf. the paper's Fig. 6); bottom row, how much the "
            "sentence changes each stage compared with no text (|F(sentence) - F(empty)| averaged over "
            "channels), i.e. where the language-guided attention acts. Each map is scaled to its own range.",
            "",
            f"![features, sentence 1]({pictures['features1']})",
            "",
            f"![features, sentence 2]({pictures['features2']})",
            "",
        ]
    if pictures.get("curves"):
        lines += ["## Training curves", "", f"![training curves]({pictures['curves']})", ""]
    best = train_summary.get("best", {})
    model, o, size = train_cfg.model, train_cfg.optim, train_cfg.data.image_size
    lines += [
        "## What was run",
        "",
        f"- Data: RefLiver-Synth, {cfg.patients} patients x {cfg.slices_per_patient} slices, {size}x{size} px over "
        f"{cfg.fov_mm:g} mm, lesions {cfg.diameter_mm[0]:g}-{cfg.diameter_mm[1]:g} mm, seed {train_cfg.seed}: "
        f"{json.dumps(counts)}",
        f"- Model: `{model.preset}`, text encoder `{model.text.encoder}` "
        f"({'frozen' if model.text.freeze else 'fine-tuned'}), max {model.text.max_tokens} tokens"
        + (", segment spellings normalised (`text.normalize_segments`)" if model.text.normalize_segments else ""),
        f"- Training: {train_summary.get('epoch')} epochs / {train_summary.get('step')} steps of batch "
        f"{o.batch_size}, AdamW lr {o.lr:g} (wd {o.weight_decay}, none on norms/biases), "
        f"{o.warmup_steps} warm-up steps, poly 0.9, gradient clipping {o.grad_clip}; best "
        f"checkpoint: epoch {best.get('epoch')} (val {best.get('metric')} {_fmt(best.get('value'))})"
        + (" — **stopped early by the time budget**" if train_summary.get("stopped_early") else ""),
        "- Time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items()),
        f"- Files: data in `{Path(train_cfg.data.path).name}/`, run (checkpoints, logs, TensorBoard) in "
        f"`{Path(train_cfg.out).name}/`, per-level metrics in `metrics.json`, training settings in `train.yaml`",
        "",
        "Reproduce a step by hand:",
        "",
        "```",
        f"lsms synth data --patients {cfg.patients} --slices-per-patient {cfg.slices_per_patient} "
        f"--image-size {size} --fov-mm {cfg.fov_mm:g} --diameter-mm {cfg.diameter_mm[0]:g} "
        f"{cfg.diameter_mm[1]:g} --multi-lesion-share {cfg.multi_lesion_share:g} --seed {train_cfg.seed}",
        "lsms train data --out run --config train.yaml",
        "lsms evaluate run data --split test --text-level full --empty-policy skip   # also half, quarter, none",
        *([f"lsms synth data --rephrase {cfg.heldout_phrasing}   # the test expressions in the held-out wording",
           f"lsms evaluate run data/manifest-{Path(cfg.heldout_phrasing).stem}.jsonl --split test --empty-policy skip"]
          if cfg.heldout_phrasing else []),
        "```",
        "",
    ]
    path = report / "README.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- entry points


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run every step; returns the metrics and timings (also written to ``OUT/metrics.json``)."""
    started = time.perf_counter()
    report = Path(cfg.out)
    report.mkdir(parents=True, exist_ok=True)
    data, run = report / "data", report / "run"
    timings: dict[str, float] = {}

    t = time.perf_counter()
    log.info("1/4 generating RefLiver-Synth (%d patients x %d slices) in %s", cfg.patients, cfg.slices_per_patient, data)
    data_info = generate_data(cfg, data)
    timings["data"] = time.perf_counter() - t

    def training_minutes_left() -> float:
        return cfg.budget_minutes - (time.perf_counter() - started) / 60 - cfg.eval_reserve_minutes

    t = time.perf_counter()
    left = training_minutes_left()
    train_cfg = train_config(cfg, data, run, time_limit_minutes=left)
    if cfg.epochs is None:  # the learning-rate schedule follows the time left, however fast the steps are
        seconds, threads, steps_per_epoch, n_val = measure_step_seconds(train_cfg)
        refit = refit_minutes(train_cfg, steps_per_epoch, seconds)
        left = training_minutes_left() - refit
        log.info("measured %.2f s per training step (%d thread(s)): about %d steps (%d per epoch) fit in %.1f min "
                 "(%.1f min kept for the existence head's refit); the schedule decays over the time", seconds, threads,
                 int(60 * left / seconds), steps_per_epoch, left, refit)
        optim = dataclasses.replace(train_cfg.optim, epochs=cfg.max_epochs, schedule="time")
        train_cfg = dataclasses.replace(train_cfg, optim=optim, time_limit_minutes=max(left, 0.5), threads=threads)
        timings["calibration"] = time.perf_counter() - t
        t = time.perf_counter()
    log.info("2/4 training %s for %d epochs (time limit %.1f min)", train_cfg.model.preset, train_cfg.optim.epochs, left)
    train_summary = train(train_cfg, overwrite=True)  # the report folder is the demo's own: a rerun replaces it
    timings["training"] = time.perf_counter() - t

    t = time.perf_counter()
    log.info("3/4 evaluating on the test split with full, half, quarter and no text, in both wordings")
    both = evaluate_demo(run, data, data_info.get("heldout_manifest"), train_cfg.device, train_cfg.progress)
    results = both["template"]
    timings["evaluation"] = time.perf_counter() - t

    t = time.perf_counter()
    log.info("4/4 writing the report")
    pictures = write_pictures(run, data, results, report, train_cfg.device)
    if plot_curves(run, report / "training_curves.png"):
        pictures["curves"] = "training_curves.png"
    timings["report"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - started
    summary = {
        "config": cfg.to_dict(), "train": train_cfg.to_dict(), "train_summary": train_summary,
        "test": {level: r["summary"] for level, r in results.items()},
        "test_heldout_wording": {level: r["summary"] for level, r in both.get("heldout", {}).items()},
        "timings_s": timings,
        "showcase": {k: v for k, v in pictures.items() if k in ("texts", "dice")},
    }
    (report / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (report / "train.yaml").write_text(train_yaml(train_cfg), encoding="utf-8")
    path = write_report(report, cfg, train_cfg, data_info, train_summary, both, pictures, timings)
    log.info("report: %s (%.1f min in all)", path, timings["total"] / 60)
    return summary


def train_yaml(train_cfg: RunConfig) -> str:
    """The training settings as an ``lsms train --config`` file (DATA and --out are given on the command line)."""
    import yaml  # deferred on purpose: only this report file needs it

    tree = train_cfg.to_dict()
    del tree["out"], tree["data"]["path"]
    tree["model"]["text"]["hf_config"] = None  # filled in from the text encoder at build
    return yaml.safe_dump(tree, sort_keys=False)


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = DemoConfig()
    t = d.train
    p.add_argument("--out", default=d.out, help=f"report folder (default {d.out}); data and run go inside it")
    p.add_argument("--budget", dest="budget_minutes", type=float, default=d.budget_minutes,
                   help=f"minutes for everything; training stops in time for evaluation (default {d.budget_minutes:g})")
    p.add_argument("--patients", type=int, default=d.patients, help=f"synthetic patients (default {d.patients})")
    p.add_argument("--slices-per-patient", type=int, default=d.slices_per_patient,
                   help=f"slices per synthetic patient (default {d.slices_per_patient})")
    p.add_argument("--image-size", dest="train.data.image_size", type=int, default=t.data.image_size,
                   help=f"(default {t.data.image_size})")
    p.add_argument("--epochs", type=int, default=d.epochs,
                   help="training epochs (default: as many as fit in the budget, measured, at most --max-epochs)")
    p.add_argument("--max-epochs", type=int, default=d.max_epochs, help=f"(default {d.max_epochs})")
    p.add_argument("--batch-size", dest="train.optim.batch_size", type=int, default=t.optim.batch_size,
                   help=f"training batch size (default {t.optim.batch_size})")
    p.add_argument("--lr", dest="train.optim.lr", type=float, default=t.optim.lr,
                   help=f"peak learning rate (default {t.optim.lr:g})")
    p.add_argument("--seed", dest="train.seed", type=int, default=t.seed,
                   help=f"seed of the data and the training (default {t.seed})")
    p.add_argument("--device", dest="train.device", default=t.device, help="auto, cpu, cuda, mps")
    p.add_argument("--no-progress", dest="train.progress", action="store_false", help="no progress bars")
    short_metavars(p)


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tree = DemoConfig().to_dict()
    names = {f.name for f in dataclasses.fields(DemoConfig)}
    for key, value in vars(args).items():
        if key in names or key.startswith("train."):
            set_path(tree, key, value)
    cfg = DemoConfig.from_dict(tree)  # validates, e.g. the image size
    summary = run_demo(cfg)
    full = summary["test"]["full"]
    print(f"demo finished in {summary['timings_s']['total'] / 60:.1f} min: test Dice {_fmt(full['Dice'])} (full text), "
          f"referring accuracy multi-lesion {_fmt(full['referring_accuracy_multi'])}, no-text Dice "
          f"{_fmt(summary['test']['none']['Dice'])}; report: {Path(cfg.out) / 'README.md'}")
    return 0
