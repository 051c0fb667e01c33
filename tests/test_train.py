"""Training loop: resume == uninterrupted, run-folder contents, evaluate determinism, CLI settings."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from lsms.checkpoint import load_checkpoint, run_config
from lsms.cli import main
from lsms.evaluate import evaluate_checkpoint
from lsms.train import train

from toy_data import make_toy_dataset, tiny_run_config


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy_dataset(tmp_path_factory.mktemp("toy"), n_images=6, n_val=2)


class Killed(Exception):
    pass


def _weights(run):
    return load_checkpoint(run / "last.pt")["model"]


REAL_RECIPE_LIKE = dict(  # the real recipe's augmentation and switches, at toy size
    augmentation=dict(patch_size=64, foreground_p=0.5, spatial_p=0.5, scale=[0.7, 1.4], rotation=15, vflip_p=0.5,
                      text_flip="swap", contrast=0.25, brightness=0.1, gamma=[0.7, 1.5], noise=0.05),
    model=dict(coord_embed=True, output_stride=2),
)


@pytest.mark.parametrize("recipe", ["flips", "real"])
def test_resume_after_kill_matches_uninterrupted_run(toy, tmp_path, recipe):
    # 12 train samples, batch 4 -> 3 steps/epoch, 2 epochs = 6 steps; last.pt every 2 steps (mid-epoch too)
    settings = dict(optim={"epochs": 2}, save_every=2, data={"augment": True})
    if recipe == "real":
        settings["data"].update(augmentation=REAL_RECIPE_LIKE["augmentation"], image_size=96)  # 64 px patches of 96
        settings["model"] = REAL_RECIPE_LIKE["model"]
    full = tmp_path / "full"
    train(tiny_run_config(toy, full, **settings))

    cut = tmp_path / "cut"

    def kill_at_step_5(step):
        if step == 5:
            raise Killed  # the process dies after step 5; the newest checkpoint is from step 4 (mid-epoch 2)

    with pytest.raises(Killed):
        train(tiny_run_config(toy, cut, **settings), on_step=kill_at_step_5)
    ckpt = load_checkpoint(cut / "last.pt")
    assert (ckpt["epoch"], ckpt["step"], ckpt["batch_in_epoch"]) == (1, 4, 1)
    summary = train(tiny_run_config(toy, cut, **settings), resume=cut)
    assert summary["step"] == 6 and summary["epoch"] == 2

    a, b = _weights(full), _weights(cut)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert load_checkpoint(full / "last.pt")["optimizer"]["state"].keys() == ckpt["optimizer"]["state"].keys()


def test_run_folder_contents(toy, tmp_path):
    run = tmp_path / "run"
    summary = train(tiny_run_config(toy, run, optim={"epochs": 2}))
    for name in ("last.pt", "best.pt", "config.json", "metrics.csv", "log.jsonl", "summary.json"):
        assert (run / name).is_file(), name
    assert any((run / "tensorboard").iterdir())
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert {"train_loss", "train_contrastive", "lr", "val_Dice", "val_mIoU", "val_referring_accuracy"} <= set(rows[0])
    # the run's CPU seconds and how open the language gates are, per stage (they open from 0 as it trains)
    assert float(rows[1]["cpu_s"]) >= float(rows[0]["cpu_s"]) > 0
    gates = [float(rows[-1][f"language_gate_{i}"]) for i in range(1, 5)]
    assert all(g > 0 for g in gates)
    ckpt = load_checkpoint(run / "last.pt")
    assert "config" not in ckpt and ckpt["format_version"] == 3
    assert set(ckpt["run"]) >= {"data", "optim", "loss"} and "model" not in ckpt["run"]
    assert not {"image_size", "in_channels", "window"} & set(ckpt["run"]["data"])  # in the spec, once
    assert ckpt["spec"]["model"]["text"]["hf_config"]["hidden_size"] == 32
    assert ckpt["spec"]["preprocessing"]["image_size"] == [64, 64]
    assert run_config(ckpt).data.image_size == 64 and run_config(ckpt).model.in_channels == 3
    assert ckpt["optimizer"] is not None and len(ckpt["rng"]) == 1
    assert load_checkpoint(run / "best.pt")["optimizer"] is None  # best.pt is for inference
    assert summary["best"]["metric"] == "Dice" and 0.0 <= summary["best"]["value"] <= 1.0
    config = json.loads((run / "config.json").read_text())
    assert config["run"]["optim"]["epochs"] == 2 and config["spec"] == ckpt["spec"] | {"existence_threshold": None,
                                                                                      "max_prob_threshold": None}


def test_evaluate_is_deterministic_and_matches_training(toy, tmp_path):
    run = tmp_path / "run"
    summary = train(tiny_run_config(toy, run, optim={"epochs": 1}))
    first = evaluate_checkpoint(run, toy, "val", device="cpu", batch_size=3, prefer="last")
    again = evaluate_checkpoint(run, toy, "val", device="cpu", batch_size=3, prefer="last")
    assert first["records"] == again["records"]
    second = evaluate_checkpoint(run, toy, "val", device="cpu", batch_size=1, prefer="last")
    # batch size does not matter either; the existence score (a float of the logits) only to rounding
    for a, b in zip(first["records"], second["records"], strict=True):
        assert a.pop("existence") == pytest.approx(b.pop("existence"), abs=1e-5)
    assert first["records"] == second["records"]
    assert first["summary"] == second["summary"]
    assert first["summary"]["Dice"] == summary["last_metrics"]["Dice"]
    assert first["summary"]["n_images"] == 4


def test_max_steps_ends_training_mid_epoch_with_the_schedule(toy, tmp_path):
    run = tmp_path / "run"
    summary = train(tiny_run_config(toy, run, optim={"epochs": 3, "max_steps": 4, "warmup_steps": 1}))
    assert summary["step"] == 4 and summary["epoch"] == 1  # 3 steps per epoch: stopped in the second
    steps = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if '"kind": "step"' in x]
    assert [x["step"] for x in steps] == [1, 2, 3, 4]
    assert steps[-1]["lr"] == pytest.approx(1e-3 * (1 - 2 / 3) ** 0.9)  # the poly schedule over 4 steps
    assert summary["last_metrics"]  # validated at the end


def test_other_lesion_weight_warms_up_with_the_schedule(toy, tmp_path, monkeypatch):
    """``loss.other_lesion_warmup``: the loop gives each step the other lesions' weight of its share of training
    (0 in the learning rate's warm-up, then the share of the post-warm-up steps)."""
    import lsms.train as T

    seen, step_once = [], T.train_step

    def recording_step(*args, **kwargs):
        seen.append(args[7] if len(args) > 7 else kwargs.get("other_weight"))
        return step_once(*args, **kwargs)

    monkeypatch.setattr(T, "train_step", recording_step)
    train(tiny_run_config(toy, tmp_path / "run", optim={"epochs": 3, "max_steps": 4, "warmup_steps": 1},
                          loss={"other_lesion_weight": 20.0, "other_lesion_warmup": 0.5}))
    assert seen == pytest.approx([1.0, 1.0, 1.0 + 19.0 * (1 / 3) / 0.5, 20.0])


def test_time_limit_counts_cpu_time_with_the_cpu_clock(toy, tmp_path, monkeypatch):
    """``time_clock: cpu`` stops on the process's CPU time (here a fake clock running 20 s per reading), which a
    busy machine does not shorten; the wall clock of the same settings is not reached."""
    import itertools

    import lsms.train as T

    ticks = itertools.count(0, 20.0)
    monkeypatch.setitem(T.CLOCKS, "cpu", lambda: next(ticks))
    cfg = tiny_run_config(toy, tmp_path / "cpu", optim={"epochs": 3, "warmup_steps": 1}, time_limit_minutes=1.0,
                          time_clock="cpu")
    summary = train(cfg)
    assert summary["stopped_early"] and summary["step"] == 4  # read at the start (0) and after steps 1-4: 80 > 60
    assert summary["cpu_s"] > 0
    summary = train(tiny_run_config(toy, tmp_path / "wall", optim={"epochs": 3, "warmup_steps": 1},
                                    time_limit_minutes=1.0))
    assert not summary["stopped_early"] and summary["step"] == 9
    with pytest.raises(ValueError, match="time_clock must be 'wall' or 'cpu'"):
        tiny_run_config(toy, tmp_path / "x", time_clock="gpu")


def test_time_limit_and_time_schedule_count_over_a_resume(toy, tmp_path, monkeypatch):
    """A run killed mid-way and resumed stops at the step an uninterrupted run stops at, with the same learning
    rates on its time schedule: the checkpoint carries the time spent (a fake CPU clock, 10 s per step)."""
    import lsms.train as T

    now = {"t": 0.0}
    step_once = T.train_step

    def ten_seconds_step(*args, **kwargs):
        now["t"] += 10.0
        return step_once(*args, **kwargs)

    monkeypatch.setitem(T.CLOCKS, "cpu", lambda: now["t"])
    monkeypatch.setattr(T, "train_step", ten_seconds_step)
    settings = dict(optim={"epochs": 4, "warmup_steps": 1, "schedule": "time"}, save_every=2,
                    time_limit_minutes=1.25, time_clock="cpu")  # 75 s: steps 1-8 (80 s > 75)
    full = train(tiny_run_config(toy, tmp_path / "full", **settings))
    assert full["stopped_early"] and full["step"] == 8 and full["cpu_s"] == pytest.approx(80.0)

    def die_after_step_5(step):
        if step == 5:
            raise Killed  # newest checkpoint: step 4, 40 s spent

    now["t"] = 0.0
    cut = tmp_path / "cut"
    with pytest.raises(Killed):
        train(tiny_run_config(toy, cut, **settings), on_step=die_after_step_5)
    assert load_checkpoint(cut / "last.pt")["time_spent"]["cpu_s"] == pytest.approx(40.0)
    now["t"] = 1000.0  # a new process: its clock has another origin
    resumed = train(tiny_run_config(toy, cut, **settings), resume=cut)
    assert resumed["stopped_early"] and resumed["step"] == 8 and resumed["cpu_s"] == pytest.approx(80.0)

    def lrs(run):
        return {x["step"]: x["lr"] for x in map(json.loads, (run / "log.jsonl").read_text().splitlines())
                if x.get("kind") == "step"}

    assert lrs(cut)[8] == pytest.approx(lrs(tmp_path / "full")[8])


def test_cli_train_evaluate_with_settings_file(toy, tmp_path):
    run = tmp_path / "run"
    # a settings file as lsms 0.1 wrote them (flat keys): it still loads, its keys at their new places
    flat = dict(preset="tiny", image_size=64, epochs=1, batch_size=4, lr=1e-3, warmup_steps=2, device="cpu",
                log_every=1, seed=0, model_overrides={
                    "text_config": {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1,
                                    "num_attention_heads": 2, "intermediate_size": 64},
                    "pretrained_text": False, "widths": [16, 32, 32, 64], "depths": [1, 1, 1, 1],
                    "ham_channels": 32, "head_channels": 32, "nmf_rank": 4, "conv_kernels": [7]})
    import yaml

    (tmp_path / "s.yaml").write_text(yaml.safe_dump(flat))
    assert main(["train", str(toy), "--out", str(run), "--config", str(tmp_path / "s.yaml"), "--no-progress",
                 "--batch-size", "6", "--model", "text.freeze=true"]) == 0
    cfg = run_config(load_checkpoint(run / "last.pt"))
    assert cfg.optim.batch_size == 6 and cfg.data.image_size == 64 and cfg.optim.epochs == 1  # flag beats file
    assert cfg.model.widths == (16, 32, 32, 64) and cfg.model.text.freeze is True
    out = tmp_path / "eval"
    assert main(["evaluate", str(run), str(toy), "--split", "val", "--text-level", "none", "--out", str(out),
                 "--json", str(tmp_path / "s.json"), "--save-predictions", "--device", "cpu"]) == 0
    rows = list(csv.DictReader(open(out / "per_sample.csv")))
    assert len(rows) == 4 and {"id", "dice", "iou", "referred_hit"} <= set(rows[0])
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["text_level"] == "none" and "referring_accuracy_multi" in summary
    assert len(list((out / "predictions").glob("*.png"))) == 4


def test_cli_errors_are_helpful(toy, tmp_path, capsys):
    assert main(["train", "--no-progress"]) == 2
    assert "give DATA" in capsys.readouterr().err
    assert main(["train", str(toy), "--image-size", "50"]) == 2
    assert "multiple of 32" in capsys.readouterr().err
    assert main(["train", str(toy), "--model", "widthz=[1]"]) == 2
    assert "unknown model settings ['widthz']" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "nothing"), str(toy)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_amp_auto_measures_before_choosing_bf16(monkeypatch):
    from lsms import optim

    cpu = torch.device("cpu")
    monkeypatch.setattr(optim, "native_bf16", lambda: (False, "the CPU has no avx512_bf16, amx_bf16 or bf16 flag"))
    probed = []
    dtype, why = optim.choose_amp("auto", cpu, probe=lambda d: probed.append(d) or 1.0)
    assert dtype is None and why.startswith("fp32: the CPU has no") and probed == []  # emulated bf16: not tried
    monkeypatch.setattr(optim, "native_bf16", lambda: (True, "CPU flag avx512_bf16"))
    dtype, why = optim.choose_amp("auto", cpu, probe=lambda d: 2.0 if d is None else 1.0)
    assert dtype == torch.bfloat16 and "2.00x" in why
    dtype, why = optim.choose_amp("auto", cpu, probe=lambda d: 1.0 if d is None else 0.95)  # 1.05x: not worth it
    assert dtype is None and why.startswith("fp32: CPU flag avx512_bf16")
    assert optim.choose_amp("bf16", cpu)[0] == torch.bfloat16 and optim.choose_amp("off", cpu)[0] is None
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        optim.choose_amp("fp16", cpu)
    assert optim.inference_dtype("bf16", cpu) == torch.bfloat16 and optim.inference_dtype("fp32", cpu) is None
    monkeypatch.setattr(optim, "native_bf16", lambda: (False, "none"))
    assert optim.inference_dtype("bf16", cpu) is None  # a CPU without native bf16 runs a bf16-trained model in fp32


