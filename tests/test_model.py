"""Behaviour of the LSMS network: shapes, gradients, determinism, text handling, errors, checkpoint keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lsms import build_model
from lsms.model import PRESETS, LSMSConfig, model_config
from lsms.model.decoder import NMF2D
from lsms.model.encoder import LanguageGuidedBranch
from lsms.model.layers import pointwise

from conftest import tiny_model_kwargs

SIZE = 64
SNAPSHOT = Path(__file__).parent / "snapshots" / "state_dict_keys_tiny.txt"

ABLATIONS = {
    "default": {},
    "conv_d7": dict(conv_kernels=(7,)),
    "conv_d11": dict(conv_kernels=(11,)),
    "conv_d21": dict(conv_kernels=(21,)),
    "no_conv_units": dict(conv_kernels=()),
    "no_pixel_map": dict(pixel_map=False),
    "wo_fsd": dict(decoder="last"),
    "fsd_p4_only": dict(decoder_stages=(4,)),
    "fsd_p1234": dict(decoder_stages=(1, 2, 3, 4)),
    "fsd_no_hamburger": dict(hamburger=False),
    "fsd_stage_mlp": dict(stage_mlp=True),
    "no_text": dict(use_text=False),
    "coord_embed": dict(coord_embed=True),
    "output_stride_2": dict(output_stride=2),
}


def _inputs(model, texts, batch=None, size=SIZE, channels=3):
    batch = batch or len(texts)
    image = torch.randn(batch, channels, size, size)
    if not model.config.use_text:
        return image, None, None
    tok = model.tokenize(texts)
    return image, tok["input_ids"], tok["attention_mask"]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_shape_table(preset):
    model = build_model(preset, **tiny_model_kwargs())
    cfg = model.config
    image, ids, mask = _inputs(model, ["the larger cyst in segment VI", "a nodule"])
    model.eval()
    with torch.no_grad():
        out = model.forward_features(image, ids, mask)
    assert out.logits.shape == (2, 1, SIZE, SIZE)
    for f, width, stride in zip(out.stages, cfg.widths, (4, 8, 16, 32)):
        assert f.shape == (2, width, SIZE // stride, SIZE // stride)
    assert out.decoder.shape == (2, cfg.head_channels, SIZE // 4, SIZE // 4)
    assert out.text_embedding.shape == (2, cfg.head_channels)
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_every_parameter_gets_a_gradient(name):
    # the language branches open (as after training): at the closed start the gradients of everything before
    # w_f's scale are exactly zero, and "is not None" alone would not show that they reach the branch
    model = _open_language_gates(build_model("tiny", **tiny_model_kwargs(**ABLATIONS[name])))
    model.train()
    image, ids, mask = _inputs(model, ["the smaller hypodense lesion in segment VI", "a cyst"])
    out = model.forward_features(image, ids, mask)
    # stand-in for L_seg + L_con: touches the logits and the (decoder, text embedding) pair
    loss = out.logits.square().mean()
    if out.text_embedding is not None:
        loss = loss + (out.decoder.mean((2, 3)) * out.text_embedding).mean()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient for {missing}"
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradient for {bad}"
    # the sentence reaches the loss: every language-branch and text-encoder weight gets a non-zero gradient
    # (BERT's pooler feeds nothing; a branch's norm bias is cancelled by the InstanceNorm after it)
    language = [n for n, p in model.named_parameters() if (".language." in n or n.startswith("text_encoder."))
                and "pooler" not in n and p.ndim > 1]
    assert not [n for n in language if model.get_parameter(n).grad.abs().sum() == 0], "zero gradient"
    assert bool(language) == model.config.use_text
    if name == "wo_fsd":
        assert out.decoder.shape[-1] == SIZE // 32


def test_eval_forward_is_deterministic():
    model = build_model("tiny", **tiny_model_kwargs()).eval()
    image, ids, mask = _inputs(model, ["segment VII nodule", "cyst"])
    with torch.no_grad():
        torch.manual_seed(1)
        a = model(image, ids, mask)
        torch.manual_seed(2)  # the global RNG must not matter in eval
        b = model(image, ids, mask)
    assert torch.equal(a, b)


def _open_language_gates(model):
    """Give every language-guided branch a non-zero output scale, as training does (they start at 0)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LanguageGuidedBranch):
                module.w_f[1].weight.fill_(1.0)
    return model


