"""Classroom roles and the first visit in a real browser (Debian's headless Chromium through Playwright): the
dashboard reads the admin password hash from the environment; a viewer sees no enabled training or deletion
control and a doctored page (its `disabled` removed by script) still starts and deletes nothing; the admin signs
in and can. Screenshots go to test-artifacts/."""

import re
import time

import pytest
from browser_support import ARTIFACTS, BROWSER_TEST, go_to, no_exceptions

from core import access
from core.data.datasets import prepare_data
from core.runs import RunStore
from core.training.loop import run_training
from tests.conftest import TINY_CONFIG, TINY_SYNTHETIC

pytestmark = BROWSER_TEST

PASSWORD = "teach-me"


@pytest.fixture
def classroom_env(monkeypatch):
    # start_dashboard copies os.environ: the server gets the hash the way a deployment gives it.
    monkeypatch.setenv(access.PASSWORD_HASH_ENV, access.hash_password(PASSWORD))


@pytest.fixture
def one_run(runs_dir) -> str:
    store = RunStore(runs_dir)
    return run_training(TINY_CONFIG, prepare_data(TINY_SYNTHETIC, TINY_CONFIG, store.cache_dir), store)["run_id"]


def nav_titles(page) -> list[str]:
    return [text.split("\n")[-1].strip() for text in page.locator("[data-testid='stSidebarNav'] a").all_inner_texts()]


def enabled_buttons(page, *names: str) -> list[str]:
    return [name for name in names
            if page.get_by_role("button", name=name, exact=True).count()
            and page.get_by_role("button", name=name, exact=True).first.is_enabled()]


def forge_click(page, name: str) -> None:
    """What a viewer with devtools does: remove the button's `disabled` attribute, then click it."""
    button = page.get_by_role("button", name=name, exact=True).first
    assert button.is_disabled(), f"{name} should be disabled for a viewer"
    button.evaluate("element => { element.disabled = false; element.removeAttribute('disabled'); }")
    assert button.is_enabled()
    button.click()
    page.wait_for_timeout(2500)


def test_a_viewer_cannot_train_or_delete_and_the_admin_can(classroom_env, one_run, runs_dir, dashboard, page):
    ARTIFACTS.mkdir(exist_ok=True)
    page.goto(dashboard)
    page.get_by_role("heading", name="Data", level=1).wait_for(timeout=60_000)  # a run exists: opens on Data
    assert "Read-only: the teacher chooses the dataset." in page.locator("[data-testid='stAlert']").first.inner_text()
    assert page.get_by_label("Dataset path").count() == 0
    titles = nav_titles(page)
    assert "Train" in titles and "Compare" in titles
    assert not {"Tune", "Ablation", "Predict"} & set(titles), titles

    go_to(page, "Train")
    page.get_by_text("Read-only: the teacher starts, stops and deletes runs.").wait_for(timeout=30_000)
    page.get_by_text("Delete a run").click()
    page.wait_for_timeout(800)
    assert enabled_buttons(page, "Start", "Train all five", "Delete", "Resume", "Clear queue") == []
    no_exceptions(page)
    page.screenshot(path=str(ARTIFACTS / "classroom-viewer-train.png"), full_page=True)

    forge_click(page, "Train all five")
    forge_click(page, "Delete")
    no_exceptions(page)
    page.get_by_text("Nothing is training.").wait_for(timeout=10_000)
    assert page.get_by_text("cannot be undone").count() == 0, "no delete confirmation for a viewer"
    assert [run["run_id"] for run in RunStore(runs_dir).list_runs()] == [one_run], "nothing trained or deleted"
    page.screenshot(path=str(ARTIFACTS / "classroom-viewer-forged.png"), full_page=True)

    page.get_by_label("Admin password").fill("wrong guess")
    page.get_by_role("button", name="Sign in as admin").click()
    page.get_by_text("Wrong password.").wait_for(timeout=30_000)
    page.get_by_label("Admin password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in as admin").click()
    page.get_by_text(re.compile(r"Signed in as admin \(for (7 h 59 min|8 h) more\)")).wait_for(timeout=30_000)
    page.get_by_text("Learning rate").wait_for(timeout=30_000)
    page.wait_for_timeout(1500)
    assert {"Tune", "Ablation", "Predict"} <= set(nav_titles(page))
    assert enabled_buttons(page, "Train all five") == ["Train all five"]
    page.screenshot(path=str(ARTIFACTS / "classroom-admin-train.png"), full_page=True)

    page.get_by_text("Delete a run").click()
    page.get_by_role("button", name="Delete", exact=True).click()
    page.get_by_role("button", name="Yes, delete").click()
    deadline = time.monotonic() + 30
    while RunStore(runs_dir).list_runs():
        assert time.monotonic() < deadline, "the admin's delete did not happen"
        time.sleep(0.3)
    page.get_by_role("button", name="Start", exact=True).click()
    page.get_by_text(re.compile(r"Hybrid S-ResNet")).first.wait_for(timeout=30_000)
    page.get_by_role("button", name=re.compile(r"^Stop ")).wait_for(timeout=60_000)
    page.get_by_role("button", name=re.compile(r"^Stop ")).click()
    no_exceptions(page)

    page.get_by_role("button", name="Sign out").click()
    page.get_by_label("Admin password").wait_for(timeout=30_000)
    page.wait_for_timeout(1000)
    assert enabled_buttons(page, "Start", "Train all five") == []


def test_first_visit_opens_on_start_and_prepares_the_demo(dashboard, page):
    ARTIFACTS.mkdir(exist_ok=True)
    page.goto(dashboard)
    page.get_by_role("heading", name="Start", level=1).wait_for(timeout=60_000)
    no_exceptions(page)
    page.screenshot(path=str(ARTIFACTS / "start-first-visit.png"), full_page=True)
    page.get_by_role("button", name="Prepare the demo runs").click()
    page.get_by_text(re.compile(r"The demo runs are training: 0 of 5 done")).wait_for(timeout=60_000)
    go_to(page, "Compare")
    page.get_by_text(re.compile(r"The demo runs are training: 0 of 5 done")).wait_for(timeout=30_000)
    page.get_by_role("link", name="Go to the Start page").wait_for(timeout=10_000)
    no_exceptions(page)
    page.screenshot(path=str(ARTIFACTS / "start-compare-waiting.png"), full_page=True)
    go_to(page, "Train")  # the demo is the Train page's "Train all five": its queue shows the five
    page.get_by_text("ResNet18 run 1 of 5 (Train all five)").first.wait_for(timeout=30_000)


def test_first_visit_of_a_viewer_says_to_wait_for_the_teacher(classroom_env, dashboard, page):
    ARTIFACTS.mkdir(exist_ok=True)
    page.goto(dashboard)
    page.get_by_role("heading", name="Start", level=1).wait_for(timeout=60_000)
    page.get_by_text("The teacher has not trained the models yet").wait_for(timeout=30_000)
    assert page.get_by_role("button", name="Prepare the demo runs").count() == 0
    no_exceptions(page)
    page.screenshot(path=str(ARTIFACTS / "start-viewer.png"), full_page=True)
