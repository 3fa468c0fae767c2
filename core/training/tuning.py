"""The paper's Optuna search over learning rate, weight decay and dropout, maximising validation AUC.

Every trial is an ordinary run in the run store (tagged with its study and trial number). Bad trials
are pruned after an epoch. Studies live in an SQLite file under the run store by default; any
SQLAlchemy URL (PostgreSQL, MySQL) lets several machines work on one study. Re-running a study with
the same name continues it.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

import optuna
import pandas as pd
from sqlalchemy.engine import make_url

from core.config import PRUNERS, TrainConfig
from core.data.datasets import PreparedData
from core.runs import RunStore
from core.training.callbacks import EpochRecord, TrainingCallback
from core.training.estimates import StepProgress, WorkItem
from core.training.loop import run_training
from core.training.study_storage import StudyWorker, open_storage

# fANOVA importances from fewer finished trials are noise that looks like a finding.
MIN_TRIALS_FOR_IMPORTANCE = 5
STOPPED_ATTRIBUTE = "stopped_by_request"  # a trial's user attribute: the study was stopped during it


@dataclass(frozen=True)
class SearchSpace:
    """The paper's space: lr and weight decay on log scales, dropout linear."""

    lr: tuple[float, float] = (1e-5, 1e-2)
    weight_decay: tuple[float, float] = (1e-7, 1e-2)
    dropout: tuple[float, float] = (0.0, 0.6)

    def suggest(self, trial: optuna.Trial, base: TrainConfig) -> TrainConfig:
        return dataclasses.replace(
            base,
            lr=trial.suggest_float("lr", *self.lr, log=True),
            weight_decay=trial.suggest_float("weight_decay", *self.weight_decay, log=True),
            dropout=trial.suggest_float("dropout", *self.dropout),
        )


def make_pruner(name: str | optuna.pruners.BasePruner) -> optuna.pruners.BasePruner:
    if isinstance(name, optuna.pruners.BasePruner):
        return name
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
    if name == "percentile":
        return optuna.pruners.PercentilePruner(25.0, n_startup_trials=2, n_warmup_steps=1)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ValueError(f"unknown pruner {name!r} (choose from {', '.join(PRUNERS)})")


def default_storage(store: RunStore) -> str:
    store.root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(store.root / 'optuna.db').resolve()}"


class _ReportToTrial(TrainingCallback):
    """Reports validation AUC to Optuna after each epoch and asks the run to stop when pruned (or when
    the whole study is asked to stop)."""

    def __init__(self, trial: optuna.Trial, stop: threading.Event, study_stop: threading.Event) -> None:
        self.trial, self.stop, self.study_stop, self.pruned = trial, stop, study_stop, False

    def on_batch_end(self, progress) -> None:
        if self.study_stop.is_set():
            self.stop.set()

    def on_epoch_end(self, record: EpochRecord) -> None:
        value = record.val_auc if math.isfinite(record.val_auc) else 0.0
        self.trial.report(value, record.epoch)
        if self.trial.should_prune():
            self.pruned = True
            self.stop.set()


