"""Golden values and invariants of the LSMS losses (spec 2.6)."""

from __future__ import annotations

import math

import pytest
import torch

from lsms.losses import (
    LossConfig,
    LSMSLoss,
    _sample_indices,
    boundary_band,
    boundary_weighted_dice_loss,
    other_lesion_weight_at,
    other_lesions,
    sigmoid_focal_loss,
    vision_language_contrastive_loss,
)

LN2 = math.log(2.0)


def _mask(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)[None, None]  # (1, 1, H, W)


# --- focal -------------------------------------------------------------------------------------------------


def test_focal_golden_zero_logits():
    # p = 0.5 everywhere, so p_t = 0.5, (1 - p_t)^2 = 0.25, -log p_t = ln 2.
    # positive pixel: 0.25 (alpha) * 0.25 * ln2 = 0.0625 ln2; negative: 0.75 * 0.25 * ln2 = 0.1875 ln2.
    # mean over 4 pixels (1 pos, 3 neg): (0.0625 + 3 * 0.1875) / 4 ln2 = 0.15625 ln2.
    loss = sigmoid_focal_loss(torch.zeros(1, 1, 2, 2), _mask([[1, 0], [0, 0]]))
    assert loss.item() == pytest.approx(0.15625 * LN2, rel=1e-6)


def test_focal_golden_confident_positive():
    # logit ln 3 -> p = 3/4 on a positive: 0.25 * (1/4)^2 * ln(4/3).
    loss = sigmoid_focal_loss(torch.full((1, 1, 1, 1), math.log(3.0)), torch.ones(1, 1, 1, 1))
    assert loss.item() == pytest.approx(0.25 / 16 * math.log(4 / 3), rel=1e-6)


