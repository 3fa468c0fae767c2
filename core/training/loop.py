"""The paper's training recipe: AdamW, cosine annealing, label-smoothed cross-entropy, weighted
sampling, dropout, ImageNet normalisation; every piece switchable through TrainConfig.

`run_training` is the whole run (model, precision choice, `fit`, final evaluation, run store);
`resume_training` continues a stopped or killed run from its last finished epoch; `fit` is the epoch
loop; `train_one_epoch` and `evaluate` are one pass each. Progress leaves through callbacks; a
`threading.Event` asks for a clean stop after the current batch.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import threading
import time
import traceback
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn

from core.config import DataSpec, TrainConfig
from core.data.augment import augment_batch, normalise, to_unit_float
from core.data.datasets import PreparedData, prepare_data
from core.environment import describe_environment, select_device
from core.evaluation.metrics import compute_metrics, safe_auc
from core.models import build_model
from core.runs import RESUMABLE_STATUSES, RunFolder, RunStore, claimed_for_resume, remove_partial_writes
from core.training.callbacks import BatchProgress, CallbackList, EpochRecord, TrainingCallback
from core.training.precision import ExecutionPlan, choose_execution_plan


class DivergedError(RuntimeError):
    """The loss became NaN or infinite."""


class ResumeError(ValueError):
    """A run that cannot be resumed; the message says why in one line."""


@dataclass
class TrainingState:
    """Everything `fit` needs to continue after a finished epoch exactly as if it had never stopped:
    weights, AdamW moments, the cosine schedule's position and both random streams (sampling and
    augmentation; dropout). Saved as resume.pt with plain tensors, lists and numbers only, so it loads
    with torch.load(weights_only=True)."""

    epoch: int
    model: dict
    optimizer: dict
    scheduler: dict | None
    sampling_rng: torch.Tensor
    torch_rng: torch.Tensor
    cuda_rng: list[torch.Tensor]
    best_epoch: int
    best_key: tuple[float, float]
    history: list[dict]

    def to_dict(self) -> dict:
        # Not dataclasses.asdict: that deep-copies every tensor (weights and both AdamW moments) each epoch.
        return {**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, "best_key": list(self.best_key)}

    @classmethod
    def from_dict(cls, values: dict) -> TrainingState:
        names = {f.name for f in dataclasses.fields(cls)}
        missing = names - set(values)
        if missing:
            raise ResumeError(f"resume.pt lacks {', '.join(sorted(missing))}")
        return cls(**{**{k: values[k] for k in names}, "best_key": tuple(values["best_key"])})


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
        callbacks: TrainingCallback, stop: threading.Event, on_improvement=None, run_label=("", ""),
        resume: TrainingState | None = None, best_state: dict | None = None, on_checkpoint=None) -> FitResult:
    """The epoch loop. The best epoch is the highest validation AUC (lower validation loss breaks
    ties); the test part is never looked at here.

    `on_checkpoint(TrainingState)` is called after every finished epoch; `resume` (with the best
    epoch's weights as `best_state`) continues from such a state."""
    generator = torch.Generator().manual_seed(config.seed)
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = max(1, len(train) // config.batch_size + (len(train) % config.batch_size >= 2))
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs * steps_per_epoch)
                 if config.scheduler else None)
    result = FitResult()
    best_key = (-math.inf, -math.inf)
    first_epoch = 1
    if resume is not None:
        _restore(resume, model, optimizer, scheduler, generator, plan.device)
        result.history = [EpochRecord(**record) for record in resume.history]
        result.best_epoch, result.best_state, best_key = resume.best_epoch, best_state, resume.best_key
        first_epoch = resume.epoch + 1
    started = time.perf_counter()
    for epoch in range(first_epoch, config.epochs + 1):
        epoch_started = time.perf_counter()
        learning_rate = optimizer.param_groups[0]["lr"]

        def report(batch, batches, loss, seen, epoch=epoch, epoch_started=epoch_started):
            elapsed = time.perf_counter() - started
            done = (epoch - 1) * batches + batch
            done_here = done - (first_epoch - 1) * batches  # a resumed run's earlier epochs took no time here
            rate = seen / max(time.perf_counter() - epoch_started, 1e-9)
            callbacks.on_batch_end(BatchProgress(
                run_label[0], run_label[1], epoch, config.epochs, batch, batches, loss, rate, elapsed,
                elapsed / done_here * (config.epochs * batches - done)))

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
        improved = key > best_key
        if improved:
            best_key, result.best_epoch = key, epoch
            result.best_state = copy.deepcopy(model.state_dict())
        # The resume state is written before the best model: a kill between the two leaves a state that
        # says "this epoch is the best" and holds its weights, so resuming can rewrite model.pt from it.
        if on_checkpoint:
            on_checkpoint(TrainingState(
                epoch=epoch, model=model.state_dict(), optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict() if scheduler is not None else None,
                sampling_rng=generator.get_state(), torch_rng=torch.get_rng_state(),
                cuda_rng=torch.cuda.get_rng_state_all() if plan.device.type == "cuda" else [],
                best_epoch=result.best_epoch, best_key=best_key,
                history=[dict(r.__dict__) for r in result.history]))
        if improved and on_improvement:
            on_improvement(result.best_state)
        callbacks.on_epoch_end(record)
    return result


