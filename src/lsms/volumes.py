"""One answer per sentence for a volume: the 2D model's slices assembled into one 3D mask.

The model answers one slice at a time, and each slice picks its own lesion: "the larger cyst in segment VI" can
select one lesion on slice 40 and another on slice 41. :func:`assemble` turns the per-slice answers into one
answer for the volume (``mode="3d"``, the default of ``lsms predict``):

1. **Candidates.** Every voxel whose probability is above ``threshold`` (the same rule as a 2D mask).
2. **Lesions.** The candidates' 3D connected components (``scipy.ndimage.label``, 26-connectivity: voxels
   touching by a face, an edge or a corner are one lesion, so a lesion whose outline shifts between thick
   slices stays one).
3. **Which lesion the sentence refers to.** Each component ``c`` is scored by its best slice: on each slice ``z``
   it spans, the slice's existence score ``e_z`` (:func:`lsms.metrics.existence_probability`: the existence
   head's probability, or the highest mask probability for a model without the head) times the mean
   probability of the component's pixels there::

       score(c) = max over slices z of  e_z * mean of p(v) over the voxels v of c on slice z

   ``e_z`` reads as the chance that the named lesion is on slice ``z`` and the mean probability as how surely
   the component's pixels there are it, so ``score(c)`` is the component's clearest single view as the named
   lesion. The score does not grow with a component's size or length: a sum of ``e_z * p(v)`` over its voxels
   (the rule before) let a large or long structure that the model marks faintly on many slices (another
   lesion, the gallbladder) outweigh the named lesion (docs/volumes.md, measured).

   **The stated size** (``mode="3d"``, when the sentence states one size and the voxel spacing is known): a
   slice shows a section of a lesion, not its largest diameter, so the 2D model cannot read "27 mm"; the
   volume can. The score is multiplied by how well the component's largest 3D diameter ``d_c``
   (:func:`lsms.synth.geometry.max_diameter_mm`) fits the stated one ``d`` (:func:`stated_diameter_mm`)::

       fit(c) = exp(-(ln(d_c / d))^2 / (2 * SIZE_TOLERANCE^2))

   a log-normal tolerance: a component 1.5 times too large or too small keeps 85 % of its score, twice 61 %,
   three times 29 %.
   ``mode="3d-no-size"`` leaves the size out. The component with the highest score is kept (a tie: the first in
   scan order); the others are dropped.
4. **Is it there at all?** The volume's existence score is the highest ``e_z`` over the slices the kept
   component spans (with no component at all: over every slice; :func:`lsms.metrics.volume_existence`). Below
   ``existence_threshold`` the described lesion is "not found" and the mask is withheld (empty), as for a 2D
   image.

``mode="slices"`` is slice-by-slice prediction as it was before: each slice thresholded on its own, its mask
withheld where its own existence score is below the threshold; the volume's score is then the highest ``e_z``.

In every mode ``present`` says whether the answer holds a lesion (its mask is not empty).

Memory: the probabilities are one float32 (or float16) array (Z, H, W) given by the caller; the labels are one
int32 array of the same size; the scores are summed slice by slice, so nothing larger is allocated. A
diameter is measured only for the components that can still win (in the order of their score without the
size, which the fit can only lower), so many small specks cost nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

from lsms.metrics import check_threshold, volume_existence

VolumeMode = Literal["3d", "3d-no-size", "slices"]
VOLUME_MODES: tuple[str, ...] = get_args(VolumeMode)
CONNECTIVITY = 3  # scipy.ndimage.generate_binary_structure(3, 3): 26-connected voxels
# [decision] sigma of the stated size's fit, in ln(diameter): chosen on the val volumes of three models (docs/volumes.md)
SIZE_TOLERANCE = 0.7
_NUMBER = r"(\d+(?:\.\d+)?)"
_SIZE = re.compile(rf"{_NUMBER}(?:\s*[x\u00d7]\s*{_NUMBER})?(?:\s*[x\u00d7]\s*{_NUMBER})?\s*-?\s*"
                   r"(mm|cm|millimet(?:er|re)s?|centimet(?:er|re)s?)(?![a-z])", re.IGNORECASE)


@dataclass(frozen=True)
class VolumeAnswer:
    """One sentence's answer for a volume.

    Attributes:
        mask: bool (Z, H, W), the lesion the sentence refers to (empty when not present).
        present: the mask is not empty.
        score: the volume's existence score (see the module docstring), in [0, 1].
        components: 3D connected components among the voxels above the threshold.
        kept: components in ``mask`` (``"3d"``: 1, or 0 when not present; ``"slices"``: every one drawn).
    """

    mask: np.ndarray
    present: bool
    score: float
    components: int
    kept: int

    def summary(self, spacing: tuple[float, ...] | None = None) -> dict[str, bool | float | int | None]:
        """The answer in plain values: present, score (4 decimals), voxels, volume_ml and diameter_mm (its largest
        3D diameter; both None without a 3D voxel ``spacing`` in mm, x, y, z, or without a lesion), components,
        kept."""
        from lsms.synth.geometry import max_diameter_mm  # here, not above: lsms.synth costs an import 0.6 s

        voxels = int(self.mask.sum())
        ml = lesion_volume_ml(voxels, spacing)
        zyx = voxel_spacing(spacing)
        diameter = max_diameter_mm(self.mask, zyx) if zyx is not None and voxels else None
        return {"present": self.present, "score": round(self.score, 4), "voxels": voxels,
                "volume_ml": None if ml is None else round(ml, 3), "diameter_mm": diameter,
                "components": self.components, "kept": self.kept}


def assemble(probability: np.ndarray, existence: np.ndarray, threshold: float = 0.5,
             existence_threshold: float | None = None, mode: VolumeMode = "3d", text: str = "",
             spacing: tuple[float, float, float] | None = None) -> VolumeAnswer:
    """The one answer of a sentence for a volume from its per-slice probabilities (see the module docstring).

    Args:
        probability: float (Z, H, W) in [0, 1], the model's per-slice probabilities at the volume's size.
        existence: float (Z,), each slice's existence score.
        threshold: probability above which a voxel is a candidate (0 < threshold < 1).
        existence_threshold: existence score below which the lesion is "not found" (None: never).
        mode: ``"3d"`` (one connected lesion, the stated size read), ``"3d-no-size"`` (the same without the
            size) or ``"slices"`` (each slice on its own).
        text: the sentence; ``"3d"`` reads the size it states (:func:`stated_diameter_mm`).
        spacing: mm between voxel centres along Z, H and W (the reverse of a NIfTI's x, y, z); without it no
            size is read.
    """
    from scipy import ndimage

    check_threshold(threshold)
    if existence_threshold is not None:
        check_threshold(existence_threshold, "existence threshold", low_inclusive=True)
    if mode not in VOLUME_MODES:
        raise ValueError(f"volume mode must be one of {', '.join(VOLUME_MODES)}, got {mode!r}")
    probability = np.asarray(probability)
    existence = np.asarray(existence, dtype=np.float64)
    if probability.ndim != 3 or existence.shape != probability.shape[:1]:
        raise ValueError(f"probability must be (Z, H, W) and existence (Z,), got {probability.shape} and "
                         f"{existence.shape}")
    if spacing is not None and (len(spacing) != 3 or not all(np.isfinite(spacing)) or min(spacing) <= 0):
        raise ValueError(f"spacing must be three positive mm values (Z, H, W), got {spacing}")
    candidates = probability > threshold  # (Z, H, W)
    found = np.ones(len(existence), bool) if existence_threshold is None else existence >= existence_threshold
    if mode == "slices":
        mask = candidates & found[:, None, None]
        components = ndimage.label(mask, ndimage.generate_binary_structure(3, CONNECTIVITY))[1]
        return VolumeAnswer(mask, bool(mask.any()), volume_existence(existence), components, components)
    labels, n = ndimage.label(candidates, ndimage.generate_binary_structure(3, CONNECTIVITY))  # (Z, H, W) int32
    del candidates
    if n == 0:
        return VolumeAnswer(np.zeros(probability.shape, bool), False, volume_existence(existence), 0, 0)
    scores = np.zeros(n + 1)
    for z in range(labels.shape[0]):  # slice by slice: temporaries of one slice's candidates only
        lab = labels[z]
        inside = lab > 0
        if inside.any():
            mass = np.bincount(lab[inside], weights=probability[z][inside], minlength=n + 1)
            area = np.bincount(lab[inside], minlength=n + 1)
            scores = np.maximum(scores, existence[z] * mass / np.maximum(area, 1))
    boxes = ndimage.find_objects(labels)
    stated = stated_diameter_mm(text) if mode == "3d" and spacing is not None else None
    best = _best_component(scores[1:], boxes, labels, stated, spacing) if stated else int(np.argmax(scores[1:])) + 1
    score = volume_existence(existence[boxes[best - 1][0]])  # over the slices the component spans
    present = existence_threshold is None or score >= existence_threshold
    mask = labels == best if present else np.zeros(probability.shape, bool)
    return VolumeAnswer(mask, present, score, n, int(present))


def _best_component(scores: np.ndarray, boxes: list, labels: np.ndarray, stated: float,
                    spacing: tuple[float, float, float]) -> int:
    """The label (1..n) whose score times its fit to the ``stated`` diameter is highest; the fit is at most 1, so
    the components are visited by score and a diameter measured only while one can still win."""
    from lsms.synth.geometry import max_diameter_mm

    best, best_score = 0, -1.0
    for i in np.argsort(-scores, kind="stable"):  # ties: scan order
        if scores[i] <= best_score:
            break
        box = boxes[i]
        diameter = max(max_diameter_mm(labels[box] == i + 1, spacing), min(spacing))
        fitted = scores[i] * float(np.exp(-np.log(diameter / stated) ** 2 / (2 * SIZE_TOLERANCE ** 2)))
        if fitted > best_score:
            best, best_score = int(i) + 1, fitted
    return best


def stated_diameter_mm(text: str) -> float | None:
    """The one lesion size a sentence states, in mm: "27 mm", "2.7 cm", "27x18 mm" (the largest of the
    dimensions), "12 millimetres"; None when it states none, or several different ones (a size of another
    lesion beside it: which is meant is not for a pattern to guess)."""
    sizes = {max(float(v) for v in m.groups()[:3] if v) * (10.0 if m.group(4).lower().startswith("c") else 1.0)
             for m in _SIZE.finditer(text)}
    sizes.discard(0.0)
    return sizes.pop() if len(sizes) == 1 else None


def voxel_spacing(spacing: tuple[float, ...] | None) -> tuple[float, float, float] | None:
    """The mm between voxel centres along a (Z, H, W) array's axes from a NIfTI/DICOM geometry's spacing (x, y,
    z); None without a 3D spacing."""
    if spacing is None or len(spacing) != 3:
        return None
    return float(spacing[2]), float(spacing[1]), float(spacing[0])


def lesion_volume_ml(voxels: int, spacing: tuple[float, ...] | None) -> float | None:
    """``voxels`` in millilitres for voxel ``spacing`` in mm (x, y, z); None without a 3D spacing."""
    if spacing is None or len(spacing) != 3:
        return None
    return voxels * float(np.prod(spacing)) / 1000.0
