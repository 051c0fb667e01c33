"""Accuracy side by side: LSMS, its ablations (the paper's Table III) and the U-Net baselines, each trained
for the same wall-clock budget and scored on a held-out split.

    python benchmarks/accuracy.py                          # every row -> docs/results/accuracy.{json,md} + plots
    python benchmarks/accuracy.py --rows synth/ --budget-min 4.5 --jobs 2 --threads 1
    python benchmarks/accuracy.py --list                   # the rows and their exact commands
    python benchmarks/accuracy.py --report-only            # tables and plots from the cached rows only

Datasets: RefLiver-Synth (generated here with fixed settings, SYNTH_ARGS; train -> test split), BTXRD
(train -> val) and Kvasir-SEG (train -> val, no text). Every row is ``lsms train ... --time-limit BUDGET``
then ``lsms evaluate`` on the held-out split (text models on RefLiver-Synth at the full / half / quarter /
none text levels, on BTXRD at full and none).

Caching: each row runs in CACHE/<row> (a normal ``lsms train`` run folder); its finished result is
CACHE/<row>/result.json and is reused on a rerun (``--fresh`` redoes the selected rows). An interrupted
row resumes from its last.pt with the budget it has left (``lsms train --resume``); finished training with
missing evaluations only evaluates. The result depends on a signature of the row's commands: a row whose
settings changed is run again from scratch.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import RESULTS, command_line, machine, report_path, write_atomic, write_json

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = ROOT / "runs" / "bench"
# the shared data beside the checkout (../shared/data), or LSMS_SHARED_DATA
SHARED_DATA = Path(os.environ.get("LSMS_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))

# RefLiver-Synth for the benchmark: 60 patients x 8 slices at 128 px, seed 0, 20 % of patients held out as
# the test split (12 patients, ~210 expressions), 10 % as val (used only for the end-of-training validation).
# Lesions of 20-60 mm (7-22 px at 128 px over 350 mm) instead of the default 8-60 mm: with a few minutes of
# CPU training, lesions of 3-5 px are not learnt at all by any model, which would make every row read ~0.
SYNTH_ARGS = ["--patients", "60", "--slices-per-patient", "8", "--seed", "0", "--image-size", "128",
              "--test-share", "0.2", "--val-share", "0.1", "--diameter-mm", "20", "60",
              "--negative-share", "0", "--variants", "0"]  # the set these tables were made with (no negatives)

# Training settings shared by every row (the demo's recipe for CPU training from scratch, with a shorter
# warm-up because a row makes only ~100-400 steps): AdamW lr 1e-3 with 20 warm-up steps, batch 8, no augmentation, text encoder frozen (MiniLM sentence features for LSMS and the
# FiLM U-Net alike; it also makes text rows faster). --epochs only sets the length of the poly schedule: the
# time limit ends every run long before, so the learning rate is ~constant after warm-up in all rows.
# Validation runs once, at the end (--val-every larger than any run), so it costs no training time and
# best.pt is simply the final model (no checkpoint selection on the split we report).
COMMON_TRAIN = ["--epochs", "100", "--batch-size", "8", "--lr", "1e-3", "--warmup-steps", "20",
                "--freeze-text", "--val-every", "100000", "--seed", "0", "--device", "cpu", "--amp", "off",
                "--no-progress", "--log-every", "5"]


@dataclass(frozen=True)
class Dataset:
    key: str
    name: str
    image_size: int
    eval_split: str
    has_text: bool
    text_levels: tuple[str, ...] = ("full",)
    max_tokens: int = 32
    extra_train: tuple[str, ...] = ()
    # the shared copy has a split leak that lsms refuses at load (docs/data.md): every command and load of the
    # dataset passes the allowance, so the recorded command lines show it
    allow_split_leak: bool = False


DATASETS = {
    # full expressions have a median of ~44 word-pieces: 64 tokens keep nearly all of them
    "synth": Dataset("synth", "RefLiver-Synth", 128, "test", True, ("full", "half", "quarter", "none"), 64),
    # one short description per radiograph (~25 word-pieces); 'none' shows how much the text is used
    # two radiographs are byte-identical copies in train and val (docs/data.md)
    "btxrd": Dataset("btxrd", "BTXRD", 128, "val", True, ("full", "none"), 32, allow_split_leak=True),
    "kvasir": Dataset("kvasir", "Kvasir-SEG", 128, "val", False),
}


@dataclass(frozen=True)
class Row:
    key: str  # "<dataset>/<name>"
    label: str
    preset: str
    text: bool
    model: tuple[str, ...] = ()  # --model KEY=VALUE overrides
    group: str = "main"  # main | ablation

    @property
    def dataset(self) -> str:
        return self.key.split("/", 1)[0]

    @property
    def folder(self) -> str:
        return self.key.replace("/", "-")


def _rows() -> list[Row]:
    rows = [
        Row("synth/lsms-tiny-text", "LSMS tiny, text", "tiny", True),
        Row("synth/lsms-tiny-notext", "LSMS tiny, no text", "tiny", False),
        Row("synth/unet", "U-Net (MONAI BasicUNet), no text", "unet", False),
        Row("synth/film-unet", "FiLM U-Net (late fusion), text", "film-unet", True),
        Row("synth/abl-no-fsd", "w/o FSD (decode F4 only)", "tiny", True, ("decoder=last",), "ablation"),
        Row("synth/abl-no-pm", "w/o pixel map", "tiny", True, ("pixel_map=false",), "ablation"),
        Row("synth/abl-d7", "single ConvUnit d=7", "tiny", True, ("conv_kernels=[7]",), "ablation"),
        Row("synth/abl-d11", "single ConvUnit d=11", "tiny", True, ("conv_kernels=[11]",), "ablation"),
        Row("synth/abl-d21", "single ConvUnit d=21", "tiny", True, ("conv_kernels=[21]",), "ablation"),
        Row("synth/abl-fsd-p1234", "FSD on P1..P4", "tiny", True, ("decoder_stages=[1,2,3,4]",), "ablation"),
        Row("btxrd/lsms-tiny-text", "LSMS tiny, text", "tiny", True),
        Row("btxrd/lsms-tiny-notext", "LSMS tiny, no text", "tiny", False),
        Row("btxrd/unet", "U-Net (MONAI BasicUNet), no text", "unet", False),
        Row("btxrd/film-unet", "FiLM U-Net (late fusion), text", "film-unet", True),
        Row("kvasir/lsms-tiny-notext", "LSMS tiny, no text", "tiny", False),
        Row("kvasir/unet", "U-Net (MONAI BasicUNet), no text", "unet", False),
    ]
    return rows


ROWS = _rows()


# --------------------------------------------------------------------------- commands


@dataclass
class Settings:
    budget_min: float
    threads: int
    cache: Path
    data: dict[str, Path] = field(default_factory=dict)


def data_paths(cache: Path, btxrd: Path, kvasir: Path) -> dict[str, Path]:
    return {"synth": cache / "data" / "refliver-synth", "btxrd": btxrd, "kvasir": kvasir}


LEAK_FLAG = "--allow-split-leak"


def allows_split_leak(dataset: str) -> bool:
    """Whether ``dataset`` (a DATASETS key) is loaded despite a known split leak (``load_samples(allow_split_leak)``)."""
    return DATASETS[dataset].allow_split_leak


def split_leak_flag(dataset: str) -> list[str]:
    """The ``lsms train`` / ``lsms evaluate`` / evaluate_levels.py flag that loads ``dataset`` despite its known
    split leak; nothing for a dataset without one."""
    return [LEAK_FLAG] if allows_split_leak(dataset) else []


def synth_command(path: Path) -> list[str]:
    return ["lsms", "synth", str(path), *SYNTH_ARGS, "--no-progress"]


def train_command(row: Row, s: Settings, time_limit: float | None = None, resume: bool = False) -> list[str]:
    ds = DATASETS[row.dataset]
    run = s.cache / row.folder
    if resume:
        return ["lsms", "train", "--resume", str(run), "--time-limit", f"{time_limit:g}", "--no-progress",
                *split_leak_flag(row.dataset)]
    cmd = ["lsms", "train", str(s.data[row.dataset]), "--out", str(run), "--preset", row.preset,
           "--image-size", str(ds.image_size), "--time-limit", f"{s.budget_min:g}", *COMMON_TRAIN, *ds.extra_train,
           *split_leak_flag(row.dataset)]
    if row.preset not in ("unet", "film-unet"):
        cmd.append("--text" if row.text else "--no-text")
    if row.text:
        cmd += ["--max-tokens", str(ds.max_tokens)]
    for m in row.model:
        cmd += ["--model", m]
    return cmd


def text_levels(row: Row) -> tuple[str, ...]:
    ds = DATASETS[row.dataset]
    return ds.text_levels if row.text else ("full",)


def eval_command(row: Row, s: Settings, level: str) -> list[str]:
    ds = DATASETS[row.dataset]
    run = s.cache / row.folder
    return ["lsms", "evaluate", str(run), str(s.data[row.dataset]), "--split", ds.eval_split,
            "--text-level", level, "--device", "cpu", "--json", str(run / f"eval-{ds.eval_split}-{level}.json"),
            *split_leak_flag(row.dataset)]


def evaluate_levels_command(row: Row, s: Settings, levels: list[str]) -> list[str]:
    ds = DATASETS[row.dataset]
    return [sys.executable, str(Path(__file__).with_name("evaluate_levels.py")), str(s.cache / row.folder),
            str(s.data[row.dataset]), "--split", ds.eval_split, "--levels", *levels, *split_leak_flag(row.dataset)]


def signature(row: Row, s: Settings) -> str:
    # the leak allowance changes what may be loaded, not what a row computes: rows cached before it stay valid
    parts = [[a for a in cmd if a != LEAK_FLAG]
             for cmd in (train_command(row, s), *[eval_command(row, s, lv) for lv in text_levels(row)])]
    if row.dataset == "synth":
        parts.append(SYNTH_ARGS)
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def shown(cmd: list[str], threads: int | None = None) -> str:
    """A command as one copy-pasteable line (paths relative to the repository where possible)."""
    def rel(a: str) -> str:
        try:
            return str(Path(a).resolve().relative_to(ROOT)) if a.startswith("/") else a
        except ValueError:
            return a

    env = f"OMP_NUM_THREADS={threads} " if threads else ""
    return env + " ".join(shlex.quote(rel(a)) for a in cmd)


# --------------------------------------------------------------------------- running

_print_lock = threading.Lock()


def say(msg: str) -> None:
    with _print_lock:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_logged(cmd: list[str], log: Path, threads: int) -> dict[str, float]:
    """Run ``cmd`` with ``threads`` torch/OpenMP threads (0: the default), output appended to ``log``; wall and CPU
    seconds."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    if threads:  # 0: the library's default
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    bindir = Path(sys.executable).parent  # the venv's lsms, whatever PATH says
    env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"\n$ {shown(cmd, threads)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = "".join(log.read_text(encoding="utf-8", errors="replace").splitlines(True)[-15:])
        raise RuntimeError(f"command failed ({proc.returncode}): {shown(cmd)}\n{tail}")
    return {"wall_s": time.perf_counter() - t0, "cpu_s": usage.ru_utime + usage.ru_stime}


