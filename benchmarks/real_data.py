"""Real images with the real-data recipes: BTXRD (radiographs + sentences) and Kvasir-SEG (endoscopy, no text),
LSMS tiny against MONAI's U-Net and the FiLM text U-Net, on the CPU.

    python benchmarks/real_data.py --rows btxrd/cpu/lsms-tiny-text --seed 0   # train + evaluate rows
    python benchmarks/real_data.py --rows kvasir/cpu/unet --seed 1
    python benchmarks/real_data.py --report          # docs/results/real-data-runs.{md,json} + plots from all rows

Two kinds of rows. The CPU rows (``<dataset>/cpu/<model>``) are ``lsms train DATA --recipe real-cpu --schedule
time --time-limit BUDGET --time-clock cpu ...``: the budget (``--budget-min``) is CPU minutes, so rows trained
on a busy machine get the same compute, and the learning rate decays over it. The older rows (``--recipe real``)
have a wall-clock budget. Each training is followed by an evaluation of the run's last.pt on the val split (text
rows: with the sentence and with an empty sentence, same weights). A row's folder (CACHE/real/<row>/seed<k>) is
reused: a finished row is only evaluated again if an evaluation is missing; an interrupted one resumes from its
last.pt (``lsms train`` counts the time limit over ``--resume``, so it gets what is left); a finished run made by
hand with the row's command (summary.json, no bench-ledger.json) is taken as it is, its times from its summary.json.
Each row records wall and CPU seconds and the machine load before and after, and ``--report`` writes
docs/results/real-data-runs.{json,md} with the table, the learning curves, Dice against minutes and overlays of good
and bad BTXRD cases with their sentences.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accuracy import (
    DEFAULT_CACHE,
    SHARED_DATA,
    allows_split_leak,
    run_logged,
    say,
    shown,
    split_leak_flag,
    train_or_resume,
)

from common import RESULTS, command_line, machine, report_path, write_atomic, write_json


@dataclass(frozen=True)
class Dataset:
    path: str  # under SHARED_DATA
    # the rest is for the `real` rows; the `real-cpu` recipe sets its image size and the CPU rows their epochs
    image_size: int  # whole-image size (inference); patches come from the recipe (224)
    epochs: int  # poly-schedule length of LSMS rows, so that the schedule ends near the budget (rows may differ)
    val_every: int
    text: bool


DATASETS = {
    "btxrd": Dataset("btxrd", 448, 4, 2, True),
    "kvasir": Dataset("kvasir-seg", 256, 9, 3, False),
}


@dataclass(frozen=True)
class Row:
    dataset: str
    preset: str  # tiny | unet | film-unet
    text: bool
    label: str
    extra: tuple[str, ...] = field(default_factory=tuple)  # more `lsms train` flags (ablations)
    epochs: int | None = None  # None: the dataset's; faster models fit more epochs in the same minutes
    recipe: str = "real"  # real: a wall-clock budget; real-cpu: a CPU-minute budget (--time-clock cpu)

    @property
    def clock(self) -> str:
        """What the row's budget counts (``lsms train --time-clock``)."""
        return "cpu" if self.recipe == "real-cpu" else "wall"


def cpu_row(dataset: str, preset: str, text: bool, label: str, epochs: int) -> Row:
    """A row of the CPU recipe; ``epochs`` only bounds the run (the time schedule ends it), so it is chosen to
    outlast 60 CPU-minutes: BTXRD has 163 steps per epoch, Kvasir-SEG 87; an LSMS tiny step takes 1.5 (Kvasir-SEG)
    to 2 (BTXRD, with the sentence) CPU-s in bf16, a U-Net step about half."""
    return Row(dataset, preset, text, label, epochs=epochs, recipe="real-cpu")


# --recipe real at whole 224 px images without patches or scale/rotation: exactly the settings of --recipe real-cpu
WHOLE_224 = ("--image-size", "224", "--augmentation", "patch_size=224", "--augmentation", "foreground_p=0",
             "--augmentation", "spatial_p=0")

