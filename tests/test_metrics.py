"""Golden values for the continual-learning metrics, computed by hand in the comments."""

import math

import numpy as np
import pytest

from cvit_bench.metrics import (
    all_metrics,
    bootstrap_interval,
    continual_metrics,
    heldout_metrics,
    instruction_following_metrics,
    last_format_floor,
    normalized_average_performance,
    unseen_metrics,
    with_field_names,
)

NAN = float("nan")

# T = 3 tasks; row j = after stage j (row 0 = before continual training), column i-1 = task i.
R = np.array(
    [
        [10.0, 20.0, 30.0],  # stage 0
        [80.0, 25.0, 35.0],  # stage 1
        [85.0, 90.0, 40.0],  # stage 2 (task 1 improves to 85 before being forgotten)
        [50.0, 70.0, 95.0],  # stage 3 (final)
    ]
)


def test_continual_metrics_golden():
    m = continual_metrics(R)
    # AP  = (50 + 70 + 95) / 3 = 215 / 3 = 71.6667
    assert m["AP"] == pytest.approx(215 / 3)
    # MAP = mean(80, (85 + 90) / 2, 215 / 3) = (80 + 87.5 + 71.6667) / 3 = 79.7222
    assert m["MAP"] == pytest.approx((80 + 87.5 + 215 / 3) / 3)
    # MFT = (R11 + R22 + R33) / 3 = (80 + 90 + 95) / 3 = 88.3333
    assert m["MFT"] == pytest.approx(265 / 3)
    # BWT = ((50 - 80) + (70 - 90)) / 2 = -25
    assert m["BWT"] == pytest.approx(-25.0)
    # forgetting = (max(80, 85) - 50 + max(90) - 70) / 2 = (35 + 20) / 2 = 27.5  (differs from -BWT)
    assert m["forgetting"] == pytest.approx(27.5)
    # FWT = ((R12 - R02) + (R23 - R03)) / 2 = ((25 - 20) + (40 - 30)) / 2 = 7.5
    assert m["FWT"] == pytest.approx(7.5)
    assert list(m) == ["AP", "MAP", "MFT", "BWT", "forgetting", "FWT"]


def test_smolora_published_final_row_gives_its_ap():
    # REFERENCE.md check: (77.36 + 58.29 + 151.99 + 95.35 + 51.96 + 65.71) / 6 = 500.66 / 6 = 83.443
    r = np.full((7, 6), NAN)
    r[6] = [77.36, 58.29, 151.99, 95.35, 51.96, 65.71]
    m = continual_metrics(r)
    assert m["AP"] == pytest.approx(83.44, abs=0.01)
    # Only stage 6 was evaluated: MAP is that stage's mean, MFT is R66 alone, the rest undefined.
    assert m["MAP"] == pytest.approx(500.66 / 6)
    assert m["MFT"] == pytest.approx(65.71)
    assert math.isnan(m["BWT"]) and math.isnan(m["forgetting"]) and math.isnan(m["FWT"])


def test_nan_entries_are_skipped_not_zeroed():
    r = R.copy()
    r[0, 1] = NAN  # task 2 not evaluated before training: FWT keeps only task 3 = 40 - 30 = 10
    r[3, 0] = NAN  # task 1 not evaluated at the end
    m = continual_metrics(r)
    assert m["FWT"] == pytest.approx(10.0)
    # AP = (70 + 95) / 2 = 82.5 (a zero would give 55)
    assert m["AP"] == pytest.approx(82.5)
    # MAP stage 3 = 82.5: (80 + 87.5 + 82.5) / 3 = 83.3333
    assert m["MAP"] == pytest.approx(250 / 3)
    # BWT and forgetting keep only task 2: 70 - 90 = -20 and 90 - 70 = 20
    assert m["BWT"] == pytest.approx(-20.0)
    assert m["forgetting"] == pytest.approx(20.0)


def test_all_nan_inputs_give_nan():
    r = R.copy()
    r[0, :] = NAN
    assert math.isnan(continual_metrics(r)["FWT"])
    m = continual_metrics(np.full((4, 3), NAN))
    assert all(math.isnan(v) for v in m.values())


def test_single_task_leaves_transfer_metrics_undefined():
    m = continual_metrics([[5.0], [7.0]])
    assert (m["AP"], m["MAP"], m["MFT"]) == (7.0, 7.0, 7.0)
    assert math.isnan(m["BWT"]) and math.isnan(m["forgetting"]) and math.isnan(m["FWT"])


