"""``lsms predict`` and the in-memory :class:`Predictor`: segment the lesion a sentence refers to.

    lsms predict RUN_OR_CHECKPOINT IMAGES... --text "A cyst in segment VI ..." --out DIR
    lsms predict RUN IMAGES... --text "the left cyst" --text "the right cyst" --out DIR  # each sentence, every image
    lsms predict RUN ct.nii.gz --slices 40:60 --text "..." --out DIR      # a NIfTI volume, slices 40..59
    lsms predict RUN dicom_series_folder/ --text "..." --out DIR           # a DICOM series (all slices)
    lsms predict RUN --pairs pairs.csv --out DIR                           # CSV with columns image,text[,slice]
    lsms predict model.onnx IMAGES... --text "..." --out DIR               # a file from lsms export (ONNX Runtime)

For every (image, sentence) it writes ``NAME_mask.png`` (0/255, the input's size; NIfTI/DICOM inputs get
``NAME_mask.nii.gz`` in the input's geometry instead, one volume per input holding every predicted slice),
``NAME_overlay.png`` (the mask over the image with the sentence as caption), with ``--probability``
``NAME_prob.png`` (probability x 255), with ``--features`` ``NAME_features.png`` (the four encoder stages'
feature maps as heat maps, as in the paper's Fig. 6), and ``predictions.csv`` listing everything.

Pre- and post-processing live here, not in the network (SAM's ``Predictor``): the checkpoint's saved
:class:`~lsms.data.Preprocessing` maps the raw image to the model input exactly as in training; the logits are
resized back to the input size (bilinear) and thresholded at probability 0.5.

"Not found": every prediction has an existence score (:func:`lsms.metrics.existence_probability`: the
probability of the model's existence head, or for a model without one the highest mask probability on the
model's grid). Below the model's existence threshold (chosen on the validation split
during training, when it held negative expressions; ``--existence-threshold`` overrides it) the mask is
withheld (empty), ``predictions.csv`` says ``found`` False and the overlay's caption says "not found".

The wrong kind of image: an input that is clearly not what the model was trained on (a colour photo, or a DICOM
of another modality, given to a CT model; a CT image given to a model of other images:
:func:`lsms.data.intensity.input_mismatch`) is refused, naming the model's input contract and the input.
``--allow-modality-mismatch`` predicts it anyway; its row's ``warning`` column and its overlay's caption then
say that the result is meaningless.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lsms.backends import Backend, TorchBackend, add_backend_argument, load_backend
from lsms.data import ImageData, preprocess_image, read_image
from lsms.data.formats import image_stem, image_suffixes, is_image_name, is_series_file
from lsms.data.intensity import input_mismatch
from lsms.data.readers import ImageTooLargeError, volume_depth, write_volume_mask
from lsms.metrics import check_threshold, existence_probability
from lsms.pictures import heat_map, save_feature_maps, save_mask_png, save_overlay
from lsms.runs import writable_folder
from lsms.spec import ModelSpec, WithSpec

log = logging.getLogger(__name__)



@dataclass
class Prediction:
    """One segmentation, at the input image's size.

    Attributes:
        mask: bool (H, W), probability > threshold.
        probability: float32 (H, W) in [0, 1].
        text: the sentence used ("" for a model without text).
        features: with ``features=True``, four float32 (H, W) heat maps in [0, 1], stages 1..4 (F1..F4).
        existence: the score that the described lesion is in the image (the existence head's probability, or
            the highest mask probability).
        found: False when ``existence`` is under the existence threshold: then ``mask`` is empty.
        warning: set when the image is not what the model was trained on and the predictor was told to predict
            anyway (``allow_modality_mismatch``): why the result is meaningless.
    """

    mask: np.ndarray
    probability: np.ndarray
    text: str
    features: list[np.ndarray] | None = None
    existence: float = 1.0
    found: bool = True
    warning: str | None = None


class InputMismatchError(ValueError):
    """The image is clearly not what the model was trained on (:func:`lsms.data.intensity.input_mismatch`)."""


class Predictor(WithSpec):
    """A trained model with its preprocessing: raw image + sentence -> mask, in memory.

    Example::

        predictor = Predictor.from_checkpoint("runs/demo")         # or an exported "lsms-tiny.onnx"
        pred = predictor.predict(read_image("slice.dcm"), "the larger of the two cysts")
        pred.mask  # (H, W) bool at the DICOM's size

    Args:
        model: an LSMS model (put in eval mode here) or a :class:`~lsms.backends.Backend`.
        spec: the model's :class:`~lsms.spec.ModelSpec` (preprocessing, thresholds; a backend brings its own).
        device: where to run a model.
        threshold: probability above which a pixel is lesion (default: the spec's, 0.5).
        existence_threshold: existence score below which the mask is withheld ("not found"); default the
            spec's (chosen on the validation split during training; None there: never withheld); 0: never.
        allow_modality_mismatch: predict an image that is clearly not what the model was trained on (a colour
            photo for a CT model, ...), marking the prediction's ``warning``, instead of raising
            :class:`InputMismatchError`.
    """

    def __init__(self, model, spec: ModelSpec | None = None, device: torch.device | str = "cpu",
                 threshold: float | None = None, existence_threshold: float | None = None,
                 allow_modality_mismatch: bool = False):
        if threshold is not None:
            check_threshold(threshold)
        if existence_threshold is not None:
            check_threshold(existence_threshold, "existence threshold", low_inclusive=True)
        if not isinstance(model, Backend):
            if spec is None:
                raise ValueError("a network needs its spec (lsms.checkpoint.spec_of(checkpoint)) to predict")
            model = TorchBackend(model, spec, device)
        overrides = {"threshold": threshold, "existence_threshold": existence_threshold}
        self.backend = model
        self.allow_modality_mismatch = allow_modality_mismatch
        self.spec = dataclasses.replace(model.spec, **{k: v for k, v in overrides.items() if v is not None})

    @classmethod
    def from_checkpoint(cls, run_or_checkpoint: str | Path, device: str = "auto", threshold: float | None = None,
                        prefer: str = "best", backend: str | None = None,
                        existence_threshold: float | None = None, allow_modality_mismatch: bool = False) -> Predictor:
        """From a run folder, checkpoint or ``lsms export`` file; ``backend`` as in :func:`lsms.backends.load_backend`."""
        return cls(load_backend(run_or_checkpoint, backend, device, prefer=prefer, threshold=threshold),
                   existence_threshold=existence_threshold, allow_modality_mismatch=allow_modality_mismatch)

    @property
    def uses_text(self) -> bool:
        return self.backend.uses_text

    def predict(self, image, text: str = "", features: bool = False) -> Prediction:
        """Segment what ``text`` refers to in ``image``.

        Args:
            image: an :class:`~lsms.data.ImageData` (from :func:`~lsms.data.read_image`), a path, or a raw
                array (H, W) / (H, W, C) in the file's units (HU for CT).
            text: the referring expression (ignored, with a warning, by a model trained without text).
            features: also return the stage feature maps as heat maps (PyTorch backend only).
        """
        (H, W), inputs, warning = self._inputs(image, text)
        maps = None
        if features:
            out = self.backend.forward_features(*inputs)
            logits, head = out.logits.float().cpu(), out.existence
            maps = [heat_map(f, (H, W)) for f in out.stages]
        else:
            logits, head = self.backend.answer(*inputs)
        existence = float(existence_probability(logits, head.float().cpu() if head is not None else None)[0])
        found = self.existence_threshold is None or existence >= self.existence_threshold
        logits = F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)  # (1, 1, H, W)
        prob = torch.sigmoid(logits)[0, 0].numpy()
        mask = threshold_mask(prob, self.threshold) if found else np.zeros(prob.shape, dtype=bool)
        return Prediction(mask=mask, probability=prob, text=text, features=maps, existence=existence, found=found,
                          warning=warning)

    def check_input(self, image) -> str | None:
        """Whether ``image`` is the kind of image the model was trained on (:func:`input_mismatch`).

        Returns:
            None, or with ``allow_modality_mismatch`` the warning that the prediction of it is meaningless.

        Raises:
            InputMismatchError: it is not, naming the model's input contract and the image.
        """
        data = image if isinstance(image, ImageData) else None
        array = data.array if data is not None else np.asarray(image)
        mismatch = input_mismatch(array, data.modality if data else None, self.preprocessing,
                                  data.format if data else None)
        if mismatch is None:
            return None
        where = f"{data.path}: " if data is not None else ""
        if self.allow_modality_mismatch:
            return f"MEANINGLESS: {mismatch} (predicted anyway: --allow-modality-mismatch)"
        raise InputMismatchError(f"{where}{mismatch}; give an image of the kind the model was trained on, or pass "
                                 "--allow-modality-mismatch (Predictor(allow_modality_mismatch=True)) to predict it "
                                 "anyway, marked as meaningless")

    def stage_features(self, image, text: str = "") -> list[torch.Tensor]:
        """The raw encoder stage outputs F1..F4, each (1, C_i, h_i, w_i), for ``image`` and ``text``."""
        return self.backend.forward_features(*self._inputs(image, text)[1]).stages

    def _inputs(self, image, text: str):
        """Checked, preprocessed model inputs -> ((H, W) of the input, (image (1, C, h, w), ids, mask), the
        warning of :meth:`check_input`)."""
        if isinstance(image, (str, Path)):
            image = read_image(image)
        array = image.array if isinstance(image, ImageData) else np.asarray(image, dtype=np.float32)
        if array.ndim not in (2, 3):
            raise ValueError(f"image must be (H, W) or (H, W, C), got shape {array.shape}")
        if not isinstance(text, str):
            raise TypeError(f"text must be a string, got {type(text).__name__}")
        warning = self.check_input(image)
        x = preprocess_image(array, self.preprocessing)[None]  # (1, C, h, w)
        ids = attn = None
        if self.uses_text:
            tokens = self.backend.tokenize([text])
            ids, attn = tokens["input_ids"], tokens["attention_mask"]
        elif text:
            log.warning("this model was trained without text; the sentence %r is ignored", text)
        return array.shape[:2], (x, ids, attn), warning


def threshold_mask(probability: np.ndarray, threshold: float) -> np.ndarray:
    """bool mask: probability strictly above ``threshold`` (0 < threshold < 1)."""
    return probability > check_threshold(threshold)


# --------------------------------------------------------------------------- inputs


@dataclass
class Job:
    """One input to segment: a 2D image file, or some slices of a volume, with its sentences."""

    path: Path
    texts: list[str]
    slices: list[int] | None = None  # volumes only
    error: str | None = None  # the input could not be opened; it is listed as failed, the others still run


def slice_spec(spec: str) -> slice | int:
    """``"7"`` -> 7; ``"10:20"`` -> slice(10, 20) (Python-style, negative allowed); anything else is an error."""
    try:
        if ":" in spec:
            a, b = spec.split(":", 1)
            return slice(int(a) if a.strip() else None, int(b) if b.strip() else None)
        return int(spec)
    except ValueError:
        raise ValueError(f"--slices takes N or START:STOP (e.g. 10:20), got {spec!r}") from None


def parse_slices(spec: str | None, n: int, path: Path) -> list[int]:
    """``None`` -> all; ``"7"`` -> [7]; ``"10:20"`` -> 10..19 (Python-style, negative allowed)."""
    if spec is None:
        return list(range(n))
    which = slice_spec(spec)
    picked = list(range(n)[which]) if isinstance(which, slice) else [which + n if which < 0 else which]
    if not picked or not all(0 <= k < n for k in picked):
        raise ValueError(f"{path}: slices {spec!r} are outside the volume's {n} slices (0..{n - 1})")
    return picked


def expand_inputs(paths: list[str], texts: list[str] | None, pairs: str | None, slices: str | None) -> list[Job]:
    """Turn the command line's inputs into jobs; folders of images expand to their files.

    Args:
        paths: images, folders, volumes, DICOM series.
        texts: the ``--text`` sentences (repeatable), each asked of every image in ``paths``.
        pairs: a CSV of image,text[,slice] rows.
        slices: the slices of volumes to predict.
    """
    jobs: list[Job] = []
    if pairs:
        pairs_path = Path(pairs)
        if not pairs_path.is_file():
            raise FileNotFoundError(f"--pairs file {pairs!r} does not exist")
        try:
            with open(pairs_path, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        except UnicodeDecodeError:
            raise ValueError(f"--pairs file {pairs!r} is not UTF-8 text; save the CSV as UTF-8") from None
        if not rows or not {"image", "text"} <= set(rows[0]):
            raise ValueError(f"{pairs}: a CSV with a header row 'image,text' (and optionally 'slice') is needed")
        grouped: dict[tuple[str, str | None], list[str]] = {}
        for row in rows:
            image = Path(row["image"])
            if not image.is_absolute():
                image = pairs_path.parent / image if (pairs_path.parent / image).exists() else image
            grouped.setdefault((str(image), row.get("slice") or None), []).append(row["text"] or "")
        for (image, slice_spec), texts in grouped.items():
            jobs.extend(_jobs_for(Path(image), texts, slice_spec or slices))
    if paths and texts is None and not pairs:
        raise ValueError('give the sentence with --text "..." (or --text "" for a model without text), or --pairs CSV')
    for p in paths:
        jobs.extend(_jobs_for(Path(p), texts or [""], slices))
    if not jobs:
        raise ValueError("nothing to predict: give image files, folders, a NIfTI volume, a DICOM series or --pairs")
    return jobs


def _jobs_for(path: Path, texts: list[str], slices: str | None) -> list[Job]:
    if not path.exists():
        raise FileNotFoundError(f"{path}: input not found")
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.is_file() and not f.name.startswith("."))
        if not any(is_series_file(f) for f in files):  # a folder of images, not a DICOM series
            images = [f for f in files if is_image_name(f.name)]
            if not images:
                raise ValueError(f"{path}: no image files in this folder (looked for {', '.join(image_suffixes())})")
            return [j for f in images for j in _jobs_for(f, texts, slices)]
    try:
        depth = volume_depth(path)
        if depth is None:
            if slices not in (None, "0"):
                raise ValueError(f"{path}: --slices given but this input is a 2D image")
            return [Job(path, texts)]
        return [Job(path, texts, parse_slices(slices, depth, path))]
    except (ValueError, OSError) as err:  # an unreadable input fails alone; the others are still predicted
        return [Job(path, texts, error=_naming(path, None, err))]


def _naming(path: Path, k: int | None, err: BaseException) -> str:
    """The error's message, starting with the input (and slice) it concerns."""
    message = str(err)
    if message.startswith(str(path)):
        return message
    return f"{path}{'' if k is None else f' slice {k}'}: {message}"


def _stem(path: Path) -> str:
    """An input's name without its image ending (``ct.nii.gz`` -> ``ct``); a folder's name as it is."""
    return image_stem(path.name) if path.is_file() else path.name


# --------------------------------------------------------------------------- command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="RUN_OR_CHECKPOINT",
                   help="a run folder (best.pt, else last.pt), a .pt checkpoint, or a file from 'lsms export'")
    p.add_argument("images", nargs="*", metavar="IMAGES",
                   help="image files, folders of images, NIfTI volumes or DICOM series folders")
    p.add_argument("--text", action="append",
                   help="the referring expression, used for every image; repeat it for several (one mask each)")
    p.add_argument("--pairs", metavar="CSV", help="CSV with columns image,text[,slice]: one sentence per row")
    p.add_argument("--slices", metavar="N|START:STOP", help="slices of a NIfTI volume / DICOM series (default all)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--probability", action="store_true", help="also write the probability map (PNG, x255)")
    p.add_argument("--features", action="store_true", help="also write the four stage feature maps as heat maps")
    p.add_argument("--threshold", type=float, default=0.5, help="probability threshold (default 0.5)")
    p.add_argument("--existence-threshold", type=float, default=None, metavar="T",
                   help="existence score under which the lesion is reported 'not found' and no mask is drawn "
                        "(default: the model's, chosen on its validation split; 0: always draw the mask)")
    p.add_argument("--checkpoint", default="best", choices=("best", "last"), help="which checkpoint of a run folder")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    add_mismatch_argument(p)
    add_backend_argument(p)


