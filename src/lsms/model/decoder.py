"""Full-Scale Decoder (paper Sec. III-D, Eq. 11-12; spec 2.5).

Position alignment resizes the chosen stage features to F1's size; the concatenation goes through a
lightweight Hamburger head (NMF matrix decomposition) [decision, SegNeXt LightHamHead].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lsms.model.config import LSMSConfig
from lsms.model.layers import GroupNorm, Pointwise, from_pixel_rows, per_pixel_rows, pointwise


class NMF2D(nn.Module):
    """Non-negative matrix factorisation of a feature map with multiplicative updates.

    x (B, C, H, W) is read as B matrices X (C, N=HW) ~= D (C, R) @ Cf^T (R, N). The updates run without
    gradient; only the last coefficient update carries it ("one-step gradient", Hamburger paper).
    Bases are random: in training from the global RNG (seeded by the trainer), in eval a fixed draw from a
    seeded CPU generator, made once at construction and held as a non-persistent buffer (not in the
    state_dict, so checkpoints are unchanged): eval output is deterministic on any device, and the whole
    network traces for export (a ``torch.Generator`` inside ``forward`` does not).

    Args:
        channels: C, the channels of the factorised feature map.
        rank: R, the number of bases.
        steps_train / steps_eval: multiplicative-update steps.
        seed: seed of the eval bases.
        inv_t: inverse temperature of the coefficient initialisation; eps: division guard.
    """

    def __init__(self, channels: int, rank: int, steps_train: int = 6, steps_eval: int = 7, seed: int = 0,
                 inv_t: float = 1.0, eps: float = 1e-6):
        super().__init__()
        self.rank, self.steps_train, self.steps_eval = rank, steps_train, steps_eval
        self.seed, self.inv_t, self.eps = seed, inv_t, eps
        # one set of eval bases shared by the batch: a sample's output must not depend on its batch position
        # (evaluation sharded over DDP ranks equals a single-process evaluation)
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("eval_bases", F.normalize(torch.rand(1, channels, rank, generator=gen), dim=1),
                             persistent=False)  # (1, C, R)

    def _bases(self, batch: int, channels: int, like: Tensor) -> Tensor:
        if self.training:
            return F.normalize(torch.rand(batch, channels, self.rank, device=like.device, dtype=like.dtype), dim=1)
        return self.eval_bases.to(like.dtype).expand(batch, -1, -1)

    def _update_coef(self, xt: Tensor, bases: Tensor, coef: Tensor) -> Tensor:
        numerator = torch.bmm(xt, bases)  # (B, N, C) @ (B, C, R) -> (B, N, R)
        denominator = coef.bmm(bases.transpose(1, 2).bmm(bases))  # (B, N, R) @ (B, R, R) -> (B, N, R)
        return coef * numerator / (denominator + self.eps)

    def forward(self, x: Tensor, project: Tensor | None = None) -> Tensor:
        """(B, C, H, W), non-negative -> low-rank reconstruction D Cf^T (B, C, H, W); with ``project`` (C_out, C),
        a 1x1 convolution's weight, its projection W D Cf^T (B, C_out, H, W), computed as (W D) Cf^T: W mixes the
        R bases instead of the N reconstructed pixels (the same result up to rounding, for R x C x C_out
        multiply-adds instead of N x C x C_out).

        Computed on the transposed matrices (X^T is (N, C): the pixels as rows, a view of a channels-last map).
        """
        H, W = x.shape[-2:]
        dtype = x.dtype
        with torch.autocast(device_type=x.device.type, enabled=False):
            xt = per_pixel_rows(x.float())  # X^T (B, N, C)
            bases = self._bases(xt.shape[0], xt.shape[2], xt)  # (B, C, R)
            with torch.no_grad():
                coef = torch.softmax(self.inv_t * torch.bmm(xt, bases), dim=-1)  # (B, N, R)
                for _ in range(self.steps_train if self.training else self.steps_eval):
                    coef = self._update_coef(xt, bases, coef)
                    numerator = torch.bmm(xt.transpose(1, 2), coef)  # (B, C, N) @ (B, N, R) -> (B, C, R)
                    denominator = bases.bmm(coef.transpose(1, 2).bmm(coef))  # (B, C, R) @ (B, R, R)
                    bases = bases * numerator / (denominator + self.eps)
            coef = self._update_coef(xt, bases, coef)  # the one step with gradient
            if project is not None:
                bases = project.float() @ bases  # (C_out, C) @ (B, C, R) -> (B, C_out, R) = W D
            # the output product in the input's precision (bf16 under autocast, as the 1x1 convolution's was)
            out = torch.bmm(coef.to(dtype), bases.transpose(1, 2).to(dtype))  # (B, N, R) @ (B, R, C) = (D Cf^T)^T
        return from_pixel_rows(out, H, W)


def conv_gn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """1x1 conv + GroupNorm(32) + ReLU."""
    return nn.Sequential(
        Pointwise(in_channels, out_channels, bias=False), GroupNorm(32, out_channels), nn.ReLU(inplace=True)
    )


class Hamburger(nn.Module):
    """ReLU(x + GN(conv1x1(NMF(ReLU(conv1x1(x)))))): global context by matrix decomposition.

    The output conv1x1 (``ham_out``, no bias) is applied by the NMF to its bases (:meth:`NMF2D.forward`), not to
    the reconstructed map: in LSMS tiny's training step that saves one (pixels x 256) @ (256 x 256) product
    forward and two backward, about an eighth of the step's FLOPs (docs/results/throughput.md).
    """

    def __init__(self, channels: int, nmf: NMF2D):
        super().__init__()
        self.ham_in = Pointwise(channels, channels)
        self.nmf = nmf
        self.ham_out = Pointwise(channels, channels, bias=False)
        self.norm = GroupNorm(32, channels)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        # not in place: ham_in's output is a view (channels-last GEMM), and an in-place op on a view makes autograd
        # copy its gradient to contiguous (NCHW) memory
        enjoy = self.nmf(F.relu(self.ham_in(x)), project=self.ham_out.weight.flatten(1))
        return F.relu(x + self.norm(enjoy), inplace=True)


class FullScaleDecoder(nn.Module):
    """Out = Seg(InterScale(Concat[P_i])) (Eq. 11-12), or w/o FSD: the same head on F4 alone at 1/32.

    Args:
        cfg: decoder settings (stages, Hamburger on/off, per-stage MLP, C_ham, C_head, NMF).
        in_channels: channels of F1..F4.
    """

    def __init__(self, cfg: LSMSConfig, in_channels: tuple[int, ...]):
        super().__init__()
        self.stages = (4,) if cfg.decoder == "last" else cfg.decoder_stages
        self.align = cfg.decoder == "fsd"  # position alignment to F1's size
        chans = [in_channels[s - 1] for s in self.stages]
        self.stage_mlp = nn.ModuleList(Pointwise(c, cfg.head_channels) for c in chans) if cfg.stage_mlp else None
        concat = cfg.head_channels * len(chans) if cfg.stage_mlp else sum(chans)
        self.squeeze = conv_gn_relu(concat, cfg.ham_channels)
        self.hamburger = (
            Hamburger(cfg.ham_channels,
                      NMF2D(cfg.ham_channels, cfg.nmf_rank, cfg.nmf_steps_train, cfg.nmf_steps_eval, cfg.nmf_seed))
            if cfg.hamburger else None
        )
        self.project = conv_gn_relu(cfg.ham_channels, cfg.head_channels)
        self.dropout = nn.Dropout2d(cfg.head_dropout)
        self.seg = Pointwise(cfg.head_channels, 1)
        self.channels = cfg.head_channels

    def forward(self, features: list[Tensor]) -> tuple[Tensor, Tensor]:
        """[F1..F4] -> (logits at the decoding resolution (B, 1, h, w), decoder features (B, C_head, h, w)).

        [decision] Eq. 11-12 resize each P_i to F1's size, concatenate and squeeze them with a 1x1 conv. The
        stage MLP and the squeeze conv are linear over channels and bilinear position alignment is linear over
        positions with weights summing to 1, so they commute: conv(Concat[Up(P_i)]) = sum_i Up(conv_i(P_i)),
        conv_i being the squeeze weight's columns for stage i. Each conv runs at its stage's own resolution and
        only C_ham channels are resized (LSMS tiny at 224: 0.87 instead of 1.23 GMACs per image in the decoder);
        the result equals the printed order up to rounding (tests/test_model.py holds the two side by side).
        """
        size = features[0].shape[-2:]
        weight = self.squeeze[0].weight  # (C_ham, sum of the stage channels, 1, 1)
        x, start = 0, 0
        for i, s in enumerate(self.stages):
            p = features[s - 1] if self.stage_mlp is None else self.stage_mlp[i](features[s - 1])
            part = pointwise(p, weight[:, start:start + p.shape[1]])  # (B, C_ham, h_i, w_i)
            start += p.shape[1]
            if self.align and s > 1:
                part = F.interpolate(part, size=size, mode="bilinear", align_corners=False)
            x = x + part  # (B, C_ham, h, w)
        x = self.squeeze[2](self.squeeze[1](x))  # GroupNorm, ReLU
        return self._head(x)

    def _head(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Squeezed (B, C_ham, h, w) -> (logits (B, 1, h, w), decoder features (B, C_head, h, w))."""
        if self.hamburger is not None:
            x = self.hamburger(x)
        decoded = self.project(x)  # (B, C_head, h, w)
        return self.seg(self.dropout(decoded)), decoded