def test_focal_gamma0_alpha_half_is_half_bce():
    logits = torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    target = (torch.rand(2, 1, 3, 3, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    assert sigmoid_focal_loss(logits, target, alpha=0.5, gamma=0.0).item() == pytest.approx(
        0.5 * bce.item(), rel=1e-6
    )


def test_focal_matches_monai():
    # The definition is MONAI's sigmoid FocalLoss with a scalar alpha (the module does not import MONAI: slow).
    from monai.losses import FocalLoss

    g = torch.Generator().manual_seed(2)
    logits = 4 * torch.randn(2, 1, 5, 5, generator=g)
    target = (torch.rand(2, 1, 5, 5, generator=g) > 0.5).float()
    expected = FocalLoss(gamma=2.0, alpha=0.25, use_softmax=False, reduction="mean")(logits, target)
    assert sigmoid_focal_loss(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)


# --- boundary band and weighted Dice -----------------------------------------------------------------------


def test_boundary_band_of_square():
    # 3x3 square in a 7x7 image: dilation is the 5x5 square rows/cols 1..5, erosion the single centre pixel,
    # so the band is the 5x5 square without its centre (24 pixels).
    target = torch.zeros(1, 1, 7, 7)
    target[..., 2:5, 2:5] = 1
    expected = torch.zeros(1, 1, 7, 7)
    expected[..., 1:6, 1:6] = 1
    expected[..., 3, 3] = 0
    assert torch.equal(boundary_band(target, 3), expected)
    # 5x5 kernel: dilation covers the whole 7x7 image, erosion removes the whole 3x3 square.
    assert boundary_band(target, 5).sum().item() == 49


def test_boundary_band_border_not_eroded():
    # A full mask touches every border; pixels outside the image are ignored, so nothing is eroded.
    assert boundary_band(torch.ones(1, 1, 3, 3)).sum().item() == 0


def test_dice_golden_uniform_weight():
    # 2x2, target only at (0,0): every pixel is within one step of (0,0) -> dilation all 1; erosion all 0
    # -> E = 1 everywhere, W = 1.2. p = 0.5: sum Wpg = 0.6, sum Wp = 2.4, sum Wg = 1.2.
    # s = 1: 1 - (1.2 + 1) / (2.4 + 1.2 + 1) = 2.4 / 4.6.  s = 0: the weight cancels, 1 - 1.2/3.6 = 2/3.
    logits, target = torch.zeros(1, 1, 2, 2), _mask([[1, 0], [0, 0]])
    assert boundary_weighted_dice_loss(logits, target).item() == pytest.approx(2.4 / 4.6, rel=1e-6)
    assert boundary_weighted_dice_loss(logits, target, smooth=0.0).item() == pytest.approx(2 / 3, rel=1e-6)


def test_dice_golden_nonuniform_weight():
    # 3x3, target rows 0-1. Dilation: all 1. Erosion: row 0 only (row 1 sees row 2's zeros; outside ignored)
    # -> E = rows 1-2, W = 1 on row 0, 1.2 on rows 1-2. p = 0.5, s = 0:
    # sum Wpg = 0.5 (3*1 + 3*1.2) = 3.3; sum Wp = 0.5 (3 + 6*1.2) = 5.1; sum Wg = 6.6
    # loss = 1 - 6.6 / (5.1 + 6.6) = 5.1 / 11.7.
    target = _mask([[1, 1, 1], [1, 1, 1], [0, 0, 0]])
    loss = boundary_weighted_dice_loss(torch.zeros(1, 1, 3, 3), target, smooth=0.0)
    assert loss.item() == pytest.approx(5.1 / 11.7, rel=1e-6)
    # lambda = 1 is the plain soft Dice: 1 - 2*3 / (4.5 + 6) = 4.5 / 10.5.
    plain = boundary_weighted_dice_loss(torch.zeros(1, 1, 3, 3), target, boundary_lambda=1.0, smooth=0.0)
    assert plain.item() == pytest.approx(4.5 / 10.5, rel=1e-6)


def test_dice_is_mean_over_images():
    target = torch.cat([_mask([[1, 0], [0, 0]]), _mask([[1, 1], [1, 1]])])
    logits = torch.zeros(2, 1, 2, 2)
    per_image = [boundary_weighted_dice_loss(logits[i : i + 1], target[i : i + 1]) for i in range(2)]
    assert boundary_weighted_dice_loss(logits, target).item() == pytest.approx(sum(per_image).item() / 2)


def test_dice_can_leave_out_empty_targets():
    """``skip_empty`` (``LossConfig.empty_target_dice=False``): the mean over images with a lesion only; a drawn
    mask on an empty target costs about 1 by default and nothing then; a batch of negatives only gives 0 with a
    gradient path."""
    target = torch.cat([_mask([[1, 0], [0, 0]]), _mask([[0, 0], [0, 0]])])
    logits = torch.zeros(2, 1, 2, 2)
    lesion_only = boundary_weighted_dice_loss(logits[:1], target[:1])
    assert boundary_weighted_dice_loss(logits, target, skip_empty=True).item() == pytest.approx(lesion_only.item())
    assert boundary_weighted_dice_loss(logits, target).item() == pytest.approx((lesion_only.item() + 2 / 3) / 2)
    empty = torch.zeros(1, 1, 2, 2, requires_grad=True)
    loss = boundary_weighted_dice_loss(empty, torch.zeros(1, 1, 2, 2), skip_empty=True)
    loss.backward()
    assert loss.item() == 0.0 and empty.grad is not None
    on, off = (LSMSLoss(LossConfig(empty_target_dice=flag))(logits, target)["dice"] for flag in (True, False))
    assert on.item() > off.item() == pytest.approx(lesion_only.item())


def test_dice_perfect_prediction_is_zero():
    target = torch.zeros(2, 1, 8, 8)
    target[0, :, 2:6, 1:5] = 1
    target[1, :, 0:3, 4:8] = 1
    logits = 30.0 * (2 * target - 1)
    assert boundary_weighted_dice_loss(logits, target).item() == pytest.approx(0.0, abs=1e-6)
    # Empty target, empty prediction: (0 + s) / (0 + s) -> loss 0.
    assert boundary_weighted_dice_loss(torch.full((1, 1, 4, 4), -30.0), torch.zeros(1, 1, 4, 4)).item() < 1e-6


# --- contrastive -------------------------------------------------------------------------------------------


def _toy_contrastive(text: list[float], tau: float) -> torch.Tensor:
    # Two feature pixels: pixel 0 inside the target with feature (1, 0), pixel 1 outside with feature (0, 1).
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).T.reshape(1, 2, 1, 2)  # (B=1, C=2, h=1, w=2)
    target = torch.tensor([[1.0, 0.0]]).reshape(1, 1, 1, 2)
    return vision_language_contrastive_loss(features, torch.tensor([text]), target, tau=tau)


def test_contrastive_golden():
    # aligned text (1,0): p.L = 1, p.n = 0 -> -log(e^(1/tau) / (e^(1/tau) + e^0)) = log(1 + e^(-1/tau)).
    assert _toy_contrastive([1.0, 0.0], 1.0).item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)
    assert _toy_contrastive([2.0, 0.0], 0.1).item() == pytest.approx(math.log(1 + math.exp(-10)), abs=1e-6)
    # anti-aligned text (-1,0): p.L = -1 -> log(1 + e^(1/tau)).
    assert _toy_contrastive([-1.0, 0.0], 1.0).item() == pytest.approx(math.log(1 + math.e), rel=1e-6)