@pytest.mark.parametrize("shape", [(3, 3), (4, 2), (4,), (1, 0)])
def test_wrong_shape_is_rejected(shape):
    with pytest.raises(ValueError, match=r"expected a \(T\+1\) x T matrix, got"):
        continual_metrics(np.zeros(shape))


SEEN_IF = np.array(
    [
        [0.2, 0.0, 0.1],
        [1.0, 0.2, 0.1],
        [0.6, 1.0, 0.3],
        [1.0, 0.5, 1.0],
    ]
)
UNSEEN_IF = np.array([[0.0, 0.1], [0.0, 0.2], [0.5, 0.5], [0.0, 0.75]])


def test_instruction_following_metrics_golden():
    m = instruction_following_metrics(SEEN_IF, UNSEEN_IF)
    # MIF = mean over all 5 datasets' final entries = (1 + 0.5 + 1 + 0 + 0.75) / 5 = 0.65
    # (a mean of the two group means would give (2.5/3 + 0.75/2) / 2 = 0.604)
    assert m["MIF"] == pytest.approx(0.65)
    # IF-AP = (1 + 0.5 + 1) / 3 = 0.8333
    assert m["IF-AP"] == pytest.approx(2.5 / 3)
    # IF-MAP = mean(1.0, (0.6 + 1.0) / 2, 2.5 / 3) = (1 + 0.8 + 0.8333) / 3 = 0.8778
    assert m["IF-MAP"] == pytest.approx((1.0 + 0.8 + 2.5 / 3) / 3)
    # IF-BWT = ((1.0 - 1.0) + (0.5 - 1.0)) / 2 = -0.25
    assert m["IF-BWT"] == pytest.approx(-0.25)
    # Without unseen tasks MIF is the seen final row alone: 2.5 / 3
    assert instruction_following_metrics(SEEN_IF)["MIF"] == pytest.approx(2.5 / 3)


def test_mif_counts_each_dataset_once():
    # The two unseen columns are one dataset (0- and 5-shot): its IF is (0 + 0.75) / 2 = 0.375, and
    # MIF = (1 + 0.5 + 1 + 0.375) / 4 = 0.71875 instead of the per-column 0.65.
    m = instruction_following_metrics(SEEN_IF, UNSEEN_IF, unseen_datasets=["scene", "scene"])
    assert m["MIF"] == pytest.approx(0.71875)
    assert instruction_following_metrics(SEEN_IF, UNSEEN_IF, unseen_datasets=["a", "b"])["MIF"] == pytest.approx(0.65)
    with pytest.raises(ValueError, match="1 dataset names for 2 unseen columns"):
        instruction_following_metrics(SEEN_IF, UNSEEN_IF, unseen_datasets=["scene"])


def test_last_format_floor_golden():
    # Last task answers `short`: datasets letter (0 %), short (100 %), half short half json (50 %) -> 50
    assert last_format_floor([["letter"] * 4, ["short"] * 3, ["short", "json"]], {"short"}) == pytest.approx(50.0)
    # cvit-v2's nine datasets, vqa last: relation, vqa and unanswerable answer short -> 3 / 9
    v2 = [["letter"], ["json"], ["sentence"], ["uppercase"], ["short"], ["short"], ["short"], ["sentence"], ["uppercase"]]
    assert last_format_floor(v2, {"short"}) == pytest.approx(100 / 3)


def test_nap_golden():
    # chance 25 / ceiling 100: (62.5 - 25) / 75 = 50 %; chance 80 / ceiling 400 (CIDEr): (240 - 80) / 320 = 50 %;
    # chance 10 / ceiling 100 at chance: 0 % -> nAP = (50 + 50 + 0) / 3 = 33.33
    assert normalized_average_performance([62.5, 240.0, 10.0], [25.0, 80.0, 10.0], [100.0, 400.0, 100.0]) == pytest.approx(100 / 3)
    # below chance is negative: (0 - 20) / 80 = -25 %
    assert normalized_average_performance([0.0], [20.0], [100.0]) == pytest.approx(-25.0)
    with pytest.raises(ValueError, match="ceiling must exceed"):
        normalized_average_performance([1.0], [50.0], [50.0])
    m = all_metrics({"seen": {"vu": R}}, chance=[10.0, 20.0, 30.0], ceiling=[100.0, 100.0, 100.0])
    # final row (50, 70, 95): (40/90 + 50/80 + 65/70) / 3 x 100 = 66.57
    assert m["nAP"] == pytest.approx(100 * (40 / 90 + 50 / 80 + 65 / 70) / 3)


