"""One Optuna study shared by several workers (`--storage URL`): `python -m core tune` and `ablate` started
twice at once, as on two machines with their own run stores, against PostgreSQL (the server .ci/run starts)
and an SQLite file; and a storage that cannot be reached."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import optuna
import pytest

from core.cli import main
from core.runs import RunStore
from core.training.shared_ablation import load_shared_ablation
from core.training.study_storage import open_storage

ROOT = Path(__file__).resolve().parents[1]
TINY_FLAGS = ["--data", "synthetic", "--synthetic-count", "40", "--synthetic-image-size", "32", "--image-size", "32",
              "--epochs", "1", "--batch-size", "8", "--no-pretrained", "--precision", "fp32", "--split", "70:30"]
GRID_FLAGS = ["--kind", "grid", "--splits", "80:20,70:30,60:40", "--epochs-grid", "1"]
GRID_CELLS = ["80:20 x 1 epochs", "70:30 x 1 epochs", "60:40 x 1 epochs"]


@pytest.fixture
def postgres_url() -> str:
    """The database .ci/run starts (SKIN_TEST_POSTGRES_URL): skipped on a machine without one, failed in CI."""
    url = os.environ.get("SKIN_TEST_POSTGRES_URL")
    if not url:
        if os.environ.get("CI"):
            pytest.fail("SKIN_TEST_POSTGRES_URL is not set: .ci/run starts PostgreSQL and sets it")
        pytest.skip("no PostgreSQL: `.ci/postgres start DIR` prints a URL for SKIN_TEST_POSTGRES_URL")
    return url


def run_workers(command: list[str], storage: str, study: str, runs_dirs: list[Path]) -> list[tuple[str, str]]:
    """The same command in one process per run store, all at once; (stdout, stderr) of each."""
    # One thread each: the workers share the machine's cores instead of fighting over them.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    workers = [subprocess.Popen([sys.executable, "-m", "core", *command, *TINY_FLAGS, "--storage", storage,
                                 "--study", study, "--runs-dir", str(runs_dir)], cwd=ROOT, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE) for runs_dir in runs_dirs]
    outputs = [worker.communicate(timeout=600) for worker in workers]
    for worker, (_, err) in zip(workers, outputs):
        assert worker.returncode == 0, err
    return outputs


@pytest.mark.slow
def test_two_tune_workers_share_one_postgres_study(postgres_url, tmp_path):
    study_name = f"tune-{uuid.uuid4().hex[:8]}"
    runs_dirs = [tmp_path / "machine-a", tmp_path / "machine-b"]
    outputs = run_workers(["tune", "--model", "resnet18", "--trials", "2", "--pruner", "none"], postgres_url,
                          study_name, runs_dirs)

    study = optuna.load_study(study_name=study_name, storage=open_storage(postgres_url))
    assert [trial.number for trial in study.trials] == [0, 1, 2, 3], "both workers' trials are in the one study"
    assert all(trial.state.name == "COMPLETE" for trial in study.trials)
    parameters = [tuple(sorted(trial.params.items())) for trial in study.trials]
    assert len(set(parameters)) == 4, f"two workers drew the same parameters: {parameters}"
    trained = [{run["tags"]["trial"]: run["run_id"] for run in RunStore(runs_dir).list_runs()}
               for runs_dir in runs_dirs]
    assert [len(runs) for runs in trained] == [2, 2], "each worker ran its own --trials"
    assert sorted([*trained[0], *trained[1]]) == [0, 1, 2, 3], "no trial was run twice"
    assert {**trained[0], **trained[1]} == {trial.number: trial.user_attrs["run_id"] for trial in study.trials}
    best = [re.findall(r"best trial (\d+): val AUC ([\d.]+)", err) for _, err in outputs]
    assert best[0] == best[1] == [(str(study.best_trial.number), f"{study.best_trial.value:.4f}")], best
    for out, _ in outputs:
        assert len(re.findall(r"COMPLETE", out)) == 4, "each worker prints the whole study"


@pytest.mark.slow
@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_two_ablate_workers_split_the_grid(database, tmp_path, request):
    storage = (f"sqlite:///{tmp_path / 'shared.db'}" if database == "sqlite"
               else request.getfixturevalue("postgres_url"))
    study_name = f"grid-{uuid.uuid4().hex[:8]}"
    runs_dirs = [tmp_path / "machine-a", tmp_path / "machine-b"]
    outputs = run_workers(["ablate", *GRID_FLAGS], storage, study_name, runs_dirs)

    trained = [[run["tags"]["cell"] for run in RunStore(runs_dir).list_runs()] for runs_dir in runs_dirs]
    assert all(trained), f"both workers trained cells: {trained}"
    assert sorted([*trained[0], *trained[1]]) == sorted(GRID_CELLS), f"every cell once: {trained}"
    shared = load_shared_ablation(storage, study_name)
    assert shared.completed == GRID_CELLS and not shared.running and not shared.failed
    assert {"AUC", "AUC low", "AUC high", "Test acc", "Train acc", "Recall", "Specificity"} <= set(shared.table.columns)
    assert shared.table["Test acc"].between(0, 1).all()
    for out, _ in outputs:
        assert all(cell in out for cell in GRID_CELLS), "each worker prints the whole grid"

    # Run again on a third machine: nothing is left to train, and it prints the grid from the database.
    third = tmp_path / "machine-c"
    assert main(["ablate", *GRID_FLAGS, *TINY_FLAGS, "--storage", storage, "--study", study_name,
                 "--runs-dir", str(third)]) == 0
    assert RunStore(third).list_runs() == [], "a finished cell is never run again"
    study = optuna.load_study(study_name=study_name, storage=open_storage(storage))
    assert sum("run_id" in trial.user_attrs for trial in study.trials) == 3


def test_workers_starting_at_once_on_an_empty_database_all_get_in(postgres_url):
    """Optuna's tables, created by six workers at once, collide (optuna/optuna#1092): the losers try again."""
    import threading

    import sqlalchemy

    server = sqlalchemy.engine.make_url(postgres_url).set(drivername="postgresql+psycopg2")
    admin = sqlalchemy.create_engine(server, isolation_level="AUTOCOMMIT")
    name = f"empty_{uuid.uuid4().hex[:8]}"
    with admin.connect() as connection:
        connection.exec_driver_sql(f"CREATE DATABASE {name}")
    try:
        url, barrier, errors = server.set(database=name).render_as_string(hide_password=False), threading.Barrier(6), []

        def worker() -> None:
            barrier.wait()
            try:
                optuna.create_study(study_name="one", storage=open_storage(url), load_if_exists=True)
            except Exception as error:  # noqa: BLE001 - any failure of any worker is the finding
                errors.append(repr(error))

        threads = [threading.Thread(target=worker) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        assert [summary.study_name for summary in optuna.get_all_study_summaries(open_storage(url))] == ["one"]
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f"DROP DATABASE {name} WITH (FORCE)")


