"""Slice and dataset generation: anatomy + lesions + expressions -> files in the lsms dataset format.

Determinism: patient ``i`` draws from ``SeedSequence(seed, spawn_key=(i,))`` and its slice ``j`` from
``SeedSequence(seed, spawn_key=(i, j + 1))``, so any slice can be re-rendered alone (:func:`render_slice`) and
nothing depends on generation order. Files carry no timestamps; PNGs are written without time chunks.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from lsms.synth.anatomy import (
    SCANNERS,
    SEGMENT_LOBE,
    SEGMENTS,
    Anatomy,
    Patient,
    draw_patient,
    render_anatomy,
)
from lsms.synth.config import SynthConfig
from lsms.synth.expressions import (
    DETAIL_SLOTS,
    SLOTS,
    TRAINING_PHRASINGS,
    LesionFacts,
    choose_slots,
    confusable,
    load_phrasing,
    phrasing_bytes,
    render_all_text,
    render_expression,
    true_relations,
)
from lsms.synth.geometry import Grid
from lsms.synth.lesions import Lesion, draw_lesion, place_lesions, render_lesion, sample_diameter
from lsms.synth.negatives import NEGATIVE_KINDS, Negative, draw_negative

FORMAT_VERSION = 1
METASTATIC_PATTERN_P = 0.15  # multi-lesion slices made of metastases only ("often several")
PARTIAL_VOLUME_MM = 0.6  # Gaussian sigma of the slice-profile / partial-volume blur
Z_RANGE = (0.06, 0.94)  # levels between the liver dome (0) and the liver tip (1) that are sampled
EVAL_NEGATIVE_TRIES = 3  # draws of each kind of negative for a val/test slice before that kind is left out
DETAIL_DROP_P = 0.3  # a variant leaves out each detail (size, shape, ...) with this chance, if still unique


@dataclass
class SliceSample:
    """One generated slice with everything needed to write it and to check it."""

    slice_id: str
    patient: str
    z: float
    image: np.ndarray  # (H, W) int16 HU
    instances: np.ndarray  # (H, W) uint8, 0 background, k = lesion k
    anatomy: Anatomy
    facts: list[LesionFacts]
    lesions: list[Lesion]
    texts: list[dict[str, str]]
    unique: list[dict[str, bool]]
    slots: list[dict[str, list[str]]]
    stated_relations: list[list[dict[str, Any]]]  # the relation each full expression states (0 or 1)
    all_text: str
    variants: list[list[str]]  # paraphrases of each lesion's full expression (train-time text augmentation)
    negatives: list[NegativeExpression] = field(default_factory=list)  # described lesions not on the slice


@dataclass
class NegativeExpression:
    """A sentence about a lesion that is not on the slice, its paraphrases, and its record id's suffix."""

    negative: Negative
    text: str
    variants: list[str]
    suffix: str  # "_n" (a training share's one negative) or "_n_<kind>" (one of each kind, val and test)


def patient_rng(cfg: SynthConfig, i: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(i,)))


def slice_rng(cfg: SynthConfig, i: int, j: int, stream: int | None = None) -> np.random.Generator:
    """The slice's generator; ``stream`` 1 (variants), 2 (the negative share) and 3, 4, 5 (a negative of each
    kind) are separate streams, so that adding paraphrases or negatives changes no image, mask or template expression."""
    key = (i, j + 1) if stream is None else (i, j + 1, stream)
    return np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=key))


def load_paraphrasings(cfg: SynthConfig) -> list[dict[str, Any]]:
    """The phrasing files the variants are written with (the packaged training set by default)."""
    return [load_phrasing(path) for path in (cfg.paraphrasings or TRAINING_PHRASINGS)] if cfg.variants else []


