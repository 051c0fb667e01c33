"""Evaluation metrics for referring lesion segmentation (spec 5).

Per image the prediction ``P`` is the binary mask ``sigmoid(logit) > 0.5`` (computed exactly as ``logit > 0``;
probabilities or boolean masks can be given instead, see ``pred_kind``) and ``G`` is the target:

- ``Dice = 2|P∩G| / (|P| + |G|)`` and ``IoU = |P∩G| / |P∪G|``, averaged over images: ``"Dice"``, ``"mIoU"``;
- overall (cumulative) IoU ``sum I / sum U`` over images: ``"oIoU"``;
- precision at IoU t for t in 0.5, 0.6, 0.7, 0.8, 0.9: share of images with ``IoU >= t``: ``"P@0.5"`` ...;
- referring accuracy from instance label maps: share of expressions whose prediction overlaps the referred
  instance more than any other instance of the image (``"referring_accuracy"`` over images with at least one
  instance, ``"referring_accuracy_multi"`` over images with at least two).

Empty targets follow a named policy (:data:`EmptyPolicy`):

- ``"one"``: empty target and empty prediction score Dice = IoU = 1; a non-empty prediction on an empty target
  scores 0 (as its intersection is 0). Same as MONAI ``DiceMetric`` / ``MeanIoU`` with ``ignore_empty=False``.
- ``"skip"``: images with an empty target are left out of every mean (Dice, mIoU, oIoU, P@t). Same as MONAI
  ``DiceMetric`` / ``MeanIoU`` with ``ignore_empty=True`` (NaN per image, NaNs left out of the mean).

With a non-empty target both definitions are MONAI's ``compute_dice`` / ``compute_iou``
(``tests/test_metrics.py`` checks the equality). They are computed here in plain torch because the per-sample
records need the raw counts (intersection, union, areas) and ``import monai`` costs seconds.

Existence (does the sentence match a lesion of the image at all?): each record may carry ``existence``, the
model's score that the described lesion is present (:func:`existence_probability`: the existence head's
probability, or without the head the highest mask probability; docs/model.md, "Not present").
:func:`existence_summary` reports, over images with a non-empty target (positives) and with an empty one
(negatives: the sentence describes a lesion that is not there), the ROC AUC of the score with a 95 % bootstrap
interval, the share of
negatives on which a mask is drawn at a threshold, the share of positives without one, and the Dice of the
positives when masks below the threshold are withheld, also per kind of negative where the records name it
(``negative``: how the sentence misses); :func:`choose_existence_threshold` picks the threshold
on a validation split (the highest that costs the positives at most half a point of Dice).

Volumes (RefLiver-Synth ``volumes.jsonl``, docs/refliver-synth.md): :func:`volume_scores` scores a predicted
3D mask (Z, H, W) against the referred instance of a 3D instance map, in plain numpy, as one
:class:`SampleRecord` (areas are voxel counts), so :func:`summarize` gives the 3D Dice, mIoU and P@t over
expressions and the 3D referring accuracy (``referring_accuracy_multi``: volumes with 2+ lesions);
:func:`volume_existence` turns per-slice existence scores into the volume's.

Distributed evaluation: :func:`sample_scores` turns a batch into per-sample records (plain Python values, so
they can be gathered with ``torch.distributed.all_gather_object``); :func:`summarize` aggregates records from
all ranks once, dropping repeated ids (a ``DistributedSampler`` pads the last batch with repeats). Sums use
``math.fsum``, so the summary does not depend on the order of the records.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Iterable, Sequence
from typing import Literal, TypedDict, get_args

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "IOU_THRESHOLDS",
    "SCORE_NAMES",
    "SIZE_BANDS_MM",
    "EmptyPolicy",
    "MetricAccumulator",
    "PredKind",
    "SampleRecord",
    "bands_in_order",
    "binarize",
    "check_threshold",
    "choose_existence_threshold",
    "existence_probability",
    "existence_score",
    "existence_summary",
    "sample_scores",
    "size_band",
    "summarize",
    "volume_existence",
    "volume_scores",
]

EmptyPolicy = Literal["one", "skip"]
PredKind = Literal["logits", "probs", "mask"]
IOU_THRESHOLDS: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)
SIZE_BANDS_MM: tuple[float, ...] = (15.0, 25.0, 35.0)  # edges of the by-size keys: < 15, 15-25, 25-35, >= 35 mm
# the scores :func:`summarize` reports (higher is better): what a run may pick its best checkpoint by
SCORE_NAMES: tuple[str, ...] = ("Dice", "mIoU", "oIoU", *(f"P@{t:g}" for t in IOU_THRESHOLDS), "referring_accuracy",
                                "referring_accuracy_multi")


class SampleRecord(TypedDict):
    """Scores of one image / expression (plain Python values).

    ``dice`` and ``iou`` are None when both the prediction and the target are empty (0/0); the empty policy
    of :func:`summarize` decides what that counts as. ``referred_hit`` is None when no instance map was given
    or the expression refers to no instance. Evaluation adds ``existence`` (float), the model's score that the
    described lesion is present, where the model gives one, and ``negative`` (str), how a negative expression
    misses, where its record says so, and ``diameter_mm`` (float), the referred lesion's largest diameter, where
    its record says so (RefLiver-Synth's ``attributes.diameter_mm``).
    """

    id: str | int
    dice: float | None
    iou: float | None
    intersection: int
    union: int
    pred_area: int
    target_area: int
    n_instances: int
    referred_hit: bool | None


def check_threshold(value: float, what: str = "threshold", low_inclusive: bool = False) -> float:
    """The one probability-threshold check (:func:`binarize`, the predictor, the backends, the commands, the
    viewer): strictly inside (0, 1), or [0, 1) with ``low_inclusive`` (an existence threshold of 0 never
    withholds a mask). Returns the value as a float."""
    number = isinstance(value, numbers.Real) and not isinstance(value, bool)  # NumPy scalars too
    if not number or not ((0.0 <= value < 1.0) if low_inclusive else (0.0 < value < 1.0)):
        bounds = "in [0, 1) (0: never 'not found')" if low_inclusive else "strictly between 0 and 1"
        raise ValueError(f"{what} must lie {bounds}, got {value if number else repr(value)}")
    return float(value)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def binarize(pred: Tensor, pred_kind: PredKind = "logits", threshold: float = 0.5) -> Tensor:
    """Binary prediction mask from logits, probabilities or a mask.

    Args:
        pred: model output of any shape.
        pred_kind: ``"logits"`` (``sigmoid(pred) > threshold``, computed as ``pred > logit(threshold)``, i.e.
            ``pred > 0`` at 0.5, free of sigmoid rounding), ``"probs"`` (``pred > threshold``) or ``"mask"``
            (non-zero is foreground).
        threshold: probability threshold, in (0, 1).

    Returns:
        Bool tensor of the shape of ``pred``.
    """
    _check_choice("pred_kind", pred_kind, get_args(PredKind))
    check_threshold(threshold)
    if pred_kind == "mask":
        return pred != 0
    if pred_kind == "probs":
        return pred > threshold
    return pred > math.log(threshold / (1.0 - threshold))


def _as_maps(x: Tensor, name: str, shape: tuple[int, ...] | None = None) -> Tensor:
    """(B, 1, H, W) or (B, H, W) -> (B, H, W), checking the shape."""
    if x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 3:
        raise ValueError(f"{name} must have shape (B, 1, H, W) or (B, H, W), got {tuple(x.shape)}")
    if shape is not None and tuple(x.shape) != shape:
        raise ValueError(
            f"{name} must have shape (B, H, W) = {shape} (channel 1 optional), got {tuple(x.shape)}"
        )
    return x


def sample_scores(
    pred: Tensor,
    target: Tensor,
    ids: Sequence[str | int],
    instances: Tensor | None = None,
    target_instance: Tensor | Sequence[int] | None = None,
    *,
    pred_kind: PredKind = "logits",
    threshold: float = 0.5,
) -> list[SampleRecord]:
    """Per-sample records of one batch (spec 5).

    Args:
        pred: logits (default), probabilities or masks, (B, 1, H, W) or (B, H, W); see :func:`binarize`.
        target: binary target mask of the same shape.
        ids: one id per sample (unique over the whole evaluation set).
        instances: integer instance label map, (B, 1, H, W) or (B, H, W); 0 is background, each other value one
            lesion. None: no referring accuracy.
        target_instance: label of the referred instance per sample, (B,); 0 means the expression refers to no
            instance. None: the instance that overlaps the target most (0 if the target is empty).
        pred_kind: how to read ``pred``.
        threshold: probability threshold.

    Returns:
        One :class:`SampleRecord` per sample, in batch order. ``referred_hit`` is True when the prediction
        overlaps the referred instance by more pixels than any other instance (and by at least one pixel).
    """
    pred_mask = _as_maps(binarize(pred, pred_kind, threshold), "pred")
    b = pred_mask.shape[0]
    target_t = _as_maps(target, "target", tuple(pred_mask.shape))
    if not bool(((target_t == 0) | (target_t == 1)).all()):
        raise ValueError("target must be binary-valued (0 or 1), shape (B, 1, H, W) or (B, H, W)")
    target_mask = target_t.bool()
    if len(ids) != b:
        raise ValueError(f"ids must have one id per sample ({b}), got {len(ids)}")

    dims = (1, 2)
    inter = (pred_mask & target_mask).sum(dims).tolist()
    pred_area = pred_mask.sum(dims).tolist()
    target_area = target_mask.sum(dims).tolist()

    hits: list[bool | None] = [None] * b
    n_instances = [0] * b
    if instances is not None:
        inst = _as_maps(instances, "instances", tuple(pred_mask.shape))
        if inst.dtype.is_floating_point or inst.dtype == torch.bool or bool((inst < 0).any()):
            raise ValueError("instances must be a non-negative integer label map (0 = background)")
        inst = inst.long()
        if target_instance is not None:
            referred = torch.as_tensor(target_instance).long().flatten().tolist()
            if len(referred) != b:
                raise ValueError(f"target_instance must have shape ({b},), got {len(referred)} values")
        else:
            referred = [_dominant_label(inst[i][target_mask[i]]) for i in range(b)]
        for i in range(b):
            labels = inst[i].unique().tolist()
            labels = [lab for lab in labels if lab != 0]
            n_instances[i] = len(labels)
            if referred[i] == 0:
                continue
            if referred[i] not in labels:
                raise ValueError(
                    f"target_instance {referred[i]} of sample {ids[i]!r} is not in its instances map"
                )
            overlap = torch.bincount(inst[i][pred_mask[i]], minlength=int(inst[i].max()) + 1)  # (K+1,)
            overlap[0] = 0  # background does not compete
            ref = int(overlap[referred[i]])
            overlap[referred[i]] = -1
            hits[i] = ref > 0 and ref > int(overlap.max())

    records: list[SampleRecord] = []
    for i in range(b):
        union = pred_area[i] + target_area[i] - inter[i]
        records.append(
            SampleRecord(
                id=ids[i],
                dice=2 * inter[i] / (pred_area[i] + target_area[i]) if union > 0 else None,
                iou=inter[i] / union if union > 0 else None,
                intersection=inter[i],
                union=union,
                pred_area=pred_area[i],
                target_area=target_area[i],
                n_instances=n_instances[i],
                referred_hit=hits[i],
            )
        )
    return records


def _dominant_label(labels_in_target: Tensor) -> int:
    """Most frequent non-zero label under the target (smallest label on ties); 0 if none."""
    labels_in_target = labels_in_target[labels_in_target > 0]
    if labels_in_target.numel() == 0:
        return 0
    return int(torch.bincount(labels_in_target).argmax())


def _mean(values: list[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


def summarize(
    records: Iterable[SampleRecord],
    empty_policy: EmptyPolicy = "one",
    thresholds: Sequence[float] = IOU_THRESHOLDS,
) -> dict[str, float | int | str | None]:
    """Aggregate per-sample records (from one or all ranks) into the reported metrics (spec 5).

    Records with an id seen before are dropped (the first is kept). A metric with no image to average over
    is None.

    Args:
        records: outputs of :func:`sample_scores`.
        empty_policy: ``"one"`` or ``"skip"`` (see the module docstring).
        thresholds: IoU thresholds of the precision metrics.

    Returns:
        ``Dice``, ``mIoU``, ``oIoU`` (sum I / sum U; under ``"one"``, 1.0 when every scored image is empty in
        both), ``P@t`` for each threshold, ``referring_accuracy``, ``referring_accuracy_multi``, and the counts
        ``n_images`` (after de-duplication), ``n_scored`` (images in the means), ``n_empty_target``,
        ``n_empty_prediction``, ``n_both_empty``, ``n_referring``, ``n_referring_multi``, plus ``empty_policy``;
        where records give the referred lesion's ``diameter_mm``, the same by size band (:func:`size_band`):
        ``Dice_positive_of_size_B`` (mean Dice of the sentences that refer to a lesion of band ``B``),
        ``referring_accuracy_multi_of_size_B``, ``n_positive_of_size_B`` and ``n_referring_multi_of_size_B``.
    """
    _check_choice("empty_policy", empty_policy, get_args(EmptyPolicy))
    seen: set[str | int] = set()
    unique: list[SampleRecord] = []
    for rec in records:
        if rec["id"] not in seen:
            seen.add(rec["id"])
            unique.append(rec)

    scored = unique if empty_policy == "one" else [r for r in unique if r["target_area"] > 0]
    # Under "one" an undefined score (both empty) counts as 1; under "skip" no scored record is undefined.
    dice = [1.0 if r["dice"] is None else r["dice"] for r in scored]
    iou = [1.0 if r["iou"] is None else r["iou"] for r in scored]
    sum_union = sum(r["union"] for r in scored)
    if sum_union > 0:
        overall_iou: float | None = sum(r["intersection"] for r in scored) / sum_union
    else:
        overall_iou = 1.0 if scored else None

    hits = [r["referred_hit"] for r in unique if r["referred_hit"] is not None]
    hits_multi = _multi_lesion_hits(unique)

    summary: dict[str, float | int | str | None] = {
        "Dice": _mean(dice),
        "mIoU": _mean(iou),
        "oIoU": overall_iou,
    }
    for t in thresholds:
        summary[f"P@{t:g}"] = _mean([float(v >= t) for v in iou])
    summary.update(
        {
            "referring_accuracy": _mean([float(h) for h in hits]),
            "referring_accuracy_multi": _mean([float(h) for h in hits_multi]),
            "n_images": len(unique),
            "n_scored": len(scored),
            "n_empty_target": sum(r["target_area"] == 0 for r in unique),
            "n_empty_prediction": sum(r["pred_area"] == 0 for r in unique),
            "n_both_empty": sum(r["union"] == 0 for r in unique),
            "n_referring": len(hits),
            "n_referring_multi": len(hits_multi),
            "empty_policy": empty_policy,
        }
    )
    sized = [r for r in unique if r.get("diameter_mm") is not None and r["target_area"] > 0]
    bands = [size_band(r["diameter_mm"]) for r in sized]
    for band in (b for b in bands_in_order() if b in bands):
        of_band = [r for r, b in zip(sized, bands, strict=True) if b == band]
        multi = [float(h) for h in _multi_lesion_hits(of_band)]
        summary[f"Dice_positive_of_size_{band}"] = _mean([r["dice"] for r in of_band])
        summary[f"referring_accuracy_multi_of_size_{band}"] = _mean(multi)
        summary[f"n_positive_of_size_{band}"] = len(of_band)
        summary[f"n_referring_multi_of_size_{band}"] = len(multi)
    return summary


def _multi_lesion_hits(records: list[SampleRecord]) -> list[bool]:
    """``referred_hit`` of the records that refer to a lesion among 2+ (what ``referring_accuracy_multi`` averages)."""
    return [r["referred_hit"] for r in records if r["referred_hit"] is not None and r["n_instances"] >= 2]


def size_band(diameter_mm: float, edges: Sequence[float] = SIZE_BANDS_MM) -> str:
    """The name of the size band of a lesion ``diameter_mm`` across: ``lt15mm``, ``15-25mm``, ``25-35mm``,
    ``ge35mm`` for the default ``edges`` (a diameter on an edge belongs to the band above it)."""
    if diameter_mm < edges[0]:
        return f"lt{edges[0]:g}mm"
    for low, high in zip(edges, edges[1:]):
        if diameter_mm < high:
            return f"{low:g}-{high:g}mm"
    return f"ge{edges[-1]:g}mm"


def bands_in_order(edges: Sequence[float] = SIZE_BANDS_MM) -> list[str]:
    """:func:`size_band`'s names from the smallest lesions up."""
    return [size_band(e, edges) for e in (edges[0] - 1, *edges)]


def volume_scores(pred: np.ndarray, instances: np.ndarray, target_instance: int, id: str | int = 0) -> SampleRecord:
    """Scores of one expression on a volume: the prediction against the referred lesion in 3D.

    Args:
        pred: predicted mask (Z, H, W), bool (or 0/1 integers).
        instances: instance label map (Z, H, W), non-negative integers, 0 background.
        target_instance: label of the referred lesion; 0: the expression refers to no lesion (a negative,
            empty target).
        id: the record's id.

    Returns:
        A :class:`SampleRecord` with voxel counts: ``dice`` / ``iou`` of ``pred`` and ``instances ==
        target_instance`` (None when both are empty), ``n_instances`` the lesions of the volume, and
        ``referred_hit`` (None for a negative): the prediction overlaps the referred lesion by more voxels than
        any other lesion of the volume (and by at least one).
    """
    pred = np.asarray(pred)
    instances = np.asarray(instances)
    if pred.ndim != 3 or pred.shape != instances.shape:
        raise ValueError(f"pred and instances must both be (Z, H, W) volumes of one shape, got {pred.shape} and "
                         f"{instances.shape}")
    if pred.dtype != np.bool_:
        if not np.issubdtype(pred.dtype, np.integer) or not np.isin(pred, (0, 1)).all():
            raise ValueError(f"pred must be a boolean (or 0/1) mask, got dtype {pred.dtype}; threshold it first")
        pred = pred.astype(bool)
    if not np.issubdtype(instances.dtype, np.integer) or (instances < 0).any():
        raise ValueError(f"instances must be a non-negative integer label map (0 = background), got {instances.dtype}")
    counts = np.bincount(instances.ravel().astype(np.int64))  # (K+1,) voxels per label
    labels = np.flatnonzero(counts)
    labels = labels[labels > 0]
    target_instance = int(target_instance)
    if target_instance < 0 or (target_instance and target_instance not in labels):
        raise ValueError(f"target_instance {target_instance} of {id!r} is not a lesion of its instance map "
                         f"(labels {labels.tolist()}); 0 means a negative")
    target = instances == target_instance if target_instance else np.zeros(pred.shape, dtype=bool)
    inter = int((pred & target).sum())
    pred_area, target_area = int(pred.sum()), int(target.sum())
    union = pred_area + target_area - inter
    hit = None
    if target_instance:
        overlap = np.bincount(instances[pred].astype(np.int64), minlength=len(counts))  # (K+1,)
        overlap[0] = 0  # background does not compete
        ref = int(overlap[target_instance])
        overlap[target_instance] = -1
        hit = ref > 0 and ref > int(overlap.max())
    return SampleRecord(id=id, dice=2 * inter / (pred_area + target_area) if union else None,
                        iou=inter / union if union else None, intersection=inter, union=union, pred_area=pred_area,
                        target_area=target_area, n_instances=len(labels), referred_hit=hit)


def volume_existence(slice_scores: Sequence[float] | np.ndarray) -> float:
    """A volume's existence score from its slices' (:func:`existence_probability` per slice): the described
    lesion is in the volume when it is on some slice, so the highest; 0.0 for no slices."""
    scores = np.asarray(slice_scores, dtype=np.float64).ravel()
    if scores.size and not np.isfinite(scores).all():
        raise ValueError("slice existence scores must be finite numbers")
    return float(scores.max()) if scores.size else 0.0


class MetricAccumulator:
    """Collects :func:`sample_scores` records batch by batch and summarises them.

    Args:
        empty_policy: see :func:`summarize`.
        pred_kind: see :func:`binarize`.
        threshold: probability threshold.
    """

    def __init__(
        self, empty_policy: EmptyPolicy = "one", pred_kind: PredKind = "logits", threshold: float = 0.5
    ):
        _check_choice("empty_policy", empty_policy, get_args(EmptyPolicy))
        _check_choice("pred_kind", pred_kind, get_args(PredKind))
        check_threshold(threshold)
        self.empty_policy: EmptyPolicy = empty_policy
        self.pred_kind: PredKind = pred_kind
        self.threshold = threshold
        self.records: list[SampleRecord] = []

    def update(
        self,
        pred: Tensor,
        target: Tensor,
        ids: Sequence[str | int] | None = None,
        instances: Tensor | None = None,
        target_instance: Tensor | Sequence[int] | None = None,
    ) -> list[SampleRecord]:
        """Score one batch and keep its records; ``ids`` default to running integers. Returns the new records."""
        if ids is None:
            start = len(self.records)
            ids = list(range(start, start + pred.shape[0]))
        new = sample_scores(
            pred, target, ids, instances, target_instance, pred_kind=self.pred_kind, threshold=self.threshold
        )
        self.records.extend(new)
        return new

    def compute(self) -> dict[str, float | int | str | None]:
        """Summary of every record so far (see :func:`summarize`)."""
        return summarize(self.records, self.empty_policy)

    def reset(self) -> None:
        """Forget all records."""
        self.records = []


# --------------------------------------------------------------------------- existence ("not present")

# the lowest threshold that means anything: below it the mask (probability > 0.5) is empty anyway
MIN_EXISTENCE_THRESHOLD = 0.5
# what the threshold chosen on val may cost the positives (mean Dice): half of the 1 point the demo allows on
# test, so that the test split, which the threshold has not seen, stays within it
MAX_DICE_LOSS = 0.005


def existence_score(logits: Tensor) -> Tensor:
    """The existence score of each sample, (B,) from logits (B, 1, H, W): the highest mask probability.

    A calibration-free choice (no extra head): training with negative expressions (empty targets) teaches the
    model to keep every pixel below 0.5 when nothing matches, and the score orders how sure the most
    confident pixel is. docs/model.md has the measurements. A sample whose logits are NaN (a diverged model)
    scores 0, as its mask is empty.
    """
    # in float64: float32 rounds every logit above ~17 to 1.0, and ties would hide the order
    return torch.nan_to_num(torch.sigmoid(logits.detach().double().flatten(1).amax(1)), nan=0.0)


def existence_probability(logits: Tensor, existence: Tensor | None = None) -> Tensor:
    """The model's existence score of each sample, (B,): the existence head's probability when the model has
    the head (``existence``: its logits (B,)), else :func:`existence_score` of the mask ``logits``."""
    if existence is None:
        return existence_score(logits)
    return torch.nan_to_num(torch.sigmoid(existence.detach().double()), nan=0.0)


def _split_by_target(records: Iterable[SampleRecord], key: str = "existence"
                     ) -> tuple[list[SampleRecord], list[SampleRecord]]:
    seen: set[str | int] = set()
    pos, neg = [], []
    for r in records:
        if r["id"] in seen or key not in r:
            continue
        seen.add(r["id"])
        (pos if r["target_area"] > 0 else neg).append(r)
    return pos, neg


def _drawn(r: SampleRecord, threshold: float, key: str = "existence") -> bool:
    """Whether a mask is shown for this record: something predicted, and the score reaches the threshold."""
    return r["pred_area"] > 0 and r[key] >= threshold


def auroc_interval(positive: Sequence[float], negative: Sequence[float], level: float = 0.95,
                   resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the ROC AUC: positives and negatives resampled separately (seeded, so
    the same scores give the same interval)."""
    import numpy as np
    from scipy.stats import bootstrap, mannwhitneyu  # deferred on purpose: SciPy is only needed here

    def auc(p: np.ndarray, n: np.ndarray, axis: int = -1) -> np.ndarray:
        return mannwhitneyu(p, n, axis=axis).statistic / (p.shape[axis] * n.shape[axis])

    result = bootstrap((np.asarray(positive, float), np.asarray(negative, float)), auc, paired=False,
                       vectorized=True, n_resamples=resamples, confidence_level=level, method="percentile",
                       rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def existence_summary(records: Iterable[SampleRecord], threshold: float | None = None, key: str = "existence",
                      floor: float = MIN_EXISTENCE_THRESHOLD) -> dict[str, float | int | None]:
    """Existence metrics over records with an existence score (ids de-duplicated; see the module docstring).

    Args:
        records: :func:`sample_scores` records with the score ``key`` set.
        threshold: masks are withheld ("not found") below it; None: ``floor`` (for the highest-probability
            score, :data:`MIN_EXISTENCE_THRESHOLD`: any predicted pixel counts as found).
        key: the record field holding the score (``existence``, or ``existence_max_prob`` for the
            highest-probability score of a model with an existence head).

    Returns:
        ``existence_AUROC`` (None unless there are both positives and negatives) and its 95 % bootstrap interval
        ``existence_AUROC_low`` / ``existence_AUROC_high``, ``negative_mask_rate`` (negatives with a mask drawn),
        ``positive_miss_rate`` (positives without one), ``Dice_positive`` and ``Dice_positive_at_threshold``
        (mean Dice over positives, without and with the withholding), ``existence_threshold``, ``n_positive``,
        ``n_negative``; and for each kind ``K`` of negative the records name (their ``negative`` field: how the
        sentence misses, e.g. RefLiver-Synth's ``type``, ``location``, ``relation``) ``existence_AUROC_of_K`` (its
        negatives against every positive), ``negative_mask_rate_of_K`` and ``n_negative_of_K``.
    """
    t = floor if threshold is None else float(threshold)
    pos, neg = _split_by_target(records, key)
    auroc = _auroc(pos, neg, key)
    low = high = None
    if auroc is not None and len(pos) > 1 and len(neg) > 1:
        low, high = auroc_interval([r[key] for r in pos], [r[key] for r in neg])
    dice = [r["dice"] or 0.0 for r in pos]
    summary: dict[str, float | int | None] = {
        "existence_AUROC": auroc,
        "existence_AUROC_low": low,
        "existence_AUROC_high": high,
        "negative_mask_rate": _mean([float(_drawn(r, t, key)) for r in neg]),
        "positive_miss_rate": _mean([float(not _drawn(r, t, key)) for r in pos]),
        "Dice_positive": _mean(dice),
        "Dice_positive_at_threshold": _mean([d if _drawn(r, t, key) else 0.0 for d, r in zip(dice, pos, strict=True)]),
        "existence_threshold": t,
        "n_positive": len(pos),
        "n_negative": len(neg),
    }
    for kind in sorted({r["negative"] for r in neg if r.get("negative")}):
        of_kind = [r for r in neg if r.get("negative") == kind]
        name = re.sub(r"\W", "_", kind)
        summary[f"existence_AUROC_of_{name}"] = _auroc(pos, of_kind, key)
        summary[f"negative_mask_rate_of_{name}"] = _mean([float(_drawn(r, t, key)) for r in of_kind])
        summary[f"n_negative_of_{name}"] = len(of_kind)
    return summary


def _auroc(pos: list[SampleRecord], neg: list[SampleRecord], key: str) -> float | None:
    """P(score of a positive > score of a negative), ties counting 1/2; None without both."""
    if not pos or not neg:
        return None
    from scipy.stats import mannwhitneyu  # deferred on purpose: SciPy is only needed here

    return float(mannwhitneyu([r[key] for r in pos], [r[key] for r in neg]).statistic) / (len(pos) * len(neg))


def choose_existence_threshold(records: Iterable[SampleRecord], max_dice_loss: float = MAX_DICE_LOSS,
                               key: str = "existence", floor: float = MIN_EXISTENCE_THRESHOLD) -> float | None:
    """The highest threshold (>= ``floor``) at which the positives lose at most ``max_dice_loss`` of mean Dice
    to the withholding: it hides as many negatives' masks as that allows (the share of negatives with a mask
    only falls as the threshold rises). None without both positives and negatives to choose from. ``key`` and
    ``floor`` as in :func:`existence_summary` (an existence head's probability: floor 0)."""
    pos, neg = _split_by_target(records, key)
    if not pos or not neg:
        return None
    dice = [r["dice"] or 0.0 for r in pos]
    full = math.fsum(dice) / len(pos)
    best = floor
    for t in sorted({r[key] for r in pos + neg if r[key] > floor}):
        kept = math.fsum(d for d, r in zip(dice, pos, strict=True) if _drawn(r, t, key)) / len(pos)
        if full - kept <= max_dice_loss + 1e-12:
            best = t
    return float(best)
