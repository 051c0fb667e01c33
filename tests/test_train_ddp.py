"""Two CPU processes under torchrun (gloo): one checkpoint, and validation == single-process evaluate."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch.distributed as dist
import yaml

from lsms.checkpoint import load_checkpoint
from lsms.evaluate import evaluate_checkpoint

from toy_data import make_toy_dataset, tiny_train_settings


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_process_torchrun_training(tmp_path):
    data = make_toy_dataset(tmp_path / "toy", n_images=8, n_val=3)  # 6 val records: 3 per rank, uneven batches
    run = tmp_path / "run"
    settings = tiny_train_settings(data, run, optim={"epochs": 1, "batch_size": 2}, data={"eval_batch_size": 2})
    del settings["data"]["path"], settings["out"]
    (tmp_path / "settings.yaml").write_text(yaml.safe_dump(settings))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "lsms", "train", str(data), "--out", str(run), "--config", str(tmp_path / "settings.yaml")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # rank 0 alone wrote the run folder: one last.pt (+ best.pt), no temporary files, one CSV row
    assert sorted(p.name for p in run.glob("*.pt")) == ["best.pt", "last.pt"]
    assert not list(run.glob(".*tmp"))
    assert len((run / "metrics.csv").read_text().strip().splitlines()) == 2
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["step"] == 4  # 16 samples / (2 per process x 2 processes)
    assert len(ckpt["rng"]) == 2  # every rank's RNG state, for resume

    summary = json.loads((run / "summary.json").read_text())["last_metrics"]
    single = evaluate_checkpoint(run, data, "val", device="cpu", batch_size=4, prefer="last")["summary"]
    assert single["n_images"] == summary["n_images"] == 6  # every sample once, no padded duplicates
    assert single == summary