def write_variants(phs: list[dict[str, Any]], f: LesionFacts, slots: list[str], relation: dict[str, Any] | None,
                   n: int, rng: np.random.Generator, still_true: Any) -> list[str]:
    """``n`` paraphrases of the expression stating ``slots`` about ``f``: each in a random phrasing of ``phs``,
    leaving out each detail with :data:`DETAIL_DROP_P` when ``still_true(slots)`` holds without it."""
    out = []
    for _ in range(n if phs else 0):
        ph = phs[int(rng.integers(len(phs)))]
        kept = [s for s in slots if s not in DETAIL_SLOTS or rng.random() >= DETAIL_DROP_P]
        out.append(render_expression(ph, f, kept if still_true(kept) else slots, relation, rng))
    return out


def patient_and_levels(cfg: SynthConfig, i: int) -> tuple[Patient, np.ndarray]:
    """Patient ``i`` and its slice levels (stratified over the liver, cranial -> caudal)."""
    rng = patient_rng(cfg, i)
    p = draw_patient(i, rng, cfg.noise_hu)
    k = cfg.slices_per_patient
    u = (np.arange(k) + rng.uniform(0.1, 0.9, k)) / k
    return p, Z_RANGE[0] + (Z_RANGE[1] - Z_RANGE[0]) * u


def negative_mode(cfg: SynthConfig, split: str) -> str:
    """How the slices of ``split`` get negatives (:func:`render_slice`'s ``negatives``)."""
    if not cfg.eval_negatives or split == "train":
        return "share"
    return "each-kind" if split == "test" else "one-kind"


def split_of_patients(cfg: SynthConfig) -> list[str]:
    """Split of each patient (by patient, never by slice), a seeded permutation."""
    n = cfg.patients
    order = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(2**31,))).permutation(n)
    n_val, n_test = int(round(n * cfg.val_share)), int(round(n * cfg.test_share))
    if n >= 3:
        n_val = max(n_val, int(cfg.val_share > 0))
        n_test = max(n_test, int(cfg.test_share > 0))
    while n_val + n_test >= n and (n_val or n_test):
        if n_test >= n_val and n_test:
            n_test -= 1
        else:
            n_val -= 1
    out = ["train"] * n
    for r, i in enumerate(order):
        if r < n_val:
            out[int(i)] = "val"
        elif r < n_val + n_test:
            out[int(i)] = "test"
    return out


def _boundary_px(mask: np.ndarray) -> np.ndarray:
    """(N, 2) pixels of ``mask`` with a 4-neighbour outside it (closest pairs of two sets lie on these)."""
    pad = np.pad(mask, 1)
    inner = pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:]
    return np.argwhere(mask & ~inner)


