"""Off-slice negatives of RefLiver-Synth volumes: a slice paired with the volume sentence of a lesion of the same
volume that has no voxel on that slice, with an empty target.

A 2D model answers a volume-level sentence by being run on every slice of the volume; its per-slice answers are
assembled into one 3D answer (:func:`lsms.volumes.assemble`). On most slices the referred lesion is absent, and
many show no lesion at all, so the 2D training set has to hold that case: the sentence of lesion A on a slice
that shows lesion B, or nothing, with "not present" as the answer. These records give it.

Which pairs (``VolumeConfig.off_slice_negatives`` = K, train and val volumes only, :data:`OFF_SLICE_SPLITS`):

* the slices of the 2D set, and every :data:`BLANK_EVERY`-th slice without any lesion voxel between the first
  and the last slice that shows liver (written as 2D slices too, with no other record);
* on each, up to K lesions of the volume drawn without replacement among those with no voxel on the slice
  whose full volume sentence's type and location fit no lesion section visible on the slice
  (:func:`lsms.synth.negatives.describes_nothing` on the slice's sections: the sentence must not read as the
  description of a lesion the slice shows);
* slice ``k`` draws from its own stream ``(i, 0, OFF_SLICE_STREAM, k)``, so nothing else in the output changes.

Their counterpart (``VolumeConfig.on_slice_sentences``): each slice of the train and val volumes' 2D set paired
with the volume sentence of every lesion it describes, that lesion's section on the slice as the target, so
that the 2D model is trained on the sentences it is run with on a volume, on the slices where they have an
answer as well as on those where they have none.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lsms.synth.expressions import LesionFacts
from lsms.synth.negatives import Negative, describes_nothing

OFF_SLICE = "off_slice"  # the records' ``negative`` kind
OFF_SLICE_STREAM = 2000  # volume sub-stream of the off-slice draws (slice k: (OFF_SLICE_STREAM, k)); slices use 1000+k
OFF_SLICE_SPLITS = ("train", "val")  # test stays as it was, so that 2D test figures stay comparable
BLANK_EVERY = 4  # every 4th lesion-free slice of the liver's z-range is paired too


def blank_slices(instances: np.ndarray, liver: np.ndarray) -> list[int]:
    """Every :data:`BLANK_EVERY`-th slice (the first included) without a lesion voxel, between the first and the
    last slice of the (Z, H, W) ``liver`` mask that shows liver."""
    with_liver = np.flatnonzero(liver.any(axis=(1, 2)))
    if not len(with_liver):
        return []
    free = [k for k in range(int(with_liver[0]), int(with_liver[-1]) + 1) if not instances[k].any()]
    return free[::BLANK_EVERY]


def draw_off_slice(facts: list[LesionFacts], full_slots: list[list[str]], section: np.ndarray,
                   visible: list[LesionFacts], most: int, rng: np.random.Generator) -> list[int]:
    """Labels (ascending) of up to ``most`` volume lesions to pair with a slice.

    ``facts`` / ``full_slots``: the volume's lesions (3D facts, ``index`` = instance label) and the slots their
    full sentences state; ``section``: the slice's (H, W) instance map; ``visible``: the 2D facts of the
    sections it shows.
    """
    on_slice = {int(x) for x in np.unique(section) if x}
    candidates = [f.index for f, slots in zip(facts, full_slots, strict=True)
                  if f.index not in on_slice and describes_nothing(visible, Negative(OFF_SLICE, f, slots, None))]
    if not candidates:
        return []
    picked = rng.choice(len(candidates), size=min(most, len(candidates)), replace=False)
    return sorted(candidates[int(a)] for a in picked)


def volume_sentence_record(volume_record: dict[str, Any], common: dict[str, Any], mask: str, target: int = 0
                           ) -> dict[str, Any]:
    """The 2D record pairing a slice (``common``: its shared fields) with a volume lesion's record: its full
    sentence as ``text``, its levels that single the lesion out in the volume as ``texts`` (with their
    ``slots``), its paraphrases; ``attributes`` are the volume record's (3D measures).

    ``target`` 0: an off-slice negative (the lesion has no voxel on the slice): ``target_instance`` 0, the empty
    ``mask``, ``negative`` "off_slice" and ``off_slice_of`` the volume record's id. Else the lesion's label on a
    slice that shows it (``VolumeConfig.on_slice_sentences``): ``mask`` its section on the slice, ``on_slice_of``
    the volume record's id."""
    v = volume_record
    levels = [lvl for lvl in v["texts"] if lvl == "full" or v["unique"][lvl]]
    attributes = {**v["attributes"], "slots": {lvl: v["attributes"]["slots"][lvl] for lvl in levels}}
    of = {"on_slice_of": v["id"]} if target else {"negative": OFF_SLICE, "off_slice_of": v["id"]}
    return {"id": f"{common['slice_id']}_{'v' if target else 'o'}{v['target_instance']}", "mask": mask,
            "text": v["text"], "texts": {lvl: v["texts"][lvl] for lvl in levels}, "target_instance": target, **of,
            "attributes": attributes, **common, **({"variants": v["variants"]} if v.get("variants") else {})}