def add_mismatch_argument(p: argparse.ArgumentParser) -> None:
    """``--allow-modality-mismatch``, for ``lsms predict`` and ``lsms serve``."""
    p.add_argument("--allow-modality-mismatch", action="store_true",
                   help="predict images that are clearly not what the model was trained on (a colour photo or a "
                        "DICOM of another modality for a CT model, a CT image for a model of other images) instead "
                        "of refusing them; their results are meaningless and marked so")


def run(args: argparse.Namespace) -> int:
    check_threshold(args.threshold, "--threshold")
    if args.slices is not None:
        slice_spec(args.slices)
    jobs = expand_inputs(args.images, args.text, args.pairs, args.slices)
    writable_folder(Path(args.out), "--out")
    predictor = Predictor.from_checkpoint(args.model, args.device, args.threshold, prefer=args.checkpoint,
                                          backend=args.backend, existence_threshold=args.existence_threshold,
                                          allow_modality_mismatch=args.allow_modality_mismatch)
    if args.features:
        predictor.backend.check_features()  # once, before any input
    rows = predict_jobs(predictor, jobs, Path(args.out), probability=args.probability, features=args.features)
    failed = [r for r in rows if r.get("error")]
    listing = Path(args.out) / "predictions.csv"
    print(f"{len(rows) - len(failed)} prediction(s) written to {args.out} (list: {listing})")
    for r in rows:
        if r.get("found") is False:
            where = r["input"] if r["slice"] == "" else f"{r['input']} slice {r['slice']}"
            print(f"not found: {r['text']!r} in {where} (existence {r['existence']:.3f} < "
                  f"{predictor.existence_threshold:.3f}): no mask drawn")
    marked = [r for r in rows if r.get("warning")]
    if marked:
        print(f"WARNING: {len(marked)} prediction(s) of images the model was not trained on (the 'warning' column of "
              f"{listing}): their masks are meaningless. First: {marked[0]['warning']}")
    if failed:
        print(f"{len(failed)} input(s) failed and were skipped; predictions.csv lists each with its error")
        return 1
    return 0


