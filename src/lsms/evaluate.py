"""``lsms evaluate``: the spec's metrics for a trained model on a dataset split.

    lsms evaluate RUN_OR_CHECKPOINT DATA --split val [--text-level full|half|quarter|none] [--out DIR]
                  [--json summary.json] [--save-predictions]

Writes ``DIR/per_sample.csv`` (one row per expression) and ``DIR/summary.json`` (Dice, mIoU, overall IoU,
precision at IoU 0.5..0.9, referring accuracy where instance maps exist, empty-case counts), and prints the
summary. ``--text-level none`` gives the text model an empty sentence for every image ("no text": the same
weights, with nothing to refer to). Evaluation is deterministic: eval-mode BatchNorm, fixed NMF bases, no
shuffling; running it twice gives the same numbers. Under ``torchrun`` the split is sharded over processes
(every sample exactly once) and the records are gathered before summarising.

:func:`evaluate_model` is the same code the training loop validates with; :func:`evaluate_levels` evaluates
one model at several text levels (the demo's and the benchmarks' tables).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from lsms import distributed as D
from lsms.backends import add_backend_argument, load_backend
from lsms.data import TEXT_LEVELS, SegmentationDataset, load_samples
from lsms.data.loaders import make_loader
from lsms.distributed import DistEnv, gather_records, pick_device
from lsms.metrics import (
    MIN_EXISTENCE_THRESHOLD,
    choose_existence_threshold,
    existence_probability,
    existence_score,
    existence_summary,
    sample_scores,
    summarize,
    volume_scores,
)
from lsms.optim import autocast
from lsms.runs import writable_folder, write_text_atomic
from lsms.volumes import VOLUME_MODES, assemble, voxel_spacing

log = logging.getLogger(__name__)


@torch.no_grad()
def evaluate_model(model: nn.Module, loader: DataLoader, device: torch.device, env: DistEnv,
                   amp: torch.dtype | None = None, progress: bool = False,
                   on_batch: Callable[[dict[str, Any], torch.Tensor], None] | None = None,
                   empty_policy: str = "one", existence_threshold: float | str | None = None,
                   max_prob_threshold: float | None = None) -> dict[str, Any]:
    """Per-sample records over the whole split (gathered from all ranks) and their summary.

    Args:
        model: an LSMS model (not DDP-wrapped: ranks may see different numbers of batches) or a
            :class:`~lsms.backends.Backend` (e.g. an exported model).
        loader: from :func:`make_loader`.
        on_batch: called with each batch and its logits (B, 1, H, W) on the CPU (e.g. to save predictions).
        empty_policy: how an empty target with an empty prediction scores (see :func:`lsms.metrics.summarize`).
        existence_threshold: when the split has both positives and negatives (expressions with an empty target),
            the summary adds the existence metrics (:func:`lsms.metrics.existence_summary`) at this threshold;
            ``"choose"`` picks it on this split (:func:`lsms.metrics.choose_existence_threshold`, as validation
            during training does); None: any predicted pixel counts as found.
        max_prob_threshold: with an existence head, the summary also reports the highest-probability score
            (``..._max_prob`` keys) at this threshold (``"choose"`` with ``existence_threshold="choose"``).

    Returns:
        ``{"records": [...], "summary": {...}}``, identical on every rank.
    """
    was_training = getattr(model, "training", False)
    if isinstance(model, nn.Module):
        model.eval()
    records: list[dict[str, Any]] = []
    batches = loader
    if progress:
        batches = tqdm(loader, desc="evaluate", leave=False, dynamic_ncols=True)
    for batch in batches:
        image = batch["image"].to(device, non_blocking=True)
        ids = batch.get("input_ids")
        mask = batch.get("attention_mask")
        with autocast(device, amp):
            logits, existence = answer(model, image, ids.to(device) if ids is not None else None,
                                       mask.to(device) if mask is not None else None)
        logits = logits.float().cpu()
        records.extend(batch_scores(logits, batch, existence.float().cpu() if existence is not None else None))
        if on_batch is not None:
            on_batch(batch, logits)
    if isinstance(model, nn.Module):
        model.train(was_training)
    records = gather_records(records, env)
    summary = summarize(records, empty_policy=empty_policy)
    summary["n_nonfinite_logits"] = bad = sum(not r["finite"] for r in records)
    if bad and env.is_main:
        log.warning("%d of %d samples gave non-finite logits (inf/NaN; their masks are empty): the model diverges "
                    "on them at evaluation (docs/model.md, block_norm)", bad, len(records))
    if any(r["target_area"] == 0 for r in records) and any(r["target_area"] > 0 for r in records):
        summary.update(existence_metrics(records, existence_threshold, max_prob_threshold))
    return {"records": records, "summary": summary}


def answer(model: Any, image: torch.Tensor, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(mask logits (B, 1, H, W), existence logits (B,) or None without an existence head) of a network or a
    :class:`~lsms.backends.Backend`."""
    if isinstance(model, nn.Module):
        out = model.forward_features(image, input_ids, attention_mask)
        return out.logits, out.existence
    return model.answer(image, input_ids, attention_mask)