def spent_seconds(run: Path) -> float:
    """Training seconds behind RUN/last.pt: the sum over sessions of each session's last time_s in metrics.csv
    (time_s restarted at 0 in a resumed session before checkpoints recorded the time spent)."""
    path = run / "metrics.csv"
    if not path.exists():
        return 0.0
    values: list[float] = []
    header: list[str] = []
    with open(path, encoding="utf-8", newline="") as f:
        for line in csv.reader(f):
            if not line:
                continue
            if line[0] == "epoch":  # a header (older train.py wrote a new one when the columns changed)
                header = line
            elif "time_s" in header and line[header.index("time_s")] != "":
                values.append(float(line[header.index("time_s")]))
    total, prev = 0.0, -1.0
    for v in values:
        if v < prev:
            total += prev
        prev = v
    return total + max(prev, 0.0)


def resume_limit(run: Path, budget_min: float, clock: str = "wall") -> float:
    """The ``--time-limit`` that resumes RUN/last.pt within ``budget_min`` minutes on ``clock``: the budget itself
    when the checkpoint records the time spent (``lsms train`` counts the limit over ``--resume``), else (a
    checkpoint of an older lsms) the wall minutes left by metrics.csv."""
    from lsms.checkpoint import load_checkpoint

    if load_checkpoint(run / "last.pt").get("time_spent") is not None:
        return budget_min
    if clock != "wall":
        raise SystemExit(f"{run / 'last.pt'} does not record the time spent (written by an lsms that did not count "
                         f"the time over --resume), so its {clock} minutes left are unknown: resume it by hand with "
                         f"'lsms train --resume {run} --time-limit MINUTES_LEFT --time-clock {clock}', or start the "
                         "row again with --fresh")
    return max(budget_min - spent_seconds(run) / 60, 0.05)


