"""Classroom roles and the first visit through AppTest: a viewer sees training and deletion controls disabled (or
not at all), and a forged click on them (AppTest clicks a disabled button as a doctored browser would) queues,
stops and deletes nothing; the admin signs in (throttled), can, and is signed out when the session expires; the
queue limit; the Start page's demo runs."""

import dataclasses
import threading
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from core import access
from core.config import MODEL_NAMES, PRESETS, DataSpec
from core.data.datasets import prepare_data
from core.runs import RunStore
from core.training.jobs import shared_queue
from core.training.loop import run_training
from pages.common import ADMIN_SINCE, DATA_SPEC, PENDING_DELETE, VALUE_PREFIX
from tests.conftest import TINY_CONFIG, TINY_SYNTHETIC
from tests.test_pages import TINY_VALUES

APP = str(Path(__file__).resolve().parents[1] / "streamlit_app.py")
PASSWORD = "teach-me"
PASSWORD_HASH = access.hash_password(PASSWORD)


@pytest.fixture
def runs_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SKIN_RUNS_DIR", str(tmp_path / "runs"))
    access.shared_login_throttle().reset()
    return tmp_path / "runs"


@pytest.fixture
def classroom(runs_dir, monkeypatch):
    monkeypatch.setenv(access.PASSWORD_HASH_ENV, PASSWORD_HASH)
    return runs_dir


@pytest.fixture
def held_queue(runs_dir):
    """The pages' queue with its worker held by a job of kind "train" (so the Train page offers Stop and queued
    jobs stay queued, to be counted); released and emptied afterwards."""
    queue = shared_queue(RunStore(runs_dir))
    release, reported = threading.Event(), threading.Event()

    def hold(stop, callback):
        callback.on_progress(0, 1, "holding")
        reported.set()
        while not (release.is_set() or stop.is_set()):
            stop.wait(0.02)
        return ("stopped", "stopped by request") if stop.is_set() else ("completed", None)

    queue.hold_id = queue.submit_task("Holding job", TINY_CONFIG, TINY_SYNTHETIC, hold, kind="train")
    assert reported.wait(30)
    yield queue
    queue.clear_queue()
    release.set()
    assert queue.wait_until_idle(timeout=60)


@pytest.fixture
def tiny_run(runs_dir) -> str:
    store = RunStore(runs_dir)
    return run_training(TINY_CONFIG, prepare_data(TINY_SYNTHETIC, TINY_CONFIG, store.cache_dir), store)["run_id"]


def session(page: str | None = None) -> AppTest:
    app = AppTest.from_file(APP, default_timeout=60)
    for name, value in TINY_VALUES.items():
        app.session_state[VALUE_PREFIX + name] = value
    app.session_state[DATA_SPEC] = TINY_SYNTHETIC
    app.run()
    if page:
        app.switch_page(f"pages/{page}.py").run()
    assert not app.exception, app.exception
    return app


def queued(queue) -> list:
    return [job for job in queue.snapshot().jobs if job.state == "queued"]


def errors(app: AppTest) -> list[str]:
    return [error.value for error in app.error]


def forge_click(app: AppTest, key: str) -> AppTest:
    """Click a disabled button as a doctored browser would (devtools removed `disabled`): AppTest refuses to
    click a disabled widget, so the test lifts the flag on its copy of the element, and the server gets the
    click as from a browser. (Streamlit 1.67 itself drops a disabled widget's value on the server; the
    forgetful page below checks our own refusal where a page draws a control enabled.)"""
    button = app.button(key=key)
    assert button.disabled, f"{key} should be drawn disabled"
    button.proto.disabled = False
    button.click().run()
    assert not app.exception, app.exception
    return app


def sidebar_page():
    """The entry point's sidebar alone, and the role it leaves: AppTest reruns a multipage app's current page
    without its entry point after the first run, so the sidebar form is tested on its own here (the browser
    test signs in through the whole app)."""
    import streamlit as st

    from pages.common import access_sidebar, can_administer

    with st.sidebar:
        access_sidebar()
    st.markdown(f"role: {'admin' if can_administer() else 'viewer'}")


def sidebar() -> AppTest:
    app = AppTest.from_function(sidebar_page, default_timeout=60)
    app.run()
    assert not app.exception, app.exception
    return app


def role(app: AppTest) -> str:
    return app.markdown[-1].value


def sign_in(app: AppTest, password: str) -> AppTest:
    app.sidebar.text_input(key="access.password").input(password)
    app.sidebar.button(key="access.sign_in").click().run()
    assert not app.exception, app.exception
    return app


