"""Negative expressions: sentences that describe a lesion which is *not* on the slice (empty target).

Three kinds, each a description that no lesion of the slice fits:

* ``type``: a lesion type that no lesion of the slice has, in the segment of a real lesion, with the
  appearance the generator would give that type ("a hemangioma in segment VI" beside a cyst in VI);
* ``location``: the type and appearance of a real lesion, in a visible liver segment that holds no lesion of
  that type;
* ``relation``: the type and appearance of a real lesion, next to the gallbladder or the IVC, where every
  lesion of that type lies at least :data:`FAR_MM` from that organ.

:func:`describes_nothing` is the one absence check; the generator rejects a draw it does not pass, and the
tests re-derive the lesions' facts from the written masks and apply it again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from lsms.synth.anatomy import SEGMENT_LOBE, SEGMENTS
from lsms.synth.expressions import FAR_MM, SLOTS, LesionFacts
from lsms.synth.lesions import draw_lesion

NEGATIVE_KINDS: tuple[str, ...] = ("type", "location", "relation")
NEGATIVE_WEIGHTS = (0.4, 0.4, 0.2)
MIN_SEGMENT_PX = 30  # a segment must show this many pixels on the slice to be named by a location negative
ORGAN_RELATIONS = {"near_gallbladder": "dist_gallbladder_mm", "near_ivc": "dist_ivc_mm"}


@dataclass
class Negative:
    """An absent lesion: what the sentence states about it."""

    kind: str  # one of NEGATIVE_KINDS
    facts: LesionFacts  # the described lesion (index 0: it has no mask)
    slots: list[str]  # stated slots (as in expressions.SLOTS, plus "relation")
    relation: dict[str, Any] | None


def describes_nothing(facts: list[LesionFacts], neg: Negative) -> bool:
    """Whether no lesion of ``facts`` fits the negative's type, location and relation.

    Appearance details (size, shape, ...) are not used to make a description absent: a negative must be
    absent by what a reader checks first (which type, where, next to what).
    """
    d = neg.facts
    for f in facts:
        fits = True
        if "type" in neg.slots:
            fits &= f.kind == d.kind
        if "location" in neg.slots:
            fits &= f.segment == d.segment
        if neg.relation is not None:
            fits &= getattr(f, ORGAN_RELATIONS[neg.relation["kind"]]) < FAR_MM
        if fits:
            return False
    return True


def _described(base: LesionFacts, kind: str, segment: str, looks: Any | None = None) -> LesionFacts:
    src = looks or base
    return LesionFacts(index=0, kind=kind, segment=segment, lobe=SEGMENT_LOBE[segment],
                       diameter_mm=base.diameter_mm, area_px=0, centroid=(float("nan"), float("nan")),
                       shape=src.shape, boundary=src.boundary, density=src.density, enhancement=src.enhancement,
                       dist_gallbladder_mm=float("inf"), dist_ivc_mm=float("inf"))


def draw_negative(facts: list[LesionFacts], segments: np.ndarray, lesion_types: tuple[str, ...],
                  liver_hu: float, vessel_hu: float, rng: np.random.Generator, kind: str | None = None
                  ) -> Negative | None:
    """One absent-lesion description for a slice with ``facts``; None when the drawn kind is impossible here.

    ``segments`` is the slice's Couinaud code map (anatomy.segments), ``liver_hu``/``vessel_hu`` the patient's;
    ``kind``: one of :data:`NEGATIVE_KINDS` (None: drawn with :data:`NEGATIVE_WEIGHTS`).
    """
    if not facts:
        return None
    if kind is None:
        kind = NEGATIVE_KINDS[int(rng.choice(len(NEGATIVE_KINDS), p=NEGATIVE_WEIGHTS))]
    elif kind not in NEGATIVE_KINDS:
        raise ValueError(f"negative kind must be one of {NEGATIVE_KINDS}, got {kind!r}")
    base = facts[int(rng.integers(len(facts)))]
    if kind == "type":
        absent = [t for t in lesion_types if t not in {f.kind for f in facts}]
        if not absent:
            return None
        other = absent[int(rng.integers(len(absent)))]
        looks = draw_lesion(other, base.diameter_mm, rng, liver_hu, vessel_hu)
        neg = Negative(kind, _described(base, other, base.segment, looks), list(SLOTS), None)
    elif kind == "location":
        codes, counts = np.unique(segments[segments > 0], return_counts=True)
        taken = {f.segment for f in facts if f.kind == base.kind}
        free = [SEGMENTS[c - 1] for c, n in zip(codes.tolist(), counts.tolist(), strict=True)
                if n >= MIN_SEGMENT_PX and SEGMENTS[c - 1] not in taken]
        if not free:
            return None
        segment = free[int(rng.integers(len(free)))]
        neg = Negative(kind, _described(base, base.kind, segment), list(SLOTS), None)
    else:
        names = [r for r, attr in ORGAN_RELATIONS.items()
                 if all(getattr(f, attr) >= FAR_MM for f in facts if f.kind == base.kind)]
        if not names:
            return None
        relation = {"kind": names[int(rng.integers(len(names)))], "among": "all", "count": len(facts)}
        slots = [s for s in SLOTS if s != "location"] + ["relation"]
        neg = Negative(kind, _described(base, base.kind, base.segment), slots, relation)
    return neg if describes_nothing(facts, neg) else None
