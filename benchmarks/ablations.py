"""The demo's spread over seeds and the paper's ablations (Table III), each a full ``lsms demo`` run.

    python benchmarks/ablations.py --rows no-existence-head --seeds 0 1 2  # the demo without the head (15 min)
    python benchmarks/ablations.py --jobs 2     # the demo with seeds 0, 1, 2, then every other row with 0 and 1
    python benchmarks/ablations.py --rows full --demo-seeds 3 4            # more seeds of the demo
    python benchmarks/ablations.py --rows fp32 --seeds 0 1 2               # fp32 at the same steps
    python benchmarks/ablations.py --rows full other-lesions-20 --demo-seeds 1 --seeds 1 --steps 818  # 818 steps each
    python benchmarks/ablations.py --report                                # tables from the runs there are

Every (row, seed) is ``lsms demo`` (:func:`lsms.demo.run_demo`: the same data, recipe, 15-minute budget,
calibration and test-split evaluation in both wordings) with one model switch (docs/model.md, "Ablations"),
in CACHE/<row>/seed<k>/ (a demo report folder). The rows of :data:`SAME_STEPS` run for the steps the same
seed's run of their reference row made in its 15 minutes, where that run is there first, as a step schedule
without a time limit: the comparison is at equal steps, whatever the machine's load (the demo and the demo
without the head refer to each other: whichever runs first has the 15-minute budget; ``bench.json`` records
which). A finished run (its ``metrics.json``) is reused. With
``--jobs 2`` two runs share the machine, one thread each: the demo calibrates its step time under that
load. Each run also writes ``bench.json``: its CPU seconds and the machine's load average.

The report, docs/results/demo-ablations.{md,json}: the demo's targets over seeds (mean, min, max) and the
ablation table (mean over seeds) beside the paper's Table III.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from common import RESULTS, command_line, machine, write_atomic, write_json

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = ROOT / "runs" / "ablations"

def recipe_before(**parts: Any) -> dict[str, Any]:
    """Overrides that pin the demo's recipe as of 2026-12-07 (other lesions weighing 1 in the focal term, 4
    paraphrases per sentence given half of the time), with ``parts`` merged in: the rows measured on it keep
    their meaning if the recipe changes."""
    rows: dict[str, Any] = {"loss": {"other_lesion_weight": 1.0}, "demo": {"variants": 4}, "data": {"paraphrase_p": 0.5}}
    for key, value in parts.items():
        rows[key] = {**rows[key], **value} if isinstance(value, dict) and key in rows else value
    return rows


# row -> (model overrides on the demo recipe (key "demo": overrides of the demo's own settings, "loss", "optim" and
# "data": of the loss, optimiser and data settings), what the
# paper's Table III reports: (Dice, mIoU) on RefHL-Seg val, or None)
ROWS: dict[str, tuple[dict[str, Any], tuple[float, float] | None, str]] = {
    "full": ({}, (78.34, 70.31), "LSMS (the demo's recipe)"),
    "no-existence-head": ({"existence_head": False}, None,
                          "w/o the existence head (the existence score is the highest mask probability)"),
    "negatives-0.2": ({"demo": {"negative_share": 0.2}, "loss": {"empty_target_dice": True}}, None,
                      "the recipe before: a fifth of the training slices with a negative sentence, Dice over all"),
    "negatives-1.0": ({"demo": {"negative_share": 1.0}}, None,
                     "a negative sentence on every training slice (the recipe: on half of them)"),
    "empty-target-dice": ({"loss": {"empty_target_dice": True}}, None,
                          "the Dice term over every sentence, those that match nothing too (the recipe: lesions only)"),
    "gate-lr-10": ({"optim": {"gate_lr_scale": 10.0}}, None,
                   "the language gates at 10 x the learning rate (`--gate-lr-scale 10`), at the demo's steps"),
    "recipe-before": (recipe_before(), None,
                      "the recipe as of 2026-12-07, pinned: the other lesions weigh 1, 4 paraphrases given half of the time"),
    "other-lesions-5": (recipe_before(loss={"other_lesion_weight": 5.0}), None,
                        "the recipe as of 2026-12-07, the lesions a sentence does not name weighing 5 in the focal term"),
    "other-lesions-20": (recipe_before(loss={"other_lesion_weight": 20.0}), None,
                         "the recipe as of 2026-12-07, the lesions a sentence does not name weighing 20 in the focal term"),
    "wordings": (recipe_before(demo={"variants": 8}, data={"paraphrase_p": 0.9}), None,
                 "the recipe as of 2026-12-07, with 8 paraphrases per training sentence, given 9 times in 10"),
    "other-lesions-20-wordings": (recipe_before(loss={"other_lesion_weight": 20.0}, demo={"variants": 8},
                                                data={"paraphrase_p": 0.9}), None,
                                  "the lesions a sentence does not name weighing 20, and 8 paraphrases given 9 times in 10"),
    "other-lesions-20-wordings-warmup": (
        recipe_before(loss={"other_lesion_weight": 20.0, "other_lesion_warmup": 0.3}, demo={"variants": 8},
                      data={"paraphrase_p": 0.9}), None,
        "the same pair, the weight rising from 1 to 20 over the first 30 % of training (`other_lesion_warmup`)"),
    "coord-embed": (recipe_before(coord_embed=True), None,
                    "the recipe as of 2026-12-07, with the pixel positions (x, y) added to each encoder stage's input"),
    "decoder-128": ({"ham_channels": 128, "head_channels": 128}, None,
                    "C_ham = C_head = 128 (the decoder and the sentence's projection half as wide)"),
    "no-text": ({"use_text": False}, None, "w/o language branch (no text encoder, no contrastive loss)"),
    "no-pixel-map": ({"pixel_map": False}, (77.23, 68.91), "w/o pixel map (three ConvUnits, no PM)"),
    "no-fsd": ({"decoder": "last"}, (74.92, 65.77), "w/o FSD (head on F4 at 1/32)"),
    "kernel-7": ({"conv_kernels": [7]}, (73.28, 64.81), "single ConvUnit, d = 7"),
    "kernel-11": ({"conv_kernels": [11]}, (74.03, 65.27), "single ConvUnit, d = 11"),
    "kernel-21": ({"conv_kernels": [21]}, (73.36, 65.22), "single ConvUnit, d = 21"),
    "batch-norm": ({"block_norm": "batch"}, None, "BatchNorm in the blocks (as printed) instead of the recipe's GroupNorm"),
    "fp32": ({}, None, "fp32 (--amp off), without the existence head, for the steps the same seed's "
                       "no-existence-head run made (run that first)"),
}
# the row a row is compared with at the same seeds (default "full")
REFERENCE = {"fp32": "no-existence-head"}
# rows run for the steps the same seed's run of this row made (a step schedule over them, no time limit)
SAME_STEPS = {"full": "no-existence-head", "no-existence-head": "full", "fp32": "no-existence-head",
              "negatives-0.2": "no-existence-head", "empty-target-dice": "no-existence-head", "gate-lr-10": "full",
              "negatives-1.0": "full", "other-lesions-5": "full", "other-lesions-20": "full",
              "coord-embed": "full", "other-lesions-20-wordings": "full", "other-lesions-20-wordings-warmup": "full",
              "wordings": "full", "recipe-before": "full"}
COLUMNS = [  # (key in metrics.json, label)
    ("test.full.Dice", "Dice"), ("test.full.mIoU", "mIoU"), ("test.full.referring_accuracy_multi", "ref. acc. multi"),
    ("test.none.Dice", "Dice, no text"),
    ("test_heldout_wording.full.Dice", "Dice, held-out wording"),
    ("test_heldout_wording.full.referring_accuracy_multi", "ref. acc. multi, held-out wording"),
    ("test.full.existence_AUROC", "existence AUROC"), ("test.full.existence_AUROC_low", "AUROC 95 % CI low"),
    ("test.full.existence_AUROC_high", "AUROC 95 % CI high"), ("test.full.negative_mask_rate", "negatives with a mask"),
    ("test.full.Dice_positive_at_threshold", "Dice at the existence threshold"),
    ("test.full.existence_AUROC_max_prob", "AUROC of the highest probability (same run)"),
    ("test.full.negative_mask_rate_max_prob", "negatives with a mask, highest probability (same run)"),
    ("train_summary.step", "steps"),
]


def run_one(row: str, seed: int, out: Path, steps: int | None = None) -> None:
    """One demo run with the row's model switch (in this process); ``steps``: a step schedule over that many
    steps instead of the row's reference (:data:`SAME_STEPS`) or the 15-minute budget."""
    import dataclasses
    import logging

    from lsms.demo import DemoConfig, run_demo

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    overrides, _, _ = ROWS[row]
    overrides = dict(overrides)
    # the reserve these runs were made with (the demo's default is now 1.5: they ended at 15.2-15.4 minutes)
    cfg = DemoConfig(out=str(out), eval_reserve_minutes=1.0, **overrides.pop("demo", {}))
    loss = dataclasses.replace(cfg.train.loss, **overrides.pop("loss", {}))
    optim = dataclasses.replace(cfg.train.optim, **overrides.pop("optim", {}))
    data = dataclasses.replace(cfg.train.data, **overrides.pop("data", {}))
    if row == "fp32":
        overrides["existence_head"] = False
    model = dataclasses.replace(cfg.train.model, **{k: tuple(v) if isinstance(v, list) else v
                                                    for k, v in overrides.items()})
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed, progress=False, model=model,
                                                             loss=loss, optim=optim, data=data))
    steps_of = out.parents[1] / SAME_STEPS.get(row, "") / f"seed{seed}" / "metrics.json"
    same_steps_as = SAME_STEPS[row] if row in SAME_STEPS and steps_of.is_file() and steps is None else None
    if same_steps_as or steps:  # a step schedule over those steps, no time limit
        steps = steps or json.loads(steps_of.read_text())["train_summary"]["step"]
        optim = dataclasses.replace(cfg.train.optim, max_steps=steps)
        cfg = dataclasses.replace(cfg, epochs=1000, budget_minutes=10 * cfg.budget_minutes,
                                  train=dataclasses.replace(cfg.train, optim=optim))
    if row == "fp32":
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, amp="off"))
    load, cpu, wall = os.getloadavg(), time.process_time(), time.perf_counter()
    run_demo(cfg)
    write_json(out / "bench.json", {"row": row, "seed": seed, "cpu_s": time.process_time() - cpu,
                                    "wall_s": time.perf_counter() - wall, "load_start": load,
                                    "load_end": os.getloadavg(), "threads": os.environ.get("OMP_NUM_THREADS"),
                                    "same_steps_as": same_steps_as, "steps": steps})


