"""The Glaze grid page in a real browser: Debian's Chromium driven by Playwright (sync API)
against a real `glaze serve` (its launcher, the embedded SQLite default in a temporary
GLAZE_HOME, the seeded Leads table).

A person selects cells, clicks Run and watches the header go Starting… → In Queue… →
Enriching… → Enriched! with the cells filling in, all without a reload; Cancel on a slow job
(mock vendors answering in seconds) ends Cancelled; a signed-out browser is told how to sign in,
and a page whose stream is refused falls back to polling. The browser may reach the server only:
any other request fails the test (nothing on the page loads from the internet).

Chromium (`apt-get install chromium`) and Playwright (the dev extra) are required: without them
these tests fail, they never skip. No `playwright install`: the browser is Debian's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Browser, Page, Route, expect, sync_playwright

from glaze_pipeline.testing.mock_llm import MockLlmServer
from glaze_pipeline.testing.mock_server import MockConfig, MockProviderServer
from glaze_pipeline_tests.api_helpers import served

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
REPO = Path(__file__).resolve().parents[1]
TABLE = "tbl_leads"
JOB_TIMEOUT_MS = 60_000
SLOW_VENDOR_MS = 4000  # every mock vendor answer takes this long: a job with a middle to cut
STATUS_ORDER = ["Starting…", "In Queue…", "Enriching…", "Cancelling…"]

# Records every text the header status shows (a MutationObserver sees each change), and marks
# the document: the mark is gone if the page ever reloads.
WATCH_STATUS = """() => {
  window.__statuses = [];
  window.__sameDocument = true;
  const status = document.querySelector("#job-status");
  new MutationObserver(() => {
    const text = status.textContent;
    if (window.__statuses.at(-1) !== text) window.__statuses.push(text);
  }).observe(status, { childList: true, characterData: true, subtree: true });
}"""


@dataclass
class Server:
    url: str
    log: Path
    api_key: str | None = None

    def get(self, path: str) -> Any:
        """The API's JSON answer to GET `path` (with the key when the server has one)."""
        headers = {"Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url + path, headers=headers)
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


@contextmanager
def glaze_serve(tmp_path: Path, **extra: str) -> Iterator[Server]:
    """`glaze seed` then `glaze serve` (with its launcher) on a free port, as a person runs them."""
    api_key = extra.pop("GLAZE_API_KEYS", None)
    redis_url = extra.pop("GLAZE_REDIS_URL", None)
    extra["COLUMNS"] = "1000"  # the printed login link stays on one line
    with served(
        tmp_path / "glaze_home", api_key=api_key, redis_url=redis_url, extra_env=extra
    ) as server:
        yield Server(url=server.base_url, log=server.log_path, api_key=api_key)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"Debian's Chromium is required at {CHROMIUM}: apt-get install chromium")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@contextmanager
def open_page(browser: Browser, server: Server) -> Iterator[Page]:
    """A fresh browser context that may reach `server` only (any other request fails the test)."""
    context = browser.new_context(viewport={"width": 1920, "height": 620})
    page = context.new_page()
    outside: list[str] = []
    errors: list[str] = []
    server_origin = urlsplit(server.url).netloc

    def only_the_server(route: Route) -> None:
        url = route.request.url
        if urlsplit(url).scheme in ("data", "blob") or urlsplit(url).netloc == server_origin:
            route.continue_()
        else:
            outside.append(url)
            route.abort()

    context.route("**/*", only_the_server)
    page.on("pageerror", lambda error: errors.append(str(error)))
    try:
        yield page
        assert outside == [], f"the page reached outside the server: {outside}"
        assert errors == [], f"the page's script failed: {errors}"
    finally:
        context.close()


def open_grid(page: Page, server: Server) -> None:
    page.goto(f"{server.url}/tables/{TABLE}")
    expect(page.locator("#grid tbody tr[data-row-id]")).to_have_count(10)
    page.evaluate(WATCH_STATUS)


def cell(page: Page, row_id: str, column_key: str) -> Any:
    return page.locator(f'#grid td[data-row-id="{row_id}"][data-column-key="{column_key}"]')


def select_grid(page: Page, columns: list[str], rows: list[str]) -> None:
    for key in columns:
        page.click(f'#grid th[data-column-key="{key}"]')
    for row_id in rows:
        page.click(f'#grid td.rownum[data-row-id="{row_id}"]')


def statuses(page: Page) -> list[str]:
    return list(page.evaluate("() => window.__statuses"))


