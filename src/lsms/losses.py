"""Training losses of LSMS (paper Eq. 13-15, spec 2.6).

``L = alpha * L_con + L_seg`` with ``L_seg = Focal(M, M_gt) + Dice_W(M, M_gt)``:

- :func:`sigmoid_focal_loss`: sigmoid focal loss, gamma 2, alpha 0.25 (**[decision]**, the paper gives no alpha),
  mean over all pixels of the batch.
- :func:`boundary_weighted_dice_loss`: Dice loss whose sums are weighted by ``W = lambda*E + (1 - E)``, where the
  boundary band ``E = dilate(M_gt) - erode(M_gt)`` (**[decision]** 3x3 kernel, configurable), lambda 1.2.
- :func:`vision_language_contrastive_loss`: pixel-to-text InfoNCE on the decoder features, tau 0.1. **[decision]**
  the printed Eq. 14 has no log; the InfoNCE (log) form is used.
- :class:`LSMSLoss` combines them with the weight alpha = 0.125 (``LossConfig.contrastive_weight``).
- **[addition]** ``other_lesion_weight``: in the focal term, the pixels of the lesions the sentence does *not* name
  (from the instance label map) weigh this much (:func:`other_lesions`). A sentence picks one lesion of several;
  a mask on a neighbour of the same type is the referring error the plain loss counts like any background pixel.
- **[addition]** with a model that has an existence head (``existence_head``), a class-balanced binary
  cross-entropy (:func:`balanced_bce`) of its logit against "the target is not empty", weight
  ``LossConfig.existence_weight``; a model without the head trains with the paper's loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lsms.settings import DictRoundTrip

__all__ = [
    "LSMSLoss",
    "LossConfig",
    "balanced_bce",
    "boundary_band",
    "boundary_weighted_dice_loss",
    "other_lesion_weight_at",
    "other_lesions",
    "sigmoid_focal_loss",
    "vision_language_contrastive_loss",
]


@dataclass(frozen=True)
class LossConfig(DictRoundTrip):
    """Settings of :class:`LSMSLoss` (spec 2.6).

    Attributes:
        focal_alpha: weight of the positive class in the focal loss (negatives get ``1 - focal_alpha``);
            **[decision]** 0.25, the RetinaNet value.
        focal_gamma: focusing exponent of the focal loss (paper: 2).
        boundary_lambda: weight of the boundary band in the Dice sums (paper: 1.2).
        boundary_kernel: odd side of the square structuring element of the dilation / erosion (**[decision]** 3).
        dice_smooth: smoothing term ``s`` added to numerator and denominator of the Dice ratio.
        contrastive_weight: alpha of Eq. 15, the weight of the contrastive loss (paper: 0.125).
        tau: temperature of the contrastive loss (paper: 0.1).
        max_positive: at most this many positive (in-target) pixels are sampled per image.
        max_negative: at most this many negative (background) pixels are sampled per image.
        existence_weight: weight of the existence loss (**[addition]**; only for a model with an existence
            head, see :class:`LSMSLoss`).
        empty_target_dice: whether images with an empty target (negative expressions) enter the Dice term
            (**[addition]**; the paper has no negatives). Their Dice loss is ``sum p / (sum p + s)``: about 1 for
            any mask drawn, so with many negatives in a batch predicting nothing everywhere is the cheapest
            answer early in training. False: the Dice term is the mean over the images with a lesion only, and
            negatives are taught by the focal term (and the existence head).
        other_lesion_weight: weight, in the focal term, of the pixels of lesions other than the referred one
            (**[addition]**; needs the instance label map of a referring dataset, ignored without one; 1: every
            background pixel alike, the paper's loss). For a sentence that matches nothing, every lesion on the
            image is such a pixel.
        other_lesion_warmup: share of training (as the learning rate's decay counts it:
            :func:`lsms.optim.progress_at`) over which ``other_lesion_weight`` rises linearly from 1 to its value
            (:func:`other_lesion_weight_at`; **[addition]**); 0: the full weight from the first step.
    """

    settings_name: ClassVar[str] = "loss settings"

    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    boundary_lambda: float = 1.2
    boundary_kernel: int = 3
    dice_smooth: float = 1.0
    contrastive_weight: float = 0.125
    tau: float = 0.1
    max_positive: int = 256
    max_negative: int = 512
    existence_weight: float = 1.0
    empty_target_dice: bool = True
    other_lesion_weight: float = 1.0
    other_lesion_warmup: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.focal_alpha <= 1.0:
            raise ValueError(f"focal_alpha must be in [0, 1], got {self.focal_alpha}")
        if self.focal_gamma < 0:
            raise ValueError(f"focal_gamma must be >= 0, got {self.focal_gamma}")
        if self.boundary_lambda < 0:
            raise ValueError(f"boundary_lambda must be >= 0, got {self.boundary_lambda}")
        _check_kernel(self.boundary_kernel)
        if self.dice_smooth < 0:
            raise ValueError(f"dice_smooth must be >= 0, got {self.dice_smooth}")
        if self.contrastive_weight < 0:
            raise ValueError(f"contrastive_weight must be >= 0, got {self.contrastive_weight}")
        if self.tau <= 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")
        if self.max_positive < 1:
            raise ValueError(f"max_positive must be >= 1, got {self.max_positive}")
        if self.max_negative < 1:
            raise ValueError(f"max_negative must be >= 1, got {self.max_negative}")
        if self.existence_weight < 0:
            raise ValueError(f"existence_weight must be >= 0, got {self.existence_weight}")
        if self.other_lesion_weight < 0:
            raise ValueError(f"other_lesion_weight must be >= 0, got {self.other_lesion_weight}")
        if not 0.0 <= self.other_lesion_warmup <= 1.0:
            raise ValueError(f"other_lesion_warmup is a share of training in [0, 1], got {self.other_lesion_warmup}")


def other_lesion_weight_at(config: LossConfig, progress: float) -> float:
    """The other lesions' weight at training ``progress`` in [0, 1] (:func:`lsms.optim.progress_at`): rising
    linearly from 1 to ``other_lesion_weight`` over the first ``other_lesion_warmup`` of training, then held.
    A sentence first learns to find lesions at all, then which one it names."""
    if progress >= config.other_lesion_warmup:
        return config.other_lesion_weight
    return 1.0 + (config.other_lesion_weight - 1.0) * progress / config.other_lesion_warmup


def _check_kernel(kernel: int) -> None:
    if isinstance(kernel, bool) or not isinstance(kernel, int) or kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"boundary_kernel must be a positive odd int (3, 5, ...), got {kernel!r}")


def sigmoid_focal_loss(logits: Tensor, target: Tensor, alpha: float = 0.25, gamma: float = 2.0,
                       weight: Tensor | None = None) -> Tensor:
    """Sigmoid focal loss, mean over all pixels (paper Eq. 13, first term).

    ``FL = -a_t (1 - p_t)^gamma log(p_t)`` with ``p = sigmoid(logits)``, ``p_t = p`` where the target is 1 and
    ``1 - p`` where it is 0, ``a_t = alpha`` on positives and ``1 - alpha`` on negatives.

    Without ``weight`` the definition is exactly that of ``monai.losses.FocalLoss(gamma=gamma, alpha=alpha,
    use_softmax=False, reduction="mean")`` on a single-channel binary target (and of
    ``torchvision.ops.sigmoid_focal_loss`` with ``reduction="mean"``); ``tests/test_losses.py`` checks the
    equality. It is written out here (same stable formulation as MONAI's) because ``import monai`` costs seconds
    (it pulls in its network zoo and transformers) and the formula is four lines.

    Args:
        logits: raw scores, (B, 1, H, W).
        target: binary mask of the same shape.
        alpha: weight of the positive class.
        gamma: focusing exponent.
        weight: per-pixel weights broadcastable to ``logits`` (None: all 1); the mean stays over all pixels.

    Returns:
        Scalar loss.
    """
    logits, target = logits.float(), target.float()
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")  # -log p_t
    # (1 - p_t)^gamma = exp(gamma * log sigmoid(-x)) on positives, exp(gamma * log sigmoid(x)) on negatives
    modulating = torch.exp(gamma * F.logsigmoid(-logits * (2.0 * target - 1.0)))
    alpha_t = alpha * target + (1.0 - alpha) * (1.0 - target)
    if weight is not None:
        alpha_t = alpha_t * weight
    return (alpha_t * modulating * bce).mean()


def other_lesions(instances: Tensor, target_instance: Tensor) -> Tensor:
    """Where the lesions the sentence does not name are: instance label map (B, H, W) (0 background, k lesion k,
    -1 unknown or outside the image) and the referred label per sample (B,) (0: the sentence names none, -1: no
    map) -> bool (B, 1, H, W)."""
    return ((instances > 0) & (instances != target_instance.view(-1, 1, 1))).unsqueeze(1)


def boundary_band(target: Tensor, kernel: int = 3) -> Tensor:
    """Boundary band ``E = dilate(M_gt) - erode(M_gt)`` of a binary mask (spec 2.6).

    Dilation is a ``kernel x kernel`` max-pool, erosion a max-pool of the negated mask. Pixels outside the image
    are ignored (max-pool pads with -inf), so a mask touching the image border is not eroded there.

    Args:
        target: binary mask, (B, 1, H, W).
        kernel: odd side of the square structuring element.

    Returns:
        Band with values in {0, 1}, same shape and dtype (float) as ``target``.
    """
    _check_kernel(kernel)
    target = target.float()
    pad = kernel // 2
    dilated = F.max_pool2d(target, kernel, stride=1, padding=pad)
    eroded = -F.max_pool2d(-target, kernel, stride=1, padding=pad)
    return dilated - eroded


def boundary_weighted_dice_loss(
    logits: Tensor,
    target: Tensor,
    boundary_lambda: float = 1.2,
    kernel: int = 3,
    smooth: float = 1.0,
    skip_empty: bool = False,
) -> Tensor:
    """Boundary-weighted Dice loss (paper Eq. 13, second term; spec 2.6).

    Per image ``1 - (2 sum W p g + s) / (sum W p + sum W g + s)`` with ``p = sigmoid(logits)``, ``g`` the target,
    ``W = lambda*E + (1 - E)`` and ``E`` the :func:`boundary_band`; the result is the mean over images. MONAI's
    ``DiceLoss`` has only per-class weights, not per-pixel ones, so this is plain torch.

    Args:
        logits: raw scores, (B, 1, H, W).
        target: binary mask of the same shape.
        boundary_lambda: weight of band pixels (other pixels weigh 1).
        kernel: odd side of the structuring element of the band.
        smooth: ``s``, keeps the ratio defined (and equal to 1) for an empty target and empty prediction.
        skip_empty: the mean over the images with a non-empty target only (0 when there are none).

    Returns:
        Scalar loss.
    """
    target = target.float()
    p = torch.sigmoid(logits.float())
    band = boundary_band(target, kernel)
    weight = boundary_lambda * band + (1.0 - band)  # (B, 1, H, W)
    dims = (1, 2, 3)
    intersection = (weight * p * target).sum(dims)  # (B,)
    denominator = (weight * p).sum(dims) + (weight * target).sum(dims)  # (B,)
    dice = (2.0 * intersection + smooth) / (denominator + smooth)
    if skip_empty:
        has_target = target.flatten(1).any(1)
        return (1.0 - dice)[has_target].sum() / has_target.sum().clamp(min=1)
    return (1.0 - dice).mean()


def _sample_indices(candidates: Tensor, k: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Pick up to ``k`` random True positions per row of ``candidates`` (B, N), vectorised over the batch.

    Each position gets a uniform random key (drawn on the CPU, so a seeded generator gives the same choice on
    every device); non-candidates get key -1, and the ``k`` largest keys are taken. Returns the indices (B, k')
    with ``k' = min(k, N)`` and a bool mask (B, k') saying which picks are real candidates.
    """
    b, n = candidates.shape
    k = min(k, n)
    keys = torch.rand(b, n, generator=generator).to(candidates.device)
    keys = torch.where(candidates, keys, torch.full_like(keys, -1.0))
    _, index = keys.topk(k, dim=1)  # (B, k)
    return index, candidates.gather(1, index)


def vision_language_contrastive_loss(
    features: Tensor,
    text_embedding: Tensor,
    target: Tensor,
    tau: float = 0.1,
    max_positive: int = 256,
    max_negative: int = 512,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pixel-to-text contrastive loss, InfoNCE form (paper Eq. 14; spec 2.6).

    Per image, with L2-normalised vectors, positive pixels ``p_i`` (inside the target), negative pixels ``n_j``
    (outside) and the text vector ``L``::

        -1/|P| sum_i log[ exp(p_i.L/tau) / (exp(p_i.L/tau) + sum_j exp(p_i.n_j/tau)) ]

    **[decision]** the printed Eq. 14 has no log; this is the InfoNCE (log) form. The loss is the mean over the
    images that have at least one positive pixel; images without positives contribute nothing, and if no image
    has one the loss is ``0 * features.sum()`` (zero, still connected to the graph). An image without negatives
    gives 0 (the ratio is 1).

    The target is brought to feature resolution by area interpolation; a feature pixel is positive when more than
    half of its area lies inside the target (``> 0.5``) and negative otherwise. At most ``max_positive`` positive
    and ``max_negative`` negative pixels are sampled per image, uniformly without replacement, with
    ``generator`` (keys are drawn on the CPU, so a seeded generator gives the same pixels on any device).

    Args:
        features: decoder features before the Seg head, (B, C, h, w).
        text_embedding: text vector already projected to C by the model (``proj(mean over real tokens)``), (B, C).
        target: binary mask at input resolution, (B, 1, H, W).
        tau: temperature.
        max_positive: positive pixels sampled per image, at most.
        max_negative: negative pixels sampled per image, at most.
        generator: CPU random generator for the sampling (None: the global one).

    Returns:
        Scalar loss.
    """
    b, c, h, w = features.shape
    pixels = features.flatten(2).transpose(1, 2)  # (B, hw, C): a view of a channels-last map
    text = F.normalize(text_embedding.float(), dim=1)  # (B, C)
    inside = F.interpolate(target.float(), size=(h, w), mode="area").flatten(1) > 0.5  # (B, hw)

    pos_idx, pos_valid = _sample_indices(inside, max_positive, generator)  # (B, Kp)
    neg_idx, neg_valid = _sample_indices(~inside, max_negative, generator)  # (B, Kn)
    # only the sampled pixels are normalised (in fp32): the whole map would cost a tenth of a CPU training step
    pos = F.normalize(pixels.gather(1, pos_idx.unsqueeze(-1).expand(-1, -1, c)).float(), dim=-1)  # (B, Kp, C)
    neg = F.normalize(pixels.gather(1, neg_idx.unsqueeze(-1).expand(-1, -1, c)).float(), dim=-1)  # (B, Kn, C)

    s_pos = torch.einsum("bkc,bc->bk", pos, text) / tau  # (B, Kp)
    s_neg = torch.einsum("bkc,bjc->bkj", pos, neg) / tau  # (B, Kp, Kn)
    s_neg = s_neg.masked_fill(~neg_valid.unsqueeze(1), float("-inf"))
    logits = torch.cat([s_pos.unsqueeze(-1), s_neg], dim=-1)  # (B, Kp, 1 + Kn)
    nll = torch.logsumexp(logits, dim=-1) - s_pos  # (B, Kp), -log of the ratio

    n_pos = pos_valid.sum(1)  # (B,)
    per_image = (nll * pos_valid).sum(1) / n_pos.clamp(min=1)  # (B,)
    has_pos = n_pos > 0
    if not bool(has_pos.any()):
        return features.sum() * 0.0 + text_embedding.sum() * 0.0
    return per_image[has_pos].mean()


def balanced_bce(logits: Tensor, labels: Tensor) -> Tensor:
    """Binary cross-entropy of ``logits`` (B,) against bool ``labels`` (B,) with each class present in the batch
    weighing half (**[decision]**: negative sentences are a tenth of a batch; unweighted, the existence head
    would learn mostly "present"); a batch of one class is its plain mean."""
    bce = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none")
    means = [bce[m].mean() for m in (labels, ~labels) if bool(m.any())]
    return sum(means) / len(means)


class LSMSLoss(nn.Module):
    """Total LSMS loss ``L = alpha * L_con + Focal + Dice_W`` (paper Eq. 15; spec 2.6), plus
    ``existence_weight * BCE(existence logit, target not empty)`` for a model with an existence head.

    Args:
        config: loss settings; defaults to the paper's (see :class:`LossConfig`).
    """

    def __init__(self, config: LossConfig | None = None):
        super().__init__()
        self.config = config if config is not None else LossConfig()

    def forward(
        self,
        logits: Tensor,
        target: Tensor,
        features: Tensor | None = None,
        text_embedding: Tensor | None = None,
        generator: torch.Generator | None = None,
        existence: Tensor | None = None,
        others: Tensor | None = None,
        other_weight: float | None = None,
    ) -> dict[str, Tensor]:
        """(B,1,H,W) logits and target [+ (B,C,h,w) features, (B,C) text, (B,) existence] -> dict of scalar losses.

        Args:
            logits: Seg head output at input resolution, (B, 1, H, W).
            target: binary mask, (B, 1, H, W) (any dtype; values must be 0 or 1).
            features: decoder features for the contrastive term, (B, C, h, w); None (with ``text_embedding``
                None) skips the term, as for the no-text model.
            text_embedding: projected text vector, (B, C).
            generator: CPU random generator for the contrastive pixel sampling.
            existence: the existence head's logits (B,); None: no existence term (a model without the head).
            others: where the lesions the sentence does not name are, bool (B, 1, H, W) (:func:`other_lesions`);
                their pixels weigh ``other_lesion_weight`` in the focal term. None: no such weighting.
            other_weight: their weight at this step (:func:`other_lesion_weight_at`); None: ``other_lesion_weight``.

        Returns:
            ``{"loss", "focal", "dice", "contrastive", "existence"}``; ``loss = focal + dice + contrastive_weight
            * contrastive + existence_weight * existence``; a term that is skipped is 0.
        """
        cfg = self.config
        self._check_inputs(logits, target, features, text_embedding)
        weight = None
        other_weight = cfg.other_lesion_weight if other_weight is None else other_weight
        if others is not None and other_weight != 1.0:
            weight = 1.0 + (other_weight - 1.0) * others.to(torch.float32)
        focal = sigmoid_focal_loss(logits, target, alpha=cfg.focal_alpha, gamma=cfg.focal_gamma, weight=weight)
        dice = boundary_weighted_dice_loss(
            logits,
            target,
            boundary_lambda=cfg.boundary_lambda,
            kernel=cfg.boundary_kernel,
            smooth=cfg.dice_smooth,
            skip_empty=not cfg.empty_target_dice,
        )
        if features is None or text_embedding is None:
            contrastive = logits.new_zeros((), dtype=torch.float32)
        else:
            contrastive = vision_language_contrastive_loss(
                features,
                text_embedding,
                target,
                tau=cfg.tau,
                max_positive=cfg.max_positive,
                max_negative=cfg.max_negative,
                generator=generator,
            )
        if existence is None:
            present = logits.new_zeros((), dtype=torch.float32)
        else:
            if existence.shape != logits.shape[:1]:
                raise ValueError(f"existence must have shape ({logits.shape[0]},) (B,), got {tuple(existence.shape)}")
            present = balanced_bce(existence, (target.flatten(1) > 0).any(1))
        loss = focal + dice + cfg.contrastive_weight * contrastive + cfg.existence_weight * present
        return {"loss": loss, "focal": focal, "dice": dice, "contrastive": contrastive, "existence": present}

    @staticmethod
    def _check_inputs(
        logits: Tensor, target: Tensor, features: Tensor | None, text_embedding: Tensor | None
    ) -> None:
        if logits.ndim != 4 or logits.shape[1] != 1:
            raise ValueError(f"logits must have shape (B, 1, H, W), got {tuple(logits.shape)}")
        if target.shape != logits.shape:
            raise ValueError(
                f"target must have the shape of logits {tuple(logits.shape)} (B, 1, H, W), got {tuple(target.shape)}"
            )
        if not bool(((target == 0) | (target == 1)).all()):
            raise ValueError("target must be binary-valued (0 or 1), shape (B, 1, H, W)")
        if (features is None) != (text_embedding is None):
            missing = "text_embedding" if text_embedding is None else "features"
            raise ValueError(f"{missing} is None: give both features and text_embedding, or neither")
        if features is None or text_embedding is None:
            return
        b = logits.shape[0]
        if features.ndim != 4 or features.shape[0] != b:
            raise ValueError(f"features must have shape ({b}, C, h, w), got {tuple(features.shape)}")
        c = features.shape[1]
        if text_embedding.shape != (b, c):
            raise ValueError(
                f"text_embedding must have shape ({b}, {c}) (B, C), got {tuple(text_embedding.shape)}"
            )
