"""CT volumes: one 3D answer per sentence, assembled in 3D and slice by slice, against the model's 2D slices.

    lsms synth runs/volumes --volumes --patients 100 --seed 0
    lsms train runs/volumes --recipe demo --epochs 30 --schedule time --time-limit 28 --time-clock cpu \\
        --threads 1 --out runs/volumes-run
    python benchmarks/volumes.py runs/volumes-run runs/volumes --out docs/results/volumes

For each split: ``lsms evaluate --volumes`` (3D Dice of the referred lesion, 3D referring accuracy on volumes with
2+ lesions, existence per volume, in both assembly modes) and the 2D evaluation of the same model on the
volumes' slices (``lsms evaluate RUN DATA``: what the 3D Dice is compared with). Writes OUT.md (the table, the
machine, the commands) and OUT.json (every summary).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from lsms.evaluate import evaluate_checkpoint, evaluate_volumes
from lsms.metrics import bands_in_order

from common import RESULTS, command_line, machine, report_path, write_atomic, write_json


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float, float]:
    """fn's result, its CPU seconds and its wall seconds."""
    cpu, wall = time.process_time(), time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.process_time() - cpu, time.perf_counter() - wall


def measure(run: str, data: str, split: str, batch_size: int) -> dict[str, Any]:
    volumes, v_cpu, v_wall = timed(evaluate_volumes, run, data, split, batch_size=batch_size, device="cpu",
                                   progress=True)
    slices, s_cpu, s_wall = timed(evaluate_checkpoint, run, data, split, batch_size=batch_size, device="cpu",
                                  progress=True)
    return {"split": split, "volumes": volumes["summary"], "slices_2d": slices["summary"],
            "seconds": {"volumes_cpu": v_cpu, "volumes_wall": v_wall, "slices_2d_cpu": s_cpu, "slices_2d_wall": s_wall},
            "load_after": os.getloadavg()[0]}


def f(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(rows: list[dict[str, Any]], run: str, data: str) -> str:
    m = machine()
    lines = [
        "# CT volumes: 3D assembly against slice-by-slice prediction",
        "",
        f"Model: `{run}`; data: `{data}` (volume records `volumes.jsonl`, the 2D slices `manifest.jsonl`). "
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}; evaluation on the CPU.",
        "",
        "Dice (positives) is the mean Dice of the sentences that refer to a lesion: per volume in 3D against the "
        "referred lesion's 3D mask, per slice for the 2D row. Referring accuracy counts the sentences of volumes "
        "(slices) with 2+ lesions whose answer overlaps the referred lesion more than any other. Negatives: "
        "sentences that describe no lesion of the volume (slice); masks drawn at the model's existence threshold.",
        "",
        "| split | answer | sentences (negatives) | Dice (positives) | referring acc. 2+ lesions (n) | existence AUROC [95 % CI] | negatives with a mask | CPU s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    names = {"3d": "one 3D answer per sentence (`3d`)", "3d-no-size": "the same, the stated size not read (`3d-no-size`)",
             "slices": "slice by slice (`--volume-mode slices`)"}
    for r in rows:
        for key, s in [*((names[k], v) for k, v in r["volumes"].items()), ("2D slices (`lsms evaluate`)", r["slices_2d"])]:
            cpu = r["seconds"]["slices_2d_cpu" if key.startswith("2D") else "volumes_cpu"]
            lines.append(
                f"| {r['split']} | {key} | {s['n_images']} ({s['n_empty_target']}) | {f(s.get('Dice_positive'))} | "
                f"{f(s.get('referring_accuracy_multi'))} ({s.get('n_referring_multi')}) | "
                f"{f(s.get('existence_AUROC'))} [{f(s.get('existence_AUROC_low'))}, {f(s.get('existence_AUROC_high'))}] | "
                f"{f(s.get('negative_mask_rate'))} | {cpu:.0f} |")
    lines += ["", "By the referred lesion's largest 3D diameter (2D row: its diameter on the slice): referring accuracy on "
              "volumes (slices) with 2+ lesions (n), Dice of the sentences that refer to a lesion of that size (n).", "",
              "| split | answer | " + " | ".join(bands_in_order()) + " |", "|---|---|" + "---|" * len(bands_in_order())]
    for r in rows:
        for key, s in [*((names[k], v) for k, v in r["volumes"].items()), ("2D slices", r["slices_2d"])]:
            cells = [f"{f(s.get(f'referring_accuracy_multi_of_size_{b}'), 2)} ({s.get(f'n_referring_multi_of_size_{b}', 0)}), "
                     f"Dice {f(s.get(f'Dice_positive_of_size_{b}'), 2)} ({s.get(f'n_positive_of_size_{b}', 0)})"
                     for b in bands_in_order()]
            lines.append(f"| {r['split']} | {key} | " + " | ".join(cells) + " |")
    loads = ", ".join(f"{r['load_after']:.1f}" for r in rows)
    lines += ["", f"Load average after each split: {loads}.", "",
              f"Made by `{command_line()}`.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="run folder, checkpoint or exported file")
    parser.add_argument("data", help="a dataset made by 'lsms synth OUT --volumes'")
    parser.add_argument("--splits", nargs="+", default=["val", "test"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default=str(RESULTS / "volumes"), help="report path without extension")
    args = parser.parse_args()
    rows = [measure(args.run, args.data, split, args.batch_size) for split in args.splits]
    out = Path(args.out)
    write_json(report_path(out, ".json"), {"machine": machine(), "command": command_line(), "rows": rows})
    write_atomic(report_path(out, ".md"), markdown(rows, args.run, args.data))
    print(f"wrote {out}.md")


if __name__ == "__main__":
    main()
