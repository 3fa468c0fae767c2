"""Train page: every hyperparameter, runs queued in the background, live progress and curves, the run table."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import streamlit as st

from core.config import (
    DEVICES,
    MODEL_NAMES,
    PAPER_IMAGE_SIZE,
    PRECISIONS,
    QUICK_LEARNING_RATE,
    QUICK_MODEL_LEARNING_RATES,
    SYNTHETIC_TRAIN_SIZE,
)
from core.figures import training_curves_figure
from core.models import get_model_spec, pretrained_weights_available, weights_download_possible
from core.runs import run_purpose
from core.training.jobs import Job, QueueSnapshot
from core.training.loop import ResumeError
from core.training.precision import live_contention_warning
from pages.common import (
    LIVE_FIGURE,
    PENDING_DELETE,
    SEEN_FINISHED,
    SPLIT_RATIOS,
    allowed,
    apply_preset,
    can_administer,
    current_config,
    current_data_spec,
    dataset_label,
    delete_run,
    job_progress_and_stop,
    persistent,
    queue_all_five,
    require_entrypoint,
    rerun_page_on_change,
    run_choice_label,
    run_store,
    shared_job_queue,
    stored,
)

PRESET_LABELS = {"Quick demo": "quick", "Paper": "paper"}
DEFAULT_MODELS = ["hybrid_sresnet"]
IMAGE_SIZES = ["auto", 32, 48, 64, 96, 128, 160, 192, 224, 256, 320]
# Log-spaced choices, three per decade, plus the paper's Optuna optimum and the demo's defaults.
LEARNING_RATES = sorted({float(f"{v:.3g}") for v in np.logspace(-5, -1, 13)} | {2.52e-4, 1e-3})
WEIGHT_DECAYS = [0.0] + sorted({float(f"{v:.3g}") for v in np.logspace(-7, -2, 16)} | {1.99e-6, 1e-4})


def model_label(name: str) -> str:
    return get_model_spec(name).display_name


def image_size_label(size) -> str:
    return f"auto ({SYNTHETIC_TRAIN_SIZE} synthetic, {PAPER_IMAGE_SIZE} real)" if size == "auto" else f"{size} px"


def on_preset_change() -> None:
    apply_preset(PRESET_LABELS[st.session_state["train.preset"] or "Quick demo"])


def learning_rate_label(value) -> str:
    return "auto" if value == "auto" else f"{value:.2e}"


def hyperparameter_widgets() -> None:
    st.segmented_control("Preset", list(PRESET_LABELS), key="train.preset", default="Quick demo",
                         on_change=on_preset_change,
                         help="Quick demo: the engine's fast defaults. Paper: 224 px and the paper's optimum "
                              "(lr 2.52e-4, weight decay 1.99e-6, dropout 0.379).")
    quick = current_config()
    first, second, third, fourth = st.columns(4)
    with first:
        persistent(st.number_input, "Epochs", "epochs", quick.epochs, min_value=1, max_value=500, step=1)
        persistent(st.number_input, "Batch size", "batch_size", quick.batch_size, min_value=2, max_value=1024, step=8)
        persistent(st.selectbox, "Image size", "image_size", quick.image_size or "auto", options=IMAGE_SIZES,
                   format_func=image_size_label)
    with second:
        persistent(st.select_slider, "Learning rate", "lr", quick.lr or "auto", options=["auto", *LEARNING_RATES],
                   format_func=learning_rate_label,
                   help="AdamW learning rate, log scale. auto: each model's quick-demo rate, "
                        + ", ".join(f"{model_label(name)} {rate:.0e}"
                                    for name, rate in QUICK_MODEL_LEARNING_RATES.items())
                        + f", the others {QUICK_LEARNING_RATE:.0e} (what they need to learn the demo set in 5 epochs).")
        persistent(st.select_slider, "Weight decay", "weight_decay", quick.weight_decay, options=WEIGHT_DECAYS,
                   format_func=lambda v: "0" if v == 0 else f"{v:.2e}", help="AdamW weight decay, log scale")
        persistent(st.slider, "Dropout (Hybrid S-ResNet head)", "dropout", quick.dropout, min_value=0.0,
                   max_value=0.9, step=0.001, format="%.3f")
    with third:
        persistent(st.slider, "Label smoothing", "label_smoothing", quick.label_smoothing, min_value=0.0,
                   max_value=0.5, step=0.05)
        persistent(st.selectbox, "Train:test split", "split", quick.split, options=SPLIT_RATIOS)
        persistent(st.number_input, "Seed", "seed", quick.seed, min_value=0, step=1)
        persistent(st.toggle, "Keep near-duplicates together", "group_near_duplicates", quick.group_near_duplicates,
                   help="Images that are the same picture resized, recompressed or slightly cropped stay on one side "
                        "of the split, as one lesion's images do (the Data page lists them).")
    with fourth:
        persistent(st.toggle, "Augmentation", "augment", quick.augment,
                   help="Random horizontal flip, rotation and colour jitter, on tensors")
        persistent(st.toggle, "Weighted sampler", "weighted_sampler", quick.weighted_sampler)
        persistent(st.toggle, "Cosine LR schedule", "scheduler", quick.scheduler)
        available, note = imagenet_weights_note()
        persistent(st.toggle, "ImageNet weights", "pretrained", quick.pretrained and available,
                   help="Loaded through torchvision's weights API: from its cache, else downloaded; without "
                        "either, random initialisation." + (f" {note}" if note else ""))
        if note:
            st.caption(note if available else f":material/cloud_off: {note}")
    with st.expander("Advanced"):
        left, middle, right = st.columns(3)
        with left:
            persistent(st.slider, "Validation share of train", "val_fraction", quick.val_fraction, min_value=0.05,
                       max_value=0.4, step=0.05, help="Held out to choose the best epoch; never the test part.")
            persistent(st.slider, "Decision threshold", "threshold", quick.threshold, min_value=0.05, max_value=0.95,
                       step=0.05, help="P(malignant) at or above which an image is called malignant.")
        with middle:
            persistent(st.selectbox, "Precision", "precision", quick.precision, options=list(PRECISIONS),
                       help="auto times fp32 and bfloat16 (channels-last) for each model and keeps the faster.")
            persistent(st.selectbox, "Device", "device", quick.device, options=list(DEVICES))
        with right:
            persistent(st.text_input, "Local weights file (optional)", "weights_file", "",
                       help="A .pt state_dict: ImageNet weights for the backbone, or a model.pt of an earlier run.")


@st.cache_data(ttl=300, show_spinner=False)
def weights_server_reachable() -> bool:
    # One HEAD request per five minutes for the whole server, not one per rerun of every session.
    return weights_download_possible()


def imagenet_weights_note() -> tuple[bool, str | None]:
    """Whether the chosen models can start from trained weights, and what the toggle should say when
    some are not in torchvision's cache. Files only, and at most a HEAD request: nothing is downloaded."""
    names = stored("models", DEFAULT_MODELS) or list(MODEL_NAMES)  # none chosen: Train all five is left
    weights_file = (stored("weights_file") or "").strip()
    if weights_file:
        return True, "A local weights file is set (Advanced): runs start from it, whatever this toggle says."
    missing = [model_label(name) for name in names if not pretrained_weights_available(name)]
    if not missing:
        return True, None
    which = "ImageNet weights" if len(missing) == len(names) else f"ImageNet weights of {', '.join(missing)}"
    if weights_server_reachable():
        return True, f"{which} are not in the cache yet: torchvision downloads them when the run starts."
    return False, (f"{which} are not in the cache and there is no network: runs will start from random "
                   "initialisation. A local weights file (Advanced) can be used instead.")


