"""The paper's training recipe: AdamW, cosine annealing, label-smoothed cross-entropy, weighted
sampling, dropout, ImageNet normalisation; every piece switchable through TrainConfig.

`run_training` is the whole run (model, precision choice, `fit`, final evaluation, run store);
`fit` is the epoch loop; `train_one_epoch` and `evaluate` are one pass each. Progress leaves through
callbacks; a `threading.Event` asks for a clean stop after the current batch.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import threading
import time
import traceback
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn

from core.augment import augment_batch, normalise, to_unit_float
from core.callbacks import BatchProgress, CallbackList, EpochRecord, TrainingCallback
from core.config import TrainConfig
from core.datasets import PreparedData
from core.environment import describe_environment, select_device
from core.metrics import compute_metrics, safe_auc
from core.models import build_model
from core.precision import ExecutionPlan, choose_execution_plan
from core.runs import RunFolder, RunStore


class DivergedError(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class TensorData:
    """A split's images as one uint8 tensor (N x 3 x H x W, channels-last in memory) and labels."""

    images: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def from_prepared(cls, data: PreparedData, split: str, device: torch.device) -> TensorData:
        rows = data.indices(split)
        # NHWC uint8 viewed as NCHW is exactly the channels_last layout: no copy of pixels later.
        images = torch.from_numpy(np.ascontiguousarray(data.images[rows])).permute(0, 3, 1, 2)
        labels = torch.from_numpy(data.table["label"].to_numpy()[rows].astype(np.int64))
        if device.type != "cpu":
            images, labels = images.to(device), labels.to(device)
        return cls(images, labels)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class FitResult:
    history: list[EpochRecord] = field(default_factory=list)
    best_epoch: int = 0
    best_state: dict | None = None
    status: str = "completed"
    message: str = ""


def training_order(labels: torch.Tensor, weighted: bool, generator: torch.Generator) -> torch.Tensor:
    """One epoch's sample order: class-balanced draws with replacement (WeightedRandomSampler), or a
    plain permutation."""
    if not weighted:
        return torch.randperm(len(labels), generator=generator)
    counts = torch.bincount(labels.cpu(), minlength=2).clamp(min=1).double()
    weights = (1.0 / counts)[labels.cpu()]
    sampler = torch.utils.data.WeightedRandomSampler(weights, len(labels), replacement=True, generator=generator)
    return torch.tensor(list(sampler), dtype=torch.int64)


def prepare_batch(images_uint8: torch.Tensor, plan: ExecutionPlan, augment: bool,
                  generator: torch.Generator | None) -> torch.Tensor:
    images = to_unit_float(images_uint8.to(plan.device, non_blocking=True))
    if augment:
        images = augment_batch(images, generator)
    return normalise(images).contiguous(memory_format=plan.memory_format)


