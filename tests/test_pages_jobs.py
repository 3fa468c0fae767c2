"""Progress, Stop and estimates on the Train, Tune and Ablation pages, through AppTest.

The queue is given a study's job that trains nothing (it reports a step and a batch, then waits to be
stopped), so what the pages show and whom Stop stops can be checked in seconds."""

import threading
from pathlib import Path

import optuna
import pytest
from streamlit.testing.v1 import AppTest

from core.runs import RunStore
from core.training.estimates import StepProgress, WorkItem
from core.training.jobs import shared_queue
from core.training.tuning import default_storage
from pages.common import DATA_SPEC, VALUE_PREFIX
from tests.conftest import TINY_CONFIG, TINY_SYNTHETIC
from tests.test_pages import TINY_VALUES
from tests.test_progress import PROGRESS, record_run

APP = str(Path(__file__).resolve().parents[1] / "streamlit_app.py")
TRIAL = WorkItem(epochs=5, images_per_epoch=400)


@pytest.fixture
def runs_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SKIN_RUNS_DIR", str(tmp_path / "runs"))
    return tmp_path / "runs"


@pytest.fixture
def queue(runs_dir):
    """The very queue the pages use (one per process and run store)."""
    queue = shared_queue(RunStore(runs_dir))
    yield queue
    queue.clear_queue()
    queue.stop_current()
    assert queue.wait_until_idle(timeout=30)


def session(page: str) -> AppTest:
    app = AppTest.from_file(APP, default_timeout=60)
    for name, value in TINY_VALUES.items():
        app.session_state[VALUE_PREFIX + name] = value
    app.session_state[DATA_SPEC] = TINY_SYNTHETIC
    app.run()
    app.switch_page(f"pages/{page}.py").run()
    assert not app.exception, app.exception
    return app


def start_waiting_study(queue, kind: str, label: str, step: StepProgress) -> int:
    """A job of this kind that reports `step` and one batch (PROGRESS), then runs until stopped."""
    reported = threading.Event()

    def task(stop, callback):
        callback.on_step(step)
        callback.on_batch_end(PROGRESS)
        reported.set()
        stop.wait(60)
        return "stopped", "stopped by request"

    job_id = queue.submit_task(label, TINY_CONFIG, TINY_SYNTHETIC, task, kind=kind)
    assert reported.wait(30)
    return job_id


def progress_texts(app: AppTest) -> list[str]:
    return [bar.proto.text for bar in app.get("progress")]


def button_labels(app: AppTest) -> list[str]:
    return [button.label for button in app.button]


def test_another_pages_job_shows_its_progress_but_no_stop(queue):
    step = StepProgress("trial", 3, 10, current=TRIAL, later=(TRIAL,) * 7)
    job_id = start_waiting_study(queue, "tune", "Tune study hybrid-ham", step)
    ablation = session("ablation")
    (text,) = progress_texts(ablation)
    # 120 s left in this trial; 7 more trials of 2000 images at this trial's pace (120 s per 1460 images)
    # and 15 s each to build and evaluate: 1376 s.
    assert text == ("Tune study hybrid-ham: trial 3 of 10 · epoch 2/5 · batch 14/40 · 85 img/s · loss 0.500 · "
                    "about 23 min left")
    assert not [label for label in button_labels(ablation) if label.startswith("Stop")]
    assert ablation.info[0].value == ("The queue is busy with Tune study hybrid-ham (trial 3 of 10); an ablation "
                                      "started here will start after it. Stop it on the Tune page.")
    train = session("train")
    assert not [label for label in button_labels(train) if label.startswith("Stop")]
    assert "Stop it on the Tune page" in train.info[0].value

    tune = session("tune")
    stop = tune.button(key="tune.stop")
    assert stop.label == "Stop Tune study hybrid-ham"
    assert tune.button(key="tune.start").disabled, "no second study while one runs"
    assert any("The queue is busy with Tune study hybrid-ham (trial 3 of 10)" in caption.value
               for caption in tune.caption)
    stop.click().run()
    assert queue.wait_until_idle(timeout=30)
    assert [job.state for job in queue.snapshot().jobs if job.job_id == job_id] == ["stopped"]


