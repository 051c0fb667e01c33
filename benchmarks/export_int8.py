"""Accuracy of the exported models: the PyTorch checkpoint, its ONNX fp32 export and its ONNX int8 export
evaluated on the same RefLiver-Synth test split -> Dice of each, the int8 Dice change, logit differences and
mask agreement with the checkpoint.

    python benchmarks/export_int8.py                      # small RefLiver-Synth, a 3-minute tiny training, then the above
    python benchmarks/export_int8.py --run RUN --data DATA   # an existing run and its dataset

Writes docs/results/export-int8.{md,json}. The training is short on purpose (this measures what int8 changes,
not how good the model is); a longer training gives a more meaningful Dice change.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import RESULTS, command_line, machine, write_atomic, write_json

SYNTH = ["--patients", "30", "--slices-per-patient", "6", "--image-size", "128", "--fov-mm", "280",
         "--diameter-mm", "25", "60", "--multi-lesion-share", "0.7", "--test-share", "0.2", "--no-progress"]
TRAIN = ["--preset", "tiny", "--text", "--image-size", "128", "--freeze-text", "--max-tokens", "64",
         "--window", "200,80", "--model", "decoder_stages=[1,2,3,4]", "--group-by-image", "--lr", "2e-3",
         "--warmup-steps", "30", "--batch-size", "8", "--epochs", "12", "--threads", "1", "--device", "cpu",
         "--amp", "off", "--no-progress"]


def lsms(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "lsms", *args], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="an existing run folder (skips generation and training)")
    parser.add_argument("--data", help="its RefLiver-Synth dataset")
    parser.add_argument("--work", default="runs/export-int8", help="folder for data, run and exported files")
    parser.add_argument("--train-minutes", type=float, default=3.0)
    parser.add_argument("--calibration-samples", type=int, default=32)
    parser.add_argument("--out", default=str(RESULTS / "export-int8"), help="output path without extension")
    args = parser.parse_args()
    from lsms.evaluate import evaluate_checkpoint
    from lsms.export import export_model

    work = Path(args.work)
    data, run = Path(args.data or work / "data"), Path(args.run or work / "run")
    if args.run is None:
        lsms("synth", str(data), *SYNTH)
        lsms("train", str(data), "--out", str(run), "--time-limit", str(args.train_minutes), *TRAIN)
    result = {"machine": machine(), "command": command_line(), "date": time.strftime("%Y-%m-%d"),
              "run": str(run), "data": str(data), "loadavg_start": os.getloadavg()[0], "rows": {}}
    files = {"onnxruntime-fp32": work / "fp32.onnx", "onnxruntime-int8": work / "int8.onnx"}
    export_model(run, files["onnxruntime-fp32"], batch=None)
    export_model(run, files["onnxruntime-int8"], batch=None, quantize="int8", calibration=data,
                 calibration_samples=args.calibration_samples)
    logits = {}
    for name, model in (("torch", run), *files.items()):
        kept: list[torch.Tensor] = []
        cpu0, wall0 = time.process_time(), time.perf_counter()
        r = evaluate_checkpoint(model, data, "test", device="cpu", batch_size=8,
                                on_batch=lambda batch, lg, kept=kept: kept.append(lg))
        row = {k: r["summary"][k] for k in ("Dice", "mIoU", "oIoU", "referring_accuracy", "n_images")}
        row.update(eval_cpu_s=round(time.process_time() - cpu0, 1), eval_wall_s=round(time.perf_counter() - wall0, 1),
                   loadavg_1min=round(os.getloadavg()[0], 2))
        if name != "torch":
            row["file_mb"] = round(files[name].stat().st_size / 2**20, 1)
        result["rows"][name] = row
        logits[name] = torch.cat(kept)
        print(name, row, flush=True)
    ref = logits["torch"]
    for name in files:
        row = result["rows"][name]
        row["max_abs_logit_diff_vs_torch"] = float((logits[name] - ref).abs().max())
        row["mask_pixels_differing_vs_torch"] = int(((logits[name] > 0) != (ref > 0)).sum())
        row["dice_change_points_vs_torch"] = round(100 * (row["Dice"] - result["rows"]["torch"]["Dice"]), 2)
    result["pixels"] = int(ref.numel())
    result["loadavg_end"] = os.getloadavg()[0]
    write_json(Path(args.out + ".json"), result)
    write_atomic(Path(args.out + ".md"), markdown(result))


def markdown(result: dict) -> str:
    rows = result["rows"]
    lines = [
        "# Exported models on RefLiver-Synth test: PyTorch vs ONNX fp32 vs ONNX int8",
        "",
        f"Command: `{result['command']}`. Date: {result['date']}. Model: `{result['run']}`; data `{result['data']}` "
        f"(test split, {rows['torch']['n_images']} expressions, {result['pixels']} pixels).",
        f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores; load average "
        f"{result['loadavg_start']:.1f} -> {result['loadavg_end']:.1f} (evaluation times are not the point here).",
        "",
        "| model | Dice | mIoU | oIoU | ref. acc. | Dice change (points) | max abs logit diff | mask pixels differing | file (MB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['Dice']:.4f} | {r['mIoU']:.4f} | {r['oIoU']:.4f} | {r['referring_accuracy']:.4f} | "
            f"{r.get('dice_change_points_vs_torch', 0.0):+.2f} | {r.get('max_abs_logit_diff_vs_torch', 0.0):.2e} | "
            f"{r.get('mask_pixels_differing_vs_torch', 0)} | {r.get('file_mb', '-')} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
