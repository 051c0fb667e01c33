"""``lsms profile``: parameters, FLOPs, CPU latency and peak memory of an LSMS configuration.

FLOPs are counted from the code with :class:`torch.utils.flop_counter.FlopCounterMode` (matrix
multiplications and convolutions, as fvcore and mmcv do; element-wise ops are not counted). One
multiply-accumulate is 2 FLOPs. Papers in this field (SegNeXt, LViT, LSMS) report mmcv/fvcore
``get_flops`` numbers, which are MACs: compare their "GFLOPs" with ``gmacs`` here.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import json
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from lsms.model import MODELS, build, check_image_size, count_parameters, model_config
from lsms.text import DEFAULT_TEXT_ENCODER

# The one built-in random encoder: BERT-base sizes (the paper's text encoder), for counting without weights.
BERT_BASE_RANDOM = "bert-base-random"
BERT_BASE_CONFIG = dict(model_type="bert", hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072, vocab_size=30522)
PROFILE_SENTENCE = (
    "A hypodense hepatocellular carcinoma in segment VI of the right lobe of the liver, with a diameter of "
    "27 mm, irregular shape, blurred boundary, capsule and heterogeneous enhancement with washout."
)


@dataclass
class Profile:
    preset: str
    image_size: int
    text_encoder: str | None
    params: dict[str, int]
    gmacs: float
    gflops: float
    text_gmacs: float
    latency_ms: float
    peak_mem_mb: float | None
    device: str
    batch: int
    threads: int


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Return freed heap pages to the OS and reset the resident-set high-water mark (Linux >= 4.0).

    Without the trim, memory freed by earlier forwards stays resident and hides the next forward's peak.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def count_flops(fn, *args: Any) -> int:
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops()


def profile_inputs(model: nn.Module, image_size: int, batch: int, device: torch.device) -> tuple[Tensor, ...]:
    """A batch of random images and one full-length expression (max_tokens real tokens) per image."""
    image = torch.randn(batch, model.config.in_channels, image_size, image_size, device=device)
    if model.tokenizer is None:
        return (image,)
    enc = model.tokenizer.hf([PROFILE_SENTENCE] * batch, padding="max_length", truncation=True,
                             max_length=model.config.text.max_tokens, return_tensors="pt")
    return image, enc["input_ids"].to(device), enc["attention_mask"].to(device)


def measure(model: nn.Module, inputs: tuple[Tensor, ...], repeats: int, device: torch.device) -> tuple[float, float | None]:
    """Median latency (ms) over ``repeats`` forwards after two warm-ups, and peak memory (MB) of one forward.

    Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA; on the CPU it is the rise of the
    process's peak resident set during one forward over the resident set before it (Linux only).
    """
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with torch.inference_mode():
        for _ in range(2):
            model(*inputs)
        sync()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            model(*inputs)
            sync()
            peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        else:
            peak = None
            if _reset_peak_rss() and (before := _status_kb("VmRSS")) is not None:
                model(*inputs)
                peak = (_status_kb("VmHWM") - before) / 1024
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(*inputs)
            sync()
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times), peak


def time_training_step(preset: str, image_size: int, text: bool = False, batch: int = 8, precision: str = "fp32",
                       steps: int = 3, in_channels: int = 3, operators: int = 0) -> dict[str, Any]:
    """CPU and wall seconds of one optimiser step (forward + backward + AdamW, the trainer's
    :func:`lsms.optim.train_step`) of ``preset`` on random images and masks, with one full-length sentence per
    image when ``text`` (the packaged encoder, trained): the median of ``steps`` steps after two warm-up steps.

    Returns ``cpu_s``, ``wall_s``, ``gflop_step`` (3 x the forward's counted FLOPs: backward = 2 x forward, the
    usual convention) and, with ``operators`` > 0, the top operators by self CPU time per step (torch.profiler).
    Uses only what every lsms release has (build, losses, optimiser, train_step), so that
    ``benchmarks/throughput.py`` can time an older checkout with it.
    """
    from lsms.config import LossConfig, OptimConfig
    from lsms.losses import LSMSLoss
    from lsms.optim import TrainingStep, build_optimizer, train_step

    torch.manual_seed(0)
    config = model_config(preset, in_channels=in_channels)
    if config.arch == "lsms":
        config = dataclasses.replace(config, use_text=text)
    model = build(config).train()
    step = TrainingStep(model, LSMSLoss(LossConfig(contrastive_weight=0.1 if model.tokenizer else 0.0)))
    optimizer = build_optimizer(model, OptimConfig(), torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    inputs = profile_inputs(model, image_size, batch, torch.device("cpu"))
    lesions = (torch.rand(batch, 1, image_size // 16, image_size // 16) > 0.8).float()
    data = {"image": inputs[0], "mask": F.interpolate(lesions, size=(image_size, image_size)),
            **({"input_ids": inputs[1], "attention_mask": inputs[2]} if len(inputs) == 3 else {})}
    dtype = {"fp32": None, "bf16": torch.bfloat16}[precision]
    with torch.no_grad():
        flops = count_flops(model.forward_features, *inputs)
    cpu, wall = [], []
    for _ in range(steps + 2):  # the first two steps are slower (allocator and oneDNN warm-up): not counted
        c0, t0 = time.process_time(), time.perf_counter()
        train_step(step, optimizer, scaler, data, 1e-4, 0.0, dtype)
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - t0)
    result: dict[str, Any] = {"cpu_s": statistics.median(cpu[2:]), "wall_s": statistics.median(wall[2:]),
                              "gflop_step": 3 * flops / 1e9, "text": model.tokenizer is not None}
    if operators:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(2):
                train_step(step, optimizer, scaler, data, 1e-4, 0.0, dtype)
        events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in events)
        result["ops"] = [{"op": e.key, "self_ms": e.self_cpu_time_total / 2000, "share": e.self_cpu_time_total / total,
                          "calls": e.count // 2} for e in events[:operators]]
    return result


def training_step_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one row per configuration of :func:`time_training_step`, then each one's top operators."""
    lines = ["| preset | size | text | batch | precision | CPU s / step | wall s / step | GFLOP / step |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['preset']} | {r['image_size']} | {'yes' if r['text'] else 'no'} | {r['batch']} | {r['precision']} | "
              f"{r['cpu_s']:.2f} | {r['wall_s']:.2f} | {r['gflop_step']:.0f} |" for r in rows]
    for r in rows:
        lines += ["", f"{r['preset']} {r['image_size']} px, {r['precision']}: top operators by self CPU time", "",
                  "| operator | self ms / step | share | calls / step |", "|---|---|---|---|"]
        lines += [f"| `{o['op']}` | {o['self_ms']:.0f} | {100 * o['share']:.1f} % | {o['calls']} |" for o in r["ops"]]
    return "\n".join(lines)


