"""The GPU run: the paper recipe (LSMS base, 480 px, AMP) and the real-data recipe, on BTXRD and Kvasir-SEG.

    python benchmarks/gpu.py                          # CUDA, 20 min per row -> docs/results/gpu.{json,md}
    python benchmarks/gpu.py --budget-min 5 --rows btxrd/real
    python benchmarks/gpu.py --toy --device cpu --btxrd DATA --kvasir DATA --out /tmp/gpu-toy   # seconds, any machine

Rows (each ``lsms train`` for ``--budget-min`` minutes, then ``lsms evaluate`` of last.pt on the val split; the
BTXRD rows also with an empty sentence, same weights):

- ``*/paper``: ``--recipe paper`` (base, 480x480, lr 3e-5, batch 16, no augmentation) with ``--amp bf16``. The
  paper fine-tunes pretrained weights; here the visual branch starts from scratch, as everywhere in lsms.
- ``*/real``: ``--recipe real`` with LSMS base (the recipe's patches, augmentation, positions and 1/2-resolution
  output) with ``--amp bf16`` and a learning rate for the larger model.

Kvasir-SEG has no sentences: its rows train the no-text model. ``--toy`` shrinks every row (a 2-block model, 96 px
images, 64 px patches, a few seconds) so that the test suite runs the whole script on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from accuracy import DEFAULT_CACHE, SHARED_DATA, run_logged, say, shown, split_leak_flag
from real_data import read_curve

from common import RESULTS, command_line, machine, report_path, write_atomic, write_json

ROWS = {
    "btxrd/paper": ("btxrd", "paper"), "btxrd/real": ("btxrd", "real"),
    "kvasir/paper": ("kvasir", "paper"), "kvasir/real": ("kvasir", "real"),
}
IMAGE_SIZE = {"paper": {"btxrd": 480, "kvasir": 480}, "real": {"btxrd": 448, "kvasir": 256}}
TOY = ["--image-size", "96", "--augmentation", "patch_size=64", "--batch-size", "2", "--epochs", "1",
       "--model", "widths=[16,32,32,64]", "--model", "depths=[1,1,1,1]", "--model", "ham_channels=32",
       "--model", "head_channels=32", "--model", "nmf_rank=4", "--model", "conv_kernels=[7]"]


def train_command(key: str, data: Path, run: Path, args: argparse.Namespace) -> list[str]:
    dataset, recipe = ROWS[key]
    text = dataset == "btxrd"
    cmd = ["lsms", "train", str(data), "--out", str(run), "--overwrite", "--recipe", recipe, "--preset", "base",
           "--text" if text else "--no-text", "--image-size", str(IMAGE_SIZE[recipe][dataset]),
           "--device", args.device, "--amp", args.amp, "--time-limit", f"{args.budget_min:g}",
           "--epochs", str(args.epochs), "--seed", "0", "--no-progress", "--log-every", "20", "--max-tokens", "48",
           "--num-workers", str(args.workers), *split_leak_flag(dataset)]
    if recipe == "real":
        cmd += ["--lr", "1e-3", "--batch-size", "16"]
    if args.toy:
        cmd += TOY
    return cmd


def eval_command(key: str, data: Path, run: Path, args: argparse.Namespace) -> list[str]:
    dataset = ROWS[key][0]
    levels = ["full", "none"] if dataset == "btxrd" else ["full"]
    return ["python", str(Path(__file__).with_name("evaluate_levels.py")), str(run), str(data), "--split", "val",
            "--prefer", "last", "--device", args.device, "--levels", *levels, *split_leak_flag(dataset)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu (with --toy)")
    parser.add_argument("--amp", default="bf16", choices=("bf16", "fp16", "off"))
    parser.add_argument("--budget-min", type=float, default=20.0, help="training minutes per row (default 20)")
    parser.add_argument("--epochs", type=int, default=100, help="poly-schedule length (default 100, the paper's)")
    parser.add_argument("--workers", type=int, default=8, help="data-loading processes (default 8)")
    parser.add_argument("--btxrd", default=str(SHARED_DATA / "btxrd"))
    parser.add_argument("--kvasir", default=str(SHARED_DATA / "kvasir-seg"))
    parser.add_argument("--cache", default=str(DEFAULT_CACHE / "gpu"))
    parser.add_argument("--out", default=str(RESULTS / "gpu"), help="report path without extension")
    parser.add_argument("--toy", action="store_true", help="tiny model and images, seconds per row (tests)")
    args = parser.parse_args()
    if args.toy:
        args.budget_min, args.epochs, args.workers = min(args.budget_min, 0.2), 1, 0
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device here; this script is for a GPU machine (or use --toy --device cpu)")
    data = {"btxrd": Path(args.btxrd), "kvasir": Path(args.kvasir)}
    results = []
    for key in args.rows:
        run = Path(args.cache) / key
        log = run / "bench.log"
        train = train_command(key, data[ROWS[key][0]], run, args)
        say(f"{key}: training for {args.budget_min:g} min on {args.device}")
        load = os.getloadavg()[0]
        usage = run_logged(train, log, threads=0)
        evaluate = eval_command(key, data[ROWS[key][0]], run, args)
        eval_usage = run_logged(evaluate, log, threads=0)
        summary = json.loads((run / "summary.json").read_text())
        evals = {p.stem.split("-")[-1]: json.loads(p.read_text()) for p in sorted(run.glob("eval-val-*.json"))}
        results.append({
            "row": key, "recipe": ROWS[key][1], "dataset": ROWS[key][0], "steps": summary["step"],
            "train": usage, "evaluation": eval_usage, "loadavg_1min_before": load,
            "commands": {"train": shown(train), "evaluate": shown(evaluate)},
            "dice": {lv: e["Dice"] for lv, e in evals.items()}, "mIoU": {lv: e["mIoU"] for lv, e in evals.items()},
            "curve": read_curve(run),
        })
        say(f"{key}: {summary['step']} steps, val Dice {results[-1]['dice']}")
    out = Path(args.out)
    write_json(report_path(out, ".json"), {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"),
                                          "command": command_line(), "toy": args.toy, "rows": results})
    lines = ["# GPU run: paper recipe and real-data recipe", "", f"Machine: {machine()}. Made by `{command_line()}`.",
             "", "| row | steps | train min | val Dice | Dice, empty sentence | mIoU |", "|---|---|---|---|---|---|"]
    for r in results:
        none = f"{r['dice']['none']:.4f}" if "none" in r["dice"] else "-"
        lines.append(f"| {r['row']} | {r['steps']} | {r['train']['wall_s'] / 60:.1f} | {r['dice']['full']:.4f} | "
                     f"{none} | {r['mIoU']['full']:.4f} |")
    lines += ["", "Commands:", ""] + [f"- `{r['commands']['train']}` then `{r['commands']['evaluate']}`" for r in results]
    write_atomic(report_path(out, ".md"), "\n".join(lines) + "\n")
    say(f"wrote {out}.md")


if __name__ == "__main__":
    main()
