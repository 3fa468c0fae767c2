"""Optuna search and the ablation study on tiny data: persistence, resume, pruning, CLI."""

import dataclasses

import optuna
import pytest

from core.cli import main
from core.data.datasets import prepare_data
from core.runs import RunStore
from core.training.ablation import component_cells, grid_cells, run_ablation
from core.training.tuning import parallel_coordinates_figure, readable_trials_table, run_study, trials_table
from tests.conftest import TINY_CONFIG, TINY_SYNTHETIC

TWO_EPOCHS = dataclasses.replace(TINY_CONFIG, epochs=2)


class AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study, trial):
        return True


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return prepare_data(TINY_SYNTHETIC, TWO_EPOCHS, tmp_path_factory.mktemp("cache"))


def test_study_persists_and_continues(tiny_data, store):
    steps = []
    study = run_study(tiny_data, TWO_EPOCHS, store, "demo", trials=2, pruner="none", on_step=steps.append)
    assert len(study.trials) == 2 and all(trial.state.name == "COMPLETE" for trial in study.trials)
    train_images = len(tiny_data.indices("train"))
    assert [step.describe() for step in steps] == ["trial 1 of 2", "trial 2 of 2"]
    assert [len(step.later) for step in steps] == [1, 0]
    assert steps[0].current.images == 2 * train_images, "two epochs over the training part"
    assert (store.root / "optuna.db").exists()
    assert all(0 <= trial.value <= 1 for trial in study.trials)
    runs = store.list_runs()
    assert sorted(run["tags"]["trial"] for run in runs) == [0, 1]
    assert {run["config"]["lr"] for run in runs} == {trial.params["lr"] for trial in study.trials}
    again = run_study(tiny_data, TWO_EPOCHS, store, "demo", trials=1, pruner="none")
    assert len(again.trials) == 3, "the second call continued the study"
    assert again.trials[2].params != again.trials[0].params, "a continued study does not replay its first trial"
    table = trials_table(again)
    assert {"number", "state", "value", "lr", "weight_decay", "dropout", "run_id"} <= set(table.columns)
    readable = readable_trials_table(again)
    assert list(readable.columns) == ["Trial", "Validation AUC", "Learning rate", "Weight decay", "Dropout", "State",
                                      "Duration", "Run"]
    assert list(readable["State"]) == ["complete"] * 3 and (readable["Duration"] > 0).all()
    assert list(readable["Learning rate"]) == [trial.params["lr"] for trial in again.trials], "not rounded"
    figure = parallel_coordinates_figure(again)
    assert figure.layout.margin.l >= 80 and figure.layout.margin.r >= 80 and figure.layout.margin.b >= 80
    assert list(figure.layout.xaxis.ticktext) == ["Validation AUC", "Dropout", "Learning rate", "Weight decay"]


def test_bad_trials_are_pruned_after_an_epoch(tiny_data, store):
    study = run_study(tiny_data, dataclasses.replace(TINY_CONFIG, epochs=4), store, "pruning", trials=1,
                      pruner=AlwaysPrune())
    trial = study.trials[0]
    assert trial.state.name == "PRUNED"
    run = store.load(trial.user_attrs["run_id"])
    assert run["status"] == "stopped" and len(run["history"]) == 1
    assert not run["resumable"], "a pruned trial keeps no optimizer state"


def test_a_trial_cut_by_the_studys_stop_reads_stopped(tiny_data, store):
    import threading

    from core.training.callbacks import TrainingCallback
    from core.training.tuning import describe_parameters

    stop = threading.Event()

    class StopAtFirstBatch(TrainingCallback):
        def on_batch_end(self, progress) -> None:
            stop.set()

    study = run_study(tiny_data, TWO_EPOCHS, store, "cut", trials=3, pruner="none", callbacks=[StopAtFirstBatch()],
                      stop=stop)
    assert len(study.trials) == 1 and study.trials[0].state.name == "FAIL", "the study ended with the stop"
    assert list(readable_trials_table(study)["State"]) == ["stopped"]
    assert describe_parameters({"lr": 6.25e-4, "weight_decay": 6.03e-7, "dropout": 0.0936}) == (
        "learning rate 6.25e-04, weight decay 6.03e-07, dropout 0.094")