def test_contrastive_aligned_lower_than_anti_aligned():
    g = torch.Generator().manual_seed(0)
    text = torch.randn(2, 8, generator=g)
    target = torch.zeros(2, 1, 16, 16)
    target[:, :, 4:12, 4:12] = 1
    noise = 0.1 * torch.randn(2, 8, 8, 8, generator=g)
    inside = torch.nn.functional.interpolate(target, size=(8, 8), mode="area")  # (2, 1, 8, 8)
    # Positive pixels follow +text / -text; background pixels are random.
    background = torch.randn(2, 8, 8, 8, generator=g)
    aligned = inside * text[:, :, None, None] + (1 - inside) * background + noise
    anti = inside * -text[:, :, None, None] + (1 - inside) * background + noise
    loss_aligned = vision_language_contrastive_loss(aligned, text, target)
    loss_anti = vision_language_contrastive_loss(anti, text, target)
    assert loss_aligned.item() < loss_anti.item()


def test_contrastive_area_rule():
    # Input 2x4 -> features 1x2: the left 2x2 block is 3/4 inside (> 0.5: positive), the right one 2/4 (negative).
    target = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]]).reshape(1, 1, 2, 4)
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).T.reshape(1, 2, 1, 2)
    loss = vision_language_contrastive_loss(features, torch.tensor([[1.0, 0.0]]), target, tau=1.0)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)


def test_sampling_bound_respected():
    candidates = torch.tensor([[True] * 10 + [False] * 6, [False] * 14 + [True] * 2])
    index, valid = _sample_indices(candidates, 3, torch.Generator().manual_seed(0))
    assert index.shape == (2, 3)
    assert valid.sum(1).tolist() == [3, 2]  # at most k, and all the candidates when fewer
    assert all(candidates[b, index[b][valid[b]]].all() for b in range(2))
    assert len(set(index[0].tolist())) == 3  # without replacement
    # more than N asked for: k is clipped to N
    assert _sample_indices(candidates, 100, None)[0].shape == (2, 16)


def test_sampling_with_one_positive_gives_one_pixel_term():
    # max_positive = 1: the loss is the term of one single positive pixel, and the choice follows the seed.
    g = torch.Generator().manual_seed(3)
    features = torch.randn(1, 4, 4, 4, generator=g)
    text = torch.randn(1, 4, generator=g)
    target = torch.zeros(1, 1, 4, 4)
    target[..., :2, :] = 1  # 8 positive pixels, 8 negative
    f = torch.nn.functional.normalize(features.flatten(2), dim=1)[0].T  # (16, C)
    t = torch.nn.functional.normalize(text, dim=1)[0]
    terms = [
        torch.logsumexp(torch.cat([(f[i] @ t)[None], f[8:] @ f[i]]) / 0.1, 0) - f[i] @ t / 0.1
        for i in range(8)
    ]
    one = vision_language_contrastive_loss(
        features, text, target, max_positive=1, generator=torch.Generator().manual_seed(7)
    )
    assert min(abs(one.item() - term.item()) for term in terms) < 1e-5
    again = vision_language_contrastive_loss(
        features, text, target, max_positive=1, generator=torch.Generator().manual_seed(7)
    )
    assert one.item() == again.item()
    full = vision_language_contrastive_loss(features, text, target)
    assert full.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)


def test_no_positive_image_contributes_nothing():
    g = torch.Generator().manual_seed(0)
    features, text = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, generator=g)
    target = torch.zeros(2, 1, 4, 4)
    target[0, :, 1:3, 1:3] = 1
    both = vision_language_contrastive_loss(features, text, target)
    first = vision_language_contrastive_loss(features[:1], text[:1], target[:1])
    assert both.item() == pytest.approx(first.item(), rel=1e-6)


def test_no_positive_in_batch_is_zero_with_grad():
    features = torch.randn(2, 4, 4, 4, requires_grad=True)
    text = torch.randn(2, 4, requires_grad=True)
    loss = vision_language_contrastive_loss(features, text, torch.zeros(2, 1, 4, 4))
    assert loss.item() == 0.0
    loss.backward()
    assert features.grad is not None and torch.equal(features.grad, torch.zeros_like(features))
    assert text.grad is not None