def predict_jobs(predictor: Predictor, jobs: list[Job], out: Path, probability: bool = False,
                 features: bool = False) -> list[dict[str, Any]]:
    """Run every job and write its files; returns the rows of ``predictions.csv``.

    An input (or a slice of a volume) that cannot be read or predicted is skipped with a warning and listed
    with its ``error``; the others are still written. Inputs are read one at a time, so memory stays that of
    one image (or one volume's mask) however many inputs there are.
    """
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    used: set[str] = set()
    for job in jobs:
        if job.error is not None:
            rows.extend(_failed(job, None, job.error))
            continue
        stem = _unique(_stem(job.path), used)
        volume_masks: list[dict[int, np.ndarray]] = [{} for _ in job.texts]
        geometry = None
        job_rows: list[dict[str, Any]] = []
        for k in job.slices if job.slices is not None else [None]:
            try:
                slice_rows, image = _predict_one(predictor, job, k, stem, out, probability, features)
            except (ValueError, OSError, RuntimeError) as err:
                rows.extend(_failed(job, k, _naming(job.path, k, err)))
                continue
            for j, row in enumerate(slice_rows):
                if image.geometry is not None:
                    geometry = image.geometry
                    volume_masks[j][image.geometry.slice_index] = row.pop("_mask")
                else:
                    row.pop("_mask")
            job_rows.extend(slice_rows)
        if geometry is not None:  # NIfTI / DICOM: one mask volume per sentence, in the input's geometry
            try:
                for j in range(len(job.texts)):
                    tag = stem if len(job.texts) == 1 else f"{stem}_t{j}"
                    path = write_volume_mask(volume_masks[j], geometry, out / f"{tag}_mask.nii.gz")
                    for row in job_rows:
                        if row["text"] == job.texts[j] and "mask" not in row:
                            row["mask"] = str(path)
            except ImageTooLargeError as err:  # the input's header declares a volume above max_volume_voxels
                job_rows = _failed(job, None, _naming(job.path, None, err))
        rows.extend(job_rows)
    _write_csv(rows, out / "predictions.csv")
    return rows


