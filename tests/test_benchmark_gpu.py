"""benchmarks/gpu.py (the paper and real-data recipes on a CUDA device) runs end to end at toy size on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lsms.data import load_samples

from toy_data import make_toy_dataset

ROOT = Path(__file__).resolve().parents[1]


def _leaky_toy(root: Path) -> Path:
    """A toy dataset whose last val image belongs to a training patient: a split leak, as in the shared BTXRD."""
    data = make_toy_dataset(root, n_images=4, n_val=2)
    lines = [json.loads(x) for x in (data / "manifest.jsonl").read_text().splitlines()]
    for line in lines:
        if line["split"] == "val" and line["image"] == lines[-1]["image"]:
            line["patient"] = lines[0]["patient"]
    (data / "manifest.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return data


def test_gpu_script_at_toy_size(tmp_path):
    # BTXRD rows must load a leaking dataset (their commands allow it); Kvasir rows get a clean one and no allowance
    btxrd, kvasir = _leaky_toy(tmp_path / "leaky"), make_toy_dataset(tmp_path / "toy", n_images=4, n_val=2)
    with pytest.raises(ValueError, match="--allow-split-leak"):
        load_samples(btxrd, split="val")
    out = tmp_path / "gpu"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--toy", "--device", "cpu", "--btxrd", str(btxrd),
           "--kvasir", str(kvasir), "--rows", "btxrd/paper", "kvasir/real", "--cache", str(tmp_path / "cache"),
           "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.with_suffix(".json").read_text())
    rows = {r["row"]: r for r in report["rows"]}
    assert set(rows) == {"btxrd/paper", "kvasir/real"} and report["toy"]
    assert set(rows["btxrd/paper"]["dice"]) == {"full", "none"}  # text rows: with the sentence and empty
    assert set(rows["kvasir/real"]["dice"]) == {"full"}
    for r in rows.values():
        assert r["steps"] >= 1 and all(0.0 <= d <= 1.0 for d in r["dice"].values())
    config = json.loads((tmp_path / "cache" / "kvasir" / "real" / "config.json").read_text())
    model = config["spec"]["model"]
    assert model["output_stride"] == 2 and model["coord_embed"]  # the real recipe's switches
    assert config["run"]["data"]["augmentation"]["patch_size"] == 64 and not model["use_text"]
    paper = json.loads((tmp_path / "cache" / "btxrd" / "paper" / "config.json").read_text())
    assert paper["run"]["optim"]["lr"] == 3e-5 and paper["spec"]["model"]["preset"] == "base"
    assert not paper["run"]["data"]["augment"]
    assert "| btxrd/paper |" in out.with_suffix(".md").read_text()
    assert paper["run"]["data"]["allow_split_leak"] and not config["run"]["data"]["allow_split_leak"]
    for command in rows["btxrd/paper"]["commands"].values():
        assert "--allow-split-leak" in command.split()
    for command in rows["kvasir/real"]["commands"].values():
        assert "--allow-split-leak" not in command
