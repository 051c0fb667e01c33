"""``lsms synth OUT``: generate a RefLiver-Synth dataset folder."""

from __future__ import annotations

import argparse
import logging
import time

from lsms.synth.config import LESION_TYPES, SynthConfig

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = SynthConfig()
    parser.add_argument("out", help="output folder (created; must be empty unless --overwrite)")
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
    parser.add_argument("--phrasing", default=None, help="phrasing file (YAML/JSON) replacing the packaged one")
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
    )


def run(args: argparse.Namespace) -> int:
    from lsms.synth.generate import generate_dataset

    cfg = config_from_args(args)
    t0 = time.perf_counter()
    summary = generate_dataset(cfg, args.out, overwrite=args.overwrite, progress=not args.no_progress)
    c = summary["counts"]
    log.info("wrote %d slices / %d expressions to %s in %.1f s (multi-lesion share %.2f); card: %s/README.md",
             c["slices"], c["expressions"], args.out, time.perf_counter() - t0, c["multi_lesion_share"], args.out)
    return 0
