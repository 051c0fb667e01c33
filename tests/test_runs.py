"""Run folders: refusing to overwrite a run, the lock, stale locks, orphaned temporary checkpoints after kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lsms.runs import RunInUseError, RunLock, check_run_folder, remove_orphans, run_folder, writable_folder

SRC = Path(__file__).resolve().parents[1] / "src"


def test_a_new_run_refuses_a_folder_holding_one(tmp_path: Path) -> None:
    run = tmp_path / "run"
    check_run_folder(run, resume=False, overwrite=False)  # absent: fine
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    check_run_folder(run, resume=False, overwrite=False)  # a folder without a run: fine
    (run / "last.pt").write_bytes(b"x")
    (run / "metrics.csv").write_text("epoch\n0\n")
    with pytest.raises(ValueError, match=r"already holds a run \(last\.pt, metrics\.csv\); continue it with --resume"):
        check_run_folder(run, resume=False, overwrite=False)
    check_run_folder(run, resume=True, overwrite=False)
    with run_folder(run, resume=False, overwrite=True):
        assert not (run / "last.pt").exists() and not (run / "metrics.csv").exists()
        assert (run / ".lock").is_file()
    assert (run / "notes.txt").read_text() == "mine" and not (run / ".lock").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        check_run_folder(tmp_path / "file", resume=False, overwrite=False)
    with pytest.raises(ValueError, match="cannot create the folder"):
        writable_folder(tmp_path / ("x" * 300), "--out")


def test_lock_refuses_a_live_holder_and_takes_over_a_dead_ones(tmp_path: Path) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / ".lock").write_text(json.dumps({"pid": sleeper.pid, "host": os.uname().nodename, "started": "now"}))
        with pytest.raises(RunInUseError, match=rf"process {sleeper.pid} on .* is training into this run folder"):
            RunLock(tmp_path).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    with RunLock(tmp_path) as lock:  # the holder is dead now: stale, taken over
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
        with pytest.raises(RunInUseError):
            RunLock(tmp_path).acquire()  # held by this (live) process
    assert not (tmp_path / ".lock").exists()


_SAVER = """
import sys, torch
from lsms.checkpoint import save_checkpoint
state = {"format": "lsms-checkpoint", "weights": torch.arange(6_000_000, dtype=torch.float32)}
while True:
    save_checkpoint(state, sys.argv[1])
