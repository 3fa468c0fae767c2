"""The ablation's cells spread over several machines through one Optuna study: `python -m core ablate
--storage URL` on each. Every cell is one trial.

Optuna hands out the cells. Its GridSampler gives trial n of the study cell n of its grid (shuffled by a
seed every worker shares), and trial numbers come from the database, so workers started together take
different cells. A cell whose trial failed, was stopped, or belonged to a machine that died (its heartbeat
stopped) is queued again with `enqueue_trial`, and Optuna gives a waiting trial to one worker only. What
GridSampler cannot promise (its documentation: workers may occasionally be handed the same point), a
cell already completed or already taken by an earlier trial is skipped rather than trained twice.

Machines need not share a disk: each cell's results (the comparison row the Ablation page and `ablate`
show) are stored with its trial; its run stays in the run store of the machine that trained it.
"""

from __future__ import annotations

import math
import numbers
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from core.config import DataSpec
from core.evaluation.compare import COMPARISON_COLUMNS, comparison_table
from core.runs import RunStore
from core.training.ablation import AblationCell, cell_data, resumable_cells, train_cell
from core.training.callbacks import TrainingCallback
from core.training.estimates import StepProgress, WorkItem, images_per_epoch
from core.training.study_storage import fail_dead_trials, open_storage
from core.training.tuning import STOPPED_ATTRIBUTE

CELL_PARAMETER = "cell"
CELLS_ATTRIBUTE = "cells"  # the study's: its grid, [{"key", "split", "epochs", "model"}, ...]
RESULTS_ATTRIBUTE = "results"  # a completed trial's: the cell's comparison row
ERROR_ATTRIBUTE = "error"  # a failed trial's: why its run failed
SKIPPED_ATTRIBUTE = "skipped"  # a pruned trial's: which trial has its cell
GRID_SEED = 0  # every worker must shuffle the grid alike


@dataclass
class SharedAblation:
    """A shared ablation as its storage holds it."""

    cells: list[dict]  # key, split, epochs, model of every cell, in grid order
    table: pd.DataFrame  # the completed cells' comparison rows (Model: the cell key, Machine), in grid order
    running: list[str]  # cells some worker is training now
    failed: list[str]  # cells whose latest trial failed or was stopped

    @property
    def completed(self) -> list[str]:
        return list(self.table["Model"]) if len(self.table) else []


def describe_cell(cell: AblationCell) -> dict:
    return {"key": cell.key, "split": cell.config.split, "epochs": cell.config.epochs, "model": cell.config.model}


def open_shared_study(storage: str | optuna.storages.BaseStorage, study_name: str,
                      cells: list[AblationCell]) -> optuna.Study:
    """The study of these cells, created by the first worker; a study of other cells is refused."""
    keys = [cell.key for cell in cells]
    study = optuna.create_study(study_name=study_name, direction="maximize", load_if_exists=True,
                                storage=open_storage(storage) if isinstance(storage, str) else storage,
                                sampler=optuna.samplers.GridSampler({CELL_PARAMETER: keys}, seed=GRID_SEED))
    planned, held = [describe_cell(cell) for cell in cells], study.user_attrs.get(CELLS_ATTRIBUTE)
    if held is None:
        study.set_user_attr(CELLS_ATTRIBUTE, planned)
    elif held != planned:
        raise ValueError(f"study {study_name!r} holds other cells ({', '.join(cell['key'] for cell in held)}); "
                         "give every machine the same --kind, --splits and --epochs-grid")
    return study


def run_shared_ablation(spec: DataSpec, cells: list[AblationCell], store: RunStore, study_name: str,
                        storage: str | optuna.storages.BaseStorage,
                        callbacks: list[TrainingCallback] | None = None, stop: threading.Event | None = None,
                        on_cell: Callable[[AblationCell, dict], None] | None = None,
                        on_step: Callable[[StepProgress], None] | None = None,
                        on_wait: Callable[[list[str]], None] | None = None,
                        poll_seconds: float = 5.0) -> SharedAblation:
    """Train cells of the shared study until none is left to take, then wait for the cells other workers
    are training, so that every worker ends with the whole grid. A cell fails here at most once per call;
    one that failed with an error elsewhere during this call is left for the next call. `on_wait` hears
    the cells running elsewhere, once."""
    stop = stop or threading.Event()
    study = open_shared_study(storage, study_name, cells)
    by_key = {cell.key: cell for cell in cells}
    first_new_trial = len(study.get_trials(deepcopy=False))
    attempted: set[str] = set()
    prepared: dict = {}
    interrupted = resumable_cells(store, study_name)

    def objective(trial: optuna.Trial) -> float:
        key = trial.suggest_categorical(CELL_PARAMETER, list(by_key))
        holder = "this worker" if key in attempted else _holder(study, key, trial.number)
        if holder:
            trial.set_user_attr(SKIPPED_ATTRIBUTE, f"cell taken by {holder}")
            raise optuna.TrialPruned(f"cell {key!r} taken by {holder}")
        attempted.add(key)
        cell = by_key[key]
        config, data = cell_data(spec, cell, store, prepared)
        if on_step:
            on_step(_cell_step(cell, cells, cell_states(study), len(data.table)))
        run = train_cell(config, data, store, {"ablation": study_name, "cell": key, "trial": trial.number},
                          interrupted.get(key), callbacks, stop)
        trial.set_user_attr("run_id", run["run_id"])
        trial.set_user_attr("machine", socket.gethostname())
        if on_cell:
            on_cell(cell, run)
        if run["status"] != "completed":
            message = run.get("error") or run.get("message") or f"run ended as {run['status']}"
            if stop.is_set() and run["status"] == "stopped":
                trial.set_user_attr(STOPPED_ATTRIBUTE, True)  # any worker may take the cell again
            else:
                trial.set_user_attr(ERROR_ATTRIBUTE, message)
            raise RuntimeError(message)
        results = cell_results(store, run, key)
        trial.set_user_attr(RESULTS_ATTRIBUTE, results)
        return results["AUC"] if math.isfinite(results.get("AUC", math.nan)) else 0.0

    told = False
    while not stop.is_set():
        fail_dead_trials(study)
        states = cell_states(study)
        given_up = _failed_with_error_since(study, first_new_trial)
        takeable = [key for key in by_key if states[key] in ("new", "failed", "waiting")
                    and key not in attempted and key not in given_up]
        if takeable:
            for key in takeable:
                if states[key] == "failed":
                    study.enqueue_trial({CELL_PARAMETER: key})
            tried = len(attempted)
            study.optimize(objective, n_trials=1, catch=(RuntimeError,))
            if len(attempted) == tried:  # the trial was skipped: give the other workers' records a moment
                stop.wait(1.0)
            continue
        running = [key for key in by_key if states[key] == "running"]
        if not running:
            break
        if on_wait and not told:
            on_wait(running)
            told = True
        stop.wait(poll_seconds)
    return shared_ablation(study)


