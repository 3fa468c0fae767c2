"""Tune page: the paper's Optuna search, run in the background queue, with its trials as they finish."""

from __future__ import annotations

import dataclasses

import optuna
import streamlit as st

from core.config import MODEL_NAMES, PRUNERS, TrainConfig
from core.data.datasets import prepare_data
from core.models import get_model_spec
from core.training.estimates import TimeEstimate, WorkItem, estimate_runs
from core.training.jobs import QueueSnapshot
from core.training.study_storage import StudyStorageError, open_storage
from core.training.tuning import (
    MIN_TRIALS_FOR_IMPORTANCE,
    default_storage,
    describe_parameters,
    finished_trial_count,
    parallel_coordinates_figure,
    readable_trials_table,
    run_study,
)
from pages.common import (
    VALUE_PREFIX,
    confirm_long_work,
    current_config,
    current_data_spec,
    dataset_label,
    job_progress_and_stop,
    persistent,
    prepared_for,
    require_admin_page,
    require_entrypoint,
    rerun_when_queue_changes,
    run_choice_label,
    run_store,
    shared_job_queue,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)

TRIAL_FORMATS = {
    "Validation AUC": st.column_config.NumberColumn(format="%.4f"),
    "Learning rate": st.column_config.NumberColumn(format="%.2e"),
    "Weight decay": st.column_config.NumberColumn(format="%.2e"),
    "Dropout": st.column_config.NumberColumn(format="%.3f"),
    "Duration": st.column_config.NumberColumn(format="%.1f s"),
}


def study_label(name: str) -> str:
    return f"Tune study {name}"


def start_study(base: TrainConfig, trials: int, pruner: str, study_name: str, storage: str) -> int | None:
    store, spec = run_store(), current_data_spec()

    def task(stop, callback):
        data = prepare_data(spec, base, store.cache_dir)
        run_study(data, base, store, study_name, trials, storage, pruner, callbacks=[callback], stop=stop,
                  on_step=callback.on_step)
        return ("stopped", "stopped by request") if stop.is_set() else ("completed", None)

    return shared_job_queue().submit_task(study_label(study_name), base, spec, task, kind="tune")


def estimate_study(base: TrainConfig, trials: int) -> TimeEstimate | None:
    """Every trial trained to the end (pruned ones end sooner), at this model's recorded rate."""
    spec = current_data_spec()
    try:
        train_images = len(prepared_for(spec, base).indices("train"))
    except (OSError, ValueError):
        return None  # the Data page shows what is wrong with the dataset
    size = base.resolved(spec).image_size
    return estimate_runs(run_store(), [(base.model, size, WorkItem(base.epochs, train_images))] * trials)


def start_blocker(snapshot: QueueSnapshot, study_name: str) -> str:
    """Why Start is disabled now, or "" when it is not: one study at a time, and never behind other work
    (a study queued behind hours of training would look like a study that does nothing)."""
    current = snapshot.current
    if current is not None and current.label == study_label(study_name):
        return "This study is running; stop it below to change its settings."
    if current is not None:
        return f"The queue is busy with {current.busy_text()}; start the study when it ends."
    if snapshot.queued:
        return f"{len(snapshot.queued)} job(s) are queued; start the study when they have run."
    return ""


def launch(base: TrainConfig, trials: int, pruner: str, study_name: str, storage: str) -> None:
    estimate = estimate_study(base, trials)
    if estimate is not None:
        st.caption(f"{trials} trial(s) × {base.epochs} epoch(s): {estimate.describe()} if no trial is pruned, "
                   f"{estimate.explain()}.")
    confirmed = estimate is None or confirm_long_work(estimate, "tune.confirm_long")
    blocker = start_blocker(shared_job_queue().snapshot(), study_name)
    if st.button("Start the study", key="tune.start", type="primary", icon=":material/tune:",
                 disabled=bool(blocker) or not confirmed, help=blocker or None):
        if start_study(base, trials, pruner, study_name, storage) is None:
            return  # refused (queue limit): the reason is shown
        st.toast("Queued: trials run one after another in the background queue (see also the Train page).")
        st.rerun()  # draws Start disabled, now that the study runs
    if blocker:
        st.caption(blocker)


@st.cache_resource(show_spinner=False)
def study_storage(url: str) -> optuna.storages.RDBStorage:
    """One opened storage per URL, as the CLI opens it (PostgreSQL driver, timeouts); a failure is not cached."""
    return open_storage(url)


def load_study(name: str, storage: str) -> optuna.Study | None:
    try:
        return optuna.load_study(study_name=name, storage=study_storage(storage))
    except KeyError:
        return None


