"""Training throughput side by side in one run: CPU seconds per optimiser step (forward + backward + AdamW) of
LSMS tiny and small (with and without text), the U-Net and the FiLM U-Net, in fp32 and bf16 autocast, with 1 and
2 threads, at 224 and 480 px; the same rows for the code of a pinned earlier commit (``--before``), so that
every speed-up is a ratio measured on one machine in one run; the machine's fp32 and bf16 matmul peaks and each
row's achieved GFLOP per CPU second as a share of them; and a per-operator profile (top 15) of the LSMS tiny step
before and after.

    python benchmarks/throughput.py --before 0fbbc10      # the full grid; 1-thread rows also before
    # the committed table, in three parts (--append adds rows measured later on the same machine):
    python benchmarks/throughput.py --sizes 224 --threads 1 --steps 4 --before 0fbbc10
    python benchmarks/throughput.py --sizes 480 --models tiny unet --threads 1 --steps 3 --before 0fbbc10 --append
    python benchmarks/throughput.py --sizes 224 --models tiny unet --threads 2 --steps 4 --before 0fbbc10 --append
    # greyscale images (CT): docs/results/throughput-one-channel.md
    python benchmarks/throughput.py --channels 1 --models tiny --sizes 128 224 --threads 1 --precisions fp32 --steps 5 --before 0d121c8 --out throughput-one-channel

Each row runs in its own process (clean thread settings and memory; ``--before`` rows import the package from a
``git archive`` of that commit; both are timed by this checkout's :func:`lsms.profile.time_training_step`). Batch
8, random images and masks, one full-length sentence (32 tokens) per image for the text models; one warm-up step,
then the median of ``--steps`` steps. FLOPs per step = 3 x the forward's matmul and convolution FLOPs counted by
``torch.utils.flop_counter`` (backward = 2 x forward, the usual convention).
Writes docs/results/throughput.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BATCH = 8


# --------------------------------------------------------------------------- one row, in its own process


def run_row(spec: dict[str, Any]) -> dict[str, Any]:
    """One row: :func:`lsms.profile.time_training_step` of this checkout, run against whichever lsms package is
    first on the path (today's, or the ``--before`` commit's: it only uses what both have)."""
    import importlib.util

    import torch

    torch.set_num_threads(spec["threads"])
    loader = importlib.util.spec_from_file_location("profile_now", ROOT / "src" / "lsms" / "profile.py")
    profile_now = sys.modules["profile_now"] = importlib.util.module_from_spec(loader)  # dataclasses need it there
    loader.loader.exec_module(profile_now)
    return profile_now.time_training_step(spec["model"], spec["size"], spec["text"], BATCH, spec["precision"],
                                          spec["steps"], in_channels=spec.get("channels", 3),
                                          operators=15 if spec.get("profile") else 0)


def matmul_peaks(threads: int, precisions: list[str], n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """GFLOP per CPU second of the fastest of ``repeats`` n^3 matmuls in each of ``precisions`` (fp32, bf16), with
    ``threads`` threads."""
    import torch

    torch.set_num_threads(threads)
    peaks = {}
    for name in precisions:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        times = []
        for _ in range(repeats):
            start = time.process_time()
            a @ b
            times.append(max(time.process_time() - start, 1e-9))
        peaks[name] = 2 * n**3 / min(times) / 1e9
    return peaks


# --------------------------------------------------------------------------- the driver


def checkout(commit: str, into: Path) -> Path:
    """The package source of ``commit`` (``git archive``), for the ``before`` rows; returns its ``src``."""
    archive = into / "src.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", "-o", str(archive), commit, "src"], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def in_process(spec: dict[str, Any], source: Path | None) -> dict[str, Any]:
    """Run one row in a fresh Python process, with ``source`` (an older package) first on the path."""
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), HF_HUB_OFFLINE="1")
    if source is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(source), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, __file__, "--row", json.dumps(spec)], env=env, capture_output=True,
                         text=True)
    if out.returncode != 0:
        raise RuntimeError(f"row {spec} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def rows_wanted(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for size in args.sizes:  # the small size first: an interrupted run has it for every model
        for model in args.models:
            texts = {"tiny": (False, True), "small": (False, True), "unet": (False,), "film-unet": (True,)}[model]
            for text in texts:
                for threads in args.threads:
                    for precision in args.precisions:
                        rows.append({"model": model, "text": text, "size": size, "threads": threads,
                                     "precision": precision, "steps": args.steps, "channels": args.channels})
    return rows


def markdown(result: dict[str, Any]) -> str:
    m, before = result["machine"], result["before"]
    peaks = result["peaks"]
    lines = [
        "# Training throughput: CPU seconds per optimiser step, side by side in one run",
        "",
        f"Machine: {m['cpu']} ({m['cores']} cores; bf16: {m['bf16']}), torch {m['torch']}. Load average (1 min) "
        f"at the start: {result['loadavg_start']:.1f}, at the end: {result['loadavg_end']:.1f}. "
        "Commands: " + "; ".join(f"`{c}`" for c in result["commands"]) + f". Date: {result['date']}. "
        f"Took {result['minutes']:.1f} min.",
        "",
        "Matmul peaks measured in this run (2048^3, fastest of 5, GFLOP per CPU second): "
        + "; ".join(f"{t} thread(s): " + ", ".join(f"{k} {v:.0f}" for k, v in p.items()) for t, p in peaks.items())
        + ".",
        "",
        f"One step = forward + backward + AdamW on a batch of {BATCH} (random images of "
        f"{result.get('channels', 3)} channel(s) and masks; text models: one "
        "32-token sentence per image, text encoder trained). CPU s: median CPU seconds of this process per step "
        "(with 2 threads, the CPU time of both). GFLOP: 3 x the forward's counted FLOPs. % peak: achieved GFLOP "
        "per CPU second over the peak of the same precision and thread count. "
        + (f"'before': the same row with the package of commit {before} (the step before this work); "
           "'x': its CPU seconds over today's." if before else ""),
        "",
        "| model | text | px | threads | precision | CPU s / step | wall s / step | GFLOP / step | % peak |"
        + (" before CPU s | x |" if before else ""),
        "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if before else ""),
    ]
    for r in result["rows"]:
        share = 100 * r["gflop_step"] / r["cpu_s"] / peaks[str(r["threads"])][r["precision"]]
        line = (f"| {r['model']} | {'yes' if r['text'] else 'no'} | {r['size']} | {r['threads']} | {r['precision']} | "
                f"{r['cpu_s']:.2f} | {r['wall_s']:.2f} | {r['gflop_step']:.0f} | {share:.0f} |")
        if before:
            old = r.get("before")
            line += f" {old['cpu_s']:.2f} | {old['cpu_s'] / r['cpu_s']:.2f} |" if old else " | |"
        lines.append(line)
    for name, ops in result["operators"].items():
        lines += ["", f"## Operators of the LSMS tiny step, {name} (b{BATCH}, 224 px, 1 thread, no text)", "",
                  "| operator | self ms / step | share | calls / step |", "|---|---|---|---|"]
        lines += [f"| `{o['op']}` | {o['self_ms']:.0f} | {100 * o['share']:.1f} % | {o['calls']} |" for o in ops]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "small", "unet", "film-unet"],
                        choices=["tiny", "small", "unet", "film-unet"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[224, 480])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per row (after one warm-up)")
    parser.add_argument("--channels", type=int, default=3,
                        help="channels of the random images (1: a greyscale image such as CT; default 3)")
    parser.add_argument("--before", metavar="COMMIT", help="also time the rows with the package of this commit")
    parser.add_argument("--before-threads", nargs="+", type=int, default=[1],
                        help="thread counts whose rows get a --before measurement (default 1)")
    parser.add_argument("--out", default="throughput", help="results name under docs/results (default throughput)")
    parser.add_argument("--append", action="store_true",
                        help="add these rows to the results file of --out (same machine, measured later) instead of "
                             "starting a new one")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row and print its JSON
    args = parser.parse_args()
    if args.row:
        print(json.dumps(run_row(json.loads(args.row))))
        return

    sys.path.insert(0, str(Path(__file__).parent))
    from lsms.optim import native_bf16

    from common import RESULTS, command_line, machine

    started, load0 = time.perf_counter(), os.getloadavg()[0]
    native, evidence = native_bf16()
    result: dict[str, Any] = {
        "machine": {**machine(), "bf16": ("native, " if native else "emulated, ") + evidence},
        "commands": [command_line()], "date": time.strftime("%Y-%m-%d"), "before": args.before,
        "loadavg_start": load0, "peaks": {}, "rows": [], "operators": {}, "channels": args.channels,
    }
    if args.append:
        earlier = json.loads((RESULTS / f"{args.out}.json").read_text())
        if (earlier["machine"]["cpu"] != result["machine"]["cpu"] or earlier["before"] != args.before
                or earlier.get("channels", 3) != args.channels):
            raise SystemExit(f"{args.out}.json was measured on {earlier['machine']['cpu']} against "
                             f"{earlier['before']} with {earlier.get('channels', 3)}-channel images: append only "
                             "rows of the same machine, --before and --channels")
        result = {**earlier, "commands": earlier["commands"] + result["commands"], "minutes_done": earlier["minutes"]}
    result["peaks"].update({str(t): matmul_peaks(t, args.precisions) for t in args.threads})
    with tempfile.TemporaryDirectory() as tmp:
        source = checkout(args.before, Path(tmp)) if args.before else None
        probe = {"model": "tiny", "text": False, "size": 224, "threads": 1, "steps": 1, "profile": True,
                 "channels": args.channels}
        if source is not None and not args.append:
            result["operators"][f"before ({args.before}), fp32"] = in_process({**probe, "precision": "fp32"}, source)["ops"]
        for precision in args.precisions if not args.append else ():
            result["operators"][f"now, {precision}"] = in_process({**probe, "precision": precision}, None)["ops"]
        for spec in rows_wanted(args):
            row = {**spec, **in_process(spec, None)}
            if source is not None and spec["threads"] in args.before_threads:
                row["before"] = in_process(spec, source)
            result["rows"].append(row)
            save(result, args.out, started)  # after every row: an interrupted run keeps what it measured
            print(f"{spec['model']:9s} text={spec['text']!s:5s} {spec['size']} px {spec['threads']} thr "
                  f"{spec['precision']}: {row['cpu_s']:.2f} CPU-s/step"
                  + (f" (before {row['before']['cpu_s']:.2f})" if "before" in row else ""), flush=True)
    save(result, args.out, started)
    print(f"wrote {RESULTS / args.out}.md")


def save(result: dict[str, Any], name: str, started: float) -> None:
    from common import RESULTS, write_atomic, write_json

    result["loadavg_end"] = os.getloadavg()[0]
    result["minutes"] = result.get("minutes_done", 0.0) + (time.perf_counter() - started) / 60
    write_json(RESULTS / f"{name}.json", result)
    write_atomic(RESULTS / f"{name}.md", markdown(result))


if __name__ == "__main__":
    main()
