"""The benchmark scripts' commands: BTXRD (whose shared copy has a split leak) is loaded with ``--allow-split-leak``
in every command and load, the other datasets never; lsms's parser reads the training commands; the real-data CPU
rows count CPU minutes and resume with the same limit; a finished run made by hand is taken as it is."""

from __future__ import annotations

import dataclasses
import importlib
import json
import sys
from pathlib import Path

import pytest

from lsms.checkpoint import FORMAT, FORMAT_VERSION, save_checkpoint
from lsms.cli import build_parser

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


def option(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_real_data_commands(tmp_path):
    s = real_data.Settings(tmp_path, 60.0, 1, 0)
    for key, row in real_data.ROWS.items():
        train = [real_data.train_command(key, s), real_data.train_command(key, s, time_limit=1.0, resume=True)]
        for cmd in [*train, real_data.eval_command(key, s)]:
            assert (FLAG in cmd) == (row.dataset == "btxrd"), (key, cmd)
        for cmd in train:  # lsms's own parser reads them
            assert cmd[:2] == ["lsms", "train"]
            build_parser().parse_args(cmd[1:])


def test_real_data_cpu_rows(tmp_path):
    """The CPU rows run the CPU recipe on CPU minutes, and resume a run that counts its time with the same limit."""
    s = real_data.Settings(tmp_path, 60.0, 1, 1)
    cpu_rows = {k for k, r in real_data.ROWS.items() if r.recipe == "real-cpu"}
    assert cpu_rows == {"btxrd/cpu/lsms-tiny-text", "btxrd/cpu/lsms-tiny-notext", "btxrd/cpu/unet",
                        "btxrd/cpu/film-unet", "kvasir/cpu/lsms-tiny-notext", "kvasir/cpu/unet"}
    run = real_data.run_dir("btxrd/cpu/lsms-tiny-text", s)
    assert real_data.train_command("btxrd/cpu/lsms-tiny-text", s) == [  # the command run by hand, flag for flag
        "lsms", "train", str(real_data.SHARED_DATA / "btxrd"), "--out", str(run), "--recipe", "real-cpu", "--text",
        "--epochs", "30", "--schedule", "time", "--time-limit", "60", "--time-clock", "cpu", "--threads", "1",
        "--seed", "1", "--val-every", "2", "--no-progress", FLAG]
    for key in cpu_rows:
        run = real_data.run_dir(key, s)
        checkpoint(run / "last.pt", time_spent={"wall_s": 900.0, "cpu_s": 600.0})
        start = real_data.train_command(key, s)
        resume = real_data.train_command(key, s, time_limit=accuracy.resume_limit(run, 60.0, "cpu"), resume=True)
        for cmd in (start, resume):
            assert option(cmd, "--time-clock") == "cpu", (key, cmd)
            assert not {"--image-size", "--amp", "--max-tokens"} & set(cmd), (key, cmd)
        assert option(resume, "--time-limit") == option(start, "--time-limit") == "60", (key, resume)
        assert option(resume, "--resume") == str(run)
        args = build_parser().parse_args(start[1:])
        assert (args.recipe, args.time_clock, args.time_limit_minutes) == ("real-cpu", "cpu", 60.0)
        # the time ends the run, not the epochs: they outlast 60 CPU-minutes by 30 % at the fastest step measured
        # (LSMS tiny 1.5 CPU-s in bf16; a U-Net step about half)
        steps = {"btxrd": 163, "kvasir": 87}[real_data.ROWS[key].dataset]  # per epoch
        step_s = 1.5 if real_data.ROWS[key].preset == "tiny" else 0.75
        assert int(option(start, "--epochs")) * steps * step_s >= 1.3 * 3600, key


def checkpoint(path: Path, **extra) -> None:
    """A file lsms's checkpoint reader accepts (no weights: the benchmark reads only what it records)."""
    save_checkpoint({"format": FORMAT, "format_version": FORMAT_VERSION, "model": {}, "run": {},
                     "spec": {"model": {}, "preprocessing": {}}, **extra}, path)


def test_resume_limit(tmp_path):
    """A checkpoint that records its time spent resumes with the whole budget; an older one with the wall minutes
    left by metrics.csv (time_s restarted in its resumed session); on the CPU clock those are unknown."""
    checkpoint(tmp_path / "last.pt", time_spent={"wall_s": 1200.0, "cpu_s": 700.0})
    assert accuracy.resume_limit(tmp_path, 60.0, "wall") == accuracy.resume_limit(tmp_path, 60.0, "cpu") == 60.0
    checkpoint(tmp_path / "last.pt")
    (tmp_path / "metrics.csv").write_text("epoch,step,time_s\n1,10,600\n2,20,1200\n3,30,300\n")
    assert accuracy.resume_limit(tmp_path, 60.0, "wall") == pytest.approx(60.0 - 25.0)
    with pytest.raises(SystemExit, match="time spent"):
        accuracy.resume_limit(tmp_path, 60.0, "cpu")


def made_by_hand(run: Path, text: bool, clock: str = "cpu") -> None:
    """A finished run folder as `lsms train` and evaluate_levels.py leave it, without the benchmark's ledger."""
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({
        "run": {"seed": 0, "time_limit_minutes": 60.0, "time_clock": clock},
        "spec": {"model": {"arch": "lsms", "preset": "tiny", "use_text": text}}}))
    (run / "summary.json").write_text(json.dumps({"epoch": 12, "step": 2084, "time_s": 7249.9, "cpu_s": 3618.5,
                                                  "stopped_early": True}))
    (run / "metrics.csv").write_text("epoch,step,train_loss,time_s,val_Dice\n1,163,0.93,766.5,\n"
                                     "2,326,0.91,2074.9,0.121\n")
    for level, dice in (("full", 0.226), ("none", 0.141)):
        (run / f"eval-val-{level}.json").write_text(json.dumps({"checkpoint": str(run / "last.pt"), "Dice": dice,
                                                                "mIoU": 0.1}))