def launch(row: str, seed: int, cache: Path, threads: int, steps: int | None = None) -> None:
    out = cache / row / f"seed{seed}"
    if (out / "metrics.json").is_file() and (out / "bench.json").is_file():
        print(f"{row} seed {seed}: cached", flush=True)
        return
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    print(f"{row} seed {seed}: running in {out}", flush=True)
    with open(out / "run.log", "w") as log:
        rc = subprocess.run([sys.executable, __file__, "--one", row, str(seed), "--cache", str(cache),
                             *(["--steps", str(steps)] if steps else [])],
                            env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    status = "done" if rc == 0 else f"FAILED (rc {rc}, see {out / 'run.log'})"
    print(f"{row} seed {seed}: {status}", flush=True)


def rescore_existence(run_dir: Path, model: str = "run", cached: str = "existence.json") -> dict[str, Any]:
    """The existence metrics of a finished run with today's code and data: the run's dataset generated again
    with today's generator where it is older (the same images and lesion sentences, today's negatives: one of
    each kind on every val and test slice), the thresholds chosen on its val split, the metrics on its test
    split at full text (:func:`lsms.evaluate.existence_metrics`). Cached in ``cached`` (with the test
    split's negative count); the report prefers it to the run's own, so that runs made before a change of the
    existence rule or of the negatives are scored alike. ``model``: the run's folder (or :func:`refit_run`'s)."""
    from lsms.synth import SynthConfig, generate_dataset

    data = run_dir / "data"
    settings = json.loads((data / "dataset.json").read_text())["settings"]
    if "eval_negatives" not in settings:  # made before the negatives of each kind: generate it again
        generate_dataset(SynthConfig.from_dict(settings), data, overwrite=True, progress=False)
    path = run_dir / cached
    records = [json.loads(line) for line in (data / "manifest.jsonl").read_text().splitlines() if line.strip()]
    negatives = sum(1 for r in records if "negative" in r and r.get("split") == "test")
    if path.is_file() and json.loads(path.read_text()).get("n_negative") == negatives:
        return json.loads(path.read_text())
    from lsms.evaluate import evaluate_levels, existence_metrics

    kw = {"levels": ("full",), "device": "cpu", "batch_size": 16, "empty_policy": "skip"}
    val = evaluate_levels(run_dir / model, data, "val", **kw)["full"]["records"]
    test = evaluate_levels(run_dir / model, data, "test", **kw)["full"]["records"]
    chosen = existence_metrics(val, "choose", "choose")
    out = existence_metrics(test, chosen["existence_threshold"], chosen.get("existence_threshold_max_prob"))
    write_json(path, out)
    return out


def refit_run(run_dir: Path) -> dict[str, Any] | None:
    """A finished run's existence head fit anew on its frozen network as training now does at its end
    (:func:`lsms.existence.refit_existence_head`, the run's train split and the default steps), written to
    ``run-refit/best.pt`` beside the run, and scored as :func:`rescore_existence` scores the run (cached in
    ``existence-refit.json``); None for a run without the head. The masks are the run's own."""
    import torch

    from lsms.checkpoint import load_checkpoint, model_from_checkpoint, run_config, save_checkpoint, spec_of
    from lsms.config import RunConfig
    from lsms.data import SegmentationDataset, load_samples
    from lsms.distributed import DistEnv
    from lsms.existence import refit_existence_head
    from lsms.train import refit_loader

    target = run_dir / "run-refit" / "best.pt"
    if not target.is_file():
        checkpoint = load_checkpoint(run_dir / "run" / "best.pt")
        if not spec_of(checkpoint).model.existence_head:
            return None
        model, cfg = model_from_checkpoint(checkpoint), run_config(checkpoint)
        records = load_samples(run_dir / "data", split=cfg.data.train_split)
        plain = SegmentationDataset(records, spec_of(checkpoint).preprocessing, text_level=cfg.data.text_level)
        env = DistEnv(device=torch.device("cpu"))
        refit_existence_head(model, refit_loader(plain, cfg, env, model.tokenizer), RunConfig().existence_refit_steps,
                             env)
        target.parent.mkdir(exist_ok=True)
        save_checkpoint({**checkpoint, "model": model.state_dict()}, target)
    return rescore_existence(run_dir, "run-refit", "existence-refit.json")


def _get(tree: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict):
            return None
        tree = tree.get(part)
    return tree


def _stats(values: list[float]) -> dict[str, float] | None:
    values = [v for v in values if isinstance(v, (int, float))]
    if not values:
        return None
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values), "n": len(values)}