def launch_widgets(administer: bool) -> None:
    """Start and Train all five; a viewer sees them disabled (and a forged click is refused by the queue)."""
    models = persistent(st.multiselect, "Models", "models", DEFAULT_MODELS, options=list(MODEL_NAMES),
                        format_func=model_label, disabled=not administer)
    left, right, _ = st.columns([1, 1, 3])
    start = left.button("Start", key="train.start", type="primary", disabled=not models or not administer,
                        icon=":material/play_arrow:")
    all_five = right.button("Train all five", key="train.all", icon=":material/queue:", disabled=not administer)
    chosen = list(MODEL_NAMES) if all_five else models if start else []
    if chosen:
        try:
            configs = [current_config(model) for model in chosen]
        except ValueError as error:
            st.error(f"Cannot start: {error}")
            return
        spec = current_data_spec()
        queued = queue_all_five(spec) if all_five else shared_job_queue().submit(configs, spec)
        if queued:
            st.toast(f"Queued {len(queued)} run(s)", icon=":material/schedule:")


def live_curves(job: Job):
    """The job's curves, rebuilt only when an epoch was added: this redraw shares the CPU (and the
    GIL) with the training thread, so it does as little as it can."""
    key = (job.run_id, len(job.history))
    cached = st.session_state.get(LIVE_FIGURE)
    if cached is None or cached[0] != key:
        cached = (key, training_curves_figure(job.history, f"{model_label(job.config.model)} ({job.run_id})"))
        st.session_state[LIVE_FIGURE] = cached
    return cached[1]


