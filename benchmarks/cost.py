"""Cost side by side in one run: params, GFLOPs, CPU latency (batch 1), images/s (batch 8), peak memory,
for LSMS tiny / small / base and the U-Net baselines at 224 and 480, plus the share of the CPU's measured
matmul peak that inference reaches.

    python benchmarks/cost.py                       # all models, 224 and 480 -> docs/results/cost.{json,md}
    python benchmarks/cost.py --models tiny unet --sizes 224 --repeats 3

Finished rows are cached in docs/results/cost.json and skipped on a rerun (``--fresh`` to redo them);
``--budget-min`` stops starting new rows after that many minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from lsms.model import MODELS, build_model
from lsms.profile import profile, profile_inputs

from common import RESULTS, command_line, machine, write_atomic, write_json

BATCH_THROUGHPUT = 8


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Measured fp32 matmul throughput of this CPU with torch's threads: the practical peak."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times) / 1e9  # the fastest repeat: the practical peak, least disturbed by other work


def best_latencies(model_name: str, size: int, repeats: int, device: str) -> tuple[float, float, float]:
    """(fastest batch-1 forward, median and fastest batch-8 forward) in ms, after one warm-up each.

    On a machine shared with other work the median is inflated by whoever else runs; the fastest of several
    forwards is the usual estimate of what the model itself costs (timeit's advice), so both are kept.
    """
    dev = torch.device(device)
    model = build_model(model_name, in_channels=3).eval().to(dev)
    out = []
    for batch, n in ((1, repeats), (BATCH_THROUGHPUT, max(2, repeats // 2))):
        inputs = profile_inputs(model, size, batch, dev)
        times = []
        with torch.inference_mode():
            model(*inputs)
            for _ in range(n):
                t0 = time.perf_counter()
                model(*inputs)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                times.append((time.perf_counter() - t0) * 1000)
        out.append(times)
    return min(out[0]), statistics.median(out[1]), min(out[1])


def row_key(model: str, size: int) -> str:
    return f"{model}@{size}"


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# Cost: LSMS presets and baselines, measured side by side in one run",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} with {m['torch_threads']} threads. "
        f"Measured fp32 matmul peak: {result['matmul_peak_gflops']:.1f} GFLOP/s in this run; a row cached from an "
        "earlier run is compared with the peak measured in its own run (shown next to its '% peak').",
        f"Command: `{result['command']}`. Date: {result['date']}.",
        "",
        "GMACs are per image (papers' \"GFLOPs\" are MACs: mmcv/fvcore convention); GFLOPs = 2 x GMACs. Latency is the",
        "CPU forward at batch 1, median and fastest of the repeats; images/s is at batch 8 (from the median and the",
        "fastest forward). On a shared machine the fastest is the better estimate of the model's own cost; the two come",
        "from separate passes (lsms profile, then a timing loop), so under changing load the fastest can exceed the",
        "median. Peak memory",
        "is the rise of the peak resident set during one batch-1 forward. Ratios are against LSMS tiny at the same size.",
        "'% peak' = GFLOP/s achieved by the fastest batch-8 forward / measured matmul peak (fastest of 5 2048^3 matmuls). Text models use the packaged MiniLM encoder (6 layers, 384); 'of which",
        "text' is the text encoder's share of the GMACs. 'load' is the machine's 1-minute load average before / after",
        "the row: above the number of threads, other processes shared the cores and latencies are inflated.",
        "",
        "| model | size | params (M) | of which text (M) | GMACs | of which text | latency b1 median / best (ms) | best x tiny | images/s b8 median / best | peak mem (MB) | mem x tiny | % peak | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = result["rows"]
    for r in rows.values():
        ref = rows.get(row_key("tiny", r["image_size"]))
        best = r.get("latency_best_ms", r["latency_ms"])
        ratio = f"{best / ref.get('latency_best_ms', ref['latency_ms']):.2f}" if ref else "-"
        peak = r.get("matmul_peak_gflops")
        own_peak = f" (of {peak:.0f})" if peak and abs(peak - result["matmul_peak_gflops"]) > 0.05 else ""
        load = " / ".join(f"{x:.1f}" for x in r["loadavg_1min"]) if "loadavg_1min" in r else "-"
        mem_ratio = (f"{r['peak_mem_mb'] / ref['peak_mem_mb']:.2f}"
                     if ref and r["peak_mem_mb"] and ref["peak_mem_mb"] else "-")
        lines.append(
            f"| {r['preset']} | {r['image_size']} | {r['params']['total'] / 1e6:.2f} | {r['params']['text'] / 1e6:.2f} | "
            f"{r['gmacs']:.2f} | {r.get('text_gmacs', 0):.2f} | {r['latency_ms']:.1f} / {best:.1f} | {ratio} | "
            f"{r['images_per_s']:.2f} / {r.get('images_per_s_best', r['images_per_s']):.2f} | "
            f"{r['peak_mem_mb'] if r['peak_mem_mb'] is not None else 'n/a'} | {mem_ratio} | {r['peak_share_pct']:.1f}{own_peak} | {load} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--sizes", nargs="+", type=int, default=[224, 480])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice, one per core)")
    parser.add_argument("--budget-min", type=float, default=30.0)
    parser.add_argument("--out", default=str(RESULTS / "cost"), help="output path without extension")
    parser.add_argument("--fresh", action="store_true", help="ignore cached rows")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out_json = args.out + ".json"
    cached = {} if args.fresh or not Path(out_json).exists() else json.loads(Path(out_json).read_text()).get("rows", {})
    result = {"machine": machine(), "command": command_line(), "date": time.strftime("%Y-%m-%d"),
              "matmul_peak_gflops": matmul_peak_gflops(), "rows": {}}
    start = time.time()
    for size in args.sizes:
        for model in args.models:
            key = row_key(model, size)
            if key in cached:
                result["rows"][key] = cached[key]
                continue
            if (time.time() - start) / 60 > args.budget_min:
                print(f"budget of {args.budget_min} min spent; {key} and later rows not run (rerun to continue)")
                break
            load_before = os.getloadavg()[0]
            one = profile(model, size, repeats=args.repeats, device=args.device)
            row = dict(one.__dict__)
            best_one, med_eight, best_eight = best_latencies(model, size, args.repeats, args.device)
            row["latency_best_ms"] = round(best_one, 2)
            row["images_per_s"] = BATCH_THROUGHPUT / (med_eight / 1000)
            row["images_per_s_best"] = BATCH_THROUGHPUT / (best_eight / 1000)
            row["matmul_peak_gflops"] = result["matmul_peak_gflops"]  # rows cached from an earlier run keep theirs
            row["peak_share_pct"] = 100 * row["gflops"] * row["images_per_s_best"] / row["matmul_peak_gflops"]
            # 1-minute load average before and after the row: above the thread count, other work shared the CPU
            row["loadavg_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
            result["rows"][key] = row
            print(f"{key}: {row['gmacs']:.2f} GMACs, {row['latency_ms']:.1f} ms, {row['images_per_s']:.1f} img/s", flush=True)
            write_json(Path(out_json), result)
    write_json(Path(out_json), result)
    write_atomic(Path(args.out + ".md"), markdown(result))


if __name__ == "__main__":
    main()
