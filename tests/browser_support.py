"""What the real-browser tests share: the dashboard started with `streamlit run` on a free port and
driven by Playwright in Debian's headless Chromium (never a downloaded browser). Their fixtures
(runs_dir, dashboard, page, five_runs) are in conftest.py."""

import os
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
# In the sidebar's order; Start (shown first while there are no runs) is opened on its own.
PAGES = ["Data", "Train", "Compare", "Explain", "Quiz", "Predict", "Audit", "Tune", "Ablation"]

# Skipped on a developer machine without chromium; in CI (.ci/run installs it) a missing browser fails.
BROWSER_TEST = [
    pytest.mark.browser,
    # One after another on one pytest-xdist worker: each drives a server and Chromium, which load both cores.
    pytest.mark.xdist_group("browser"),
    pytest.mark.skipif(not os.path.exists(CHROMIUM) and not os.environ.get("CI"),
                       reason="Debian's chromium is not installed (apt-get install chromium; .ci/run does)"),
]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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
