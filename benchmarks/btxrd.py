"""One longer run: LSMS tiny with text on BTXRD, train -> val, at 224x224 on the CPU, for a fixed time.

    python benchmarks/btxrd.py                        # 30 min, 2 threads -> docs/results/btxrd.{json,md}
    python benchmarks/btxrd.py --budget-min 5 --out /tmp/btxrd-smoke

It runs ``lsms train`` with ``--time-limit`` and then ``lsms evaluate`` on the val split (full text, and the
same weights with an empty sentence to show how much the description is used). The run folder
(CACHE/btxrd224-lsms-tiny-text) is reused: a finished run is only evaluated again if its evaluations are
missing; an interrupted one resumes from its last.pt with the time it has left.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from accuracy import DEFAULT_CACHE, SHARED_DATA, resume_limit, run_logged, say, shown, split_leak_flag

from common import RESULTS, command_line, machine, write_atomic, write_json


def train_command(data: str, run: Path, budget_min: float, image_size: int, epochs: int) -> list[str]:
    # the benchmark's recipe (benchmarks/accuracy.py COMMON_TRAIN) at 224 px; --epochs sets the length of the
    # poly schedule so that the learning rate has decayed most of the way when the time limit ends the run
    return ["lsms", "train", data, "--out", str(run), "--preset", "tiny", "--text", "--image-size", str(image_size),
            "--time-limit", f"{budget_min:g}", "--epochs", str(epochs), "--batch-size", "8", "--lr", "1e-3",
            "--warmup-steps", "50", "--freeze-text", "--max-tokens", "32", "--val-every", "100000", "--seed", "0",
            "--device", "cpu", "--amp", "off", "--no-progress", "--log-every", "10", *split_leak_flag("btxrd")]


def resume_command(run: Path, minutes: float) -> list[str]:
    return ["lsms", "train", "--resume", str(run), "--time-limit", f"{minutes:g}", "--no-progress",
            *split_leak_flag("btxrd")]


def eval_command(data: str, run: Path, level: str) -> list[str]:
    return ["lsms", "evaluate", str(run), data, "--split", "val", "--text-level", level, "--device", "cpu",
            "--json", str(run / f"eval-val-{level}.json"), *split_leak_flag("btxrd")]


def markdown(r: dict) -> str:
    m = r["machine"]
    full, none = r["eval"]["full"], r["eval"].get("none")
    t = r["training"]
    lines = [
        "# BTXRD: LSMS tiny with text, train -> val at 224x224, CPU",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, no GPU, torch {m['torch']}, {r['threads']} torch threads "
        f"(the machine was shared with other work; the run got {t['cpu_s'] / 60:.1f} CPU-minutes in "
        f"{t['train_s'] / 60:.1f} minutes). Date: {r['date']}.",
        "",
        f"Budget: **{r['budget_min']:g} minutes** of training (`--time-limit`), from scratch (random visual "
        "weights, frozen pretrained MiniLM sentence encoder), no augmentation. "
        f"Done: {t['steps']} optimiser steps of batch 8 = {t['epochs_done']:.2f} epochs of the "
        f"{r['n_train']} training images. Stopped by the time limit: {t['stopped_by_time_limit']}.",
        "",
        "| split | text | Dice | mIoU | oIoU | P@0.5 | images | empty predictions |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for level, e in (("full", full), ("none (empty sentence)", none)):
        if e:
            lines.append(f"| val | {level} | {e['Dice']:.4f} | {e['mIoU']:.4f} | {e['oIoU']:.4f} | "
                         f"{e.get('P@0.5', float('nan')):.4f} | {e['n_images']} | {e['n_empty_prediction']} |")
    lines += [
        "",
        "Commands (from the repository root):",
        "",
        "```",
        r["commands"]["train"],
        *r["commands"]["evaluate"],
        "```",
        "",
        f"Made by `{r['command']}`. Dice and mIoU are means over the val images of the per-image Dice / IoU "
        "(`lsms evaluate`); oIoU is the overall IoU; 'none' gives the same weights an empty sentence.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(SHARED_DATA / "btxrd"), help="BTXRD in the LViT layout")
    parser.add_argument("--budget-min", type=float, default=30.0, help="training minutes (default 30)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=3, help="length of the LR schedule (default 3)")
    parser.add_argument("--cache", default=str(DEFAULT_CACHE))
    parser.add_argument("--out", default=str(RESULTS / "btxrd"), help="output path without extension")
    parser.add_argument("--fresh", action="store_true", help="discard a previous run folder")
    args = parser.parse_args()
    run = Path(args.cache).resolve() / f"btxrd{args.image_size}-lsms-tiny-text"
    if args.fresh and run.exists():
        import shutil

        shutil.rmtree(run)
    log = run / "bench.log"
    ledger_path = run / "bench-ledger.json"
    ledger = json.loads(ledger_path.read_text()) if ledger_path.exists() else {"sessions": []}
    cmd = train_command(args.data, run, args.budget_min, args.image_size, args.epochs)
    if not (run / "summary.json").exists():
        if (run / "last.pt").exists():
            limit = resume_limit(run, args.budget_min)
            say(f"resuming {run} with --time-limit {limit:.2f}")
            todo = resume_command(run, limit)
        else:
            say(f"training {run} for {args.budget_min:g} min")
            todo = cmd
        load_before = os.getloadavg()[0]
        usage = run_logged(todo, log, args.threads)
        ledger["sessions"].append({"command": shown(todo, args.threads), **usage,
                                   "loadavg_1min_before_after": [load_before, os.getloadavg()[0]]})
        write_json(ledger_path, ledger)
    evals = {}
    for level in ("full", "none"):
        ecmd = eval_command(args.data, run, level)
        if not (run / f"eval-val-{level}.json").exists():
            say(f"evaluating ({level})")
            run_logged(ecmd, log, args.threads)
        evals[level] = {k: v for k, v in json.loads((run / f"eval-val-{level}.json").read_text()).items()
                        if k not in ("checkpoint", "data")}
    summary = json.loads((run / "summary.json").read_text())
    steps_per_epoch = next(int(line.split()[line.split().index("steps/epoch,") - 1])
                           for line in log.read_text().splitlines() if "steps/epoch" in line)
    n_train = next(int(line.split(" train / ")[0].split()[-1])
                   for line in log.read_text().splitlines() if " train / " in line)
    result = {
        "machine": machine(), "date": time.strftime("%Y-%m-%d"), "command": command_line(),
        "budget_min": args.budget_min, "threads": args.threads, "image_size": args.image_size, "n_train": n_train,
        "commands": {"train": shown(cmd, args.threads),
                     "evaluate": [shown(eval_command(args.data, run, lv), args.threads) for lv in ("full", "none")]},
        "training": {"steps": summary["step"], "epochs_done": summary["step"] / steps_per_epoch,
                     "train_s": sum(s["wall_s"] for s in ledger["sessions"]),
                     "cpu_s": sum(s["cpu_s"] for s in ledger["sessions"]), "sessions": ledger["sessions"],
                     "stopped_by_time_limit": summary.get("stopped_early")},
        "eval": evals,
    }
    result["machine"]["torch_threads"] = args.threads
    write_json(Path(args.out + ".json"), result)
    write_atomic(Path(args.out + ".md"), markdown(result))
    say(f"val Dice {evals['full']['Dice']:.4f} mIoU {evals['full']['mIoU']:.4f}; wrote {args.out}.md")


if __name__ == "__main__":
    main()
