"""How training reports progress: callbacks whose hooks do nothing by default (no UI code in core/)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BatchProgress:
    run_id: str
    model: str
    epoch: int  # 1-based
    epochs: int
    batch: int  # 1-based, within the epoch
    batches: int
    loss: float  # running mean over the epoch so far
    images_per_second: float
    elapsed_seconds: float  # since the run started
    eta_seconds: float  # for the whole run

    @property
    def fraction_done(self) -> float:
        return ((self.epoch - 1) * self.batches + self.batch) / (self.epochs * self.batches)


@dataclass(frozen=True)
class EpochRecord:
    """One entry of run.json's history."""

    epoch: int
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    val_auc: float
    lr: float
    seconds: float


class TrainingCallback:
    """Subclass and override what you need; every hook is optional."""

    def on_run_start(self, run: dict) -> None:
        """`run` is the run.json content as written at the start (status 'running')."""

    def on_batch_end(self, progress: BatchProgress) -> None:
        pass

    def on_epoch_end(self, record: EpochRecord) -> None:
        pass

    def on_run_end(self, run: dict) -> None:
        """`run` is the final run.json content."""

    def on_warning(self, message: str) -> None:
        pass


class CallbackList(TrainingCallback):
    """Fans every hook out to several callbacks."""

    def __init__(self, callbacks=()) -> None:
        self.callbacks = [c for c in callbacks if c is not None]

    def on_run_start(self, run: dict) -> None:
        for callback in self.callbacks:
            callback.on_run_start(run)

    def on_batch_end(self, progress: BatchProgress) -> None:
        for callback in self.callbacks:
            callback.on_batch_end(progress)

    def on_epoch_end(self, record: EpochRecord) -> None:
        for callback in self.callbacks:
            callback.on_epoch_end(record)

    def on_run_end(self, run: dict) -> None:
        for callback in self.callbacks:
            callback.on_run_end(run)

    def on_warning(self, message: str) -> None:
        for callback in self.callbacks:
            callback.on_warning(message)