def assert_moved_forward(seen: list[str], ending: str) -> None:
    """Starting… → In Queue… first, then only forward (Enriching… may be too quick to see)."""
    assert seen[:2] == ["Starting…", "In Queue…"], seen
    assert seen[-1] == ending, seen
    steps = [
        next(i for i, word in enumerate(STATUS_ORDER) if text.startswith(word))
        for text in seen[:-1]
    ]
    assert steps == sorted(steps), seen
    percents = [int(m.group(1)) for text in seen if (m := re.match(r"Enriching… (\d+)%", text))]
    assert percents == sorted(percents) and all(0 <= p <= 100 for p in percents), seen


def save_screenshot(page: Page, tmp_path: Path, name: str) -> Path:
    """The page as a test artifact (and in GLAZE_SCREENSHOT_DIR when that is set)."""
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True, animations="disabled")
    target = os.environ.get("GLAZE_SCREENSHOT_DIR")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(target) / name)
    assert path.stat().st_size > 10_000  # a page, not a blank
    return path


def stored_rows(server: Server) -> dict[str, dict[str, Any]]:
    page = server.get(f"/tables/{TABLE}/rows?limit=500")
    return {row["id"]: row for row in page["items"]}


def run_and_wait(page: Page, ending: str) -> None:
    page.click("#run")
    expect(page.locator("#job-status")).to_have_text(ending, timeout=JOB_TIMEOUT_MS)


# --- the tests ------------------------------------------------------------------------------


def test_run_fills_the_grid_live_and_ends_enriched(
    browser: Browser, tmp_path: Path, redis_url: str
) -> None:
    """Seed 001's flow in the page: industry and employee count of rows 1-3 (6 cells), with an
    estimate first; then three explicit cells, one of a row with no identifier (it fails, and
    the job history shows it). The stream (Redis-fed) fills the cells live."""
    rows = ["row_leads_01", "row_leads_02", "row_leads_03"]
    columns = ["industry", "employee_count"]
    with (
        glaze_serve(tmp_path, GLAZE_REDIS_URL=redis_url) as server,
        open_page(browser, server) as page,
    ):
        open_grid(page, server)
        select_grid(page, columns, rows)
        expect(page.locator("#selection-count")).to_have_text("6 cells selected")
        expect(page.locator("#grid td.cell.selected")).to_have_count(6)

        page.click("#estimate")
        expect(page.locator("#estimate-cost")).to_be_visible(timeout=JOB_TIMEOUT_MS)
        facts = page.locator("#estimate-result dd").all_text_contents()
        assert facts[:2] == ["6", "3"], facts  # 6 cells, 3 companies (cells, unique entities)
        # Three companies, each asked once; expected cost from the stated prior (80 % found,
        # misses free), at most every call charged.
        expect(
            page.locator('#estimate-providers tr[data-provider="fake_company"] td')
        ).to_have_text(["fake_company", "ok", "3", "2.4", "3"])
        expect(page.locator("#estimate-max")).to_have_text("3")
        expect(page.locator("#estimate-guidance")).to_contain_text("cells this job is expected")
        expect(page.locator("#estimate-range")).to_contain_text("About 95% of runs cost")
        title = page.locator('#estimate-providers tr[data-provider="fake_company"]')
        assert "prior" in (title.get_attribute("title") or "")

        run_and_wait(page, "Enriched!")
        assert page.evaluate("() => window.__sameDocument") is True  # never reloaded
        assert_moved_forward(statuses(page), "Enriched!")
        assert page.locator("#job-status").get_attribute("data-transport") == "stream"

        stored = stored_rows(server)
        for row_id in rows:
            expect(page.locator(f'tr[data-row-id="{row_id}"] .chip')).to_have_text("done")
            for key in columns:
                value = stored[row_id]["data"][key]
                assert value not in (None, ""), (row_id, key)
                td = cell(page, row_id, key)
                expect(td).to_have_text(str(value))
                expect(td).to_have_class(re.compile(r"\bcell-done\b"))
                expect(td).to_have_class(re.compile(r"\bjust-filled\b"))  # by a `cells` event
                title = td.get_attribute("title") or ""
                assert "confidence: 0.90" in title and "source: fake_company" in title, title
        expect(cell(page, "row_leads_04", "industry")).to_have_text("")  # not selected

        job = server.get(f"/tables/{TABLE}/enrich/jobs?limit=1")["items"][0]
        assert (job["kind"], job["status"], job["totalTasks"]) == ("enrich", "completed", 6)
        expect(page.locator(f'#jobs tr[data-job-id="{job["jobId"]}"]')).to_have_attribute(
            "data-status", "completed"
        )

        path = save_screenshot(page, tmp_path, "grid.png")
        print(f"screenshot: {path}")

        # Explicit cells, one without any identifier (row 8): a click, ctrl-clicks, Run again.
        page.evaluate("() => { window.__statuses = []; }")
        cell(page, "row_leads_04", "title").click()
        cell(page, "row_leads_05", "linkedin").click(modifiers=["Control"])
        cell(page, "row_leads_08", "industry").click(modifiers=["Control"])
        expect(page.locator("#selection-count")).to_have_text("3 cells selected")
        run_and_wait(page, "Enriched with 1 failed")
        assert_moved_forward(statuses(page), "Enriched with 1 failed")
        assert page.evaluate("() => window.__sameDocument") is True
        stored = stored_rows(server)
        for row_id, key in [("row_leads_04", "title"), ("row_leads_05", "linkedin")]:
            expect(cell(page, row_id, key)).to_have_text(str(stored[row_id]["data"][key]))
        failed = cell(page, "row_leads_08", "industry")
        expect(failed).to_have_class(re.compile(r"\bcell-failed\b"))
        expect(failed).to_have_attribute("title", re.compile(r"error: .*no identifier"))
        expect(page.locator('tr[data-row-id="row_leads_08"] .chip')).to_have_text("failed")

        # The job history lists it (partial) and shows its failed cell.
        job = server.get(f"/tables/{TABLE}/enrich/jobs?limit=1")["items"][0]
        assert (job["state"], job["failedTasks"], job["totalTasks"]) == ("partial", 1, 3)
        page.click(f'#jobs button[data-job-id="{job["jobId"]}"]')
        expect(page.locator("#failed-cells tbody tr")).to_have_count(1)
        expect(page.locator("#failed-cells tbody tr td")).to_have_text(
            ["8", "industry", re.compile("no identifier")]
        )