def test_amp_choice_is_saved_and_bf16_masks_match_fp32(toy, tmp_path, monkeypatch):
    """A bf16 run trains, records its choice in the checkpoint, and its model gives the same masks in bf16 as
    in fp32 on >= 99 % of pixels (the parity bound of evaluate, predict and serve)."""
    from lsms import optim
    from lsms.backends import load_backend
    from lsms.data import SegmentationDataset, load_samples

    summary = train(tiny_run_config(toy, tmp_path / "bf16", amp="bf16"))
    amp = load_checkpoint(tmp_path / "bf16" / "last.pt")["amp"]
    assert summary["amp"] == amp and amp["setting"] == "bf16" and amp["dtype"] == "bf16"
    monkeypatch.setattr(optim, "native_bf16", lambda: (False, "mocked: the CPU has no bf16 flag"))
    train(tiny_run_config(toy, tmp_path / "auto", amp="auto"))
    amp = load_checkpoint(tmp_path / "auto" / "last.pt")["amp"]
    assert amp["dtype"] == "fp32" and "mocked" in amp["reason"]
    monkeypatch.setattr(optim, "native_bf16", lambda: (True, "mocked"))
    backend = load_backend(tmp_path / "bf16", device="cpu")
    assert backend.dtype == torch.bfloat16
    samples = SegmentationDataset(load_samples(toy, "val"), backend.preprocessing)
    image = torch.stack([samples[i]["image"] for i in range(len(samples))])
    tok = backend.tokenize([samples[i]["text"] for i in range(len(samples))])
    bf16 = backend(image, tok["input_ids"], tok["attention_mask"])
    backend.dtype = None
    fp32 = backend(image, tok["input_ids"], tok["attention_mask"])
    assert torch.isfinite(bf16).all() and ((bf16 > 0) == (fp32 > 0)).float().mean() >= 0.99
    assert (bf16 - fp32).abs().max() < 0.05 * fp32.abs().max()


def test_inf_nan_logits_at_validation_are_reported_loudly(toy, tmp_path, monkeypatch, caplog):
    import lsms.train as training

    real = training.evaluate_model

    def diverging(*args, **kwargs):
        result = real(*args, **kwargs)
        result["summary"]["n_nonfinite_logits"] = 2
        return result

    monkeypatch.setattr(training, "evaluate_model", diverging)
    with caplog.at_level("WARNING", logger="lsms.train"):
        summary = train(tiny_run_config(toy, tmp_path / "run"))
    assert summary["nonfinite_logits_by_epoch"] == {1: 2, 2: 2}
    assert any("inf/NaN logits in 2 of the evaluated epochs" in r.message for r in caplog.records)


def test_evaluate_refuses_to_overwrite_the_evaluation_of_other_data(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "eval-val-full").mkdir(parents=True)
    (run / "eval-val-full" / "summary.json").write_text(json.dumps({"data": str(tmp_path / "own")}))
    assert main(["evaluate", str(run), str(tmp_path / "other"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"eval-val-full holds the evaluation of {tmp_path / 'own'}; evaluating {tmp_path / 'other'} there" in err
    assert "give --out DIR" in err
