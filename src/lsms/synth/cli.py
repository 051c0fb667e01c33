"""``lsms synth OUT``: generate a RefLiver-Synth dataset folder."""

from __future__ import annotations

import argparse
import logging
import time

from lsms.synth.config import LESION_TYPES, SynthConfig, VolumeConfig

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d, dv = SynthConfig(), VolumeConfig()
    parser.add_argument("out", help="output folder (created; must be empty unless --overwrite); with --rephrase, "
                                    "an existing RefLiver-Synth folder")
    parser.add_argument("--rephrase", metavar="PHRASING",
                        help="generate nothing: rewrite the expressions of the dataset in OUT in the wording of this "
                             "phrasing file (same lesions, slots and relations) into OUT/manifest-NAME.jsonl, e.g. "
                             "--rephrase phrasings-heldout.yaml; evaluate on it with 'lsms evaluate RUN "
                             "OUT/manifest-NAME.jsonl'")
    parser.add_argument("--patients", type=int, default=d.patients, help="synthetic patients (default %(default)s)")
    parser.add_argument("--slices-per-patient", type=int, default=d.slices_per_patient,
                        help="axial slices per patient (default %(default)s)")
    parser.add_argument("--seed", type=int, default=d.seed, help="master seed (default %(default)s)")
    parser.add_argument("--image-size", type=int, default=d.image_size, help="pixels per side (default %(default)s)")
    parser.add_argument("--fov-mm", type=float, default=d.fov_mm, help="field of view in mm (default %(default)s)")
    parser.add_argument("--lesions-per-slice", type=int, default=d.max_lesions,
                        help="most lesions in a slice, 1..4 (default %(default)s)")
    parser.add_argument("--multi-lesion-share", type=float, default=d.multi_lesion_share,
                        help="share of slices with 2+ lesions (default %(default)s)")
    parser.add_argument("--lesion-types", default=",".join(d.lesion_types),
                        help=f"comma-separated subset of {','.join(LESION_TYPES)} (default all)")
    parser.add_argument("--diameter-mm", type=float, nargs=2, metavar=("MIN", "MAX"), default=list(d.diameter_mm),
                        help="lesion diameter range in mm (default %(default)s)")
    parser.add_argument("--noise", type=float, nargs=2, metavar=("MIN", "MAX"), default=list(d.noise_hu),
                        help="noise sigma range in HU, drawn per patient (default %(default)s)")
    parser.add_argument("--phrasing", default=None,
                        help="phrasing file (YAML/JSON) replacing the packaged one, or a packaged name such as "
                             "phrasings-heldout.yaml (the held-out wording, never used for training)")
    parser.add_argument("--negative-share", type=float, default=d.negative_share,
                        help="share of training slices that also get a sentence describing a lesion NOT on the slice, "
                             "with an empty target (default %(default)s; 0: none)")
    parser.add_argument("--no-eval-negatives", dest="eval_negatives", action="store_false",
                        help="val and test slices get negatives by --negative-share too (default: one of each kind, "
                             "type, location and relation, on every test slice, to measure 'not present', and one "
                             "on every val slice)")
    parser.add_argument("--variants", type=int, default=d.variants,
                        help="paraphrases written per expression for train-time text augmentation "
                             "(default %(default)s; 0: none)")
    parser.add_argument("--paraphrasing", nargs="+", metavar="FILE", default=None,
                        help="phrasing files the paraphrases are written in (default: the packaged training set "
                             "phrasings.yaml, phrasings-2.yaml, phrasings-3.yaml)")
    parser.add_argument("--volumes", action="store_true",
                        help="one CT volume per patient with 3D lesions and volume-level expressions (volumes.jsonl, "
                             "NIfTI), and its slices as the 2D dataset (manifest.jsonl); --slices-per-patient is unused")
    parser.add_argument("--volume-slices", type=int, default=dv.slices, help="with --volumes: slices per volume (default %(default)s)")
    parser.add_argument("--slice-mm", type=float, default=dv.slice_mm,
                        help="with --volumes: slice spacing and thickness in mm (default %(default)s)")
    parser.add_argument("--dicom", action="store_true", help="with --volumes: also write each volume as a DICOM CT series")
    parser.add_argument("--off-slice-negatives", type=int, default=dv.off_slice_negatives, metavar="K",
                        help="with --volumes: pair each slice of the train and val volumes' 2D set (and every 4th "
                             "lesion-free slice within the liver) with up to K volume sentences of lesions NOT on "
                             "that slice, empty target, so that a 2D model learns to answer 'not here' on the slices "
                             "a volume sentence is run on (default %(default)s: none)")
    parser.add_argument("--on-slice-sentences", action="store_true",
                        help="with --volumes: pair each slice of the train and val volumes' 2D set with the volume "
                             "sentence of every lesion it describes too, that lesion's section as the target (the "
                             "sentences a volume is queried with, on the slices that answer them)")
    parser.add_argument("--val-share", type=float, default=d.val_share, help="share of patients in val (default %(default)s)")
    parser.add_argument("--test-share", type=float, default=d.test_share, help="share of patients in test (default %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace a previous dataset in OUT")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> SynthConfig:
    types = tuple(t.strip().lower() for t in args.lesion_types.split(",") if t.strip())
    return SynthConfig(
        patients=args.patients, slices_per_patient=args.slices_per_patient, seed=args.seed,
        image_size=args.image_size, fov_mm=args.fov_mm, max_lesions=args.lesions_per_slice,
        multi_lesion_share=args.multi_lesion_share, lesion_types=types, diameter_mm=tuple(args.diameter_mm),
        noise_hu=tuple(args.noise), val_share=args.val_share, test_share=args.test_share, phrasing=args.phrasing,
        negative_share=args.negative_share, eval_negatives=args.eval_negatives, variants=args.variants,
        paraphrasings=tuple(args.paraphrasing) if args.paraphrasing else None,
    )


def run(args: argparse.Namespace) -> int:
    from lsms.synth.generate import generate_dataset, rephrase_dataset

    if args.rephrase:
        path = rephrase_dataset(args.out, args.rephrase, seed=args.seed)
        log.info("wrote %s: the expressions of %s in the wording of %s", path, args.out, args.rephrase)
        return 0
    cfg, dv = config_from_args(args), VolumeConfig()
    t0 = time.perf_counter()
    if args.volumes:
        from lsms.synth.volumes import generate_volume_dataset

        vcfg = VolumeConfig(slices=args.volume_slices, slice_mm=args.slice_mm, dicom=args.dicom,
                            off_slice_negatives=args.off_slice_negatives, on_slice_sentences=args.on_slice_sentences)
        summary = generate_volume_dataset(cfg, vcfg, args.out, overwrite=args.overwrite, progress=not args.no_progress)
        log.info("wrote %d volumes / %d volume expressions to %s/volumes.jsonl", cfg.patients,
                 summary["volumes"]["expressions"], args.out)
    elif (args.dicom or args.volume_slices != dv.slices or args.slice_mm != dv.slice_mm
          or args.off_slice_negatives != dv.off_slice_negatives or args.on_slice_sentences):
        raise ValueError("--volume-slices, --slice-mm, --dicom, --off-slice-negatives and --on-slice-sentences need "
                         "--volumes")
    else:
        summary = generate_dataset(cfg, args.out, overwrite=args.overwrite, progress=not args.no_progress)
    c = summary["counts"]
    log.info("wrote %d slices / %d expressions to %s in %.1f s (multi-lesion share %.2f); card: %s/README.md",
             c["slices"], c["expressions"], args.out, time.perf_counter() - t0, c["multi_lesion_share"], args.out)
    return 0
