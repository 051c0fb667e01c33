"""Settings and model files that would ask for too much memory or load something unchecked are refused early.

Memory: an image size, a batch or a checkpoint's stored size is checked against ``max_tensor_bytes`` before
anything is allocated (each refusal runs in a fraction of a second). Model files: the text encoder a checkpoint
or exported file names is the packaged one, a model folder, or a hub id with the opt-in; a checkpoint whose
settings disagree is refused when it is loaded.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lsms.checkpoint import load_trained, save_checkpoint
from lsms.cli import build_parser, main
from lsms.data.readers import ReadLimits
from lsms.model import activation_bytes, model_config
from lsms.spec import check_memory
from lsms.text import DEFAULT_TEXT_ENCODER, HUB_OPT_IN_ENV, check_text_source

from toy_data import TINY_TEXT, make_toy_dataset, make_untrained_checkpoint

FAST = 1.0  # seconds a refusal may take (it allocates nothing and builds no model)


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return make_untrained_checkpoint(tmp_path_factory.mktemp("ckpt") / "good.pt", in_channels=1)


def _resaved(src: Path, dst: Path, edit) -> Path:
    checkpoint = torch.load(src, weights_only=True)
    edit(checkpoint)
    return save_checkpoint(checkpoint, dst)


def _refused(args: list[str], capsys) -> str:
    """``lsms ARGS`` must end in one error line, within FAST seconds; -> that line."""
    build_parser()  # imports every command's module: once per test session, not the command's time
    started = time.monotonic()
    rc = main(args)
    elapsed = time.monotonic() - started
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    assert elapsed < FAST, f"{elapsed:.2f} s: {err}"
    return err


# --------------------------------------------------------------------------- memory


def test_the_estimate_is_linear_in_pixels_and_batch_and_grows_with_the_model() -> None:
    tiny, base = model_config("tiny"), model_config("base")
    assert activation_bytes(tiny, 256, 256, 2) == 8 * activation_bytes(tiny, 128, 128, 1)
    assert activation_bytes(base, 128, 128) > activation_bytes(tiny, 128, 128)
    assert activation_bytes(tiny, 128, 128, training=True) > activation_bytes(tiny, 128, 128)
    # what the project's recipes ask for fits the default limit on a CPU (demo: tiny at 128, batch 8;
    # real-cpu: 224, batch 8), and so does inference of the paper's base model at 480
    limit = ReadLimits().max_tensor_bytes
    assert activation_bytes(tiny, 128, 128, 8, training=True) < limit
    assert activation_bytes(tiny, 224, 224, 8, training=True) < limit
    # and so do the plain defaults of lsms train (tiny at 256, batch 8), also with --preset small
    assert activation_bytes(tiny, 256, 256, 8, training=True) < limit
    assert activation_bytes(model_config("small"), 256, 256, 8, training=True) < limit
    assert activation_bytes(base, 480, 480, 1) < limit


def test_train_refuses_an_image_size_beyond_the_limit(tmp_path, capsys) -> None:
    data = make_toy_dataset(tmp_path / "toy", n_images=2, n_val=1)
    err = _refused(["train", str(data), "--out", str(tmp_path / "run"), "--image-size", "100000", "--device", "cpu"],
                   capsys)
    assert "--image-size 100000 with --batch-size 8: the estimated memory of the network's training activations" in err
    assert "above the limit max_tensor_bytes = 4,294,967,296; use a smaller --image-size or --batch-size" in err
    assert "LSMS_MAX_TENSOR_BYTES" in err and not (tmp_path / "run").exists()
    err = _refused(["train", str(data), "--out", str(tmp_path / "run"), "--image-size", "256", "--batch-size", "4096",
                    "--device", "cpu"], capsys)
    assert "--image-size 256 with --batch-size 4096" in err


def test_profile_refuses_sizes_and_batches_beyond_the_limit(capsys) -> None:
    err = _refused(["profile", "--preset", "tiny", "--image-size", "128", "100000"], capsys)
    assert "--preset tiny --image-size 100000 (batch 1)" in err and "max_tensor_bytes" in err
    err = _refused(["profile", "--preset", "base", "--image-size", "512", "--batch", "512"], capsys)
    assert "--preset base --image-size 512 (batch 512)" in err


def test_a_checkpoint_storing_a_huge_image_size_is_refused_naming_it(good, tmp_path, capsys) -> None:
    huge = _resaved(good, tmp_path / "huge.pt", lambda c: c["spec"]["preprocessing"].update(image_size=[100000, 100000]))
    Image.fromarray(np.zeros((20, 24), np.uint8)).save(tmp_path / "x.png")
    err = _refused(["predict", str(huge), str(tmp_path / "x.png"), "--text", "a", "--out", str(tmp_path / "out")],
                   capsys)
    assert f"checkpoint {str(huge)!r}: its image size: the estimated memory" in err
    assert "for 1 x 100000 x 100000 pixels" in err and "lsms export --image-size N" in err
    data = make_toy_dataset(tmp_path / "toy", n_images=1, n_val=1)
    err = _refused(["evaluate", str(huge), str(data), "--out", str(tmp_path / "eval")], capsys)
    assert f"checkpoint {str(huge)!r}: its image size with batch 8" in err
    # the same checkpoint exported at a size that fits is no longer its stored size's problem
    model, spec, _ = load_trained(huge, image_size=64)
    assert spec.image_size == (100000, 100000) and model is not None


def test_export_refuses_an_image_size_beyond_the_limit(good, tmp_path, capsys) -> None:
    err = _refused(["export", str(good), "--out", str(tmp_path / "m.onnx"), "--image-size", "100000"], capsys)
    assert "--image-size 100000: the estimated memory of the network's inference activations for 1 x 100000" in err
    assert "use a smaller --image-size" in err and not (tmp_path / "m.onnx").exists()


def test_the_limit_is_a_setting(monkeypatch) -> None:
    tiny = model_config("tiny")
    monkeypatch.setenv("LSMS_MAX_TENSOR_BYTES", "1000")
    with pytest.raises(ValueError, match=r"^--image-size 64: .* above the limit max_tensor_bytes = 1,000"):
        check_memory(tiny, (64, 64), 1, training=False, source="--image-size 64", fix="use less")
    monkeypatch.setenv("LSMS_MAX_TENSOR_BYTES", "1e15")  # a big machine goes higher
    check_memory(tiny, (8192, 8192), 8, training=True, source="--image-size 8192", fix="use less")


# --------------------------------------------------------------------------- text encoders named by model files


@pytest.fixture()
def no_network(monkeypatch):
    """Any attempt to connect fails the test; the hub's offline switch is off, so only lsms can stop a download."""
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv(HUB_OPT_IN_ENV, raising=False)