# --- LSMSLoss ----------------------------------------------------------------------------------------------


def test_lsms_loss_combines_terms():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 1, 8, 8, generator=g, requires_grad=True)
    target = torch.zeros(2, 1, 8, 8)
    target[:, :, 2:6, 2:6] = 1
    features = torch.randn(2, 6, 4, 4, generator=g, requires_grad=True)
    text = torch.randn(2, 6, generator=g, requires_grad=True)
    out = LSMSLoss()(logits, target, features, text)
    assert set(out) == {"loss", "focal", "dice", "contrastive", "existence"} and out["existence"].item() == 0.0
    expected = out["focal"] + out["dice"] + 0.125 * out["contrastive"]
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert out["contrastive"].item() > 0
    out["loss"].backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (logits, features, text))


def test_lsms_loss_without_text():
    logits, target = torch.zeros(1, 1, 2, 2), _mask([[1, 0], [0, 0]])
    out = LSMSLoss()(logits, target)
    assert out["contrastive"].item() == 0.0
    assert out["loss"].item() == pytest.approx(0.15625 * LN2 + 2.4 / 4.6, rel=1e-6)


def test_other_lesions_are_the_lesions_the_sentence_does_not_name():
    instances = torch.tensor([[[0, 1, 2, -1]], [[0, 1, 2, -1]], [[0, 1, 2, -1]], [[-1, -1, -1, -1]]])  # (4, 1, 4)
    target = torch.tensor([1, 2, 0, -1])  # lesion 1, lesion 2, a sentence that names none, no label map
    others = other_lesions(instances, target)
    assert others.shape == (4, 1, 1, 4) and others.dtype == torch.bool
    assert others[:, 0, 0].tolist() == [[False, False, True, False], [False, True, False, False],
                                        [False, True, True, False], [False, False, False, False]]


def test_other_lesions_weigh_in_the_focal_term_only():
    # two lesions, the sentence names the left one; the mask is drawn on both
    target, others = _mask([[1, 0, 0, 0]]), _mask([[0, 0, 1, 0]]).bool()
    logits = torch.tensor([[[[4.0, -4.0, 4.0, -4.0]]]])
    plain = LSMSLoss(LossConfig())(logits, target, others=others)
    weighted = LSMSLoss(LossConfig(other_lesion_weight=5.0))(logits, target, others=others)
    assert weighted["dice"].item() == plain["dice"].item()
    # the focal mean over 4 pixels gains 4 x the other lesion's pixel term: 0.75 * sigmoid(4)^2 * softplus(4) / 4
    other_pixel = 0.75 * torch.sigmoid(torch.tensor(4.0)) ** 2 * torch.nn.functional.softplus(torch.tensor(4.0)) / 4
    assert weighted["focal"].item() == pytest.approx(plain["focal"].item() + 4 * other_pixel.item(), rel=1e-5)
    # without others (no instance map), or at weight 1, the paper's loss
    assert LSMSLoss(LossConfig(other_lesion_weight=5.0))(logits, target)["loss"].item() == plain["loss"].item()
    assert plain["focal"].item() == sigmoid_focal_loss(logits, target).item()
    # the weight of this step (a warm-up) takes the config's place
    at_step = LSMSLoss(LossConfig(other_lesion_weight=20.0))(logits, target, others=others, other_weight=5.0)
    assert at_step["focal"].item() == weighted["focal"].item()


def test_other_lesion_weight_rises_over_its_warmup_then_holds():
    cfg = LossConfig(other_lesion_weight=20.0, other_lesion_warmup=0.4)
    assert [other_lesion_weight_at(cfg, p) for p in (0.0, 0.1, 0.2, 0.4, 0.9, 1.0)] == pytest.approx(
        [1.0, 5.75, 10.5, 20.0, 20.0, 20.0])
    assert other_lesion_weight_at(LossConfig(other_lesion_weight=5.0), 0.0) == 5.0  # no warm-up: from the first step
    assert other_lesion_weight_at(LossConfig(), 0.3) == 1.0  # the paper's loss stays the paper's


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"focal_alpha": 1.5}, "focal_alpha"),
        ({"focal_gamma": -1.0}, "focal_gamma"),
        ({"boundary_lambda": -0.1}, "boundary_lambda"),
        ({"boundary_kernel": 4}, "boundary_kernel"),
        ({"boundary_kernel": 0}, "boundary_kernel"),
        ({"dice_smooth": -1.0}, "dice_smooth"),
        ({"contrastive_weight": -1.0}, "contrastive_weight"),
        ({"tau": 0.0}, "tau"),
        ({"max_positive": 0}, "max_positive"),
        ({"max_negative": 0}, "max_negative"),
        ({"other_lesion_weight": -1.0}, "other_lesion_weight"),
        ({"other_lesion_warmup": 1.5}, "other_lesion_warmup"),
        ({"other_lesion_warmup": -0.1}, "other_lesion_warmup"),
    ],
)
def test_config_rejects_bad_values(kwargs, name):
    with pytest.raises(ValueError, match=name):
        LossConfig(**kwargs)