def test_language_branches_start_closed_and_training_opens_them():
    model = build_model("tiny", **tiny_model_kwargs()).eval()
    image = torch.randn(1, 3, SIZE, SIZE)
    texts = ("the cyst in segment VI", "the metastasis in segment II")

    def outputs():
        with torch.no_grad():
            return [model(image, **{k: v for k, v in model.tokenize([t]).items() if k != "truncated"})
                    for t in texts]

    a, b = outputs()
    assert torch.equal(a, b)  # Att_L = 0 at initialisation: the sentence cannot matter yet
    # one optimiser step on a loss that needs the text moves the gates off zero
    model.train()
    tok = model.tokenize(list(texts))
    loss = model(image.expand(2, -1, -1, -1), tok["input_ids"], tok["attention_mask"]).mean((1, 2, 3))
    (loss[0] - loss[1]).backward()
    gates = [m.w_f[1].weight for m in model.modules() if isinstance(m, LanguageGuidedBranch)]
    assert all(g.grad is not None and g.grad.abs().sum() > 0 for g in gates)


def test_padding_does_not_change_the_output():
    model = _open_language_gates(build_model("tiny", **tiny_model_kwargs()).eval())
    image, ids, mask = _inputs(model, ["the larger cyst"], batch=1)
    pad = 9
    ids_padded = torch.cat([ids, torch.zeros(1, pad, dtype=ids.dtype)], dim=1)
    mask_padded = torch.cat([mask, torch.zeros(1, pad, dtype=mask.dtype)], dim=1)
    with torch.no_grad():
        a = model(image, ids, mask)
        b = model(image, ids_padded, mask_padded)
        # and padded by the tokenizer next to a longer sentence in the same batch
        tok = model.tokenize(["the larger cyst", "the most anterior metastasis in segment IVa of the liver"])
        c = model(image.expand(2, -1, -1, -1), tok["input_ids"], tok["attention_mask"])[:1]
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)  # padded length changes the BLAS kernel (2e-5 seen on 1 thread)
    torch.testing.assert_close(a, c, atol=2e-4, rtol=1e-4)  # batched kernels round differently


def test_a_different_sentence_gives_a_different_output():
    model = _open_language_gates(build_model("tiny", **tiny_model_kwargs()).eval())
    image = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        outs = [model(image, **{k: v for k, v in model.tokenize([t]).items() if k != "truncated"})
                for t in ("the cyst in segment VI", "the metastasis in segment II")]
    assert (outs[0] - outs[1]).abs().max() > 1e-4


def test_no_text_model_has_no_language_parameters():
    model = build_model("tiny", use_text=False)
    names = [n for n, _ in model.named_parameters()]
    assert not [n for n in names if "text" in n or "language" in n]
    assert model.text_encoder is None and model.text_proj is None
    out = model.forward_features(torch.randn(2, 3, SIZE, SIZE))
    assert out.text_embedding is None and out.logits.shape == (2, 1, SIZE, SIZE)
    with pytest.raises(ValueError, match="without text"):
        model.tokenize(["a cyst"])


def test_any_number_of_input_channels():
    model = build_model("tiny", **tiny_model_kwargs(in_channels=1)).eval()
    image, ids, mask = _inputs(model, ["a cyst"], channels=1)
    assert model(image, ids, mask).shape == (1, 1, SIZE, SIZE)


@pytest.mark.parametrize("channels", [1, 3])
def test_the_network_runs_channels_last_from_any_image(channels):
    """A contiguous one-channel image already counts as channels-last, and a convolution reads its strides as NCHW
    (the stem, then every depthwise convolution, would run NCHW): the encoder copies it into channels-last strides,
    so every convolution of the encoder puts out a channels-last map, as with RGB."""
    model = build_model("tiny", **tiny_model_kwargs(in_channels=channels)).eval()
    image, ids, mask = _inputs(model, ["a cyst"], channels=channels)
    strides = []
    for conv in model.encoder.modules():
        if isinstance(conv, nn.Conv2d):
            conv.register_forward_hook(lambda m, i, out: strides.append((type(m).__name__, out.stride())))
    with torch.no_grad():
        model(image.contiguous(), ids, mask)
    assert len(strides) > 40
    assert [s for s in strides if s[1][1] != 1] == []


def test_nmf_is_deterministic_in_eval_and_low_rank():
    nmf = NMF2D(16, rank=4).eval()
    x = torch.rand(2, 16, 8, 8)
    a, b = nmf(x), nmf(x)
    assert torch.equal(a, b)
    assert (a >= 0).all()
    assert torch.linalg.matrix_rank(a[0].view(16, 64)) <= 4
    # the reconstruction explains most of a rank-4 non-negative matrix
    y = (torch.rand(1, 16, 4) @ torch.rand(1, 4, 64)).view(1, 16, 8, 8)
    assert (nmf(y) - y).norm() / y.norm() < 0.2