def test_a_hub_id_in_a_checkpoint_is_refused_at_once_without_the_opt_in(good, tmp_path, no_network, capsys,
                                                                        monkeypatch) -> None:
    hub = _resaved(good, tmp_path / "hub.pt", lambda c: c["spec"]["model"]["text"].update(encoder="nobody/no-such-encoder"))
    Image.fromarray(np.zeros((20, 24), np.uint8)).save(tmp_path / "x.png")
    args = ["predict", str(hub), str(tmp_path / "x.png"), "--text", "a lesion", "--out", str(tmp_path / "out")]
    err = _refused(args, capsys)
    assert f"checkpoint {str(hub)!r}: its text encoder 'nobody/no-such-encoder' is a HuggingFace hub id" in err
    assert "--allow-hub-model" in err and "LSMS_ALLOW_HUB_MODEL=1" in err
    # with the opt-in the hub id passes the check and goes to the cache (offline here: a clear error, no download)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc = main([*args, "--allow-hub-model"])
    err = capsys.readouterr().err
    assert rc == 2 and "not in the local HuggingFace cache and HF_HUB_OFFLINE is set" in err, err
    assert HUB_OPT_IN_ENV not in os.environ  # the flag holds for its command only


def test_an_exported_file_naming_a_hub_id_is_refused_before_its_tokenizer_loads(good, no_network) -> None:
    import dataclasses

    from lsms.backends import ExportedBackend
    from lsms.checkpoint import load_checkpoint, spec_of
    from lsms.export_metadata import ExportMetadata

    spec = spec_of(load_checkpoint(good))
    spec = dataclasses.replace(spec, model=dataclasses.replace(
        spec.model, text=dataclasses.replace(spec.model.text, encoder="nobody/no-such-encoder")))
    with pytest.raises(ValueError, match=r"^m\.onnx: its text encoder 'nobody/no-such-encoder' is a HuggingFace hub id"):
        ExportedBackend(Path("m.onnx"), ExportMetadata(export_format="onnx", spec=spec, batch=1))


@pytest.mark.parametrize("encoder, message", [
    ("/etc", "its text encoder '/etc' is a folder that holds no HuggingFace model"),
    ("/no/such/folder", "its text encoder '/no/such/folder' is not a folder on this machine"),
])
def test_a_folder_that_holds_no_model_is_refused(good, tmp_path, no_network, encoder, message) -> None:
    bad = _resaved(good, tmp_path / "bad.pt", lambda c: c["spec"]["model"]["text"].update(encoder=encoder))
    started = time.monotonic()
    with pytest.raises(ValueError, match=f"^checkpoint {str(bad)!r}: {message}"):
        load_trained(bad)
    assert time.monotonic() - started < FAST


def test_the_packaged_encoder_and_a_model_folder_load(good, tmp_path, no_network) -> None:
    from transformers import AutoTokenizer, BertConfig, BertModel

    check_text_source(DEFAULT_TEXT_ENCODER, "x.pt")
    folder = tmp_path / "encoder"
    BertModel(BertConfig(**{k: v for k, v in TINY_TEXT.items() if k != "model_type"})).save_pretrained(folder)
    AutoTokenizer.from_pretrained(_packaged_folder()).save_pretrained(folder)
    local = _resaved(good, tmp_path / "local.pt", lambda c: c["spec"]["model"]["text"].update(encoder=str(folder)))
    model, spec, _ = load_trained(local)
    assert spec.model.text.encoder == str(folder) and model.tokenizer(["a lesion"])["input_ids"].shape[0] == 1


def _packaged_folder() -> str:
    from lsms.text import resolve_text_encoder

    return resolve_text_encoder(DEFAULT_TEXT_ENCODER)


# --------------------------------------------------------------------------- settings that disagree


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["spec"]["preprocessing"].update(in_channels=3),
     "the model reads 1 channels but its preprocessing gives 3; they must agree"),
    (lambda c: c["spec"]["model"]["text"].update(max_tokens=600),
     "max_tokens = 600 tokens but its text encoder has 512 positions"),
])
def test_a_checkpoint_whose_settings_disagree_is_refused_at_load(good, tmp_path, edit, message) -> None:
    bad = _resaved(good, tmp_path / "bad.pt", edit)
    with pytest.raises(ValueError, match=f"^checkpoint {str(bad)!r}: .*{message}"):
        load_trained(bad)
