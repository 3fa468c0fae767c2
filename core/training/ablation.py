"""The paper's ablation (section 4.1): components added one by one to a ResNet18 baseline, and a grid
of train:test split x epochs. Every cell is an ordinary run, tagged with its study and cell, trained
on the same split with the same seed; re-running a study skips the cells already completed."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from dataclasses import dataclass

from core.config import DataSpec, TrainConfig
from core.data.datasets import PreparedData, prepare_data
from core.models import get_model_spec
from core.runs import RunStore
from core.training.callbacks import TrainingCallback
from core.training.estimates import StepProgress, WorkItem, images_per_epoch
from core.training.loop import ResumeError, resume_training, run_training


@dataclass(frozen=True)
class AblationCell:
    key: str  # unique within the study, e.g. "+ augmentation" or "70:30 x 50 epochs"
    config: TrainConfig


def component_cells(base: TrainConfig) -> list[AblationCell]:
    """ResNet18 baseline -> + augmentation -> + weighted sampling -> + label smoothing -> + cosine
    scheduler and dropout, which is the Hybrid S-ResNet (its head carries the dropout)."""
    baseline = dataclasses.replace(base, model="resnet18", augment=False, weighted_sampler=False,
                                   label_smoothing=0.0, scheduler=False)
    steps = [("ResNet18 baseline", {}),
             ("+ augmentation", {"augment": True}),
             ("+ weighted sampling", {"weighted_sampler": True}),
             ("+ label smoothing", {"label_smoothing": base.label_smoothing or 0.1}),
             ("+ cosine scheduler and dropout (Hybrid S-ResNet)", {"scheduler": True, "model": "hybrid_sresnet"})]
    cells, changes = [], {}
    for name, change in steps:
        changes.update(change)
        cells.append(AblationCell(name, dataclasses.replace(baseline, **changes)))
    return cells


def grid_cells(base: TrainConfig, splits=("80:20", "70:30", "60:40"), epochs=(25, 50, 75, 100),
               models=None) -> list[AblationCell]:
    """The splits x epochs grid, for each of `models` (default: the base config's model). A one-model grid's
    cells are named "80:20 x 25 epochs" as before models were an axis, so that older studies continue."""
    models = list(models or [base.model])

    def name(model: str, split: str, count: int) -> str:
        cell = f"{split} x {count} epochs"
        return f"{get_model_spec(model).display_name} {cell}" if len(models) > 1 else cell

    return [AblationCell(name(model, split, int(count)),
                         dataclasses.replace(base, model=model, split=split, epochs=int(count)))
            for model in models for split in splits for count in epochs]


def completed_cells(store: RunStore, study: str) -> dict[str, dict]:
    """Cell key -> the newest completed run of that cell in this study."""
    done = {}
    for run in store.list_runs():  # newest first
        tags = run.get("tags") or {}
        if tags.get("ablation") == study and run.get("status") == "completed":
            done.setdefault(tags.get("cell"), run)
    return done


def resumable_cells(store: RunStore, study: str) -> dict[str, dict]:
    """Cell key -> the newest stopped or killed run of that cell that can continue from its last epoch."""
    found = {}
    for run in store.list_runs():
        tags = run.get("tags") or {}
        if tags.get("ablation") == study and run.get("resumable"):
            found.setdefault(tags.get("cell"), run)
    return found


def run_ablation(spec: DataSpec, cells: list[AblationCell], store: RunStore, study: str,
                 callbacks: list[TrainingCallback] | None = None, stop: threading.Event | None = None,
                 on_cell: Callable[[AblationCell, dict | None], None] | None = None,
                 on_step: Callable[[StepProgress], None] | None = None) -> dict[str, dict]:
    """Train every cell not yet completed (a stopped cell continues from its last epoch); returns cell
    key -> run for all completed cells. `on_step` hears "cell k of N" as each cell starts training."""
    stop = stop or threading.Event()
    done, interrupted = completed_cells(store, study), resumable_cells(store, study)
    prepared: dict[tuple, PreparedData] = {}
    for number, cell in enumerate(cells, start=1):
        if stop.is_set():
            break
        if cell.key in done:
            if on_cell:
                on_cell(cell, done[cell.key])
            continue
        config, data = cell_data(spec, cell, store, prepared)
        if on_step:
            on_step(cell_step(number, cells, done, len(data.table)))
        run = train_cell(config, data, store, {"ablation": study, "cell": cell.key}, interrupted.get(cell.key),
                          callbacks, stop)
        if run["status"] == "completed":
            done[cell.key] = run
        if on_cell:
            on_cell(cell, run)
    return done


def cell_step(number: int, cells: list[AblationCell], done: dict, total_images: int) -> StepProgress:
    """Cell `number` of the study, with the cells after it still to train (their images per epoch
    from this dataset's size and each cell's split)."""
    def work(cell: AblationCell) -> WorkItem:
        return WorkItem(cell.config.epochs, images_per_epoch(total_images, cell.config))

    later = tuple(work(cell) for cell in cells[number:] if cell.key not in done)
    cell = cells[number - 1]
    return StepProgress("cell", number, len(cells), name=cell.key, current=work(cell), later=later)


def cell_data(spec: DataSpec, cell: AblationCell, store: RunStore,
               prepared: dict[tuple, PreparedData]) -> tuple[TrainConfig, PreparedData]:
    """The cell's resolved config and its data; cells that share a split share the decoded data."""
    config = cell.config.resolved(spec)
    key = (config.image_size, config.split, config.val_fraction, config.seed, config.max_images)
    if key not in prepared:
        prepared[key] = prepare_data(spec, config, store.cache_dir)
    return config, prepared[key]


def train_cell(config: TrainConfig, data: PreparedData, store: RunStore, tags: dict, interrupted: dict | None,
                callbacks, stop: threading.Event) -> dict:
    """The cell's run: its interrupted run continued when there is one, else a new run."""
    run = _continue_cell(interrupted, config, data, store, callbacks, stop)
    return run if run is not None else run_training(config, data, store, callbacks, stop, tags=tags)


def _continue_cell(run: dict | None, config: TrainConfig, data: PreparedData, store: RunStore, callbacks,
                   stop: threading.Event) -> dict | None:
    """Resume the cell's interrupted run when it was trained with this very config; None otherwise."""
    if run is None or TrainConfig.from_dict(run.get("config") or {}) != config:
        return None
    try:
        return resume_training(run["run_id"], store, callbacks, stop, data)
    except ResumeError:
        return None  # e.g. another process holds it: train the cell afresh
