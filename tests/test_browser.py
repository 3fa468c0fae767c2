"""The dashboard in a real browser: `streamlit run` on a free port, driven by Playwright in Debian's
headless Chromium (never a downloaded browser). Screenshots of every page go to test-artifacts/."""

import re
import time
from pathlib import Path

import pytest
from browser_support import (
    ARTIFACTS,
    BROWSER_TEST,
    CHROMIUM,
    CHROMIUM_ARGS,
    PAGES,
    go_to,
    no_exceptions,
    set_number,
    start_dashboard,
)

pytestmark = BROWSER_TEST


def test_a_tiny_run_from_the_train_page_ends_in_the_run_table(dashboard, page):
    ARTIFACTS.mkdir(exist_ok=True)
    page.goto(dashboard)
    page.get_by_role("heading", name="Start", level=1).wait_for(timeout=60_000)  # no runs: the first visit's page
    page.get_by_role("button", name="Prepare the demo runs").wait_for(timeout=10_000)
    go_to(page, "Compare")
    page.get_by_text("Train models first").wait_for(timeout=30_000)
    page.get_by_role("link", name="Go to the Train page").wait_for(timeout=10_000)
    no_exceptions(page)
    page.screenshot(path=str(ARTIFACTS / "compare-empty.png"), full_page=True)
    go_to(page, "Data")
    set_number(page, "Images", 60)
    page.get_by_text("Using built-in synthetic set (60 images").wait_for(timeout=60_000)
    no_exceptions(page)
    page.screenshot(path=str(ARTIFACTS / "data.png"), full_page=True)

    go_to(page, "Train")
    set_number(page, "Epochs", 1)
    page.locator("[data-testid='stSelectbox']").filter(has_text="Image size").locator("input").click()
    page.get_by_role("option", name="32 px", exact=True).click()
    page.wait_for_timeout(600)
    page.get_by_role("button", name="Start").click()
    page.get_by_text(re.compile(r"1 run\(s\) in .*: 1 completed")).wait_for(timeout=180_000)
    no_exceptions(page)
    page.screenshot(path=str(ARTIFACTS / "train.png"), full_page=True)

    for title in PAGES[2:]:
        go_to(page, title)
        no_exceptions(page)
        page.screenshot(path=str(ARTIFACTS / f"{title.lower()}.png"), full_page=True)


def test_compare_page_with_five_runs_and_its_html_report(five_runs, dashboard, page, tmp_path):
    ARTIFACTS.mkdir(exist_ok=True)
    page.goto(dashboard)
    page.get_by_role("heading", name="Data", level=1).wait_for(timeout=60_000)
    go_to(page, "Compare")
    page.locator(".js-plotly-plot").nth(9).wait_for(timeout=60_000)
    no_exceptions(page)
    assert page.locator(".js-plotly-plot").count() == 10
    page.wait_for_timeout(1000)
    page.screenshot(path=str(ARTIFACTS / "compare.png"), full_page=True)
    page.get_by_role("button", name="Build the HTML report").click()
    with page.expect_download(timeout=60_000) as download:
        page.get_by_role("button", name="Download the HTML report").click()
    report = tmp_path / "report.html"
    download.value.save_as(report)
    viewer = page.context.browser.new_page()
    viewer.goto(report.as_uri())
    viewer.locator(".js-plotly-plot").nth(9).wait_for(timeout=60_000)
    assert viewer.locator(".js-plotly-plot").count() == 10, "every figure of the page is in the report"
    viewer.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
    check_report_as_drawn(viewer)
    page.get_by_text("Where the models disagree").wait_for(timeout=30_000)
    page.get_by_role("button", name=re.compile(r"Explain the first \d+ shown")).click()
    page.get_by_role("heading", name="Explain", level=1).wait_for(timeout=60_000)
    no_exceptions(page)

    go_to(page, "Explain")
    page.get_by_text("Download the figure").wait_for(timeout=120_000)
    no_exceptions(page)
    assert page.get_by_text("P(malignant)").count() >= 5, "one caption per model"
    page.screenshot(path=str(ARTIFACTS / "explain.png"), full_page=True)
    page.get_by_text("Upload", exact=True).click()
    uploader = page.locator("[data-testid='stFileUploaderDropzoneInput']")
    uploader.set_input_files(files=[{"name": "notes.png", "mimeType": "image/png", "buffer": b"not an image"}])
    page.get_by_text("Cannot use notes.png").wait_for(timeout=30_000)
    no_exceptions(page)
    rgba = tmp_path / "rgba.png"
    from PIL import Image

    Image.new("RGBA", (300, 200), (180, 120, 90, 128)).save(rgba)
    uploader.set_input_files(str(rgba))
    page.get_by_text("Download the figure").wait_for(timeout=120_000)
    no_exceptions(page)
    huge = tmp_path / "huge.png"
    Image.new("RGB", (8000, 6000)).save(huge)  # 48 megapixels, a small file
    uploader.set_input_files(str(huge))
    page.get_by_text("image too large").wait_for(timeout=60_000)
    no_exceptions(page)


