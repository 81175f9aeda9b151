"""The model card in a real browser: Debian's Chromium, headless, driven by Playwright.

The report of a small run (with the cross-site evaluation's file and three shared explanation maps)
is opened from disk: every section heading shows, every embedded image decodes, nothing is fetched
from anywhere, and a full-page screenshot goes to ``test-artifacts/model-card.png``. Then the
dashboard over the same run store: the runs list links to the model card, and so does the run page.
Printing the PDF (another Chromium start) is a ``slow`` test.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from medfed.server.dashboard.app import create_app, serve_in_background
from medfed.server.report import REPORT_SECTIONS, write_pdf, write_report
from medfed.server.store import RunStore, StoreSink
from tests.support.dashboard_support import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, TOKEN, chromium_missing
from tests.support.report_support import make_run, write_cross_site, write_explanations

_MISSING = chromium_missing()
pytestmark = pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    runs = tmp_path_factory.mktemp("report-browser") / "runs"
    run = make_run(runs, sink=StoreSink(RunStore(f"sqlite:///{runs / 'medfed.db'}", create=True)))
    write_cross_site(run)
    write_explanations(run / "explanations", count=3)
    return run


def test_the_model_card_opens_in_chromium_and_the_dashboard_links_to_it(run: Path, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    card = write_report(run, out=tmp_path / "model-card.html",
                        intended_use="Research: second reader for benign vs malignant lesions; not for diagnosis.")
    ARTIFACTS.mkdir(exist_ok=True)
    requests: list[str] = []
    problems: list[str] = []
    store = RunStore(f"sqlite:///{run.parent / 'medfed.db'}")
    try:
        with serve_in_background(create_app(store=store, token=TOKEN)) as server, sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.on("request", lambda r: requests.append(r.url))
                page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
                page.goto(card.as_uri())
                _check_card(page, expect)
                page.screenshot(path=str(ARTIFACTS / "model-card.png"), full_page=True)
                assert requests == [card.as_uri()], requests  # the page itself; everything else is inline

                # The dashboard: the runs list and the run page link to the run's model card.
                page.goto(f"{server.url}/?token={TOKEN}")
                row = page.locator(f"tr.run-row[data-run='{run.name}']")
                expect(row).to_have_count(1)
                row.locator("a.report-link").click()
                page.wait_for_url(f"**/runs/{run.name}/report")
                expect(page.locator("section > h2")).to_have_count(len(REPORT_SECTIONS))
                page.goto(f"{server.url}/runs/{run.name}")
                link = page.locator("#report-link")
                expect(link).to_have_attribute("href", f"/runs/{run.name}/report")
                link.click()
                page.wait_for_url(f"**/runs/{run.name}/report")
                expect(page.locator("h1")).to_contain_text("Model card")
            finally:
                browser.close()
    finally:
        store.close()
    assert not problems, problems
    assert (ARTIFACTS / "model-card.png").stat().st_size > 50_000


@pytest.mark.slow  # a second Chromium start (~3 s on the shared CI machine)
def test_the_model_card_prints_to_pdf_with_chromium(run: Path, tmp_path: Path) -> None:
    card = write_report(run, out=tmp_path / "model-card.html", calibrate=False)
    assert write_pdf(card, tmp_path / "model-card.pdf") == "chromium"
    pdf = (tmp_path / "model-card.pdf").read_bytes()
    assert pdf.startswith(b"%PDF") and len(pdf) > 20_000


def _check_card(page, expect) -> None:
    headings = page.locator("section > h2")
    expect(headings).to_have_count(len(REPORT_SECTIONS))
    assert headings.all_text_contents() == [title for _, title in REPORT_SECTIONS]
    for sid, _ in REPORT_SECTIONS:
        expect(page.locator(f"section#{sid}")).to_be_visible()
    images = page.locator("img")
    expect(images).to_have_count(5)  # the curve, the reliability diagram, three explanation maps
    for i in range(images.count()):
        assert images.nth(i).evaluate("img => img.complete && img.naturalWidth > 0"), f"image {i} did not decode"
    expect(page.locator("section#explanations figure")).to_have_count(3)
    expect(page.locator("section#subgroup-metrics tbody tr")).to_have_count(2)