def test_the_ablation_page_stops_its_own_study(queue):
    step = StepProgress("cell", 4, 12, name="70:30 x 50 epochs", current=TRIAL)
    start_waiting_study(queue, "ablation", "Ablation ablation-grid", step)
    app = session("ablation")
    assert progress_texts(app)[0].startswith("Ablation ablation-grid: cell 4 of 12 (70:30 x 50 epochs) · epoch 2/5")
    assert app.button(key="ablation.stop").label == "Stop Ablation ablation-grid"
    app.button(key="ablation.stop").click().run()
    assert not app.exception
    assert queue.wait_until_idle(timeout=30)
    assert queue.snapshot().jobs[-1].state == "stopped"


def test_a_long_grid_is_announced_and_needs_a_confirmation(runs_dir):
    store = RunStore(runs_dir)
    slow = record_run(store, "resnet18", 32, [1000.0], train_images=20)  # 0.02 images/s
    app = session("ablation")
    app.radio(key="widget.ablation_kind").set_value("Split x epochs grid").run()
    app.text_input(key="widget.ablation_epochs").input("1, 2").run()
    assert not app.exception
    # 3 splits x (1 + 2) epochs over 40 images' train parts (21, 18, 14 images; 80:20 rounds to 24).
    assert any(caption.value.startswith("6 of 6 cells to train (9 epochs in all): about ") for caption in app.caption)
    (warning,) = app.warning
    assert "of training on this machine, at about 0.02 training images/s" in warning.value
    assert f"measured in run {slow}" in warning.value
    (confirm,) = app.checkbox
    assert confirm.label.startswith("I understand this takes about ")
    assert app.button(key="ablation.start").disabled
    confirm.check().run()
    assert not app.button(key="ablation.start").disabled


def test_a_short_study_needs_no_confirmation_and_its_estimate_uses_the_epochs_control(runs_dir):
    app = session("tune")
    app.number_input(key="widget.tune_trials").set_value(3)
    app.number_input(key="widget.tune_epochs").set_value(2).run()
    (estimate,) = [caption.value for caption in app.caption if "trial(s) ×" in caption.value]
    assert estimate.startswith("3 trial(s) × 2 epoch(s): about ")
    assert "rough default" in estimate, "no run recorded yet: the rate is labelled as a default"
    assert not app.checkbox and not app.button(key="tune.start").disabled


def add_trials(runs_dir: Path, name: str, count: int) -> None:
    """Finished trials written straight into the study storage, as if they had trained."""
    space = {"lr": optuna.distributions.FloatDistribution(1e-5, 1e-2, log=True),
             "weight_decay": optuna.distributions.FloatDistribution(1e-7, 1e-2, log=True),
             "dropout": optuna.distributions.FloatDistribution(0.0, 0.6)}
    study = optuna.create_study(study_name=name, storage=default_storage(RunStore(runs_dir)), direction="maximize",
                                load_if_exists=True)
    study.set_user_attr("model", "resnet18")
    for number in range(count):
        params = {"lr": 2.52e-4 * (number + 1), "weight_decay": 1.99e-6 * (number + 1), "dropout": 0.1 * number}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=space, value=0.7 + 0.01 * number,
                                                  user_attrs={"run_id": f"run-{number}"}))


def test_the_trials_table_is_readable_and_importances_wait_for_five_trials(runs_dir):
    add_trials(runs_dir, "tune-hybrid_sresnet", 3)  # the page's default study
    app = session("tune")
    (trials,) = [frame for frame in app.dataframe if "Trial" in frame.value.columns]
    assert list(trials.value.columns) == ["Trial", "Validation AUC", "Learning rate", "Weight decay", "Dropout",
                                          "State", "Duration", "Run"]
    assert trials.value["Learning rate"].iloc[0] == pytest.approx(2.52e-4), "not rounded to 0.0003"
    assert trials.proto.columns  # the column configuration travels with the table
    assert '"%.2e"' in trials.proto.columns
    assert any(caption.value == "Parameter importances need at least 5 finished trials (3 so far)."
               for caption in app.caption)
    add_trials(runs_dir, "tune-hybrid_sresnet", 2)
    app.run()
    assert not app.exception
    charts = app.get("plotly_chart")
    assert len(charts) == 3, "history, parallel coordinates and importances"
