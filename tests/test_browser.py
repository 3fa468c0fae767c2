"""The dashboard in a real browser: `streamlit run` on a free port, driven by Playwright in Debian's
headless Chromium (never a downloaded browser). Screenshots of every page go to test-artifacts/."""

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
PAGES = ["Data", "Train", "Compare", "Explain", "Tune", "Ablation"]

pytestmark = [
    pytest.mark.browser,
    # Skipped on a developer machine without chromium; in CI (.ci/run installs it) a missing browser fails.
    pytest.mark.skipif(not os.path.exists(CHROMIUM) and not os.environ.get("CI"),
                       reason="Debian's chromium is not installed (apt-get install chromium; .ci/run does)"),
]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def runs_dir(tmp_path):
    return tmp_path / "runs"


def start_dashboard(runs_dir, output=subprocess.PIPE) -> tuple[subprocess.Popen, str]:
    """`streamlit run` on a free port, returned once it answers its health check."""
    port = free_port()
    environment = {**os.environ, "SKIN_RUNS_DIR": str(runs_dir)}
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "streamlit_app.py", "--server.headless", "true",
         "--server.port", str(port), "--server.address", "127.0.0.1"],
        cwd=ROOT, env=environment, stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                return server, url
        except OSError:
            pass
        assert server.poll() is None and time.monotonic() < deadline, "streamlit did not start"
        time.sleep(0.3)


@pytest.fixture
def dashboard(runs_dir):
    server, url = start_dashboard(runs_dir)
    yield url
    server.terminate()
    server.wait(timeout=20)


@pytest.fixture
def page():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        tab = browser.new_page(viewport={"width": 1400, "height": 1800})
        yield tab
        browser.close()


def go_to(page, title: str) -> None:
    """Through the sidebar, as a user does (a fresh URL would start a new session)."""
    page.locator("[data-testid='stSidebarNav'] a", has_text=title).first.click()
    page.get_by_role("heading", name=title, level=1).wait_for(timeout=60_000)
    page.wait_for_timeout(800)


def set_number(page, label: str, value: int) -> None:
    field = page.get_by_label(label, exact=True)
    field.fill(str(value))
    field.press("Enter")
    page.wait_for_timeout(600)


def no_exceptions(page) -> None:
    errors = page.locator("[data-testid='stException']")
    assert errors.count() == 0, errors.first.inner_text()


def test_a_tiny_run_from_the_train_page_ends_in_the_run_table(dashboard, page):
    ARTIFACTS.mkdir(exist_ok=True)
    page.goto(dashboard)
    page.get_by_role("heading", name="Data", level=1).wait_for(timeout=60_000)
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


@pytest.fixture
def five_runs(runs_dir):
    """Five tiny runs of the five models on one synthetic split, made by the engine before the server starts."""
    import dataclasses

    from core.config import DataSpec, TrainConfig
    from core.datasets import prepare_data
    from core.runs import RunStore
    from core.training import run_training

    store = RunStore(runs_dir)
    config = TrainConfig(epochs=2, batch_size=16, image_size=32, pretrained=False, precision="fp32")
    data = prepare_data(DataSpec(synthetic_count=120, synthetic_image_size=64), config, store.cache_dir)
    for model in ("resnet18", "resnet50", "densenet121", "efficientnet_b0", "hybrid_sresnet"):
        run_training(dataclasses.replace(config, model=model), data, store)
    return store


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


def resident_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


SESSIONS = 10
MEMORY_GROWTH_LIMIT_MIB = 300  # ten sessions over one, on the server (measured: 75); models and data are shared


@pytest.mark.slow
def test_ten_sessions_at_once_on_explain_and_compare(five_runs, runs_dir, tmp_path):
    """Ten browsers open Explain and then Compare at the same moment. Each gets exactly the figure one
    session alone gets and the table the engine computes; the five models are loaded once; the server's
    memory stays bounded."""
    import asyncio
    import threading

    from playwright.async_api import async_playwright

    from core.compare import build_comparison, default_comparison_runs

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
        async with page.expect_download(timeout=120_000) as event:
            await page.get_by_role("button", name=name).click()
        return Path(await (await event.value).path()).read_bytes()

    async def session(browser) -> tuple[bytes, str]:
        context = await browser.new_context(viewport={"width": 1400, "height": 1800}, accept_downloads=True)
        page = await context.new_page()
        await page.goto(url)
        await page.get_by_role("heading", name="Data", level=1).wait_for(timeout=120_000)
        await page.locator("[data-testid='stSidebarNav'] a", has_text="Explain").first.click()
        await page.get_by_text("Download the figure").wait_for(timeout=300_000)
        assert await page.locator("[data-testid='stException']").count() == 0
        figure = await download(page, "Download the figure (PNG)")
        await page.locator("[data-testid='stSidebarNav'] a", has_text="Compare").first.click()
        await page.locator(".js-plotly-plot").nth(9).wait_for(timeout=300_000)
        assert await page.locator("[data-testid='stException']").count() == 0
        table = (await download(page, "Table as CSV")).decode()
        await context.close()
        return figure, table

    async def drive() -> tuple[tuple[bytes, str], list[tuple[bytes, str]], float, float]:
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            alone = await session(browser)  # the reference: one session with the server to itself
            after_one = resident_mib(server.pid)
            started = time.perf_counter()
            together = await asyncio.gather(*(session(browser) for _ in range(SESSIONS)))
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
        assert figure == alone[0], "a session got a different Grad-CAM figure"
        assert table == expected_csv, "a session got a different comparison table"
    assert log.read_text().count("loaded the model of run") == len(runs), "each model is loaded once"
    assert peak["mib"] - after_one < MEMORY_GROWTH_LIMIT_MIB
