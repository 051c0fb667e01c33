"""Shared bits of the benchmark scripts: machine description and atomic result files."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch

from lsms.runs import write_text_atomic as write_atomic  # noqa: F401  (the benchmarks' one atomic text writer)

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def command_line() -> str:
    return " ".join(["python", *sys.argv])


def write_json(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2) + "\n")


def report_path(out: str | Path, extension: str) -> Path:
    """A benchmark's ``--out`` (a path without extension) with ``extension`` (``".md"``, ``".json"``) added, whatever
    dots the name holds: ``volumes-2.5d`` gives ``volumes-2.5d.json`` (``Path.with_suffix`` would give
    ``volumes-2.json``, and two reports would overwrite each other)."""
    out = Path(out)
    return out.with_name(out.name + extension)