def existence_metrics(records: list[dict[str, Any]], threshold: float | str | None,
                      max_prob_threshold: float | str | None = None) -> dict[str, Any]:
    """:func:`lsms.metrics.existence_summary` of the model's score at ``threshold`` (``"choose"``: chosen on
    these records); with an existence head also of the highest-probability score, its keys ending ``_max_prob``."""
    head = any("existence_max_prob" in r for r in records)
    floor = 0.0 if head else MIN_EXISTENCE_THRESHOLD
    if threshold == "choose":
        threshold = choose_existence_threshold(records, floor=floor)
    summary = existence_summary(records, threshold, floor=floor)
    if head:
        key = "existence_max_prob"
        if max_prob_threshold == "choose":
            max_prob_threshold = choose_existence_threshold(records, key=key)
        other = existence_summary(records, max_prob_threshold, key=key)
        summary.update({f"{k}_max_prob": v for k, v in other.items() if not k.startswith(("n_positive", "n_negative"))})
    return summary


def batch_scores(logits: torch.Tensor, batch: dict[str, Any], existence: torch.Tensor | None = None
                 ) -> list[dict[str, Any]]:
    """Per-sample metric records of a collated batch, in batch order, with each sample's ``existence`` score
    (:func:`lsms.metrics.existence_probability` of the mask logits and the existence head's logits
    ``existence``; with the head also ``existence_max_prob``, the highest mask probability), whether its
    logits are all ``finite``, and for a negative expression whose record says how it misses, that ``negative`` kind.

    The dataset marks a record without an instance map by instances = -1 and without a referred lesion by
    target_instance = -1; such samples are scored without referring accuracy, or with the lesion under the
    target taken as the referred one.
    """
    records = _scores(logits, batch)
    finite = torch.isfinite(logits.flatten(1)).all(1).tolist()
    for r, score, ok in zip(records, existence_probability(logits, existence).tolist(), finite, strict=True):
        r["existence"], r["finite"] = score, ok
    for r, kind in zip(records, batch.get("negative") or [""] * len(records), strict=True):
        if kind and r["target_area"] == 0:
            r["negative"] = kind
    for r, diameter in zip(records, batch.get("diameter_mm") or [math.nan] * len(records), strict=True):
        if math.isfinite(diameter) and r["target_area"] > 0:  # NaN: the record states none
            r["diameter_mm"] = float(diameter)
    if existence is not None:
        for r, score in zip(records, existence_score(logits).tolist(), strict=True):
            r["existence_max_prob"] = score
    return records


def _scores(logits: torch.Tensor, batch: dict[str, Any]) -> list[dict[str, Any]]:
    inst = batch.get("instances")
    target_inst = batch.get("target_instance")
    ids = list(batch["id"])
    if inst is None:
        return sample_scores(logits, batch["mask"], ids)
    has_map = (inst.flatten(1) >= 0).all(1)  # (B,)
    has_target = target_inst >= 0 if target_inst is not None else torch.zeros_like(has_map)
    groups = {  # kind -> sample indices
        "none": (~has_map).nonzero().flatten().tolist(),
        "map": (has_map & ~has_target).nonzero().flatten().tolist(),
        "referred": (has_map & has_target).nonzero().flatten().tolist(),
    }
    out: dict[int, dict[str, Any]] = {}
    for kind, idx in groups.items():
        if not idx:
            continue
        sel = torch.tensor(idx)
        recs = sample_scores(
            logits[sel], batch["mask"][sel], [ids[i] for i in idx],
            inst[sel] if kind != "none" else None,
            target_inst[sel] if kind == "referred" else None,
        )
        out.update(zip(idx, recs, strict=True))
    return [out[i] for i in range(len(ids))]


# --------------------------------------------------------------------------- a trained model on a dataset