@st.fragment(run_every=2.0)
def live_progress() -> None:
    """Redrawn every 2 s: progress, curves and the queue; the page itself is not rerun."""
    queue = shared_job_queue()
    snapshot = queue.snapshot()
    for message in active_warnings(snapshot):
        st.warning(message, icon=":material/cloud_off:")
    current = snapshot.current
    if current is not None:
        # Stop only for runs: a study is stopped on its own page, which knows what stopping it keeps.
        job_progress_and_stop("train", "train", "runs started here wait their turn behind it")
        show_contention_warning(current)
        if current.history:
            st.plotly_chart(live_curves(current), width="stretch", key="train.live_curves")
        if st.button("Clear queue", key="train.clear", disabled=not snapshot.queued or not can_administer(),
                     help="Drops the jobs not started yet; the running one goes on."):
            st.toast(f"Removed {queue.clear_queue()} queued job(s)")
    show_queue(snapshot)
    seen = (sum(not job.active for job in snapshot.jobs), current.run_id if current is not None else None)
    rerun_page_on_change(SEEN_FINISHED, seen)  # a run started or ended: redraw the run table


def active_warnings(snapshot: QueueSnapshot) -> list[str]:
    """The warnings of jobs still queued or running, each once: a finished run's warning (no ImageNet
    weights) is in its row of the run table, and the toggle already says it before Start."""
    return list(dict.fromkeys(message for job in snapshot.jobs if job.active for message in job.warnings))


@st.cache_data(max_entries=8, show_spinner=False)
def run_at_start(root: str, run_id: str) -> dict:
    # The environment and config a run was started with do not change while it trains: read them once.
    run = run_store().load(run_id) or {}
    return {"environment": run.get("environment") or {}, "config": run.get("config") or {}}


def show_contention_warning(job: Job) -> None:
    """Say so when the running job trains far slower than its precision timing measured at its start."""
    if job.run_id is None or job.progress is None:
        return
    message = live_contention_warning(job.progress, run_at_start(str(run_store().root), job.run_id))
    if message:
        st.warning(message, icon=":material/speed:")


def show_queue(snapshot: QueueSnapshot) -> None:
    recent = [job for job in snapshot.jobs if job.active or (job.finished_at or 0) > time.time() - 3600]
    if not recent:
        st.caption("Nothing is training." + (" Choose models and press Start, or Train all five."
                                             if can_administer() else ""))
        return
    rows = [{"Job": job.job_id, "Model": job.title, "State": job.state,
             "Run": job.run_id or "", "Problem": job.error or ""} for job in recent]
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch", key="train.queue_table")


def run_rows(runs: list[dict]) -> pd.DataFrame:
    rows = []
    for run in runs:
        config, metrics = run.get("config") or {}, run.get("metrics") or {}
        val, test = metrics.get("val") or {}, metrics.get("test") or {}
        rows.append({
            "Run": run["run_id"], "Model": model_label(run["model"]), "Purpose": run_purpose(run),
            "Status": run.get("status", "") + (" · resumable" if run.get("resumable") else ""),
            "Val AUC": val.get("auc"), "Val acc": val.get("accuracy"),
            "Test AUC": test.get("auc"), "Test acc": test.get("accuracy"),
            "Seconds": run.get("seconds"), "Weights": run.get("weights"),
            "Dataset": (run.get("dataset") or {}).get("name"), "Epochs": config.get("epochs"),
            "LR": config.get("lr"), "Weight decay": config.get("weight_decay"), "Dropout": config.get("dropout"),
            "Label smoothing": config.get("label_smoothing"), "Batch": config.get("batch_size"),
            "Image size": config.get("image_size"), "Split": config.get("split"), "Seed": config.get("seed"),
            "Problem": run.get("error") or "",
        })
    return pd.DataFrame(rows)