ROWS = {
    "btxrd/lsms-tiny-text": Row("btxrd", "tiny", True, "LSMS tiny, sentence"),
    "btxrd/lsms-tiny-notext": Row("btxrd", "tiny", False, "LSMS tiny, no-text model"),
    "btxrd/film-unet": Row("btxrd", "film-unet", True, "FiLM U-Net, sentence", epochs=6),
    "btxrd/unet": Row("btxrd", "unet", False, "U-Net (MONAI), no text", epochs=12),
    "btxrd/lsms-tiny-text-nocoord": Row("btxrd", "tiny", True, "LSMS tiny, sentence, w/o positions",
                                        ("--model", "coord_embed=false")),
    "btxrd/lsms-tiny-text-whole224": Row("btxrd", "tiny", True, "LSMS tiny, sentence, whole 224 px images, light aug.",
                                         WHOLE_224, epochs=3),
    "btxrd/lsms-tiny-notext-whole224": Row("btxrd", "tiny", False, "LSMS tiny, no-text model, whole 224 px images, "
                                           "light aug.", WHOLE_224, epochs=3),
    "kvasir/lsms-tiny-notext": Row("kvasir", "tiny", False, "LSMS tiny, no text"),
    "kvasir/unet": Row("kvasir", "unet", False, "U-Net (MONAI)", epochs=20),
    "btxrd/cpu/lsms-tiny-text": cpu_row("btxrd", "tiny", True, "LSMS tiny, sentence", 30),
    "btxrd/cpu/lsms-tiny-notext": cpu_row("btxrd", "tiny", False, "LSMS tiny, no-text model", 30),
    "btxrd/cpu/unet": cpu_row("btxrd", "unet", False, "U-Net (MONAI), no text", 80),
    "btxrd/cpu/film-unet": cpu_row("btxrd", "film-unet", True, "FiLM U-Net, sentence", 80),
    "kvasir/cpu/lsms-tiny-notext": cpu_row("kvasir", "tiny", False, "LSMS tiny, no text", 40),
    "kvasir/cpu/unet": cpu_row("kvasir", "unet", False, "U-Net (MONAI)", 120),
}
CPU_VAL_EVERY = 2  # the CPU rows validate every second epoch


@dataclass
class Settings:
    cache: Path
    budget_min: float
    threads: int
    seed: int


def row_folder(cache: Path, key: str, seed: int) -> Path:
    return cache / "real" / key / f"seed{seed}"


def run_dir(key: str, s: Settings) -> Path:
    return row_folder(s.cache, key, s.seed)


def data_path(row: Row) -> Path:
    return SHARED_DATA / DATASETS[row.dataset].path


def val_records(row: Row) -> list[Any]:
    """The val records of a row's dataset, loaded as its commands load them (a known split leak allowed)."""
    from lsms.data import load_samples

    return load_samples(data_path(row), split="val", allow_split_leak=allows_split_leak(row.dataset))


def train_command(key: str, s: Settings, time_limit: float | None = None, resume: bool = False) -> list[str]:
    """The row's ``lsms train`` command: the start, or (``resume``) the resume of its last.pt with ``time_limit``
    minutes (default: the budget)."""
    if ROWS[key].recipe == "real-cpu":
        return cpu_train_command(key, s, time_limit, resume)
    row, ds = ROWS[key], DATASETS[ROWS[key].dataset]
    run = run_dir(key, s)
    limit = f"{time_limit if time_limit is not None else s.budget_min:g}"
    schedule = ["--epochs", str(row.epochs or ds.epochs), "--time-limit", limit]
    if resume:  # the schedule is given again, so that it follows DATASETS
        return ["lsms", "train", "--resume", str(run), *schedule, "--no-progress", *split_leak_flag(row.dataset)]
    return ["lsms", "train", str(data_path(row)), "--out", str(run), "--recipe", "real", "--preset", row.preset,
            "--text" if row.text else "--no-text", "--image-size", str(ds.image_size),
            *schedule, "--val-every", str(ds.val_every),
            "--freeze-text", "--max-tokens", "48", "--seed", str(s.seed), "--threads", str(s.threads),
            "--device", "cpu", "--amp", "off", "--no-progress", "--log-every", "10", *split_leak_flag(row.dataset),
            *row.extra]