def min_distance_mm(a: np.ndarray, b: np.ndarray, spacing: float) -> float:
    """Smallest distance (mm) between pixel centres of two masks; inf when either is empty."""
    pa, pb = _boundary_px(a), _boundary_px(b)
    if not len(pa) or not len(pb):
        return float("inf")
    d2 = ((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1)
    return float(np.sqrt(d2.min())) * spacing


def lesion_facts(k: int, les: Lesion, mask: np.ndarray, anat: Anatomy, spacing: float) -> LesionFacts:
    """What is true of lesion ``les`` (label ``k``) on one slice, measured from its (H, W) ``mask``."""
    rows, cols = np.nonzero(mask)
    cr, cc = float(rows.mean()), float(cols.mean())
    code = int(anat.segments[int(round(cr)), int(round(cc))])
    seg = SEGMENTS[code - 1] if code else ""
    return LesionFacts(
        index=k, kind=les.kind, segment=seg, lobe=SEGMENT_LOBE.get(seg, ""),
        diameter_mm=lesion_diameter_mm(int(rows.size), spacing), area_px=int(rows.size),
        centroid=(cr, cc), shape=les.shape, boundary=les.boundary, density=les.density,
        enhancement=les.enhancement,
        dist_gallbladder_mm=min_distance_mm(mask, anat.gallbladder, spacing),
        dist_ivc_mm=min_distance_mm(mask, anat.ivc, spacing),
    )


def _facts(lesions: list[Lesion], anat: Anatomy, grid: Grid) -> list[LesionFacts]:
    return [lesion_facts(k, les, les.full_mask(grid.size), anat, grid.spacing) for k, les in enumerate(lesions, start=1)]


def lesion_diameter_mm(area_px: int, spacing: float) -> float:
    """Reported diameter: equivalent-circle diameter of the mask, rounded to 0.1 mm."""
    return round(2.0 * float(np.sqrt(area_px * spacing * spacing / np.pi)), 1)


def render_slice(cfg: SynthConfig, i: int, j: int, phrasing: dict[str, Any] | None = None,
                 patient: tuple[Patient, np.ndarray] | None = None,
                 paraphrasings: list[dict[str, Any]] | None = None, negatives: str = "share") -> SliceSample:
    """Renders slice ``j`` of patient ``i`` (deterministic in ``cfg.seed``, independent of other slices).

    ``phrasing`` / ``paraphrasings``: the loaded phrasing files (loaded from ``cfg`` when None).
    ``negatives``: ``share`` (one with probability ``cfg.negative_share``), ``each-kind`` (one of each kind the
    slice allows: the test split with ``cfg.eval_negatives``) or ``one-kind`` (the first kind the slice allows,
    starting from kind ``j % 3``: the val split).
    """
    ph = phrasing if phrasing is not None else load_phrasing(cfg.phrasing)
    phs = paraphrasings if paraphrasings is not None else load_paraphrasings(cfg)
    p, levels = patient if patient is not None else patient_and_levels(cfg, i)
    z = float(levels[j])
    rng = slice_rng(cfg, i, j)
    grid = Grid(cfg.image_size, cfg.spacing_mm)
    anat = render_anatomy(p, z, grid, rng)

    # --- lesions: count, types, sizes; placement largest first
    min_d = max(cfg.diameter_mm[0], 3 * cfg.spacing_mm)
    lesions = place_lesions(draw_lesions(cfg, p, rng), anat.liver, grid, rng, min_d)
    lesions.sort(key=lambda l_: (l_.y, l_.x))  # instance labels run anterior -> posterior

    # --- facts, relations, expressions; a lesion that cannot be described uniquely is removed
    while True:
        facts = _facts(lesions, anat, grid)
        for a, f in enumerate(facts):
            f.relations = true_relations(facts, a, grid.spacing)
        bad = undescribable(facts)
        if not bad:
            break
        del lesions[bad[-1]]
    ex = express_lesions(ph, facts, range(len(facts)), rng)
    assert len(ex.facts) == len(facts)  # every lesion is describable: guaranteed by the loop above
    all_text = render_all_text(ph, facts, rng) if facts else ""
    ex.write_variants(phs, cfg.variants, slice_rng(cfg, i, j, stream=1))
    sentences = negative_expressions(cfg, ph, phs, facts, anat.segments, p, negatives, j,
                                     partial(slice_rng, cfg, i, j))

    # --- picture: lesions, partial-volume blur, correlated noise, scanner drift
    img = anat.hu.copy()
    for les in lesions:
        render_lesion(img, les, grid)
    image = finish_picture(img, grid, p, rng)

    instances = np.zeros((grid.size, grid.size), dtype=np.uint8)
    for k, les in enumerate(lesions, start=1):
        assert les.window is not None and les.local_mask is not None
        instances[les.window][les.local_mask] = k
    return SliceSample(slice_id=f"p{i:04d}_s{j:02d}", patient=f"p{i:04d}", z=z, image=image, instances=instances,
                       anatomy=anat, facts=facts, lesions=lesions, texts=ex.texts, unique=ex.unique, slots=ex.slots,
                       stated_relations=ex.stated, all_text=all_text, variants=ex.variants, negatives=sentences)


def undescribable(facts: list[LesionFacts]) -> list[int]:
    """The lesions no full expression can single out (no segment, or every attribute shared and no relation)."""
    return [a for a, f in enumerate(facts) if not f.segment or (confusable(facts, a, list(SLOTS)) and not f.relations)]


def draw_lesions(cfg: SynthConfig, p: Patient, rng: np.random.Generator) -> list[Lesion]:
    """The lesions of one slice (or volume) before placement: count, types, sizes and looks."""
    multi = cfg.max_lesions >= 2 and rng.random() < cfg.multi_lesion_share
    n = int(rng.integers(2, cfg.max_lesions + 1)) if multi else 1
    if multi and "metastasis" in cfg.lesion_types and rng.random() < METASTATIC_PATTERN_P:
        kinds = ["metastasis"] * n
    else:
        kinds = [cfg.lesion_types[int(rng.integers(len(cfg.lesion_types)))] for _ in range(n)]
    return [draw_lesion(k, sample_diameter(k, rng, *cfg.diameter_mm), rng, p.hu["liver"], p.hu["vessel"]) for k in kinds]


def finish_picture(img: np.ndarray, grid: Grid, p: Patient, rng: np.random.Generator) -> np.ndarray:
    """Anatomy with lesions (float HU) -> the scanner's int16 HU slice: partial-volume blur, correlated noise,
    scanner drift."""
    img = gaussian_filter(img, PARTIAL_VOLUME_MM / grid.spacing, mode="nearest")
    scale, offset, corr_mm = SCANNERS[p.scanner]
    noise = gaussian_filter(rng.standard_normal(img.shape).astype(np.float32), corr_mm / grid.spacing, mode="wrap")
    noise *= p.noise_sigma / max(float(noise.std()), 1e-6)
    img = (img + noise) * scale + offset
    return np.clip(np.rint(img), -1024, 3071).astype(np.int16)


@dataclass
class Expressions:
    """The described lesions of a slice or volume and, aligned with them, their expressions."""

    facts: list[LesionFacts]
    others: list[LesionFacts]  # every lesion of the slice or volume (uniqueness is checked against these)
    at: list[int] = field(default_factory=list)  # index of each described lesion in ``others``
    texts: list[dict[str, str]] = field(default_factory=list)
    unique: list[dict[str, bool]] = field(default_factory=list)
    slots: list[dict[str, list[str]]] = field(default_factory=list)
    stated: list[list[dict[str, Any]]] = field(default_factory=list)
    variants: list[list[str]] = field(default_factory=list)

    def write_variants(self, phs: list[dict[str, Any]], n: int, rng: np.random.Generator) -> None:
        """``n`` paraphrases of each full expression (:func:`write_variants`), still unique among ``others``."""
        for a, f, sl, st in zip(self.at, self.facts, self.slots, self.stated, strict=True):
            self.variants.append(write_variants(phs, f, sl["full"], (st or [None])[0], n, rng,
                                                lambda kept, a=a: not confusable(self.others, a, kept)))


def express_lesions(ph: dict[str, Any], facts: list[LesionFacts], which: Any, rng: np.random.Generator
                    ) -> Expressions:
    """Full / half / quarter expressions of the lesions ``which`` (indices into ``facts``, whose relations are
    set) that can be told apart from every lesion of ``facts``; the others are left out."""
    ex = Expressions(facts=[], others=facts)
    for a in which:
        chosen = choose_slots(facts, a, rng)
        if chosen is None:
            continue
        levels_, relation = chosen
        ex.at.append(a)
        ex.facts.append(facts[a])
        ex.stated.append([relation] if relation is not None else [])
        ex.texts.append({lvl: render_expression(ph, facts[a], s, relation, rng) for lvl, s in levels_.items()})
        ex.unique.append({lvl: not confusable(facts, a, s) for lvl, s in levels_.items()})
        ex.slots.append(levels_)
    return ex


def negative_expressions(cfg: SynthConfig, ph: dict[str, Any], phs: list[dict[str, Any]], facts: list[LesionFacts],
                         segments: np.ndarray, p: Patient, mode: str, turn: int, stream_rng: Any
                         ) -> list[NegativeExpression]:
    """The negative sentences of a slice (or volume) with lesions ``facts`` and Couinaud map ``segments``.

    ``mode``: ``share`` (one with probability ``cfg.negative_share``), ``each-kind`` (one of each kind the
    slice allows) or ``one-kind`` (the first kind it allows, starting from kind ``turn % 3``).
    ``stream_rng(stream=s)``: the slice's separate random stream ``s`` (2: the share; 3, 4, 5: each kind).
    """
    def express(neg: Negative | None, nrng: np.random.Generator, suffix: str) -> list[NegativeExpression]:
        if neg is None:
            return []
        text = render_expression(ph, neg.facts, neg.slots, neg.relation, nrng)
        return [NegativeExpression(neg, text, write_variants(phs, neg.facts, neg.slots, neg.relation, cfg.variants,
                                                            nrng, lambda kept: True), suffix)]

    sentences: list[NegativeExpression] = []
    draw = partial(draw_negative, facts, segments, cfg.lesion_types, p.hu["liver"], p.hu["vessel"])
    if mode in ("each-kind", "one-kind"):
        n = len(NEGATIVE_KINDS)
        for k in sorted(range(n), key=lambda k: (k - turn) % n if mode == "one-kind" else k) if facts else ():
            erng = stream_rng(stream=3 + k)  # one stream per kind: the same sentence in either mode
            neg = next((x for x in (draw(erng, NEGATIVE_KINDS[k]) for _ in range(EVAL_NEGATIVE_TRIES)) if x), None)
            sentences += express(neg, erng, f"_n_{NEGATIVE_KINDS[k]}")
            if sentences and mode == "one-kind":
                break
    elif mode == "share":
        nrng = stream_rng(stream=2)
        if facts and nrng.random() < cfg.negative_share:
            sentences += express(draw(nrng), nrng, "_n")
    else:
        raise ValueError(f"negatives must be 'share', 'each-kind' or 'one-kind', got {mode!r}")
    return sentences


def record_attributes(f: LesionFacts, slots: dict[str, list[str]], stated: list[dict[str, Any]], spacing: float
                ) -> dict[str, Any]:
    side = {"right": "right", "left": "left", "caudate": "middle"}[f.lobe]
    return {
        "type": f.kind, "segment": f.segment, "lobe": f.lobe, "side": side, "diameter_mm": f.diameter_mm,
        "area_px": f.area_px, "shape": f.shape, "boundary": f.boundary, "density": f.density,
        "enhancement": f.enhancement, "relations": stated, "relations_true": f.relations,
        "centroid": [round(f.centroid[0], 2), round(f.centroid[1], 2)],
        "centroid_mm": [round(f.centroid[0] * spacing, 1), round(f.centroid[1] * spacing, 1)],
        "slots": slots,
    }


def _save_png(path: Path, arr: np.ndarray) -> None:
    # PIL writes no tIME/tEXt chunks unless asked to: identical arrays give identical bytes.
    Image.fromarray(arr).save(path, format="PNG", compress_level=6)


def write_slice(out: Path, s: SliceSample, split: str, spacing: float) -> list[dict[str, Any]]:
    """Writes the slice's files and returns its manifest records (one per lesion expression, then the
    slice's negative expressions)."""
    np.save(out / "images" / f"{s.slice_id}.npy", s.image, allow_pickle=False)
    _save_png(out / "instances" / f"{s.slice_id}.png", s.instances)
    _save_png(out / "all" / f"{s.slice_id}.png", np.where(s.instances > 0, 255, 0).astype(np.uint8))
    common = slice_common(s, split, spacing)
    records = []
    for f, texts, unique, slots, stated, variants in zip(s.facts, s.texts, s.unique, s.slots, s.stated_relations,
                                                          s.variants, strict=True):
        rid = f"{s.slice_id}_l{f.index}"
        _save_png(out / "masks" / f"{rid}.png", np.where(s.instances == f.index, 255, 0).astype(np.uint8))
        records.append({
            "id": rid, "mask": f"masks/{rid}.png", "text": texts["full"], "texts": texts, "target_instance": f.index,
            "attributes": record_attributes(f, slots, stated, spacing), "unique": unique, **common,
            **({"variants": variants} if variants else {}),
        })
    for e in s.negatives:
        rid = f"{s.slice_id}{e.suffix}"
        _save_png(out / "masks" / f"{rid}.png", np.zeros_like(s.instances))
        records.append(negative_record(rid, f"masks/{rid}.png", e, spacing, common))
    return records


def slice_common(s: SliceSample, split: str, spacing: float) -> dict[str, Any]:
    """The fields every manifest record of slice ``s`` shares (its files, patient, split, level)."""
    return {"image": f"images/{s.slice_id}.npy", "instances": f"instances/{s.slice_id}.png",
            "spacing": [spacing, spacing], "patient": s.patient, "modality": "CT", "split": split,
            "all_mask": f"all/{s.slice_id}.png", "all_text": s.all_text, "slice_id": s.slice_id,
            "slice_level": round(s.z, 4), "n_lesions": len(s.facts)}


def write_empty_mask(out: Path, size: int) -> str:
    """Writes ``masks/empty.png`` (``size`` x ``size``, all 0), the one mask the records that share an empty
    target point at; returns its path relative to ``out``."""
    _save_png(out / EMPTY_MASK, np.zeros((size, size), dtype=np.uint8))
    return EMPTY_MASK


def negative_record(rid: str, mask: str, e: NegativeExpression, spacing: float, common: dict[str, Any]
                    ) -> dict[str, Any]:
    """The manifest record of a negative expression (empty ``mask``, ``target_instance`` 0)."""
    attributes = record_attributes(e.negative.facts, {"full": e.negative.slots}, [e.negative.relation] if
                                   e.negative.relation else [], spacing)
    for key in ("area_px", "centroid", "centroid_mm", "relations_true"):
        del attributes[key]  # the lesion does not exist: nothing measured
    return {"id": rid, "mask": mask, "text": e.text, "target_instance": 0, "negative": e.negative.kind,
            "attributes": attributes, **common, **({"variants": e.variants} if e.variants else {})}


def phrasing_digest(cfg: SynthConfig) -> str:
    return hashlib.sha256(phrasing_bytes(cfg.phrasing)[0]).hexdigest()[:16]


SLICE_DIRS = ("images", "masks", "instances", "all")  # the 2D dataset's folders
EMPTY_MASK = "masks/empty.png"  # one empty target shared by records that point at it (volumes' off-slice negatives)
_OUR_DIRS = (*SLICE_DIRS, "card", "volumes", "volume_masks", "dicom")
_OUR_FILES = ("manifest.jsonl", "volumes.jsonl", "dataset.json", "README.md")


def prepare_output(out: Path, overwrite: bool, dirs: tuple[str, ...] = SLICE_DIRS) -> None:
    """Makes ``out`` with ``dirs``; a folder that is not empty is refused unless ``overwrite``, which removes
    what an earlier ``lsms synth`` wrote there (2D or volumes) and nothing else."""
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"output folder {out} is not empty; choose a new folder or pass --overwrite")
        import shutil

        for d in _OUR_DIRS:
            shutil.rmtree(out / d, ignore_errors=True)
        for f in _OUR_FILES:
            (out / f).unlink(missing_ok=True)
    for d in dirs:
        (out / d).mkdir(parents=True, exist_ok=True)


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    """One JSON object per line (sorted keys), written to a temporary file and then ``os.replace``d."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, sort_keys=True) + "\n")
    os.replace(tmp, path)


def generate_dataset(cfg: SynthConfig, out: str | Path, *, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Generates the whole dataset into ``out`` and returns the summary written to ``dataset.json``."""
    from lsms.synth.card import write_card

    out = Path(out)
    ph = load_phrasing(cfg.phrasing)
    prepare_output(out, overwrite)
    splits = split_of_patients(cfg)
    total = cfg.patients * cfg.slices_per_patient
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="slice", desc="lsms synth")
    phs = load_paraphrasings(cfg)
    records: list[dict[str, Any]] = []
    lesion_counts: list[int] = []
    for i in range(cfg.patients):
        pl = patient_and_levels(cfg, i)
        for j in range(cfg.slices_per_patient):
            s = render_slice(cfg, i, j, ph, patient=pl, paraphrasings=phs, negatives=negative_mode(cfg, splits[i]))
            records.extend(write_slice(out, s, splits[i], cfg.spacing_mm))
            lesion_counts.append(len(s.facts))
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    write_jsonl(out / "manifest.jsonl", records)
    summary = dataset_summary(cfg, records, lesion_counts, splits)
    (out / "dataset.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    write_card(out, cfg, records, summary)
    return summary


def dataset_summary(cfg: SynthConfig, records: list[dict[str, Any]], lesion_counts: list[int], splits: list[str]
                    ) -> dict[str, Any]:
    """What ``dataset.json`` says of a 2D dataset: settings, seed, phrasing digest and counts."""
    from lsms import __version__

    counts = np.bincount(lesion_counts, minlength=cfg.max_lesions + 1)
    return {
        "name": "RefLiver-Synth", "format_version": FORMAT_VERSION, "lsms_version": __version__,
        "settings": cfg.to_dict(), "seed": cfg.seed, "phrasing_sha256": phrasing_digest(cfg),
        "spacing_mm": cfg.spacing_mm, "convention": "radiological: image left = patient's right, top = anterior",
        "counts": {
            "patients": cfg.patients, "slices": len(lesion_counts), "expressions": len(records),
            "negative_expressions": sum("negative" in r for r in records),
            "slices_by_lesion_count": {str(k): int(c) for k, c in enumerate(counts)},
            "multi_lesion_share": float((np.asarray(lesion_counts) >= 2).mean()) if lesion_counts else 0.0,
            "splits": {sp: {"patients": splits.count(sp),
                            "expressions": sum(r["split"] == sp for r in records)} for sp in ("train", "val", "test")},
        },
    }


def facts_of(attributes: dict[str, Any], index: int) -> LesionFacts:
    """The :class:`LesionFacts` an expression was written from, back from a record's ``attributes``."""
    a = attributes
    return LesionFacts(index=index, kind=a["type"], segment=a["segment"], lobe=a["lobe"], diameter_mm=a["diameter_mm"],
                       area_px=a.get("area_px", 0), centroid=tuple(a.get("centroid", (float("nan"),) * 2)),
                       shape=a["shape"], boundary=a["boundary"], density=a["density"], enhancement=a["enhancement"],
                       dist_gallbladder_mm=float("inf"), dist_ivc_mm=float("inf"))


def rephrase_dataset(folder: str | Path, phrasing: str | Path, seed: int = 0) -> Path:
    """Writes ``folder/manifest-<phrasing name>.jsonl``: every record of the dataset's manifest with its
    expressions (full, half, quarter; negatives too) rewritten in the wording of ``phrasing`` from the same
    facts and the same stated slots and relation, and without ``variants``. Images, masks and the lesions
    described are unchanged, so a model can be evaluated on the same split in wording it never saw:
    ``lsms evaluate RUN folder/manifest-<name>.jsonl --split test``.
    """
    import zlib

    folder = Path(folder)
    src = folder / "manifest.jsonl"
    if not src.is_file():
        raise FileNotFoundError(f"{folder}: no manifest.jsonl; rephrase a folder written by 'lsms synth'")
    ph = load_phrasing(phrasing)
    out = folder / f"manifest-{Path(str(phrasing)).stem}.jsonl"
    tmp = out.with_name(f".{out.name}.tmp")
    with open(src, encoding="utf-8") as fin, open(tmp, "w", encoding="utf-8") as fout:
        for n, line in enumerate(fin, start=1):
            r = json.loads(line)
            a = r.get("attributes")
            if not isinstance(a, dict) or "slots" not in a:
                raise ValueError(f"{src}, line {n}: no RefLiver-Synth attributes (with 'slots') to rephrase from")
            rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(zlib.crc32(r["id"].encode()),)))
            facts = facts_of(a, int(r.get("target_instance") or 0))
            relation = (a.get("relations") or [None])[0]
            texts = {level: render_expression(ph, facts, slots, relation, rng) for level, slots in a["slots"].items()}
            r["text"] = texts["full"]
            if "texts" in r:
                r["texts"] = texts
            r.pop("variants", None)
            fout.write(json.dumps(r, sort_keys=True) + "\n")
    os.replace(tmp, out)
    return out