def train_or_resume(run: Path, key: str, budget_min: float, threads: int, ledger: dict[str, Any], ledger_path: Path,
                    resume_command: Callable[[float], list[str]], start_command: Callable[[], list[str]],
                    clock: str = "wall") -> None:
    """Train RUN unless it finished: resume its last.pt within ``budget_min`` minutes on ``clock`` (the time
    limit :func:`resume_limit` gives), or start it afresh; append the session (command, wall and CPU seconds,
    load before/after) to the ledger."""
    if (run / "summary.json").exists():
        return
    load_before = os.getloadavg()[0]
    if (run / "last.pt").exists():
        limit = resume_limit(run, budget_min, clock)
        cmd = resume_command(limit)
        say(f"{key}: resuming with --time-limit {limit:.2f} (budget {budget_min:g} {clock} min)")
    else:
        if run.exists():
            shutil.rmtree(run)
        cmd = start_command()
        say(f"{key}: training for {budget_min:g} {clock} min")
    usage = run_logged(cmd, run / "bench.log", threads)
    ledger["sessions"].append({"command": shown(cmd, threads), **usage,
                               "loadavg_1min_before_after": [load_before, os.getloadavg()[0]]})
    write_json(ledger_path, ledger)


def ensure_synth(path: Path, threads: int) -> None:
    """Generate the benchmark's RefLiver-Synth once (again if SYNTH_ARGS changed)."""
    stamp = path.parent / (path.name + ".args.json")
    if (path / "manifest.jsonl").exists() and stamp.exists() and json.loads(stamp.read_text()) == SYNTH_ARGS:
        return
    say(f"generating RefLiver-Synth in {path}")
    if path.exists():
        shutil.rmtree(path)
    run_logged(synth_command(path), path.parent / "synth.log", threads)
    write_json(stamp, SYNTH_ARGS)


