"""Claims decided from leaderboard rows (reporting/claims.py) and shown on the suite's HTML page."""
from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

from cvit_bench.methods import METHODS
from cvit_bench.registry import ConfigError
from cvit_bench.reporting.claims import Claim, Comparison, claims_table, comparison_verdict, load_claims
from cvit_bench.reporting.html import write_pages
from cvit_bench.reporting.power import detectable_difference

# Every std is 2, so the pooled seed std is 2; with 3 seeds (df 4) the detectable difference is
# (t_0.975 + t_0.8) * 2 * sqrt(2/3) = (2.7764 + 0.9410) * 1.6330 = 6.07.
BOARD = pd.DataFrame({"method": ["a", "b", "c"], "AP_mean": [70.0, 60.0, 66.0], "AP_std": [2.0, 2.0, 2.0],
                      "forgetting_mean": [5.0, 20.0, 8.0], "forgetting_std": [2.0, 2.0, 2.0], "n_seeds": [3, 3, 3]})


def test_the_detectable_difference_is_the_t_test_bound_of_the_pooled_seed_std():
    difference, n_seeds = detectable_difference(BOARD, "AP")
    assert n_seeds == 3 and difference == pytest.approx((2.7764 + 0.9410) * 2 * (2 / 3) ** 0.5, abs=0.01)


@pytest.mark.parametrize(("comparison", "verdict"), [
    (Comparison("a", "b", "AP"), "holds"),  # +10 >= 6.07
    (Comparison("c", "a", "AP"), "not shown"),  # -4: inside the detectable difference
    (Comparison("c", "b", "AP"), "not shown"),  # +6 < 6.07
    (Comparison("b", "a", "AP"), "does not hold"),  # -10
    (Comparison("a", "b", "forgetting", "lower"), "holds"),  # 5 below 20: lower is better
    (Comparison("b", "a", "forgetting", "lower"), "does not hold"),
    (Comparison("a", "z", "AP"), "not run"),  # no row
    (Comparison("a", "b", "MIF"), "not run"),  # no such metric
])
def test_a_comparison_holds_only_beyond_what_the_seeds_detect(comparison, verdict):
    assert comparison_verdict(comparison, BOARD)[0] == verdict


def test_a_claim_fails_with_one_failed_comparison_and_holds_only_when_all_hold():
    claims = [Claim("a best", "x", (Comparison("a", "b", "AP"), Comparison("a", "c", "AP"))),
              Claim("a beats b, b beats a", "x", (Comparison("a", "b", "AP"), Comparison("b", "a", "AP"))),
              Claim("a beats b and an absent z", "x", (Comparison("a", "b", "AP"), Comparison("a", "z", "AP"))),
              Claim("a forgets least", "x", (Comparison("a", "b", "forgetting", "lower"),))]
    table = claims_table(claims, BOARD)
    assert list(table["verdict"]) == ["not shown", "does not hold", "not run", "holds"]
    assert "a AP 70.0 vs b 60.0" in table["evidence"][0]


def test_one_seed_shows_no_claim():
    one_seed = BOARD.assign(n_seeds=1)
    verdict, evidence = comparison_verdict(Comparison("a", "b", "AP"), one_seed)
    assert verdict == "not shown" and "fewer than two seeds" in evidence


def test_shipped_claims_name_registered_methods_and_metrics_the_leaderboard_has():
    board = pd.read_csv(Path(__file__).parents[1] / "leaderboards" / "cvit-v1.csv")
    claims = load_claims("cvit-v1")
    assert claims and load_claims("cvit-v2") == claims and load_claims("coin") == []
    for claim in claims:
        for comparison in claim.compare:
            assert {comparison.method, comparison.than} <= set(METHODS.names())
            assert f"{comparison.metric}_mean" in board.columns
    assert "not run" not in set(claims_table(claims, board)["verdict"])  # cvit-v1 has every method's row


@pytest.mark.parametrize(("text", "field"), [
    ("suites: [s]\nclaims:\n  - {statement: x, source: y, compare: [{method: a, than: b, metric: AP, better: up}]}\n",
     "claims[0].compare[0].better"),
    ("suites: [s]\nclaims:\n  - {statement: x, compare: [{method: a, than: b, metric: AP}]}\n", "claims[0].source"),
    ("claims: []\n", "expected the keys suites"),
])
def test_a_bad_claims_file_names_its_file_and_field(tmp_path, text, field):
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(ConfigError, match=f"bad.yaml: .*{re.escape(field)}"):
        load_claims("s", tmp_path)


class Cells(HTMLParser):
    """The text of every table cell, per table."""

    def __init__(self, text: str):
        super().__init__()
        self.tables: list[list[str]] = []
        self._cell: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "td":
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.tables[-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def run(method: str, seed: int, ap: float) -> dict:
    return {"schema_version": 1,
            "run_info": {"suite": "s", "method": method, "method_config": {}, "seed": seed, "task_order": ["t"],
                         "unseen_tasks": [], "heldout_tasks": [], "base_checkpoint_hash": "b", "data_recipe_hash": "r",
                         "config_hash": "c", "config": {}, "status": "complete"},
            "metrics": {"AP": ap}, "timings": {"total_s": 60.0}, "results_path": f"/x/{method}/{seed}/results.json"}


def test_the_suite_page_shows_its_claims_decided_from_its_rows(tmp_path):
    (tmp_path / "claims").mkdir()
    (tmp_path / "claims" / "papers.yaml").write_text(
        "suites: [s]\nclaims:\n  - {statement: Replay beats sequential LoRA., source: a paper, "
        "compare: [{method: replay, than: seqlora, metric: AP}]}\n")
    results = [run("replay", seed, ap) for seed, ap in enumerate((70.0, 72.0, 71.0))]
    results += [run("seqlora", seed, ap) for seed, ap in enumerate((40.0, 45.0, 41.0))]
    pages = write_pages(results, tmp_path / "site", {}, claims_folder=tmp_path / "claims")
    claims = Cells(pages["s"].read_text()).tables[1]
    assert claims[:3] == ["Replay beats sequential LoRA.", "a paper", "holds"]
    assert "replay AP 71.0 vs seqlora 42.0" in claims[3]
