"""Every page through Streamlit's AppTest: widgets set by key, no exceptions, a tiny run from the Train page."""

import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from pages.common import DATA_SPEC, SEEN_FINISHED, VALUE_PREFIX
from tests.conftest import TINY_SYNTHETIC

APP = str(Path(__file__).resolve().parents[1] / "streamlit_app.py")
TINY_VALUES = {"epochs": 1, "batch_size": 8, "image_size": 32, "pretrained": False, "split": "70:30",
               "val_fraction": 0.25, "synthetic_count": 40, "synthetic_image_size": 64}


@pytest.fixture
def app(tmp_path, monkeypatch):
    monkeypatch.setenv("SKIN_RUNS_DIR", str(tmp_path / "runs"))
    test = AppTest.from_file(APP, default_timeout=60)
    for name, value in TINY_VALUES.items():
        test.session_state[VALUE_PREFIX + name] = value
    return test


def open_page(app: AppTest, page: str) -> AppTest:
    app.run()
    app.switch_page(f"pages/{page}.py").run()
    assert not app.exception, app.exception
    return app


def test_data_page_shows_the_synthetic_set(app):
    open_page(app, "data")
    assert app.title[0].value == "Data"
    assert [metric.value for metric in app.metric] == ["40", "26", "14", "0"]
    assert app.session_state[DATA_SPEC].synthetic_count == 40
    app.slider(key="widget.confounder_fraction").set_value(0.5).run()
    assert not app.exception
    assert app.session_state[DATA_SPEC].confounder_fraction == 0.5


def test_data_page_bad_path_gives_a_clear_message_and_keeps_the_last_good_dataset(app, tmp_path):
    open_page(app, "data")
    app.radio(key="widget.source_kind").set_value("Local dataset").run()
    app.text_input(key="widget.data_path").input(str(tmp_path / "no-such-folder")).run()
    assert not app.exception
    assert "dataset path not found" in app.error[0].value
    assert app.session_state[DATA_SPEC].is_synthetic


def test_data_page_reads_an_image_folder(app, image_folder):
    open_page(app, "data")
    app.radio(key="widget.source_kind").set_value("Local dataset").run()
    app.text_input(key="widget.data_path").input(str(image_folder)).run()
    assert not app.exception and not app.error
    assert app.metric[0].value == "20"
    assert app.session_state[DATA_SPEC].source == str(image_folder)


def test_paper_preset_sets_the_papers_values(app):
    open_page(app, "train")
    app.button_group(key="train.preset").set_value("Paper").run()
    assert not app.exception
    assert app.select_slider(key="widget.lr").value == pytest.approx(2.52e-4)
    assert app.selectbox(key="widget.image_size").value == 224
    app.button_group(key="train.preset").set_value("Quick demo").run()
    assert app.select_slider(key="widget.lr").value == "auto", "the quick demo: each model's own rate"


def test_a_tiny_run_started_on_the_train_page_lands_in_the_run_table(app):
    app.session_state[DATA_SPEC] = TINY_SYNTHETIC
    open_page(app, "train")
    app.number_input(key="widget.epochs").set_value(1)
    app.multiselect(key="widget.models").set_value(["resnet18"])
    app.button(key="train.start").click().run()
    assert not app.exception
    deadline = time.monotonic() + 120
    while True:
        app.run()
        assert not app.exception
        tables = [frame.value for frame in app.dataframe if "Test AUC" in frame.value.columns]
        # The run's row says completed a moment before the queue lets go of the job: the Delete click below
        # may come in that moment, when the polling fragment sees the queue change (it must not rerun the page
        # and lose the click then).
        if tables and (tables[0]["Status"] == "completed").any():
            break
        assert time.monotonic() < deadline, "the run did not finish"
        time.sleep(0.5)
    runs = tables[0]
    assert list(runs["Model"]) == ["ResNet18"] and runs["Epochs"].iloc[0] == 1 and runs["Image size"].iloc[0] == 32

    # The moment itself, for certain: the page was last drawn for another queue than the one it sees now.
    app.session_state[SEEN_FINISHED] = (-1, "a run that ended since")
    app.button(key="train.delete").click().run()
    assert "cannot be undone" in app.warning[-1].value
    app.button(key="train.delete_confirm").click().run()
    assert not app.exception
    assert not [frame for frame in app.dataframe if "Test AUC" in frame.value.columns]


