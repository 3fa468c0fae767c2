"""The paper's training recipe: AdamW, cosine annealing, label-smoothed cross-entropy, weighted
sampling, dropout, ImageNet normalisation; every piece switchable through TrainConfig.

`run_training` is the whole run (model, precision choice, `fit`, final evaluation, run store);
`resume_training` continues a stopped or killed run from its last finished epoch; `fit` is the epoch
loop; `train_one_epoch` and `evaluate` are one pass each. Progress leaves through callbacks; a
`threading.Event` asks for a clean stop after the current batch. Under torchrun the same functions train
one run on several processes; a `DistributedContext` (core.training.distributed) says what differs.
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
from core.data.datasets import PreparedData, prepare_data
from core.environment import describe_environment, select_device
from core.models import build_model, fold_batch_norms
from core.runs import RESUMABLE_STATUSES, RunFolder, RunStore, claimed_for_resume, remove_partial_writes
from core.stats.metrics import compute_metrics, safe_auc
from core.stored_run import StoredRunError, recorded_data_spec
from core.training.batches import TensorData, prepare_batch, training_order
from core.training.callbacks import BatchProgress, CallbackList, EpochRecord, TrainingCallback
from core.training.distributed import SINGLE_PROCESS, DistributedContext, open_on_main
from core.training.precision import ExecutionPlan, choose_execution_plan


class DivergedError(RuntimeError):
    """The loss became NaN or infinite."""


class ResumeError(StoredRunError):
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
class FitResult:
    history: list[EpochRecord] = field(default_factory=list)
    best_epoch: int = 0
    best_state: dict | None = None
    status: str = "completed"
    message: str = ""


def steps_per_epoch(train_size: int, batch_size: int, world_size: int = 1) -> int:
    """Optimizer steps in one epoch: one per `batch_size` images (the global batch under torchrun, split over
    `world_size` processes), plus one for a last partial batch that gives every process at least 2 images
    (batch norm cannot train on one); at least one."""
    return max(1, train_size // batch_size + (train_size % batch_size >= 2 * world_size))


def epoch_batches(order: torch.Tensor, batch_size: int, world_size: int = 1) -> list[torch.Tensor]:
    """The epoch's order cut into global batches, `steps_per_epoch` of them."""
    batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    if len(batches) > 1 and len(batches[-1]) < 2 * world_size:
        batches.pop()
    return batches


