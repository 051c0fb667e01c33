"""lsms demo end to end at toy size: data, training, four text levels, report files."""

from __future__ import annotations

import json

from lsms.demo import DemoConfig, run_demo

from toy_data import tiny_train_settings


def test_demo_writes_report(tmp_path):
    model = tiny_train_settings(tmp_path, tmp_path)["model_overrides"]
    cfg = DemoConfig(out=str(tmp_path / "report"), patients=10, slices_per_patient=2, image_size=64, epochs=1,
                     batch_size=4, max_tokens=64, progress=False, device="cpu",
                     train_overrides={"model_overrides": model, "warmup_steps": 2})
    summary = run_demo(cfg)
    report = tmp_path / "report"
    text = (report / "README.md").read_text()
    assert "| full |" in text and "| none |" in text and "### Targets" in text
    assert set(summary["test"]) == {"full", "half", "quarter", "none"}
    assert summary["test"]["full"]["n_images"] == summary["test"]["none"]["n_images"] > 0
    for name in ("metrics.json", "training_curves.png", "run/best.pt", "data/manifest.jsonl"):
        assert (report / name).is_file(), name
    if "overlay" in text:  # needs a multi-lesion test slice, which 10 patients usually give
        assert (report / "overlay_two_sentences.png").is_file() and (report / "features_sentence1.png").is_file()
    assert json.loads((report / "metrics.json").read_text())["timings_s"]["total"] > 0