def test_bootstrap_interval_is_fixed_by_its_seed_and_brackets_the_mean():
    values = np.r_[np.ones(30), np.zeros(70)]
    low, high = bootstrap_interval(values)
    assert (low, high) == bootstrap_interval(values) and low < 0.3 < high
    # the binomial standard error is sqrt(0.3 * 0.7 / 100) = 0.0458, so the 95 % interval spans about 2 x 1.96 x 0.0458 = 0.18
    assert high - low == pytest.approx(0.18, abs=0.03)
    assert bootstrap_interval([0.4] * 10) == pytest.approx((0.4, 0.4))
    assert all(math.isnan(v) for v in bootstrap_interval([]))


def test_unseen_if_must_have_the_seen_stage_rows():
    with pytest.raises(ValueError, match="unseen IF matrix"):
        instruction_following_metrics(SEEN_IF, UNSEEN_IF[:3])


def test_unseen_and_heldout_metrics_golden():
    # unseen_AP = nanmean(40, NaN, 60) = 50
    assert unseen_metrics([[1.0, 2.0, 3.0], [40.0, NAN, 60.0]]) == {"unseen_AP": pytest.approx(50.0)}
    heldout = R - 10.0
    heldout[3, 2] = 65.0  # final row (40, 60, 65): heldout AP = 165 / 3 = 55
    m = heldout_metrics(R, heldout)
    assert m["heldout_AP"] == pytest.approx(55.0)
    # gap = 215 / 3 - 55 = 71.6667 - 55 = 16.6667
    assert m["robustness_gap"] == pytest.approx(215 / 3 - 55.0)
    with pytest.raises(ValueError, match="differs"):
        heldout_metrics(R, np.zeros((3, 2)))


def test_all_metrics_combines_every_group():
    unseen_vu = np.array([[5.0], [6.0], [7.0], [8.0]])
    m = all_metrics(
        {
            "seen": {"vu": R, "if": SEEN_IF, "strict": R / 2},
            "unseen": {"vu": unseen_vu, "if": UNSEEN_IF},
            "heldout": {"vu": R - 5.0, "if": SEEN_IF},
        }
    )
    assert set(m) == {
        "AP", "MAP", "MFT", "BWT", "forgetting", "FWT", "MIF", "IF-AP", "IF-MAP", "IF-BWT",
        "unseen_AP", "heldout_AP", "robustness_gap", "MFN", "MAA",
    }  # fmt: skip
    assert m["AP"] == pytest.approx(215 / 3)
    assert m["MIF"] == pytest.approx(0.65)
    assert m["unseen_AP"] == pytest.approx(8.0)
    # every final entry 5 lower: heldout AP = 215 / 3 - 5, gap = 5
    assert m["heldout_AP"] == pytest.approx(215 / 3 - 5.0)
    assert m["robustness_gap"] == pytest.approx(5.0)


def test_all_metrics_with_seen_vu_only():
    m = all_metrics({"seen": {"vu": R}})
    assert set(m) == {"AP", "MAP", "MFT", "BWT", "forgetting", "FWT", "MFN", "MAA"}


def test_field_names_follow_reference_field_definitions_on_the_golden_matrix():
    m = all_metrics({"seen": {"vu": R}})
    # MFN = mean_j A[T][j] = (50 + 70 + 95) / 3; MAA = mean_t mean_{j<=t} A[t][j] = (80 + 87.5 + 215 / 3) / 3
    assert m["MFN"] == m["AP"] == pytest.approx(215 / 3)
    assert m["MAA"] == m["MAP"] == pytest.approx((80 + 87.5 + 215 / 3) / 3)


def test_field_names_are_derived_only_from_what_a_result_has():
    assert with_field_names({"AP": 1.0, "MAP": None}) == {"AP": 1.0, "MAP": None, "MFN": 1.0, "MAA": None}
    assert with_field_names({"MIF": 2.0}) == {"MIF": 2.0}


def test_all_metrics_rejects_unseen_with_other_stage_count():
    with pytest.raises(ValueError, match="unseen VU matrix"):
        all_metrics({"seen": {"vu": R}, "unseen": {"vu": np.zeros((3, 2))}})