def test_a_second_session_sees_the_same_run_and_can_stop_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SKIN_RUNS_DIR", str(tmp_path / "runs"))

    def session() -> AppTest:
        test = AppTest.from_file(APP, default_timeout=60)
        for name, value in TINY_VALUES.items():
            test.session_state[VALUE_PREFIX + name] = value
        test.session_state[DATA_SPEC] = TINY_SYNTHETIC
        return open_page(test, "train")

    first = session()
    first.number_input(key="widget.epochs").set_value(500)
    first.multiselect(key="widget.models").set_value(["resnet18"])
    first.button(key="train.start").click().run()
    second = session()  # another tab: a new session on the same server process
    deadline = time.monotonic() + 60
    while not any("epoch" in bar.proto.text for bar in second.get("progress")):
        assert time.monotonic() < deadline, "the second session never saw the run"
        time.sleep(0.3)
        second.run()
    assert "ResNet18: epoch" in second.get("progress")[0].proto.text
    second.button(key="train.stop").click().run()
    deadline = time.monotonic() + 60
    while True:
        first.run()
        tables = [frame.value for frame in first.dataframe if "Test AUC" in frame.value.columns]
        if tables and tables[0]["Status"].iloc[0].startswith("stopped"):
            break
        assert time.monotonic() < deadline, "the run did not stop"
        time.sleep(0.3)
    assert len(tables[0]) == 1, "one run, not one per session"


def test_a_stopped_run_resumes_from_the_train_page(app, tmp_path):
    import dataclasses
    import threading

    from core.data.datasets import prepare_data
    from core.runs import RunStore
    from core.training.loop import run_training
    from tests.conftest import TINY_CONFIG
    from tests.test_resume import StopAfterEpoch

    store = RunStore(tmp_path / "runs")
    config = dataclasses.replace(TINY_CONFIG, epochs=2)
    stop = threading.Event()
    stopped = run_training(config, prepare_data(TINY_SYNTHETIC, config, store.cache_dir), store,
                           StopAfterEpoch(1, stop), stop)
    app.session_state[DATA_SPEC] = TINY_SYNTHETIC
    open_page(app, "train")
    table = next(frame.value for frame in app.dataframe if "Test AUC" in frame.value.columns)
    assert table["Status"].iloc[0] == "stopped · resumable"
    assert app.selectbox(key="train.resume_choice").value == stopped["run_id"]
    app.button(key="train.resume").click().run()
    assert not app.exception
    deadline = time.monotonic() + 120
    while store.load(stopped["run_id"])["status"] != "completed":
        assert time.monotonic() < deadline, "the resumed run did not finish"
        time.sleep(0.3)
    app.run()
    table = next(frame.value for frame in app.dataframe if "Test AUC" in frame.value.columns)
    assert list(table["Status"]) == ["completed"] and table["Test AUC"].notna().all()


def test_no_download_button_reruns_the_page_when_clicked():
    """A click that reruns the page unlists the button's file until the rerun draws the button again; under a
    class's load two other sessions' runs finish meanwhile, Streamlit deletes the file and the browser's
    download is cancelled. Every download button therefore says on_click="ignore"."""
    import ast

    calls = []
    for path in sorted(Path(__file__).resolve().parents[1].glob("pages/*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "download_button":
                on_click = {keyword.arg: keyword.value for keyword in node.keywords}.get("on_click")
                calls.append((f"{path.name}:{node.lineno}", getattr(on_click, "value", None)))
    assert len(calls) >= 7
    assert [place for place, value in calls if value != "ignore"] == []