@pytest.fixture
def slow_vendors() -> Iterator[MockProviderServer]:
    patch = {"kind": "fixed", "mean_ms": SLOW_VENDOR_MS}
    config = MockConfig().merged(
        {"vendors": {name: {"latency": patch} for name in ("cheap", "premium", "people")}}
    )
    with MockProviderServer(config) as mock:
        yield mock


def test_cancel_on_a_slow_job_ends_cancelled(
    browser: Browser, tmp_path: Path, slow_vendors: MockProviderServer
) -> None:
    """Every vendor answer takes 4 s: Cancel while it enriches, and the header ends Cancelled."""
    with (
        glaze_serve(
            tmp_path,
            GLAZE_PROVIDERS_FILE=str(REPO / "seed" / "providers.mock.yaml"),
            GLAZE_MOCK_PROVIDERS_URL=slow_vendors.url,
            GLAZE_ALLOW_PRIVATE_NETWORKS="1",
        ) as server,
        open_page(browser, server) as page,
    ):
        open_grid(page, server)
        select_grid(page, ["industry"], [])
        expect(page.locator("#selection-count")).to_have_text("10 cells selected")
        page.click("#run")
        expect(page.locator("#job-status")).to_have_text(
            re.compile(r"^Enriching… \d+%$"), timeout=JOB_TIMEOUT_MS
        )
        expect(page.locator("#cancel")).to_be_enabled()
        page.click("#cancel")
        expect(page.locator("#job-status")).to_have_text("Cancelled", timeout=JOB_TIMEOUT_MS)
        assert_moved_forward(statuses(page), "Cancelled")
        assert "Cancelling…" in statuses(page)
        assert page.evaluate("() => window.__sameDocument") is True
        expect(page.locator("#cancel")).to_be_disabled()

        job = server.get(f"/tables/{TABLE}/enrich/jobs?limit=1")["items"][0]
        assert (job["status"], job["state"], job["cancelRequested"]) == (
            "cancelled",
            "cancelled",
            True,
        )
        assert job["skippedTasks"] > 0  # it really stopped before the end
        expect(page.locator(f'#jobs tr[data-job-id="{job["jobId"]}"]')).to_have_attribute(
            "data-status", "cancelled"
        )
        # No row is left held: every chip is back to a resting status.
        chips = page.locator("#grid tbody .chip").all_text_contents()
        assert not {"queued", "running"} & set(chips), chips
        save_screenshot(page, tmp_path, "grid_cancelled.png")


def login_link(server: Server, timeout_s: float = 10) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = re.search(r"(http://\S+/login\?token=\S+)", server.output())
        if found:
            return found.group(1)
        time.sleep(0.1)
    pytest.fail(f"glaze serve printed no login link:\n{server.output()[-2000:]}")