def test_component_ablation_runs_each_step_once(store):
    cells = component_cells(TINY_CONFIG)
    assert [cell.config.model for cell in cells] == ["resnet18"] * 4 + ["hybrid_sresnet"]
    assert not cells[0].config.augment and cells[1].config.augment and cells[2].config.weighted_sampler
    assert cells[0].config.label_smoothing == 0 and cells[3].config.label_smoothing > 0 and cells[4].config.scheduler
    steps = []
    done = run_ablation(TINY_SYNTHETIC, cells, store, "components", on_step=steps.append)
    assert len(done) == 5 and len(store.list_runs()) == 5
    assert [step.describe() for step in steps][1] == "cell 2 of 5 (+ augmentation)"
    assert [len(step.later) for step in steps] == [4, 3, 2, 1, 0]
    assert len({run["dataset"]["split_fingerprint"] for run in done.values()}) == 1, "one split for every step"
    again = run_ablation(TINY_SYNTHETIC, cells, store, "components", on_step=steps.append)
    assert len(store.list_runs()) == 5, "finished cells are not redone"
    assert len(steps) == 5, "no step is reported for a cell already done"
    assert {run["run_id"] for run in again.values()} == {run["run_id"] for run in done.values()}


def test_an_interrupted_ablation_cell_continues_from_its_last_epoch(store):
    import threading

    from core.training.callbacks import TrainingCallback

    cells = component_cells(dataclasses.replace(TINY_CONFIG, epochs=3))[:1]
    stop = threading.Event()

    class StopAfterFirstEpoch(TrainingCallback):
        def on_epoch_end(self, record) -> None:
            stop.set()

    assert run_ablation(TINY_SYNTHETIC, cells, store, "cut", [StopAfterFirstEpoch()], stop) == {}
    (stopped,) = store.list_runs()
    assert stopped["status"] == "stopped" and stopped["resumable"]
    epochs = []

    class Epochs(TrainingCallback):
        def on_epoch_end(self, record) -> None:
            epochs.append(record.epoch)

    done = run_ablation(TINY_SYNTHETIC, cells, store, "cut", [Epochs()])
    assert epochs == [2, 3], "the cell went on from epoch 2 instead of starting again"
    assert [run["run_id"] for run in done.values()] == [stopped["run_id"]] and len(store.list_runs()) == 1


def test_grid_cells_cover_split_and_epochs():
    cells = grid_cells(TINY_CONFIG, ["80:20", "60:40"], [1, 2])
    assert [cell.key for cell in cells] == ["80:20 x 1 epochs", "80:20 x 2 epochs", "60:40 x 1 epochs",
                                            "60:40 x 2 epochs"]
    models = grid_cells(TINY_CONFIG, ["80:20"], [1], ["resnet18", "densenet121"])
    assert [(cell.key, cell.config.model) for cell in models] == [("ResNet18 80:20 x 1 epochs", "resnet18"),
                                                                  ("DenseNet121 80:20 x 1 epochs", "densenet121")]


TINY_FLAGS = ["--data", "synthetic", "--synthetic-count", "40", "--synthetic-image-size", "32", "--image-size", "32",
              "--epochs", "1", "--batch-size", "8", "--no-pretrained", "--precision", "fp32", "--split", "70:30"]


def test_cli_tune_and_ablate(tmp_path, capsys):
    runs_dir = str(tmp_path / "runs")
    assert main(["tune", "--model", "resnet18", "--trials", "2", *TINY_FLAGS, "--runs-dir", runs_dir]) == 0
    assert "run_id" in capsys.readouterr().out
    assert main(["ablate", "--kind", "grid", "--splits", "70:30", "--epochs-grid", "1", "--models",
                 "resnet18,hybrid_sresnet", *TINY_FLAGS, "--runs-dir", runs_dir]) == 0
    out = capsys.readouterr().out
    assert "ResNet18 70:30 x 1 epochs" in out and "Hybrid S-ResNet 70:30 x 1 epochs" in out
    cells = [run for run in RunStore(runs_dir).list_runs() if "cell" in (run.get("tags") or {})]
    assert sorted(run["model"] for run in cells) == ["hybrid_sresnet", "resnet18"]
    assert main(["ablate", "--kind", "grid", "--models", "resnet19", *TINY_FLAGS, "--runs-dir", runs_dir]) == 2
    assert "--models wants names from resnet18" in capsys.readouterr().err


