"""Referring expressions: measured lesion facts -> relations -> uniqueness -> text at three levels.

All wording comes from a phrasing file (``phrasings.yaml`` in this package by default). The logic here only
decides *which* attribute slots an expression states and checks that the full expression picks out exactly
one lesion of the slice:

* a lesion ``j`` is *confusable* with the described lesion ``i`` under a slot set when every stated slot
  agrees with ``j`` (sizes agree when their ratio is under :data:`SIZE_DISTINCT`); a relation is true of one
  lesion only, so a stated relation always disambiguates;
* full expressions state every attribute and add a relation when the attributes alone are ambiguous (and
  sometimes anyway, so relations are common); half / quarter keep a random ~1/2 / ~1/4 of the slots and
  record whether they are still unique.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import yaml

SLOTS: tuple[str, ...] = ("type", "location", "size", "shape", "boundary", "density", "enhancement")
DETAIL_SLOTS: tuple[str, ...] = ("size", "shape", "boundary", "density", "enhancement")
SIZE_DISTINCT = 1.5  # stated sizes tell two lesions apart only when their diameters differ by this factor
RANK_RATIO = 1.25  # "the larger/largest ..." needs the runner-up to be this much smaller (by diameter)
POSITION_MARGIN_MM = 8.0  # "the most anterior/... " needs this lead over the runner-up (centroids)
NEAR_MM = 10.0  # "next to the gallbladder / IVC": outline within this distance ...
FAR_MM = 20.0  # ... and every other lesion at least this far
EXTRA_RELATION_P = 0.3  # chance of stating a (true) relation even when not needed

REQUIRED_KEYS = ("nouns", "generic", "segment_names", "segment", "lobe", "location", "size", "shape", "boundary",
                 "density", "enhancement", "relations", "frames", "numbers", "all_lesions")
RELATIONS = ("larger_of_type", "smaller_of_type", "largest", "smallest", "most_anterior", "most_posterior",
             "most_right", "most_left", "near_gallbladder", "near_ivc")


PACKAGED_PHRASINGS = ("phrasings.yaml", "phrasings-2.yaml", "phrasings-3.yaml", "phrasings-heldout.yaml")
TRAINING_PHRASINGS = PACKAGED_PHRASINGS[:3]  # what variants (train-time paraphrases) are written with
HELDOUT_PHRASING = "phrasings-heldout.yaml"  # never in training: the paraphrase test (docs/refliver-synth.md)


def phrasing_bytes(path: str | Path | None = None) -> tuple[bytes, str]:
    """The bytes of a phrasing file and where they came from. ``None`` is the packaged default; a name of
    :data:`PACKAGED_PHRASINGS` that is not a file here is the packaged file of that name."""
    if path is None:
        path = PACKAGED_PHRASINGS[0]
    p = Path(path)
    if not p.is_file() and str(path) in PACKAGED_PHRASINGS:
        return resources.files("lsms.synth").joinpath(str(path)).read_bytes(), f"{path} (packaged)"
    if not p.is_file():
        raise FileNotFoundError(f"--phrasing {path}: no such file; give a YAML/JSON file with the keys of "
                                f"lsms/synth/phrasings.yaml, or a packaged name ({', '.join(PACKAGED_PHRASINGS)})")
    return p.read_bytes(), str(p)


def load_phrasing(path: str | Path | None = None) -> dict[str, Any]:
    """Loads and checks a phrasing file (YAML or JSON); ``None`` gives the packaged default (see :func:`phrasing_bytes`)."""
    raw, source = phrasing_bytes(path)
    text = raw.decode("utf-8")
    data = yaml.safe_load(text)  # JSON is valid YAML
    if not isinstance(data, dict):
        raise ValueError(f"phrasing file {source} must hold a mapping of templates and synonyms")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise ValueError(f"phrasing file {source} lacks the keys {missing}; copy lsms/synth/phrasings.yaml and edit it")
    miss_rel = [r for r in RELATIONS if r not in data["relations"]]
    if miss_rel:
        raise ValueError(f"phrasing file {source} lacks relations {miss_rel}")
    data["numbers"] = {int(k): v for k, v in data["numbers"].items()}
    return data


@dataclass
class LesionFacts:
    """What is true of one lesion, measured from its mask (pixel units are (row, col))."""

    index: int  # instance label k
    kind: str
    segment: str
    lobe: str
    diameter_mm: float
    area_px: int
    centroid: tuple[float, float]
    shape: str
    boundary: str
    density: str
    enhancement: str
    dist_gallbladder_mm: float
    dist_ivc_mm: float
    relations: list[dict[str, Any]] = field(default_factory=list)


def true_relations(facts: list[LesionFacts], i: int, spacing: float) -> list[dict[str, Any]]:
    """Relations that hold for lesion ``i`` and for no other lesion of the slice."""
    me = facts[i]
    out: list[dict[str, Any]] = []
    n = len(facts)

    def ranks(group: list[LesionFacts], name_big: str, name_small: str, among: str) -> None:
        if len(group) < 2:
            return
        d = sorted((f.diameter_mm for f in group), reverse=True)
        if me.diameter_mm == d[0] and d[0] >= RANK_RATIO * d[1]:
            out.append({"kind": name_big, "among": among, "count": len(group)})
        if me.diameter_mm == d[-1] and d[-2] >= RANK_RATIO * d[-1]:
            out.append({"kind": name_small, "among": among, "count": len(group)})

    ranks([f for f in facts if f.kind == me.kind], "larger_of_type", "smaller_of_type", me.kind)
    ranks(facts, "largest", "smallest", "all")
    if n >= 2:
        for name, axis, sign in (("most_anterior", 0, -1), ("most_posterior", 0, 1), ("most_right", 1, -1),
                                 ("most_left", 1, 1)):
            mine = sign * me.centroid[axis]
            others = [sign * f.centroid[axis] for j, f in enumerate(facts) if j != i]
            if (mine - max(others)) * spacing >= POSITION_MARGIN_MM:
                out.append({"kind": name, "among": "all", "count": n})
    for name, attr in (("near_gallbladder", "dist_gallbladder_mm"), ("near_ivc", "dist_ivc_mm")):
        if getattr(me, attr) <= NEAR_MM and all(getattr(f, attr) >= FAR_MM for j, f in enumerate(facts) if j != i):
            out.append({"kind": name, "among": "all", "count": n})
    return out


def confusable(facts: list[LesionFacts], i: int, slots: list[str]) -> list[int]:
    """Indices of the other lesions that an expression stating ``slots`` about lesion ``i`` also fits."""
    if "relation" in slots:
        return []
    me = facts[i]
    out = []
    for j, f in enumerate(facts):
        if j == i:
            continue
        same = True
        for s in slots:
            if s == "type":
                same &= f.kind == me.kind
            elif s == "location":
                same &= f.segment == me.segment
            elif s == "size":
                big, small = max(f.diameter_mm, me.diameter_mm), min(f.diameter_mm, me.diameter_mm)
                same &= big < SIZE_DISTINCT * small
            else:
                same &= getattr(f, s) == getattr(me, s)
        if same:
            out.append(j)
    return out


def choose_slots(facts: list[LesionFacts], i: int, rng: np.random.Generator
                 ) -> tuple[dict[str, list[str]], dict[str, Any] | None] | None:
    """Slots of the full / half / quarter expressions and the stated relation; ``None`` if no unique full one."""
    full = list(SLOTS)
    relation = None
    rels = facts[i].relations
    if confusable(facts, i, full):
        if not rels:
            return None
        relation = rels[int(rng.integers(len(rels)))]
    elif rels and rng.random() < EXTRA_RELATION_P:
        relation = rels[int(rng.integers(len(rels)))]
    if relation is not None:
        full.append("relation")
    levels = {"full": full}
    for name, frac in (("half", 0.5), ("quarter", 0.25)):
        k = max(1, int(round(len(full) * frac)))
        pick = sorted(rng.choice(len(full), k, replace=False).tolist())
        levels[name] = [full[j] for j in pick]
    return levels, relation


def _pick(rng: np.random.Generator, options: list[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


def article(word: str) -> str:
    first = word.split()[0]
    if first.isupper() and len(first) > 1:  # acronym: read letter by letter
        return "an" if first[0] in "AEFHILMNORSX" else "a"
    return "an" if first[0].lower() in "aeiou" else "a"


def format_diameter(d_mm: float, rng: np.random.Generator) -> str:
    """7.5 mm below 1 cm; above, whole mm or cm with one decimal."""
    if d_mm < 10:
        return f"{d_mm:.1f} mm"
    if rng.random() < 0.5:
        return f"{int(np.floor(d_mm + 0.5))} mm"
    return f"{d_mm / 10:.1f} cm"


def _join(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _clean(text: str) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r"\s+([,.:])", r"\1", text)
    text = re.sub(r",\s*([,.])", r"\1", text)
    return text[0].upper() + text[1:]


def segment_phrase(ph: dict[str, Any], segment: str, rng: np.random.Generator) -> str:
    return _pick(rng, ph["segment"]).format(seg=_pick(rng, ph["segment_names"][segment]))


def render_expression(ph: dict[str, Any], f: LesionFacts, slots: list[str], relation: dict[str, Any] | None,
                      rng: np.random.Generator) -> str:
    """Writes one expression stating exactly ``slots`` about lesion ``f``."""
    noun, plural = _pick(rng, ph["nouns"][f.kind]) if "type" in slots else _pick(rng, ph["generic"])
    if "relation" in slots and relation is not None:
        tpl = ph["relations"][relation["kind"]]
        if isinstance(tpl, dict):
            tpl = tpl["two"] if relation["count"] == 2 else tpl["many"]
        type_plural = _pick(rng, ph["nouns"][f.kind])[1] if relation["among"] != "all" else plural
        chosen = _pick(rng, tpl)
        head = chosen.format(noun=noun, plural=type_plural,
                             count=ph["numbers"].get(relation["count"], str(relation["count"])))
        if "type" in slots and "{noun}" not in chosen and relation["among"] == "all":
            head += f", {article(noun)} {noun},"  # "the largest of the three lesions, a cyst, ..."
    else:
        head = f"{article(noun)} {noun}"
    location = ""
    if "location" in slots:
        location = _pick(rng, ph["location"]).format(segment=segment_phrase(ph, f.segment, rng),
                                                     lobe=_pick(rng, ph["lobe"][f.lobe]))
    details = []
    for s in DETAIL_SLOTS:
        if s not in slots:
            continue
        if s == "size":
            details.append(_pick(rng, ph["size"]).format(d=format_diameter(f.diameter_mm, rng)))
        else:
            details.append(_pick(rng, ph[s][getattr(f, s)]))
    if len(details) > 2:  # word order varies; the size (discriminative) stays first so truncation keeps it
        keep = 1 if "size" in slots else 0
        order = keep + rng.permutation(len(details) - keep)
        details = details[:keep] + [details[j] for j in order]
    frames = ph["frames"]["with_details" if details else "no_details"]
    if not location:
        frames = [fr for fr in frames if "{location_cap}" not in fr] or frames
    frame = _pick(rng, frames)
    text = frame.format(head=head[0].upper() + head[1:], head_lc=head[0].lower() + head[1:] if not head[:3].isupper() else head,
                        location=location, location_cap=location[:1].upper() + location[1:], details=_join(details))
    return _clean(text)


def render_all_text(ph: dict[str, Any], facts: list[LesionFacts], rng: np.random.Generator) -> str:
    """One sentence naming every lesion of the slice (type and segment), in instance order."""
    items = []
    for f in facts:
        noun = _pick(rng, ph["nouns"][f.kind])[0]
        items.append(ph["all_lesions"]["item"].format(article=article(noun), noun=noun,
                                                      segment=segment_phrase(ph, f.segment, rng)))
    n = len(facts)
    if n == 1:
        return _clean(_pick(rng, ph["all_lesions"]["one"]).format(items=items[0]))
    count = ph["numbers"].get(n, str(n))
    return _clean(_pick(rng, ph["all_lesions"]["many"]).format(items=_join(items), count=count,
                                                              count_cap=count[:1].upper() + count[1:]))
