"""Ablation page: the paper's component ablation and its split x epochs grid, each cell an ordinary run."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from core.config import MODEL_NAMES
from core.evaluation.compare import build_comparison
from core.figures import grid_heatmap_figure, metric_bars_figure
from core.models import get_model_spec
from core.training.ablation import AblationCell, completed_cells, component_cells, grid_cells, run_ablation
from core.training.estimates import TimeEstimate, WorkItem, estimate_runs, images_per_epoch
from core.training.shared_ablation import SharedAblation, describe_cell, load_shared_ablation, run_shared_ablation
from core.training.study_storage import StudyStorageError, open_storage
from pages.common import (
    SPLIT_RATIOS,
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


def planned_cells(kind: str, splits: list[str], epochs: list[int], models: list[str]):
    base = current_config("resnet18")
    return component_cells(base) if kind == "Components" else grid_cells(base, splits, epochs, models)


def study_label(study: str) -> str:
    return f"Ablation {study}"


@st.cache_resource(show_spinner=False)
def study_storage(url: str):
    """One opened storage per URL (Optuna's RDB storage serves several threads); a failure is not cached."""
    return open_storage(url)


def shared_study(storage: str, study: str) -> SharedAblation | None:
    return load_shared_ablation(study_storage(storage), study)


def start(kind: str, cells, study: str, storage: str) -> int | None:
    store, spec = run_store(), current_data_spec()

    def task(stop, callback):
        if storage:  # this machine joins the workers of the shared study
            done = run_shared_ablation(spec, cells, store, study, storage, callbacks=[callback], stop=stop,
                                       on_step=callback.on_step).completed
        else:
            done = run_ablation(spec, cells, store, study, callbacks=[callback], stop=stop, on_step=callback.on_step)
        if stop.is_set():
            return "stopped", "stopped by request; finished cells are kept and re-running continues"
        return ("completed", None) if len(done) == len(cells) else ("failed", "some cells did not complete")

    return shared_job_queue().submit_task(study_label(study), cells[0].config, spec, task, kind="ablation")


def estimate_cells(cells: list[AblationCell]) -> TimeEstimate | None:
    """The cells still to train, each at its model's recorded rate and its split's share of the images."""
    spec = current_data_spec()
    base = current_config("resnet18")
    try:
        total_images = len(prepared_for(spec, base).table)
    except (OSError, ValueError):
        return None  # the Data page shows what is wrong with the dataset
    return estimate_runs(run_store(), [
        (cell.config.model, cell.config.resolved(spec).image_size,
         WorkItem(cell.config.epochs, images_per_epoch(total_images, cell.config))) for cell in cells])


def start_blocker(study: str, cells: list[AblationCell], shared: SharedAblation | None) -> str:
    """Why Run is disabled: the same study already queued or running (a second copy would redo its cells),
    or a shared study of other cells."""
    for job in shared_job_queue().snapshot().jobs:
        if job.active and job.label == study_label(study):
            return f"Study {study!r} is already {job.state}" + (
                f" ({job.describe_step()})." if job.describe_step() else ".")
    if shared is not None and shared.cells != [describe_cell(cell) for cell in cells]:
        return (f"Study {study!r} in the shared storage holds other cells "
                f"({', '.join(cell['key'] for cell in shared.cells)}): choose its models, splits and epochs to join "
                "it.")
    return ""


def launch(kind: str, cells: list[AblationCell], study: str, storage: str) -> None:
    shared = shared_study(storage, study) if storage else None
    if storage:
        done = shared.completed if shared else []
    else:
        done = completed_cells(run_store(), study)
    pending = [cell for cell in cells if cell.key not in done]
    estimate = estimate_cells(pending) if pending else None
    if estimate is not None:
        epochs = sum(cell.config.epochs for cell in pending)
        st.caption(f"{len(pending)} of {len(cells)} cells to train ({epochs} epochs in all): "
                   f"{estimate.describe()}, {estimate.explain()}.")
    confirmed = estimate is None or confirm_long_work(estimate, "ablation.confirm_long")
    blocker = start_blocker(study, cells, shared)
    if st.button(f"Run the {len(cells)} cells", key="ablation.start", type="primary", icon=":material/science:",
                 disabled=bool(blocker) or not confirmed, help=blocker or None):
        if start(kind, cells, study, storage) is None:
            return  # refused (queue limit): the reason is shown
        st.toast("Queued in the background queue (progress also on the Train page).")
        st.rerun()  # draws Run disabled, now that the study is queued
    if blocker:
        st.caption(blocker)


def local_results(cells: list[AblationCell], study: str) -> tuple[list[dict], pd.DataFrame]:
    """The planned cells and the comparison rows of those completed in this run store."""
    store = run_store()
    done = completed_cells(store, study)
    finished = [cell for cell in cells if cell.key in done]
    table = build_comparison(store, [done[cell.key] for cell in finished], names=[cell.key for cell in finished],
                             resamples=1000).table if finished else pd.DataFrame(columns=["Model"])
    return [describe_cell(cell) for cell in cells], table


def show_results(kind: str, cells, study: str, storage: str) -> None:
    if storage:
        shared = shared_study(storage, study)
        if shared is None:
            st.caption(f"No study {study!r} in the shared storage yet.")
            return
        planned, table = shared.cells, shared.table
        running = f"; running now: {', '.join(shared.running)}" if shared.running else ""
        st.caption(f"{len(table)} of {len(planned)} cells completed in shared study {study!r}{running}.")
    else:
        planned, table = local_results(cells, study)
        st.caption(f"{len(table)} of {len(planned)} cells completed in study {study!r}.")
    if table.empty:
        return
    if kind == "Components":
        st.plotly_chart(metric_bars_figure(table, [("AUC", "AUC"), ("Test acc", "Accuracy"), ("Recall", "Sensitivity"),
                                                   ("Specificity", "Specificity")],
                                           "Test metrics per ablation step (95% bootstrap intervals)"),
                        width="stretch", key="ablation.steps")
    else:
        splits = list(dict.fromkeys(cell["split"] for cell in planned))
        epochs = list(dict.fromkeys(cell["epochs"] for cell in planned))
        models = list(dict.fromkeys(cell.get("model", "resnet18") for cell in planned))
        auc = table.set_index("Model")["AUC"]
        for model in models:
            values = np.full((len(splits), len(epochs)), np.nan)
            for cell in planned:
                if cell.get("model", "resnet18") == model and cell["key"] in auc:
                    values[splits.index(cell["split"]), epochs.index(cell["epochs"])] = auc[cell["key"]]
            title = f"Test AUC over the grid: {get_model_spec(model).display_name}" if len(models) > 1 else (
                "Test AUC over the grid")
            st.plotly_chart(grid_heatmap_figure(splits, [str(e) for e in epochs], values, title),
                            width="stretch", key=f"ablation.grid.{model}")
    st.plotly_chart(metric_bars_figure(table, [("Train acc", "Train accuracy"), ("Test acc", "Test accuracy")],
                                       "Train vs test accuracy (a growing gap is overfitting)"),
                    width="stretch", key="ablation.overfitting")
    shown = table[["Model", "Train acc", "Test acc", "AUC", "AUC low", "AUC high", "Recall", "Specificity"]]
    st.dataframe(shown.rename(columns={"Model": "Cell"}), hide_index=True, width="stretch", key="ablation.table",
                 placeholder="—",
                 column_config={name: st.column_config.NumberColumn(format="%.3f") for name in shown.columns[1:]})


def show_study_runs(study: str) -> None:
    runs = [run for run in run_store().list_runs() if (run.get("tags") or {}).get("ablation") == study]
    if not runs:
        return
    with st.expander(f"Runs of this study ({len(runs)})"):
        st.markdown("\n".join(f"- {run_choice_label(run)} ({run.get('status', '?')})" for run in runs))


@st.fragment(run_every=2.0)
def live(kind, cells, study, storage) -> None:
    job_progress_and_stop("ablation", "ablation", "an ablation started here will start after it")
    rerun_when_queue_changes("ablation")
    try:
        show_results(kind, cells, study, storage)
    except StudyStorageError as error:
        st.error(str(error))
    show_study_runs(study)


def main() -> None:
    require_entrypoint()
    require_admin_page("Ablation")
    st.title("Ablation")
    st.caption(f"On {dataset_label(current_data_spec())}, with the Train page's settings; every cell uses the same "
               "seed and (for the components) the same split.")
    kind = persistent(st.radio, "Study", "ablation_kind", "Components", options=["Components", "Split x epochs grid"],
                      horizontal=True,
                      help="Components: ResNet18 baseline, + augmentation, + weighted sampling, + label smoothing, "
                           "+ cosine scheduler and dropout (the Hybrid S-ResNet).")
    splits, epochs, models = SPLIT_RATIOS, [25, 50, 75, 100], ["resnet18"]
    if kind != "Components":
        models = persistent(st.multiselect, "Models", "ablation_models", ["resnet18"], options=MODEL_NAMES,
                            format_func=lambda name: get_model_spec(name).display_name,
                            help="Each model gets the whole splits x epochs grid.") or ["resnet18"]
        left, right = st.columns(2)
        splits = persistent(left.multiselect, "Train:test splits", "ablation_splits", SPLIT_RATIOS,
                            options=SPLIT_RATIOS) or SPLIT_RATIOS
        text = persistent(right.text_input, "Epochs", "ablation_epochs", "25, 50, 75, 100",
                          help="The paper used 25, 50, 75 and 100; fewer epochs make a quick demo.")
        try:
            epochs = sorted({int(value) for value in text.replace(" ", "").split(",") if value})
        except ValueError:
            st.error(f"Epochs must be whole numbers separated by commas, not {text!r}.")
            return
    default_study = "ablation-components" if kind == "Components" else "ablation-grid"
    study = persistent(st.text_input, "Study name", f"ablation_study_{kind[:4]}", default_study,
                       help="Re-running a study continues it: completed cells are not trained again.").strip()
    storage = persistent(st.text_input, "Shared storage (SQLAlchemy URL)", "ablation_storage", "",
                         placeholder="default: this machine's run store",
                         help="A database that machines running `python -m core ablate --storage URL` share: "
                              "they split the cells, the page shows their results, and Run joins them.").strip()
    cells = planned_cells(kind, splits, epochs, models)
    try:
        launch(kind, cells, study or default_study, storage)
    except StudyStorageError as error:
        st.error(str(error))
        return
    live(kind, cells, study or default_study, storage)


main()