def train_one_epoch(model, data: TensorData, optimizer, scheduler, criterion, plan: ExecutionPlan, config: TrainConfig,
                    generator: torch.Generator, report, stop: threading.Event,
                    context: DistributedContext = SINGLE_PROCESS,
                    augmentation: torch.Generator | None = None) -> tuple[float, float]:
    """One pass over the training part; returns (mean loss, accuracy) over all processes. Raises DivergedError.
    `generator` draws the order; `augmentation` (default: `generator`) the augmentation. Under torchrun
    `model` is the DDP-wrapped model and this process trains on its share of each global batch."""
    model.train()
    order = training_order(data.labels, config.weighted_sampler, generator)
    batches = epoch_batches(order, config.batch_size, context.world_size)
    loss_sum, correct, seen = 0.0, 0, 0
    for number, rows in enumerate(batches, start=1):
        mine = context.share(rows)
        inputs = prepare_batch(data.batch(mine), plan, config.augment,
                               generator if augmentation is None else augmentation)
        targets = data.labels[mine].to(plan.device)
        with plan.autocast():
            logits = model(inputs)
            loss = criterion(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        context.weighted_loss(loss, len(mine), len(rows)).backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        # Summed over the processes, so that a NaN anywhere ends the epoch everywhere after the same batch.
        batch_loss, batch_correct = context.sum(loss.item() * len(mine), int((logits.argmax(1) == targets).sum()))
        if not math.isfinite(batch_loss):
            raise DivergedError(f"the loss became {batch_loss / len(rows)} in batch {number}")
        loss_sum += batch_loss
        correct += int(batch_correct)
        seen += len(rows)
        report(number, len(batches), loss_sum / seen, seen)
        if context.should_stop(stop):
            break
    return loss_sum / max(seen, 1), correct / max(seen, 1)


def evaluate(model, data: TensorData, plan: ExecutionPlan, batch_size: int, criterion=None,
             context: DistributedContext = SINGLE_PROCESS) -> tuple[np.ndarray, float]:
    """P(malignant) for every image, in order, and the mean loss (NaN without a criterion). Under torchrun
    each process evaluates its shard and every process gets all of them; `model` is the unwrapped model;
    it is put in eval mode, and where the plan folds conv + BN a folded copy of it is evaluated."""
    if plan.fold_batch_norms:
        model = copy.deepcopy(model.eval())
        fold_batch_norms(model)
    probabilities, loss_sum = _evaluate_rows(model, data, plan, batch_size, criterion, context.shard(len(data)))
    if context.is_distributed:
        probabilities, (loss_sum,) = context.concatenate(probabilities), context.sum(loss_sum)
    return probabilities, (loss_sum / len(data) if criterion is not None and len(data) else math.nan)


@torch.inference_mode()
def _evaluate_rows(model, data: TensorData, plan: ExecutionPlan, batch_size: int, criterion,
                   rows: range) -> tuple[np.ndarray, float]:
    model.eval()
    probabilities, loss_sum = [], 0.0
    for start in range(rows.start, rows.stop, batch_size):
        end = min(start + batch_size, rows.stop)
        inputs = prepare_batch(data.batch(slice(start, end)), plan, augment=False, generator=None)
        with plan.autocast():
            logits = model(inputs).float()
        if criterion is not None:
            loss_sum += float(criterion(logits, data.labels[start: end].to(plan.device))) * len(logits)
        probabilities.append(torch.softmax(logits, 1)[:, 1].cpu())
    probabilities = torch.cat(probabilities).numpy() if probabilities else np.zeros(0, dtype=np.float32)
    return probabilities, loss_sum


def fit(model: nn.Module, train: TensorData, val: TensorData, config: TrainConfig, plan: ExecutionPlan,
        callbacks: TrainingCallback, stop: threading.Event, on_improvement=None, run_label=("", ""),
        resume: TrainingState | None = None, best_state: dict | None = None, on_checkpoint=None,
        context: DistributedContext = SINGLE_PROCESS) -> FitResult:
    """The epoch loop. The best epoch is the highest validation AUC (lower validation loss breaks
    ties); the test part is never looked at here.

    `on_checkpoint(TrainingState)` is called after every finished epoch; `resume` (with the best
    epoch's weights as `best_state`) continues from such a state. Under torchrun every process runs this
    loop in step with the others, and all of them reach the same history and best epoch."""
    generator = torch.Generator().manual_seed(config.seed)
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    steps = steps_per_epoch(len(train), config.batch_size, context.world_size)
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs * steps)
                 if config.scheduler else None)
    result = FitResult()
    best_key = (-math.inf, -math.inf)
    first_epoch = 1
    if resume is not None:
        _restore(resume, model, optimizer, scheduler, generator, plan.device)
        result.history = [EpochRecord(**record) for record in resume.history]
        result.best_epoch, result.best_state, best_key = resume.best_epoch, best_state, resume.best_key
        first_epoch = resume.epoch + 1
    trained = context.wrap(model)  # DDP shares the parameters: `model` stays the one to evaluate and save
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

        augmentation = context.augmentation_generator(generator, config.seed, epoch)
        try:
            train_loss, train_acc = train_one_epoch(trained, train, optimizer, scheduler, criterion, plan, config,
                                                    generator, report, stop, context, augmentation)
        except DivergedError as error:
            result.status, result.message = "diverged", (
                f"training diverged in epoch {epoch}: {error}; try a lower learning rate")
            break
        if context.should_stop(stop):
            result.status, result.message = "stopped", f"stopped by request during epoch {epoch}"
            break
        context.copy_buffers_from_main(model)
        probabilities, val_loss = evaluate(model, val, plan, config.batch_size * 2, criterion, context)
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
                 stop: threading.Event | None = None, tags: dict | None = None,
                 context: DistributedContext = SINGLE_PROCESS) -> dict:
    """Train one model on prepared data and store the run; returns the final run.json content.
    `tags` are stored in run.json as they are (a tuning trial, an ablation cell).

    Never raises for a failed run: the run is stored with status 'failed' and its error. Under torchrun
    every process calls this with the same arguments and its `context`; rank 0 alone writes the run and
    calls `callbacks`, and a failure also ends the process (the others cannot go on without it).
    """
    callback = _callback_of(callbacks, context)
    stop = stop or threading.Event()
    config = dataclasses.replace(_match_image_size(config, data), lr=config.learning_rate)  # run.json names both
    context.check_batch_size(config.batch_size, len(data.indices("train")))
    torch.manual_seed(config.seed)
    model, weights = _build_on_main_first(context, lambda: build_model(
        config.model, config.dropout, config.pretrained, config.weights_file, warn=callback.on_warning))
    device = select_device(config.device)
    # Rank 0 times the precisions; its choice holds everywhere (processes timing apart could choose apart).
    plan = context.run_on_main(lambda: choose_execution_plan(model, config, device, store.cache_dir))

    def create_folder() -> RunFolder:
        folder = store.create(config.model, {
            "config": config.to_dict(), "dataset": data.describe(), "weights": weights, "history": [],
            "metrics": {}, "environment": {**describe_environment(device, plan), **context.describe()},
            "tags": tags or {},
        })
        folder.save_table("split.csv", data.table[["image_id", "label", "split"]])
        return folder

    folder = open_on_main(context, create_folder)
    callback.on_run_start(dict(folder.record))
    return _run_to_the_end(model, config, data, plan, folder, callback, stop, context=context)


