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
        config.use_text = False
    if text_encoder == BERT_BASE_RANDOM:
        config.text = dataclasses.replace(config.text, hf_config=dict(BERT_BASE_CONFIG), pretrained=False)
    elif text_encoder is not None:
        config.text = dataclasses.replace(config.text, encoder=text_encoder)
    model = build(config).eval().to(dev)
    inputs = profile_inputs(model, image_size, batch, dev)
    with torch.inference_mode():
        flops = count_flops(model, *inputs) / batch
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


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    for size in args.image_size:
        check_image_size(size, what="--image-size")
    if args.batch < 1 or args.repeats < 1:
        raise ValueError("--batch and --repeats must be >= 1")
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
