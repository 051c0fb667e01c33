"""Checkpoints: atomic writes, safe loading (no code execution), RNG round trip."""

from __future__ import annotations

import os
import pickle
import random
import zipfile

import numpy as np
import pytest
import torch

from lsms import checkpoint as C


def _ckpt(value: float) -> dict:
    return {
        "format": C.FORMAT, "format_version": C.FORMAT_VERSION, "model": {"w": torch.full((3, 3), value)},
        "optimizer": None, "epoch": 1, "step": 7, "batch_in_epoch": 0, "rng": [C.rng_state()],
        "config": {"model": {"preset": "tiny", "widths": [1, 2]}, "train": {"lr": 1e-3}, "preprocessing": {}},
    }


def test_save_and_load_round_trip(tmp_path):
    path = C.save_checkpoint(_ckpt(1.0), tmp_path / "run" / "last.pt")
    loaded = C.load_checkpoint(path)
    assert torch.equal(loaded["model"]["w"], torch.ones(3, 3))
    assert loaded["config"]["model"]["widths"] == [1, 2]
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temporary files left behind


def test_interrupted_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    path = C.save_checkpoint(_ckpt(1.0), tmp_path / "last.pt")
    real_save = torch.save

    def crash_midway(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(f.tell() // 2)  # half a file written ...
        raise KeyboardInterrupt("killed while saving")  # ... then the process is interrupted

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        C.save_checkpoint(_ckpt(2.0), path)
    monkeypatch.undo()
    assert torch.equal(C.load_checkpoint(path)["model"]["w"], torch.ones(3, 3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


class _Payload:
    """Pickles to a call of os.system: what a malicious checkpoint would contain."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_does_not_execute(tmp_path):
    marker = tmp_path / "pwned"
    evil = _ckpt(1.0)
    evil["config"]["train"]["payload"] = _Payload(marker)
    path = tmp_path / "evil.pt"
    torch.save(evil, path)  # a real torch zip archive whose data.pkl calls os.system when unpickled
    with zipfile.ZipFile(path) as z:
        assert any(b"system" in z.read(n) for n in z.namelist() if n.endswith("data.pkl"))
    with pytest.raises(ValueError, match="cannot load checkpoint .* safely"):
        C.load_checkpoint(path)
    assert not marker.exists()
    # the same payload as a plain (non-zip) pickle
    raw = tmp_path / "evil_raw.pt"
    raw.write_bytes(pickle.dumps(evil))
    with pytest.raises(ValueError):
        C.load_checkpoint(raw)
    assert not marker.exists()


def test_load_rejects_foreign_and_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        C.load_checkpoint(tmp_path / "nope.pt")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an lsms checkpoint"):
        C.load_checkpoint(tmp_path / "other.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="safely"):
        C.load_checkpoint(tmp_path / "garbage.pt")


def test_resolve_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint in run folder"):
        C.resolve_checkpoint(tmp_path)
    C.save_checkpoint(_ckpt(1.0), tmp_path / "last.pt")
    assert C.resolve_checkpoint(tmp_path).name == "last.pt"
    C.save_checkpoint(_ckpt(1.0), tmp_path / "best.pt")
    assert C.resolve_checkpoint(tmp_path).name == "best.pt"
    assert C.resolve_checkpoint(tmp_path, prefer="last").name == "last.pt"
    assert C.resolve_checkpoint(tmp_path / "last.pt").name == "last.pt"


def test_rng_state_round_trip_through_file(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    ckpt = _ckpt(0.0)
    ckpt["rng"] = [C.rng_state()]
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    C.save_checkpoint(ckpt, tmp_path / "last.pt")
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    C.set_rng_state(C.load_checkpoint(tmp_path / "last.pt")["rng"][0])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