def _callback_of(callbacks, context: DistributedContext) -> TrainingCallback:
    if not context.is_main:
        return TrainingCallback()  # progress is reported once, by rank 0
    return callbacks if isinstance(callbacks, TrainingCallback) else CallbackList(callbacks or [])


def _build_on_main_first(context: DistributedContext, build):
    """build() on rank 0 first (it may download the ImageNet weights into the shared cache), then on the others."""
    if not context.is_distributed:
        return build()
    built = []
    context.run_on_main(lambda: built.append(build()))  # errors reach every process; the model stays here
    return built[0] if context.is_main else build()


def resume_training(run_id: str, store: RunStore, callbacks: list[TrainingCallback] | TrainingCallback | None = None,
                    stop: threading.Event | None = None, data: PreparedData | None = None,
                    context: DistributedContext = SINGLE_PROCESS) -> dict:
    """Continue a stopped or failed (killed) run from its last finished epoch, in the same run folder,
    with the same config; the result is the run that training without the interruption would have
    given (under torchrun: with the same number of processes). `data` defaults to loading the run's
    dataset again; it must be the same images and split. Raises ResumeError when the run cannot be resumed."""
    callback = _callback_of(callbacks, context)
    stop = stop or threading.Event()
    with contextlib.ExitStack() as claim:

        def claim_and_read() -> tuple[dict, TrainingState]:
            if store.load(run_id) is None:
                raise ResumeError(f"no run {run_id} in {store.root}")
            claim.enter_context(claimed_for_resume(store.root / run_id, error=ResumeError))
            return _read_resume_point(run_id, store)

        # Under torchrun rank 0 alone claims and reads the run; the others get its state through the process
        # group, so that only rank 0's machine needs the run store.
        run, state = context.run_on_main(claim_and_read)
        return _resume_claimed(run, state, store, callback, stop, data, context)


def _read_resume_point(run_id: str, store: RunStore) -> tuple[dict, TrainingState]:
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
    return run, TrainingState.from_dict(saved)


def _resume_claimed(run: dict, state: TrainingState, store: RunStore, callback: TrainingCallback,
                    stop: threading.Event, data: PreparedData | None, context: DistributedContext) -> dict:
    run_id = run["run_id"]
    config = TrainConfig.from_dict(run["config"])

    def checked_data() -> PreparedData:
        loaded = data if data is not None else prepare_data(resume_data_spec(run), config, store.cache_dir)
        _check_same_data(run, loaded)
        return loaded

    data = context.agree(checked_data, local_main_first=True)
    context.check_batch_size(config.batch_size, len(data.indices("train")))
    torch.manual_seed(config.seed)
    model, _ = build_model(config.model, config.dropout, pretrained=False, warn=callback.on_warning)
    plan = context.run_on_main(
        lambda: choose_execution_plan(model, config, select_device(config.device), store.cache_dir))
    if state.best_epoch == state.epoch:
        best_state = state.model  # model.pt may predate this epoch when the kill came between the two writes
    elif state.best_epoch:
        best_state = context.run_on_main(
            lambda: torch.load(store.model_path(run_id), map_location="cpu", weights_only=True))
    else:
        best_state = None

    def reopen_folder() -> RunFolder:
        folder = store.open(run_id)
        remove_partial_writes(folder.path)
        if state.best_epoch == state.epoch:
            folder.save_model(best_state)
        record = folder.record
        for stale in ("error", "message", "resumable", "best_epoch"):
            record.pop(stale, None)
        before = record.get("seconds") or sum(entry["seconds"] for entry in state.history)  # killed runs: none
        environment = {**describe_environment(plan.device, plan), **context.describe()}
        resumes = [*record.get("resumes", []), {"from_epoch": state.epoch, "at": time.time(),
                                                "seconds_before": before, "environment": environment}]
        folder.update(status="running", pid=os.getpid(), history=state.history, metrics={}, resumes=resumes)
        return folder

    folder = open_on_main(context, reopen_folder)
    callback.on_run_start(dict(folder.record))
    return _run_to_the_end(model, config, data, plan, folder, callback, stop, state, best_state, context)