def _predict_one(predictor: Predictor, job: Job, k: int | None, stem: str, out: Path, probability: bool,
                 features: bool):
    """One 2D image (or slice ``k``) with every sentence of ``job`` -> (rows with their ``_mask``, the image)."""
    image = read_image(job.path, slice_index=k)
    name = stem if k is None else f"{stem}_z{k:04d}"
    preds = [predictor.predict(image, t, features=features) for t in job.texts]
    rows = []
    for j, (text, pred) in enumerate(zip(job.texts, preds, strict=True)):
        tag = name if len(job.texts) == 1 else f"{name}_t{j}"
        row: dict[str, Any] = {"input": str(job.path), "slice": "" if k is None else k, "text": text,
                               "area_px": int(pred.mask.sum()), "max_probability": float(pred.probability.max()),
                               "existence": round(pred.existence, 4), "found": pred.found, "_mask": pred.mask,
                               "warning": pred.warning or ""}
        if image.geometry is None:
            row["mask"] = str(out / f"{tag}_mask.png")
            save_mask_png(pred.mask, row["mask"])
        caption = text if pred.found else f"{text} (not found: existence {pred.existence:.2f})"
        if pred.warning:
            caption = f"MEANINGLESS (not the kind of image the model reads): {caption}"
        row["overlay"] = str(save_overlay(image.array, predictor.preprocessing, [pred.mask], [caption],
                                          out / f"{tag}_overlay.png"))
        if probability:
            row["probability"] = str(out / f"{tag}_prob.png")
            Image.fromarray(np.round(pred.probability * 255).astype(np.uint8)).save(row["probability"])
        if features and pred.features is not None:
            row["features"] = str(save_feature_maps(image.array, predictor.preprocessing, pred.features,
                                                    out / f"{tag}_features.png", caption=text))
        rows.append(row)
    return rows, image


def _failed(job: Job, k: int | None, message: str) -> list[dict[str, Any]]:
    log.warning("skipped: %s", message)
    return [{"input": str(job.path), "slice": "" if k is None else k, "text": t, "error": message} for t in job.texts]


def _write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    columns = ["input", "slice", "text", "warning", "found", "existence", "mask", "overlay", "probability", "features",
               "area_px", "max_probability", "error"]
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
    os.replace(tmp, path)


def _unique(name: str, used: set[str]) -> str:
    out, i = name, 1
    while out in used:
        out, i = f"{name}_{i}", i + 1
    used.add(out)
    return out
