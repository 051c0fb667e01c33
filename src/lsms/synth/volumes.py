"""RefLiver-Synth volumes: one CT volume per patient with 3D lesion bodies, volume-level expressions, and the
2D slices of the volumes as an ordinary 2D training set beside them.

Geometry: slice ``k`` (0 = most caudal, the first along the slice normal; :mod:`lsms.synth.volume_files`) of a
volume of ``N`` slices ``slice_mm`` apart lies at the liver level ``z_k = 0.5 - (k + 0.5 - N / 2) * slice_mm /
LIVER_HEIGHT_MM`` (0 dome .. 1 tip, as :func:`render_anatomy` takes it) and is rendered by the 2D anatomy code. Lesions are bodies (:meth:`Lesion.section`) placed in 3D
(:func:`place_lesions_3d`); each slice shows their cross-sections with the 2D appearance code.

Determinism: the patient is ``SeedSequence(seed, spawn_key=(i,))`` as in 2D; slice ``k``'s anatomy and noise
draw from ``(i, k + 1)``; the volume's lesions and expressions from ``(i, 0)``, its variants and negatives from
``(i, 0, stream)``; the 2D expressions of slice ``k`` from ``(i, 0, SLICE_STREAM + k)`` and its variants and
negatives from ``(i, 0, SLICE_STREAM + k, stream)``; the off-slice negatives of slice ``k`` from
``(i, 0, OFF_SLICE_STREAM, k)`` (:mod:`lsms.synth.off_slice`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy.ndimage import distance_transform_edt

from lsms.synth.anatomy import SEGMENT_LOBE, SEGMENTS, Anatomy, Patient, draw_patient, render_anatomy
from lsms.synth.card import volume_card_lines, write_card
from lsms.synth.config import SynthConfig, VolumeConfig
from lsms.synth.expressions import LesionFacts, load_phrasing, render_all_text, true_relations
from lsms.synth.generate import (
    EMPTY_MASK,
    SLICE_DIRS,
    Expressions,
    NegativeExpression,
    SliceSample,
    dataset_summary,
    draw_lesions,
    express_lesions,
    finish_picture,
    lesion_facts,
    load_paraphrasings,
    negative_expressions,
    negative_mode,
    negative_record,
    patient_rng,
    prepare_output,
    record_attributes,
    slice_common,
    slice_rng,
    split_of_patients,
    undescribable,
    write_empty_mask,
    write_jsonl,
    write_slice,
)
from lsms.synth.geometry import Grid, max_diameter_mm
from lsms.synth.lesions import Lesion, place_lesions_3d, render_lesion, section_mask
from lsms.synth.off_slice import (
    OFF_SLICE,
    OFF_SLICE_SPLITS,
    OFF_SLICE_STREAM,
    blank_slices,
    draw_off_slice,
    volume_sentence_record,
)
from lsms.synth.volume_files import save_nifti, write_dicom_series

LIVER_HEIGHT_MM = 160.0  # cranio-caudal span of the liver levels 0 (dome) .. 1 (tip)
SLICE_STREAM = 1000  # first volume sub-stream of the 2D slices' expressions (slice k: SLICE_STREAM + k)
ORGAN_MARGIN_MM = 25.0  # distances to the gallbladder / IVC beyond this are reported as inf (all relations use < 20 mm)


@dataclass
class VolumeSample:
    """One generated volume with what is needed to write and to check it (arrays are (Z, H, W))."""

    volume_id: str
    patient: str
    levels: np.ndarray  # (Z,) liver level of each slice
    image: np.ndarray  # int16 HU
    instances: np.ndarray  # uint8, 0 background, k = lesion k
    liver: np.ndarray  # bool
    segments: np.ndarray  # uint8 Couinaud codes
    gallbladder: np.ndarray  # bool
    ivc: np.ndarray  # bool
    lesions: list[Lesion]
    expressions: Expressions  # volume-level, aligned with expressions.facts
    all_text: str
    negatives: list[NegativeExpression]
    slices: list[tuple[int, SliceSample]]  # (k, 2D sample) for the slices that show a described lesion
    blank: list[tuple[int, SliceSample]] = field(default_factory=list)  # lesion-free slices with off-slice negatives
    off_slice: dict[int, list[int]] = field(default_factory=dict)  # slice k -> labels of its off-slice negatives


def volume_levels(vcfg: VolumeConfig) -> np.ndarray:
    """Liver level of each slice (slice 0 caudal: levels fall from the tip towards the dome), centred on the liver."""
    k = np.arange(vcfg.slices, dtype=np.float64)
    return 0.5 - (k + 0.5 - vcfg.slices / 2) * vcfg.slice_mm / LIVER_HEIGHT_MM


def volume_rng(cfg: SynthConfig, i: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(i, 0, *stream)))


def organ_distance_mm(mask: np.ndarray, organ: np.ndarray, spacing: tuple[float, float, float]) -> float:
    """Smallest 3D distance (mm) between voxel centres of a lesion and an organ; inf beyond :data:`ORGAN_MARGIN_MM`."""
    zyx = np.argwhere(mask)
    pad = np.ceil(ORGAN_MARGIN_MM / np.asarray(spacing)).astype(int) + 1
    lo = np.maximum(zyx.min(0) - pad, 0)
    hi = np.minimum(zyx.max(0) + pad + 1, mask.shape)
    box = tuple(slice(a, b) for a, b in zip(lo.tolist(), hi.tolist(), strict=True))
    if not organ[box].any():
        return float("inf")
    d = float(distance_transform_edt(~organ[box], sampling=spacing)[mask[box]].min())
    return d if d <= ORGAN_MARGIN_MM else float("inf")


def volume_facts(lesions: list[Lesion], instances: np.ndarray, segments: np.ndarray, gallbladder: np.ndarray,
                 ivc: np.ndarray, spacing: tuple[float, float, float]) -> list[LesionFacts]:
    """What is true of each lesion in the volume: type and looks, the segment at its 3D centroid (the
    centroid slice's map), its largest 3D diameter, voxels, centroid (row, col) and 3D organ distances."""
    facts = []
    for k, les in enumerate(lesions, start=1):
        m = instances == k
        zyx = np.argwhere(m)
        cz, cr, cc = (float(v) for v in zyx.mean(0))
        code = int(segments[int(round(cz)), int(round(cr)), int(round(cc))])
        seg = SEGMENTS[code - 1] if code else ""
        facts.append(LesionFacts(
            index=k, kind=les.kind, segment=seg, lobe=SEGMENT_LOBE.get(seg, ""),
            diameter_mm=max_diameter_mm(m, spacing), area_px=len(zyx), centroid=(cr, cc), shape=les.shape,
            boundary=les.boundary, density=les.density, enhancement=les.enhancement,
            dist_gallbladder_mm=organ_distance_mm(m, gallbladder, spacing),
            dist_ivc_mm=organ_distance_mm(m, ivc, spacing),
        ))
    for a, f in enumerate(facts):
        f.relations = true_relations(facts, a, spacing[1])
    return facts


def _sections(lesions: list[Lesion], vcfg: VolumeConfig, grid: Grid
              ) -> tuple[np.ndarray, dict[tuple[int, int], Lesion]]:
    """The instance map (Z, H, W) of the bodies and their cross-sections {(slice, label): section}."""
    inst = np.zeros((vcfg.slices, grid.size, grid.size), dtype=np.uint8)
    sections: dict[tuple[int, int], Lesion] = {}
    for label, les in enumerate(lesions, start=1):
        for k in range(vcfg.slices):
            sec = les.section(k * vcfg.slice_mm)
            if sec is None:
                continue
            sec.window, sec.local_mask = section_mask(sec, grid)
            if sec.local_mask.any():
                inst[k][sec.window][sec.local_mask] = label
                sections[(k, label)] = sec
    return inst, sections


def render_volume(cfg: SynthConfig, vcfg: VolumeConfig, i: int, ph: dict[str, Any], phs: list[dict[str, Any]],
                  negatives: str = "share", off_slice: int = 0) -> VolumeSample:
    """Renders patient ``i``'s volume, its volume-level expressions and its 2D slice samples.

    ``ph`` / ``phs``: the loaded phrasing files (:func:`load_phrasing`, :func:`load_paraphrasings`);
    ``negatives``: as :func:`render_slice`'s, for the volume and each of its slices; ``off_slice``: up to this
    many off-slice negatives per slice (:mod:`lsms.synth.off_slice`; 0: none).
    """
    p = draw_patient(i, patient_rng(cfg, i), cfg.noise_hu)
    grid = Grid(cfg.image_size, cfg.spacing_mm)
    spacing = (vcfg.slice_mm, grid.spacing, grid.spacing)
    levels = volume_levels(vcfg)
    rngs = [slice_rng(cfg, i, k) for k in range(vcfg.slices)]
    anats = [render_anatomy(p, float(z), grid, rng) for z, rng in zip(levels, rngs, strict=True)]
    liver, segments = np.stack([a.liver for a in anats]), np.stack([a.segments for a in anats])
    gallbladder, ivc = np.stack([a.gallbladder for a in anats]), np.stack([a.ivc for a in anats])

    # --- 3D lesions: drawn as on a slice, placed in the liver volume; a lesion no sentence can single out goes
    rng = volume_rng(cfg, i)
    min_d = max(cfg.diameter_mm[0], 3 * grid.spacing, 3 * vcfg.slice_mm)  # half_z >= 1.125 slices: 2+ slices deep
    lesions = draw_lesions(cfg, p, rng)
    for les in lesions:
        les.radius = max(les.radius, min_d / 2)
    lesions = place_lesions_3d(lesions, liver, grid, vcfg.slice_mm, rng, min_d, same_level_p=cfg.multi_lesion_share)
    lesions.sort(key=lambda l_: (l_.y, l_.x, l_.z))  # instance labels run anterior -> posterior
    while True:
        instances, sections = _sections(lesions, vcfg, grid)
        facts = volume_facts(lesions, instances, segments, gallbladder, ivc, spacing)
        bad = undescribable(facts)
        if not bad:
            break
        del lesions[bad[-1]]
    ex = express_lesions(ph, facts, range(len(facts)), rng)
    all_text = render_all_text(ph, facts, rng) if facts else ""
    ex.write_variants(phs, cfg.variants, volume_rng(cfg, i, 1))
    sentences = negative_expressions(cfg, ph, phs, facts, segments, p, negatives, i,
                                     lambda stream: volume_rng(cfg, i, stream))

    # --- pictures: each slice with its cross-sections; then the 2D samples of the slices showing a lesion
    image = np.empty(instances.shape, dtype=np.int16)
    for k, anat in enumerate(anats):
        img = anat.hu.copy()
        for label in range(1, len(lesions) + 1):
            if (k, label) in sections:
                render_lesion(img, sections[(k, label)], grid)
        image[k] = finish_picture(img, grid, p, rngs[k])
    slices = []
    for k, anat in enumerate(anats):
        s = _slice_sample(cfg, i, k, anat, p, image[k], instances[k], lesions, ph, phs, negatives)
        if s is not None:
            slices.append((k, s))
    v = VolumeSample(volume_id=f"p{i:04d}", patient=f"p{i:04d}", levels=levels, image=image, instances=instances,
                     liver=liver, segments=segments, gallbladder=gallbladder, ivc=ivc, lesions=lesions,
                     expressions=ex, all_text=all_text, negatives=sentences, slices=slices)
    if off_slice:
        _add_off_slice(cfg, i, v, anats, off_slice)
    return v


def _add_off_slice(cfg: SynthConfig, i: int, v: VolumeSample, anats: list[Anatomy], most: int) -> None:
    """Fills ``v.blank`` (the lesion-free slices paired too) and ``v.off_slice`` (:mod:`lsms.synth.off_slice`)."""
    if not v.expressions.facts:
        return
    for k in blank_slices(v.instances, v.liver):
        v.blank.append((k, SliceSample(
            slice_id=f"{v.patient}_z{k:03d}", patient=v.patient, z=anats[k].z, image=v.image[k],
            instances=v.instances[k], anatomy=anats[k], facts=[], lesions=[], texts=[], unique=[], slots=[],
            stated_relations=[], all_text="", variants=[])))
    full_slots = [slots["full"] for slots in v.expressions.slots]
    for k, _ in sorted(v.slices + v.blank, key=lambda ks: ks[0]):
        section = v.instances[k]
        visible = [lesion_facts(label, v.lesions[label - 1], section == label, anats[k], cfg.spacing_mm)
                   for label in (int(x) for x in np.unique(section) if x)]
        labels = draw_off_slice(v.expressions.facts, full_slots, section, visible, most,
                                volume_rng(cfg, i, OFF_SLICE_STREAM, k))
        if labels:
            v.off_slice[k] = labels


def _slice_sample(cfg: SynthConfig, i: int, k: int, anat: Anatomy, p: Patient, image: np.ndarray, instances: np.ndarray,
                  lesions: list[Lesion], ph: dict[str, Any], phs: list[dict[str, Any]], negatives: str
                  ) -> SliceSample | None:
    """Slice ``k`` of a volume as a 2D sample: every visible cross-section's in-slice facts and relations; those
    at least 3 mm (and 3 px) across that can be singled out on the slice get expressions. None: nothing described."""
    labels = [int(v) for v in np.unique(instances) if v]
    facts = [lesion_facts(label, lesions[label - 1], instances == label, anat, cfg.spacing_mm) for label in labels]
    for a, f in enumerate(facts):
        f.relations = true_relations(facts, a, cfg.spacing_mm)
    min_d = max(3.0, 3 * cfg.spacing_mm)
    which = [a for a, f in enumerate(facts) if f.segment and f.diameter_mm >= min_d]
    rng = volume_rng(cfg, i, SLICE_STREAM + k)
    ex = express_lesions(ph, facts, which, rng)
    if not ex.facts:
        return None
    all_text = render_all_text(ph, facts, rng)
    ex.write_variants(phs, cfg.variants, volume_rng(cfg, i, SLICE_STREAM + k, 1))
    sentences = negative_expressions(cfg, ph, phs, facts, anat.segments, p, negatives, k,
                                     lambda stream: volume_rng(cfg, i, SLICE_STREAM + k, stream))
    return SliceSample(slice_id=f"p{i:04d}_z{k:03d}", patient=f"p{i:04d}", z=anat.z, image=image, instances=instances,
                       anatomy=anat, facts=ex.facts, lesions=[lesions[f.index - 1] for f in ex.facts], texts=ex.texts,
                       unique=ex.unique, slots=ex.slots, stated_relations=ex.stated, all_text=all_text,
                       variants=ex.variants, negatives=sentences)


def _volume_attributes(f: LesionFacts, slots: dict[str, list[str]], stated: list[dict[str, Any]], v: VolumeSample,
                       spacing: tuple[float, float, float]) -> dict[str, Any]:
    """A volume record's ``attributes``: the 2D record's, with the 3D measures (``diameter_mm`` the largest 3D
    diameter; ``centroid`` (slice, row, col) in voxels and ``centroid_mm`` in mm from voxel (0, 0, 0))."""
    a = record_attributes(f, slots, stated, spacing[1])
    zyx = np.argwhere(v.instances == f.index)
    centroid = zyx.mean(0)
    del a["area_px"]
    a.update({
        "voxels": len(zyx), "volume_ml": round(len(zyx) * float(np.prod(spacing)) / 1000.0, 3),
        "centroid": [round(float(c), 2) for c in centroid],
        "centroid_mm": [round(float(c * s), 1) for c, s in zip(centroid, spacing, strict=True)],
        "z_extent": [int(zyx[:, 0].min()), int(zyx[:, 0].max())],
        "slices": int(zyx[:, 0].max() - zyx[:, 0].min() + 1),
    })
    return a


def write_volume(out: Path, v: VolumeSample, split: str, cfg: SynthConfig, vcfg: VolumeConfig
                 ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Writes the volume's files and its slices' files; returns (volume records, 2D slice records)."""
    spacing = (vcfg.slice_mm, cfg.spacing_mm, cfg.spacing_mm)
    vid = v.volume_id
    save_nifti(out / "volumes" / f"{vid}.nii.gz", v.image, spacing)
    save_nifti(out / "volumes" / f"{vid}_instances.nii.gz", v.instances, spacing)
    save_nifti(out / "volumes" / f"{vid}_all.nii.gz", np.where(v.instances > 0, 1, 0).astype(np.uint8), spacing)
    if vcfg.dicom:
        write_dicom_series(out / "dicom" / vid, v.image, spacing, cfg.seed, v.patient)
    common = {"image": f"volumes/{vid}.nii.gz", "instances": f"volumes/{vid}_instances.nii.gz",
              "all_mask": f"volumes/{vid}_all.nii.gz", "all_text": v.all_text, "spacing": [cfg.spacing_mm] * 2,
              "slice_mm": vcfg.slice_mm, "depth": vcfg.slices, "patient": v.patient, "modality": "CT", "split": split,
              "volume_id": vid, "n_lesions": len(v.lesions), **({"dicom": f"dicom/{vid}"} if vcfg.dicom else {})}
    ex = v.expressions
    records = []
    for f, texts, unique, slots, stated, variants in zip(ex.facts, ex.texts, ex.unique, ex.slots, ex.stated,
                                                          ex.variants, strict=True):
        rid = f"{vid}_l{f.index}"
        save_nifti(out / "volume_masks" / f"{rid}.nii.gz", (v.instances == f.index).astype(np.uint8), spacing)
        records.append({"id": rid, "mask": f"volume_masks/{rid}.nii.gz", "text": texts["full"], "texts": texts,
                        "target_instance": f.index, "unique": unique,
                        "attributes": _volume_attributes(f, slots, stated, v, spacing), **common,
                        **({"variants": variants} if variants else {})})
    for e in v.negatives:
        rid = f"{vid}{e.suffix}"
        save_nifti(out / "volume_masks" / f"{rid}.nii.gz", np.zeros_like(v.instances), spacing)
        records.append(negative_record(rid, f"volume_masks/{rid}.nii.gz", e, cfg.spacing_mm, common))
    by_label = {r["target_instance"]: r for r in records if r["target_instance"]}
    slice_records = []
    for k, s in sorted(v.slices + v.blank, key=lambda ks: ks[0]):
        rs = write_slice(out, s, split, cfg.spacing_mm)
        shared = slice_common(s, split, cfg.spacing_mm)
        if vcfg.on_slice_sentences and split in OFF_SLICE_SPLITS:
            rs += [volume_sentence_record(by_label[r["target_instance"]], shared, r["mask"], r["target_instance"])
                   for r in rs if r["target_instance"] in by_label]  # the slice's lesion records (negatives: 0)
        rs += [volume_sentence_record(by_label[label], shared, EMPTY_MASK) for label in v.off_slice.get(k, ())]
        for r in rs:
            r.update({"volume": vid, "volume_image": common["image"], "volume_slice": k,
                      "n_lesions": int(len(np.unique(s.instances)) - 1)})
            slice_records.append(r)
    return records, slice_records


def generate_volume_dataset(cfg: SynthConfig, vcfg: VolumeConfig, out: str | Path, *, overwrite: bool = False,
                            progress: bool = True) -> dict[str, Any]:
    """Generates one volume per patient (``volumes.jsonl``) and their slices as a 2D dataset (``manifest.jsonl``)
    into ``out``; returns the summary written to ``dataset.json``."""
    import json

    out = Path(out)
    ph, phs = load_phrasing(cfg.phrasing), load_paraphrasings(cfg)
    prepare_output(out, overwrite, (*SLICE_DIRS, "volumes", "volume_masks", *(("dicom",) if vcfg.dicom else ())))
    splits = split_of_patients(cfg)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.patients, unit="volume", desc="lsms synth --volumes")
    volume_records: list[dict[str, Any]] = []
    slice_records: list[dict[str, Any]] = []
    lesion_counts: list[int] = []
    per_volume: list[int] = []
    extents: list[int] = []
    n_blank = 0
    if vcfg.off_slice_negatives:
        write_empty_mask(out, cfg.image_size)
    for i in range(cfg.patients):
        off_slice = vcfg.off_slice_negatives if splits[i] in OFF_SLICE_SPLITS else 0
        v = render_volume(cfg, vcfg, i, ph, phs, negative_mode(cfg, splits[i]), off_slice)
        vrec, srec = write_volume(out, v, splits[i], cfg, vcfg)
        volume_records += vrec
        slice_records += srec
        lesion_counts += [int(len(np.unique(s.instances)) - 1) for _, s in v.slices + v.blank]
        n_blank += len(v.blank)
        per_volume.append(len(v.lesions))
        extents += [r["attributes"]["slices"] for r in vrec if "negative" not in r]
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    write_jsonl(out / "manifest.jsonl", slice_records)
    write_jsonl(out / "volumes.jsonl", volume_records)
    summary = dataset_summary(cfg, slice_records, lesion_counts, splits)
    summary["volumes"] = {
        "settings": vcfg.to_dict(), "volumes": cfg.patients,
        "shape": [vcfg.slices, cfg.image_size, cfg.image_size],
        "spacing_mm": [vcfg.slice_mm, cfg.spacing_mm, cfg.spacing_mm],
        "expressions": len(volume_records), "negative_expressions": sum("negative" in r for r in volume_records),
        "volumes_by_lesion_count": {str(k): int(c) for k, c in
                                    enumerate(np.bincount(per_volume, minlength=cfg.max_lesions + 1))},
        "lesion_slices": {"min": min(extents, default=0), "median": float(np.median(extents)) if extents else 0.0,
                          "max": max(extents, default=0)},
        "splits": {sp: sum(r["split"] == sp for r in volume_records) for sp in ("train", "val", "test")},
    }
    if vcfg.off_slice_negatives:
        off = [r for r in slice_records if r.get("negative") == OFF_SLICE]
        summary["volumes"]["off_slice"] = {
            "records": {sp: sum(r["split"] == sp for r in off) for sp in OFF_SLICE_SPLITS},
            "on_lesion_free_slices": sum(r["n_lesions"] == 0 for r in off),
            "lesion_free_slices": n_blank,
        }
    if vcfg.on_slice_sentences:
        on = [r for r in slice_records if "on_slice_of" in r]
        summary["volumes"]["on_slice"] = {"records": {sp: sum(r["split"] == sp for r in on) for sp in OFF_SLICE_SPLITS}}
    (out / "dataset.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    write_card(out, replace(cfg, slices_per_patient=vcfg.slices), slice_records, summary,
               extra=volume_card_lines(summary, volume_records, extents))
    return summary