def test_nmf_projects_its_bases_as_a_1x1_conv_projects_its_output():
    """W (D Cf^T) computed as (W D) Cf^T: the Hamburger's output conv applied to the bases is the conv of the
    reconstruction, forward and backward."""
    nmf = NMF2D(16, rank=4).eval()
    x = torch.rand(2, 16, 8, 8, requires_grad=True)
    w = torch.randn(8, 16, requires_grad=True)
    fused, plain = nmf(x, project=w), pointwise(nmf(x), w[..., None, None])
    assert fused.shape == (2, 8, 8, 8)
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
    grads = [torch.autograd.grad(y.square().sum(), (x, w)) for y in (fused, plain)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_language_gate_init_is_a_config_value():
    closed = build_model("tiny", **tiny_model_kwargs())
    opened = build_model("tiny", **tiny_model_kwargs(language_gate_init=1.0))  # PyTorch's default init
    assert closed.config.language_gate_init == 0.0
    for model, value in ((closed, 0.0), (opened, 1.0)):
        gates = [m.w_f[1].weight for m in model.modules() if isinstance(m, LanguageGuidedBranch)]
        assert gates and all(torch.all(g == value) for g in gates)
    image = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        outs = [opened.eval()(image, **{k: v for k, v in opened.tokenize([t]).items() if k != "truncated"})
                for t in ("the cyst in segment VI", "the metastasis in segment II")]
    assert (outs[0] - outs[1]).abs().max() > 1e-4  # open from the start: the sentence matters untrained


@pytest.mark.parametrize("use_text", [True, False])
def test_smallest_input_size(use_text):
    model = build_model("tiny", **tiny_model_kwargs(use_text=use_text)).train()
    image, ids, mask = _inputs(model, ["a cyst", "a nodule"], size=32)
    with pytest.raises(ValueError, match="at least 64 pixels .* use 64x64"):
        model(image, ids, mask)  # stage 4 would be 1x1: InstanceNorm (text) / BatchNorm cannot normalise it
    image, ids, mask = _inputs(model, ["a cyst", "a nodule"], size=64)
    assert model(image, ids, mask).shape == (2, 1, 64, 64)


def test_truncation_is_counted():
    model = build_model("tiny", **tiny_model_kwargs(text={"max_tokens": 8}))
    tok = model.tokenize(["a very long sentence about the lesion in segment six of the liver", "cyst"])
    assert tok["input_ids"].shape[1] == 8
    assert tok["truncated"].tolist() == [True, False]
    assert model.tokenizer.truncated == 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(preset="huge"), "unknown preset"),
        (dict(text={"max_tokenz": 8}), "unknown text config fields"),
        (dict(widthz=(1, 2, 3, 4)), "unknown model settings"),
        (dict(conv_kernels=(8,)), "conv_kernels must be odd"),
        (dict(decoder="unet"), "decoder must be"),
        (dict(decoder_stages=(0, 5)), "decoder_stages"),
        (dict(in_channels=0), "in_channels"),
        (dict(ham_channels=100), "multiples of 32"),
        (dict(depths=(1, 1, 1)), "4 entries"),
        (dict(output_stride=8), "output_stride must be 4"),
    ],
)
def test_ill_arguments(kwargs, message):
    preset = kwargs.pop("preset", "tiny")
    with pytest.raises(ValueError, match=message):
        build_model(preset, **tiny_model_kwargs(**kwargs))


def test_ill_inputs():
    model = build_model("tiny", **tiny_model_kwargs())
    image, ids, mask = _inputs(model, ["a cyst"])
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.randn(1, 3, 70, 64), ids, mask)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.randn(1, 1, SIZE, SIZE), ids, mask)
    with pytest.raises(ValueError, match="pass input_ids"):
        model(image)
    with pytest.raises(ValueError, match="B = 1 images"):
        model(image, ids.repeat(2, 1), mask.repeat(2, 1))
    with pytest.raises(TypeError, match="list of strings"):
        model.tokenize("a cyst")


