"""Fuzz suite: a few hundred malformed inputs through the readers, ``lsms check`` and ``lsms predict``.

Each input must end in a result or in the project's own error naming the file -- never another exception
or a traceback -- and memory must not follow the sizes files declare: the commands run in a subprocess
under an address-space limit (``RLIMIT_AS``) and report their peak resident memory. ``docs/reliability.md``
says how to run it; ``-m benchmark`` runs the longer variant (thousands of mutations).
"""

from __future__ import annotations

import csv
import json
import os
import resource
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fuzz_inputs as F
from lsms.cli import main
from lsms.data.readers import ImageReadError, read_image

SRC = Path(__file__).resolve().parents[1] / "src"
ADDRESS_SPACE = 3 * 2**30  # the children's virtual-memory ceiling (torch alone maps ~0.9 GiB)
PEAK_RSS = 2**30  # what a single-image command may hold, whatever its input declares
VOLUME_SEEDS = (".nii", ".nii.gz")  # read one slice of these


def _outcome(path: Path, **kwargs) -> tuple[str, str]:
    """("ok", shape) or ("error", message) or ("escaped", exception) for reading ``path``."""
    try:
        img = read_image(path, **kwargs)
    except (ImageReadError, FileNotFoundError) as err:
        return "error", str(err)
    except Exception as err:  # what the suite exists to catch
        return "escaped", f"{type(err).__name__}: {err}"
    if img.array.dtype != np.float32 or img.array.ndim not in (2, 3):
        return "escaped", f"bad array {img.array.dtype} {img.array.shape}"
    return "ok", str(img.array.shape)


def _misbehaving(paths: list[Path]) -> list[str]:
    bad = []
    for p in paths:
        kwargs = {"slice_index": 1} if p.name.endswith(VOLUME_SEEDS) else {}
        kind, text = _outcome(p, **kwargs)
        if kind == "escaped" or (kind == "error" and not text.startswith(str(p))):
            bad.append(f"{p.name}: {kind}: {text}")
    return bad


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> list[Path]:
    return F.seeds(tmp_path_factory.mktemp("seeds"))


