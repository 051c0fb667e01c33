"""**[addition]** The existence head fit anew once training is over (docs/model.md, "The existence head").

While the network trains, the head learns beside it from the few negative sentences of each batch, on inputs
that change under it with every step. Once the last step is taken the network is fixed, and the head's MLP is
fit again from fresh weights on the frozen network's answers for every sentence of the train split (one pass
in eval mode, no augmentation; positives and negatives as the dataset holds them). On the demo's data this
separates "not present" better than the head trained alongside, at the cost of that one pass
(docs/training.md, measured). The network, and so every mask, is unchanged.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lsms import distributed as D
from lsms.losses import balanced_bce
from lsms.model.decoder import ExistenceHead
from lsms.optim import autocast

log = logging.getLogger(__name__)

# [decision] full-batch AdamW on the standardised inputs, from fresh weights, 300 steps (RunConfig); the weight
# decay chosen on the val AUROC of two demo runs (seed 0 of the recipe and of negatives on half the slices, the
# head's inputs read once): 0.1 -> 0.817 / 0.870, 1 -> 0.832 / 0.870, 3 -> 0.852 / 0.882, 6 -> 0.853 / 0.892
LEARNING_RATE, WEIGHT_DECAY = 1e-2, 3.0
MIN_STD = 1e-2  # an input that barely varies is scaled up at most 1/MIN_STD times


def head_inputs(model: nn.Module, loader: DataLoader, env: D.DistEnv, dtype: torch.dtype | None
                ) -> tuple[Tensor, Tensor]:
    """The existence head's inputs (N, D) and whether each sentence describes a lesion of its image (N,) bool,
    for every sample of ``loader`` (this rank's shard; gathered from every rank in rank order), the network in
    eval mode."""
    captured: list[Tensor] = []
    hook = model.existence.mlp.register_forward_pre_hook(lambda mlp, args: captured.append(args[0].float().cpu()))
    present, was_training = [], model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in loader:
                ids, mask = batch.get("input_ids"), batch.get("attention_mask")
                with autocast(env.device, dtype):
                    model.forward_features(batch["image"].to(env.device), ids.to(env.device), mask.to(env.device))
                present.append((batch["mask"].flatten(1) > 0).any(1))
    finally:
        hook.remove()
        model.train(was_training)
    parts = D.gather_objects((torch.cat(captured), torch.cat(present)), env)
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def fit_head(head: ExistenceHead, inputs: Tensor, present: Tensor, steps: int, seed: int = 0) -> float:
    """Fits ``head``'s MLP anew on ``inputs`` (N, D) and ``present`` (N,) bool: fresh weights drawn from
    ``seed``, the inputs standardised (the standardisation then folded into the first layer, so the module
    and its state-dict keys stay as they are), ``steps`` full-batch AdamW steps on the class-balanced BCE of
    training. Deterministic on the CPU; returns the final loss."""
    x = inputs.float().cpu()
    mean, std = x.mean(0), x.std(0).clamp_min(MIN_STD)
    mlp = copy.deepcopy(head.mlp).float().cpu()
    with torch.random.fork_rng(devices=[]):  # leaves the training RNG streams where they are
        torch.manual_seed(seed)
        for layer in mlp:
            if isinstance(layer, nn.Linear):
                layer.reset_parameters()
    optimizer = torch.optim.AdamW(mlp.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    z, labels = (x - mean) / std, present.cpu().bool()
    loss = torch.zeros(())
    for _ in range(steps):
        loss = balanced_bce(mlp(z).squeeze(1), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        first = mlp[0]
        first.weight.div_(std)  # W (x - mean) / std + b = (W / std) x + (b - (W / std) mean)
        first.bias.sub_(first.weight @ mean)
        for mine, fitted in zip(head.mlp.parameters(), mlp.parameters(), strict=True):
            mine.copy_(fitted.to(mine.dtype))
    return float(loss.detach())


def refit_existence_head(model: nn.Module, loader: DataLoader, steps: int, env: D.DistEnv,
                         dtype: torch.dtype | None = None, seed: int = 0) -> dict[str, Any] | None:
    """Fits ``model``'s existence head anew on the samples of ``loader`` (the train split without
    augmentation) with :func:`fit_head`; every rank gets the same head. Skipped (None) for a model without the
    head, ``steps`` 0, or samples that are all positive or all negative; else returns what was done (samples,
    negatives, the final loss, seconds), which is also logged."""
    if getattr(model, "existence", None) is None or steps == 0:
        return None
    start = time.perf_counter()
    inputs, present = head_inputs(model, loader, env, dtype)
    negatives = int((~present).sum())
    if negatives in (0, len(present)):
        log.info("existence head kept as trained: the train split has %s", "no negative sentences" if not negatives
                 else "no lesion sentences")
        return None
    loss = fit_head(model.existence, inputs, present, steps, seed)
    done = {"samples": len(present), "negatives": negatives, "loss": loss, "steps": steps,
            "seconds": round(time.perf_counter() - start, 1)}
    if env.is_main:
        log.info("existence head fit anew on the frozen network: %d train sentences (%d describe nothing), "
                 "%d full-batch steps, final loss %.4f, %.0f s", done["samples"], negatives, steps, loss,
                 done["seconds"])
    return done
