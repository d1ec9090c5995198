"""Seen in a real browser: the report and the MLflow UI in headless Chromium.

The browser is the system's (Debian's chromium and chromium-driver), driven by selenium with
both paths given, so nothing is downloaded. Without a browser these tests skip and say how
to get one; under CI (CI=true) they fail instead, so a green CI means they ran.
"""

from __future__ import annotations

import os
import re
import shutil
import sys

import pytest
from mlflow import MlflowClient

from forgetless.experiments.cli import main

pytestmark = pytest.mark.integration  # starts a browser

HOW = (
    "browser tests need Chromium and ChromeDriver: `apt-get install chromium chromium-driver` "
    "on Debian or Ubuntu (`python3 bootstrap.py test` does it where it can), and selenium "
    "(the dev extra)"
)


def unavailable(reason: str):
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason}; {HOW}. CI must run the browser tests.", pytrace=False)
    pytest.skip(f"{reason}; {HOW}")


@pytest.fixture(scope="session")  # before the session grid: a skip costs nothing
def browser(tmp_path_factory):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = shutil.which("chromedriver")
    if not (chromium and chromedriver):
        unavailable(f"no chromium / chromedriver on PATH ({chromium}, {chromedriver})")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        unavailable("selenium is not installed")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    profile = tmp_path_factory.mktemp("chromium-profile")
    # Headless as root in a container, and no calls home: this machine has no network.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--window-size=1400,1000",
                 f"--user-data-dir={profile}"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    yield driver
    driver.quit()


def wait(driver, condition, seconds: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, seconds, poll_frequency=0.5).until(condition)


def test_report_images_decode_and_its_table_renders_in_chromium(browser, finished_grid, tmp_path):
    uri, name = finished_grid
    out = tmp_path / "report.html"
    assert main(["report", name, "--tracking-uri", uri, "--out", str(out)]) == 0
    browser.get(out.as_uri())
    wait(browser, lambda d: d.execute_script("return document.readyState") == "complete")
    images = browser.execute_script(
        "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth]);"
    )
    assert len(images) == 5
    for alt, complete, width in images:
        assert complete and width > 0, f"image {alt} did not decode"
    rows = browser.execute_script(
        "return Array.from(document.querySelectorAll('section#table tbody tr'))"
        ".map(r => [r.offsetHeight, Array.from(r.cells).map(c => c.innerText)]);"
    )
    assert [cells[0:2] for _, cells in rows] == [["split_digits", s] for s in _order(uri, name)]
    assert all(height > 0 for height, _ in rows)
    bold = browser.execute_script(
        "return Array.from(document.querySelectorAll('section#table td.best'))"
        ".map(c => getComputedStyle(c).fontWeight);"
    )
    assert bold and all(int(weight) >= 600 for weight in bold)


def _order(uri: str, name: str) -> list[str]:
    """Strategies by final average accuracy, best first: the report's row order."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    groups = client.search_runs([experiment.experiment_id], "tags.`forgetless.role` = 'group'")
    groups.sort(key=lambda r: -r.data.metrics["final/avg_acc_mean"])
    return [r.data.tags["forgetless.strategy"] for r in groups]


def forgetless_ui(serve, uri: str, name: str, tmp_path) -> tuple[str, str]:
    """`forgetless ui NAME` served on a free port: its base URL and what it printed."""
    command = [sys.executable, "-m", "forgetless.experiments.cli", "ui", name,
               "--tracking-uri", uri, "--port", "{port}"]  # fmt: skip
    base, stdout = serve(command, tmp_path)
    return base, stdout.read_text()


def test_mlflow_ui_started_by_forgetless_ui_shows_the_grid_runs(browser, finished_grid, serve,
                                                                tmp_path):  # fmt: skip
    from selenium.webdriver.common.by import By

    uri, name = finished_grid
    base, printed = forgetless_ui(serve, uri, name, tmp_path)
    match = re.search(r"MLflow UI on \S+: (\S+)", printed)
    assert match and match.group(1).startswith(base + "/#/experiments/"), printed

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    runs = client.search_runs([experiment.experiment_id])
    by_role = {role: [r.info.run_id for r in runs if r.data.tags["forgetless.role"] == role]
               for role in ("grid", "group", "cell")}  # fmt: skip
    (parent,) = by_role["grid"]
    assert len(by_role["group"]) == 2 and len(by_role["cell"]) == 4

    def linked_run_ids(driver) -> set[str]:
        hrefs = driver.execute_script(
            "return Array.from(document.querySelectorAll('a[href*=\"/runs/\"]')).map(a => a.href);"
        )
        return {href.rsplit("/runs/", 1)[1].split("?")[0] for href in hrefs}

    def expand(run_id: str) -> None:
        """Click the expander of the run's row: its nested runs appear below it."""
        name_cell = browser.find_element(
            By.XPATH, '//*[@role="gridcell"][@col-id="attributes.`Run Name`"]'
            f'[.//a[contains(@href, "/runs/{run_id}")]]',
        )  # fmt: skip
        name_cell.find_element(By.TAG_NAME, "button").click()

    browser.get(match.group(1))
    # The runs table shows the grid's parent run, the seed groups nested under it, and each
    # group's cells nested under the group.
    wait(browser, lambda d: parent in linked_run_ids(d))
    assert not set(by_role["group"] + by_role["cell"]) & linked_run_ids(browser)
    expand(parent)
    wait(browser, lambda d: set(by_role["group"]) <= linked_run_ids(d))
    assert not set(by_role["cell"]) & linked_run_ids(browser)
    for group in by_role["group"]:
        expand(group)
    wait(browser, lambda d: set(by_role["cell"]) <= linked_run_ids(d))


