"""The benchmark scripts' commands: BTXRD (whose shared copy has a split leak) is loaded with ``--allow-split-leak``
in every command and load, the other datasets never."""

from __future__ import annotations

import dataclasses
import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the scripts import each other by module name

accuracy = importlib.import_module("accuracy")
btxrd = importlib.import_module("btxrd")
real_data = importlib.import_module("real_data")

FLAG = "--allow-split-leak"


def test_only_btxrd_allows_a_split_leak():
    assert {k for k, d in accuracy.DATASETS.items() if d.allow_split_leak} == {"btxrd"}
    assert accuracy.split_leak_flag("btxrd") == [FLAG] and accuracy.split_leak_flag("kvasir") == []


def test_accuracy_commands(tmp_path):
    s = accuracy.Settings(4.5, 1, tmp_path, accuracy.data_paths(tmp_path, tmp_path / "btxrd", tmp_path / "kvasir"))
    for row in accuracy.ROWS:
        commands = [accuracy.train_command(row, s), accuracy.train_command(row, s, time_limit=1.0, resume=True),
                    *[accuracy.eval_command(row, s, lv) for lv in accuracy.text_levels(row)],
                    accuracy.evaluate_levels_command(row, s, list(accuracy.text_levels(row)))]
        for cmd in commands:
            assert (FLAG in cmd) == (row.dataset == "btxrd"), (row.key, cmd)


def test_accuracy_signature_ignores_the_allowance(tmp_path, monkeypatch):
    """Rows cached before loading refused leaks keep their signature (the allowance changes nothing computed)."""
    s = accuracy.Settings(4.5, 1, tmp_path, accuracy.data_paths(tmp_path, tmp_path / "btxrd", tmp_path / "kvasir"))
    row = next(r for r in accuracy.ROWS if r.dataset == "btxrd")
    allowed = accuracy.signature(row, s)
    plain = dataclasses.replace(accuracy.DATASETS["btxrd"], allow_split_leak=False)
    monkeypatch.setitem(accuracy.DATASETS, "btxrd", plain)
    assert FLAG not in accuracy.train_command(row, s)
    assert accuracy.signature(row, s) == allowed
    other = dataclasses.replace(row, preset="unet")
    assert accuracy.signature(other, s) != allowed  # a real change of settings still counts


def test_real_data_commands(tmp_path):
    s = real_data.Settings(tmp_path, 60.0, 1, 0)
    for key, row in real_data.ROWS.items():
        commands = [real_data.train_command(key, s), real_data.train_command(key, s, time_limit=1.0, resume=True),
                    real_data.eval_command(key, s)]
        for cmd in commands:
            assert (FLAG in cmd) == (row.dataset == "btxrd"), (key, cmd)


def test_btxrd_script_commands(tmp_path):
    assert FLAG in btxrd.train_command("data", tmp_path, 30.0, 224, 3)
    assert FLAG in btxrd.resume_command(tmp_path, 5.0)
    assert all(FLAG in btxrd.eval_command("data", tmp_path, lv) for lv in ("full", "none"))