def run_study(data: PreparedData, base: TrainConfig, store: RunStore, study_name: str, trials: int,
              storage: str | optuna.storages.BaseStorage | None = None,
              pruner: str | optuna.pruners.BasePruner = "median",
              space: SearchSpace = SearchSpace(),
              callbacks: list[TrainingCallback] | None = None, stop: threading.Event | None = None,
              on_trial_end: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None,
              on_step: Callable[[StepProgress], None] | None = None) -> optuna.Study:
    """Run `trials` more trials of the study (created, or continued when it exists). `storage` is a URL or
    an opened storage (default: SQLite in the run store); other workers may add trials to the same study
    at the same time. `on_step` hears "trial k of `trials`" as each trial starts, with the work left after
    it (for time estimates)."""
    stop = stop or threading.Event()
    storage = storage or default_storage(store)
    opened = open_storage(storage) if isinstance(storage, str) else storage
    study = optuna.create_study(study_name=study_name, storage=opened, direction="maximize",
                                pruner=make_pruner(pruner), load_if_exists=True)
    # Seeded for reproducibility, but offset by the trials already there: a continued study must not
    # replay the same random start-up points. A study in another storage may be shared, and workers
    # started together would count the same trials and draw the same parameters: it is not seeded.
    url = getattr(opened, "url", None)
    shared = url is None or make_url(url) != make_url(default_storage(store))
    study.sampler = optuna.samplers.TPESampler(seed=None if shared else base.seed + len(study.trials))
    study.set_user_attr("model", base.model)
    study.set_user_attr("dataset", data.describe()["fingerprint"])

    work = WorkItem(base.epochs, len(data.indices("train")))
    started = itertools.count(1)
    worker = StudyWorker(study, trials)

    def objective(trial: optuna.Trial) -> float:
        worker.started_one()  # this trial is RUNNING now: other workers see it there
        number = next(started)
        if on_step:
            on_step(StepProgress("trial", number, trials, current=work, later=(work,) * (trials - number)))
        config = space.suggest(trial, base)
        trial_stop = threading.Event()
        reporter = _ReportToTrial(trial, trial_stop, stop)
        run = run_training(config, data, store, [reporter, *(callbacks or [])], trial_stop,
                           tags={"study": study_name, "trial": trial.number})
        trial.set_user_attr("run_id", run["run_id"])
        if reporter.pruned:
            store.discard_resume_state(run["run_id"])
            raise optuna.TrialPruned(f"pruned after epoch {len(run['history'])}")
        if run["status"] != "completed":
            if stop.is_set() and run["status"] == "stopped":
                # Optuna has no "stopped" state: the trial is failed, and marked so the table can say why.
                trial.set_user_attr(STOPPED_ATTRIBUTE, True)
            raise RuntimeError(run.get("error") or run.get("message") or f"run ended as {run['status']}")
        # The best epoch's validation AUC: the model the run keeps. The test part is never used.
        return max(entry["val_auc"] or 0.0 for entry in run["history"])

    def check_stop(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        worker.alive()  # before the next trial is asked for: no gap in which this worker looks finished
        if on_trial_end:
            on_trial_end(study, trial)
        if stop.is_set():
            study.stop()

    try:
        study.optimize(objective, n_trials=trials, callbacks=[check_stop], catch=(RuntimeError,))
    finally:
        worker.finished()
    return study


def trials_table(study: optuna.Study):
    """One row per trial: number, state, value (validation AUC), parameters, run id."""
    frame = study.trials_dataframe(attrs=("number", "state", "value", "params", "user_attrs", "duration"))
    return frame.rename(columns=lambda name: name.replace("params_", "").replace("user_attrs_", ""))


PARAMETER_NAMES = {"lr": "Learning rate", "weight_decay": "Weight decay", "dropout": "Dropout"}
TRIAL_COLUMNS = {"number": "Trial", "value": "Validation AUC", "lr": "Learning rate", "weight_decay": "Weight decay",
                 "dropout": "Dropout", "state": "State", "duration": "Duration", "run_id": "Run"}


def readable_trials_table(study: optuna.Study) -> pd.DataFrame:
    """The trials table as people read it: named columns, states in words ("stopped" for a trial the
    study's Stop ended), durations in seconds."""
    table = trials_table(study)
    if table.empty:
        return pd.DataFrame(columns=list(TRIAL_COLUMNS.values()))
    states = table["state"].map(lambda state: str(state).replace("_", " ").lower())
    if STOPPED_ATTRIBUTE in table:
        states = states.mask(table[STOPPED_ATTRIBUTE].eq(True), "stopped")
    table = table.reindex(columns=list(TRIAL_COLUMNS)).assign(state=states)
    table["duration"] = table["duration"].map(lambda span: span.total_seconds() if pd.notna(span) else None)
    return table.rename(columns=TRIAL_COLUMNS)


def finished_trial_count(study: optuna.Study) -> int:
    return sum(trial.state == optuna.trial.TrialState.COMPLETE for trial in study.trials)


def parallel_coordinates_figure(study: optuna.Study):
    """Optuna's parallel-coordinates plot with readable axis names and room for them: the outer names
    ("Validation AUC", "Weight decay") and the value labels beside the first axis otherwise run off the
    figure. Optuna 4+ draws it with scatter lines (names as x ticks); older versions with Plotly parcoords."""
    figure = optuna.visualization.plot_parallel_coordinate(study, target_name="Validation AUC")
    for trace in figure.data:
        if trace.type == "parcoords":
            trace.update(labelangle=-20, labelside="bottom",
                         dimensions=[dict(dimension, label=PARAMETER_NAMES.get(dimension.label, dimension.label))
                                     for dimension in trace.dimensions])
    names = figure.layout.xaxis.ticktext
    if names:
        figure.update_xaxes(ticktext=[PARAMETER_NAMES.get(name, name) for name in names], tickangle=-20,
                            range=[-0.5, len(names) - 0.5])
    figure.update_layout(margin={"l": 90, "r": 90, "t": 60, "b": 90})
    return figure


def describe_parameters(params: dict) -> str:
    """A trial's parameters as the page names them: "learning rate 6.25e-04, weight decay 6.03e-07, dropout 0.094"."""
    def shown(name: str, value: float) -> str:
        return f"{value:.3f}" if name == "dropout" else f"{value:.2e}"

    return ", ".join(f"{PARAMETER_NAMES.get(name, name).lower()} {shown(name, value)}"
                     for name, value in params.items())
