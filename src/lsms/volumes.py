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
   lesion. The component with the highest score is kept (a tie: the first in scan order); the others are
   dropped. The score does not grow with a component's size or length: a sum of ``e_z * p(v)`` over its voxels
   (the rule before) let a large or long structure that the model marks faintly on many slices (another
   lesion, the gallbladder) outweigh the named lesion (docs/volumes.md, measured).
4. **Is it there at all?** The volume's existence score is the highest ``e_z`` over the slices the kept
   component spans (with no component at all: over every slice; :func:`lsms.metrics.volume_existence`). Below
   ``existence_threshold`` the described lesion is "not found" and the mask is withheld (empty), as for a 2D
   image.

``mode="slices"`` is slice-by-slice prediction as it was before: each slice thresholded on its own, its mask
withheld where its own existence score is below the threshold; the volume's score is then the highest ``e_z``.

In both modes ``present`` says whether the answer holds a lesion (its mask is not empty).

Memory: the probabilities are one float32 (or float16) array (Z, H, W) given by the caller; the labels are one
int32 array of the same size; the scores are summed slice by slice, so nothing larger is allocated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

from lsms.metrics import check_threshold, volume_existence

VolumeMode = Literal["3d", "slices"]
VOLUME_MODES: tuple[str, ...] = get_args(VolumeMode)
CONNECTIVITY = 3  # scipy.ndimage.generate_binary_structure(3, 3): 26-connected voxels


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
        """The answer in plain values: present, score (4 decimals), voxels, volume_ml (None without a 3D voxel
        ``spacing`` in mm), components, kept."""
        voxels = int(self.mask.sum())
        ml = lesion_volume_ml(voxels, spacing)
        return {"present": self.present, "score": round(self.score, 4), "voxels": voxels,
                "volume_ml": None if ml is None else round(ml, 3), "components": self.components, "kept": self.kept}


def assemble(probability: np.ndarray, existence: np.ndarray, threshold: float = 0.5,
             existence_threshold: float | None = None, mode: VolumeMode = "3d") -> VolumeAnswer:
    """The one answer of a sentence for a volume from its per-slice probabilities (see the module docstring).

    Args:
        probability: float (Z, H, W) in [0, 1], the model's per-slice probabilities at the volume's size.
        existence: float (Z,), each slice's existence score.
        threshold: probability above which a voxel is a candidate (0 < threshold < 1).
        existence_threshold: existence score below which the lesion is "not found" (None: never).
        mode: ``"3d"`` (one connected lesion) or ``"slices"`` (each slice on its own).
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
    best = int(np.argmax(scores[1:])) + 1
    span = ndimage.find_objects(labels, max_label=best)[best - 1][0]  # the slices the component spans
    score = volume_existence(existence[span])
    present = existence_threshold is None or score >= existence_threshold
    mask = labels == best if present else np.zeros(probability.shape, bool)
    return VolumeAnswer(mask, present, score, n, int(present))


def lesion_volume_ml(voxels: int, spacing: tuple[float, ...] | None) -> float | None:
    """``voxels`` in millilitres for voxel ``spacing`` in mm (x, y, z); None without a 3D spacing."""
    if spacing is None or len(spacing) != 3:
        return None
    return voxels * float(np.prod(spacing)) / 1000.0