def test_real_data_adopts_a_run_made_by_hand(tmp_path):
    """A finished run made by hand with the row's command is evaluated as it is (nothing runs: its evaluations
    are there), its seconds from its summary.json; one made with other settings is refused, naming them."""
    s = real_data.Settings(tmp_path, 60.0, 1, 0)
    key = "btxrd/cpu/lsms-tiny-text"
    run = real_data.run_dir(key, s)
    made_by_hand(run, text=True)
    result = real_data.run_row(key, s)
    assert json.loads((run / "result.json").read_text()) == result
    assert (result["recipe"], result["clock"], result["training"]["steps"]) == ("real-cpu", "cpu", 2084)
    assert (result["training"]["train_s"], result["training"]["cpu_s"]) == (7249.9, 3618.5)
    [session] = result["training"]["sessions"]
    assert session["command"] is None and "by hand" in session["note"] and session["cpu_s"] == 3618.5
    assert json.loads((run / "bench-ledger.json").read_text())["sessions"] == [session]
    assert (result["eval"]["full"]["Dice"], result["eval"]["none"]["Dice"]) == (0.226, 0.141)
    assert [c["val_dice"] for c in result["curve"]] == [None, 0.121]
    assert "by hand" in real_data.session_text(session, result)
    assert real_data.budget_text(result) == "`real-cpu`, 60 CPU-min"
    (run / "eval-val-none.json").write_text(json.dumps({"checkpoint": str(run / "best.pt"), "Dice": 0.2}))
    assert real_data.evaluated(run, "full") and not real_data.evaluated(run, "none")  # best.pt's: made again

    other = real_data.run_dir("btxrd/cpu/lsms-tiny-notext", s)
    made_by_hand(other, text=True, clock="wall")
    with pytest.raises(SystemExit, match=r"config.json.*use_text is True.*time_clock is 'wall'"):
        real_data.run_row("btxrd/cpu/lsms-tiny-notext", s)
    assert not (other / "bench-ledger.json").exists()


def test_real_data_mean_over_seeds():
    def result(seed: int, dice: float, **kw) -> dict:
        return {"row": "kvasir/cpu/unet", "seed": seed, "budget_min": 60.0, "eval": {"full": {"Dice": dice}}, **kw}

    cpu = [result(0, 0.5, recipe="real-cpu", clock="cpu"), result(1, 0.7, recipe="real-cpu", clock="cpu")]
    lines = real_data.mean_table([*cpu, result(0, 0.4)])
    assert lines[2:] == ["| kvasir/cpu/unet | `real-cpu`, 60 CPU-min | 0.600 (0.500-0.700, 2 seeds) | - |",
                         "| kvasir/cpu/unet | `real`, 60 wall-min | 0.400 (1 seed) | - |"]


def test_btxrd_script_commands(tmp_path):
    assert FLAG in btxrd.train_command("data", tmp_path, 30.0, 224, 3)
    assert FLAG in btxrd.resume_command(tmp_path, 5.0)
    assert all(FLAG in btxrd.eval_command("data", tmp_path, lv) for lv in ("full", "none"))


def test_report_names_keep_their_dots():
    """``--out docs/results/volumes-2.5d`` writes volumes-2.5d.md and .json (with_suffix would write volumes-2.*, and
    two reports with such names would overwrite each other)."""
    common = importlib.import_module("common")
    assert common.report_path("docs/results/volumes-2.5d", ".json") == Path("docs/results/volumes-2.5d.json")
    assert common.report_path(Path("r/volumes"), ".md") == Path("r/volumes.md")