def run_table() -> None:
    st.subheader("Runs")
    store = run_store()
    runs = store.list_runs()
    where = f" in {store.root}/" if can_administer() else ""  # a class need not see the server's folders
    if not runs:
        st.caption(f"No runs{where} yet.")
        return
    statuses = pd.Series([run.get("status") for run in runs]).value_counts()
    st.caption(f"{len(runs)} run(s){where}: " + ", ".join(f"{count} {status}" for status, count in
                                                                   statuses.items()))
    # A running run has no metrics yet: "—" instead of Streamlit's "None" for the empty cells.
    st.dataframe(run_rows(runs), hide_index=True, width="stretch", key="train.run_table", placeholder="—",
                 column_config=run_table_columns())
    resume_widgets(runs)
    delete_widgets(store, runs)


def run_table_columns() -> dict:
    """Widths that fit a run id, a model name and a status ("stopped · resumable") without cutting them."""
    text = st.column_config.TextColumn
    number = st.column_config.NumberColumn(format="%.4f")
    return ({"Run": text(width=250), "Model": text(width=130),
             "Purpose": text(width=200, help="Training, a tuning trial or an ablation cell (from the run's tags)"),
             "Status": text(width=150), "Seconds": st.column_config.NumberColumn(format="%.0f"),
             "LR": st.column_config.NumberColumn(format="%.2e"),
             "Weight decay": st.column_config.NumberColumn(format="%.2e")}
            | {name: number for name in ("Val AUC", "Val acc", "Test AUC", "Test acc")})


def resume_widgets(runs: list[dict]) -> None:
    resumable = [run["run_id"] for run in runs if run.get("resumable")]
    if not resumable:
        return
    with st.expander(f"Resume a stopped run ({len(resumable)})"):
        st.caption("Continues from the last finished epoch with the run's own settings and data; the result "
                   "is the run that training without the interruption would have given.")
        by_id = {run["run_id"]: run for run in runs}
        choice = st.selectbox("Run", resumable, key="train.resume_choice", format_func=lambda run_id: (
            f"{run_choice_label(by_id[run_id])} · {by_id[run_id]['status']} after epoch "
            f"{len(by_id[run_id].get('history') or [])} of {(by_id[run_id].get('config') or {}).get('epochs', '?')}"))
        if st.button("Resume", key="train.resume", icon=":material/play_arrow:", disabled=not can_administer()):
            try:
                queued = shared_job_queue().submit_resume(choice)
            except ResumeError as error:
                st.error(str(error))
                return
            if queued is None:
                return
            st.toast(f"Queued: resume {choice}")
            st.rerun()


def delete_widgets(store, runs: list[dict]) -> None:
    deletable = [run["run_id"] for run in runs if run.get("status") != "running"]
    if not deletable:
        return
    with st.expander("Delete a run"):
        by_id = {run["run_id"]: run for run in runs}
        choice = st.selectbox("Run", deletable, key="train.delete_choice",
                              format_func=lambda run_id: run_choice_label(by_id[run_id]))
        if st.button("Delete", key="train.delete", icon=":material/delete:", disabled=not can_administer()) \
                and allowed("delete runs"):
            st.session_state[PENDING_DELETE] = choice
        pending = st.session_state.get(PENDING_DELETE)
        if pending:
            st.warning(f"Delete run {pending} and its checkpoint? This cannot be undone.")
            yes, no, _ = st.columns([1, 1, 4])
            if yes.button("Yes, delete", key="train.delete_confirm", type="primary", disabled=not can_administer()):
                st.session_state[PENDING_DELETE] = None
                if delete_run(store, pending):
                    st.rerun()
                return
            if no.button("Cancel", key="train.delete_cancel"):
                st.session_state[PENDING_DELETE] = None
                st.rerun()


def main() -> None:
    require_entrypoint()
    st.title("Train")
    spec = current_data_spec()
    administer = can_administer()
    if administer:
        st.caption(f"Dataset: {dataset_label(spec)}. Change it on the Data page.")
        hyperparameter_widgets()
    else:
        st.info("Read-only: the teacher starts, stops and deletes runs. Progress and curves show here live.",
                icon=":material/lock:")
    launch_widgets(administer)
    live_progress()
    run_table()


main()