def cpu_train_command(key: str, s: Settings, time_limit: float | None = None, resume: bool = False) -> list[str]:
    """A CPU row's command: the recipe and ``--amp auto`` decide image size and precision; the time schedule and
    the CPU-minute limit end the run (the same limit on resume: the checkpoint counts the time spent)."""
    row, run = ROWS[key], run_dir(key, s)
    budget = ["--time-limit", f"{time_limit if time_limit is not None else s.budget_min:g}", "--time-clock", "cpu"]
    if resume:
        return ["lsms", "train", "--resume", str(run), *budget, "--no-progress", *split_leak_flag(row.dataset)]
    preset = [] if row.preset == "tiny" else ["--preset", row.preset]
    return ["lsms", "train", str(data_path(row)), "--out", str(run), "--recipe", row.recipe,
            "--text" if row.text else "--no-text", *preset, "--epochs", str(row.epochs), "--schedule", "time",
            *budget, "--threads", str(s.threads), "--seed", str(s.seed), "--val-every", str(CPU_VAL_EVERY),
            "--no-progress", *split_leak_flag(row.dataset), *row.extra]


def levels(row: Row) -> list[str]:
    return ["full", "none"] if row.text else ["full"]


def eval_command(key: str, s: Settings) -> list[str]:
    row = ROWS[key]
    return ["python", str(Path(__file__).with_name("evaluate_levels.py")), str(run_dir(key, s)), str(data_path(row)),
            "--split", "val", "--prefer", "last", "--levels", *levels(row), *split_leak_flag(row.dataset)]