class Refine(nn.Module):
    """[deviation, ``output_stride=2``] Logits at 1/2 resolution: the FSD logits up-sampled x2 plus a residual
    from the decoder features (1x1 to 32 channels, up-sampled x2) fused with a stride-2 convolution of the image.

    The last convolution starts at zero, so a fresh model outputs the FSD logits (up-sampled x2, then to the input
    size by the model).
    """

    def __init__(self, in_channels: int, head_channels: int, channels: int = 32):
        super().__init__()
        self.image = nn.Sequential(nn.Conv2d(in_channels, channels, 3, stride=2, padding=1, bias=False),
                                   GroupNorm(32, channels), nn.ReLU(inplace=True))
        self.reduce = conv_gn_relu(head_channels, channels)
        self.fuse = nn.Sequential(nn.Conv2d(2 * channels, channels, 3, padding=1, bias=False),
                                  GroupNorm(32, channels), nn.ReLU(inplace=True))
        self.out = Pointwise(channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, image: Tensor, decoded: Tensor, logits: Tensor) -> Tensor:
        """image (B, C_in, H, W), decoded (B, C_head, H/4, W/4), logits (B, 1, H/4, W/4) -> (B, 1, H/2, W/2)."""
        skip = self.image(image)  # (B, 32, H/2, W/2)
        size = skip.shape[-2:]
        up = F.interpolate(self.reduce(decoded), size=size, mode="bilinear", align_corners=False)
        residual = self.out(self.fuse(torch.cat([skip, up], dim=1)))
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False) + residual