def resume_data_spec(run: dict) -> DataSpec:
    """How the run's dataset was loaded, to load it again for resuming; ResumeError when it is not recorded."""
    try:
        return recorded_data_spec(run)
    except StoredRunError as error:
        raise ResumeError(str(error)) from None


def _check_same_data(run: dict, data: PreparedData) -> None:
    stored = run.get("dataset", {})
    now = data.describe()
    for key, what in (("fingerprint", "images"), ("split_fingerprint", "split")):
        if stored.get(key) and stored[key] != now[key]:
            raise ResumeError(f"the dataset's {what} changed since run {run['run_id']} started; "
                              "it cannot be resumed on different data")


def _run_to_the_end(model, config, data, plan, folder: RunFolder, callback, stop,
                    resume: TrainingState | None = None, best_state: dict | None = None,
                    context: DistributedContext = SINGLE_PROCESS) -> dict:
    try:
        outcome = _train_and_evaluate(model, config, data, plan, folder, callback, stop, resume, best_state, context)
    except KeyboardInterrupt:
        folder.update(status="stopped", error="interrupted (Ctrl-C)")
        callback.on_run_end(dict(folder.record))
        raise
    except Exception as error:  # noqa: BLE001 - any failure is recorded in the run, not lost
        if context.is_main:
            with contextlib.suppress(OSError):  # the store may be what failed (full disk)
                (folder.path / "traceback.txt").write_text(traceback.format_exc())
        if context.is_distributed:
            # The other processes wait for this one in their next collective: ending this process (torchrun
            # then ends them, or their collective fails) is the only way they learn of it. Stored first.
            with contextlib.suppress(OSError):
                callback.on_run_end(folder.update(status="failed", error=f"{type(error).__name__}: {error}",
                                                  seconds=_seconds(folder)))
            raise
        outcome = {"status": "failed", "error": f"{type(error).__name__}: {error}"}
    if outcome["status"] not in RESUMABLE_STATUSES:
        folder.discard_resume_state()  # only a run that can go on keeps the large optimizer state
    record = folder.update(**outcome)
    callback.on_run_end(dict(record))
    return record


def _train_and_evaluate(model, config, data, plan, folder: RunFolder, callback, stop,
                        resume: TrainingState | None = None, best_state: dict | None = None,
                        context: DistributedContext = SINGLE_PROCESS) -> dict:
    model.to(plan.device, memory_format=plan.memory_format)
    parts = {split: TensorData.from_prepared(data, split, plan.device) for split in ("train", "val", "test")}
    _record_residency(folder, parts["train"].residency, resumed=resume is not None)
    result = fit(model, parts["train"], parts["val"], config, plan, _with_history(folder, callback), stop,
                 on_improvement=folder.save_model, run_label=(folder.run_id, config.model),
                 resume=resume, best_state=best_state,
                 on_checkpoint=lambda state: folder.save_resume_state(state.to_dict()), context=context)
    outcome = {"status": result.status, "best_epoch": result.best_epoch, "seconds": _seconds(folder)}
    if result.message:
        outcome["error" if result.status != "stopped" else "message"] = result.message
    if result.best_state is None:
        return outcome  # stopped or diverged before the first epoch ended: nothing to evaluate
    model.load_state_dict(result.best_state)
    outcome["metrics"], predictions = _final_metrics(model, parts, data, plan, config, context)
    folder.save_table("predictions.csv", predictions)
    outcome["seconds"] = _seconds(folder)
    return outcome


def _record_residency(folder: RunFolder, residency: str, resumed: bool) -> None:
    """Whether the images were held in memory (on the device) or read from the image cache on disk, in the
    environment of the run, or of its latest resume."""
    if resumed and folder.record.get("resumes"):
        resumes = folder.record["resumes"]
        latest = {**resumes[-1], "environment": {**resumes[-1].get("environment", {}), "data_residency": residency}}
        folder.update(resumes=[*resumes[:-1], latest])
    else:
        folder.update(environment={**folder.record.get("environment", {}), "data_residency": residency})


def _with_history(folder: RunFolder, callback: TrainingCallback) -> TrainingCallback:
    """Appends each epoch to run.json's history before passing it on."""

    class History(CallbackList):
        def on_epoch_end(self, record: EpochRecord) -> None:
            folder.update(history=folder.record["history"] + [dict(record.__dict__)])
            super().on_epoch_end(record)

    return History([callback])


def _final_metrics(model, parts, data: PreparedData, plan, config,
                   context: DistributedContext = SINGLE_PROCESS) -> tuple[dict, pd.DataFrame]:
    metrics, frames = {}, []
    for split, part in parts.items():
        probabilities, _ = evaluate(model, part, plan, config.batch_size * 2, context=context)
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