def test_the_cell_of_a_worker_that_died_goes_to_another(tmp_path, monkeypatch):
    import time

    from core.training import study_storage
    from core.training.ablation import grid_cells
    from core.training.shared_ablation import CELL_PARAMETER, open_shared_study, run_shared_ablation
    from tests.conftest import TINY_CONFIG, TINY_SYNTHETIC

    monkeypatch.setattr(study_storage, "HEARTBEAT_SECONDS", 1)
    monkeypatch.setattr(study_storage, "GRACE_SECONDS", 2)
    storage = open_storage(f"sqlite:///{tmp_path / 'shared.db'}")
    cells = grid_cells(TINY_CONFIG, ["70:30"], [1])
    # A worker takes the only cell, records one heartbeat and dies.
    with pytest.warns(UserWarning, match="Heartbeat"):  # Optuna's reminder that a worker's heartbeat needs optimize
        dead = open_shared_study(storage, "grid", cells).ask()
    dead.suggest_categorical(CELL_PARAMETER, [cell.key for cell in cells])
    storage.record_heartbeat(storage.get_trial_id_from_study_id_trial_number(
        storage.get_study_id_from_name("grid"), dead.number))
    time.sleep(0.5)
    waited = []
    shared = run_shared_ablation(TINY_SYNTHETIC, cells, RunStore(tmp_path / "runs"), "grid", storage,
                                 on_wait=waited.append, poll_seconds=0.5)
    assert waited == [["70:30 x 1 epochs"]], "the cell was running elsewhere: the worker waited"
    assert shared.completed == ["70:30 x 1 epochs"] and len(RunStore(tmp_path / "runs").list_runs()) == 1
    states = [trial.state.name for trial in optuna.load_study(study_name="grid", storage=storage).trials]
    assert states == ["FAIL", "COMPLETE"], "the dead worker's trial failed by its stopped heartbeat, then retried"