@pytest.fixture(scope="module")
def crafted(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    return F.crafted(tmp_path_factory.mktemp("crafted"))


def test_seeds_read(seeds) -> None:
    assert _misbehaving(seeds) == [] and all(_outcome(p, **({"slice_index": 1} if p.name.endswith(VOLUME_SEEDS) else {}))[0] == "ok" for p in seeds)


def test_mutated_files_end_in_a_result_or_an_error_naming_the_file(seeds, tmp_path) -> None:
    paths = F.write_mutations(seeds, tmp_path, flips=12)
    assert len(paths) >= 250
    assert _misbehaving(paths) == []


def test_crafted_files(crafted) -> None:
    """Sizes declared beyond the data, library exceptions, and files that lie about their content."""
    failures = []
    for name, (path, expect) in crafted.items():
        kwargs = {"slice_index": 1} if name.endswith(VOLUME_SEEDS) else {}  # volumes: a slice, not "give an index"
        kind, text = _outcome(path, **kwargs)
        if expect == "limit":
            ok = kind == "error" and text.startswith(str(path)) and "max_image_pixels" in text
        elif expect.startswith("error:"):
            ok = kind == "error" and text.startswith(str(path)) and expect[6:] in text
        else:
            ok = kind == "ok"
        if not ok:
            failures.append(f"{name} (expected {expect}): {kind}: {text}")
    assert failures == []
    nan = read_image(crafted["nan.nii.gz"][0], slice_index=1).array  # NaN survives the read, for check to see
    assert np.isnan(nan).sum() == 1 and np.isnan(nan[4, 3])
    rgb16 = read_image(crafted["rgb16.png"][0])
    assert rgb16.bit_depth == 16 and rgb16.array[0, 0].tolist() == [65535.0, 0.0, 4660.0]
    assert read_image(crafted["pages.tif"][0], slice_index=2).array.max() == 2
    assert read_image(crafted["multiframe.dcm"][0], slice_index=2).array[0, 0] == 2 - 1024


def test_limits_are_settings(crafted, monkeypatch) -> None:
    from lsms.data.readers import ReadLimits

    small = Path(crafted["rgb16.png"][0])
    with pytest.raises(ImageReadError, match=r"rgb16\.png: .* 64, above the limit max_image_pixels = 10;.*LSMS_MAX_IMAGE_PIXELS"):
        read_image(small, limits=ReadLimits(max_image_pixels=10))
    monkeypatch.setenv("LSMS_MAX_FILE_BYTES", "20")
    with pytest.raises(ImageReadError, match=r"rgb16\.png: the file size in bytes = [\d,]+, above the limit max_file_bytes = 20"):
        read_image(small)
    monkeypatch.setenv("LSMS_MAX_FILE_BYTES", "lots")
    with pytest.raises(ValueError, match="LSMS_MAX_FILE_BYTES='lots' must be a positive whole number"):
        read_image(small)


# --------------------------------------------------------------------------- commands, in a memory-capped child


def _run_capped(args: list[str], cwd: Path, timeout: float = 120) -> tuple[int, str, str, int]:
    """``lsms ARGS`` in a child limited to ADDRESS_SPACE bytes -> (exit status, stdout, stderr, peak RSS bytes)."""
    # The child's own high-water mark. On Linux that is VmHWM, which belongs to the address space exec made:
    # ru_maxrss carries over the forking parent's (pytest's, ~1 GiB late in the suite). macOS counts bytes.
    code = ("import atexit, resource, sys\n"
            "def peak_kb():\n"
            "    if sys.platform.startswith('linux'):\n"
            "        return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:'))\n"
            "    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // (1024 if sys.platform == 'darwin' else 1)\n"
            "atexit.register(lambda: print('PEAK_RSS_KB', peak_kb(), file=sys.stderr))\n"
            "from lsms.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")

    def cap() -> None:
        if sys.platform.startswith("linux"):  # macOS does not enforce RLIMIT_AS; the peak RSS check still holds
            resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, preexec_fn=cap)
    peak = [int(line.split()[1]) * 1024 for line in proc.stderr.splitlines() if line.startswith("PEAK_RSS_KB")]
    return proc.returncode, proc.stdout, proc.stderr, peak[-1] if peak else -1


def _dataset(root: Path, crafted: dict[str, tuple[Path, str]], outside: Path) -> dict[str, str]:
    """A manifest dataset whose images are the crafted files, plus hostile manifest lines; id -> expected code."""
    root.mkdir()
    mask = np.zeros((20, 24), np.uint8)
    mask[5:9, 5:9] = 255
    Image.fromarray(mask).save(root / "mask.png")
    Image.fromarray(np.arange(480, dtype=np.uint8).reshape(20, 24)).save(root / "good.png")
    lines = [{"id": "good", "image": "good.png", "mask": "mask.png", "text": "", "split": "train"}]
    expected = {}
    for name, (path, expect) in crafted.items():
        if expect in ("ok", "rgb16"):
            continue
        (root / name).write_bytes(path.read_bytes())
        rid = f"bad-{name}"
        extra = {"slice_index": 1} if name == "nan.nii.gz" else {}
        lines.append({"id": rid, "image": name, "mask": "mask.png", "text": "", "split": "train", **extra})
        expected[rid] = "nan-inf" if expect == "nan" else "unreadable"
    (root / "link.png").symlink_to(outside / "secret.png")
    for rid, image in (("up", "../outside/secret.png"), ("abs", str(outside / "secret.png")), ("link", "link.png"),
                       ("fifo", "../outside/fifo.png"), ("proc", "/proc/self/environ")):
        lines.append({"id": rid, "image": image, "mask": "mask.png", "text": "", "split": "train"})
        expected[rid] = "outside-root"
    text = "".join(json.dumps(x) + "\n" for x in lines)
    text += '{"id": "surrogate", "image": "good.png", "mask": "mask.png", "text": "\\ud800", "split": "train"}\n'
    (root / "manifest.jsonl").write_bytes(text.encode() + b'{"id": "latin1", "text": "caf\xe9"}\n')
    return expected