def run_row(row: Row, s: Settings, fresh: bool = False) -> dict[str, Any]:
    """Train (or resume) and evaluate one row; returns its result (also written to CACHE/<row>/result.json)."""
    run = s.cache / row.folder
    result_path = run / "result.json"
    sig = signature(row, s)
    if result_path.exists() and not fresh:
        cached = json.loads(result_path.read_text())
        if cached.get("signature") == sig:
            say(f"{row.key}: cached")
            return cached
        say(f"{row.key}: settings changed since the cached run; running it again")
        fresh = True
    if fresh and run.exists():
        shutil.rmtree(run)
    log = run / "bench.log"
    ledger_path = run / "bench-ledger.json"
    ledger = json.loads(ledger_path.read_text()) if ledger_path.exists() else {"sessions": []}
    train_or_resume(run, row.key, s.budget_min, s.threads, ledger, ledger_path,
                    lambda left: train_command(row, s, time_limit=left, resume=True), lambda: train_command(row, s))
    summary = json.loads((run / "summary.json").read_text())
    # all text levels in one process (the same functions as lsms evaluate, the model loaded once)
    ds = DATASETS[row.dataset]
    missing = [lv for lv in text_levels(row) if not (run / f"eval-{ds.eval_split}-{lv}.json").exists()]
    if missing:
        run_logged(evaluate_levels_command(row, s, missing), log, s.threads)
    evals = {lv: json.loads((run / f"eval-{ds.eval_split}-{lv}.json").read_text()) for lv in text_levels(row)}
    config = json.loads((run / "config.json").read_text())
    result = {
        "row": row.key, "label": row.label, "group": row.group, "dataset": ds.name, "preset": row.preset,
        "text": row.text, "model_overrides": list(row.model), "image_size": ds.image_size,
        "eval_split": ds.eval_split, "budget_min": s.budget_min, "threads": s.threads,
        "signature": sig,
        "commands": {"train": shown(train_command(row, s), s.threads),
                     "evaluate": [shown(eval_command(row, s, lv), s.threads) for lv in text_levels(row)],
                     "evaluate_as_run": shown(["python", "benchmarks/evaluate_levels.py",
                                               *evaluate_levels_command(row, s, list(text_levels(row)))[2:]],
                                              s.threads)},
        "training": {"steps": summary["step"], "epochs_done": summary["step"] / max(1, _steps_per_epoch(run)),
                     "train_s": sum(x["wall_s"] for x in ledger["sessions"]),
                     "cpu_s": sum(x["cpu_s"] for x in ledger["sessions"]),
                     "sessions": ledger["sessions"], "stopped_by_time_limit": summary.get("stopped_early")},
        "params": _params(config),
        "eval": {lv: {k: v for k, v in e.items() if k not in ("checkpoint", "data")} for lv, e in evals.items()},
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    write_json(result_path, result)
    e = evals["full"]
    say(f"{row.key}: done, {summary['step']} steps, Dice {e['Dice']:.4f} mIoU {e['mIoU']:.4f}")
    return result


def _steps_per_epoch(run: Path) -> int:
    """From the run's log (the 'training ... N steps/epoch' line)."""
    for line in (run / "bench.log").read_text(encoding="utf-8", errors="replace").splitlines():
        if "steps/epoch" in line:
            words = line.split()
            return int(words[words.index("steps/epoch,") - 1])
    return 0


def _params(config: dict[str, Any]) -> dict[str, Any]:
    """The row's model settings from RUN/config.json (the model spec; runs before it hold the settings tree, and
    lsms 0.1 runs a flat 'model')."""
    m = config["spec"]["model"] if "spec" in config else config["run"]["model"] if "run" in config else config["model"]
    if "text" in m:
        m = {**m, "freeze_text": m["text"]["freeze"], "max_tokens": m["text"]["max_tokens"]}
    return {k: m.get(k) for k in ("preset", "use_text", "decoder", "decoder_stages", "conv_kernels", "pixel_map",
                                  "freeze_text", "max_tokens", "features") if k in m}


# --------------------------------------------------------------------------- cost per row


def row_gmacs(row: Row) -> dict[str, float]:
    """GMACs per image at the row's training size (counted as in lsms profile / cost.py) and parameters."""
    import torch

    from lsms.model import build_model, count_parameters
    from lsms.profile import count_flops, profile_inputs

    ds = DATASETS[row.dataset]
    overrides: dict[str, Any] = {}
    for m in row.model:
        import yaml

        k, v = m.split("=", 1)
        overrides[k] = yaml.safe_load(v)
    if row.preset not in ("unet", "film-unet"):
        overrides["use_text"] = row.text
    if row.text:
        overrides["text"] = {**overrides.get("text", {}), "max_tokens": ds.max_tokens}
    channels = 1 if row.dataset == "synth" else 3
    model = build_model(row.preset, in_channels=channels, **overrides).eval()
    inputs = profile_inputs(model, ds.image_size, 1, torch.device("cpu"))
    with torch.inference_mode():
        flops = count_flops(model.forward_features, *inputs)  # the architecture, as lsms profile counts it
    text = count_parameters(model.text_encoder) if getattr(model, "text_encoder", None) is not None else 0
    return {"gmacs": round(flops / 2e9, 3), "params_m": round(count_parameters(model) / 1e6, 3),
            "params_vision_m": round((count_parameters(model) - text) / 1e6, 3)}


# --------------------------------------------------------------------------- report


def fmt(v: Any, digits: int = 3) -> str:
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) else "-"


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    rows = report["rows"]
    lines = [
        "# Accuracy: LSMS, ablations and baselines at an equal training budget",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, no GPU, torch {m['torch']}; {report['threads']} torch "
        f"thread(s) per run, {report['jobs']} runs in parallel (other work was also running on the machine: "
        "see 'CPU s', the CPU time each run actually got). "
        f"Date: {report['date']}.",
        "",
        f"**Budget: {report['budget_min']:g} minutes of training per row** (wall clock, `lsms train --time-limit`), "
        "from scratch (random visual weights; frozen pretrained MiniLM sentence encoder for the text models). This is "
        "far below the paper's 100 epochs: every number here is an early-training snapshot, not a converged model.",
        "",
        f"Command: `{report['command']}`",
        "",
        "Metrics (lsms evaluate): Dice and mIoU are means over expressions of the per-sample Dice / IoU; oIoU is the "
        "overall IoU (summed intersections / summed unions); RefAcc is referring accuracy (the referred lesion is "
        "the one the prediction overlaps most), 'multi' on slices with 2+ lesions only. Text levels: the same "
        "weights given the half / quarter expression or an empty sentence ('none'). GMACs per image at the training "
        "size, counted like `lsms profile` (text encoder included). Steps: optimiser steps of batch 8 done within the "
        "budget. CPU s: CPU seconds the training process got (start-up and the end-of-training validation "
        "included): with other work on the machine, an equal wall-clock budget did not mean equal CPU.",
        "",
    ]
    for key, ds in DATASETS.items():
        ds_rows = [r for r in rows.values() if r["row"].startswith(key + "/")]
        if not ds_rows:
            continue
        lines += [f"## {ds.name} ({ds.eval_split} split, {ds.image_size}x{ds.image_size})", ""]
        if key == "synth":
            lines += [f"Generated by `{shown(synth_command(Path('runs/bench/data/refliver-synth')))}` "
                      f"({report.get('synth_counts', '')}). Trained on train, scored on test (held-out patients).", ""]
        levels = [lv for lv in ds.text_levels if lv != "full"]
        for group in ("main", "ablation"):
            g_rows = [r for r in ds_rows if r["group"] == group]
            if not g_rows:
                continue
            if group == "ablation":
                lines += ["### Ablations (Table III analogues; all LSMS tiny with text, one change each; "
                          "reference: the 'LSMS tiny, text' row above)", ""]
            head = ["row", "model", "text", "params (M)", "GMACs", "steps", "CPU s", "Dice", "mIoU", "oIoU"]
            if key == "synth":
                head += ["RefAcc", "RefAcc multi"]
            head += [f"Dice {lv}" for lv in levels]
            lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            for r in g_rows:
                e = r["eval"]["full"]
                cost = r.get("cost", {})
                cells = [f"`{r['row'].split('/', 1)[1]}`", r["label"], "yes" if r["text"] else "no",
                         fmt(cost.get("params_m"), 2), fmt(cost.get("gmacs"), 2), str(r["training"]["steps"]),
                         f"{r['training']['cpu_s']:.0f}", fmt(e["Dice"]), fmt(e["mIoU"]), fmt(e["oIoU"])]
                if key == "synth":
                    cells += [fmt(e.get("referring_accuracy")), fmt(e.get("referring_accuracy_multi"))]
                cells += [fmt(r["eval"][lv]["Dice"]) if lv in r["eval"] else "-" for lv in levels]
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
    lines += ["## Commands of every row", "",
              "Each row: the training command, then one evaluation per text level (run from the repository root; "
              "`runs/bench` is the cache folder).", ""]
    for r in rows.values():
        lines.append(f"- `{r['row']}`: `{r['commands']['train']}`")
        for c in r["commands"]["evaluate"]:
            lines.append(f"  then `{c}`")
    stem = report["out_name"]
    lines += ["", f"Plots: [{stem}_vs_gflops.png]({stem}_vs_gflops.png), "
              f"[{stem}_training_curves.png]({stem}_training_curves.png).", ""]
    return "\n".join(lines)