def test_coord_embed_reads_positions():
    from lsms.model.encoder import coordinate_grid

    torch.manual_seed(0)
    model = build_model("tiny", **tiny_model_kwargs(coord_embed=True)).eval()
    image, ids, mask = _inputs(model, ["the lesion in the upper-left region"])
    with torch.no_grad():
        for stage in model.encoder.stages:  # starts at zero: open it
            torch.nn.init.normal_(stage.position.weight)
        whole = model(image, ids, mask)
        torch.testing.assert_close(whole, model(image, ids, mask, coordinate_grid(1, SIZE, SIZE)))  # the default
        moved = model(image, ids, mask, coordinate_grid(1, SIZE, SIZE).flip(-1))
    assert not torch.allclose(whole, moved, atol=1e-4)  # the same pixels elsewhere in the image
    with pytest.raises(ValueError, match=r"coords must be \(B, 2, H, W\)"):
        model(image, ids, mask, coordinate_grid(1, 32, 32))


def test_output_stride_2_starts_as_the_fsd_output():
    import torch.nn.functional as F

    torch.manual_seed(0)
    fsd = build_model("tiny", **tiny_model_kwargs()).eval()
    refined = build_model("tiny", **tiny_model_kwargs(output_stride=2)).eval()
    missing = refined.load_state_dict(fsd.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith("refine.") for k in missing)
    image, ids, mask = _inputs(fsd, ["a cyst"])
    with torch.no_grad():
        stages = fsd.encoder(image, fsd.text_encoder(ids, mask), mask)
        quarter = fsd.decoder(stages)[0]  # (1, 1, H/4, W/4)
        half = F.interpolate(quarter, size=(SIZE // 2, SIZE // 2), mode="bilinear", align_corners=False)
        expected = F.interpolate(half, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        out = refined.forward_features(image, ids, mask).logits
        assert torch.equal(out, expected)  # the residual starts at exactly zero
        torch.nn.init.normal_(refined.refine.out.weight)
        assert not torch.allclose(refined(image, ids, mask), out)


def test_config_round_trip():
    cfg = build_model("tiny", **tiny_model_kwargs(conv_kernels=(11,))).config
    again = LSMSConfig.from_dict(cfg.to_dict())
    assert again == cfg
    with pytest.raises(ValueError, match="unknown LSMS config fields"):
        LSMSConfig.from_dict({**cfg.to_dict(), "colour": "red"})


def test_state_dict_keys_snapshot():
    """Renaming a submodule silently breaks saved checkpoints: keys are pinned (MONAI's lesson).

    After an intended change, regenerate with ``python tests/test_model.py``.
    """
    keys = [k for k in build_model("tiny", **tiny_model_kwargs()).state_dict() if not k.startswith("text_encoder.")]
    assert keys == SNAPSHOT.read_text().split()


if __name__ == "__main__":
    model = build_model("tiny", **tiny_model_kwargs())
    SNAPSHOT.write_text("\n".join(k for k in model.state_dict() if not k.startswith("text_encoder.")) + "\n")


def test_group_block_norm_keeps_an_out_of_range_sample_finite():
    """With BatchNorm's running statistics (eval), SVLA's gate (Conv1x1(...) * V) squares the scale of a sample
    outside the training range at every block; GroupNorm normalises each sample and cannot diverge."""
    torch.manual_seed(0)
    image = torch.randn(2, 1, 64, 64)
    image[1] *= 1e4  # far outside anything BatchNorm's running statistics have seen
    out = {}
    for norm in ("batch", "group"):
        model = build_model("tiny", **tiny_model_kwargs(in_channels=1, block_norm=norm)).eval()
        tok = model.tokenize(["a cyst in segment VI", "a cyst in segment VI"])
        with torch.no_grad():
            out[norm] = model(image, tok["input_ids"], tok["attention_mask"])
    assert not torch.isfinite(out["batch"][1]).all()  # the failure block_norm="group" avoids
    assert torch.isfinite(out["group"]).all() and torch.isfinite(out["batch"][0]).all()
    group = build_model("tiny", **tiny_model_kwargs(in_channels=1, block_norm="group"))
    assert not any("blocks" in k and "running_mean" in k for k in group.state_dict())
    with pytest.raises(ValueError, match="block_norm must be"):
        LSMSConfig(block_norm="layer")


def test_truncation_is_logged_once_and_counted(caplog):
    model = build_model("tiny", **tiny_model_kwargs(text={"max_tokens": 8}))
    long = "a very long sentence about the lesion in segment six of the liver"
    with caplog.at_level("WARNING", logger="lsms.text"):
        for _ in range(3):
            model.tokenize([long, long, "cyst"])
    assert model.tokenizer.truncated == 6
    assert len([r for r in caplog.records if "truncated to 8 tokens" in r.message]) == 1


def test_decoder_equals_the_printed_order():
    """The decoder squeezes each P_i at its own resolution and aligns the result; Eq. 11-12 align, concatenate
    and squeeze. Both are linear up to the GroupNorm, so they agree up to rounding."""
    torch.manual_seed(0)
    for kwargs in (dict(), dict(decoder_stages=(1, 2, 3, 4), stage_mlp=True)):
        model = build_model("tiny", **tiny_model_kwargs(use_text=False, **kwargs)).eval()
        dec = model.decoder
        features = [torch.randn(2, c, SIZE // s, SIZE // s) for c, s in zip(model.config.widths, (4, 8, 16, 32))]
        size = features[0].shape[-2:]
        aligned = [F.interpolate(features[s - 1], size=size, mode="bilinear", align_corners=False) if s > 1
                   else features[0] for s in dec.stages]
        if dec.stage_mlp is not None:
            aligned = [mlp(p) for mlp, p in zip(dec.stage_mlp, aligned)]
        with torch.no_grad():
            printed = dec._head(dec.squeeze(torch.cat(aligned, dim=1)))
            fast = dec(features)
        for a, b in zip(fast, printed):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_channels_last_layers_match_their_reference():
    from lsms.model.layers import GroupNorm, Pointwise

    torch.manual_seed(0)
    conv = nn.Conv2d(24, 40, 1)
    pw = Pointwise(24, 40)
    pw.load_state_dict(conv.state_dict())
    x = torch.randn(2, 24, 9, 7)
    for fmt in (torch.contiguous_format, torch.channels_last):
        torch.testing.assert_close(pw(x.contiguous(memory_format=fmt)), conv(x), atol=1e-5, rtol=1e-5)
    assert pw(x.contiguous(memory_format=torch.channels_last)).is_contiguous(memory_format=torch.channels_last)
    # a map whose mean is 40x its spread: PyTorch's channels-last kernel is off by ~4e-3, ours by ~1e-5
    y = (torch.randn(2, 64, 28, 28) * 0.5 + 20).contiguous(memory_format=torch.channels_last).requires_grad_()
    for groups in (1, 32, 64):
        norm = GroupNorm(groups, 64)
        reference = nn.GroupNorm(groups, 64).double()
        want = reference(y.detach().double())
        got = norm(y)
        assert float((got.detach().double() - want).abs().max()) < 1e-4
        grad_want = torch.autograd.grad((reference(y.double()) * want).sum(), y)[0]
        grad_got = torch.autograd.grad((norm(y) * want.float()).sum(), y)[0]
        torch.testing.assert_close(grad_got.double(), grad_want.double(), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("kernel,size", [((1, 7), (9, 13)), ((1, 11), (9, 7)), ((7, 1), (9, 13)), (5, (9, 8)),
                                         (3, (9, 8))])
def test_depthwise_convolution_matches_the_plain_one_in_every_path(kernel, size):
    """Depthwise's fast paths (a 1 x k strip over the transposed map when k fits the width; 5 x 5 in fp32 under
    bf16 autocast) give the plain convolution's outputs and gradients, in the input's memory format and dtype."""
    from lsms.model.layers import Depthwise

    torch.manual_seed(0)
    depthwise = Depthwise(6, kernel)
    plain = nn.Conv2d(6, 6, depthwise.kernel_size, padding=depthwise.padding, groups=6)
    plain.load_state_dict(depthwise.state_dict())
    x = torch.randn(2, 6, *size).contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn(2, 6, *size)
    outputs = []
    for conv in (depthwise, plain):
        xi = x.clone().requires_grad_()
        y = conv(xi)
        (y * grad_out).sum().backward()
        outputs.append((y, xi.grad, conv.weight.grad, conv.bias.grad))
    assert outputs[0][0].is_contiguous(memory_format=torch.channels_last)
    for got, want in zip(*outputs):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast, reference = depthwise(x), plain(x)
    assert fast.dtype == reference.dtype == torch.bfloat16
    # bf16 rounding of the inputs and of the output: a few units in the last place of bf16 (2^-8 relative)
    torch.testing.assert_close(fast.float(), plain(x), atol=0.05, rtol=0.02)


def test_group_norm_blocks_are_the_default_and_the_paper_recipe_keeps_batch_norm():
    from importlib.resources import files

    import yaml

    for name in PRESETS:
        assert model_config(name).block_norm == "group"
    recipes = files("lsms") / "recipes"
    for recipe in recipes.iterdir():
        if recipe.name.endswith(".yaml"):
            model = yaml.safe_load(recipe.read_text()).get("model") or {}
            assert model.get("block_norm", "group") == ("batch" if recipe.name == "paper.yaml" else "group"), recipe.name