def profile(preset: str, image_size: int, text_encoder: str | None = DEFAULT_TEXT_ENCODER, batch: int = 1,
            repeats: int = 10, device: str = "cpu", in_channels: int = 3, **overrides: Any) -> Profile:
    """Build ``preset`` (an LSMS preset or a baseline) and measure it.

    ``text_encoder=None`` profiles the no-text model; the plain ``unet`` baseline never has text.
    """
    dev = torch.device(device)
    config = model_config(preset, in_channels=in_channels, **overrides)
    if preset == "unet":
        text_encoder = None
    elif text_encoder is None:
        config = dataclasses.replace(config, use_text=False)
    if text_encoder == BERT_BASE_RANDOM:
        config = dataclasses.replace(config, text=dataclasses.replace(config.text, hf_config=dict(BERT_BASE_CONFIG),
                                                                      pretrained=False))
    elif text_encoder is not None:
        config = dataclasses.replace(config, text=dataclasses.replace(config.text, encoder=text_encoder))
    model = build(config).eval().to(dev)
    inputs = profile_inputs(model, image_size, batch, dev)
    with torch.inference_mode():  # what runs: the decoder squeezes each P_i at its own resolution (FullScaleDecoder)
        flops = count_flops(model.forward_features, *inputs) / batch
        text_flops = count_flops(model.text_encoder, *inputs[1:]) / batch if model.text_encoder else 0
    latency, peak = measure(model, inputs, repeats, dev)
    text_params = count_parameters(model.text_encoder)
    return Profile(
        preset=preset, image_size=image_size, text_encoder=text_encoder,
        params={"vision": count_parameters(model) - text_params, "text": text_params, "total": count_parameters(model)},
        gmacs=round(flops / 2e9, 3), gflops=round(flops / 1e9, 3), text_gmacs=round(text_flops / 2e9, 3),
        latency_ms=round(latency, 2), peak_mem_mb=None if peak is None else round(peak, 1),
        device=str(dev), batch=batch, threads=torch.get_num_threads(),
    )