def plots(report: dict[str, Any], cache: Path, out: Path) -> list[str]:
    """OUT_vs_gflops.png (Dice vs GMACs per row) and OUT_training_curves.png next to OUT.md."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    keys = [k for k in DATASETS if any(r.startswith(k + "/") for r in rows)]
    written = []
    # Dice vs GMACs
    fig, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys), 4.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for r in rows.values():
            if not r["row"].startswith(key + "/") or "gmacs" not in r.get("cost", {}):
                continue
            marker = "o" if r["group"] == "main" else "^"
            color = "tab:red" if r["preset"] not in ("unet", "film-unet") and r["text"] else (
                "tab:blue" if r["text"] else "tab:gray")
            ax.scatter(r["cost"]["gmacs"], r["eval"]["full"]["Dice"], marker=marker, color=color)
            ax.annotate(r["row"].split("/", 1)[1], (r["cost"]["gmacs"], r["eval"]["full"]["Dice"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        ds = DATASETS[key]
        ax.set_title(f"{ds.name} ({ds.eval_split}, {ds.image_size}px)")
        ax.set_xlabel("GMACs per image (training size)")
        ax.set_ylabel("Dice")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Dice vs compute, {report['budget_min']:g} min CPU training per row "
                 "(red: LSMS with text, blue: FiLM U-Net, grey: no text; triangles: ablations)", fontsize=9)
    fig.tight_layout()
    path = out.parent / f"{out.name}_vs_gflops.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(str(path))
    # training curves: the Dice term of the training loss (1 - soft Dice), every --log-every steps, against the
    # step and against training minutes (summed from the logged images/s of each interval)
    fig, axes = plt.subplots(2, len(keys), figsize=(5.2 * len(keys), 7.6), squeeze=False)
    for col, key in enumerate(keys):
        top, bottom = axes[0][col], axes[1][col]
        for r in rows.values():
            if not r["row"].startswith(key + "/"):
                continue
            curve = _curve(cache / r["row"].replace("/", "-") / "log.jsonl")
            if curve is None:
                continue
            steps, minutes, values = curve
            style = {"label": r["row"].split("/", 1)[1], "lw": 1.2, "ls": "-" if r["group"] == "main" else "--"}
            top.plot(steps, values, **style)
            bottom.plot(minutes, values, **style)
        ds = DATASETS[key]
        top.set_title(f"{ds.name}: training Dice loss")
        top.set_xlabel("optimiser step (batch 8)")
        bottom.set_xlabel("training minutes (from logged images/s)")
        for ax in (top, bottom):
            ax.set_ylabel("1 - soft Dice (train, 5-point mean)")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    fig.tight_layout()
    path = out.parent / f"{out.name}_training_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(str(path))
    return written


def _curve(log: Path) -> tuple[list[int], list[float], list[float]] | None:
    """(steps, training minutes, 5-point running mean of the Dice loss) from a run's log.jsonl step lines."""
    if not log.exists():
        return None
    steps: list[int] = []
    minutes: list[float] = []
    values: list[float] = []
    elapsed, prev_step = 0.0, 0
    for line in log.read_text().splitlines():
        entry = json.loads(line)
        if entry.get("kind") != "step" or "dice" not in entry:
            continue
        rate = entry.get("images_per_s") or 0.0
        elapsed += (entry["step"] - prev_step) * 8 / rate / 60 if rate > 0 else 0.0
        prev_step = entry["step"]
        steps.append(entry["step"])
        minutes.append(elapsed)
        values.append(entry["dice"])
    if not steps:
        return None
    smooth = [sum(values[max(0, i - 4):i + 1]) / len(values[max(0, i - 4):i + 1]) for i in range(len(values))]
    return steps, minutes, smooth


