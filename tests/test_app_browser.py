"""The web app in a real browser: Debian's chromium driven by Playwright, against a launched app.

What a user does: a wrong prompt gets one line on the page; "a red cube" with the smoke preset
ends with the mesh in the 3D viewer and download links; a long second run shows its live preview
and progress, a second tab pressing Generate meanwhile waits with its queue position, Cancel stops
the long run (Resume appears) and the second tab's run then finishes; after a reload the Runs tab
lists the runs and opens one in its viewer. Screenshots of each stage go to test-artifacts/app/
(ignored by git through the folder's own .gitignore), with timings.json (seconds from pressing
Generate to the first preview image).

Needs /usr/bin/chromium (`apt-get install -y chromium`; Playwright's own browser download is not
used). Without it the test is skipped, unless SDS3D_REQUIRE_BROWSER=1 (CI) makes that a failure.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "app"


def require_browser():
    """Skip (or, with SDS3D_REQUIRE_BROWSER=1, fail) when the browser or its driver is missing."""
    why = None
    if not Path(CHROMIUM).exists():
        why = f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium)"
    else:
        try:
            import gradio  # noqa: F401
            import playwright.sync_api  # noqa: F401
        except ImportError as error:
            why = f"{error.name} is not installed: pip install -e '.[dev]'"
    if why is None:
        return
    if os.environ.get("SDS3D_REQUIRE_BROWSER") == "1":
        pytest.fail(f"SDS3D_REQUIRE_BROWSER=1 but {why}")
    pytest.skip(why)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    require_browser()
    from test_app import serve_app

    with serve_app(tmp_path_factory.mktemp("browser-app") / "outputs", warm=True) as (url, app):
        yield url, app.root


@pytest.fixture(scope="module")
def browser(served):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS.parent / ".gitignore").write_text("*\n")  # screenshots are artifacts, never commits
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                              args=["--headless", "--no-sandbox", "--disable-gpu"])
        try:
            yield chromium
        finally:
            chromium.close()


def shot(page, name: str):
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def fill_form(page, prompt: str, preset: str = "smoke", seed: int = 0, steps: int | None = None):
    page.locator("#prompt textarea, #prompt input").first.fill(prompt)
    page.locator("#preset input").first.click()
    page.get_by_role("option", name=preset, exact=True).click()
    page.locator("#seed input").first.fill(str(seed))
    page.locator("#steps textarea, #steps input").first.fill("" if steps is None else str(steps))


def status(page, prefix: str = "gen") -> str:
    return page.locator(f"#{prefix}-status").inner_text()


def progress_step(page, prefix: str = "gen") -> int:
    value = page.locator(f"#{prefix}-progress [role=progressbar]").get_attribute("aria-valuenow")
    return int(value or 0)


def test_generate_cancel_queue_and_runs_in_a_browser(served, browser):
    url, root = served
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page, other = context.new_page(), context.new_page()
    timings = {}
    console_errors = []
    page.on("console", lambda message: console_errors.append(message.text) if message.type == "error" else None)
    try:
        page.goto(url)
        page.wait_for_selector("#generate-button")

        # 1. A prompt the world does not know: one line on the page, no traceback, nothing made.
        fill_form(page, "a photograph of a giraffe")
        page.click("#generate-button")
        page.wait_for_function("document.querySelector('#gen-status').innerText.includes('unknown prompt')",
                               timeout=60_000)
        assert status(page).startswith("error: unknown prompt"), status(page)
        assert "Traceback" not in page.content()
        shot(page, "01-unknown-prompt")

        # 2. "a red cube" with the smoke preset: live preview, then the mesh in the viewer and downloads.
        fill_form(page, "a red cube")
        start = time.perf_counter()
        page.click("#generate-button")
        page.wait_for_selector("#gen-preview img", timeout=120_000)
        timings["smoke_first_preview_s"] = round(time.perf_counter() - start, 2)
        page.wait_for_selector("#gen-model canvas", timeout=180_000)
        page.wait_for_selector("#gen-files a[href*='mesh.glb']", timeout=60_000)
        timings["smoke_done_s"] = round(time.perf_counter() - start, 2)
        assert status(page).startswith("done"), status(page)
        links = [a.get_attribute("href") for a in page.locator("#gen-files a").all()]
        for name in ("mesh.glb", "mesh.obj", "mesh.ply", "turntable.mp4", "config.yaml"):
            assert any(name in (href or "") for href in links), (name, links)
        assert "silhouette IoU" in page.locator("#gen-metrics").inner_text()
        page.wait_for_selector("#gen-video video", timeout=30_000)
        page.wait_for_selector("#gen-sheet img", timeout=30_000)
        page.wait_for_timeout(1500)  # let the viewer draw the mesh
        shot(page, "02-red-cube-done")

        # 3. A long run; a second tab queues behind it; Cancel stops the long run at the next step.
        fill_form(page, "a red cube", seed=1, steps=3000)
        page.click("#generate-button")
        page.wait_for_function("Number(document.querySelector('#gen-progress [role=progressbar]')"
                               ".getAttribute('aria-valuenow')) >= 3", timeout=120_000)
        other.goto(url)
        other.wait_for_selector("#generate-button")
        fill_form(other, "a blue sphere")
        other.click("#generate-button")
        other.wait_for_function("document.querySelector('#gen-status').innerText.includes('position 1')",
                                timeout=60_000)
        shot(other, "03-second-tab-queued")
        page.bring_to_front()
        page.wait_for_selector("#gen-preview img", timeout=30_000)
        shot(page, "04-long-run-training")
        page.click("#cancel-button")
        page.wait_for_function("document.querySelector('#gen-status').innerText.startsWith('stopped')",
                               timeout=120_000)
        stopped_at = progress_step(page)
        assert 3 <= stopped_at < 3000, stopped_at
        assert f"cancelled at step {stopped_at} of 3000" in status(page), status(page)
        assert page.locator("#gen-resume").is_visible()
        shot(page, "05-long-run-cancelled")
        other.bring_to_front()
        other.wait_for_selector("#gen-model canvas", timeout=180_000)
        assert status(other).startswith("done"), status(other)
        shot(other, "06-second-tab-done")

        # 4. Reload, Runs tab: every run is listed; opening one shows it in the viewer.
        page.bring_to_front()
        page.reload()
        page.get_by_role("tab", name="Runs").click()
        table = page.locator("#runs-table")
        for name in ("a-red-cube-0", "a-red-cube-1", "a-blue-sphere-0"):
            table.get_by_text(name).first.wait_for(timeout=30_000)
        assert re.search(rf"a-red-cube-1.*stopped at step {stopped_at}/3000", table.inner_text())
        page.wait_for_selector("#runs-gallery img", timeout=30_000)
        shot(page, "07-runs-tab")
        page.locator("#runs-gallery button img").last.click()  # the oldest run: the red cube
        page.wait_for_selector("#runs-model canvas", timeout=60_000)
        assert "a-red-cube-0" in status(page, "runs"), status(page, "runs")
        page.locator("#runs-model").scroll_into_view_if_needed()  # the viewer draws only while on screen
        page.wait_for_timeout(3000)
        page.screenshot(path=str(ARTIFACTS / "08-runs-tab-opened.png"))  # the viewport: viewer, turntable, sheet
    finally:
        (ARTIFACTS / "timings.json").write_text(json.dumps(timings, indent=2) + "\n")
        (ARTIFACTS / "console-errors.txt").write_text("\n".join(console_errors) + "\n")
        context.close()
    for name in ("a-red-cube-0", "a-red-cube-1", "a-blue-sphere-0"):
        assert (root / name / "config.yaml").is_file(), name