def page_session(tmp_path, monkeypatch, page):
    import time
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    from pages.common import DATA_SPEC, VALUE_PREFIX
    from tests.test_pages import TINY_VALUES

    monkeypatch.setenv("SKIN_RUNS_DIR", str(tmp_path / "runs"))
    app = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "streamlit_app.py"), default_timeout=60)
    for name, value in TINY_VALUES.items():
        app.session_state[VALUE_PREFIX + name] = value
    app.session_state[DATA_SPEC] = TINY_SYNTHETIC
    app.run()
    app.switch_page(f"pages/{page}.py").run()
    assert not app.exception, app.exception

    def wait_for(condition, timeout=180):
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.5)
            app.run()
            assert not app.exception, app.exception

    return app, wait_for


def test_tune_page_runs_a_tiny_study_and_trains_with_best(tmp_path, monkeypatch):
    app, wait_for = page_session(tmp_path, monkeypatch, "tune")
    assert "No studies yet" in app.info[0].value
    app.number_input(key="widget.tune_trials").set_value(2)
    app.selectbox(key="widget.tune_model").set_value("resnet18").run()
    app.button(key="tune.start").click().run()
    wait_for(lambda: any("Validation AUC" in frame.value.columns and len(frame.value) == 2
                         and set(frame.value["State"]) <= {"complete", "pruned", "fail"} for frame in app.dataframe))
    assert len(app.get("plotly_chart")) >= 2, "optimisation history and parallel coordinates"
    assert any("need at least 5 finished trials" in caption.value for caption in app.caption)
    app.button(key="tune.train_best").click().run()
    assert not app.exception


@pytest.mark.slow
def test_ablation_page_runs_the_components_and_shows_results(tmp_path, monkeypatch):
    app, wait_for = page_session(tmp_path, monkeypatch, "ablation")
    app.button(key="ablation.start").click().run()
    wait_for(lambda: any("5 of 5 cells completed" in caption.value for caption in app.caption))
    assert len(app.get("plotly_chart")) == 2
    cells = [frame.value for frame in app.dataframe if "Cell" in frame.value.columns][0]
    assert cells["Cell"].iloc[-1].startswith("+ cosine scheduler")


def test_a_finished_worker_waits_for_a_shared_studys_trials_still_to_start(tmp_path):
    """Between two trials of another worker nothing in the study is RUNNING: a worker that has finished its own
    trials still waits for that worker's last one, then returns; a worker silent for GRACE_SECONDS is not
    waited for. (Two `tune` workers once printed different studies this way.)"""
    import threading
    import time
    from datetime import datetime

    from core.training.study_storage import (
        GRACE_SECONDS,
        WORKER_PREFIX,
        StudyWorker,
        open_storage,
        wait_for_trials_elsewhere,
    )

    storage = open_storage(f"sqlite:///{tmp_path / 'shared.db'}")
    study = optuna.create_study(study_name="shared", storage=storage, direction="maximize")
    other = StudyWorker(optuna.load_study(study_name="shared", storage=storage), trials=1)
    returned = threading.Event()

    def wait() -> None:
        wait_for_trials_elsewhere(study, datetime.now(), threading.Event(), poll_seconds=0.02)
        returned.set()

    waiter = threading.Thread(target=wait)
    waiter.start()
    assert not returned.wait(0.3), "returned while the other worker had a trial yet to start"
    trial = other.study.ask()
    other.started_one()
    assert not returned.wait(0.2), "returned while the other worker's trial was running"
    other.study.tell(trial, 0.7)
    other.finished()
    assert returned.wait(30)
    waiter.join()

    study.set_user_attr(f"{WORKER_PREFIX}gone", {"left": 3, "at": time.time() - GRACE_SECONDS - 1})
    give_up = threading.Event()
    timer = threading.Timer(30, give_up.set)
    timer.start()
    wait_for_trials_elsewhere(study, datetime.now(), give_up, poll_seconds=0.02)
    timer.cancel()
    assert not give_up.is_set(), "waited for a worker silent for longer than the grace period"
