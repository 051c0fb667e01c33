"""Cost profile (FLOP convention, JSON fields) and the MSCAN weight import."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lsms import build_model
from lsms.cli import main
from lsms.model.mscan import load_mscan_weights
from lsms.profile import count_flops

from conftest import tiny_model_kwargs


def test_flop_convention_on_a_hand_countable_conv():
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    # 8x8 outputs x 8 channels x (3*3*3) MACs, 2 FLOPs per MAC
    assert count_flops(conv, torch.randn(1, 3, 8, 8)) == 2 * 8 * 8 * 8 * 27


def test_profile_json(capsys):
    assert main(["profile", "--preset", "tiny", "--image-size", "64", "--text-encoder", "none",
                 "--repeats", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["preset"] == "tiny" and out["image_size"] == 64
    assert out["params"]["text"] == 0 and out["params"]["total"] == out["params"]["vision"] > 1e6
    assert out["gflops"] == pytest.approx(2 * out["gmacs"], abs=2e-3)
    assert out["latency_ms"] > 0


def test_profile_rejects_bad_sizes(capsys):
    assert main(["profile", "--preset", "tiny", "--image-size", "100"]) == 2
    assert "a multiple of 32 and at least 64" in capsys.readouterr().err


def _mscan_state_dict(model) -> dict[str, torch.Tensor]:
    """A checkpoint with SegNeXt MSCAN key names and the shapes of ``model``'s visual branch (3-channel stem)."""
    sd = {}
    enc = model.encoder
    stem = enc.stages[0].down.proj
    sd["patch_embed1.proj.0.weight"] = torch.randn(stem[0].out_channels, 3, 3, 3)
    sd["patch_embed1.proj.1.running_mean"] = torch.randn(stem[1].num_features)
    for i, stage in enumerate(enc.stages, start=1):
        if i > 1:
            sd[f"patch_embed{i}.proj.weight"] = torch.randn_like(stage.down.conv.weight)
            sd[f"patch_embed{i}.norm.weight"] = torch.randn_like(stage.down.norm.weight)
        for j, block in enumerate(stage.blocks):
            p = f"block{i}.{j}."
            c = block.svla.mix.in_channels
            sd[p + "attn.spatial_gating_unit.conv0.weight"] = torch.randn(c, 1, 5, 5)
            for k, d in enumerate((7, 11, 21)):
                sd[p + f"attn.spatial_gating_unit.conv{k}_1.weight"] = torch.randn(c, 1, 1, d)
                sd[p + f"attn.spatial_gating_unit.conv{k}_2.weight"] = torch.randn(c, 1, d, 1)
            sd[p + "attn.spatial_gating_unit.conv3.weight"] = torch.randn(c, c, 1, 1)
            sd[p + "attn.proj_1.weight"] = torch.randn(c, c, 1, 1)
            sd[p + "norm1.weight"] = torch.randn(c)
            sd[p + "mlp.fc1.weight"] = torch.randn_like(block.ffn.fc1.weight)
            sd[p + "mlp.dwconv.dwconv.weight"] = torch.randn_like(block.ffn.dwconv.weight)
            sd[p + "mlp.fc2.weight"] = torch.randn_like(block.ffn.fc2.weight)
        sd[f"norm{i}.weight"] = torch.randn(stage.blocks[0].norm1.weight.shape[0])
    return {"state_dict": {"backbone." + k: v for k, v in sd.items()} | {"decode_head.conv_seg.weight": torch.randn(2, 2)}}


def test_mscan_import_maps_conv_weights_and_reports(tmp_path):
    model = build_model("tiny", **tiny_model_kwargs(in_channels=1, conv_kernels=(7, 21)))
    ckpt = _mscan_state_dict(model)
    path = tmp_path / "mscan_t.pth"
    torch.save(ckpt, path)
    report = load_mscan_weights(model, path)
    src = ckpt["state_dict"]
    blk = model.encoder.stages[2].blocks[1]
    assert torch.equal(blk.svla.conv5x5.weight, src["backbone.block3.1.attn.spatial_gating_unit.conv0.weight"])
    assert torch.equal(blk.svla.conv_units[1].conv_w.weight, src["backbone.block3.1.attn.spatial_gating_unit.conv2_1.weight"])
    assert torch.equal(blk.svla.conv_units[0].conv_h.weight, src["backbone.block3.1.attn.spatial_gating_unit.conv0_2.weight"])
    assert torch.equal(blk.ffn.fc2.weight, src["backbone.block3.1.mlp.fc2.weight"])
    assert torch.equal(model.encoder.stages[3].down.conv.weight, src["backbone.patch_embed4.proj.weight"])
    # 1-channel stem: RGB filters summed
    stem_w = model.encoder.stages[0].down.proj[0].weight
    assert torch.allclose(stem_w, src["backbone.patch_embed1.proj.0.weight"].sum(1, keepdim=True))
    assert report.adapted == ["patch_embed1.proj.0.weight"]
    # what was not loaded is said, with the reason
    assert "ConvUnit d=11" in report.skipped["block1.0.attn.spatial_gating_unit.conv1_1.weight"]
    assert report.skipped["block1.0.attn.proj_1.weight"] == "no counterpart in LSMS"
    assert "post-norm" in report.skipped["block1.0.norm1.weight"]
    assert "decode_head.conv_seg.weight" in report.skipped and "norm4.weight" in report.skipped
    assert "encoder.stages.0.blocks.0.svla.language.w_l1.weight" in report.not_loaded
    assert "encoder.stages.0.blocks.0.svla.conv5x5.weight" not in report.not_loaded
    assert "loaded" in report.summary()


def test_mscan_import_missing_file(tmp_path):
    model = build_model("tiny", use_text=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_mscan_weights(model, tmp_path / "nope.pth")


def test_profile_backends_side_by_side(capsys):
    pytest.importorskip("onnxruntime")
    assert main(["profile", "--preset", "unet", "--image-size", "64", "--repeats", "1", "--backends", "torch",
                 "onnxruntime", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["backend"] for r in rows] == ["torch", "onnxruntime"]
    for r in rows:
        assert r["images_per_s_b8_best"] >= r["images_per_s_b8"] > 0 and r["latency_b1_best_ms"] > 0
        assert r["matmul_peak_gflops"] > 0 and r["peak_share_pct"] > 0 and r["cpu_s"] > 0
        assert r["images_per_cpu_s_b8"] > 0 and r["peak_share_cpu_pct"] > 0
    assert rows[0]["gmacs"] == rows[1]["gmacs"]


def test_profile_train_step(capsys):
    assert main(["profile", "--train-step", "--preset", "unet", "--image-size", "64", "--batch", "2",
                 "--repeats", "1", "--precision", "fp32", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert (row["preset"], row["text"], row["precision"], row["batch"]) == ("unet", False, "fp32", 2)
    assert row["cpu_s"] > 0 and len(row["ops"]) == 15 and sum(o["share"] for o in row["ops"]) <= 1.0
    assert row["ops"][0]["self_ms"] >= row["ops"][-1]["self_ms"]
    # 3 x the forward: BasicUNet at 64 px, batch 2, halved widths
    assert row["gflop_step"] == pytest.approx(3 * 2 * _unet_forward_flops(64) / 1e9, rel=1e-6)


def _unet_forward_flops(size: int) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    from lsms.model import build_model

    model = build_model("unet", in_channels=3)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 3, size, size))
    return counter.get_total_flops()