def write_report(results: dict[str, dict[str, Any]], args: argparse.Namespace, s: Settings) -> None:
    report: dict[str, Any] = {
        # --report-only reruns nothing: the command that makes (or, with the cache, re-reads) these rows is the same
        # line without it
        "machine": machine(), "date": time.strftime("%Y-%m-%d"),
        "command": command_line().replace(" --report-only", ""),
        "budget_min": s.budget_min, "threads": s.threads, "jobs": args.jobs,
        "synth_command": shown(synth_command(Path("runs/bench/data/refliver-synth"))),
        "common_train_args": COMMON_TRAIN, "out_name": Path(args.out).name, "rows": {},
    }
    report["machine"]["torch_threads"] = s.threads
    card = s.data["synth"] / "dataset.json"
    if card.exists():
        counts = json.loads(card.read_text())["counts"]
        sp = counts["splits"]
        report["synth_counts"] = (f"{counts['slices']} slices; train {sp['train']['expressions']} / val "
                                  f"{sp['val']['expressions']} / test {sp['test']['expressions']} expressions; "
                                  f"multi-lesion share {counts['multi_lesion_share']:.2f}")
    order = [r.key for r in ROWS]
    for key in sorted(results, key=lambda k: order.index(k) if k in order else len(order)):
        report["rows"][key] = results[key]
    out = Path(args.out)
    write_json(report_path(out, ".json"), report)
    write_atomic(report_path(out, ".md"), markdown(report))
    written = plots(report, s.cache, out)
    say(f"wrote {report_path(out, '.json')}, {report_path(out, '.md')}, {', '.join(written)}")