def train_one_epoch(model, data: TensorData, optimizer, scheduler, criterion, plan: ExecutionPlan, config: TrainConfig,
                    generator: torch.Generator, report, stop: threading.Event) -> tuple[float, float]:
    """One pass over the training part; returns (mean loss, accuracy). Raises DivergedError."""
    model.train()
    order = training_order(data.labels, config.weighted_sampler, generator)
    batches = [order[i: i + config.batch_size] for i in range(0, len(order), config.batch_size)]
    if len(batches) > 1 and len(batches[-1]) < 2:
        batches.pop()  # batch norm cannot train on a single image
    loss_sum, correct, seen = 0.0, 0, 0
    for number, rows in enumerate(batches, start=1):
        inputs = prepare_batch(data.images[rows], plan, config.augment, generator)
        targets = data.labels[rows].to(plan.device)
        with plan.autocast():
            logits = model(inputs)
            loss = criterion(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise DivergedError(f"the loss became {loss_value} in batch {number}")
        loss_sum += loss_value * len(rows)
        correct += int((logits.argmax(1) == targets).sum())
        seen += len(rows)
        report(number, len(batches), loss_sum / seen, seen)
        if stop.is_set():
            break
    return loss_sum / max(seen, 1), correct / max(seen, 1)


@torch.inference_mode()
def evaluate(model, data: TensorData, plan: ExecutionPlan, batch_size: int,
             criterion=None) -> tuple[np.ndarray, float]:
    """P(malignant) for every image, in order, and the mean loss (NaN without a criterion)."""
    model.eval()
    probabilities, loss_sum = [], 0.0
    for start in range(0, len(data), batch_size):
        inputs = prepare_batch(data.images[start: start + batch_size], plan, augment=False, generator=None)
        with plan.autocast():
            logits = model(inputs).float()
        if criterion is not None:
            loss_sum += float(criterion(logits, data.labels[start: start + batch_size].to(plan.device))) * len(logits)
        probabilities.append(torch.softmax(logits, 1)[:, 1].cpu())
    probabilities = torch.cat(probabilities).numpy() if probabilities else np.zeros(0, dtype=np.float32)
    return probabilities, (loss_sum / len(data) if criterion is not None and len(data) else math.nan)


def fit(model: nn.Module, train: TensorData, val: TensorData, config: TrainConfig, plan: ExecutionPlan,
        callbacks: TrainingCallback, stop: threading.Event, on_improvement=None, run_label=("", "")) -> FitResult:
    """The epoch loop. The best epoch is the highest validation AUC (lower validation loss breaks
    ties); the test part is never looked at here."""
    generator = torch.Generator().manual_seed(config.seed)
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = max(1, len(train) // config.batch_size + (len(train) % config.batch_size >= 2))
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs * steps_per_epoch)
                 if config.scheduler else None)
    result = FitResult()
    best_key = (-math.inf, -math.inf)
    started = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        epoch_started = time.perf_counter()
        learning_rate = optimizer.param_groups[0]["lr"]

        def report(batch, batches, loss, seen, epoch=epoch, epoch_started=epoch_started):
            elapsed = time.perf_counter() - started
            done = (epoch - 1) * batches + batch
            rate = seen / max(time.perf_counter() - epoch_started, 1e-9)
            callbacks.on_batch_end(BatchProgress(
                run_label[0], run_label[1], epoch, config.epochs, batch, batches, loss, rate, elapsed,
                elapsed / done * (config.epochs * batches - done)))

        try:
            train_loss, train_acc = train_one_epoch(model, train, optimizer, scheduler, criterion, plan, config,
                                                    generator, report, stop)
        except DivergedError as error:
            result.status, result.message = "diverged", (
                f"training diverged in epoch {epoch}: {error}; try a lower learning rate")
            break
        if stop.is_set():
            result.status, result.message = "stopped", f"stopped by request during epoch {epoch}"
            break
        probabilities, val_loss = evaluate(model, val, plan, config.batch_size * 2, criterion)
        val_labels = val.labels.cpu().numpy()
        record = EpochRecord(
            epoch=epoch, train_loss=train_loss, train_acc=train_acc, val_loss=val_loss,
            val_acc=float(((probabilities >= config.threshold) == val_labels).mean()),
            val_auc=safe_auc(val_labels, probabilities), lr=learning_rate,
            seconds=time.perf_counter() - epoch_started,
        )
        result.history.append(record)
        key = (record.val_auc if math.isfinite(record.val_auc) else -math.inf, -val_loss)
        if key > best_key:
            best_key, result.best_epoch = key, epoch
            result.best_state = copy.deepcopy(model.state_dict())
            if on_improvement:
                on_improvement(result.best_state)
        callbacks.on_epoch_end(record)
    return result


