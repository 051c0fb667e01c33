"""Evaluate one trained run at several text levels in one process (the model is loaded once).

    python benchmarks/evaluate_levels.py RUN DATA --split test --levels full half quarter none
    python benchmarks/evaluate_levels.py RUN DATA --split val --allow-split-leak   # a dataset with a known leak

Each level gives exactly what ``lsms evaluate RUN DATA --split SPLIT --text-level LEVEL --json PATH`` gives (the
same function: :func:`lsms.evaluate.evaluate_levels`); the JSON goes to RUN/eval-SPLIT-LEVEL.json (or
--json-dir), the per-sample scores to eval-SPLIT-LEVEL.csv. One process instead of one per level saves the
start-up (imports, model load) of each, which is most of the cost of a small split on a CPU.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lsms.data import TEXT_LEVELS
from lsms.evaluate import evaluate_levels, write_per_sample_csv


def write_levels(run: str, data: str, split: str, levels: list[str], out_dir: Path, batch_size: int = 8,
                 prefer: str = "best", device: str = "cpu", allow_split_leak: bool = False) -> dict:
    out = {}
    results = evaluate_levels(run, data, split, tuple(levels), batch_size=batch_size, device=device, prefer=prefer,
                              allow_split_leak=allow_split_leak)
    for level, result in results.items():
        summary = {"checkpoint": result["checkpoint"], "data": str(data), "split": split, "text_level": level,
                   **result["summary"]}
        path = out_dir / f"eval-{split}-{level}.json"
        path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        write_per_sample_csv(result["records"], path.with_suffix(".csv"))  # one row per sample (Dice, IoU, ...)
        out[level] = summary
        print(f"{run} [{split}, text {level}]: Dice {summary['Dice']:.4f} mIoU {summary['mIoU']:.4f}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="run folder (best.pt, else last.pt)")
    parser.add_argument("data", help="dataset folder")
    parser.add_argument("--split", default="val", choices=("train", "val", "test"))
    parser.add_argument("--levels", nargs="+", default=["full"], choices=TEXT_LEVELS)
    parser.add_argument("--json-dir", help="where the eval-SPLIT-LEVEL.json files go (default: RUN)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N")
    parser.add_argument("--prefer", default="best", choices=("best", "last"), help="which checkpoint of RUN (default best.pt)")
    parser.add_argument("--allow-split-leak", action="store_true",
                        help="evaluate a dataset whose splits share a patient or an image, with a warning (as "
                             "lsms evaluate --allow-split-leak; off by default: an error)")
    args = parser.parse_args()
    write_levels(args.run, args.data, args.split, args.levels, Path(args.json_dir or args.run), args.batch_size,
                 args.prefer, args.device, args.allow_split_leak)


if __name__ == "__main__":
    main()