def test_a_viewer_sees_the_training_controls_disabled_and_forged_clicks_do_nothing(classroom, held_queue, tiny_run):
    held_queue.submit([TINY_CONFIG], TINY_SYNTHETIC)  # queued by the teacher (or a script): Clear queue is drawn
    app = session("train")
    assert "Read-only" in app.info[0].value
    for key in ("train.start", "train.all", "train.stop", "train.clear", "train.delete"):
        assert app.button(key=key).disabled, key
    assert not [widget for widget in app.select_slider if widget.key == "widget.lr"], "no hyperparameters"
    for key in ("train.all", "train.stop", "train.clear", "train.delete"):
        forge_click(app, key)  # a forged rerun: the browser was made to send the click
    app.session_state[PENDING_DELETE] = tiny_run  # even with the confirmation step forged too
    app.run()
    forge_click(app, "train.delete_confirm")
    time.sleep(0.3)
    assert len(queued(held_queue)) == 1, "nothing queued, nothing cleared"
    assert held_queue.snapshot().current.job_id == held_queue.hold_id, "not stopped"
    assert RunStore(classroom).load(tiny_run) is not None, "not deleted"


def forgetful_page():
    """A page that draws its controls enabled for everyone (a page that forgot its check): the queue and
    delete_run in pages/common.py must refuse a viewer on their own."""
    import streamlit as st

    from core.config import DataSpec
    from pages.common import delete_run, run_store, shared_job_queue
    from tests.conftest import TINY_CONFIG

    queue = shared_job_queue()
    if st.button("Queue", key="forgetful.queue"):
        queue.submit([TINY_CONFIG], DataSpec())
    if st.button("Task", key="forgetful.task"):
        queue.submit_task("task", TINY_CONFIG, DataSpec(), lambda stop, callback: ("completed", None), kind="audit")
    if st.button("Resume", key="forgetful.resume"):
        queue.submit_resume(st.session_state["run_id"])
    if st.button("Stop", key="forgetful.stop"):
        queue.stop(queue.snapshot().current.job_id)
    if st.button("Clear", key="forgetful.clear"):
        queue.clear_queue()
    if st.button("Delete", key="forgetful.delete"):
        delete_run(run_store(), st.session_state["run_id"])


def test_the_queue_and_deletion_refuse_a_viewer_whatever_the_page_draws(classroom, held_queue, tiny_run):
    held_queue.submit([TINY_CONFIG], TINY_SYNTHETIC)
    app = AppTest.from_function(forgetful_page, default_timeout=60)
    app.session_state["run_id"] = tiny_run
    app.run()
    refusals = {"queue": "start jobs", "task": "start jobs", "resume": "start jobs", "stop": "stop jobs",
                "clear": "clear the queue", "delete": "delete runs"}
    for name, action in refusals.items():
        app.button(key=f"forgetful.{name}").click().run()
        assert not app.exception, app.exception
        assert errors(app) == [f"Only the admin can {action} on this server (sign in on the sidebar)."], name
    time.sleep(0.3)
    assert len(queued(held_queue)) == 1 and held_queue.snapshot().current.job_id == held_queue.hold_id
    assert RunStore(classroom).load(tiny_run) is not None


def test_the_same_page_works_for_the_admin(classroom, held_queue, tiny_run):
    app = AppTest.from_function(forgetful_page, default_timeout=60)
    app.session_state["run_id"] = tiny_run
    app.session_state[ADMIN_SINCE] = time.time()
    app.run()
    app.button(key="forgetful.queue").click().run()
    assert not errors(app) and len(queued(held_queue)) == 1
    app.button(key="forgetful.delete").click().run()
    assert not errors(app) and RunStore(classroom).load(tiny_run) is None


def test_a_viewer_has_no_paths_uploads_or_admin_pages(classroom):
    start = session()
    assert start.title[0].value == "Start"
    assert "wait for the teacher" in start.info[0].value
    assert not [button for button in start.button if button.key == "start.demo"]
    data = session("data")
    assert not data.text_input and "Read-only" in data.info[0].value
    assert not [radio for radio in data.radio if radio.key == "widget.source_kind"]
    for page in ("tune", "ablation", "predict"):  # not in a viewer's navigation: a visit cannot run them
        with pytest.raises(ValueError, match="Could not find a navigation page"):
            start.switch_page(f"pages/{page}.py")
    compare = session("compare")
    assert "wait for the teacher" in compare.info[0].value


