"""Inference cost side by side in one run: for each model and size, each backend (PyTorch eager, ONNX Runtime
fp32, ONNX Runtime int8) -> latency at batch 1, images/s at batch 8, % of the fp32 matmul peak measured at the
start of the same run, peak memory, and the CPU seconds and load average next to every timing.

    python benchmarks/cost.py                                  # tiny, small, base, unet, film-unet at 224 and 480
    python benchmarks/cost.py --models tiny --sizes 224 480 --repeats 5 --threads 2

Writes docs/results/cost.{json,md}. Models have random weights (speed does not depend on them); the int8 rows
are calibrated on random inputs, so only their speed is meaningful (accuracy: docs/results/export-int8.md).
``--budget-min`` stops starting new models after that many minutes.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from lsms.model import MODELS
from lsms.profile import (
    BACKEND_CHOICES,
    THROUGHPUT_BATCH,
    backends_table,
    compare_backends,
    matmul_peak,
)

from common import RESULTS, command_line, machine, write_atomic, write_json


def markdown(result: dict) -> str:
    m = result["machine"]
    return "\n".join([
        "# Inference cost: backends side by side in one run",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} and ONNX Runtime {result['onnxruntime']} with "
        f"{m['torch_threads']} threads. Measured fp32 matmul peak at the start of this run: "
        f"{result['matmul_peak']['wall']:.1f} GFLOP/s, {result['matmul_peak']['cpu']:.1f} GFLOP per CPU second "
        "(fastest of 5 2048^3 matmuls). Load average (1 min) at the start: "
        f"{result['loadavg_start']:.1f}, at the end: {result['loadavg_end']:.1f}.",
        f"Command: `{result['command']}`. Date: {result['date']}. Took {result['minutes']:.1f} min.",
        "",
        "Latency: batch 1, median / fastest of the repeats. Images/s: batch 8, from the median / fastest call. "
        f"'x torch' = fastest batch-{THROUGHPUT_BATCH} speed over PyTorch eager's in the same run. GMACs: the "
        "architecture's count per image (papers' \"GFLOPs\" are MACs; text encoder included); in brackets what the "
        "network executes (the decoder squeezes each P_i at its own resolution before aligning it, "
        "`FullScaleDecoder.forward`). '% matmul peak' = executed GFLOP/s of the fastest batch-8 call / the measured peak. "
        "'images per CPU-s' and '% peak (CPU time)' divide by the CPU time this process used instead of the wall "
        "time: with one thread that is the time a core actually worked on the call, so these columns (and 'x torch "
        "(CPU)') hold on a loaded machine, where the wall-clock columns measure the load. Peak mem: "
        "rise of the resident set during one batch-1 call (ONNX Runtime allocates its memory arena in the warm-up calls "
        "and reuses it, so its rise is ~0: not comparable with PyTorch's). CPU s / wall s: CPU time this process got during the "
        "timed calls over their wall time; with N threads and an idle machine it approaches N x wall, and less means "
        "other processes held the cores (load above the thread count), so the fastest call is the better estimate "
        "and the ratios within a row group are more robust than the absolute figures.",
        "PyTorch eager runs in inference mode with Conv+BatchNorm folded and channels-last layout; ONNX files come from `lsms export` "
        "(dynamic batch); int8 rows are calibrated on random inputs, so only their speed means something here.",
        "",
        backends_table(result["rows"]),
        "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--sizes", nargs="+", type=int, default=[224, 480])
    parser.add_argument("--backends", nargs="+", default=list(BACKEND_CHOICES), choices=BACKEND_CHOICES)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice, one per core)")
    parser.add_argument("--budget-min", type=float, default=30.0)
    parser.add_argument("--out", default=str(RESULTS / "cost"), help="output path without extension")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import onnxruntime

    start = time.time()
    result = {"machine": machine(), "command": command_line(), "date": time.strftime("%Y-%m-%d"),
              "onnxruntime": onnxruntime.__version__, "loadavg_start": os.getloadavg()[0],
              "matmul_peak": matmul_peak(), "rows": []}
    for size in args.sizes:
        for model in args.models:
            if (time.time() - start) / 60 > args.budget_min:
                print(f"budget of {args.budget_min} min spent; {model}@{size} and later not run")
                break
            result["rows"] += compare_backends(model, size, tuple(args.backends), args.repeats,
                                               peak=result["matmul_peak"])
            write_json(Path(args.out + ".json"), result)
    result["loadavg_end"] = os.getloadavg()[0]
    result["minutes"] = (time.time() - start) / 60
    write_json(Path(args.out + ".json"), result)
    write_atomic(Path(args.out + ".md"), markdown(result))


if __name__ == "__main__":
    main()