def run_row(key: str, s: Settings, fresh: bool = False) -> dict[str, Any]:
    """Train (or resume) and evaluate one row; the result goes to its folder's result.json."""
    row = ROWS[key]
    run = run_dir(key, s)
    if fresh and run.exists():
        shutil.rmtree(run)
    log = run / "bench.log"
    ledger_path = run / "bench-ledger.json"
    ledger = read_ledger(key, s)
    train_or_resume(run, key, s.budget_min, s.threads, ledger, ledger_path,
                    lambda limit: train_command(key, s, time_limit=limit, resume=True), lambda: train_command(key, s),
                    clock=row.clock)
    if not all(evaluated(run, lv) for lv in levels(row)):
        cmd = eval_command(key, s)
        usage = run_logged(cmd, log, s.threads)
        ledger["evaluation"] = {"command": shown(cmd, s.threads), **usage}
        write_json(ledger_path, ledger)
    summary = json.loads((run / "summary.json").read_text())
    evals = {lv: json.loads((run / f"eval-val-{lv}.json").read_text()) for lv in levels(row)}
    wall_s, cpu_s = training_seconds(row, summary, ledger)
    result = {
        "row": key, "label": row.label, "dataset": row.dataset, "preset": row.preset, "text": row.text,
        "recipe": row.recipe, "clock": row.clock, "seed": s.seed, "budget_min": s.budget_min, "threads": s.threads,
        "commands": {"train": shown(train_command(key, s), s.threads), "evaluate": shown(eval_command(key, s), s.threads)},
        "training": {"steps": summary["step"], "epochs_done": summary["epoch"], "train_s": wall_s, "cpu_s": cpu_s,
                     "sessions": ledger["sessions"], "stopped_by_time_limit": summary.get("stopped_early")},
        "evaluation": ledger.get("evaluation"),
        "eval": {lv: {k: v for k, v in e.items() if k not in ("checkpoint", "data")} for lv, e in evals.items()},
        "curve": read_curve(run),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    write_json(run / "result.json", result)
    say(f"{key} seed {s.seed}: {summary['step']} steps, val Dice {evals['full']['Dice']:.4f}"
        + (f" (empty sentence {evals['none']['Dice']:.4f})" if "none" in evals else ""))
    return result


def evaluated(run: Path, level: str) -> bool:
    """Whether RUN holds the row's evaluation at ``level``: of its last.pt (one of best.pt, say made by hand, is
    made again)."""
    path = run / f"eval-val-{level}.json"
    return path.exists() and Path(json.loads(path.read_text()).get("checkpoint") or "").name == "last.pt"


def read_ledger(key: str, s: Settings) -> dict[str, Any]:
    """The row's bench-ledger.json; for a finished run made by hand (summary.json, no ledger) a new one with that
    run as one session, its seconds from summary.json."""
    run = run_dir(key, s)
    path = run / "bench-ledger.json"
    if path.exists():
        return json.loads(path.read_text())
    if not (run / "summary.json").exists():
        return {"sessions": []}
    check_made_by_hand(key, s)
    summary = json.loads((run / "summary.json").read_text())
    ledger = {"sessions": [{"command": None, "note": "run by hand: see config.json", "wall_s": summary["time_s"],
                            "cpu_s": summary["cpu_s"], "loadavg_1min_before_after": [None, None]}]}
    write_json(path, ledger)
    say(f"{key} seed {s.seed}: a finished run made by hand; taken as it is")
    return ledger


def check_made_by_hand(key: str, s: Settings) -> None:
    """A run folder made by hand holds the row's run: its config.json has the row's model, budget and seed."""
    row, path = ROWS[key], run_dir(key, s) / "config.json"
    try:
        config = json.loads(path.read_text())
        run, model = config["run"], config["spec"]["model"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SystemExit(f"{path}: not the config.json of an lsms run ({type(err).__name__}: {err}); the folder has a "
                         "summary.json but no bench-ledger.json, so it was taken for a run made by hand") from None
    want = {"preset": row.preset, "use_text": row.text, "time_limit_minutes": s.budget_min,
            "time_clock": row.clock, "seed": s.seed}
    have = {"preset": model.get("preset"), "use_text": model.get("use_text"),
            "time_limit_minutes": run.get("time_limit_minutes"), "time_clock": run.get("time_clock", "wall"),
            "seed": run.get("seed")}
    wrong = [f"{k} is {have[k]!r}, the row's is {v!r}" for k, v in want.items() if have[k] != v]
    if wrong:
        raise SystemExit(f"{path}: this run is not row {key} seed {s.seed} with --budget-min {s.budget_min:g} ("
                         + "; ".join(wrong) + "); move the folder away, or give the --seed / --budget-min it was "
                         f"run with. The row's command: {shown(train_command(key, s))}")


def training_seconds(row: Row, summary: dict[str, Any], ledger: dict[str, Any]) -> tuple[float, float]:
    """(wall, CPU) seconds of a row's training: for the CPU rows the run's own count over all its sessions
    (summary.json, what the budget counted), for the others the sum over the ledger's sessions."""
    if row.clock == "cpu":
        return summary["time_s"], summary["cpu_s"]
    return sum(x["wall_s"] for x in ledger["sessions"]), sum(x["cpu_s"] for x in ledger["sessions"])


def read_curve(run: Path) -> list[dict[str, float]]:
    """(minutes, step, train loss, val Dice) per epoch row of metrics.csv (time restarted in resumed sessions of
    runs from before checkpoints recorded the time spent)."""
    rows, offset, prev = [], 0.0, 0.0
    with open(run / "metrics.csv", encoding="utf-8", newline="") as f:
        for r in csv.DictReader(f):
            t = float(r["time_s"])
            if t < prev:
                offset += prev
            prev = t
            rows.append({"minutes": (offset + t) / 60, "step": int(r["step"]), "train_loss": float(r["train_loss"]),
                         "val_dice": float(r["val_Dice"]) if r.get("val_Dice") else None})
    return rows


# --------------------------------------------------------------------------- report


def collect(cache: Path) -> list[dict[str, Any]]:
    """Every row's result (CACHE/real/<row>/seed<k>/result.json; a row's key may hold slashes)."""
    return [json.loads(p.read_text()) for p in sorted((cache / "real").rglob("seed*/result.json"))]


def result_folder(result: dict[str, Any], cache: Path) -> Path:
    return row_folder(cache, result["row"], result["seed"])


def budget_text(result: dict[str, Any]) -> str:
    """The recipe and the budget on its clock, e.g. "`real-cpu`, 60 CPU-min" (results from before the CPU rows:
    `real`, wall minutes)."""
    clock = "CPU" if result.get("clock", "wall") == "cpu" else "wall"
    return f"`{result.get('recipe', 'real')}`, {result['budget_min']:g} {clock}-min"


def mean_spread(values: list[float]) -> str:
    """Mean (min-max) over seeds."""
    if len(values) == 1:
        return f"{values[0]:.3f} (1 seed)"
    return f"{sum(values) / len(values):.3f} ({min(values):.3f}-{max(values):.3f}, {len(values)} seeds)"


def mean_table(results: list[dict[str, Any]]) -> list[str]:
    """Markdown rows: each row's val Dice (and Dice with an empty sentence) over its seeds, per budget."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["row"], budget_text(r)), []).append(r)
    lines = ["| row | recipe, budget | val Dice | Dice, empty sentence |", "|---|---|---|---|"]
    for (key, budget), rs in groups.items():
        full = mean_spread([r["eval"]["full"]["Dice"] for r in rs])
        none = mean_spread([r["eval"]["none"]["Dice"] for r in rs]) if "none" in rs[0]["eval"] else "-"
        lines.append(f"| {key} | {budget} | {full} | {none} |")
    return lines


def cost(result: dict[str, Any], cache: Path, size: int = 224) -> tuple[float, float]:
    """(million parameters, GMACs per image at ``size`` px, with the sentence for text models) of a row's model."""
    import torch

    from lsms.checkpoint import load_trained
    from lsms.profile import count_flops, profile_inputs

    model, _, _ = load_trained(result_folder(result, cache), "cpu", prefer="last")
    with torch.no_grad():
        flops = count_flops(model.forward_features, *profile_inputs(model, size, 1, torch.device("cpu")))
    return sum(p.numel() for p in model.parameters()) / 1e6, flops / 2e9


def markdown(results: list[dict[str, Any]], cache: Path) -> str:
    m = machine()
    lines = [
        "# Real images: BTXRD and Kvasir-SEG, the runs (CPU)",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, no GPU, torch {m['torch']}. Each row trains from scratch "
        "(random visual weights; LSMS and FiLM U-Net read the sentence through the packaged MiniLM, frozen in the "
        "`real` rows, trained at a tenth of the learning rate in the `real-cpu` rows) with its "
        "recipe (and the row's changes, in its commands) for the time budget given, then evaluates the run's "
        "last.pt on the val split. `real` rows have a budget of wall minutes; `real-cpu` rows one of CPU minutes "
        "(`--time-clock cpu`, the time schedule ending with it), so that a busy machine does not shorten them. "
        "Dice and mIoU are means over the val images of the per-image Dice / IoU (`lsms evaluate`).",
        "",
        "Cost: parameters (with the text encoder) and GMACs of one 224 px forward (a training patch) from the code "
        "(`lsms.profile.count_flops`). Load: the 1-minute load average before/after each training session (the "
        "machine was shared with other work; CPU minutes say how much the row got).",
        "",
        "| dataset | row | seed | params (M) | GMACs @224 | recipe, budget (x threads) | steps | CPU min | load before/after | val Dice | Dice, empty sentence | mIoU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        t, e = r["training"], r["eval"]
        loads = "; ".join("/".join("?" if v is None else f"{v:.1f}" for v in s["loadavg_1min_before_after"])
                          for s in t["sessions"])
        none = f"{e['none']['Dice']:.4f}" if "none" in e else "-"
        params, gmacs = cost(r, cache)
        lines.append(f"| {r['dataset']} | {r['label']} | {r['seed']} | {params:.1f} | {gmacs:.2f} | "
                     f"{budget_text(r)} x {r['threads']} | "
                     f"{t['steps']} | {t['cpu_s'] / 60:.1f} | {loads} | {e['full']['Dice']:.4f} | {none} | "
                     f"{e['full']['mIoU']:.4f} |")
    lines += ["", "Mean (min-max) over seeds:", "", *mean_table(results)]
    by_size = dice_by_lesion_size(results, cache)
    if by_size:
        lines += ["", "BTXRD val Dice by lesion size (terciles of the val masks' area; images per bucket in brackets):",
                  "", *by_size]
    lines += ["", "Commands (from the repository root; CACHE = " + str(cache) + "):", ""]
    for r in results:  # the commands as run (a row resumed after a stop has one per session)
        sessions = [f"  {session_text(x, r)}" for x in r["training"]["sessions"]]
        lines += [f"- `{r['row']}` seed {r['seed']}:", *sessions, f"  then `{r['commands']['evaluate']}`"]
    lines += ["", f"Made by `{command_line()}`.", ""]
    return "\n".join(lines)


def session_text(session: dict[str, Any], result: dict[str, Any]) -> str:
    """A training session as the report names it: its command and note, or for a run made by hand its note and
    the row's command."""
    if session["command"] is None:
        return f"{session['note']} (the row's command: `{result['commands']['train']}`)"
    return f"`{session['command']}`" + (f" ({session['note']})" if session.get("note") else "")


def dice_by_lesion_size(results: list[dict[str, Any]], cache: Path) -> list[str]:
    """Markdown rows: val Dice of each BTXRD row by lesion size (share of the image, terciles of the val masks)."""
    import numpy as np

    from lsms.data import read_mask

    rows = [r for r in results if r["dataset"] == "btxrd"]
    if not rows:
        return []
    area = {r.id: float(read_mask(r.mask_path).mean()) for r in val_records(ROWS[rows[0]["row"]])}
    edges = np.quantile(list(area.values()), [1 / 3, 2 / 3])
    names = [f"< {edges[0]:.2%}", f"{edges[0]:.2%} - {edges[1]:.2%}", f">= {edges[1]:.2%}"]
    lines = ["| row | seed | " + " | ".join(f"Dice, lesion {n} of the image" for n in names) + " |",
             "|---|---|---|---|---|"]
    for r in rows:
        run = result_folder(r, cache)
        buckets: list[list[float]] = [[], [], []]
        with open(run / "eval-val-full.csv", encoding="utf-8", newline="") as f:
            for rec in csv.DictReader(f):
                dice = 1.0 if rec["dice"] in ("", "None") else float(rec["dice"])
                buckets[int(np.searchsorted(edges, area[rec["id"]], side="right"))].append(dice)
        lines.append(f"| {r['label']} | {r['seed']} | " + " | ".join(f"{np.mean(b):.3f} ({len(b)})" for b in buckets) + " |")
    return lines


def plots(results: list[dict[str, Any]], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def figure(name: str, title: str, xlabel: str, ylabel: str, x: str, y: str, marker: str) -> str:
        """One panel per dataset, one line per row: the (x, y) points of its curve (missing y skipped)."""
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for ax, dataset in zip(axes, ("btxrd", "kvasir")):
            for r in (r for r in results if r["dataset"] == dataset):
                pts = [(c[x], c[y]) for c in r["curve"] if c[y] is not None]
                if pts:
                    ax.plot(*zip(*pts), marker=marker,
                            label=f"{r['label']}, {r.get('recipe', 'real')} (seed {r['seed']})")
            ax.set(title=f"{dataset}: {title}", xlabel=xlabel, ylabel=ylabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = out.with_name(f"{out.name}_{name}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path.name

    return [figure("dice_vs_minutes", "val Dice vs training minutes", "minutes of training", "val Dice",
                   "minutes", "val_dice", "o"),
            figure("learning_curves", "training loss per epoch", "optimiser step", "mean train loss",
                   "step", "train_loss", ".")]


def overlays(result: dict[str, Any], cache: Path, out: Path, n: int = 4) -> str:
    """The n best and n worst val images of a text row (by Dice with the sentence), with the sentence, the target
    (green), the prediction with the sentence (red) and with an empty sentence (yellow)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from lsms.checkpoint import load_trained
    from lsms.data import SegmentationDataset

    run = result_folder(result, cache)
    with open(run / "eval-val-full.csv", encoding="utf-8", newline="") as f:
        scored = sorted((float(r["dice"]), r["id"]) for r in csv.DictReader(f) if r["dice"] not in ("", "None"))
    picks = [("best", d, i) for d, i in scored[::-1][:n]] + [("worst", d, i) for d, i in scored[:n]]
    model, spec, _ = load_trained(run, "cpu", prefer="last")
    records = {r.id: r for r in val_records(ROWS[result["row"]])}
    fig, axes = plt.subplots(2, n, figsize=(4 * n, 10.5))
    for ax, (kind, dice, rid) in zip(axes.flat, picks):
        item = SegmentationDataset([records[rid]], spec.preprocessing)[0]
        with torch.no_grad():
            tok = model.tokenize([item["text"], ""])
            logits = model(item["image"][None].expand(2, -1, -1, -1), tok["input_ids"], tok["attention_mask"])
        image = item["image"][0].numpy()
        ax.imshow(image, cmap="gray")
        ax.contour(item["mask"][0].numpy(), levels=[0.5], colors="lime", linewidths=1.2)
        for k, colour in ((1, "yellow"), (0, "red")):
            if (logits[k, 0] > 0).any():
                ax.contour((logits[k, 0] > 0).numpy(), levels=[0.5], colors=colour, linewidths=1.0)
        words = item["text"].split()
        ax.set_title(f"{kind}: {rid}, Dice {dice:.2f}\n" + " ".join(words[: len(words) // 2]) + "\n"
                     + " ".join(words[len(words) // 2:]), fontsize=7)
        ax.axis("off")
    fig.suptitle(f"{result['label']} (seed {result['seed']}), BTXRD val: target green, prediction red, "
                 "prediction with an empty sentence yellow", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97), h_pad=2.5)
    path = out.with_name(out.name + "_btxrd_cases.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path.name


OVERLAY_ROWS = ("btxrd/cpu/lsms-tiny-text", "btxrd/lsms-tiny-text")  # the overlays' row: the first that has results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="*", default=[], choices=sorted(ROWS), help="rows to train and evaluate, in order")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget-min", type=float, default=60.0,
                        help="training minutes per row (default 60): CPU minutes for the CPU rows, wall minutes for "
                             "the others")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per row (default 1)")
    parser.add_argument("--cache", default=str(DEFAULT_CACHE))
    parser.add_argument("--fresh", action="store_true", help="discard the rows' previous run folders")
    parser.add_argument("--report", action="store_true", help="write docs/results/real-data-runs.{json,md} and plots")
    parser.add_argument("--out", default=str(RESULTS / "real-data-runs"),
                        help="report path without extension (docs/results/real-data.md is the written analysis)")
    args = parser.parse_args()
    s = Settings(Path(args.cache).resolve(), args.budget_min, args.threads, args.seed)
    for key in args.rows:
        run_row(key, s, fresh=args.fresh)
    if args.report:
        results = collect(s.cache)
        if not results:
            raise SystemExit(f"no finished rows under {s.cache / 'real'}; run some with --rows first")
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        figures = plots(results, out)
        text_rows = [r for key in OVERLAY_ROWS for r in results if r["row"] == key]
        if text_rows:
            figures.append(overlays(text_rows[0], s.cache, out))
        write_json(report_path(out, ".json"), {"machine": machine(), "rows": results, "figures": figures})
        write_atomic(report_path(out, ".md"), markdown(results, s.cache))
        say(f"wrote {out}.md")


if __name__ == "__main__":
    main()