def test_a_demo_click_after_the_admin_session_expired_queues_nothing(classroom, held_queue):
    app = session()
    app.session_state[ADMIN_SINCE] = time.time()
    app.run()
    demo = app.button(key="start.demo")  # drawn for the admin ...
    app.session_state[ADMIN_SINCE] = time.time() - 9 * 3600  # ... whose session then expired
    demo.click().run()
    assert not app.exception
    assert not queued(held_queue)
    assert "wait for the teacher" in app.info[0].value


def test_the_admin_signs_in_and_out(classroom):
    app = sidebar()
    assert role(app) == "role: viewer"
    assert "The teacher signs in to train" in app.sidebar.caption[0].value
    sign_in(app, PASSWORD)
    assert role(app) == "role: admin"
    assert app.sidebar.success[0].value.startswith("Signed in as admin (for ")
    app.sidebar.button(key="access.sign_out").click().run()
    assert role(app) == "role: viewer"


def test_the_signed_in_admin_can_train(classroom, held_queue):
    app = session()
    app.session_state[ADMIN_SINCE] = time.time()  # what a sign-in leaves
    app.switch_page("pages/train.py").run()
    assert not app.button(key="train.all").disabled
    app.button(key="train.all").click().run()
    assert [job.config.model for job in queued(held_queue)] == list(MODEL_NAMES)
    assert not errors(app)


def test_wrong_passwords_are_throttled_and_say_how_long_to_wait(classroom):
    app = sidebar()
    for _ in range(2):
        sign_in(app, "guess")
        assert app.sidebar.error[0].value == "Wrong password."
    sign_in(app, "guess")  # the third failure: the next attempt must wait
    assert app.sidebar.error[0].value == "Wrong password. Too many failed attempts: try again in 2 s."
    sign_in(app, PASSWORD)  # the right password, but during the wait: refused unchecked
    assert "Too many failed attempts: try again in" in app.sidebar.error[0].value
    assert role(app) == "role: viewer"
    other = sidebar()  # another session is not slowed by this one's failures
    sign_in(other, PASSWORD)
    assert role(other) == "role: admin"


def test_the_admin_session_expires(classroom, monkeypatch):
    monkeypatch.setenv(access.SESSION_HOURS_ENV, "8")
    app = sidebar()
    sign_in(app, PASSWORD)
    assert role(app) == "role: admin"
    app.session_state[ADMIN_SINCE] = time.time() - 8 * 3600 - 1
    app.run()
    assert role(app) == "role: viewer"
    assert "The admin session expired" in app.sidebar.warning[0].value
    assert app.sidebar.text_input(key="access.password"), "the form is back"


def test_the_queue_limit_refuses_a_batch_with_a_clear_message(runs_dir, held_queue, monkeypatch):
    monkeypatch.setenv(access.QUEUE_LIMIT_ENV, "4")
    app = session("train")  # no classroom: everyone administers, the limit still holds
    app.button(key="train.all").click().run()
    assert not queued(held_queue)
    (message,) = errors(app)
    assert message.startswith("Not queued: this session already has 0 job(s) queued or running and may have at "
                              "most 4; 5 more would exceed that.")
    app.multiselect(key="widget.models").set_value(["resnet18"])
    app.button(key="train.start").click().run()
    assert len(queued(held_queue)) == 1, "one run fits"
    assert held_queue.snapshot().current.job_id == held_queue.hold_id, "the running job goes on"


def test_first_visit_opens_on_start_and_its_button_queues_the_train_pages_five(runs_dir, held_queue):
    app = session()
    assert app.title[0].value == "Start"
    app.button(key="start.demo").click().run()
    assert not app.exception
    jobs = queued(held_queue)
    assert [job.config for job in jobs] == [dataclasses.replace(PRESETS["quick"], model=m) for m in MODEL_NAMES]
    assert all(job.data == DataSpec() and job.group == "Train all five" for job in jobs)
    assert "The demo runs are training: 0 of 5 done, waiting behind ResNet18" in app.info[0].value
    compare = session("compare")
    assert "The demo runs are training: 0 of 5 done" in compare.info[0].value
    explain = session("explain")
    assert "The demo runs are training: 0 of 5 done" in explain.info[0].value


def test_with_runs_the_app_opens_on_data(runs_dir, tiny_run):
    from pages.common import trained_runs_in

    trained_runs_in.clear()
    app = session()
    assert app.title[0].value == "Data"