def test_check_reports_every_bad_record_without_opening_outside_files(crafted, tmp_path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    Image.fromarray(np.zeros((20, 24), np.uint8)).save(outside / "secret.png")
    os.mkfifo(outside / "fifo.png")  # opening it for reading would block: the check would time out
    expected = _dataset(tmp_path / "ds", crafted, outside)
    rc, out, err, peak = _run_capped(["check", "ds", "--json", "--no-text-check", "--workers", "1"], tmp_path, timeout=180)
    assert rc == 1 and "Traceback" not in err, err
    report = json.loads(out)
    codes = {(p["id"], p["code"]) for p in report["problems"]}
    missing = [(rid, code) for rid, code in expected.items() if (rid, code) not in codes]
    assert missing == []
    by_id = {p["id"]: p["message"] for p in report["problems"] if p["id"]}
    for name in (n for n in crafted if f"bad-{n}" in expected):
        assert name in by_id[f"bad-{name}"]  # the message names the file
    invalid = [p["message"] for p in report["problems"] if p["code"] == "invalid-record"]
    assert any("manifest.jsonl:" in m and "lone surrogate" in m and "'text'" in m for m in invalid)
    assert any("not UTF-8" in m and "manifest.jsonl:" in m for m in invalid)
    assert not any(p["code"] == "unreadable" and p["id"] == "good" for p in report["problems"])
    print(f"lsms check over {len(expected) + 1} records: peak RSS {peak / 2**20:.0f} MiB")
    assert 0 < peak < PEAK_RSS, f"peak RSS {peak / 2**20:.0f} MiB"


def test_predict_skips_bad_inputs_writes_the_rest_in_bounded_memory(crafted, tmp_path) -> None:
    from toy_data import make_untrained_checkpoint

    ckpt = make_untrained_checkpoint(tmp_path / "model.pt", in_channels=1)
    folder = tmp_path / "inputs"
    folder.mkdir()
    Image.fromarray(np.arange(480, dtype=np.uint8).reshape(20, 24)).save(folder / "good.png")
    np.save(folder / "nan.npy", np.full((8, 8), np.nan, np.float32))
    for name in ("huge.png", "short.nii", "halfcut.nii.gz", "huge.dcm", "multiframe.dcm"):
        (folder / name).write_bytes(crafted[name][0].read_bytes())
    dicoms = ["huge.dcm", "multiframe.dcm"]  # given one by one: a folder holding .dcm files is a DICOM series
    for name in dicoms:
        (folder / name).rename(tmp_path / name)
    rc, out, err, peak = _run_capped(["predict", str(ckpt), "inputs", *dicoms, "--text", "", "--out", "out",
                                      "--device", "cpu"], tmp_path, timeout=180)
    assert rc == 1 and "Traceback" not in err, err
    rows = list(csv.DictReader(open(tmp_path / "out" / "predictions.csv")))
    failed = {Path(r["input"]).name: r["error"] for r in rows if r["error"]}
    done = [r for r in rows if not r["error"]]
    assert len(rows) == 9 and set(failed) == {"nan.npy", "huge.png", "short.nii", "huge.dcm", "halfcut.nii.gz"}
    assert all(name in message for name, message in failed.items())
    assert "NaN" in failed["nan.npy"] and "max_image_pixels" in failed["huge.png"]
    assert sorted((Path(r["input"]).name, r["slice"]) for r in done) == [
        ("good.png", ""), ("multiframe.dcm", "0"), ("multiframe.dcm", "1"), ("multiframe.dcm", "2")]
    assert all((tmp_path / r["mask"]).is_file() for r in done)
    print(f"lsms predict over {len(rows)} inputs/slices: peak RSS {peak / 2**20:.0f} MiB")
    assert 0 < peak < PEAK_RSS, f"peak RSS {peak / 2**20:.0f} MiB"
    assert main(["predict", str(ckpt), "huge.dcm", "--text", "", "--out", str(folder / "good.png")]) == 2


@pytest.mark.benchmark
def test_benchmark_many_mutations(seeds, tmp_path) -> None:
    """The long variant: 300 mutations per seed under three random seeds (~12,000 files)."""
    bad = []
    for seed in range(3):
        paths = F.write_mutations(seeds, tmp_path / str(seed), flips=300, seed=seed + 1)
        bad += _misbehaving(paths)
    assert bad == []


# --------------------------------------------------------------------------- checkpoints


def _resaved(src: Path, dst: Path, edit) -> Path:
    from lsms.checkpoint import save_checkpoint

    ckpt = torch.load(src, weights_only=True)
    edit(ckpt)
    return save_checkpoint(ckpt, dst)


def test_checkpoints_are_checked_before_use(tmp_path) -> None:
    from lsms.checkpoint import load_checkpoint, model_from_checkpoint

    from toy_data import make_untrained_checkpoint

    good = make_untrained_checkpoint(tmp_path / "good.pt", in_channels=1)
    data = good.read_bytes()
    with zipfile.ZipFile(good) as z:  # flip one byte inside the largest weight tensor: only the CRC can tell
        info = max(z.infolist(), key=lambda i: i.file_size)
    flipped = bytearray(data)
    flipped[info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + info.file_size // 2] ^= 0x40
    (tmp_path / "crc.pt").write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match=r"crc\.pt.*damaged: the CRC of .* does not match"):
        load_checkpoint(tmp_path / "crc.pt")
    no_prep = _resaved(good, tmp_path / "noprep.pt", lambda c: c["spec"].pop("preprocessing"))
    with pytest.raises(ValueError, match=r"noprep\.pt.*'spec' -> 'preprocessing' is missing"):
        load_checkpoint(no_prep)
    bad_cfg = _resaved(good, tmp_path / "cfg.pt", lambda c: c["spec"]["model"].update(ham_channels=0))
    with pytest.raises(ValueError, match="ham_channels and head_channels must be positive multiples of 32"):
        model_from_checkpoint(load_checkpoint(bad_cfg))
    rng = np.random.default_rng(0)
    misbehaving = []
    for tag, mutated in F.mutations(good, flips=16, rng=rng):
        path = tmp_path / f"m-{tag}.pt"
        path.write_bytes(mutated)
        try:
            model_from_checkpoint(load_checkpoint(path))
        except (ValueError, FileNotFoundError) as err:
            if "m-" + tag not in str(err) and "do not fit" not in str(err) and "spec" not in str(err):
                misbehaving.append(f"{tag}: unnamed: {err}")
        except Exception as err:
            misbehaving.append(f"{tag}: {type(err).__name__}: {err}")
    assert misbehaving == []


def test_a_checkpoint_declaring_huge_sizes_or_a_hub_encoder_fails_fast_and_small(tmp_path) -> None:
    from toy_data import make_untrained_checkpoint

    good = make_untrained_checkpoint(tmp_path / "good.pt", in_channels=1)
    _resaved(good, tmp_path / "huge.pt", lambda c: c["spec"]["model"].update(
        widths=[4096, 8192, 16384, 32768], ham_channels=8192, head_channels=8192))
    Image.fromarray(np.zeros((20, 24), np.uint8)).save(tmp_path / "x.png")
    rc, _, err, peak = _run_capped(["predict", "huge.pt", "x.png", "--text", "", "--out", "out"], tmp_path)
    assert rc == 2 and "Traceback" not in err and "do not fit the model its config describes" in err, err
    assert 0 < peak < PEAK_RSS, f"peak RSS {peak / 2**20:.0f} MiB"
    _resaved(good, tmp_path / "hub.pt", lambda c: c["spec"]["model"]["text"].update(encoder="nobody/no-such-encoder"))
    started = time.monotonic()
    rc, _, err, _ = _run_capped(["predict", "hub.pt", "x.png", "--text", "a lesion", "--out", "out"], tmp_path)
    assert rc == 2 and "'nobody/no-such-encoder' is a HuggingFace hub id" in err and "--allow-hub-model" in err, err
    assert time.monotonic() - started < 60


def test_sample_ids_become_safe_file_names() -> None:
    from lsms.evaluate import file_stem

    a, b = file_stem("x" * 10_000), file_stem("x" * 9_999 + "y")
    assert len(a) <= 120 and a != b and file_stem("../../etc/passwd") == "_.._etc_passwd"


def test_a_bad_manifest_line_never_ends_the_check(tmp_path, capsys) -> None:
    """Each hostile line is reported with its file:line (and field), the others are still checked, and loading
    for training refuses with the same message."""
    from lsms.data import load_samples

    root = tmp_path / "ds"
    (root / "masks").mkdir(parents=True)
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(root / "good.png")
    Image.fromarray((np.eye(8) * 255).astype(np.uint8)).save(root / "mask.png")
    good = {"id": "good", "image": "good.png", "mask": "mask.png", "text": "a lesion", "split": "train"}
    hostile = [  # (manifest line, what its message must say)
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        (json.dumps({**good, "id": "nul", "image": "good\x00.png"}), "field 'image' holds a NUL character"),
        (json.dumps({**good, "id": "nul-mask", "mask": "mask.png\x00../x"}), "field 'mask' holds a NUL character"),
        ('{"id": "digits", "slice_index": ' + "9" * 5000 + "}", "a number has more digits"),
        (json.dumps({**good, "id": "huge", "instances": "mask.png", "target_instance": 2**70}),
         "field 'target_instance' must be"),
        (json.dumps(["not", "an", "object"]), "each line must be a JSON object, got list"),
        ('{"id": "twice", "id": "again", "image": "good.png"}', "field 'id' appears twice"),
        (json.dumps({**good, "id": "dir-mask", "mask": "masks"}), "field 'mask': " + str(root / "masks") + " is a folder"),
        (json.dumps({**good, "id": "up", "image": "../../etc/passwd"}), "field 'image' (../../etc/passwd) resolves to"),
        (json.dumps({**good, "id": "fifo", "mask": "fifo.png"}), "fifo.png is neither a file nor a folder"),
    ]
    os.mkfifo(root / "fifo.png")  # inside the dataset: opening it would block the check
    lines = [json.dumps(good), *(line for line, _ in hostile)]
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert main(["check", str(root), "--json", "--no-text-check", "--workers", "1"]) == 1
    report = json.loads(capsys.readouterr().out)
    messages = [p["message"] for p in report["problems"] if p["severity"] == "error"]
    for number, (_, expected) in enumerate(hostile, start=2):
        assert any(f"manifest.jsonl:{number}: " in m and expected in m for m in messages), (number, expected, messages)
    assert not any(p["id"] == "good" for p in report["problems"])  # the good line was checked and passed
    with pytest.raises(ValueError, match=r"manifest\.jsonl:2: the JSON is nested too deeply.*and \d+ more error"):
        load_samples(root)
    assert main(["train", str(root), "--out", str(tmp_path / "run"), "--epochs", "1", "--no-progress", "--preset", "tiny",
                 "--image-size", "64", "--batch-size", "2"]) == 2
    assert "manifest.jsonl:2: the JSON is nested too deeply" in capsys.readouterr().err
