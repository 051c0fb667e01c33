"""lsms demo end to end at toy size: data, training, four text levels, report files."""

from __future__ import annotations

import dataclasses
import json

import pytest

from lsms.config import merge_into
from lsms.demo import DemoConfig, run_demo

from toy_data import tiny_model


def test_demo_writes_report(tmp_path):
    train = merge_into(DemoConfig().train.to_dict(), {
        "model": {**tiny_model(), "text": {**tiny_model()["text"], "max_tokens": 64}},
        "data": {"image_size": 64}, "optim": {"batch_size": 4, "warmup_steps": 2}, "progress": False, "device": "cpu",
    })
    cfg = DemoConfig.from_dict({"out": str(tmp_path / "report"), "patients": 10, "slices_per_patient": 2,
                                "epochs": 1, "train": train})
    summary = run_demo(cfg)
    report = tmp_path / "report"
    text = (report / "README.md").read_text()
    assert "| full |" in text and "| none |" in text and "### Targets" in text
    assert set(summary["test"]) == {"full", "half", "quarter", "none"}
    full, none = summary["test"]["full"], summary["test"]["none"]  # negative sentences: at full text only
    assert full["n_images"] == none["n_images"] + full.get("n_negative", 0) and none["n_images"] > 0
    for name in ("metrics.json", "training_curves.png", "run/best.pt", "data/manifest.jsonl", "train.yaml"):
        assert (report / name).is_file(), name
    if "overlay" in text:  # needs a multi-lesion test slice, which 10 patients usually give
        assert (report / "overlay_two_sentences.png").is_file() and (report / "features_sentence1.png").is_file()
    assert json.loads((report / "metrics.json").read_text())["timings_s"]["total"] > 0
    # the same test expressions in the held-out wording, evaluated beside
    assert set(summary["test_heldout_wording"]) == {"full", "half", "quarter"}
    assert "held-out wording" in text and (report / "data" / "manifest-phrasings-heldout.jsonl").is_file()
    assert summary["test_heldout_wording"]["full"]["n_scored"] == summary["test"]["full"]["n_scored"]


def test_time_schedule_decays_with_the_time_limit():
    from lsms.config import OptimConfig, RunConfig
    from lsms.optim import lr_at

    assert lr_at(10, 1000, 1.0, warmup_steps=5) == pytest.approx((1 - 5 / 995) ** 0.9)
    assert lr_at(10, 1000, 1.0, warmup_steps=5, time_fraction=0.5) == pytest.approx(0.5 ** 0.9)  # time leads
    assert lr_at(10, 1000, 1.0, warmup_steps=5, time_fraction=1.0) == 0.0
    assert lr_at(2, 1000, 1.0, warmup_steps=5, time_fraction=0.9) == pytest.approx(3 / 5)  # warm-up by steps
    with pytest.raises(ValueError, match="set time_limit_minutes"):
        RunConfig(optim=OptimConfig(schedule="time"))
    with pytest.raises(ValueError, match="optim.schedule must be"):
        OptimConfig(schedule="epochs")
    assert DemoConfig().train.optim.schedule == "steps"  # the demo switches to "time" once it knows the budget


def test_demo_recipe_is_the_yaml_file():
    """recipes/demo.yaml is the recipe the demo was tuned with, field for field; ``lsms train --recipe demo`` reads it."""
    from lsms.cli import build_parser
    from lsms.config import OptimConfig, RunConfig
    from lsms.data import DataConfig
    from lsms.losses import LossConfig
    from lsms.model import model_config
    from lsms.train import config_from_args

    recipe = DemoConfig().train
    assert recipe == RunConfig(
        model=model_config("tiny", decoder_stages=(1, 2, 3, 4), output_stride=2, existence_head=True,
                           text={"freeze": True, "max_tokens": 64, "normalize_segments": True}),
        data=DataConfig(image_size=128, window="200,80", group_by_image=True, paraphrase_p=0.5),
        loss=LossConfig(empty_target_dice=False),
        optim=OptimConfig(batch_size=8, lr=2e-3, warmup_steps=30),
        log_every=10,
    )
    m, t, d, o = recipe.model, recipe.model.text, recipe.data, recipe.optim
    assert (m.preset, m.decoder_stages, m.output_stride, m.existence_head) == ("tiny", (1, 2, 3, 4), 2, True)
    assert (t.freeze, t.max_tokens, t.normalize_segments) == (True, 64, True)
    assert (d.image_size, d.window, d.group_by_image, d.paraphrase_p) == (128, "200,80", True, 0.5)
    assert (o.batch_size, o.lr, o.warmup_steps, recipe.log_every) == (8, 2e-3, 30, 10)
    assert recipe.loss.empty_target_dice is False and DemoConfig().negative_share == 0.5
    trained = config_from_args(build_parser().parse_args(["train", "data", "--recipe", "demo"]))
    assert trained == dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, path="data"))


def test_the_demo_keeps_time_for_the_existence_heads_refit():
    from lsms.demo import refit_minutes

    recipe = DemoConfig().train  # the head and the default refit
    assert refit_minutes(recipe, 170, 0.9) == pytest.approx(170 * 0.9 / 3 / 60)  # a forward: a third of a step
    assert refit_minutes(dataclasses.replace(recipe, existence_refit_steps=0), 170, 0.9) == 0.0
    no_head = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, existence_head=False))
    assert refit_minutes(no_head, 170, 0.9) == 0.0