def evaluate_levels(run_or_checkpoint: str | Path, data: str | Path, split: str = "val",
                    levels: tuple[str, ...] = TEXT_LEVELS, batch_size: int = 8, device: str = "auto",
                    num_workers: int = 0, env: DistEnv | None = None, progress: bool = False,
                    on_batch: Callable | None = None, prefer: str = "best",
                    empty_policy: str = "one", allow_outside_root: bool = False, allow_split_leak: bool = False,
                    backend: str | None = None, negatives_at: tuple[str, ...] | None = None) -> dict[str, dict[str, Any]]:
    """A trained or exported model on ``data``/``split`` at each text level, loaded once: {level: result}.

    Each result is :func:`evaluate_model`'s plus ``checkpoint`` (its path) and ``epoch``. Level "none" gives
    the text model an empty sentence (the same weights, nothing to refer to). ``backend``: as in
    :func:`lsms.backends.load_backend` (default: the one the file is for). ``negatives_at``: the levels at which
    negative expressions (``target_instance`` 0) are evaluated too (None: every level; the others skip them).
    """
    if unknown := [level for level in levels if level not in TEXT_LEVELS]:
        raise ValueError(f"text levels must be among {', '.join(TEXT_LEVELS)}, got {unknown}")
    env = env or DistEnv(device=pick_device(device))
    model = load_backend(run_or_checkpoint, backend, str(env.device), prefer=prefer, batch=batch_size)
    records = load_samples(data, split=split, allow_outside_root=allow_outside_root, allow_split_leak=allow_split_leak)
    results = {}
    for level in levels:
        chosen = records if negatives_at is None or level in negatives_at else \
            [r for r in records if r.target_instance != 0]
        dataset = SegmentationDataset(chosen, model.preprocessing, augment=False, text_level=level)
        loader = make_loader(dataset, batch_size, env, num_workers, tokenizer=model.tokenizer)
        result = evaluate_model(model, loader, env.device, env, progress=progress, on_batch=on_batch,
                                empty_policy=empty_policy, existence_threshold=model.existence_threshold,
                                max_prob_threshold=model.max_prob_threshold)
        results[level] = {**result, "checkpoint": str(getattr(model, "path", model.source)), "epoch": model.epoch}
    return results


ASSEMBLED = {"3d": "in 3D", "3d-no-size": "in 3D, the stated size not read", "slices": "slice by slice"}
VOLUME_RECORDS = "volumes.jsonl"  # a dataset's volume-level records (RefLiver-Synth --volumes; docs/dataset-format.md)


def evaluate_volumes(run_or_checkpoint: str | Path, data: str | Path, split: str = "val", text_level: str = "full",
                     batch_size: int = 8, device: str = "auto", prefer: str = "best", backend: str | None = None,
                     modes: tuple[str, ...] = VOLUME_MODES, progress: bool = False) -> dict[str, Any]:
    """A trained or exported model on the volume records of ``data``/``split`` (``volumes.jsonl``): every slice of
    each volume (:meth:`lsms.predict.Predictor.predict_volume`), each sentence's answer assembled in every mode of
    ``modes`` (:func:`lsms.volumes.assemble`; nothing withheld, as 2D evaluation scores the raw mask) and scored in
    3D against the referred lesion (:func:`lsms.metrics.volume_scores`), the volume's existence score beside it.

    Returns:
        ``{"summary": {mode: summarize(...) + existence_metrics(...)}, "records": {mode: [...]}, "checkpoint"}``.
    """
    import tempfile

    from lsms.data.manifest import load_manifest
    from lsms.data.readers import open_volume_unpacked
    from lsms.predict import Predictor

    path = Path(data) / VOLUME_RECORDS
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: --volumes evaluates the volume records a dataset made by "
                                "'lsms synth OUT --volumes' holds")
    by_volume: dict[Path, list[Any]] = {}
    for r in load_manifest(path):
        if r.split == split:
            by_volume.setdefault(r.image_path, []).append(r)
    if not by_volume:
        raise ValueError(f"{path}: no volume records in the {split!r} split")
    predictor = Predictor.from_checkpoint(run_or_checkpoint, device, prefer=prefer, backend=backend)
    records: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
    for image, chosen in tqdm(by_volume.items(), desc=f"{split} volumes", unit="volume", disable=not progress):
        with tempfile.TemporaryDirectory(prefix="lsms-volume-") as scratch:  # each .nii.gz decompressed once
            volume = open_volume_unpacked(image, Path(scratch))
            texts = [r.text_at(text_level) for r in chosen]
            answers = predictor.predict_volume(volume, list(range(volume.depth)), texts, batch_size)
            geometry = volume.slice(0).geometry
            spacing = voxel_spacing(geometry.spacing if geometry is not None else None)
            labels = open_volume_unpacked(chosen[0].instances_path, Path(scratch))
            instances = np.stack([np.rint(labels.slice(k).array) for k in range(labels.depth)]).astype(np.int32)
        for r, text, (prob, existence) in zip(chosen, texts, answers, strict=True):
            for mode in modes:
                answer = assemble(prob, existence, predictor.threshold, None, mode, text, spacing)
                records[mode].append({**volume_scores(answer.mask, instances, r.target_instance or 0, r.id),
                                      "existence": answer.score, "components": answer.components,
                                      **({"diameter_mm": d} if (d := r.diameter_mm) is not None else {})})
    summary = {mode: {**summarize(rs), **existence_metrics(rs, predictor.existence_threshold)}
               for mode, rs in records.items()}
    return {"summary": summary, "records": records, "checkpoint": str(run_or_checkpoint)}


