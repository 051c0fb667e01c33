"""Shared fixtures: a tiny random BERT so model tests run in seconds without the packaged weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# A BERT small enough for unit tests; the default tokenizer (vocab 30522) goes with it.
TINY_TEXT = dict(model_type="bert", hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def tiny_model_kwargs(text: dict | None = None, **overrides):
    """Keyword arguments for ``build_model`` giving a fast model with a tiny random text encoder (``text``: more
    text settings)."""
    return dict(text=dict(hf_config=dict(TINY_TEXT), pretrained=False, **(text or {})), **overrides)