def test_lsms_loss_rejects_bad_inputs():
    loss = LSMSLoss()
    logits = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ValueError, match=r"logits must have shape \(B, 1, H, W\)"):
        loss(torch.zeros(2, 2, 4, 4), torch.zeros(2, 2, 4, 4))
    with pytest.raises(ValueError, match=r"target must have the shape of logits \(2, 1, 4, 4\)"):
        loss(logits, torch.zeros(2, 1, 4, 5))
    with pytest.raises(ValueError, match="target must be binary"):
        loss(logits, torch.full((2, 1, 4, 4), 0.5))
    with pytest.raises(ValueError, match="text_embedding is None"):
        loss(logits, torch.zeros(2, 1, 4, 4), features=torch.zeros(2, 3, 2, 2))
    with pytest.raises(ValueError, match=r"features must have shape \(2, C, h, w\)"):
        loss(logits, torch.zeros(2, 1, 4, 4), torch.zeros(1, 3, 2, 2), torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"text_embedding must have shape \(2, 3\)"):
        loss(logits, torch.zeros(2, 1, 4, 4), torch.zeros(2, 3, 2, 2), torch.zeros(2, 4))


def test_losses_run_in_float32_outside_autocast():
    """Under mixed precision the model runs in bf16, but L_seg and L_con (its einsums) run in float32."""
    from lsms import build_model
    from lsms.optim import TrainingStep, autocast

    from conftest import tiny_model_kwargs

    seen: dict[str, object] = {}

    class Spy(LSMSLoss):
        def forward(self, logits, mask, features=None, text_embedding=None, existence=None, others=None,
                    other_weight=None):
            seen["autocast"] = torch.is_autocast_enabled("cpu")
            seen["similarity"] = torch.einsum("bc,bc->b", features.mean((2, 3)), text_embedding).dtype
            return super().forward(logits, mask, features=features, text_embedding=text_embedding, existence=existence,
                                   others=others, other_weight=other_weight)

    model = build_model("tiny", **tiny_model_kwargs())
    tok = model.tokenize(["a cyst", "a nodule"])
    image, mask = torch.randn(2, 3, 64, 64), (torch.rand(2, 1, 64, 64) > 0.7).float()
    with autocast(torch.device("cpu"), torch.bfloat16):
        assert torch.is_autocast_enabled("cpu")
        losses = TrainingStep(model, Spy())(image, mask, tok["input_ids"], tok["attention_mask"])
    assert seen == {"autocast": False, "similarity": torch.float32}
    assert all(v.dtype == torch.float32 for v in losses.values())


def test_train_step_gives_the_loss_the_other_lesions_of_the_batch():
    from lsms.optim import train_step

    seen = {}

    class Step(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def forward(self, image, mask, input_ids, attention_mask, coords=None, others=None, other_weight=None):
            seen["others"], seen["other_weight"] = others, other_weight
            return {"loss": self.w * image.mean()}

    step = Step()
    optimizer = torch.optim.SGD([{"params": step.parameters(), "lr_scale": 1.0}], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    batch = {"image": torch.ones(2, 1, 1, 3), "mask": torch.zeros(2, 1, 1, 3),
             "instances": torch.tensor([[[0, 1, 2]], [[0, 1, 2]]]), "target_instance": torch.tensor([2, 0])}
    train_step(step, optimizer, scaler, batch, lr=0.1)
    assert seen["others"][:, 0, 0].tolist() == [[False, True, False], [False, True, True]]
    assert seen["other_weight"] is None  # the loss config's weight
    train_step(step, optimizer, scaler, batch, lr=0.1, other_weight=7.5)
    assert seen["other_weight"] == 7.5
    train_step(step, optimizer, scaler, {"image": batch["image"], "mask": batch["mask"]}, lr=0.1)
    assert seen["others"] is None  # a batch without instance maps (a plain segmentation dataset)