def run_training(config: TrainConfig, data: PreparedData, store: RunStore,
                 callbacks: list[TrainingCallback] | TrainingCallback | None = None,
                 stop: threading.Event | None = None, tags: dict | None = None) -> dict:
    """Train one model on prepared data and store the run; returns the final run.json content.
    `tags` are stored in run.json as they are (a tuning trial, an ablation cell).

    Never raises for a failed run: the run is stored with status 'failed' and its error.
    """
    callback = callbacks if isinstance(callbacks, TrainingCallback) else CallbackList(callbacks or [])
    stop = stop or threading.Event()
    config = _match_image_size(config, data)
    torch.manual_seed(config.seed)
    model, weights = build_model(config.model, config.dropout, config.pretrained, config.weights_file,
                                 warn=callback.on_warning)
    device = select_device(config.device)
    plan = choose_execution_plan(model, config, device, store.cache_dir)
    folder = store.create(config.model, {
        "config": config.to_dict(), "dataset": data.describe(), "weights": weights,
        "history": [], "metrics": {}, "environment": describe_environment(device, plan), "tags": tags or {},
    })
    folder.save_table("split.csv", data.table[["image_id", "label", "split"]])
    callback.on_run_start(dict(folder.record))
    try:
        outcome = _train_and_evaluate(model, config, data, plan, folder, callback, stop)
    except KeyboardInterrupt:
        folder.update(status="stopped", error="interrupted (Ctrl-C)")
        callback.on_run_end(dict(folder.record))
        raise
    except Exception as error:  # noqa: BLE001 - any failure is recorded in the run, not lost
        (folder.path / "traceback.txt").write_text(traceback.format_exc())
        outcome = {"status": "failed", "error": f"{type(error).__name__}: {error}"}
    record = folder.update(**outcome)
    callback.on_run_end(dict(record))
    return record


def _train_and_evaluate(model, config, data, plan, folder: RunFolder, callback, stop) -> dict:
    model.to(plan.device, memory_format=plan.memory_format)
    parts = {split: TensorData.from_prepared(data, split, plan.device) for split in ("train", "val", "test")}
    result = fit(model, parts["train"], parts["val"], config, plan, _with_history(folder, callback), stop,
                 on_improvement=folder.save_model, run_label=(folder.run_id, config.model))
    outcome = {"status": result.status, "best_epoch": result.best_epoch, "seconds": _seconds(folder)}
    if result.message:
        outcome["error" if result.status != "stopped" else "message"] = result.message
    if result.best_state is None:
        return outcome  # stopped or diverged before the first epoch ended: nothing to evaluate
    model.load_state_dict(result.best_state)
    outcome["metrics"], predictions = _final_metrics(model, parts, data, plan, config)
    folder.save_table("predictions.csv", predictions)
    outcome["seconds"] = _seconds(folder)
    return outcome


def _with_history(folder: RunFolder, callback: TrainingCallback) -> TrainingCallback:
    """Appends each epoch to run.json's history before passing it on."""

    class History(CallbackList):
        def on_epoch_end(self, record: EpochRecord) -> None:
            folder.update(history=folder.record["history"] + [dict(record.__dict__)])
            super().on_epoch_end(record)

    return History([callback])


def _final_metrics(model, parts, data: PreparedData, plan, config) -> tuple[dict, pd.DataFrame]:
    metrics, frames = {}, []
    for split, part in parts.items():
        probabilities, _ = evaluate(model, part, plan, config.batch_size * 2)
        labels = part.labels.cpu().numpy()
        metrics[split] = compute_metrics(labels, probabilities, config.threshold)
        if split != "train":
            rows = data.indices(split)
            frames.append(pd.DataFrame({"image_id": data.table["image_id"].to_numpy()[rows], "split": split,
                                        "label": labels, "prob_malignant": probabilities.astype(float)}))
    return metrics, pd.concat(frames, ignore_index=True)


def _match_image_size(config: TrainConfig, data: PreparedData) -> TrainConfig:
    size = int(data.images.shape[1])
    if config.image_size is None:
        return dataclasses.replace(config, image_size=size)
    if config.image_size != size:
        raise ValueError(f"the data was prepared at {size} px but the config asks for {config.image_size} px")
    return config


def _seconds(folder: RunFolder) -> float:
    return round(time.time() - folder.record["created_at"], 2)