class ExistenceHead(nn.Module):
    """[addition, ``existence_head``] Whether the described lesion is in the image: one logit per (image, sentence).

    Reads what the network already computes: the decoder features pooled under the predicted mask (soft, the
    mask probability as weights) and over the whole image, their product with the sentence embedding (does the
    region under the mask match the words?), the sentence embedding itself, the highest mask logit, and where
    the mask lies and how large it is (centroid x, y in [-1, 1], log of its area share: a sentence naming a
    segment or an organ is checked against the position). A small MLP gives the logit. It reads its inputs as
    constants (detached): the existence loss trains the head alone, so the network segments exactly as it would
    without it (trained through the features, the loss cost 5 points of Dice at the demo's steps:
    docs/model.md). Once training is over the MLP is fit anew on the frozen network's inputs
    (:func:`lsms.existence.refit_existence_head`).

    Args:
        channels: C_head, channels of the decoder features and of the sentence embedding.
        hidden: width of the MLP's hidden layer.
    """

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(4 * channels + 4, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, decoded: Tensor, logits: Tensor, text_embedding: Tensor) -> Tensor:
        """decoded (B, C, h, w), mask logits (B, 1, h, w), text embedding (B, C) -> existence logits (B,)."""
        decoded, logits, text_embedding = decoded.detach(), logits.detach(), text_embedding.detach()
        h, w = decoded.shape[-2:]
        weight = torch.sigmoid(logits.float())  # (B, 1, h, w)
        mass = weight.sum((2, 3))  # (B, 1)
        inside = (decoded.float() * weight).sum((2, 3)) / (mass + 1.0)  # (B, C); +1: an empty mask -> ~0
        pooled = decoded.float().mean((2, 3))  # (B, C)
        ys = torch.linspace(-1.0, 1.0, h, device=decoded.device).view(1, 1, h, 1)
        xs = torch.linspace(-1.0, 1.0, w, device=decoded.device).view(1, 1, 1, w)
        where = torch.cat([(weight * xs).sum((2, 3)), (weight * ys).sum((2, 3))], 1) / (mass + 1e-6)  # (B, 2)
        area = torch.log(mass / (h * w) + 1e-4)  # (B, 1)
        peak = logits.float().flatten(1).amax(1, keepdim=True)  # (B, 1)
        text = text_embedding.float()
        features = torch.cat([inside, pooled, inside * text, text, peak, where, area], dim=1)
        # in fp32 under autocast too: the refit MLP reads standardised inputs (lsms.existence), and bf16 would round
        # away the spread of an input that varies little around a large mean
        with torch.autocast(features.device.type, enabled=False):
            return self.mlp(features.to(self.mlp[0].weight.dtype)).squeeze(1)
