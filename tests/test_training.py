import dataclasses
import json
import threading

import pandas as pd
import pytest
import torch

import core.training.loop
from core.data.datasets import prepare_data
from core.runs import STATUSES
from core.training.callbacks import TrainingCallback
from core.training.loop import run_training
from tests.conftest import TINY_CONFIG, TINY_SYNTHETIC

RUN_KEYS = {"run_id", "model", "config", "dataset", "weights", "status", "history", "metrics", "environment"}
HISTORY_KEYS = {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_auc", "lr", "seconds"}
METRIC_KEYS = {"accuracy", "precision", "recall", "specificity", "f1", "auc", "kappa", "g_mean", "mcc",
               "balanced_accuracy", "confusion_matrix"}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return prepare_data(TINY_SYNTHETIC, TINY_CONFIG, tmp_path_factory.mktemp("cache"))


class Recorder(TrainingCallback):
    def __init__(self, stop_after_batches=None, stop=None):
        self.events, self.batches, self.stop_after, self.stop = [], 0, stop_after_batches, stop

    def on_run_start(self, run):
        self.events.append("start")

    def on_batch_end(self, progress):
        self.batches += 1
        assert 0 < progress.fraction_done <= 1 and progress.images_per_second > 0
        if self.stop_after and self.batches >= self.stop_after:
            self.stop.set()

    def on_epoch_end(self, record):
        self.events.append(f"epoch{record.epoch}")

    def on_run_end(self, run):
        self.events.append(run["status"])


def test_a_run_writes_the_documented_folder(tiny_data, store):
    recorder = Recorder()
    run = run_training(dataclasses.replace(TINY_CONFIG, epochs=2), tiny_data, store, [recorder])
    assert run["status"] == "completed", run.get("error")
    assert recorder.events == ["start", "epoch1", "epoch2", "completed"]
    folder = store.root / run["run_id"]
    stored = json.loads((folder / "run.json").read_text())
    assert RUN_KEYS <= set(stored)
    assert stored["config"]["image_size"] == 32 and stored["config"]["epochs"] == 2
    assert stored["weights"] == "random"
    assert {"name", "format", "path", "fingerprint", "class_counts"} <= set(stored["dataset"])
    assert [set(entry) for entry in stored["history"]] == [HISTORY_KEYS, HISTORY_KEYS]
    for block in ("train", "val", "test"):
        assert METRIC_KEYS <= set(stored["metrics"][block])
    assert {"torch", "device", "threads", "precision"} <= set(stored["environment"])
    state = torch.load(folder / "model.pt", weights_only=True)
    assert "fc.weight" in state
    predictions = pd.read_csv(folder / "predictions.csv")
    assert list(predictions.columns) == ["image_id", "split", "label", "prob_malignant"]
    assert set(predictions["split"]) == {"val", "test"}
    assert len(predictions) == len(tiny_data.indices("val")) + len(tiny_data.indices("test"))
    assert predictions["prob_malignant"].between(0, 1).all()
    split = pd.read_csv(folder / "split.csv")
    assert len(split) == len(tiny_data.table)
    assert store.list_runs()[0]["run_id"] == run["run_id"]


def test_same_seed_same_result(tiny_data, store):
    first = run_training(TINY_CONFIG, tiny_data, store)
    second = run_training(TINY_CONFIG, tiny_data, store)
    assert first["history"][0]["train_loss"] == pytest.approx(second["history"][0]["train_loss"], rel=1e-5)


def test_stop_request_ends_the_run_cleanly(tiny_data, store):
    stop = threading.Event()
    recorder = Recorder(stop_after_batches=1, stop=stop)
    run = run_training(dataclasses.replace(TINY_CONFIG, epochs=3), tiny_data, store, [recorder], stop)
    assert run["status"] == "stopped"
    assert recorder.batches == 1 and recorder.events[-1] == "stopped"
    assert not (store.root / run["run_id"] / "model.pt").exists(), "no epoch finished, nothing to keep"


def test_stop_after_an_epoch_keeps_the_best_checkpoint(tiny_data, store):
    stop = threading.Event()
    batches_per_epoch = -(-len(tiny_data.indices("train")) // TINY_CONFIG.batch_size)
    recorder = Recorder(stop_after_batches=batches_per_epoch + 1, stop=stop)
    run = run_training(dataclasses.replace(TINY_CONFIG, epochs=3), tiny_data, store, [recorder], stop)
    assert run["status"] == "stopped" and run["best_epoch"] == 1
    assert (store.root / run["run_id"] / "model.pt").exists()
    assert "test" in run["metrics"]


def test_non_finite_loss_ends_as_diverged(tiny_data, store, monkeypatch):
    class NanLoss(torch.nn.CrossEntropyLoss):
        def forward(self, logits, targets):
            return super().forward(logits, targets) * float("nan")

    monkeypatch.setattr(core.training.loop.nn, "CrossEntropyLoss", NanLoss)
    run = run_training(TINY_CONFIG, tiny_data, store)
    assert run["status"] == "diverged"
    assert "diverged" in run["error"] and "learning rate" in run["error"]


def test_a_crash_is_stored_as_failed(tiny_data, store, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(core.training.loop, "train_one_epoch", broken)
    run = run_training(TINY_CONFIG, tiny_data, store)
    assert run["status"] == "failed" and "out of memory" in run["error"]
    assert (store.root / run["run_id"] / "traceback.txt").exists()
    assert run["status"] in STATUSES


def test_best_epoch_is_chosen_on_validation_not_test(tiny_data, store, monkeypatch):
    aucs = iter([0.9, 0.6, 0.7])
    monkeypatch.setattr(core.training.loop, "safe_auc", lambda labels, probabilities: next(aucs))
    run = run_training(dataclasses.replace(TINY_CONFIG, epochs=3), tiny_data, store)
    assert run["best_epoch"] == 1


@pytest.mark.parametrize("switch", ["augment", "weighted_sampler", "scheduler"])
def test_every_recipe_piece_can_be_switched_off(tiny_data, store, switch):
    run = run_training(dataclasses.replace(TINY_CONFIG, **{switch: False}), tiny_data, store)
    assert run["status"] == "completed" and run["config"][switch] is False
