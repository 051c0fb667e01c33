"""``lsms predict`` and the in-memory :class:`Predictor`: segment the lesion a sentence refers to.

    lsms predict RUN_OR_CHECKPOINT IMAGES... --text "A cyst in segment VI ..." --out DIR
    lsms predict RUN IMAGES... --text "the left cyst" --text "the right cyst" --out DIR  # each sentence, every image
    lsms predict RUN ct.nii.gz --slices 40:60 --text "..." --out DIR      # a NIfTI volume, slices 40..59
    lsms predict RUN dicom_series_folder/ --text "..." --out DIR           # a DICOM series (all slices)
    lsms predict RUN dicom_series_folder/ --text "..." --format dicom-seg --out DIR  # the answer as a DICOM-SEG
    lsms predict RUN --pairs pairs.csv --out DIR                           # CSV with columns image,text[,slice]
    lsms predict model.onnx IMAGES... --text "..." --out DIR               # a file from lsms export (ONNX Runtime)

For every (image, sentence) it writes ``NAME_mask.png`` (0/255, the input's size; NIfTI/DICOM inputs get
``NAME_mask.nii.gz`` in the input's geometry instead, one volume per input holding every predicted slice),
``NAME_overlay.png`` (the mask over the image with the sentence as caption), with ``--probability``
``NAME_prob.png`` (probability x 255), with ``--features`` ``NAME_features.png`` (the four encoder stages'
feature maps as heat maps, as in the paper's Fig. 6), and ``predictions.csv`` listing everything.

A volume gets one answer per sentence: its slices run in batches (``--batch-size``), and
:func:`lsms.volumes.assemble` keeps the one 3D lesion the sentence refers to (``--volume-mode 3d``, the default;
``slices``: each slice on its own). ``volumes.csv`` has a row per volume and sentence; the overlays are drawn on
the slices the answer covers; ``--format dicom-seg`` writes ``NAME_seg.dcm`` for a DICOM series (docs/volumes.md).

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
import functools
import logging
import os
import tempfile
from collections.abc import Callable
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
from lsms.data.readers import (
    Geometry,
    ReadLimits,
    Volume,
    context_stack,
    open_volume_unpacked,
    volume_depth,
    write_volume_mask,
)
from lsms.metrics import check_threshold, existence_probability
from lsms.pictures import heat_map, save_feature_maps, save_mask_png, save_overlay
from lsms.runs import writable_folder
from lsms.spec import ModelSpec, WithSpec
from lsms.volumes import VOLUME_MODES, VolumeMode, assemble, voxel_spacing

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

    def predict(self, image, text: str = "", features: bool = False, context: np.ndarray | None = None) -> Prediction:
        """Segment what ``text`` refers to in ``image``.

        Args:
            image: an :class:`~lsms.data.ImageData` (from :func:`~lsms.data.read_image`), a path, or a raw
                array (H, W) / (H, W, C) in the file's units (HU for CT).
            text: the referring expression (ignored, with a warning, by a model trained without text).
            features: also return the stage feature maps as heat maps (PyTorch backend only).
            context: for a 2.5D model (``context_slices`` c) only, and needed there: ``image`` (a slice) with its
                volume's neighbouring slices, (H, W, 2c + 1) from :func:`~lsms.data.readers.context_stack`.
        """
        (H, W), inputs, warning = self._inputs(image, text, context)
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

    def predict_volume(self, volume: Volume, slices: list[int], texts: list[str], batch_size: int = 8,
                       progress: Callable[[int], Any] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each sentence's per-slice answers on ``slices`` of ``volume``, ``batch_size`` slices per forward pass.

        Each slice is read once and its probabilities are computed as :meth:`predict` computes them (resized
        back to the slice's size, then the sigmoid); nothing is thresholded here (:func:`lsms.volumes.assemble`
        does that). A 2.5D model (``context_slices``) gets each slice with its neighbours as channels
        (:func:`~lsms.data.readers.context_stack`).

        Args:
            volume: from :func:`~lsms.data.readers.read_volume`.
            slices: which slices, in order.
            texts: the sentences.
            batch_size: slices per forward pass.
            progress: called with the number of slices just done, after each batch.

        Returns:
            Per sentence: (probability float32 (len(slices), H, W), existence float64 (len(slices),)).
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch size must be a positive integer, got {batch_size!r}")
        if not slices:
            raise ValueError(f"{volume.path}: no slices to predict")
        tokens = [self._tokens(t) for t in texts]
        answers: list[tuple[np.ndarray, np.ndarray]] = []
        context = self.preprocessing.context_slices
        read = functools.lru_cache(maxsize=batch_size + 2 * context)(volume.slice)  # 2.5D: each slice read once
        for start in range(0, len(slices), batch_size):
            images = [read(k) for k in slices[start:start + batch_size]]
            if start == 0:
                H, W = images[0].shape
                answers = [(np.empty((len(slices), H, W), np.float32), np.empty(len(slices))) for _ in texts]
                warning = self.check_input(images[0])  # the wrong kind of image: refused (or marked) at once
                if warning:
                    log.warning("%s: %s", volume.path, warning)
            arrays = [context_stack(lambda j: read(j).array, k, volume.depth, context) if context else im.array
                      for k, im in zip(slices[start:start + batch_size], images, strict=True)]
            x = torch.stack([preprocess_image(a, self.preprocessing) for a in arrays])  # (B, C, h, w)
            B = len(images)
            for (ids, attn), (prob, existence) in zip(tokens, answers, strict=True):
                ids, attn = (None, None) if ids is None else (ids.expand(B, -1), attn.expand(B, -1))
                logits, head = self.backend.answer(x, ids, attn)  # (B, 1, h, w), (B,) or None
                existence[start:start + B] = existence_probability(logits, head).numpy()
                logits = F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)  # (B, 1, H, W)
                prob[start:start + B] = torch.sigmoid(logits)[:, 0].numpy()
            if progress is not None:
                progress(B)
        return answers

    def stage_features(self, image, text: str = "") -> list[torch.Tensor]:
        """The raw encoder stage outputs F1..F4, each (1, C_i, h_i, w_i), for ``image`` and ``text``."""
        return self.backend.forward_features(*self._inputs(image, text)[1]).stages

    def _inputs(self, image, text: str, context: np.ndarray | None = None):
        """Checked, preprocessed model inputs -> ((H, W) of the input, (image (1, C, h, w), ids, mask), the
        warning of :meth:`check_input`)."""
        if isinstance(image, (str, Path)):
            image = read_image(image)
        array = image.array if isinstance(image, ImageData) else np.asarray(image, dtype=np.float32)
        if array.ndim not in (2, 3):
            raise ValueError(f"image must be (H, W) or (H, W, C), got shape {array.shape}")
        channels = self.preprocessing.in_channels
        if self.preprocessing.context_slices and (context is None or context.shape != (*array.shape, channels)):
            raise ValueError(f"this model reads each slice with its neighbouring slices ({channels} slices of a "
                             "volume, 2.5D); give it a volume (a NIfTI file or a DICOM series) instead of a 2D image")
        warning = self.check_input(image)
        x = preprocess_image(context if self.preprocessing.context_slices else array, self.preprocessing)[None]
        return array.shape[:2], (x, *self._tokens(text)), warning

    def _tokens(self, text: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The sentence's (input_ids, attention_mask), each (1, T); (None, None) for a model without text."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a string, got {type(text).__name__}")
        if self.uses_text:
            tokens = self.backend.tokenize([text])
            return tokens["input_ids"], tokens["attention_mask"]
        if text:
            log.warning("this model was trained without text; the sentence %r is ignored", text)
        return None, None


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
    p.add_argument("--volume-mode", default="3d", choices=VOLUME_MODES,
                   help="how a volume's slices become one answer per sentence: 3d (the one connected lesion the "
                        "sentence refers to, a size it states weighed against each lesion's largest 3D diameter; "
                        "default), 3d-no-size (the same, the size not read) or slices (each slice on its own); "
                        "docs/volumes.md")
    p.add_argument("--batch-size", type=int, default=8, metavar="N", help="slices of a volume per forward pass (default 8)")
    p.add_argument("--format", action="append", choices=MASK_FORMATS, dest="formats", metavar="FORMAT",
                   help="mask file of a volume: nifti (default) or dicom-seg (a DICOM Segmentation referencing a DICOM "
                        "series input); repeat for both")
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
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    formats = tuple(dict.fromkeys(args.formats or ["nifti"]))
    jobs = expand_inputs(args.images, args.text, args.pairs, args.slices)
    if "dicom-seg" in formats:
        check_dicom_series(jobs)
    writable_folder(Path(args.out), "--out")
    predictor = Predictor.from_checkpoint(args.model, args.device, args.threshold, prefer=args.checkpoint,
                                          backend=args.backend, existence_threshold=args.existence_threshold,
                                          allow_modality_mismatch=args.allow_modality_mismatch)
    if args.features:
        predictor.backend.check_features()  # once, before any input
    if any(job.slices is not None and len(job.slices) > 1 for job in jobs):
        predictor.spec.check_memory(min(args.batch_size, max(len(job.slices or []) for job in jobs)),
                                    f"--batch-size {args.batch_size}", "use a smaller --batch-size",
                                    getattr(predictor.backend, "device", None))
    rows = predict_jobs(predictor, jobs, Path(args.out), probability=args.probability, features=args.features,
                        batch_size=args.batch_size, volume_mode=args.volume_mode, formats=formats)
    failed = [r for r in rows if r.get("error")]
    listing = Path(args.out) / "predictions.csv"
    print(f"{len(rows) - len(failed)} prediction(s) written to {args.out} (list: {listing})")
    if any(job.slices is not None for job in jobs):
        _print_volumes(Path(args.out) / "volumes.csv", predictor.existence_threshold)
    for r in rows:
        if r.get("found") is False and r["slice"] == "":  # a volume's verdicts are printed per volume above
            print(f"not found: {r['text']!r} in {r['input']} (existence {r['existence']:.3f} < "
                  f"{predictor.existence_threshold:.3f}): no mask drawn")
    marked = [r for r in rows if r.get("warning")]
    if marked:
        print(f"WARNING: {len(marked)} prediction(s) of images the model was not trained on (the 'warning' column of "
              f"{listing}): their masks are meaningless. First: {marked[0]['warning']}")
    if failed:
        print(f"{len(failed)} input(s) failed and were skipped; predictions.csv lists each with its error")
        return 1
    return 0


MASK_FORMATS = ("nifti", "dicom-seg")


def check_dicom_series(jobs: list[Job]) -> None:
    """Refuse ``--format dicom-seg`` for inputs that are not DICOM series folders (a SEG references a series)."""
    for job in jobs:
        if job.error is None and not job.path.is_dir():  # a folder that is no DICOM series expands to its images
            raise ValueError(f"{job.path}: --format dicom-seg needs a DICOM series folder as input (a DICOM "
                             "Segmentation references the series' images); for this input use --format nifti")


def _print_volumes(listing: Path, existence_threshold: float | None) -> None:
    """One line per volume and sentence: the answer, or why nothing was drawn."""
    with open(listing, newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            if r["error"]:
                continue
            if r["present"] == "True":
                ml = f", {r['volume_ml']} ml" if r["volume_ml"] else ""
                ml += f", {r['diameter_mm']} mm across" if r["diameter_mm"] else ""
                print(f"{r['input']}: {r['text']!r}: one lesion of {r['voxels']} voxels{ml} (existence {r['score']}; "
                      f"{r['components']} candidate component(s), {r['kept']} kept)")
            else:
                why = (f"existence {float(r['score']):.3f} < {existence_threshold:.3f}" if r["components"] != "0"
                       and existence_threshold is not None else "no voxel above the threshold")
                print(f"not found: {r['text']!r} in {r['input']} ({why}): no mask drawn")


def predict_jobs(predictor: Predictor, jobs: list[Job], out: Path, probability: bool = False,
                 features: bool = False, batch_size: int = 8, volume_mode: VolumeMode = "3d",
                 formats: tuple[str, ...] = ("nifti",), progress: bool = True) -> list[dict[str, Any]]:
    """Run every job and write its files; returns the rows of ``predictions.csv`` (one per image or slice and
    sentence). Volumes also get one row per sentence in ``volumes.csv`` (see :func:`_predict_volume`).

    An input that cannot be read or predicted is skipped with a warning and listed with its ``error``; the
    others are still written. Inputs are read one at a time, so memory stays that of one image (or of one
    volume's probabilities: 4 bytes per voxel and sentence) however many inputs there are.

    Args:
        batch_size: slices of a volume per forward pass.
        volume_mode: how a volume's slices become one answer (:func:`lsms.volumes.assemble`).
        formats: mask files of a volume with geometry: ``"nifti"`` and/or ``"dicom-seg"`` (DICOM series only).
        progress: a progress bar over each volume's slices (on a terminal).
    """
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    volume_rows: list[dict[str, Any]] = []
    used: set[str] = set()
    options = dict(probability=probability, features=features)
    for job in jobs:
        if job.error is not None:
            rows.extend(_failed(job, None, job.error))
            continue
        stem = _unique(_stem(job.path), used)
        if job.slices is None:
            try:
                image = read_image(job.path)
                rows.extend(_image_rows(predictor, job, image, stem, out, **options))
            except (ValueError, OSError, RuntimeError) as err:
                rows.extend(_failed(job, None, _naming(job.path, None, err)))
            continue
        try:
            slice_rows, answers = _predict_volume(predictor, job, stem, out, batch_size, volume_mode, formats, progress,
                                                  **options)
        except (ValueError, OSError, RuntimeError) as err:  # incl. an output volume above max_volume_voxels
            failed = _failed(job, None, _naming(job.path, None, err))
            rows.extend(failed)
            volume_rows.extend(failed)
            continue
        rows.extend(slice_rows)
        volume_rows.extend(answers)
    _write_csv(rows, out / "predictions.csv", PREDICTION_COLUMNS)
    if volume_rows:
        _write_csv(volume_rows, out / "volumes.csv", VOLUME_COLUMNS)
    return rows


def _predict_volume(predictor: Predictor, job: Job, stem: str, out: Path, batch_size: int, mode: VolumeMode,
                    formats: tuple[str, ...], progress: bool, **options: bool
                    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A volume's slices in batches, one answer per sentence (:func:`lsms.volumes.assemble`), its files written.

    Returns the per-slice rows of ``predictions.csv`` (``found``: the slice's own existence decision; ``area_px``:
    the answer's area on the slice) and the per-sentence rows of ``volumes.csv``. Overlays (and ``--features``)
    are drawn for the slices the answer covers; ``--probability`` maps for every slice.
    """
    assert job.slices is not None
    with tempfile.TemporaryDirectory(dir=out, prefix=".unpacked-") as scratch:
        return _volume_answers(predictor, job, open_volume_unpacked(job.path, Path(scratch)), stem, out, batch_size, mode,
                               formats, progress, **options)


def _volume_answers(predictor: Predictor, job: Job, volume: Volume, stem: str, out: Path, batch_size: int,
                    mode: VolumeMode, formats: tuple[str, ...], progress: bool, **options: bool
                    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """:func:`_predict_volume` on the opened ``volume``."""
    from tqdm.auto import tqdm

    assert job.slices is not None
    first = volume.slice(job.slices[0])
    geometry, warning = first.geometry, predictor.check_input(first)
    ReadLimits.from_env().check(job.path, "max_volume_voxels", len(job.slices) * first.shape[0] * first.shape[1],
                                f"voxels of the probability volume of {len(job.slices)} slices")
    with tqdm(total=len(job.slices), unit="slice", desc=stem, leave=False, dynamic_ncols=True,
              disable=None if progress else True) as bar:
        answers = predictor.predict_volume(volume, job.slices, job.texts, batch_size, progress=bar.update)
    slice_rows: list[dict[str, Any]] = []
    volume_rows: list[dict[str, Any]] = []
    for j, (text, (prob, existence)) in enumerate(zip(job.texts, answers, strict=True)):
        answer = assemble(prob, existence, predictor.threshold, predictor.existence_threshold, mode, text,
                          voxel_spacing(geometry.spacing if geometry is not None else None))
        tag = stem if len(job.texts) == 1 else f"{stem}_t{j}"
        files = _write_volume_answer(answer.mask, job, geometry, tag, text, out, formats)
        for i, k in enumerate(job.slices):
            found = predictor.existence_threshold is None or existence[i] >= predictor.existence_threshold
            covered = bool(answer.mask[i].any())
            image = volume.slice(k) if covered else None
            name = f"{stem}_z{k:04d}" if len(job.texts) == 1 else f"{stem}_z{k:04d}_t{j}"
            slice_rows.append(_slice_row(predictor, job, image, k, text, answer.mask[i], prob[i], float(existence[i]),
                                         found, name, out, files.get("mask", files.get("seg")), covered, **options,
                                         warning=warning))
        summary = answer.summary(geometry.spacing if geometry is not None else None)
        volume_rows.append({"input": str(job.path), "slices": f"{job.slices[0]}:{job.slices[-1] + 1}", "text": text,
                            "warning": warning or "", "mode": mode, **summary, **files})
        del answer
    return slice_rows, volume_rows


def _write_volume_answer(mask: np.ndarray, job: Job, geometry: Geometry | None, tag: str, text: str, out: Path,
                         formats: tuple[str, ...]) -> dict[str, str]:
    """A volume's answer (bool (len(job.slices), H, W)) as files in the input's geometry: ``{"mask": NIfTI,
    "seg": DICOM-SEG}`` as ``formats`` ask; none for a volume without geometry (its slices get PNG masks)."""
    if geometry is None:
        return {}
    assert job.slices is not None
    files: dict[str, str] = {}
    if "nifti" in formats:
        slices = {k: mask[i] for i, k in enumerate(job.slices)}
        files["mask"] = str(write_volume_mask(slices, geometry, out / f"{tag}_mask.nii.gz"))
    if "dicom-seg" in formats:
        from lsms import __version__
        from lsms.data.formats.dicom_seg import write_dicom_seg

        full = np.zeros((geometry.size[2], *mask.shape[1:]), bool)  # (Z, H, W) of the whole series
        full[job.slices] = mask
        files["seg"] = str(write_dicom_seg(full, job.path, out / f"{tag}_seg.dcm", text, __version__))
    return files


def _image_rows(predictor: Predictor, job: Job, image: ImageData, stem: str, out: Path,
                probability: bool, features: bool) -> list[dict[str, Any]]:
    """A 2D image with every sentence of ``job``: its rows, with its files written."""
    rows = []
    for j, text in enumerate(job.texts):
        pred = predictor.predict(image, text, features=features)
        name = stem if len(job.texts) == 1 else f"{stem}_t{j}"
        rows.append(_slice_row(predictor, job, image, None, text, pred.mask, pred.probability, pred.existence, pred.found,
                               name, out, None, True, probability, features, pred.features, pred.warning))
    return rows


def _slice_row(predictor: Predictor, job: Job, image: ImageData | None, k: int | None, text: str, mask: np.ndarray,
               prob: np.ndarray, existence: float, found: bool, name: str, out: Path, mask_file: str | None,
               drawn: bool, probability: bool, features: bool, maps: list[np.ndarray] | None = None,
               warning: str | None = None) -> dict[str, Any]:
    """One image (or slice ``k``) and sentence: the row of ``predictions.csv``, its files written (the mask as PNG
    unless ``mask_file`` holds it; the overlay and feature maps where ``drawn``). ``warning``: the input is not
    the kind of image the model reads (:meth:`Predictor.check_input`), said in the row and the overlay."""
    row: dict[str, Any] = {"input": str(job.path), "slice": "" if k is None else k, "text": text,
                           "area_px": int(mask.sum()), "max_probability": float(prob.max()),
                           "existence": round(existence, 4), "found": found, "warning": warning or ""}
    if mask_file is not None:
        row["mask"] = mask_file
    else:
        row["mask"] = str(out / f"{name}_mask.png")
        save_mask_png(mask, row["mask"])
    if probability:
        row["probability"] = str(out / f"{name}_prob.png")
        Image.fromarray(np.round(prob * 255).astype(np.uint8)).save(row["probability"])
    if image is None or not drawn:
        return row
    caption = text if found else f"{text} (not found: existence {existence:.2f})"
    if warning:
        caption = f"MEANINGLESS (not the kind of image the model reads): {caption}"
    row["overlay"] = str(save_overlay(image.array, predictor.preprocessing, [mask], [caption],
                                      out / f"{name}_overlay.png"))
    if features:
        maps = maps if maps is not None else predictor.predict(image, text, features=True).features
        if maps is not None:
            row["features"] = str(save_feature_maps(image.array, predictor.preprocessing, maps,
                                                    out / f"{name}_features.png", caption=text))
    return row


def _failed(job: Job, k: int | None, message: str) -> list[dict[str, Any]]:
    log.warning("skipped: %s", message)
    return [{"input": str(job.path), "slice": "" if k is None else k, "text": t, "error": message} for t in job.texts]


PREDICTION_COLUMNS = ["input", "slice", "text", "warning", "found", "existence", "mask", "overlay", "probability", "features",
                      "area_px", "max_probability", "error"]
VOLUME_COLUMNS = ["input", "slices", "text", "warning", "mode", "present", "score", "voxels", "volume_ml",
                  "diameter_mm", "components", "kept",
                  "mask", "seg", "error"]


def _write_csv(rows: list[dict[str, Any]], path: Path, columns: list[str]) -> None:
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