def evaluate_checkpoint(run_or_checkpoint: str | Path, data: str | Path, split: str = "val",
                        text_level: str = "full", **kwargs: Any) -> dict[str, Any]:
    """A trained model on ``data``/``split`` at one text level (:func:`evaluate_levels` with one level)."""
    return evaluate_levels(run_or_checkpoint, data, split, (text_level,), **kwargs)[text_level]


# --------------------------------------------------------------------------- command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="RUN_OR_CHECKPOINT",
                   help="a run folder (uses best.pt, else last.pt), a .pt checkpoint, or a file from 'lsms export'")
    p.add_argument("data", metavar="DATA", help="dataset folder: manifest, LViT layout or images/ + masks/")
    p.add_argument("--split", default="val", choices=("train", "val", "test"), help="split to evaluate (default val)")
    p.add_argument("--text-level", default="full", choices=TEXT_LEVELS,
                   help="expression detail: full, half, quarter, or none (empty sentence to the text model)")
    p.add_argument("--checkpoint", default="best", choices=("best", "last"), help="which checkpoint of a run folder")
    p.add_argument("--out", metavar="DIR", help="output folder (default: RUN/eval-SPLIT-LEVEL or next to the checkpoint; "
                   "refused when it holds the evaluation of other data)")
    p.add_argument("--json", metavar="PATH", help="also write the summary JSON here ('-' prints it to stdout)")
    p.add_argument("--save-predictions", action="store_true", help="write predicted masks (PNG, model input size)")
    p.add_argument("--empty-policy", default="one", choices=("one", "skip"),
                   help="empty target + empty prediction: scores 1 ('one', default) or is left out ('skip')")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    p.add_argument("--num-workers", type=int, default=0,
                   help="processes reading the data (default 0: read in the main process)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--volumes", action="store_true",
                   help="evaluate the dataset's volume records (volumes.jsonl): one 3D answer per sentence, assembled "
                        "from every slice in 3D (with and without the size the sentence states) and slice by slice, "
                        "side by side (3D Dice, referring accuracy, existence per volume; docs/volumes.md)")
    p.add_argument("--allow-outside-root", action="store_true",
                   help="read files the dataset names outside its folder (off by default: an error)")
    p.add_argument("--allow-split-leak", action="store_true",
                   help="evaluate a dataset whose splits share a patient or an image, with a warning (off by default: "
                        "an error, as lsms check reports it)")
    add_backend_argument(p)


def default_out(model_arg: str | Path, split: str, text_level: str, volumes: bool = False) -> Path:
    p = Path(model_arg)
    folder = p if p.is_dir() else p.parent
    return folder / f"eval-{split}-{'volumes-' if volumes else ''}{text_level}"


def check_not_other_data(out: Path, data: str | Path) -> None:
    """Refuse to overwrite the default output folder when it holds the evaluation of other data (``--out``
    names a folder on purpose: it is not checked)."""
    summary = out / "summary.json"
    if not summary.is_file():
        return
    try:
        before = json.loads(summary.read_text(encoding="utf-8")).get("data")
    except (ValueError, AttributeError):
        before = None
    if before is not None and os.path.realpath(before) != os.path.realpath(data):
        raise ValueError(f"{out} holds the evaluation of {before}; evaluating {data} there would overwrite it: "
                         "give --out DIR for this dataset")


def format_summary(summary: dict[str, Any]) -> str:
    """Summary dict -> aligned 'name: value' lines."""
    lines = []
    for k, v in summary.items():
        if isinstance(v, float):
            lines.append(f"  {k:<28} {v:.4f}")
        elif isinstance(v, (int, str)) or v is None:
            lines.append(f"  {k:<28} {v}")
    return "\n".join(lines)


