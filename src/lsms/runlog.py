"""What a training run writes besides checkpoints (rank 0 only): ``metrics.csv`` (one row per epoch),
``log.jsonl`` (epochs and every ``log_every`` steps), TensorBoard scalars and the tqdm progress bars."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

log = logging.getLogger(__name__)


class RunLog:
    """The run folder's logs; every method is a no-op on ranks other than 0 (``enabled=False``)."""

    def __init__(self, out: Path, enabled: bool, resume: bool, progress: bool = True):
        self.enabled = enabled
        self.progress = progress and enabled
        self.out = out
        self.tb = None
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        if not resume:
            for name in ("metrics.csv", "log.jsonl"):
                (out / name).unlink(missing_ok=True)
        try:
            from torch.utils.tensorboard import SummaryWriter  # deferred on purpose: slow import, rank 0 only

            self.tb = SummaryWriter(str(out / "tensorboard"))
        except ImportError:  # pragma: no cover - tensorboard is a dependency
            log.warning("tensorboard is not installed; writing CSV/JSON logs only")

    def scalars(self, prefix: str, values: dict[str, Any], step: int) -> None:
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(f"{prefix}/{k}", v, step)

    def jsonl(self, entry: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.out / "log.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")

    def epoch_row(self, row: dict[str, Any]) -> None:
        """Append a row to metrics.csv, rewriting the file so that one header covers every column seen.

        Rows of this epoch or later are dropped first: a resumed run redoes the epoch it resumed in (and any
        after it that an earlier attempt logged past its last checkpoint), so the file keeps one true row per epoch.
        """
        if not self.enabled:
            return
        path = self.out / "metrics.csv"
        rows: list[dict[str, Any]] = []
        if path.exists():
            with open(path, newline="", encoding="utf-8") as f:
                rows = [r for r in csv.DictReader(f) if _before(r, row["epoch"])]
        rows.append(row)
        columns: list[str] = []
        for r in rows:
            columns.extend(k for k in r if k not in columns)
        tmp = path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns, restval="")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)

    def step(self, epoch: int, step: int, lr: float, losses: dict[str, float], images_per_s: float) -> None:
        """The training losses and learning rate of one step (every ``log_every`` steps)."""
        self.scalars("train", {**losses, "lr": lr}, step)
        self.jsonl({"kind": "step", "epoch": epoch, "step": step, "lr": lr, **losses, "images_per_s": images_per_s})

    def epoch(self, epoch: int, step: int, lr: float, train_means: dict[str, float], metrics: dict[str, Any],
              seconds: float, improved: bool, state: dict[str, float] | None = None) -> None:
        """The end of an epoch: a metrics.csv row, a log.jsonl line, TensorBoard scalars, one log line.
        ``state``: more columns of the row (the run's CPU seconds, how open the language gates are)."""
        if not self.enabled:
            return
        row = {"epoch": epoch, "step": step, "lr": lr, **{f"train_{k}": v for k, v in train_means.items()},
               **{f"val_{k}": v for k, v in metrics.items() if k != "empty_policy"}, "time_s": round(seconds, 1),
               **(state or {})}
        self.epoch_row(row)
        self.jsonl({"kind": "epoch", **row})
        self.scalars("train_epoch", train_means, step)
        self.scalars("val", metrics, step)
        self.scalars("state", state or {}, step)
        if metrics:
            log.info("epoch %d step %d: val Dice %.4f mIoU %.4f%s", epoch, step, _num(metrics.get("Dice")),
                     _num(metrics.get("mIoU")), " (best)" if improved else "")

    def bar(self, total: int, desc: str):
        """A tqdm progress bar, or None where progress is off."""
        if not self.progress:
            return None
        return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _before(row: dict[str, Any], epoch: int) -> bool:
    """Whether a metrics.csv row is of an epoch before ``epoch`` (a row whose epoch cannot be read is kept)."""
    try:
        return int(row.get("epoch") or "") < epoch
    except ValueError:
        return True


def _num(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else float("nan")


__all__ = ["RunLog"]
