"""Text normalisation: every Couinaud segment spelling reads as "segment N", through the tokenizer, a checkpoint
and an exported file."""

from __future__ import annotations

import pytest
import torch

from lsms.backends import load_backend
from lsms.export import export_model
from lsms.model import build, model_config_from_dict
from lsms.synth.anatomy import SEGMENTS
from lsms.synth.expressions import HELDOUT_PHRASING, TRAINING_PHRASINGS, load_phrasing
from lsms.text import Tokenizer, normalize_segments

from toy_data import make_untrained_checkpoint, tiny_model

# segment name -> how it reads after normalisation
CANONICAL = {name: f"segment {i}" for i, name in enumerate(("I", "II", "III"), start=1)}
CANONICAL |= {"IVa": "segment 4a", "IVb": "segment 4b"}
CANONICAL |= {name: f"segment {i}" for i, name in enumerate(("V", "VI", "VII", "VIII"), start=5)}
# spellings the rule leaves alone on purpose: "portion of segment 4" says the half in words
NOT_REWRITTEN = {"the superior portion of segment 4", "the inferior portion of segment 4"}


@pytest.mark.parametrize("phrasing", [*TRAINING_PHRASINGS, HELDOUT_PHRASING])
def test_every_spelling_in_the_phrasing_files_reads_as_segment_n(phrasing: str) -> None:
    ph = load_phrasing(phrasing)
    assert set(ph["segment_names"]) == set(SEGMENTS) == set(CANONICAL)
    for name, spellings in ph["segment_names"].items():
        for spelling in spellings:
            for frame in ph["segment"]:
                written = f"A cyst in {frame.format(seg=spelling)}, 27 mm."
                got = normalize_segments(written)
                if spelling in NOT_REWRITTEN:
                    assert got == written
                    continue
                assert f" {CANONICAL[name]}," in got, (written, got)
                assert got.startswith("A cyst in ") and got.endswith(", 27 mm.")


@pytest.mark.parametrize("written, expected", [
    ("In the right hemiliver at SVIII lies an HCC", "In the right hemiliver at segment 8 lies an HCC"),
    ("A cyst in Couinaud segment VII of the liver", "A cyst in Couinaud segment 7 of the liver"),
    ("at the 7th segment; the seventh hepatic segment", "at the segment 7; the segment 7"),
    ("seg. 4A, segment IV-b, S IVa, Couinaud 4b", "segment 4a, segment 4b, segment 4a, Couinaud segment 4b"),
    ("In segment I, a cyst. In segment V.", "In segment 1, a cyst. In segment 5."),
])
def test_hand_cases(written: str, expected: str) -> None:
    assert normalize_segments(written) == expected
    assert normalize_segments(expected) == expected  # idempotent


@pytest.mark.parametrize("text", [
    "Segments of the liver", "I saw a cyst; V/Q scan", "SVIIa", "segment 12", "segment 7-8", "sizes 7 mm, S",
    "IV contrast was given", "the 9th segment", "Svi", "VS7", "S7-type",
])
def test_other_words_are_left_alone(text: str) -> None:
    assert normalize_segments(text) == text


def test_the_tokenizer_reads_the_normalised_sentence_only_when_asked() -> None:
    on, off = Tokenizer(max_tokens=16, normalize_segments=True), Tokenizer(max_tokens=16)
    a, b = ["a cyst in SVII"], ["a cyst in segment 7"]
    assert torch.equal(on(a)["input_ids"], on(b)["input_ids"])
    assert torch.equal(on(b)["input_ids"], off(b)["input_ids"])
    assert not torch.equal(off(a)["input_ids"], off(b)["input_ids"])
    assert on.count_tokens(a[0]) == off.count_tokens(b[0])


def test_a_checkpoint_and_its_export_keep_the_setting(tmp_path) -> None:
    settings = tiny_model()
    config = model_config_from_dict({**settings, "in_channels": 1, "text": {**settings["text"], "normalize_segments": True}})
    ckpt = make_untrained_checkpoint(tmp_path / "m.pt", model=build(config))
    exported, _, _ = export_model(ckpt, tmp_path / "m.ts", "torchscript", batch=None)
    for backend in (load_backend(ckpt, device="cpu"), load_backend(exported)):
        assert backend.tokenizer.normalize_segments
        assert torch.equal(backend.tokenize(["in SVII"])["input_ids"], backend.tokenize(["in segment 7"])["input_ids"])
    off = make_untrained_checkpoint(tmp_path / "off.pt")  # checkpoints written before the setting read it as off
    assert not load_backend(off, device="cpu").tokenizer.normalize_segments