def fmt(v: Any) -> str:
    if v is None:
        return "–"
    return f"{v:.0f}" if isinstance(v, int) or float(v).is_integer() else f"{v:.3f}"


def versus_full(runs: dict[str, list[dict]], row: str, key: str = "test.full.Dice") -> str:
    """Mean Dice difference to the row's reference (the full model unless :data:`REFERENCE` names another) over
    the seeds both have (points), e.g. '-3.1 (seed 0)' or '+0.2 (seed 0, 1; vs no-existence-head)'."""
    reference = REFERENCE.get(row, "full")
    full = {r["seed"]: _get(r["metrics"], key) for r in runs.get(reference, [])}
    pairs = [(r["seed"], _get(r["metrics"], key) - full[r["seed"]]) for r in runs[row] if r["seed"] in full]
    if row == "full" or not pairs:
        return "–"
    seeds = ", ".join(str(s) for s, _ in pairs)
    against = f"; vs {reference}" if reference != "full" else ""
    return f"{100 * statistics.fmean(d for _, d in pairs):+.1f} (seed {seeds}{against})"


def report(cache: Path, rescore: bool = True, name: str = "demo-ablations", refit: bool = False) -> None:
    runs: dict[str, list[dict]] = {}
    for row in ROWS:
        for seed_dir in sorted((cache / row).glob("seed*")):
            if (seed_dir / "metrics.json").is_file():
                m = json.loads((seed_dir / "metrics.json").read_text())
                if rescore:
                    m["test"]["full"].update(rescore_existence(seed_dir))
                if refit and (scores := refit_run(seed_dir)):
                    m["test"]["full"].update({f"{k}_refit": v for k, v in scores.items() if not k.endswith("_max_prob")})
                bench = json.loads((seed_dir / "bench.json").read_text()) if (seed_dir / "bench.json").is_file() else {}
                runs.setdefault(row, []).append({"seed": int(seed_dir.name[4:]), "metrics": m, "bench": bench})
    table = {row: {key: _stats([_get(r["metrics"], key) for r in rs]) for key, _ in COLUMNS} for row, rs in runs.items()}
    data = {"command": command_line(), "machine": machine(), "rows": {r: ROWS[r][2] for r in runs}, "stats": table,
            "runs": {row: [{"seed": r["seed"], **{k: _get(r["metrics"], k) for k, _ in COLUMNS}, **r["bench"]}
                           for r in rs] for row, rs in runs.items()}}
    write_json(RESULTS / f"{name}.json", data)
    ablated = [row for row in runs if row != "full"]
    lines = ["# The demo over seeds" + (", and the paper's ablations with the demo's recipe" if ablated else ""), "",
             f"Made by `{command_line()}` from the runs in `{cache.relative_to(ROOT) if cache.is_relative_to(ROOT) else cache}`.",
             "Each run is `lsms demo` (15-minute budget, test split, 10 held-out patients) with one model switch, "
             "with the threads and beside the machine's load its row gives (`--jobs` runs at a time). "
             + same_steps_sentence(runs) + "Dice / ref. acc. are over the expressions of lesions; existence over "
             "lesions and negative sentences (the test split's 235-238: one of each kind per slice), at the "
             "thresholds chosen on val" + (", re-scored with today's data and code" if rescore else ", as each run "
                                           "scored them") + "; 'held-out wording' is the same test "
             "split reworded with `phrasings-heldout.yaml`.", ""]
    if "full" in runs:
        lines += ["## The demo (`make demo`) over seeds", "", "| seed | " + " | ".join(lab for _, lab in COLUMNS) +
                  " | threads | CPU min | load (1 min) |", "|---" * (len(COLUMNS) + 4) + "|"]
        for r in sorted(runs["full"], key=lambda r: r["seed"]):
            b = r["bench"]
            lines.append(f"| {r['seed']} | " + " | ".join(fmt(_get(r["metrics"], k)) for k, _ in COLUMNS) +
                         f" | {b.get('threads') or '–'} | {b.get('cpu_s', 0) / 60:.1f} | "
                         f"{b.get('load_start', [0])[0]:.1f}-{b.get('load_end', [0])[0]:.1f} |")
        st = table["full"]
        whole = {"train_summary.step"}  # counts: no decimals
        lines.append("| **mean** | " + " | ".join(
            "–" if not st[k] else fmt(round(st[k]["mean"]) if k in whole else st[k]["mean"]) for k, _ in COLUMNS)
            + " | | | |")
        lines.append("| min-max | " + " | ".join(
            "–" if not st[k] else f"{fmt(st[k]['min'])}-{fmt(st[k]['max'])}" for k, _ in COLUMNS) + " | | | |")
        lines.append("")
    lines += existence_lines(runs)
    if ablated:
        lines += ablation_lines(runs, table)
    write_atomic(RESULTS / f"{name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


def same_steps_sentence(runs: dict[str, list[dict]]) -> str:
    """How the rows of :data:`SAME_STEPS` there are were budgeted: at the steps of their reference row's run of
    the same seed (as each run's ``bench.json`` records; for runs older than that record, where the reference's
    runs are there), else with the 15-minute budget."""
    def sentence(rows: list[str], how: str) -> str:
        return f"The row{'s' * (len(rows) > 1)} {', '.join(f'`{r}`' for r in rows)} ran {how}. " if rows else ""

    def reference(row: str) -> str | None:
        recorded = {r["bench"]["same_steps_as"] for r in runs[row] if "same_steps_as" in r["bench"]}
        return recorded.pop() if len(recorded) == 1 else (SAME_STEPS[row] if SAME_STEPS[row] in runs else None)

    def given(r: dict) -> int | None:  # the steps of `--steps N` (a SAME_STEPS run records its reference's too)
        return None if r["bench"].get("same_steps_as") else r["bench"].get("steps")

    fixed = sorted({n for rs in runs.values() for r in rs if (n := given(r))})
    by_reference: dict[str | None, list[str]] = {}
    for row in (r for r in SAME_STEPS if r in runs and not any(given(x) for x in runs[r])):
        by_reference.setdefault(reference(row), []).append(row)
    timed = by_reference.pop(None, [])
    stepped = "".join(sentence(rows, f"for the steps the same seed's `{ref}` run made in its 15 minutes (a step "
                                     "schedule, no time limit): compared at equal steps whatever the load")
                      for ref, rows in by_reference.items())
    stepped += "".join(sentence(sorted(r for r, rs in runs.items() if any(given(x) == n for x in rs)),
                                f"on a step schedule over {n} steps (`--steps {n}`, no time limit)") for n in fixed)
    return stepped + sentence(timed, "with the 15-minute budget, as `make demo` does: the steps depend on the load")


def existence_lines(runs: dict[str, list[dict]]) -> list[str]:
    """"Not present": each existence score of the rows (mean over seeds, min-max), at the thresholds chosen on val."""
    def has(row: str, suffix: str) -> bool:
        return any(_get(r["metrics"], f"test.full.existence_AUROC{suffix}") is not None for r in runs[row])

    names = {"": "existence head", "_refit": "existence head fit anew after training", "_max_prob":
             "highest mask probability"}
    scores = [(row, suffix, names[suffix] if has(row, "_max_prob") else names["_max_prob"])
              for row in runs for suffix in ("", "_refit", "_max_prob") if has(row, suffix)]
    if not scores:
        return []
    lines = ["## Sentences that match nothing (the test split's negatives)", "",
             "| row | score | seeds | AUROC | 95 % interval (mean of the seeds') | negatives with a mask | "
             "positives without one | Dice points lost to the withholding |", "|---|---|---|---|---|---|---|---|"]
    for row, suffix, score in scores:
        rs = runs[row]

        def st(key: str, rs: list[dict] = rs) -> dict | None:
            return _stats([_get(r["metrics"], f"test.full.{key}") for r in rs])

        def cell(x: dict | None, scale: float = 1.0) -> str:
            return "–" if not x else f"{scale * x['mean']:.3f} ({scale * x['min']:.3f}-{scale * x['max']:.3f})"

        low, high = st(f"existence_AUROC_low{suffix}"), st(f"existence_AUROC_high{suffix}")
        lost = _stats([(_get(r["metrics"], "test.full.Dice_positive") or 0)
                       - (_get(r["metrics"], f"test.full.Dice_positive_at_threshold{suffix}") or 0) for r in rs])
        lines.append(f"| {row} | {score} | {len(rs)} | {cell(st(f'existence_AUROC{suffix}'))} | "
                     f"{fmt((low or {}).get('mean'))}-{fmt((high or {}).get('mean'))} | "
                     f"{cell(st(f'negative_mask_rate{suffix}'))} | {cell(st(f'positive_miss_rate{suffix}'))} | "
                     f"{cell(lost, 100)} |")
    return lines + [""]


def ablation_lines(runs: dict[str, list[dict]], table: dict[str, dict]) -> list[str]:
    """The ablation table: each row's mean over seeds beside the paper's Table III."""
    lines = ["## Ablations (mean over seeds; the paper's Table III on RefHL-Seg val beside)", "",
              "| row | what | seeds | Dice | ref. acc. multi | Dice, no text | Dice, held-out wording | "
              "Dice vs full, same seeds | paper Dice / mIoU | paper: Dice vs full | steps / CPU min per seed |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    paper_full = ROWS["full"][1][0]
    for row, rs in runs.items():
        st, paper = table[row], ROWS[row][1]

        def m(key: str, st: dict = st) -> str:
            return fmt((st[key] or {}).get("mean"))

        lines.append(f"| {row} | {ROWS[row][2]} | {len(rs)} | {m('test.full.Dice')} | "
                     f"{m('test.full.referring_accuracy_multi')} | {m('test.none.Dice')} | "
                     f"{m('test_heldout_wording.full.Dice')} | {versus_full(runs, row)} | "
                     + (f"{paper[0]:.2f} / {paper[1]:.2f} | {paper[0] - paper_full:+.2f}" if paper else "– | –")
                     + " | " + ", ".join(f"{fmt(_get(r['metrics'], 'train_summary.step'))} / "
                                         f"{r['bench'].get('cpu_s', 0) / 60:.1f}" for r in sorted(rs, key=lambda r: r["seed"]))
                     + " |")
    return lines + [""]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="seeds of the ablation rows (default 0 1)")
    p.add_argument("--demo-seeds", nargs="+", type=int, default=[0, 1, 2],
                   help="seeds of the row 'full', the demo itself (default 0 1 2); they run first")
    p.add_argument("--jobs", type=int, default=2, help="runs at once (default 2)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads per run (default: the CPU count // jobs, at least 1)")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--report", action="store_true", help="only write the report from the runs there are")
    p.add_argument("--out", default="demo-ablations", help="report name in docs/results (default demo-ablations)")
    p.add_argument("--no-rescore", action="store_true",
                   help="report each run's existence metrics as it wrote them (default: re-score them with today's "
                        "rule, cached in RUN/existence.json)")
    p.add_argument("--refit", action="store_true",
                   help="also score each run with an existence head with the head fit anew on its frozen network, as "
                        "training does at its end since (cached in RUN/run-refit, RUN/existence-refit.json)")
    p.add_argument("--steps", type=int, default=None,
                   help="every row (the demo's too) on a step schedule over N steps, no time limit (default: the "
                        "rows of SAME_STEPS for the steps of their reference's run, the others in 15 minutes)")
    p.add_argument("--one", nargs=2, metavar=("ROW", "SEED"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        row, seed = args.one[0], int(args.one[1])
        run_one(row, seed, args.cache / row / f"seed{seed}", args.steps)
        return 0
    if not args.report:
        threads = args.threads or max(1, (os.cpu_count() or 2) // args.jobs)
        order = [("full", seed) for seed in args.demo_seeds if "full" in args.rows]
        order += [(row, seed) for seed in args.seeds for row in args.rows if row != "full"]  # first seeds first
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda rs: launch(rs[0], rs[1], args.cache, threads, args.steps), order))
    report(args.cache, rescore=not args.no_rescore, name=args.out, refit=args.refit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