def _restore(state: TrainingState, model, optimizer, scheduler, generator: torch.Generator, device) -> None:
    model.load_state_dict(state.model)
    optimizer.load_state_dict(state.optimizer)  # moves the moments to the parameters' device
    if scheduler is not None:
        if state.scheduler is None:
            raise ResumeError("the run was trained without a scheduler but its config asks for one")
        scheduler.load_state_dict(state.scheduler)
    generator.set_state(state.sampling_rng)
    torch.set_rng_state(state.torch_rng)
    if device.type == "cuda" and state.cuda_rng:
        torch.cuda.set_rng_state_all(state.cuda_rng)


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
    return _run_to_the_end(model, config, data, plan, folder, callback, stop)


def resume_training(run_id: str, store: RunStore, callbacks: list[TrainingCallback] | TrainingCallback | None = None,
                    stop: threading.Event | None = None, data: PreparedData | None = None) -> dict:
    """Continue a stopped or failed (killed) run from its last finished epoch, in the same run folder,
    with the same config; the result is the run that training without the interruption would have
    given. `data` defaults to loading the run's dataset again; it must be the same images and split.
    Raises ResumeError when the run cannot be resumed."""
    callback = callbacks if isinstance(callbacks, TrainingCallback) else CallbackList(callbacks or [])
    stop = stop or threading.Event()
    if store.load(run_id) is None:
        raise ResumeError(f"no run {run_id} in {store.root}")
    with claimed_for_resume(store.root / run_id, error=ResumeError):
        return _resume_claimed(run_id, store, callback, stop, data)