def refuse(path_part: str) -> Callable[[Route], None]:
    def handler(route: Route) -> None:
        if path_part in route.request.url:
            route.fulfill(status=503, body="stream unavailable")
        else:
            route.fallback()

    return handler


def test_sign_in_link_then_polling_when_the_stream_is_refused(
    browser: Browser, tmp_path: Path
) -> None:
    """With an API key the page says how to sign in; the printed link signs the browser in
    (an HttpOnly cookie). With the realtime stream refused, a job is followed by polling."""
    with (
        glaze_serve(tmp_path, GLAZE_API_KEYS="browser-test-key") as server,
        open_page(browser, server) as page,
    ):
        page.goto(f"{server.url}/tables/{TABLE}")
        expect(page.locator("#signin")).to_be_visible()
        expect(page.locator("#signin")).to_contain_text("Sign in with the link glaze serve printed")
        expect(page.locator("#grid tbody tr")).to_have_count(0)

        page.goto(login_link(server))
        expect(page.locator(f'#tables tr[data-table-id="{TABLE}"] a')).to_have_text("Leads")
        cookie = next(c for c in page.context.cookies() if c["name"] == "glaze_session")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"

        # Upload a CSV from the list: the page opens the new table's grid.
        page.set_input_files('#upload input[name="file"]', str(REPO / "seed" / "leads.csv"))
        page.fill('#upload input[name="name"]', "Uploaded <b>leads</b>")
        page.click('#upload button[type="submit"]')
        expect(page.locator("#table-name")).to_have_text("Uploaded <b>leads</b>")  # as text
        expect(page.locator("#grid tbody tr[data-row-id]")).to_have_count(10)
        assert page.url.startswith(f"{server.url}/tables/") and TABLE not in page.url

        page.goto(server.url + "/")
        page.click(f'#tables tr[data-table-id="{TABLE}"] a')

        expect(page.locator("#grid tbody tr[data-row-id]")).to_have_count(10)
        expect(page.locator("#signin")).to_be_hidden()
        page.evaluate(WATCH_STATUS)
        page.context.route("**/realtime/**", refuse("/realtime/"))
        cell(page, "row_leads_03", "industry").click()
        expect(page.locator("#selection-count")).to_have_text("1 cell selected")
        run_and_wait(page, "Enriched!")
        assert page.locator("#job-status").get_attribute("data-transport") == "poll"
        assert_moved_forward(statuses(page), "Enriched!")
        stored = stored_rows(server)["row_leads_03"]["data"]["industry"]
        expect(cell(page, "row_leads_03", "industry")).to_have_text(str(stored))


def test_an_ai_column_is_selected_and_filled_by_the_llm(browser: Browser, tmp_path: Path) -> None:
    """An AI column (added through the API, as the app does) is selectable like any field; Run
    fills it through the mock LLM, one question per company, and each cell says its source."""
    question = "Does {company} sell to enterprises? Answer yes or no."
    rows = ["row_leads_01", "row_leads_02", "row_leads_03"]
    with (
        MockLlmServer() as llm,
        glaze_serve(tmp_path, GLAZE_LLM_BASE_URL=llm.url) as server,
        open_page(browser, server) as page,
    ):
        body = json.dumps(
            {"key": "enterprise", "label": "Sells to enterprises?", "prompt": question}
        )
        added = urllib.request.Request(
            f"{server.url}/tables/{TABLE}/columns",
            data=body.encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(added, timeout=10) as response:
            assert response.status == 201
        open_grid(page, server)
        header = page.locator('#grid th[data-column-key="enterprise"]')
        expect(header.locator(".field")).to_have_text("AI column")
        assert question in (header.get_attribute("title") or "")
        select_grid(page, ["enterprise"], rows)
        expect(page.locator("#selection-count")).to_have_text("3 cells selected")
        run_and_wait(page, "Enriched!")
        stored = stored_rows(server)
        for row_id in rows:
            value = stored[row_id]["data"]["enterprise"]
            assert value in ("yes", "no"), (row_id, value)
            td = cell(page, row_id, "enterprise")
            expect(td).to_have_text(value)
            expect(td).to_have_class(re.compile(r"\bcell-done\b"))
            assert "glaze-mock-1" in (td.get_attribute("title") or "")
        assert llm.stats()["by_operation"] == {"ai_column": 3}  # three companies, one call each
        save_screenshot(page, tmp_path, "grid-ai-column.png")