"""


@pytest.mark.parametrize("kills", [pytest.param(3, id="3-kills"), pytest.param(20, id="20-kills", marks=pytest.mark.benchmark)])
def test_kill_during_save_leaves_a_good_checkpoint_and_no_orphan_after_restart(tmp_path: Path, kills: int) -> None:
    """Processes saving checkpoints in a loop (started together: one torch import's wait) are killed with
    SIGKILL at random moments; then what the next training does first leaves a loadable last.pt and no orphan."""
    rng = np.random.default_rng(0)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    orphans_seen = 0
    for batch in range(0, kills, 4):
        runs = [tmp_path / f"run{k}" for k in range(batch, min(kills, batch + 4))]
        children = []
        for run in runs:
            run.mkdir()
            children.append(subprocess.Popen([sys.executable, "-c", _SAVER, str(run / "last.pt")], env=env))
        for run, child in zip(runs, children, strict=True):
            deadline = time.monotonic() + 120
            while not (run / "last.pt").exists() and time.monotonic() < deadline:  # saving in earnest
                time.sleep(0.01)
            time.sleep(float(rng.uniform(0.0, 0.3)))
            child.send_signal(signal.SIGKILL)
            child.wait()
            orphans_seen += sum(p.name.endswith(".tmp") for p in run.iterdir())
            with run_folder(run, resume=True, overwrite=False):  # what the next training does first
                assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
            assert torch.load(run / "last.pt", weights_only=True)["weights"][-1] == 5_999_999
            assert remove_orphans(run) == []
    assert orphans_seen >= 1  # the kills did land mid-write


# --------------------------------------------------------------------------- lsms train


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from toy_data import make_toy_dataset

    return make_toy_dataset(tmp_path_factory.mktemp("toy"), n_images=6, n_val=2)


def _settings_file(toy: Path, tmp_path: Path) -> str:
    import yaml

    from toy_data import tiny_train_settings

    settings = tiny_train_settings(toy, tmp_path)
    del settings["out"], settings["data"]["path"], settings["optim"]["epochs"]
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(settings))
    return str(tmp_path / "s.yaml")


def test_train_protects_the_run_and_resume_restores_its_settings(toy: Path, tmp_path: Path, caplog) -> None:
    from lsms.checkpoint import load_checkpoint
    from lsms.cli import main

    run, conf = tmp_path / "run", _settings_file(toy, tmp_path)
    assert main(["train", str(toy), "--out", str(run), "--config", conf, "--epochs", "1"]) == 0
    first = run.joinpath("metrics.csv").read_text()
    assert main(["train", str(toy), "--out", str(run), "--config", conf, "--epochs", "1"]) == 2  # refused, untouched
    assert run.joinpath("metrics.csv").read_text() == first
    (run / ".last.pt.orphan.tmp").write_bytes(b"half a checkpoint")
    caplog.set_level("INFO")
    assert main(["train", "--resume", str(run)]) == 0  # restores epochs=1: nothing left to do (was: 49 more)
    assert load_checkpoint(run / "last.pt")["epoch"] == 1 and not (run / ".last.pt.orphan.tmp").exists()
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 0
    assert load_checkpoint(run / "last.pt")["epoch"] == 2
    assert "resume: optim.epochs = 2 overrides the saved 1" in caplog.text
    assert main(["train", "--resume", str(run), "--image-size", "128"]) == 2  # the model's preprocessing is fixed
    assert main(["train", str(toy), "--out", str(run), "--config", conf, "--epochs", "1", "--overwrite"]) == 0
    assert load_checkpoint(run / "last.pt")["epoch"] == 1


@pytest.mark.parametrize("flags, message", [
    (["--grad-clip", "nan"], "optim.grad_clip must be a finite number"),
    (["--time-limit", "nan"], "time_limit_minutes must be a finite number"),
    (["--window", "nan,nan"], "window WIDTH,LEVEL must be finite"),
    (["--best-metric", "bogus"], "best_metric 'bogus' is not a validation score"),
    (["--image-size", "32"], "at least 64 pixels"),
    (["--model", "ham_channels=0"], "ham_channels and head_channels must be positive multiples of 32"),
    (["--max-tokens", "1000"], "max_tokens=1000 exceeds what the text encoder"),
])
def test_train_arguments_are_checked_before_any_work(tmp_path: Path, capsys, flags: list[str], message: str) -> None:
    from lsms.cli import main

    assert main(["train", str(tmp_path / "no-such-data"), "--out", str(tmp_path / "run"), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "no-such-data" not in err  # the flag is named before the data are looked at


def test_a_second_training_into_a_locked_run_is_refused(toy: Path, tmp_path: Path, capsys) -> None:
    from lsms.cli import main

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / ".lock").write_text(json.dumps({"pid": sleeper.pid, "host": os.uname().nodename}))
        assert main(["train", str(toy), "--out", str(tmp_path / "run"), "--config", _settings_file(toy, tmp_path)]) == 2
        assert f"process {sleeper.pid}" in capsys.readouterr().err
    finally:
        sleeper.kill()
        sleeper.wait()


def test_resumed_run_keeps_one_metrics_row_per_epoch(tmp_path: Path) -> None:
    import csv

    from lsms.runlog import RunLog

    first = RunLog(tmp_path, enabled=True, resume=False, progress=False)
    for epoch in (0, 1, 2):  # the last row came after the checkpoint the run resumes from
        first.epoch_row({"epoch": epoch, "step": 10 * (epoch + 1), "lr": 0.1})
    first.close()
    resumed = RunLog(tmp_path, enabled=True, resume=True, progress=False)
    for epoch in (1, 2, 3):  # resumed in epoch 1
        resumed.epoch_row({"epoch": epoch, "step": 10 * (epoch + 1), "lr": 0.2, "val_Dice": 0.5})
    resumed.close()
    with open(tmp_path / "metrics.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [(r["epoch"], r["lr"], r["val_Dice"]) for r in rows] == [
        ("0", "0.1", ""), ("1", "0.2", "0.5"), ("2", "0.2", "0.5"), ("3", "0.2", "0.5")]