def cell_results(store: RunStore, run: dict, key: str) -> dict:
    """The cell's row of the comparison table (test metrics with 95% bootstrap intervals, train
    accuracy), named by the cell; plain numbers, so that it can be stored with the trial."""
    table = comparison_table([run], store)
    row = table.iloc[0].to_dict() if len(table) else {"Run": run["run_id"]}
    row["Model"] = key
    return {name: float(value) if isinstance(value, numbers.Real) else value for name, value in row.items()}


def cell_states(study: optuna.Study) -> dict[str, str]:
    """Cell key -> complete, running, waiting (queued, no worker yet), failed (tried, none of the
    above) or new, from the study's trials."""
    trials = _trials_by_cell(study)
    states = {}
    for cell in study.user_attrs.get(CELLS_ATTRIBUTE) or []:
        seen = {trial.state for trial in trials.get(cell["key"], [])}
        states[cell["key"]] = ("complete" if TrialState.COMPLETE in seen else "running" if TrialState.RUNNING in seen
                               else "waiting" if TrialState.WAITING in seen else "failed" if seen else "new")
    return states


def shared_ablation(study: optuna.Study) -> SharedAblation:
    cells, trials, states = study.user_attrs.get(CELLS_ATTRIBUTE) or [], _trials_by_cell(study), cell_states(study)
    rows = []
    for cell in cells:
        completed = [trial for trial in trials.get(cell["key"], []) if trial.state == TrialState.COMPLETE]
        if completed:
            trial = completed[0]
            rows.append({**trial.user_attrs.get(RESULTS_ATTRIBUTE, {}), "Model": cell["key"],
                         "Machine": trial.user_attrs.get("machine")})
    metrics = [f"{title}{part}" for title, _, _ in COMPARISON_COLUMNS for part in ("", " low", " high")]
    columns = ["Model", "Run", *metrics, "Machine"]
    return SharedAblation(cells, pd.DataFrame(rows).reindex(columns=columns),
                          running=[key for key, state in states.items() if state == "running"],
                          failed=[key for key, state in states.items() if state == "failed"])


def load_shared_ablation(storage: str | optuna.storages.BaseStorage, study_name: str) -> SharedAblation | None:
    """What the storage holds of the study; None when it has no study of that name."""
    try:
        study = optuna.load_study(study_name=study_name,
                                  storage=open_storage(storage) if isinstance(storage, str) else storage)
    except KeyError:
        return None
    return shared_ablation(study)


def _trial_cell(trial: FrozenTrial) -> str | None:
    # A queued trial carries its cell as a fixed parameter until a worker takes it.
    return trial.params.get(CELL_PARAMETER, (trial.system_attrs.get("fixed_params") or {}).get(CELL_PARAMETER))


def _trials_by_cell(study: optuna.Study) -> dict[str, list[FrozenTrial]]:
    found: dict[str, list[FrozenTrial]] = {}
    for trial in study.get_trials(deepcopy=False):
        key = _trial_cell(trial)
        if key is not None:
            found.setdefault(key, []).append(trial)
    return found


def _holder(study: optuna.Study, key: str, number: int) -> str | None:
    """The trial that has the cell already: a completed one, or a running one numbered before this one.
    Trials are created, and queued ones taken, in number order, so of two running copies of a cell the
    later one sees the earlier and gives way."""
    for trial in _trials_by_cell(study).get(key, []):
        if trial.number != number and (trial.state == TrialState.COMPLETE
                                       or (trial.state == TrialState.RUNNING and trial.number < number)):
            return f"trial {trial.number}"
    return None


def _failed_with_error_since(study: optuna.Study, first_trial: int) -> set[str]:
    """Cells whose run failed with an error in a trial begun during this call: trying again would fail again."""
    return {_trial_cell(trial) for trial in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
            if trial.number >= first_trial and ERROR_ATTRIBUTE in trial.user_attrs}


def _cell_step(cell: AblationCell, cells: list[AblationCell], states: dict[str, str],
               total_images: int) -> StepProgress:
    """This cell, numbered after the completed ones, with the cells no worker has taken yet after it."""
    def work(item: AblationCell) -> WorkItem:
        return WorkItem(item.config.epochs, images_per_epoch(total_images, item.config))

    later = tuple(work(item) for item in cells if item.key != cell.key and states.get(item.key) in ("new", "failed"))
    done = sum(state == "complete" for state in states.values())
    return StepProgress("cell", done + 1, len(cells), name=cell.key, current=work(cell), later=later)
