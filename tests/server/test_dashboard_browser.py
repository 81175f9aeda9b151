"""The dashboard in a real browser: Debian's Chromium, headless, driven by Playwright.

A small DP federation runs on Flower's simulation engine and writes the default run store under
its run folder; the dashboard serves that store on 127.0.0.1. The browser (on its own thread)
opens the dashboard with the token, sees the run appear, opens it and watches its round counter
advance without reloading, then checks the finished run: a metric chart with one point per
round, one table row per site, and the epsilon bars. Screenshots go to ``test-artifacts/``.

Rounds of this tiny federation can take well under the page's 1.5 s refresh, so the server
waits (in its ``on_round`` hook, after the round is in the store) until the browser has shown
that round before it starts the next: the page still has to pick each change up on its own.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from medfed.server.dashboard.app import create_app, serve_in_background
from medfed.server.dashboard.read_models import RunReader
from medfed.server.run_dir import RoundRecord
from medfed.server.server_app import ServerHooks
from medfed.server.store import RunStore
from medfed.simulations.simulate import run_federated
from tests.support.dashboard_support import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, TOKEN, chromium_missing, small_config

_MISSING = chromium_missing()
pytestmark = pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")

ROUNDS = 3
WAIT_S = 300


def test_a_live_run_in_chromium(tmp_path: Path) -> None:
    cfg = small_config(tmp_path / "runs", rounds=ROUNDS)
    store = RunStore(cfg.store_url)
    ARTIFACTS.mkdir(exist_ok=True)
    shown = {n: threading.Event() for n in range(1, ROUNDS + 1)}
    on_runs_page = threading.Event()
    failures: list[BaseException] = []
    problems: list[str] = []
    seen: list[int] = []

    def release_all() -> None:
        on_runs_page.set()
        for event in shown.values():
            event.set()

    def browse(url: str) -> None:
        from playwright.sync_api import expect, sync_playwright

        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                try:
                    page = browser.new_page(viewport={"width": 1400, "height": 1000})
                    page.on("pageerror", lambda err: problems.append(f"page error: {err}"))
                    page.on("console", lambda m: problems.append(f"console: {m.text}") if m.type == "error" else None)
                    _watch(page, expect, url)
                finally:
                    browser.close()
        except BaseException as err:  # noqa: BLE001 - re-raised on the test's thread
            failures.append(err)
        finally:
            release_all()

    def _watch(page, expect, url: str) -> None:
        page.goto(f"{url}/?token={TOKEN}")
        assert page.url == f"{url}/"  # the token moved into a cookie, out of the address bar
        expect(page.locator("#runs-empty")).to_be_visible()
        on_runs_page.set()
        row = page.locator("tr.run-row")
        expect(row).to_have_count(1, timeout=WAIT_S * 1000)  # the new run appears on the live list
        row.locator("td:first-child a").click()  # the run (the last cell links its model card)
        page.wait_for_url("**/runs/**")
        page.evaluate("window.__sameDocument = true")  # lost if the page ever reloads
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            text = page.locator("#round-counter").text_content() or ""
            if text.isdigit() and (not seen or seen[-1] != int(text)):
                seen.append(int(text))
                if int(text) in shown:
                    shown[int(text)].set()
            if page.locator("#run-status").text_content() == "finished":
                break
            page.wait_for_timeout(100)
        assert page.evaluate("window.__sameDocument === true"), "the page reloaded"
        expect(page.locator("#run-status")).to_have_text("finished")
        expect(page.locator("#round-total")).to_have_text(str(ROUNDS))

        # A rendered metric chart with one point per round.
        expect(page.locator("#chart-auc .scatterlayer .trace .points path")).to_have_count(ROUNDS)
        expect(page.locator("#chart-loss .scatterlayer .trace .points path")).to_have_count(ROUNDS)
        assert page.locator("#chart-auc .main-svg").first.bounding_box()["width"] > 200

        # One row per site, each with an epsilon bar filled in proportion to its budget.
        sites = page.locator("tr.site-row")
        expect(sites).to_have_count(2)
        names = [sites.nth(i).get_attribute("data-site") for i in range(2)]
        assert names == ["site-0", "site-1"]
        spent = {s["site"]: s for s in RunReader(store).sites(RunReader(store).list_runs()[0]["id"])}
        bars = page.locator("tr.site-row .eps-bar")
        expect(bars).to_have_count(2)
        for i, name in enumerate(names):
            ratio = spent[name]["epsilon"] / spent[name]["budget_epsilon"]
            assert 0 < ratio < 1
            bar = bars.nth(i).bounding_box()
            fill = bars.nth(i).locator(".eps-fill").bounding_box()
            assert fill["width"] == pytest.approx(ratio * bar["width"], abs=2.0)

        expect(page.locator("#chart-fairness .scatterlayer .trace")).to_have_count(2)
        # The sites' cross-site evaluation of the final model: one row per site (no metadata: no subgroups).
        cross = page.locator("tr.cross-site-row")
        expect(cross).to_have_count(2)
        assert [cross.nth(i).get_attribute("data-site") for i in range(2)] == ["site-0", "site-1"]
        expect(page.locator("tr.cross-site-subgroup")).to_have_count(0)
        expect(page.locator("tr.event-row[data-kind='run-finished']")).to_have_count(1)
        page.screenshot(path=str(ARTIFACTS / "dashboard-run.png"), full_page=True)
        page.goto(f"{url}/")
        expect(page.locator("tr.run-row .badge")).to_have_text("finished")
        page.screenshot(path=str(ARTIFACTS / "dashboard-runs.png"))

    def wait_until_shown(record: RoundRecord) -> None:
        if record.round in shown:
            shown[record.round].wait(timeout=WAIT_S)

    try:
        with serve_in_background(create_app(store=store, token=TOKEN)) as server:
            browser_thread = threading.Thread(target=browse, args=(server.url,), daemon=True)
            browser_thread.start()
            try:
                assert on_runs_page.wait(timeout=120), "the browser did not open the dashboard"
                if not failures:
                    run_federated(cfg, hooks=ServerHooks(on_round=wait_until_shown))
            finally:
                browser_thread.join(timeout=WAIT_S)
    finally:
        store.close()
    if failures:
        raise failures[0]
    assert not browser_thread.is_alive()
    assert [n for n in seen if n > 0] == list(range(1, ROUNDS + 1)), seen  # each round, live, in order
    assert not problems, problems
    assert (ARTIFACTS / "dashboard-run.png").stat().st_size > 10_000
