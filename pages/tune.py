"""Tune page: the paper's Optuna search, run in the background queue, with its trials as they finish."""

from __future__ import annotations

import dataclasses

import optuna
import streamlit as st

from core.config import MODEL_NAMES
from core.datasets import prepare_data
from core.models import get_model_spec
from core.tuning import PRUNERS, default_storage, run_study, trials_table
from pages.common import (
    current_config,
    current_data_spec,
    dataset_label,
    persistent,
    require_entrypoint,
    run_store,
    shared_job_queue,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)


def start_study(model: str, trials: int, pruner: str, study_name: str, storage: str) -> None:
    store, spec = run_store(), current_data_spec()
    base = current_config(model)

    def task(stop, callback):
        data = prepare_data(spec, base, store.cache_dir)
        run_study(data, base, store, study_name, trials, storage, pruner, callbacks=[callback], stop=stop)
        return ("stopped", "stopped by request") if stop.is_set() else ("completed", None)

    shared_job_queue().submit_task(f"Tune {study_name}", base, spec, task)


def load_study(name: str, storage: str) -> optuna.Study | None:
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return None


def show_study(study: optuna.Study) -> None:
    table = trials_table(study)
    if table.empty:
        st.caption("No trials yet.")
        return
    st.dataframe(table, hide_index=True, width="stretch", key="tune.trials")
    complete = [trial for trial in study.trials if trial.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        return
    best = study.best_trial
    st.success(f"Best trial {best.number}: validation AUC {best.value:.4f} with "
               + ", ".join(f"{key} {value:.3g}" for key, value in best.params.items()))
    if st.button("Train with best", key="tune.train_best", icon=":material/play_arrow:",
                 help="Queues a full run with the best parameters and the Train page's other settings."):
        config = dataclasses.replace(current_config(study.user_attrs.get("model", "hybrid_sresnet")), **best.params)
        shared_job_queue().submit([config], current_data_spec())
        st.toast("Queued a run with the best parameters: see the Train page.")
    left, right = st.columns(2)
    left.plotly_chart(optuna.visualization.plot_optimization_history(study), width="stretch", key="tune.history")
    right.plotly_chart(optuna.visualization.plot_parallel_coordinate(study), width="stretch", key="tune.parallel")
    if len(complete) >= 2:
        try:
            st.plotly_chart(optuna.visualization.plot_param_importances(study), width="stretch",
                            key="tune.importances")
        except (ValueError, RuntimeError) as error:
            st.caption(f"Parameter importances not available yet ({error}).")


@st.fragment(run_every=2.0)
def live_study(name: str, storage: str) -> None:
    snapshot = shared_job_queue().snapshot()
    current = snapshot.current
    if current is not None:
        progress = current.progress
        text = f"{current.label or current.config.model}: " + (
            f"epoch {progress.epoch}/{progress.epochs}, batch {progress.batch}/{progress.batches}" if progress
            else "preparing ...")
        st.progress(progress.fraction_done if progress else 0.0, text=text)
        if st.button("Stop", key="tune.stop", icon=":material/stop:"):
            shared_job_queue().stop_current()
    study = load_study(name, storage)
    if study is None:
        st.caption(f"No study named {name!r} yet.")
        return
    show_study(study)


def main() -> None:
    require_entrypoint()
    st.title("Tune")
    store = run_store()
    st.caption(f"Optuna over learning rate, weight decay and dropout on {dataset_label(current_data_spec())}, "
               "maximising validation AUC (never test); the other settings come from the Train page.")
    columns = st.columns(4)
    with columns[0]:
        model = persistent(st.selectbox, "Model", "tune_model", "hybrid_sresnet", options=list(MODEL_NAMES),
                           format_func=lambda name: get_model_spec(name).display_name)
    with columns[1]:
        trials = persistent(st.number_input, "Trials to add", "tune_trials", 10, min_value=1, max_value=500, step=1)
    with columns[2]:
        pruner = persistent(st.selectbox, "Pruner", "tune_pruner", "median", options=list(PRUNERS))
    with columns[3]:
        study_name = persistent(st.text_input, "Study", "tune_study", f"tune-{model}",
                                help="An existing study of this name continues.")
    storage = persistent(st.text_input, "Storage (SQLAlchemy URL)", "tune_storage", "",
                         placeholder=f"default: {default_storage(store)}",
                         help="PostgreSQL or MySQL lets several machines work on one study.").strip()
    storage = storage or default_storage(store)
    if st.button("Start the study", key="tune.start", type="primary", icon=":material/tune:"):
        start_study(model, int(trials), pruner, study_name.strip() or f"tune-{model}", storage)
        st.toast("Queued: trials run one after another in the background queue (see also the Train page).")
    try:
        names = [summary.study_name for summary in optuna.get_all_study_summaries(storage)]
    except Exception as error:  # noqa: BLE001 - a bad URL or an unreachable database
        st.error(f"Cannot open the study storage {storage}: {type(error).__name__}: {error}")
        return
    if not names and not shared_job_queue().snapshot().busy:
        st.info("No studies yet. Start one above.")
        return
    shown = st.selectbox("Show study", sorted(set(names) | {study_name}), key="tune.shown",
                         index=sorted(set(names) | {study_name}).index(study_name))
    live_study(shown, storage)


main()