def check_report_as_drawn(viewer) -> None:
    """In the drawn report, every bar has its model's colour and the p-value matrices are labelled with
    the model names (the page-built report once had black bars and unlabelled heatmaps)."""
    from core.figures import MODEL_COLOURS

    def rgb(hex_colour: str) -> str:
        red, green, blue = (int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))
        return f"rgb({red}, {green}, {blue})"

    drawn = viewer.evaluate("""() => Array.from(document.querySelectorAll('.js-plotly-plot')).map(plot => ({
        title: (plot.layout.title || {}).text || '',
        bars: Array.from(plot.querySelectorAll('.trace.bars')).map(trace => ({
            name: trace.__data__[0].trace.name,
            fills: Array.from(trace.querySelectorAll('.point path')).map(path => path.style.fill)})),
        xticks: Array.from(plot.querySelectorAll('.xtick text')).map(text => text.textContent),
        yticks: Array.from(plot.querySelectorAll('.ytick text')).map(text => text.textContent)}))""")
    bar_figures = [figure for figure in drawn if figure["bars"]]
    assert len(bar_figures) == 3
    for figure in bar_figures:
        for trace in figure["bars"]:
            assert set(trace["fills"]) == {rgb(MODEL_COLOURS[trace["name"]])}, (figure["title"], trace)
    names = sorted(MODEL_COLOURS)
    matrices = [figure for figure in drawn if "p-values" in figure["title"]]
    assert len(matrices) == 2
    for figure in matrices:
        assert sorted(figure["xticks"]) == names and sorted(figure["yticks"]) == names, figure


def resident_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


SESSIONS = 10
MEMORY_GROWTH_LIMIT_MIB = 300  # ten sessions over one, on the server (measured: 75); models and data are shared


def same_figure(first: bytes, second: bytes) -> bool:
    """The same PNG figure up to float rounding. Sessions at once compute their maps beside other OpenMP thread
    teams, whose reductions can round differently: measured, 1-100 of 630,000 pixel values 1-2 levels apart
    (HiResCAM on a stride-8 stage multiplies activations and gradients element by element). A session shown
    another image, model or method differs almost everywhere."""
    import io

    import numpy as np
    from PIL import Image

    a, b = (np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int) for data in (first, second))
    if a.shape != b.shape:
        return False
    difference = np.abs(a - b)
    return int(difference.max()) <= 8 and float((difference > 0).mean()) < 1e-3


@pytest.mark.slow
def test_ten_sessions_at_once_on_explain_and_compare(five_runs, runs_dir, tmp_path):
    """Ten browsers open Explain and then Compare at the same moment. Each gets the figure one session alone
    gets (up to float rounding) and exactly the table the engine computes; the five models are loaded once; the server's
    memory stays bounded."""
    import asyncio
    import threading

    from playwright.async_api import async_playwright

    from core.evaluation.compare import build_comparison, default_comparison_runs

    runs = default_comparison_runs(five_runs.list_runs())
    expected_csv = build_comparison(five_runs, runs).table.to_csv(index=False, float_format="%.4f")
    log = tmp_path / "server.log"
    with open(log, "wb") as output:
        server, url = start_dashboard(runs_dir, output)
    peak = {"mib": 0.0}
    sampling = threading.Event()

    def sample_memory() -> None:
        while not sampling.is_set():
            peak["mib"] = max(peak["mib"], resident_mib(server.pid))
            time.sleep(0.2)

    async def download(page, name: str) -> bytes:
        # Once: a download cancelled by a rerun under ten sessions is a defect of the app, not bad luck
        # (download buttons say on_click="ignore"; tests/test_pages.py).
        async with page.expect_download(timeout=120_000) as event:
            await page.get_by_role("button", name=name).click(timeout=300_000)
        return Path(await (await event.value).path()).read_bytes()

    async def session(context) -> tuple[bytes, str]:
        # Ten sessions share two cores: every step may wait long (Playwright's own default is 30 s). Each tab is a
        # session of its own (its own websocket); the tabs share one browser context, so that the browser compiles
        # the dashboard's scripts once rather than once a session.
        page = await context.new_page()
        await page.goto(url, timeout=300_000)
        await page.get_by_role("heading", name="Data", level=1).wait_for(timeout=120_000)
        await page.locator("[data-testid='stSidebarNav'] a", has_text="Explain").first.click(timeout=300_000)
        await page.get_by_text("Download the figure").wait_for(timeout=300_000)
        assert await page.locator("[data-testid='stException']").count() == 0
        figure = await download(page, "Download the figure (PNG)")
        await page.locator("[data-testid='stSidebarNav'] a", has_text="Compare").first.click(timeout=300_000)
        await page.locator(".js-plotly-plot").nth(9).wait_for(timeout=300_000)
        assert await page.locator("[data-testid='stException']").count() == 0
        table = (await download(page, "Table as CSV")).decode()
        await page.close()
        return figure, table

    async def drive() -> tuple[tuple[bytes, str], list[tuple[bytes, str]], float, float]:
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            context = await browser.new_context(viewport={"width": 1400, "height": 1800}, accept_downloads=True)
            alone = await session(context)  # the reference: one session with the server to itself
            after_one = resident_mib(server.pid)
            started = time.perf_counter()
            together = await asyncio.gather(*(session(context) for _ in range(SESSIONS)))
            seconds = time.perf_counter() - started
            await browser.close()
            return alone, together, after_one, seconds

    sampler = threading.Thread(target=sample_memory, daemon=True)
    sampler.start()
    try:
        alone, together, after_one, seconds = asyncio.run(drive())
    finally:
        sampling.set()
        server.terminate()
        server.wait(timeout=20)
    print(f"{SESSIONS} sessions in {seconds:.1f} s; server RSS {after_one:.0f} MiB after one session, "
          f"peak {peak['mib']:.0f} MiB")
    assert alone[1] == expected_csv
    for figure, table in together:
        assert same_figure(figure, alone[0]), "a session got a different CAM figure"
        assert table == expected_csv, "a session got a different comparison table"
    assert log.read_text().count("loaded the model of run") == len(runs), "each model is loaded once"
    assert peak["mib"] - after_one < MEMORY_GROWTH_LIMIT_MIB