def _resume_claimed(run_id: str, store: RunStore, callback: TrainingCallback, stop: threading.Event,
                    data: PreparedData | None) -> dict:
    run = store.load(run_id)  # again, now that no other process can change it
    if run["status"] not in RESUMABLE_STATUSES:
        raise ResumeError(f"run {run_id} is {run['status']}; only stopped or failed runs can be resumed")
    try:
        saved = torch.load(store.resume_path(run_id), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ResumeError(f"run {run_id} has no resume checkpoint (it stopped before its first epoch "
                          "ended, or it was trained by an older version)") from None
    except Exception as error:  # noqa: BLE001 - a damaged or crafted file is refused, never executed
        raise ResumeError(f"the resume checkpoint of {run_id} cannot be read: {error}") from error
    state = TrainingState.from_dict(saved)
    config = TrainConfig.from_dict(run["config"])
    data = data if data is not None else _load_run_data(run, config, store)
    _check_same_data(run, data)
    torch.manual_seed(config.seed)
    model, _ = build_model(config.model, config.dropout, pretrained=False, warn=callback.on_warning)
    plan = choose_execution_plan(model, config, select_device(config.device), store.cache_dir)
    folder = store.open(run_id)
    remove_partial_writes(folder.path)
    if state.best_epoch == state.epoch:
        best_state = state.model  # model.pt may predate this epoch when the kill came between the two writes
        folder.save_model(best_state)
    elif state.best_epoch:
        best_state = torch.load(store.model_path(run_id), map_location="cpu", weights_only=True)
    else:
        best_state = None
    record = folder.record
    for stale in ("error", "message", "resumable", "best_epoch"):
        record.pop(stale, None)
    before = record.get("seconds") or sum(entry["seconds"] for entry in state.history)  # killed runs have none
    resumes = [*record.get("resumes", []), {"from_epoch": state.epoch, "at": time.time(), "seconds_before": before,
                                            "environment": describe_environment(plan.device, plan)}]
    folder.update(status="running", pid=os.getpid(), history=state.history, metrics={}, resumes=resumes)
    callback.on_run_start(dict(folder.record))
    return _run_to_the_end(model, config, data, plan, folder, callback, stop, state, best_state)


def recorded_data_spec(run: dict) -> DataSpec:
    """How the run's dataset was loaded, to load it again for resuming."""
    spec = (run.get("dataset") or {}).get("spec")
    if spec is None:
        raise ResumeError("the run does not record how its dataset was loaded (trained by an older version)")
    return DataSpec(**spec)


def _load_run_data(run: dict, config: TrainConfig, store: RunStore) -> PreparedData:
    return prepare_data(recorded_data_spec(run), config, store.cache_dir)


def _check_same_data(run: dict, data: PreparedData) -> None:
    stored = run.get("dataset", {})
    now = data.describe()
    for key, what in (("fingerprint", "images"), ("split_fingerprint", "split")):
        if stored.get(key) and stored[key] != now[key]:
            raise ResumeError(f"the dataset's {what} changed since run {run['run_id']} started; "
                              "it cannot be resumed on different data")


def _run_to_the_end(model, config, data, plan, folder: RunFolder, callback, stop,
                    resume: TrainingState | None = None, best_state: dict | None = None) -> dict:
    try:
        outcome = _train_and_evaluate(model, config, data, plan, folder, callback, stop, resume, best_state)
    except KeyboardInterrupt:
        folder.update(status="stopped", error="interrupted (Ctrl-C)")
        callback.on_run_end(dict(folder.record))
        raise
    except Exception as error:  # noqa: BLE001 - any failure is recorded in the run, not lost
        with contextlib.suppress(OSError):  # the store may be what failed (full disk)
            (folder.path / "traceback.txt").write_text(traceback.format_exc())
        outcome = {"status": "failed", "error": f"{type(error).__name__}: {error}"}
    if outcome["status"] not in RESUMABLE_STATUSES:
        folder.discard_resume_state()  # only a run that can go on keeps the large optimizer state
    record = folder.update(**outcome)
    callback.on_run_end(dict(record))
    return record


def _train_and_evaluate(model, config, data, plan, folder: RunFolder, callback, stop,
                        resume: TrainingState | None = None, best_state: dict | None = None) -> dict:
    model.to(plan.device, memory_format=plan.memory_format)
    parts = {split: TensorData.from_prepared(data, split, plan.device) for split in ("train", "val", "test")}
    result = fit(model, parts["train"], parts["val"], config, plan, _with_history(folder, callback), stop,
                 on_improvement=folder.save_model, run_label=(folder.run_id, config.model),
                 resume=resume, best_state=best_state,
                 on_checkpoint=lambda state: folder.save_resume_state(state.to_dict()))
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
    """Training time: a resumed run counts from its last resume on top of the time before, not the pause."""
    resumes = folder.record.get("resumes") or []
    if resumes:
        return round(resumes[-1]["seconds_before"] + time.time() - resumes[-1]["at"], 2)
    return round(time.time() - folder.record["created_at"], 2)