def show_study(study: optuna.Study) -> None:
    table = readable_trials_table(study)
    if table.empty:
        st.caption("No trials yet.")
        return
    st.dataframe(table, hide_index=True, width="stretch", key="tune.trials", placeholder="—",
                 column_config=TRIAL_FORMATS)
    finished = finished_trial_count(study)
    if not finished:
        return
    best = study.best_trial
    st.success(f"Best trial {best.number}: validation AUC {best.value:.4f} with {describe_parameters(best.params)}")
    if st.button("Train with best", key="tune.train_best", icon=":material/play_arrow:",
                 help="Queues a full run with the best parameters and the Train page's other settings."):
        config = dataclasses.replace(current_config(study.user_attrs.get("model", "hybrid_sresnet")), **best.params)
        if shared_job_queue().submit([config], current_data_spec(), group=f"best of {study.study_name}"):
            st.toast("Queued a run with the best parameters: see the Train page.")
    left, right = st.columns(2)
    left.plotly_chart(optuna.visualization.plot_optimization_history(study, target_name="Validation AUC"),
                      width="stretch", key="tune.history")
    right.plotly_chart(parallel_coordinates_figure(study), width="stretch", key="tune.parallel")
    show_importances(study, finished)
    show_study_runs(study.study_name)


def show_importances(study: optuna.Study, finished: int) -> None:
    if finished < MIN_TRIALS_FOR_IMPORTANCE:
        st.caption(f"Parameter importances need at least {MIN_TRIALS_FOR_IMPORTANCE} finished trials "
                   f"({finished} so far).")
        return
    try:
        st.plotly_chart(optuna.visualization.plot_param_importances(study, target_name="Validation AUC"),
                        width="stretch", key="tune.importances")
    except (ValueError, RuntimeError) as error:
        st.caption(f"Parameter importances not available yet ({error}).")


def show_study_runs(name: str) -> None:
    runs = [run for run in run_store().list_runs() if (run.get("tags") or {}).get("study") == name]
    if not runs:
        return
    with st.expander(f"Runs of this study ({len(runs)})"):
        st.markdown("\n".join(f"- {run_choice_label(run)} ({run.get('status', '?')})" for run in runs))


@st.fragment(run_every=2.0)
def live_study(name: str, storage: str) -> None:
    job_progress_and_stop("tune", "tune", "a study can start when it ends")
    rerun_when_queue_changes("tune")
    study = load_study(name, storage)
    if study is None:
        st.caption(f"No study named {name!r} yet.")
        return
    show_study(study)


def follow_model(model: str) -> None:
    """Keep the study name in step with the model while it is still a default name ("tune-resnet18"): a
    newcomer who picks another model should not add its trials to the first model's study."""
    key = VALUE_PREFIX + "tune_study"
    if st.session_state.get(key) in {f"tune-{name}" for name in MODEL_NAMES}:
        st.session_state[key] = f"tune-{model}"


def main() -> None:
    require_entrypoint()
    require_admin_page("Tune")
    st.title("Tune")
    store = run_store()
    st.caption(f"Optuna over learning rate, weight decay and dropout on {dataset_label(current_data_spec())}, "
               "maximising validation AUC (never test); the other settings come from the Train page.")
    columns = st.columns(5)
    with columns[0]:
        model = persistent(st.selectbox, "Model", "tune_model", "hybrid_sresnet", options=list(MODEL_NAMES),
                           format_func=lambda name: get_model_spec(name).display_name)
    with columns[1]:
        trials = persistent(st.number_input, "Trials to add", "tune_trials", 10, min_value=1, max_value=500, step=1)
    with columns[2]:
        epochs = persistent(st.number_input, "Epochs per trial", "tune_epochs", current_config().epochs,
                            min_value=1, max_value=500, step=1,
                            help="The budget of each trial; bad trials are pruned after an epoch.")
    with columns[3]:
        pruner = persistent(st.selectbox, "Pruner", "tune_pruner", "median", options=list(PRUNERS))
    with columns[4]:
        follow_model(model)
        study_name = persistent(st.text_input, "Study", "tune_study", f"tune-{model}",
                                help="An existing study of this name continues.")
    storage = persistent(st.text_input, "Storage (SQLAlchemy URL)", "tune_storage", "",
                         placeholder=f"default: {default_storage(store)}",
                         help="PostgreSQL or MySQL lets several machines work on one study.").strip()
    storage = storage or default_storage(store)
    study_name = study_name.strip() or f"tune-{model}"
    base = dataclasses.replace(current_config(model), epochs=int(epochs))
    launch(base, int(trials), pruner, study_name, storage)
    try:
        names = [summary.study_name for summary in optuna.get_all_study_summaries(study_storage(storage))]
    except StudyStorageError as error:  # a bad URL or an unreachable database: one line naming the host
        st.error(str(error))
        return
    if not names and not shared_job_queue().snapshot().busy:
        st.info("No studies yet. Start one above.")
        return
    shown = st.selectbox("Show study", sorted(set(names) | {study_name}), key="tune.shown",
                         index=sorted(set(names) | {study_name}).index(study_name))
    live_study(shown, storage)


main()
