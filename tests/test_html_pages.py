"""The HTML leaderboard pages: what they list and link, that they stand alone, and (in headless Chromium) that they sort."""
from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

import pytest
from headless import Browser, find_chromium
from typer.testing import CliRunner

from cvit_bench.cli import app
from cvit_bench.io import atomic_write_json, read_json
from cvit_bench.reporting.heatmaps import NOT_EVALUATED_COLOUR, heatmap_svg
from cvit_bench.reporting.html import write_pages
from cvit_bench.reporting.leaderboard import find_results

SUITE = "cvit-v1-smoke"
TASKS = ["mcq", "ocr"]
# method -> per-seed (AP, MAP, BWT); AP order replay > seqlora > ewc, BWT order ewc > replay > seqlora.
RUNS = {"seqlora": [(60.0, 70.0, -20.0), (64.0, 72.0, -10.0)], "replay": [(70.0, 75.0, -5.0)], "ewc": [(50.0, 55.0, -1.0)]}


def result(method: str, seed: int, ap: float, map_: float, bwt: float) -> dict:
    """A complete results.json as written before MFN and MAA existed: AP and MAP only."""
    return {
        "schema_version": 1,
        "run_info": {
            "suite": SUITE, "method": method, "method_config": {}, "seed": seed, "task_order": TASKS,
            "unseen_tasks": [], "heldout_tasks": [], "base_checkpoint_hash": "b", "data_recipe_hash": "r",
            "config_hash": "c", "config": {}, "status": "complete",
        },
        "matrices": {"seen": {"vu": [[10.0, 5.0], [90.0, None], [ap - 5, ap + 5]], "if": [[50.0, 20.0], [95.0, 10.0], [30.0, 99.0]]}},
        "metrics": {"AP": ap, "MAP": map_, "MFT": 80.0, "BWT": bwt},
        "timings": {"total_s": 120.0},
    }


@pytest.fixture
def site(tmp_path) -> Path:
    """The report's output directory for RUNS, written by the CLI as users run it."""
    for method, seeds in RUNS.items():
        for seed, values in enumerate(seeds):
            atomic_write_json(tmp_path / "results" / SUITE / method / f"seed{seed}" / "results.json", result(method, seed, *values))
    outcome = CliRunner().invoke(app, ["report", "--results-dir", str(tmp_path / "results"), "--out-dir", str(tmp_path / "site"), "--no-heatmaps"])
    assert outcome.exit_code == 0, outcome.output
    return tmp_path / "site"


class Tables(HTMLParser):
    """Each table's rows as cell texts, and every href and external-resource attribute of the document."""

    def __init__(self, text: str):
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.hrefs: list[str] = []
        self.resources: list[str] = []
        self._cell: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.hrefs += [attrs["href"]] if "href" in attrs else []
        self.resources += [f"{tag} {name}" for name in ("src", "srcset") if name in attrs] + (["link"] if tag == "link" else [])
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append(" ".join("".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def test_page_lists_every_method_best_ap_first_with_the_field_names_and_links_to_each_seeds_results(site):
    page = Tables((site / f"{SUITE}.html").read_text())
    header, *rows = page.tables[0]
    assert [row[0] for row in rows] == ["replay", "seqlora", "ewc"]
    assert header[:4] == ["method", "seeds", "AP = MFN", "MAP = MAA"] and "MFT" in header and "BWT" in header
    seqlora = rows[1]
    assert seqlora[1] == "2" and seqlora[2] == "62.00 ± 2.83" and seqlora[3] == "71.00 ± 1.41" and seqlora[-1] == "seed 0 seed 1"
    links = [href for href in page.hrefs if href.endswith("results.json")]
    assert len(links) == 4 and all(read_json(site / link)["run_info"]["suite"] == SUITE for link in links)
    assert f"{SUITE}.csv" in page.hrefs and "index.html" in page.hrefs


def test_pages_stand_alone_without_network_or_other_files(site):
    for path in site.glob("*.html"):
        text = path.read_text()
        page = Tables(text)
        assert page.resources == [], path.name
        assert "://" not in text and "@import" not in text and "url(" not in text, path.name
        assert all(not Path(href).is_absolute() for href in page.hrefs), path.name


def test_heatmaps_show_each_methods_mean_matrix_over_its_seeds(site):
    text = (site / f"{SUITE}.html").read_text()
    assert text.count("<svg") == 2 * len(RUNS)  # VU and IF per method
    # seqlora's final row is [AP - 5, AP + 5] per seed: means of (55, 59) and (65, 69)
    assert "<title>VU score, seen tasks, seqlora, mean over seeds 0, 1</title>" in text and ">57.0<" in text and ">67.0<" in text


def test_index_lists_every_leaderboard_page(site):
    index = Tables((site / "index.html").read_text())
    assert index.tables[0][1][:5] == [SUITE, SUITE, "default", "3", "4"]
    assert f"{SUITE}.html" in index.hrefs


def test_leaderboard_csv_carries_mfn_and_maa_derived_from_results_that_predate_them(site):
    header, *lines = [line.split(",") for line in (site / f"{SUITE}.csv").read_text().splitlines()]
    seqlora = dict(zip(header, lines[1]))
    assert (seqlora["MFN_mean"], seqlora["MFN_std"], seqlora["MAA_mean"]) == (seqlora["AP_mean"], seqlora["AP_std"], seqlora["MAP_mean"]) == ("62.00", "2.83", "71.00")


def test_a_leaderboard_named_index_is_refused(tmp_path):
    run = result("seqlora", 0, 1.0, 1.0, 0.0)
    run["run_info"]["suite"] = "index"
    atomic_write_json(tmp_path / "results" / "index" / "seqlora" / "seed0" / "results.json", run)
    with pytest.raises(ValueError, match="overwrite the index page"):
        write_pages(find_results(tmp_path / "results"), tmp_path / "site", {})


def test_heatmap_svg_greys_unevaluated_cells_and_writes_each_value():
    svg = heatmap_svg([[1.0, None], [2.5, 4.0]], ["stage 0", "stage 1"], TASKS, "VU <seqlora>")
    assert svg.count("<rect") == 4 and svg.count(f'fill="{NOT_EVALUATED_COLOUR}"') == 1
    assert ">2.5<" in svg and ">4.0<" in svg and "<title>VU &lt;seqlora&gt;</title>" in svg


CHROMIUM = find_chromium()


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on PATH (chromium, chromium-browser, google-chrome): "
                    "`apt-get install chromium` (.ci/run does) to run the page in a browser")
def test_page_in_headless_chromium_lists_the_rows_and_sorts_by_a_clicked_header(site, tmp_path):
    rows = "Array.from(document.querySelector('table.sortable').tBodies[0].rows, r => r.cells[0].textContent)"
    with Browser(CHROMIUM, tmp_path / "profile") as browser:
        page = browser.open((site / f"{SUITE}.html").as_uri())
        assert page.evaluate(rows) == ["replay", "seqlora", "ewc"]
        bwt = "table.sortable thead th:nth-child(6) button"
        assert page.evaluate(f"document.querySelector('{bwt}').textContent") == "BWT"
        page.click(bwt)
        assert page.evaluate(rows) == ["ewc", "replay", "seqlora"]  # BWT -1, -5, -15: high to low on the first click
        assert page.evaluate("document.querySelector('table.sortable thead th:nth-child(6)').getAttribute('aria-sort')") == "descending"
        page.click(bwt)
        assert page.evaluate(rows) == ["seqlora", "replay", "ewc"]
        shot = page.screenshot(tmp_path / "leaderboard.png")
    assert shot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and shot.stat().st_size > 10_000
