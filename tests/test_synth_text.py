"""RefLiver-Synth's text side: negative expressions (a lesion that is not there), paraphrases for train-time
text augmentation, the held-out wording that never reaches training, and rewording a dataset."""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from scipy.ndimage import distance_transform_edt

from lsms.data import SegmentationDataset, default_preprocessing, load_samples
from lsms.synth import SynthConfig, generate_dataset, render_slice
from lsms.synth.anatomy import SEGMENTS
from lsms.synth.expressions import FAR_MM, HELDOUT_PHRASING, TRAINING_PHRASINGS
from lsms.synth.generate import rephrase_dataset
from test_synth import ARABIC, SEG_RE

SMALL = dict(patients=6, slices_per_patient=4, image_size=128, val_share=0.17, test_share=0.17, seed=11)
WORD = re.compile(r"[A-Za-z][A-Za-z0-9-]*")


def _manifest(root: Path, name: str = "manifest.jsonl") -> list[dict]:
    return [json.loads(line) for line in (root / name).read_text().splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth_text")
    generate_dataset(SynthConfig(negative_share=1.0, **SMALL), root, progress=False)
    return root


def _facts_from_masks(s, kinds: dict[int, str], spacing: float) -> list[dict]:
    """Each lesion's type, segment (at its mask's centroid) and distances to gallbladder / IVC, from the
    written instance map and the re-rendered anatomy (not from the generator's own facts)."""
    inst = s.instances
    gb = distance_transform_edt(~s.anatomy.gallbladder, sampling=spacing) if s.anatomy.gallbladder.any() else None
    ivc = distance_transform_edt(~s.anatomy.ivc, sampling=spacing) if s.anatomy.ivc.any() else None
    out = []
    for k, kind in kinds.items():
        rows, cols = np.nonzero(inst == k)
        seg = SEGMENTS[s.anatomy.segments[int(round(rows.mean())), int(round(cols.mean()))] - 1]
        out.append({"type": kind, "segment": seg,
                    "near_gallbladder": np.inf if gb is None else float(gb[inst == k].min()),
                    "near_ivc": np.inf if ivc is None else float(ivc[inst == k].min())})
    return out


def test_negatives_describe_a_lesion_that_is_absent(data: Path) -> None:
    cfg = SynthConfig.from_dict(json.loads((data / "dataset.json").read_text())["settings"])
    records = _manifest(data)
    by_slice: dict[str, list[dict]] = {}
    for r in records:
        by_slice.setdefault(r["slice_id"], []).append(r)
    kinds_seen = {"train": set(), "eval": set()}
    for sid, group in by_slice.items():
        negatives = [r for r in group if "negative" in r]
        split = group[0]["split"]
        if split == "train":  # the share's one negative
            assert len(negatives) <= 1 and all(r["id"] == f"{sid}_n" for r in negatives)
        else:  # test: one of each kind the slice allows; val: one
            assert [r["id"] for r in negatives] == [f"{sid}_n_{r['negative']}" for r in negatives]
            assert len({r["negative"] for r in negatives}) == len(negatives) and (split == "test" or len(negatives) == 1)
        i, j = (int(x) for x in re.match(r"p(\d+)_s(\d+)", sid).groups())
        s = render_slice(cfg, i, j, paraphrasings=[]) if negatives else None
        for neg in negatives:
            kinds_seen["train" if split == "train" else "eval"].add(neg["negative"])
            _check_absent(data, neg, group, s)
    assert kinds_seen["train"] == kinds_seen["eval"] == {"type", "location", "relation"}


def _check_absent(data: Path, neg: dict, group: list[dict], s) -> None:
    """The negative's mask is empty and no lesion of the slice (re-measured from its instance map) fits it."""
    sid = neg["slice_id"]
    assert neg["target_instance"] == 0 and not np.asarray(Image.open(data / neg["mask"])).any()
    assert np.array_equal(np.asarray(Image.open(data / neg["instances"])), s.instances)
    kinds = {r["target_instance"]: r["attributes"]["type"] for r in group if "negative" not in r}
    assert sorted(kinds) == list(range(1, int(s.instances.max()) + 1))
    lesions = _facts_from_masks(s, kinds, neg["spacing"][0])
    a = neg["attributes"]
    stated = a["slots"]["full"]
    if neg["negative"] == "type":
        assert all(f["type"] != a["type"] for f in lesions), (sid, neg["text"])
    elif neg["negative"] == "location":
        assert "location" in stated
        assert all(f["type"] != a["type"] or f["segment"] != a["segment"] for f in lesions), (sid, neg["text"])
    else:
        (relation,) = a["relations"]
        assert "location" not in stated and relation["kind"] in ("near_gallbladder", "near_ivc")
        assert all(f[relation["kind"]] >= FAR_MM - 1e-6 for f in lesions if f["type"] == a["type"]), neg["text"]
    # the sentence is the one the stated facts give: a segment named is the stated one
    said = {ARABIC.get(x, x) for x in SEG_RE.findall(neg["text"])}
    assert said == ({a["segment"]} if "location" in stated else set()), neg["text"]


def test_evaluation_negatives_are_deterministic_and_leave_the_positives_unchanged(tmp_path: Path, data: Path) -> None:
    again, share_only = tmp_path / "again", tmp_path / "share"
    generate_dataset(SynthConfig(negative_share=1.0, **SMALL), again, progress=False)
    assert (again / "manifest.jsonl").read_bytes() == (data / "manifest.jsonl").read_bytes()
    generate_dataset(SynthConfig(negative_share=1.0, eval_negatives=False, **SMALL), share_only, progress=False)
    full, share = _manifest(data), _manifest(share_only)
    positives = [r for r in full if "negative" not in r]
    assert positives == [r for r in share if "negative" not in r]
    evaluation = {r["id"]: r for r in full if "negative" in r and r["split"] != "train"}
    assert len(evaluation) > sum("negative" in r and r["split"] != "train" for r in share)
    # a val slice's one negative is the sentence a test slice would get for that kind (one stream per kind)
    cfg = SynthConfig(negative_share=1.0, **SMALL)
    r = next(r for r in evaluation.values() if r["split"] == "val")
    i, j = (int(x) for x in re.match(r"p(\d+)_s(\d+)", r["slice_id"]).groups())
    each = {e.negative.kind: e.text for e in render_slice(cfg, i, j, paraphrasings=[], negatives="each-kind").negatives}
    assert each[r["negative"]] == r["text"]


def test_negatives_and_paraphrases_change_no_image_and_no_template_expression(tmp_path: Path, data: Path) -> None:
    plain = tmp_path / "plain"
    generate_dataset(SynthConfig(negative_share=0.0, variants=0, **SMALL), plain, progress=False)
    for sub in ("images", "instances", "all"):
        for f in sorted((plain / sub).iterdir()):
            assert f.read_bytes() == (data / sub / f.name).read_bytes(), f
    full = {r["id"]: r for r in _manifest(data)}
    for r in _manifest(plain):
        if "negative" in r:  # val and test keep their negatives of each kind, without paraphrases
            assert r["text"] == full[r["id"]]["text"] and "variants" not in r
            continue
        other = full[r["id"]]
        assert other["texts"] == r["texts"] and other["attributes"] == r["attributes"]
        assert "variants" not in r and len(other["variants"]) == 4
    assert sum("negative" in r for r in full.values()) > 0


def _words(text: str) -> set[str]:
    return {w.lower() for w in WORD.findall(text)}


def _phrasing_words(name: str) -> set[str]:
    def walk(x) -> set[str]:
        if isinstance(x, dict):
            return set().union(*(walk(v) for v in x.values())) if x else set()
        if isinstance(x, list):
            return set().union(*(walk(v) for v in x)) if x else set()
        return _words(re.sub(r"\{[a-z_]+\}", " ", x)) if isinstance(x, str) else set()

    return walk(yaml.safe_load(resources.files("lsms.synth").joinpath(name).read_text(encoding="utf-8")))


def test_heldout_phrasing_never_reaches_training(data: Path) -> None:
    assert HELDOUT_PHRASING not in TRAINING_PHRASINGS and len(TRAINING_PHRASINGS) == 3
    training = set().union(*(_phrasing_words(n) for n in TRAINING_PHRASINGS))
    heldout_only = _phrasing_words(HELDOUT_PHRASING) - training
    assert len(heldout_only) >= 15, heldout_only  # the held-out file has its own vocabulary
    train = load_samples(data, "train")
    seen: set[str] = set()
    for r in train:
        seen |= {r.text, *(r.texts or {}).values(), *r.extra.get("variants", []), r.extra.get("all_text", "")}
    # everything the training loader hands out, over a few epochs of text augmentation
    prep = default_preprocessing("CT", 128, in_channels=1)
    ds = SegmentationDataset(train, prep, paraphrase_p=1.0, seed=3)
    given = set()
    for epoch in range(3):
        ds.set_epoch(epoch)
        given |= {ds.text_of(i) for i in range(len(ds))}
    assert given <= seen and len(given) > len(train)  # paraphrases are used, and only written ones
    leaked = {w for t in seen for w in _words(t)} & heldout_only
    assert not leaked, leaked
    # the reworded copy does use the held-out vocabulary
    reworded = rephrase_dataset(data, HELDOUT_PHRASING)
    assert {w for r in _manifest(data, reworded.name) for w in _words(r["text"])} & heldout_only


def test_rephrase_keeps_samples_and_rewrites_wording(data: Path) -> None:
    path = rephrase_dataset(data, HELDOUT_PHRASING, seed=0)
    assert path == data / "manifest-phrasings-heldout.jsonl"
    assert path.read_bytes() == rephrase_dataset(data, HELDOUT_PHRASING, seed=0).read_bytes()  # deterministic
    before, after = _manifest(data), _manifest(data, path.name)
    assert [r["id"] for r in before] == [r["id"] for r in after]
    changed = 0
    for a, b in zip(before, after, strict=True):
        for key in ("image", "mask", "instances", "target_instance", "attributes", "split"):
            assert a[key] == b[key]
        assert "variants" not in b and set(b.get("texts", {})) == set(a.get("texts", {}))
        changed += a["text"] != b["text"]
    assert changed >= 0.9 * len(before)
    recs = load_samples(path, "test")  # a manifest file loads as a dataset: evaluate on it directly
    assert recs and all(r.root == data for r in recs)


def test_rephrase_refuses_a_folder_without_synth_attributes(tmp_path: Path) -> None:
    (tmp_path / "manifest.jsonl").write_text(json.dumps({"id": "a", "image": "i.png", "mask": "m.png",
                                                         "text": "x", "split": "train"}) + "\n")
    with pytest.raises(ValueError, match="line 1: no RefLiver-Synth attributes"):
        rephrase_dataset(tmp_path, HELDOUT_PHRASING)
    with pytest.raises(FileNotFoundError, match="no manifest.jsonl"):
        rephrase_dataset(tmp_path / "nothing", HELDOUT_PHRASING)


def test_paraphrase_draw_depends_on_seed_epoch_index_only(data: Path) -> None:
    train = load_samples(data, "train")
    prep = default_preprocessing("CT", 128, in_channels=1)
    a = SegmentationDataset(train, prep, paraphrase_p=0.5, seed=1)
    b = SegmentationDataset(list(train), prep, paraphrase_p=0.5, seed=1)
    first = [a.text_of(i) for i in range(len(a))]
    assert first == [b.text_of(i) for i in range(len(b))]
    share = np.mean([t != r.text for t, r in zip(first, train, strict=True)])
    assert 0.3 <= share <= 0.7
    a.set_epoch(1)
    assert [a.text_of(i) for i in range(len(a))] != first
    off = SegmentationDataset(train, prep, paraphrase_p=0.0, seed=1)
    assert [off.text_of(i) for i in range(len(off))] == [r.text for r in train]
    half = SegmentationDataset(train, prep, text_level="half", paraphrase_p=1.0, seed=1)
    assert [half.text_of(i) for i in range(len(half))] == [r.text_at("half") for r in train]


def test_cli_negative_share_variants_and_rephrase(tmp_path: Path) -> None:
    from lsms.cli import main

    out = tmp_path / "ds"
    assert main(["synth", str(out), "--patients", "2", "--slices-per-patient", "2", "--image-size", "96",
                 "--no-progress", "--negative-share", "0", "--variants", "2", "--paraphrasing", "phrasings-2.yaml"]) == 0
    recs = _manifest(out)
    assert not any("negative" in r for r in recs) and all(len(r["variants"]) == 2 for r in recs)
    assert main(["synth", str(out), "--rephrase", "phrasings-3.yaml"]) == 0
    assert (out / "manifest-phrasings-3.jsonl").is_file()
    assert main(["synth", str(out), "--rephrase", "no-such-wording.yaml"]) == 2