def test_the_ablation_page_shows_a_shared_grid(tmp_path, monkeypatch):
    storage, study_name = f"sqlite:///{tmp_path / 'shared.db'}", "shared-grid"
    assert main(["ablate", "--kind", "grid", "--splits", "70:30", "--epochs-grid", "1", *TINY_FLAGS,
                 "--storage", storage, "--study", study_name, "--runs-dir", str(tmp_path / "elsewhere")]) == 0

    from pages.common import VALUE_PREFIX
    from tests.test_tuning import page_session

    app, _ = page_session(tmp_path, monkeypatch, "ablation")
    app.session_state[VALUE_PREFIX + "ablation_kind"] = "Split x epochs grid"
    app.session_state[VALUE_PREFIX + "ablation_storage"] = storage
    app.session_state[VALUE_PREFIX + "ablation_study_Spli"] = study_name
    app.run()
    assert not app.exception, app.exception
    assert any("1 of 1 cells completed in shared study" in caption.value for caption in app.caption)
    (cells,) = [frame.value for frame in app.dataframe if "Cell" in frame.value.columns]
    assert list(cells["Cell"]) == ["70:30 x 1 epochs"]
    assert len(app.get("plotly_chart")) == 2, "the grid's heatmap and the train/test accuracy bars"

    app.session_state[VALUE_PREFIX + "ablation_storage"] = "postgresql://user:secret@127.0.0.1:1/optuna"
    app.run()
    assert not app.exception, app.exception
    assert [error.value for error in app.error if "host 127.0.0.1" in error.value and "secret" not in error.value]


def test_the_tune_page_names_an_unreachable_host_without_its_password(tmp_path, monkeypatch):
    from pages.common import VALUE_PREFIX
    from tests.test_tuning import page_session

    app, _ = page_session(tmp_path, monkeypatch, "tune")
    app.session_state[VALUE_PREFIX + "tune_storage"] = "postgresql://user:secret@127.0.0.1:1/optuna"
    app.run()
    assert not app.exception, app.exception
    errors = [error.value for error in app.error]
    assert len(errors) == 1 and "host 127.0.0.1" in errors[0] and "secret" not in errors[0], errors


@pytest.mark.parametrize("command", [["tune", "--model", "resnet18", "--trials", "1"], ["ablate", *GRID_FLAGS]])
@pytest.mark.parametrize("url, host", [("postgresql://user:secret@nohost.invalid/optuna", "nohost.invalid"),
                                       ("postgresql://user:secret@127.0.0.1:1/optuna", "127.0.0.1")])
def test_an_unreachable_storage_is_one_line_naming_the_host(command, url, host, tmp_path, capfd):
    assert main([*command, *TINY_FLAGS, "--storage", url, "--runs-dir", str(tmp_path / "runs")]) == 2
    err = capfd.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and f"host {host}" in err, err
    assert "secret" not in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists() or not RunStore(tmp_path / "runs").list_runs()