def select(patterns: list[str] | None) -> list[Row]:
    if not patterns:
        return list(ROWS)
    chosen = [r for r in ROWS if any(p in r.key or fnmatch.fnmatch(r.key, p) for p in patterns)]
    if not chosen:
        raise SystemExit(f"no row matches {patterns}; rows: {[r.key for r in ROWS]}")
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", metavar="PATTERN",
                        help="rows whose key contains PATTERN (or matches it as a glob), e.g. synth/ 'btxrd/*unet'")
    parser.add_argument("--budget-min", type=float, default=4.5, help="training minutes per row (default 4.5)")
    parser.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads per run (default 1)")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (default 2)")
    parser.add_argument("--cache", default=str(DEFAULT_CACHE), help="run folders and per-row results (default runs/bench)")
    parser.add_argument("--out", default=str(RESULTS / "accuracy"), help="output path without extension")
    parser.add_argument("--btxrd", default=str(SHARED_DATA / "btxrd"), help="BTXRD in the LViT layout")
    parser.add_argument("--kvasir", default=str(SHARED_DATA / "kvasir-seg"), help="Kvasir-SEG (train/ and val/)")
    parser.add_argument("--fresh", action="store_true", help="discard the selected rows' cached runs and rerun them")
    parser.add_argument("--report-only", action="store_true", help="write tables and plots from cached rows; run nothing")
    parser.add_argument("--list", action="store_true", help="print the rows and their commands, run nothing")
    args = parser.parse_args()
    if args.budget_min <= 0 or args.threads < 1 or args.jobs < 1:
        parser.error("--budget-min must be > 0, --threads and --jobs >= 1")
    cache = Path(args.cache).resolve()
    s = Settings(args.budget_min, args.threads, cache, data_paths(cache, Path(args.btxrd), Path(args.kvasir)))
    rows = select(args.rows)
    if args.list:
        print(shown(synth_command(s.data["synth"])))
        for r in rows:
            print(f"{r.key}:\n  {shown(train_command(r, s), s.threads)}")
            for lv in text_levels(r):
                print(f"  {shown(eval_command(r, s, lv), s.threads)}")
        return
    results: dict[str, dict[str, Any]] = {}
    if not args.report_only:
        if any(r.dataset == "synth" for r in rows):
            ensure_synth(s.data["synth"], s.threads)
        failures = []

        def one(row: Row) -> None:
            try:
                results[row.key] = run_row(row, s, fresh=args.fresh)
            except Exception as err:  # a failed row must not stop the others
                failures.append(row.key)
                say(f"{row.key}: FAILED: {err}")

        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(one, rows))
        if failures:
            say(f"failed rows: {failures} (rerun to retry; finished rows are cached)")
    # the report covers every cached row whose settings match, not only the ones run now
    for r in ROWS:
        path = cache / r.folder / "result.json"
        if r.key not in results and path.exists():
            cached = json.loads(path.read_text())
            if cached.get("signature") == signature(r, s):
                results[r.key] = cached
    for key, res in results.items():
        if "cost" not in res:
            res["cost"] = row_gmacs(next(r for r in ROWS if r.key == key))
            write_json(cache / key.replace("/", "-") / "result.json", res)
    if results:
        write_report(results, args, s)


if __name__ == "__main__":
    main()