# --------------------------------------------------------------------------- backends side by side

BACKEND_CHOICES = ("torch", "onnxruntime", "onnxruntime-int8")
THROUGHPUT_BATCH = 8


def matmul_peak(n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """Measured fp32 matmul throughput of this CPU with torch's threads, fastest of ``repeats`` n^3 products:
    GFLOP per wall second (``wall``: the practical peak) and per CPU second of this process (``cpu``: with one
    thread, what a core does while this process runs on it, however loaded the machine is)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    wall, cpu = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        torch.mm(a, b)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"wall": 2 * n**3 / min(wall) / 1e9, "cpu": 2 * n**3 / max(min(cpu), 1e-9) / 1e9}


def time_interleaved(calls: dict[str, Any], repeats: int) -> dict[str, dict[str, float]]:
    """One warm-up each, then ``repeats`` rounds that time every call once in turn, so that load from other
    processes, which changes over seconds, falls on all of them alike. Per call: median and fastest wall time
    (ms), fastest CPU time of this process (ms; with one thread the work itself, little affected by load), and
    the CPU seconds over the wall seconds of all its timed calls (with N threads on idle cores the CPU time
    approaches N x wall; less means other work held the cores)."""
    for call in calls.values():
        call()
    stats = {name: {"times": [], "cpu": [], "wall_s": 0.0} for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            cpu0, t0 = time.process_time(), time.perf_counter()
            call()
            wall = time.perf_counter() - t0
            st = stats[name]
            st["times"].append(wall * 1000)
            st["cpu"].append((time.process_time() - cpu0) * 1000)
            st["wall_s"] += wall
    return {name: {"median_ms": statistics.median(st["times"]), "best_ms": min(st["times"]),
                   "best_cpu_ms": min(st["cpu"]), "cpu_s": sum(st["cpu"]) / 1000, "wall_s": st["wall_s"]}
            for name, st in stats.items()}


def peak_rss_rise_mb(call) -> float | None:
    """Rise of the peak resident set during one ``call`` over the resident set before it (Linux), in MB."""
    gc.collect()
    if not _reset_peak_rss() or (before := _status_kb("VmRSS")) is None:
        return None
    call()
    return round((_status_kb("VmHWM") - before) / 1024, 1)


def compare_backends(preset: str, image_size: int, backends: tuple[str, ...] = BACKEND_CHOICES, repeats: int = 5,
                     text_encoder: str | None = DEFAULT_TEXT_ENCODER, in_channels: int = 3,
                     peak: dict[str, float] | None = None, workdir: str | None = None) -> list[dict[str, Any]]:
    """Time one configuration (random weights) in each backend, side by side in this process.

    Per backend: batch-1 latency, batch-8 images/s (median and fastest of ``repeats``, the backends timed in
    turn, see :func:`time_interleaved`), GFLOP/s reached by the fastest batch-8 call as a share of
    the matmul ``peak`` (:func:`matmul_peak`, measured here when not given), the same per CPU second (the
    fastest call's CPU time against the matmul's: robust to load with one thread), peak memory of a batch-1
    call, and CPU/wall seconds of the timed calls with the load average around them. ``onnxruntime-int8`` is
    calibrated on random inputs: its speed is real, its accuracy is not meaningful (see ``lsms export``).
    """
    import copy
    import os
    import shutil
    import tempfile
    from pathlib import Path

    from lsms.data import default_preprocessing
    from lsms.spec import ModelSpec

    unknown = sorted(set(backends) - set(BACKEND_CHOICES))
    if unknown:
        raise ValueError(f"unknown backends {unknown}; choose from {', '.join(BACKEND_CHOICES)}")
    config = model_config(preset, in_channels=in_channels)
    if preset == "unet":
        text_encoder = None
    elif text_encoder is None:
        config = dataclasses.replace(config, use_text=False)
    else:
        config = dataclasses.replace(config, text=dataclasses.replace(config.text, encoder=text_encoder))
    model = build(config).eval()
    peak = peak or matmul_peak()
    inputs = {b: profile_inputs(model, image_size, b, torch.device("cpu")) for b in (1, THROUGHPUT_BATCH)}
    with torch.inference_mode():
        arch_flops = count_flops(model.forward_features, *inputs[1])
        run_flops = count_flops(model, *inputs[1])  # what the backends run (logits only)
    spec = ModelSpec(model.config, default_preprocessing(None, image_size, in_channels=in_channels))
    runs = {}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for name in backends:
            if name == "torch":
                from lsms.backends import TorchBackend

                eager = TorchBackend(copy.deepcopy(model), spec, optimize=True, text_cache=0)
                runs[name] = (lambda x, eager=eager: eager(*x))  # noqa: E731
            else:
                from lsms.backends import OnnxRuntimeBackend
                from lsms.export import export_network, quantize_int8

                fp32 = Path(tmp) / "onnxruntime.onnx"
                if not fp32.exists():  # one export serves both ONNX rows
                    export_network(copy.deepcopy(model), spec, fp32, batch=None)
                path = fp32
                if name == "onnxruntime-int8":
                    names = ("image", "input_ids", "attention_mask")
                    path = Path(tmp) / "onnxruntime-int8.onnx"
                    shutil.copyfile(fp32, path)
                    quantize_int8(path, [dict(zip(names, (t.numpy() for t in inputs[1]))) for _ in range(2)])
                backend = OnnxRuntimeBackend(path, threads=torch.get_num_threads())
                runs[name] = (lambda x, backend=backend: backend(*x))  # noqa: E731
        load_before = os.getloadavg()[0]
        one = time_interleaved({n: (lambda r=r: r(inputs[1])) for n, r in runs.items()}, repeats)
        eight = time_interleaved({n: (lambda r=r: r(inputs[THROUGHPUT_BATCH])) for n, r in runs.items()},
                                 max(2, repeats // 2 + 1))
        memory = {n: peak_rss_rise_mb(lambda r=r: r(inputs[1])) for n, r in runs.items()}
        load_after = os.getloadavg()[0]
    rows = []
    for name in backends:
        b1, b8 = one[name], eight[name]
        rows.append({
            "backend": name, "preset": preset, "image_size": image_size, "text_encoder": text_encoder,
            "threads": torch.get_num_threads(), "params_m": round(count_parameters(model) / 1e6, 2),
            "gmacs": round(arch_flops / 2e9, 3), "gmacs_run": round(run_flops / 2e9, 3),
            "latency_b1_ms": round(b1["median_ms"], 1), "latency_b1_best_ms": round(b1["best_ms"], 1),
            "latency_b1_cpu_ms": round(b1["best_cpu_ms"], 1),
            "images_per_s_b8": round(THROUGHPUT_BATCH / b8["median_ms"] * 1000, 2),
            "images_per_s_b8_best": round(THROUGHPUT_BATCH / b8["best_ms"] * 1000, 2),
            "images_per_cpu_s_b8": round(THROUGHPUT_BATCH / b8["best_cpu_ms"] * 1000, 2),
            "matmul_peak_gflops": round(peak["wall"], 1), "matmul_peak_cpu_gflops": round(peak["cpu"], 1),
            "peak_share_pct": round(100 * run_flops / 1e9 * THROUGHPUT_BATCH / b8["best_ms"] * 1000 / peak["wall"], 1),
            "peak_share_cpu_pct": round(100 * run_flops / 1e9 * THROUGHPUT_BATCH / b8["best_cpu_ms"] * 1000 / peak["cpu"], 1),
            "peak_mem_mb": memory[name],
            "cpu_s": round(b1["cpu_s"] + b8["cpu_s"], 2), "wall_s": round(b1["wall_s"] + b8["wall_s"], 2),
            "loadavg_1min": [round(load_before, 2), round(load_after, 2)],
        })
        print(f"{preset} @ {image_size} [{name}]: b1 {rows[-1]['latency_b1_best_ms']} ms best, "
              f"b8 {rows[-1]['images_per_s_b8_best']} img/s best, {rows[-1]['peak_share_pct']} % of peak",
              file=sys.stderr, flush=True)
    return rows


def backends_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of :func:`compare_backends` rows; 'x torch' = speed-up of the fastest batch-8 call."""
    lines = [
        "| model | size | backend | GMACs (run) | latency b1 median / best (ms) | images/s b8 median / best | "
        "x torch | % matmul peak | b1 CPU (ms) | images per CPU-s b8 | x torch (CPU) | % peak (CPU time) | "
        "peak mem b1 (MB) | CPU s / wall s | load 1 min |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    eager = {(r["preset"], r["image_size"]): r for r in rows if r["backend"] == "torch"}
    for r in rows:
        ref = eager.get((r["preset"], r["image_size"]))
        speedup = f"{r['images_per_s_b8_best'] / ref['images_per_s_b8_best']:.2f}" if ref else "-"
        cpu_speedup = f"{r['images_per_cpu_s_b8'] / ref['images_per_cpu_s_b8']:.2f}" if ref else "-"
        lines.append(
            f"| {r['preset']} | {r['image_size']} | {r['backend']} | {r['gmacs']:.2f} ({r['gmacs_run']:.2f}) | "
            f"{r['latency_b1_ms']:.1f} / {r['latency_b1_best_ms']:.1f} | "
            f"{r['images_per_s_b8']:.2f} / {r['images_per_s_b8_best']:.2f} | {speedup} | {r['peak_share_pct']:.1f} | "
            f"{r.get('latency_b1_cpu_ms', '-')} | {r['images_per_cpu_s_b8']:.2f} | {cpu_speedup} | "
            f"{r['peak_share_cpu_pct']:.1f} | "
            f"{r['peak_mem_mb'] if r['peak_mem_mb'] is not None else 'n/a'} | {r['cpu_s']:.1f} / {r['wall_s']:.1f} | "
            f"{r['loadavg_1min'][0]:.1f} / {r['loadavg_1min'][1]:.1f} |"
        )
    return "\n".join(lines)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| preset | size | text encoder | params vision (M) | params text (M) | params total (M) | GMACs | GFLOPs | latency (ms) | peak mem (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p = r["params"]
        lines.append(
            f"| {r['preset']} | {r['image_size']} | {r['text_encoder'] or 'none'} | {p['vision'] / 1e6:.2f} | "
            f"{p['text'] / 1e6:.2f} | {p['total'] / 1e6:.2f} | {r['gmacs']:.2f} | {r['gflops']:.2f} | "
            f"{r['latency_ms']:.1f} | {r['peak_mem_mb'] if r['peak_mem_mb'] is not None else 'n/a'} |"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    parser.description = __doc__
    parser.add_argument("--preset", nargs="+", default=["base"], choices=list(MODELS),
                        help="one or more LSMS presets or baselines (unet: MONAI BasicUNet; film-unet: with FiLM text fusion)")
    parser.add_argument("--image-size", nargs="+", type=int, default=[480], help="one or more square input sizes (multiples of 32, at least 64)")
    parser.add_argument("--text-encoder", nargs="+", default=[DEFAULT_TEXT_ENCODER],
                        help=f"text encoder(s): {DEFAULT_TEXT_ENCODER!r} (packaged), a model folder, a hub id, "
                             f"{BERT_BASE_RANDOM!r} (random weights, BERT-base sizes as in the paper) or 'none' (no-text model)")
    parser.add_argument("--in-channels", type=int, default=3, help="image channels (1 for CT)")
    parser.add_argument("--batch", type=int, default=1, help="images per forward for the latency; FLOPs are per image")
    parser.add_argument("--repeats", type=int, default=10, help="timed forwards (the median is reported)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="print JSON (one object for one configuration, else a list)")
    parser.add_argument("--train-step", action="store_true",
                        help="time the training step instead: forward + backward + AdamW on a batch of --batch "
                             "(give 8 for the trainer's default), CPU seconds per step in each --precision, and the "
                             "top operators by CPU time; text models train their text encoder")
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                        help="with --train-step: autocast dtypes to time")
    parser.add_argument("--backends", nargs="+", choices=BACKEND_CHOICES, metavar="BACKEND",
                        help=f"time these inference backends side by side instead ({', '.join(BACKEND_CHOICES)}): "
                             "latency b1, images/s b8, %% of the matmul peak measured in the same run, peak memory")


def run(args: argparse.Namespace) -> int:
    # imported here: benchmarks/throughput.py loads this module beside the package of an older commit
    from lsms.spec import check_memory

    if args.threads:
        torch.set_num_threads(args.threads)
    for size in args.image_size:
        check_image_size(size, what="--image-size")
    if args.batch < 1 or args.repeats < 1:
        raise ValueError("--batch and --repeats must be >= 1")
    batch = 8 if args.backends and not args.train_step else args.batch  # the backends' comparison runs batch 8 too
    for preset in args.preset:
        for size in args.image_size:
            check_memory(model_config(preset), (size, size), batch, training=args.train_step,
                         device="cpu" if args.train_step or args.backends else args.device,
                         source=f"--preset {preset} --image-size {size} (batch {batch})",
                         fix="use a smaller --image-size or --batch")
    if args.train_step:
        rows = [{"preset": preset, "image_size": size, "text": text != "none", "batch": args.batch,
                 "precision": precision, **time_training_step(preset, size, text != "none", args.batch, precision,
                                                              args.repeats, args.in_channels, operators=15)}
                for preset in args.preset for size in args.image_size for text in args.text_encoder
                for precision in args.precision]
        print(json.dumps(rows, indent=2) if args.json else training_step_table(rows))
        return 0
    if args.backends:
        peak = matmul_peak()
        print(f"measured fp32 matmul peak: {peak['wall']:.1f} GFLOP/s ({peak['cpu']:.1f} per CPU second) with "
              f"{torch.get_num_threads()} threads", file=sys.stderr)
        rows = [r for preset in args.preset for size in args.image_size for text in args.text_encoder
                for r in compare_backends(preset, size, tuple(args.backends), args.repeats,
                                          None if text == "none" else text, args.in_channels, peak)]
        print(json.dumps(rows, indent=2) if args.json else backends_table(rows))
        return 0
    rows = []
    for preset in args.preset:
        for size in args.image_size:
            for text in args.text_encoder:
                prof = profile(preset, size, None if text == "none" else text, args.batch, args.repeats,
                               args.device, args.in_channels)
                rows.append(prof.__dict__)
                print(f"{preset} @ {size}, text {prof.text_encoder}: {prof.gmacs} GMACs, {prof.latency_ms} ms", file=sys.stderr)
    if args.json:
        print(json.dumps(rows[0] if len(rows) == 1 else rows, indent=2))
    else:
        print(markdown_table(rows))
    return 0
