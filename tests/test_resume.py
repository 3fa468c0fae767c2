"""Resuming a stopped or killed run from its last finished epoch."""

from __future__ import annotations

import dataclasses
import json
import threading

import pytest
import torch

from core.data.datasets import prepare_data
from core.runs import RESUME_FILE
from core.training.callbacks import TrainingCallback
from core.training.loop import ResumeError, resume_training, run_training
from tests.conftest import TINY_CONFIG, TINY_SYNTHETIC, write_crafted_pickle

CONFIG = dataclasses.replace(TINY_CONFIG, model="hybrid_sresnet", epochs=3)


class StopAfterEpoch(TrainingCallback):
    def __init__(self, epoch: int, stop: threading.Event) -> None:
        self.epoch, self.stop = epoch, stop

    def on_epoch_end(self, record) -> None:
        if record.epoch == self.epoch:
            self.stop.set()


@pytest.fixture
def data(store):
    return prepare_data(TINY_SYNTHETIC, CONFIG, store.cache_dir)


def stopped_run(store, data, after_epoch=2):
    stop = threading.Event()
    run = run_training(CONFIG, data, store, StopAfterEpoch(after_epoch, stop), stop)
    assert run["status"] == "stopped" and len(run["history"]) == after_epoch
    return run


def test_a_resumed_run_equals_the_uninterrupted_run(store, data, tmp_path):
    from core.runs import RunStore

    whole = run_training(CONFIG, data, RunStore(tmp_path / "uninterrupted"))
    stopped = stopped_run(store, data)
    assert store.load(stopped["run_id"])["resumable"]

    epochs_seen = []

    class Seen(TrainingCallback):
        def on_epoch_end(self, record) -> None:
            epochs_seen.append(record.epoch)

    resumed = resume_training(stopped["run_id"], store, Seen())
    assert resumed["run_id"] == stopped["run_id"] and resumed["status"] == "completed"
    assert epochs_seen == [3]  # epochs 1 and 2 were not trained again
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    # Same weights, moments, schedule and random streams: the same numbers as without the stop.
    for mine, reference in zip(resumed["history"], whole["history"]):
        for key in ("train_loss", "val_loss", "val_auc", "lr"):
            assert mine[key] == pytest.approx(reference[key], rel=1e-5, abs=1e-6), key
    assert resumed["metrics"]["test"]["auc"] == pytest.approx(whole["metrics"]["test"]["auc"], abs=1e-6)
    assert resumed["resumes"][0]["from_epoch"] == 2
    assert not (store.root / stopped["run_id"] / RESUME_FILE).exists()  # completed: the state is dropped
    assert not store.load(stopped["run_id"])["resumable"]
    assert len(store.list_runs()) == 1


def test_a_completed_run_keeps_no_resume_state_and_cannot_be_resumed(store, data):
    run = run_training(dataclasses.replace(CONFIG, epochs=1), data, store)
    assert run["status"] == "completed"
    assert not (store.root / run["run_id"] / RESUME_FILE).exists()
    with pytest.raises(ResumeError, match="completed"):
        resume_training(run["run_id"], store)


def test_a_run_stopped_in_its_first_epoch_cannot_be_resumed(store, data):
    stop = threading.Event()
    stop.set()
    run = run_training(CONFIG, data, store, stop=stop)
    assert run["status"] == "stopped" and not store.load(run["run_id"])["resumable"]
    with pytest.raises(ResumeError, match="no resume checkpoint"):
        resume_training(run["run_id"], store)


def test_resume_refuses_different_data(store, data):
    stopped = stopped_run(store, data, after_epoch=1)
    other = prepare_data(dataclasses.replace(TINY_SYNTHETIC, synthetic_seed=2), CONFIG, store.cache_dir)
    with pytest.raises(ResumeError, match="changed"):
        resume_training(stopped["run_id"], store, data=other)
    assert store.load(stopped["run_id"])["status"] == "stopped"  # untouched by the refusal


def test_resume_loads_the_dataset_recorded_in_the_run_and_counts_training_time_only(store, data):
    stopped = stopped_run(store, data, after_epoch=1)
    path = store.root / stopped["run_id"] / "run.json"
    record = json.loads(path.read_text())
    record["created_at"] -= 3600  # stopped an hour ago: the pause is not training time
    path.write_text(json.dumps(record))
    recorded = json.loads((store.root / stopped["run_id"] / "run.json").read_text())["dataset"]["spec"]
    assert recorded["synthetic_count"] == 40
    resumed = resume_training(stopped["run_id"], store)
    assert resumed["status"] == "completed"
    assert stopped["seconds"] <= resumed["seconds"] < stopped["seconds"] + 300


def test_a_crafted_resume_checkpoint_is_refused_not_executed(store, data, tmp_path):
    stopped = stopped_run(store, data, after_epoch=1)
    marker = tmp_path / "pwned"
    write_crafted_pickle(store.root / stopped["run_id"] / RESUME_FILE, marker)
    with pytest.raises(ResumeError, match="cannot be read"):
        resume_training(stopped["run_id"], store)
    assert not marker.exists()


def test_resume_state_loads_with_weights_only(store, data):
    stopped = stopped_run(store, data, after_epoch=1)
    state = torch.load(store.resume_path(stopped["run_id"]), weights_only=True)
    assert state["epoch"] == 1 and "exp_avg" in state["optimizer"]["state"][0]


def test_a_run_being_resumed_by_another_process_is_refused(store, data):
    import subprocess
    import sys

    stopped = stopped_run(store, data, after_epoch=1)
    lock = store.root / stopped["run_id"] / ".resume.lock"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(str(holder.pid))
        with pytest.raises(ResumeError, match=f"already being resumed by process {holder.pid}"):
            resume_training(stopped["run_id"], store)
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing: its lock is taken over.
    assert resume_training(stopped["run_id"], store)["status"] == "completed"
    assert not lock.exists()