def write_per_sample_csv(records: list[dict[str, Any]], path: Path) -> Path:
    columns: list[str] = []
    for r in records:
        for k, v in r.items():
            if k not in columns and (v is None or isinstance(v, (int, float, str, bool))):
                columns.append(k)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for r in records:
            writer.writerow({k: r.get(k) for k in columns})
    return path


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.num_workers < 0:
        raise ValueError(f"--num-workers must be >= 0, got {args.num_workers}")
    env = D.init_distributed(args.device)
    try:
        out = Path(args.out) if args.out else default_out(args.model, args.split, args.text_level, args.volumes)
        if not args.out:
            check_not_other_data(out, args.data)
        if env.is_main:
            writable_folder(out, "--out")  # now, not after the whole evaluation
        on_batch = None
        if args.save_predictions:
            pred_dir = out / "predictions"
            pred_dir.mkdir(parents=True, exist_ok=True)
            on_batch = _prediction_writer(pred_dir)
        if args.volumes:
            return _run_volumes(args, out, env)
        result = evaluate_checkpoint(
            args.model, args.data, args.split, args.text_level, batch_size=args.batch_size, device=args.device,
            num_workers=args.num_workers, env=env, progress=env.is_main, on_batch=on_batch, prefer=args.checkpoint,
            empty_policy=args.empty_policy, allow_outside_root=args.allow_outside_root, backend=args.backend,
            allow_split_leak=args.allow_split_leak,
        )
        if env.is_main:
            summary = {"checkpoint": result["checkpoint"], "data": str(args.data), "split": args.split,
                       "text_level": args.text_level, **result["summary"]}
            write_per_sample_csv(result["records"], out / "per_sample.csv")
            write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
            if args.json == "-":
                print(json.dumps(summary, indent=2))
            else:
                if args.json:
                    write_text_atomic(Path(args.json), json.dumps(summary, indent=2) + "\n")
                print(f"{result['checkpoint']} on {args.data} [{args.split}, text {args.text_level}]:")
                print(format_summary(result["summary"]))
                print(f"per-sample scores: {out / 'per_sample.csv'}")
        return 0
    finally:
        D.cleanup()


def _run_volumes(args: argparse.Namespace, out: Path, env: DistEnv) -> int:
    """``lsms evaluate --volumes``: :func:`evaluate_volumes`, one per-volume CSV per assembly mode and one summary."""
    if env.world_size > 1:
        raise ValueError("--volumes evaluates in one process: run it without torchrun")
    if args.save_predictions:
        raise ValueError("--save-predictions writes 2D masks; for the 3D answers of a volume use 'lsms predict RUN VOLUME'")
    result = evaluate_volumes(args.model, args.data, args.split, args.text_level, batch_size=args.batch_size,
                              device=args.device, prefer=args.checkpoint, backend=args.backend, progress=True)
    summary = {"checkpoint": result["checkpoint"], "data": str(args.data), "split": args.split,
               "text_level": args.text_level, "volumes": result["summary"]}
    for mode, records in result["records"].items():
        write_per_sample_csv(records, out / f"per_volume_{mode}.csv")
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    if args.json == "-":
        print(json.dumps(summary, indent=2))
        return 0
    if args.json:
        write_text_atomic(Path(args.json), json.dumps(summary, indent=2) + "\n")
    for mode, values in result["summary"].items():
        print(f"{result['checkpoint']} on {args.data} [{args.split} volumes, text {args.text_level}, "
              f"assembled {ASSEMBLED[mode]}]:")
        print(format_summary(values))
    print(f"per-volume scores: {out}/per_volume_*.csv")
    return 0


def file_stem(sample_id: str, limit: int = 120) -> str:
    """A sample id as a file name: only letters, digits, ``-_.``; a long id is cut and made unique by a hash
    (file systems refuse names over 255 bytes)."""
    import hashlib

    safe = "".join(c if c.isalnum() and c.isascii() or c in "-_." else "_" for c in sample_id).lstrip(".") or "_"
    if len(safe) <= limit:
        return safe
    return f"{safe[:limit - 17]}-{hashlib.sha1(sample_id.encode('utf-8', 'replace')).hexdigest()[:16]}"


def _prediction_writer(folder: Path) -> Callable[[dict[str, Any], torch.Tensor], None]:
    def write(batch: dict[str, Any], logits: torch.Tensor) -> None:
        masks = (logits[:, 0] > 0).numpy().astype(np.uint8) * 255  # sigmoid > 0.5
        for sample_id, m in zip(batch["id"], masks, strict=True):
            Image.fromarray(m).save(folder / f"{file_stem(str(sample_id))}.png")

    return write
