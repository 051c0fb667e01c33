"""Golden values and policies of the evaluation metrics (spec 5)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from lsms.metrics import MetricAccumulator, binarize, check_threshold, sample_scores, summarize


def _t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# Four 2x2 images (logits, target):
#  A: P = top row, G = left column: I = 1, |P| = |G| = 2, U = 3 -> Dice 2/4 = 0.5, IoU 1/3
#  B: P = G = three pixels: I = U = 3 -> Dice 1, IoU 1
#  C: empty target, empty prediction -> 0/0, undefined
#  D: empty target, one predicted pixel: I = 0, U = 1 -> Dice 0, IoU 0
LOGITS = torch.stack(
    [_t([[2, 2], [-2, -2]]), _t([[3, 3], [3, -3]]), _t([[-1, -1], [-1, -1]]), _t([[5, -5], [-5, -5]])]
)[:, None]
TARGET = torch.stack(
    [_t([[1, 0], [1, 0]]), _t([[1, 1], [1, 0]]), _t([[0, 0], [0, 0]]), _t([[0, 0], [0, 0]])]
)[:, None]
IDS = ["A", "B", "C", "D"]


def test_records_golden():
    records = sample_scores(LOGITS, TARGET, IDS)
    a, b, c, d = records
    assert (a["id"], a["intersection"], a["union"], a["pred_area"], a["target_area"]) == ("A", 1, 3, 2, 2)
    assert a["dice"] == pytest.approx(0.5) and a["iou"] == pytest.approx(1 / 3)
    assert b["dice"] == 1.0 and b["iou"] == 1.0
    assert c["dice"] is None and c["iou"] is None and c["union"] == 0
    assert d["dice"] == 0.0 and d["iou"] == 0.0
    assert all(r["referred_hit"] is None and r["n_instances"] == 0 for r in records)


def test_summary_policy_one():
    # Means over A, B, C (=1), D (=0): Dice (0.5 + 1 + 1 + 0) / 4, IoU (1/3 + 1 + 1 + 0) / 4;
    # oIoU = (1 + 3 + 0 + 0) / (3 + 3 + 0 + 1) = 4/7; IoU >= 0.5 for B and C only -> P@t = 0.5 for every t.
    s = summarize(sample_scores(LOGITS, TARGET, IDS), empty_policy="one")
    assert s["Dice"] == pytest.approx(0.625)
    assert s["mIoU"] == pytest.approx(7 / 12)
    assert s["oIoU"] == pytest.approx(4 / 7)
    assert [s[f"P@{t}"] for t in (0.5, 0.6, 0.7, 0.8, 0.9)] == [0.5] * 5
    counts = {
        k: s[k] for k in ("n_images", "n_scored", "n_empty_target", "n_empty_prediction", "n_both_empty")
    }
    assert counts == {
        "n_images": 4,
        "n_scored": 4,
        "n_empty_target": 2,
        "n_empty_prediction": 1,
        "n_both_empty": 1,
    }
    assert s["empty_policy"] == "one"
    assert s["referring_accuracy"] is None and s["n_referring"] == 0


def test_summary_policy_skip():
    # Only A and B are scored: Dice 0.75, mIoU (1/3 + 1) / 2 = 2/3, oIoU 4/6, P@0.5 = 1/2.
    s = summarize(sample_scores(LOGITS, TARGET, IDS), empty_policy="skip")
    assert s["Dice"] == pytest.approx(0.75)
    assert s["mIoU"] == pytest.approx(2 / 3)
    assert s["oIoU"] == pytest.approx(2 / 3)
    assert s["P@0.5"] == 0.5
    assert (s["n_images"], s["n_scored"], s["n_empty_target"]) == (4, 2, 2)


def test_only_empty_targets():
    both_empty = sample_scores(torch.full((1, 1, 2, 2), -1.0), torch.zeros(1, 1, 2, 2), ["x"])
    assert summarize(both_empty, "one")["oIoU"] == 1.0
    skipped = summarize(both_empty, "skip")
    assert skipped["Dice"] is None and skipped["mIoU"] is None and skipped["oIoU"] is None
    assert skipped["n_scored"] == 0


@pytest.mark.parametrize("policy, ignore_empty", [("one", False), ("skip", True)])
def test_matches_monai(policy, ignore_empty):
    from monai.metrics import DiceMetric, MeanIoU

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 1, 6, 6, generator=g)
    target = (torch.rand(8, 1, 6, 6, generator=g) > 0.6).float()
    target[:2] = 0  # empty targets
    logits[0] = -1.0  # ... one with an empty prediction
    pred = (logits > 0).float()
    dice = DiceMetric(include_background=True, reduction="mean", ignore_empty=ignore_empty)
    iou = MeanIoU(include_background=True, reduction="mean", ignore_empty=ignore_empty)
    dice(pred, target)
    iou(pred, target)
    s = summarize(sample_scores(logits, target, list(range(8))), empty_policy=policy)
    assert s["Dice"] == pytest.approx(dice.aggregate().item(), rel=1e-6)
    assert s["mIoU"] == pytest.approx(iou.aggregate().item(), rel=1e-6)


def test_pred_kinds_and_threshold():
    # sigmoid(0) = 0.5 is not > 0.5; probabilities and masks are read as given.
    assert binarize(_t([[0.0, 1e-6]])).tolist() == [[False, True]]
    assert binarize(_t([[0.5, 0.7]]), "probs").tolist() == [[False, True]]
    assert binarize(_t([[0.5, 0.7]]), "probs", threshold=0.6).tolist() == [[False, True]]
    assert binarize(_t([[0.0, 2.0]]), "mask").tolist() == [[False, True]]
    # logits threshold 0.75 <=> logit > ln 3 = 1.0986
    assert binarize(_t([[1.0, 1.2]]), threshold=0.75).tolist() == [[False, True]]
    probs = torch.sigmoid(LOGITS)
    assert sample_scores(probs, TARGET, IDS, pred_kind="probs") == sample_scores(LOGITS, TARGET, IDS)
    assert sample_scores(LOGITS > 0, TARGET[:, 0], IDS, pred_kind="mask") == sample_scores(
        LOGITS, TARGET, IDS
    )


def test_duplicates_dropped_and_order_free():
    records = sample_scores(LOGITS, TARGET, IDS)
    padded = records + records[:2]  # as a DistributedSampler pads the last batch
    shuffled = padded[:]
    random.Random(0).shuffle(shuffled)
    assert summarize(padded) == summarize(records) == summarize(shuffled)


# Referring accuracy on a 3x3 toy with two lesions: label 1 at the top left, label 2 at the bottom right.
INSTANCES = _t([[1, 1, 0], [0, 0, 0], [0, 2, 2]]).long()


def test_referring_accuracy_two_instances():
    preds = torch.stack(
        [
            _t([[0, 0, 0], [0, 0, 0], [0, 1, 1]]),  # only lesion 2: hit
            _t([[1, 1, 0], [0, 0, 0], [0, 0, 1]]),  # 2 pixels of lesion 1 > 1 of lesion 2: miss
            _t([[1, 0, 0], [0, 0, 0], [0, 0, 1]]),  # tie 1 = 1: miss (strictly more is needed)
            _t([[0, 0, 0], [0, 0, 0], [0, 0, 0]]),  # nothing: miss
            _t([[0, 0, 0], [0, 1, 1], [0, 1, 1]]),  # 2 of lesion 2, 0 of lesion 1 (+ background): hit
        ]
    )[:, None]
    target = (INSTANCES == 2).float().expand(5, 1, 3, 3)
    instances = INSTANCES.expand(5, 3, 3)
    records = sample_scores(preds, target, list(range(5)), instances, [2] * 5, pred_kind="mask")
    assert [r["referred_hit"] for r in records] == [True, False, False, False, True]
    assert all(r["n_instances"] == 2 for r in records)
    # Referred instance inferred from the target when target_instance is not given.
    assert sample_scores(preds, target, list(range(5)), instances, pred_kind="mask") == records
    # Referring lesion 1 instead flips the second case only (the tie and the empty prediction still miss).
    flipped = sample_scores(
        preds,
        (INSTANCES == 1).float().expand(5, 1, 3, 3),
        list(range(5)),
        instances,
        [1] * 5,
        pred_kind="mask",
    )
    assert [r["referred_hit"] for r in flipped] == [False, True, False, False, False]

    # Add one single-lesion image (label 3 in the centre, referred, predicted): it counts for
    # referring_accuracy (3 / 6) but not for referring_accuracy_multi (2 / 5).
    single = sample_scores(
        _t([[0, 0, 0], [0, 1, 0], [0, 0, 0]])[None, None],
        _t([[0, 0, 0], [0, 1, 0], [0, 0, 0]])[None, None],
        ["s"],
        _t([[0, 0, 0], [0, 3, 0], [0, 0, 0]]).long()[None],
        pred_kind="mask",
    )
    assert single[0]["referred_hit"] is True and single[0]["n_instances"] == 1
    s = summarize(records + single)
    assert s["referring_accuracy"] == pytest.approx(3 / 6)
    assert s["referring_accuracy_multi"] == pytest.approx(2 / 5)
    assert (s["n_referring"], s["n_referring_multi"]) == (6, 5)


def test_no_referred_instance_gives_none():
    # Empty target and no target_instance: the expression refers to no lesion -> no hit/miss, but lesions counted.
    rec = sample_scores(
        torch.zeros(1, 1, 3, 3), torch.zeros(1, 1, 3, 3), [0], INSTANCES[None], pred_kind="mask"
    )
    assert rec[0]["referred_hit"] is None and rec[0]["n_instances"] == 2


def test_accumulator():
    acc = MetricAccumulator(empty_policy="skip")
    acc.update(LOGITS[:2], TARGET[:2])
    acc.update(LOGITS[2:], TARGET[2:])
    assert [r["id"] for r in acc.records] == [0, 1, 2, 3]
    assert acc.compute() == {**summarize(sample_scores(LOGITS, TARGET, [0, 1, 2, 3]), "skip")}
    acc.reset()
    assert acc.records == [] and acc.compute()["n_images"] == 0


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.5, 1.5, float("nan")])
def test_threshold_check_message(bad):
    message = f"threshold must lie strictly between 0 and 1, got {bad}"
    for call in (lambda: check_threshold(bad), lambda: binarize(LOGITS, "probs", bad),
                 lambda: MetricAccumulator(threshold=bad)):
        with pytest.raises(ValueError) as err:
            call()
        assert str(err.value) == message
    with pytest.raises(ValueError, match="^--threshold must lie strictly between 0 and 1"):
        check_threshold(bad, "--threshold")
    assert check_threshold(0.3) == 0.3


def test_threshold_check_existence_and_types():
    assert check_threshold(0.0, "existence threshold", low_inclusive=True) == 0.0  # 0: never "not found"
    with pytest.raises(ValueError, match=r"^existence threshold must lie in \[0, 1\) \(0: never 'not found'\), got 1.0$"):
        check_threshold(1.0, "existence threshold", low_inclusive=True)
    for bad in (True, "0.5", None):
        with pytest.raises(ValueError, match="threshold must lie strictly between 0 and 1"):
            check_threshold(bad)  # type: ignore[arg-type]


def test_bad_arguments():
    with pytest.raises(ValueError, match="empty_policy"):
        summarize([], empty_policy="zero")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty_policy"):
        MetricAccumulator(empty_policy="nan")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pred_kind"):
        sample_scores(LOGITS, TARGET, IDS, pred_kind="sigmoid")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="threshold"):
        binarize(LOGITS, threshold=1.0)
    with pytest.raises(ValueError, match=r"target must have shape \(B, H, W\) = \(4, 2, 2\)"):
        sample_scores(LOGITS, torch.zeros(4, 1, 3, 3), IDS)
    with pytest.raises(ValueError, match=r"pred must have shape \(B, 1, H, W\)"):
        sample_scores(torch.zeros(4, 2, 2, 2), TARGET, IDS)
    with pytest.raises(ValueError, match="target must be binary"):
        sample_scores(LOGITS, TARGET * 0.5, IDS)
    with pytest.raises(ValueError, match="ids must have one id per sample"):
        sample_scores(LOGITS, TARGET, IDS[:3])
    with pytest.raises(ValueError, match="instances must be a non-negative integer"):
        sample_scores(LOGITS[:1], TARGET[:1], ["A"], torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match=r"instances must have shape"):
        sample_scores(LOGITS[:1], TARGET[:1], ["A"], INSTANCES[None])
    with pytest.raises(ValueError, match="target_instance 5 of sample 0 is not in its instances map"):
        sample_scores(torch.zeros(1, 3, 3), torch.zeros(1, 3, 3), [0], INSTANCES[None], [5])
    with pytest.raises(ValueError, match=r"target_instance must have shape \(1,\)"):
        sample_scores(torch.zeros(1, 3, 3), torch.zeros(1, 3, 3), [0], INSTANCES[None], [1, 2])


# --------------------------------------------------------------------------- existence


def _rec(i, score, pred_area, target_area, dice):
    return {"id": i, "existence": score, "pred_area": pred_area, "target_area": target_area, "dice": dice}


HAND = [  # three positives, three negatives (and a repeated id, dropped)
    _rec("p1", 0.9, 10, 12, 0.8), _rec("p2", 0.7, 5, 6, 0.6), _rec("p3", 0.4, 0, 8, 0.0),
    _rec("n1", 0.8, 3, 0, 0.0), _rec("n2", 0.3, 0, 0, None), _rec("n3", 0.6, 2, 0, 0.0),
    _rec("n1", 0.1, 0, 0, None),
]


def test_existence_summary_hand_case():
    from lsms.metrics import existence_summary

    s = existence_summary(HAND)  # threshold 0.5: any predicted pixel counts as found
    # AUROC: of the 9 (positive, negative) pairs, the positive scores higher in 3 + 2 + 1
    assert s["existence_AUROC"] == pytest.approx(6 / 9)
    assert s["n_positive"] == 3 and s["n_negative"] == 3 and s["existence_threshold"] == 0.5
    assert s["negative_mask_rate"] == pytest.approx(2 / 3)  # n1 and n3 draw a mask
    assert s["positive_miss_rate"] == pytest.approx(1 / 3)  # p3 predicts nothing
    assert s["Dice_positive"] == s["Dice_positive_at_threshold"] == pytest.approx((0.8 + 0.6) / 3)
    t = existence_summary(HAND, threshold=0.75)
    assert t["negative_mask_rate"] == pytest.approx(1 / 3) and t["positive_miss_rate"] == pytest.approx(2 / 3)
    assert t["Dice_positive_at_threshold"] == pytest.approx(0.8 / 3) and t["Dice_positive"] == s["Dice_positive"]
    assert existence_summary(HAND[:3])["existence_AUROC"] is None  # no negatives
    tied = [_rec("a", 0.7, 1, 1, 1.0), _rec("b", 0.7, 1, 0, 0.0)]
    assert existence_summary(tied)["existence_AUROC"] == 0.5


def test_existence_summary_per_kind_of_negative():
    from lsms.metrics import existence_summary

    kinds = {"n1": "type", "n2": "location", "n3": "type"}
    records = [{**r, "negative": kinds[r["id"]]} if r["id"] in kinds else r for r in HAND]
    s = existence_summary(records)
    # type: n1 (0.8) and n3 (0.6) against p1 0.9, p2 0.7, p3 0.4: the positive higher in 2 + 1 of 6 pairs
    assert s["existence_AUROC_of_type"] == pytest.approx(3 / 6) and s["n_negative_of_type"] == 2
    assert s["existence_AUROC_of_location"] == 1.0 and s["n_negative_of_location"] == 1  # n2 0.3: below every positive
    assert s["negative_mask_rate_of_type"] == 1.0 and s["negative_mask_rate_of_location"] == 0.0
    assert s["existence_AUROC"] == pytest.approx(6 / 9)  # the whole is unchanged
    assert not any("_of_" in k for k in existence_summary(HAND))  # no kinds named: no per-kind keys
    odd = existence_summary([{**records[0]}, {**records[3], "negative": "low"}, {**records[4], "negative": "off slice"}])
    assert "existence_AUROC_of_off_slice" in odd  # a kind becomes a safe key
    assert odd["existence_AUROC_low"] is None and odd["existence_AUROC_of_low"] == 1.0  # and never overwrites one


def test_choose_existence_threshold_hand_case():
    from lsms.metrics import choose_existence_threshold

    # positives' Dice lost by withholding: 0 up to 0.7 (p1, p2 kept), 0.2 at 0.8 and 0.9 (p2 withheld)
    assert choose_existence_threshold(HAND) == 0.7
    assert choose_existence_threshold(HAND, max_dice_loss=0.25) == 0.9  # the highest within the allowance
    assert choose_existence_threshold(HAND[:3]) is None
    separable = [_rec("p", 0.95, 4, 4, 1.0), _rec("n", 0.6, 1, 0, 0.0)]
    assert choose_existence_threshold(separable) == 0.95


def test_existence_score_is_the_highest_probability():
    from lsms.metrics import existence_score

    logits = torch.full((2, 1, 4, 4), -5.0)
    logits[0, 0, 1, 2] = 2.0
    assert torch.allclose(existence_score(logits), torch.sigmoid(torch.tensor([2.0, -5.0], dtype=torch.float64)))
    high = torch.full((2, 1, 2, 2), 20.0)
    high[1] = 25.0
    a, b = existence_score(high).tolist()
    assert a < b < 1.0  # no tie at 1.0 for saturated logits
    nan = torch.full((1, 1, 2, 2), float("nan"))
    assert existence_score(nan).tolist() == [0.0]


# A 2x2x3 volume with two lesions: lesion 1 = the 3 voxels of column 0 on slice 0 and (0, 0) of slice 1;
# lesion 2 = the 2 voxels of column 2 on slice 1.
VOL_INSTANCES = np.zeros((2, 2, 3), dtype=np.uint8)
VOL_INSTANCES[0, :, 0] = 1
VOL_INSTANCES[1, 0, 0] = 1
VOL_INSTANCES[1, :, 2] = 2


def test_volume_scores_golden():
    from lsms.metrics import volume_scores

    # P = lesion 1's slice-0 voxels + one voxel of lesion 2: |P| = 3, |G1| = 3, I = 2 -> Dice 4/6, IoU 2/4
    pred = np.zeros((2, 2, 3), dtype=bool)
    pred[0, :, 0] = True
    pred[1, 1, 2] = True
    r = volume_scores(pred, VOL_INSTANCES, 1, id="v1")
    assert (r["id"], r["intersection"], r["union"], r["pred_area"], r["target_area"], r["n_instances"]) == (
        "v1", 2, 4, 3, 3, 2)
    assert r["dice"] == pytest.approx(4 / 6) and r["iou"] == pytest.approx(0.5)
    assert r["referred_hit"] is True  # 2 voxels of lesion 1 against 1 of lesion 2
    assert volume_scores(pred, VOL_INSTANCES, 2)["referred_hit"] is False  # lesion 2 gets 1, lesion 1 more
    assert volume_scores(pred, VOL_INSTANCES, 2)["dice"] == pytest.approx(2 * 1 / (3 + 2))
    tie = np.zeros_like(pred)
    tie[0, 0, 0] = tie[1, 0, 2] = True  # one voxel each: no hit for either
    assert volume_scores(tie, VOL_INSTANCES, 1)["referred_hit"] is False
    assert volume_scores(tie, VOL_INSTANCES, 2)["referred_hit"] is False
    assert volume_scores(np.zeros_like(pred), VOL_INSTANCES, 1)["referred_hit"] is False
    # a negative (target 0): no hit counted; empty prediction -> Dice undefined, a drawn one -> 0
    neg = volume_scores(np.zeros_like(pred), VOL_INSTANCES, 0)
    assert neg["dice"] is None and neg["referred_hit"] is None and neg["target_area"] == 0
    assert volume_scores(pred, VOL_INSTANCES, 0)["dice"] == 0.0
    # summarize counts referring accuracy over volumes with 2+ lesions in ..._multi
    one = np.where(VOL_INSTANCES == 2, 0, VOL_INSTANCES)
    recs = [volume_scores(pred, VOL_INSTANCES, 1, "a"), volume_scores(pred, VOL_INSTANCES, 2, "b"),
            volume_scores(one > 0, one, 1, "c"), neg | {"id": "n"}]
    s = summarize(recs)
    assert s["referring_accuracy_multi"] == pytest.approx(0.5) and s["n_referring_multi"] == 2
    assert s["referring_accuracy"] == pytest.approx(2 / 3) and s["n_referring"] == 3


def test_volume_scores_refuse_bad_input():
    from lsms.metrics import volume_existence, volume_scores

    pred = np.zeros((2, 2, 3), dtype=bool)
    with pytest.raises(ValueError, match="one shape"):
        volume_scores(pred[0], VOL_INSTANCES[0], 1)
    with pytest.raises(ValueError, match="one shape"):
        volume_scores(pred[:, :, :2], VOL_INSTANCES, 1)
    with pytest.raises(ValueError, match="boolean"):
        volume_scores(pred.astype(np.float32) + 0.5, VOL_INSTANCES, 1)
    with pytest.raises(ValueError, match="label map"):
        volume_scores(pred, VOL_INSTANCES.astype(np.float32), 1)
    with pytest.raises(ValueError, match="target_instance 3"):
        volume_scores(pred, VOL_INSTANCES, 3)
    assert volume_existence([0.1, 0.7, 0.3]) == pytest.approx(0.7) and volume_existence([]) == 0.0
    with pytest.raises(ValueError, match="finite"):
        volume_existence([0.1, float("nan")])


def test_summarize_by_size_of_the_referred_lesion():
    from lsms.metrics import bands_in_order, size_band

    assert bands_in_order() == ["lt15mm", "15-25mm", "25-35mm", "ge35mm"]
    assert [size_band(d) for d in (3.0, 15.0, 24.9, 35.0, 80.0)] == ["lt15mm", "15-25mm", "15-25mm", "ge35mm", "ge35mm"]

    def rec(i, dice, hit, n_instances, diameter=None):
        r = {"id": i, "dice": dice, "iou": dice, "intersection": 1, "union": 2, "pred_area": 1, "target_area": 1,
             "n_instances": n_instances, "referred_hit": hit}
        return r if diameter is None else {**r, "diameter_mm": diameter}

    negative = {**rec("n", None, None, 2), "target_area": 0, "union": 0, "intersection": 0, "pred_area": 0}
    records = [rec("a", 0.9, True, 2, 40.0), rec("b", 0.5, False, 3, 10.0), rec("c", 0.7, True, 1, 12.0),
               rec("d", 0.2, True, 2, 50.0), negative]
    s = summarize(records)
    assert s["Dice_positive_of_size_lt15mm"] == pytest.approx(0.6) and s["n_positive_of_size_lt15mm"] == 2
    assert s["referring_accuracy_multi_of_size_lt15mm"] == 0.0 and s["n_referring_multi_of_size_lt15mm"] == 1  # c: 1 lesion
    assert s["referring_accuracy_multi_of_size_ge35mm"] == 1.0 and s["n_referring_multi_of_size_ge35mm"] == 2
    assert s["Dice_positive_of_size_ge35mm"] == pytest.approx(0.55)
    assert not any("15-25mm" in k or "25-35mm" in k for k in s)  # bands without a lesion get no keys
    assert s["Dice"] == summarize([{k: v for k, v in r.items() if k != "diameter_mm"} for r in records])["Dice"]
    assert not any("_of_size_" in k for k in summarize([rec("e", 0.9, True, 2)]))  # no diameters: no keys


def test_record_diameter_is_the_stated_one_of_a_positive():
    from lsms.data.manifest import Record

    def record(target, attributes):
        return Record("x", "i.png", "m.png", "t", "val", target_instance=target, attributes=attributes)

    assert record(1, {"diameter_mm": 27.4}).diameter_mm == 27.4
    assert record(None, {"diameter_mm": 12}).diameter_mm == 12.0  # no instance map: still the stated lesion's
    assert record(0, {"diameter_mm": 27.4}).diameter_mm is None  # a negative refers to no lesion
    for odd in (None, {}, {"diameter_mm": "27 mm"}, {"diameter_mm": True}, {"diameter_mm": float("nan")},
                {"diameter_mm": -3.0}):
        assert record(1, odd).diameter_mm is None


def test_batch_scores_carry_the_referred_lesions_diameter_of_positives_only():
    from lsms.evaluate import batch_scores

    mask = torch.zeros(2, 1, 8, 8)
    mask[0, 0, 2:5, 2:5] = 1  # the second sample is a negative (empty target)
    batch = {"mask": mask, "id": ["p", "n"], "diameter_mm": [12.0, 30.0]}
    records = batch_scores(torch.zeros(2, 1, 8, 8), batch)
    assert records[0]["diameter_mm"] == 12.0 and "diameter_mm" not in records[1]
    assert all("diameter_mm" not in r for r in batch_scores(torch.zeros(2, 1, 8, 8), {**batch, "diameter_mm": [float("nan")] * 2}))
