"""Time and peak memory of ``lsms predict`` on one CT volume: a synthetic 512 x 512 x Z phantom (body, liver, two
hypodense cysts of different sizes, noise) written as NIfTI (or as a DICOM series with ``--dicom``), predicted with
one sentence by a given model, the whole command timed by ``/usr/bin/time -v`` (wall clock, CPU time and maximum
resident set size of the process: model loading, reading, every forward pass, the 3D assembly and the mask
files). On a shared machine the wall clock depends on the load; the CPU time much less.

    python benchmarks/volume_predict.py RUN --slices 120 --threads 2                 # NIfTI, 3D assembly
    python benchmarks/volume_predict.py RUN --dicom --format dicom-seg --threads 2   # a DICOM series -> DICOM-SEG
    python benchmarks/volume_predict.py model.onnx --backend onnxruntime              # an exported model

Appends one row to docs/results/volume_predict.json (with the machine and its load average).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import RESULTS, command_line, machine, write_json

SENTENCE = "the larger of the two cysts in the right lobe"


def phantom(depth: int, size: int = 512, seed: int = 0) -> np.ndarray:
    """int16 HU (Z, H, W): air, a soft-tissue body, a liver at 60 HU and two cysts (8 HU) of radius 22 and 11 mm."""
    rng = np.random.default_rng(seed)
    z, y, x = np.ogrid[:depth, :size, :size]
    vol = np.full((depth, size, size), -1000.0, np.float32)
    vol[:, (((y - size / 2) / (0.42 * size)) ** 2 + ((x - size / 2) / (0.46 * size)) ** 2 < 1)[0]] = 40.0
    vol[:, (((y - 0.45 * size) / (0.2 * size)) ** 2 + ((x - 0.35 * size) / (0.17 * size)) ** 2 < 1)[0]] = 60.0  # liver
    for (cz, cy, cx), r in (((0.5 * depth, 0.42 * size, 0.3 * size), 22 / 0.7), ((0.6 * depth, 0.5 * size, 0.42 * size), 11 / 0.7)):
        vol[((z - cz) * 2.5 / 0.7) ** 2 + (y - cy) ** 2 + (x - cx) ** 2 < r**2] = 8.0  # mm -> voxels (0.7 mm, 2.5 mm)
    vol += rng.normal(0, 12, vol.shape).astype(np.float32)
    return vol.astype(np.int16)


def with_lesions(vol: np.ndarray, slices: slice) -> str:
    """Put the viewer's first bundled RefLiver-Synth slice (resized to the volume's size) on ``slices`` of ``vol``, so
    that a demo-trained model finds its lesion there; returns the slice's first sentence."""
    import torch
    import torch.nn.functional as F

    from lsms.serve.examples import examples

    e = examples()[0]
    hu = torch.from_numpy(e.image.array)[None, None]  # (1, 1, h, w)
    big = F.interpolate(hu, size=vol.shape[1:], mode="bilinear", align_corners=False)[0, 0].numpy()
    vol[slices] = np.round(big).astype(vol.dtype)
    return e.texts[0]


def write_input(folder: Path, depth: int, dicom: bool, lesions: bool) -> tuple[Path, str]:
    vol = phantom(depth)
    text = with_lesions(vol, slice(int(0.375 * depth), int(0.625 * depth))) if lesions else SENTENCE
    if not dicom:
        import SimpleITK as sitk

        img = sitk.GetImageFromArray(vol)
        img.SetSpacing((0.7, 0.7, 2.5))
        path = folder / "ct.nii.gz"
        sitk.WriteImage(img, str(path), useCompression=True)
        return path, text
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_volumes import write_series

    write_series(folder / "series", vol.astype(np.float32))
    return folder / "series", text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--label", default="", help="how the results name the model")
    p.add_argument("--slices", type=int, default=120)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dicom", action="store_true", help="a DICOM series instead of a NIfTI file")
    p.add_argument("--lesions", action="store_true",
                   help="the middle quarter of the slices: a RefLiver-Synth test slice with its sentence (the demo "
                        "model finds a lesion there: the overlays of the slices it covers are drawn too)")
    p.add_argument("--format", default="nifti")
    p.add_argument("--backend", default=None)
    p.add_argument("--volume-mode", default="3d")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        source, text = write_input(folder, args.slices, args.dicom, args.lesions)
        cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "lsms", "predict", args.model, str(source), "--text",
               text, "--out", str(folder / "out"), "--device", "cpu", "--batch-size", str(args.batch_size),
               "--format", args.format, "--volume-mode", args.volume_mode]
        if args.backend:
            cmd += ["--backend", args.backend]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        load = os.getloadavg()[0]
        started = time.perf_counter()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            sys.exit(f"lsms predict failed ({done.returncode}):\n{done.stderr[-3000:]}")
        peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
        cpu_s = sum(float(re.search(rf"{kind} time \(seconds\): ([\d.]+)", done.stderr).group(1))
                    for kind in ("User", "System"))
        with open(folder / "out" / "volumes.csv", newline="") as f:
            (answer,) = list(csv.DictReader(f))
    row = {"model": args.label or Path(args.model).name, "backend": args.backend or "torch", "input": "DICOM series" if args.dicom else "NIfTI",
           "shape": [512, 512, args.slices], "threads": args.threads, "batch_size": args.batch_size,
           "format": args.format, "lesions": args.lesions, "volume_mode": args.volume_mode, "wall_s": round(wall, 1), "cpu_s": round(cpu_s, 1),
           "peak_rss_mib": round(peak_kb / 1024), "load_average_before": round(load, 2), "load_average_after": round(os.getloadavg()[0], 2),
           "answer": {k: answer.get(k) for k in ("present", "score", "voxels", "volume_ml", "diameter_mm", "components", "kept")},
           "machine": machine(), "command": command_line()}
    print(json.dumps(row, indent=2))
    out = RESULTS / "volume_predict.json"
    rows = json.loads(out.read_text()) if out.is_file() else []
    write_json(out, [*rows, row])


if __name__ == "__main__":
    main()