@pytest.fixture(scope="module")
def baselines_grid(make_grid, tmp_path_factory) -> tuple[str, str]:
    """(tracking URI, grid name): naive, cumulative and rehearsal x 4 seeds, 12 cells. The
    MLflow UI shows the first ten runs and hides the rest; ungrouped, those are the first
    cells the grid created, naive's."""
    from forgetless.experiments.runner import run_grid

    uri = f"sqlite:///{tmp_path_factory.mktemp('baselines-grid') / 'mlflow.db'}"
    rehearsal = {"name": "rehearsal", "buffer": {"size": 20}}
    grid = make_grid(name="baselines", seeds=[0, 1, 2, 3],
                     strategies=["naive", "cumulative", rehearsal])  # fmt: skip
    assert {o.status for o in run_grid(grid, uri)} == {"FINISHED"}
    return uri, grid.name


def test_charts_link_of_forgetless_ui_shows_every_strategy_grouped(browser, baselines_grid, serve,
                                                                    tmp_path):  # fmt: skip
    uri, name = baselines_grid
    _, printed = forgetless_ui(serve, uri, name, tmp_path)
    match = re.search(r"the cells' charts by strategy \(mean and band over seeds\): (\S+)", printed)
    assert match, printed
    strategies = ["naive", "cumulative", "rehearsal"]

    def page_text(driver) -> str:
        return driver.execute_script("return document.body.innerText")

    def first_chart(driver) -> str:
        return driver.execute_script(
            "const card = document.querySelector("
            "'[data-testid=experiment-view-compare-runs-card]'); return card ? card.innerText : '';"
        )

    browser.get(match.group(1))
    # Grouped by strategy: a group row per strategy holding its four seeds' cells (not the
    # group runs they nest under), and the first chart, final average accuracy, has a bar
    # per strategy.
    wait(browser, lambda d: all(f"Group: {s}" in page_text(d) for s in strategies))
    wait(browser, lambda d: first_chart(d).startswith("final/avg_acc"))
    legend = first_chart(browser).splitlines()
    assert all(s in legend for s in strategies), legend
    assert "12 matching runs" in page_text(browser)
    sections = browser.execute_script(
        "return Array.from(document.querySelectorAll("
        "'[data-testid=experiment-view-compare-runs-section-header]')).map(h => h.innerText);"
    )
    assert [s.split()[0] for s in sections[:3]] == ["final", "Model", "acc"], sections
    assert browser.execute_script("return new URLSearchParams(location.hash.split('?')[1])"
                                  ".get('compareRunsMode')") == "CHART"  # fmt: skip
    # Nothing hidden: every row's visibility toggle is on, groups and runs alike.
    shown = browser.execute_script(
        "return Array.from(document.querySelectorAll('input.is-visibility-toggle-checkbox'))"
        ".map(i => i.checked);"
    )
    assert shown and all(shown), shown
    assert "Unhide" not in page_text(browser)
