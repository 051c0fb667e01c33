"""Training settings, the learning-rate schedule and the optimiser groups (no data, no training)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lsms.config import OptimConfig, RunConfig, load_settings_file
from lsms.optim import lr_at, param_groups, progress_at


def test_lr_schedule_warmup_then_poly():
    base = 1e-3
    assert lr_at(0, 100, base, warmup_steps=10) == pytest.approx(1e-4)
    assert lr_at(9, 100, base, warmup_steps=10) == pytest.approx(base)
    assert lr_at(10, 100, base, warmup_steps=10) == pytest.approx(base)
    # halfway through the decay: (1 - 0.5) ** 0.9
    assert lr_at(55, 100, base, warmup_steps=10) == pytest.approx(base * 0.5**0.9)
    assert lr_at(100, 100, base, warmup_steps=10) == pytest.approx(0.0)
    assert lr_at(100, 100, base, warmup_steps=10, min_lr=1e-5) == pytest.approx(1e-5)
    # the share of training the decay counts: 0 in the warm-up, the steps' or the time's share, whichever leads
    assert [progress_at(s, 100, 10) for s in (0, 9, 10, 55, 100, 150)] == pytest.approx([0, 0, 0, 0.5, 1, 1])
    assert progress_at(55, 100, 10, time_fraction=0.8) == pytest.approx(0.8)
    lrs = [lr_at(s, 50, base, 5) for s in range(50)]
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False))  # monotone after warm-up
    assert lr_at(3, 10, base, warmup_steps=0) == pytest.approx(base * 0.7**0.9)


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.norm = nn.BatchNorm2d(2)
        self.text_encoder = nn.Linear(4, 4)


def test_param_groups_split_decay_and_text_lr():
    m = _Tiny()
    groups = {g["name"]: g for g in param_groups(m, OptimConfig(lr=1e-3, text_lr_scale=0.1))}
    assert set(groups) == {"visual", "visual_no_decay", "text", "text_no_decay"}
    assert groups["visual"]["params"] == [m.conv.weight] and groups["visual"]["weight_decay"] == 0.01
    assert len(groups["visual_no_decay"]["params"]) == 3 and groups["visual_no_decay"]["weight_decay"] == 0.0
    assert groups["text"]["lr_scale"] == pytest.approx(0.1) and groups["visual"]["lr_scale"] == 1.0
    groups = param_groups(m, OptimConfig(lr=1e-3, text_lr=1e-5, no_decay_norm_bias=False))
    assert {g["name"] for g in groups} == {"visual", "text"}
    assert [g for g in groups if g["name"] == "text"][0]["lr_scale"] == pytest.approx(0.01)
    m.text_encoder.requires_grad_(False)  # frozen parameters are left out
    assert {g["name"] for g in param_groups(m, OptimConfig())} == {"visual", "visual_no_decay"}
    opt = torch.optim.AdamW(param_groups(m, OptimConfig()), lr=1.0)
    assert len(opt.param_groups) == 2


def test_language_gates_get_their_own_rate_and_are_read_per_stage():
    """``gate_lr_scale``: the gates (w_f's InstanceNorm scales) in a group of their own at lr x scale (at the
    default 1.0 no extra group: earlier checkpoints' optimiser states still fit); ``language_gates`` reads how
    open the branch is per stage, 0 at the closed start."""
    from lsms.model import build_model
    from lsms.model.encoder import LanguageGuidedBranch

    from conftest import tiny_model_kwargs

    model = build_model("tiny", **tiny_model_kwargs())
    branches = [m for m in model.modules() if isinstance(m, LanguageGuidedBranch)]
    assert len(branches) == sum(model.config.depths) and model.encoder.language_gates() == [0.0] * 4
    assert {g["name"] for g in param_groups(model, OptimConfig())} == {"visual", "visual_no_decay", "text",
                                                                        "text_no_decay"}
    groups = {g["name"]: g for g in param_groups(model, OptimConfig(gate_lr_scale=10.0))}
    assert set(groups) == {"visual", "visual_no_decay", "gate_no_decay", "text", "text_no_decay"}
    assert groups["gate_no_decay"]["lr_scale"] == 10.0 and groups["gate_no_decay"]["weight_decay"] == 0.0
    assert {id(p) for p in groups["gate_no_decay"]["params"]} == {id(b.gate) for b in branches}
    with torch.no_grad():
        branches[0].gate.fill_(-0.6)  # the first block of stage 1 (of depths[0] blocks)
    assert model.encoder.language_gates() == pytest.approx([0.6 / model.config.depths[0], 0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="optim.gate_lr_scale must be > 0"):
        OptimConfig(gate_lr_scale=0.0)


def test_run_config_validation_and_round_trip():
    cfg = RunConfig.from_dict({"data": {"path": "d"}, "optim": {"epochs": 3, "betas": [0.9, 0.99]},
                               "model": {"preset": "small", "decoder": "last"}, "loss": {"tau": 0.2}})
    assert cfg.optim.betas == (0.9, 0.99) and cfg.model.widths == (64, 128, 320, 512) and cfg.loss.tau == 0.2
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    assert RunConfig.from_dict(RunConfig().to_dict()) == RunConfig()
    with pytest.raises(ValueError, match="text_level"):
        RunConfig.from_dict({"data": {"text_level": "most"}})
    with pytest.raises(ValueError, match="batch_size"):
        RunConfig.from_dict({"optim": {"batch_size": 0}})
    with pytest.raises(ValueError, match=r"unknown optim settings \['learning_rate'\] in optim"):
        RunConfig.from_dict({"optim": {"learning_rate": 1}})
    with pytest.raises(ValueError, match="multiple of 32 and at least 64"):
        RunConfig.from_dict({"data": {"image_size": 32}})  # the API path checks the size too


def test_settings_file(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("optim:\n  epochs: 4\n  batch-size: 2\n  lr: 3.0e-5\nmodel: {preset: small}\n")
    assert load_settings_file(path) == {"optim": {"epochs": 4, "batch_size": 2, "lr": 3e-5}, "model": {"preset": "small"}}
    path.write_text("optim: {epochs: 4, learning_rate: 1}\n")
    with pytest.raises(ValueError, match=r"unknown optim settings \['learning_rate'\] in .*s.yaml.optim"):
        load_settings_file(path)
    path.write_text("epochs: 4\nlearning_rate: 1\n")
    with pytest.raises(ValueError, match="unknown settings \\['learning_rate'\\]"):
        load_settings_file(path)
    path.write_text("!!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(Exception):  # noqa: B017 - safe_load refuses code (yaml or ValueError)
        load_settings_file(path)
    with pytest.raises(FileNotFoundError):
        load_settings_file(tmp_path / "missing.yaml")


def test_flat_settings_file_of_lsms_0_1_still_loads(tmp_path, caplog):
    """A settings file written before the tree (flat keys) loads, and the log names every moved key."""
    path = tmp_path / "old.yaml"
    path.write_text("data: /data/refliver\nepochs: 4\nbatch-size: 2\nlr: 3.0e-5\npreset: small\nfreeze_text: true\n"
                    "image_size: 128\nmodel_overrides: {decoder: last, max_tokens: 64}\nloss: {tau: 0.2}\nseed: 3\n"
                    "augment: true\naugmentation: {patch_size: 64, text_flip: swap}\n")
    with caplog.at_level("WARNING"):
        cfg = RunConfig.from_dict(load_settings_file(path))
    assert (cfg.data.path, cfg.data.image_size, cfg.optim.epochs, cfg.optim.batch_size, cfg.optim.lr, cfg.seed) == \
        ("/data/refliver", 128, 4, 2, 3e-5, 3)
    assert (cfg.model.preset, cfg.model.decoder, cfg.model.text.freeze, cfg.model.text.max_tokens) == \
        ("small", "last", True, 64)
    assert cfg.model.widths == (64, 128, 320, 512) and cfg.loss.tau == 0.2
    assert cfg.data.augment and (cfg.data.augmentation.patch_size, cfg.data.augmentation.text_flip) == (64, "swap")
    assert "lr -> optim.lr" in caplog.text and "model_overrides -> model" in caplog.text
    assert "freeze_text -> model.text.freeze" in caplog.text


def test_grouped_sampler_keeps_groups_together_and_splits_ranks():
    from lsms.distributed import GroupedSampler, ShardSampler

    groups = [[0, 1, 2], [3], [4, 5], [6, 7, 8, 9], [10, 11]]
    ranks = [GroupedSampler(groups, batch_size=2, rank=r, world_size=2, seed=0) for r in range(2)]
    for s in ranks:
        s.set_epoch(3)
    a, b = list(ranks[0]), list(ranks[1])
    assert len(a) == len(b) == len(ranks[0]) == 6 and not set(a) & set(b)  # 12 // 4 = 3 batches per rank
    flat = [i for pair in zip([a[i:i + 2] for i in range(0, 6, 2)], [b[i:i + 2] for i in range(0, 6, 2)], strict=True)
            for batch in pair for i in batch]
    group_of = {i: k for k, g in enumerate(groups) for i in g}
    runs = [group_of[i] for i in flat]
    assert sum(x != y for x, y in zip(runs, runs[1:], strict=False)) <= len(groups) - 1  # each group one run
    ranks[0].set_epoch(4)
    assert list(ranks[0]) != a  # reshuffled each epoch
    assert list(ShardSampler(7, 1, 3)) == [1, 4]


def test_recipes_with_a_baseline_and_the_augmentation_seed(caplog):
    from lsms.cli import build_parser
    from lsms.train import config_from_args

    def config(*argv):
        return config_from_args(build_parser().parse_args(["train", "d", *argv]))

    with caplog.at_level("WARNING"):
        unet = config("--recipe", "real", "--preset", "unet")
    assert unet.model.coord_embed and "['output_stride'] do not exist in the unet baseline" in caplog.text
    paper = config("--paper-recipe")  # the recipe's preset is the registered model: base's numbers
    assert (paper.model.preset, paper.model.depths, paper.optim.lr, paper.data.image_size) == ("base", (3, 3, 12, 3), 3e-5, 480)
    with pytest.raises(ValueError, match="the run's seed"):
        config("--augmentation", "seed=3")


def test_settings_refuse_what_a_library_would_answer_with_its_own_message(tmp_path):
    from lsms.distributed import pick_device

    with pytest.raises(ValueError, match=r"seed must be between 0 and 2\*\*63-1"):
        RunConfig(seed=2**70)
    (tmp_path / "ten.yaml").write_text("optim:\n  epochs: ten\n")
    with pytest.raises(ValueError, match=r"ten\.yaml\.optim\.epochs must be a whole number, got 'ten'"):
        load_settings_file(tmp_path / "ten.yaml")
    (tmp_path / "lr.yaml").write_text("optim:\n  lr: 1e-4\n")
    with pytest.raises(ValueError, match=r"optim\.lr must be a number, got '1e-4' \(YAML reads .* write 1\.0e-4\)"):
        load_settings_file(tmp_path / "lr.yaml")
    with pytest.raises(ValueError, match=r"optim\.epochs must be a whole number, got 2\.5"):
        RunConfig.from_dict({"optim": {"epochs": 2.5}})
    (tmp_path / "bad.yaml").write_text("optim:\n  epochs: [1\n  lr: 2\n")
    with pytest.raises(ValueError, match=r"settings file '.*bad\.yaml' line 3, column 5: not valid YAML"):
        load_settings_file(tmp_path / "bad.yaml")
    for device in ("bogus", "cuda:x", "meta"):
        with pytest.raises(ValueError, match=rf"unknown device '{device}'; use auto, cpu, cuda, cuda:N .* or mps"):
            pick_device(device)
    assert pick_device("cpu") == torch.device("cpu")
