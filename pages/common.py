"""What the pages share: session-state keys (named once, here), persistent widgets, the job queue,
the chosen dataset and the config built from the widgets."""

from __future__ import annotations

import dataclasses

import streamlit as st

from core.config import PRESETS, DataSpec, TrainConfig
from core.data.datasets import PreparedData, prepare_data
from core.evaluation.ood import OodDetector, ood_detector
from core.models import get_model_spec
from core.runs import RunStore, default_runs_dir, run_label
from core.training.jobs import Job, JobQueue, shared_queue

# Session-state keys.
ENTRYPOINT_RAN = "app.entrypoint_ran"  # set by streamlit_app.py on every run
DATA_SPEC = "data.spec"  # the DataSpec last loaded without error on the Data page
LIVE_FIGURE = "train.live_figure"  # (run id and epochs drawn, figure) of the live curves
PENDING_DELETE = "train.pending_delete"  # run id awaiting the user's confirmation
SEEN_FINISHED = "train.seen_finished"  # (finished jobs, current run) the run table was last drawn for
# Set by Compare's per-image explorer: {"run_ids": [...], "image_ids": [...]} for the Explain page to open.
EXPLAIN_REQUEST = "explain.request"
FROM_COMPARE = "explain.from_compare"  # Compare's last request, kept after it is consumed so reruns keep it
AUDIT_RUNS = "audit.runs"  # the runs chosen on the Audit page (a multiselect's key)
AUDIT_JOB = "audit.job"  # id of the audit job this session queued: its results or its error are shown
EVALUATE_JOB = "compare.evaluate_job"  # id of the external evaluation this session queued on Compare
PREDICT_RUNS = "predict.runs"  # the runs chosen on the Predict page (a multiselect's key)
PREDICT_JOB = "predict.job"  # id of the folder prediction this session queued: its table is shown when it ends
PREDICT_RESULT = "predict.result"  # the last prediction this session ran inline (uploads, small folders)
VALUE_PREFIX, WIDGET_PREFIX = "value.", "widget."

SPLIT_RATIOS = ["80:20", "70:30", "60:40"]  # the paper's train:test ratios

# Train page values that come from a preset, and where they live in TrainConfig.
PRESET_FIELDS = ("epochs", "batch_size", "lr", "weight_decay", "dropout", "label_smoothing", "image_size",
                 "augment", "weighted_sampler", "scheduler", "pretrained")


def require_entrypoint() -> None:
    """Run the page only behind streamlit_app.py.

    On a freshly started server whose first visitor opens a page's URL directly, Streamlit runs the
    file alone in its legacy pages/ mode (no st.navigation, no page config). Going through the entry
    point once switches the whole server to st.navigation.
    """
    if not st.session_state.get(ENTRYPOINT_RAN):
        st.switch_page("streamlit_app.py")


def persistent(widget, label: str, name: str, default, **options):
    """A widget whose value survives page switches: Streamlit forgets the state of widgets that are
    not drawn, so the value is kept under its own key and copied back into the widget on each run."""
    value_key, widget_key = VALUE_PREFIX + name, WIDGET_PREFIX + name
    if value_key not in st.session_state:
        st.session_state[value_key] = default
    st.session_state[widget_key] = st.session_state[value_key]

    def remember() -> None:
        st.session_state[value_key] = st.session_state[widget_key]

    return widget(label, key=widget_key, on_change=remember, **options)


def stored(name: str, default=None):
    return st.session_state.get(VALUE_PREFIX + name, default)


def apply_preset(name: str) -> None:
    """Put a preset's values into the Train page's widgets."""
    preset = PRESETS[name]
    for field in PRESET_FIELDS:
        st.session_state[VALUE_PREFIX + field] = getattr(preset, field)
    st.session_state[VALUE_PREFIX + "image_size"] = preset.image_size or "auto"


def current_data_spec() -> DataSpec:
    return st.session_state.get(DATA_SPEC) or DataSpec()


def current_config(model: str = "hybrid_sresnet") -> TrainConfig:
    """The TrainConfig the widgets describe (the quick preset where a widget was never drawn)."""
    base = PRESETS["quick"]
    values = {field.name: stored(field.name, getattr(base, field.name)) for field in dataclasses.fields(TrainConfig)
              if field.name != "model"}
    values["max_images"] = values.get("max_images") or None  # the widget's 0 means all images
    values["weights_file"] = (values.get("weights_file") or "").strip() or None
    values["image_size"] = None if values.get("image_size") in (None, "auto") else int(values["image_size"])
    return TrainConfig(model=model, **values)


def shared_job_queue() -> JobQueue:
    """One queue per process and run store, shared by every session and tab."""
    return shared_queue(run_store())


def run_store() -> RunStore:
    return RunStore(default_runs_dir())


@st.cache_resource(max_entries=2, show_spinner="Preparing the dataset (decoded once, then cached on disk) ...")
def load_prepared(spec: DataSpec, image_size: int, split: str, val_fraction: float, seed: int,
                  max_images: int | None, cache_dir: str, group_near_duplicates: bool = True) -> PreparedData:
    config = TrainConfig(image_size=image_size, split=split, val_fraction=val_fraction, seed=seed,
                         max_images=max_images, group_near_duplicates=group_near_duplicates)
    return prepare_data(spec, config, cache_dir)


def prepared_for(spec: DataSpec, config: TrainConfig) -> PreparedData:
    """The dataset as the Train page would train on it (same size, split and subset)."""
    config = config.resolved(spec)
    return load_prepared(spec, config.image_size, config.split, config.val_fraction, config.seed,
                         config.max_images, str(run_store().cache_dir), config.group_near_duplicates)


def dataset_label(spec: DataSpec) -> str:
    if spec.is_synthetic:
        confounder = f", {spec.confounder_kind} confounder on {spec.confounder_fraction:.0%} of malignant" \
            if spec.confounder_fraction else ""
        return f"built-in synthetic set ({spec.synthetic_count} images, seed {spec.synthetic_seed}{confounder})"
    return f"{spec.source} ({spec.format})"


@st.cache_resource(max_entries=10, show_spinner="Fitting the out-of-distribution score (once per run) ...")
def cached_ood_detector(runs_dir: str, run_id: str, model_version: float) -> tuple[OodDetector | None, str]:
    """A run's OOD detector for the whole server, or None and why it has none. A stored one is read from the
    run's folder; a missing one is fitted on the run's own dataset and stored. `model_version` (model.pt's
    mtime) refits a resumed run's."""
    store = RunStore(runs_dir)
    run = store.load(run_id)
    if run is None:
        return None, f"no run {run_id}"
    try:
        return ood_detector(run, store), ""
    except ValueError as error:
        return None, str(error)


def run_choice_label(run: dict) -> str:
    """How every page names a run in its lists: model, purpose when it is a tuning trial or an ablation
    cell, and run id."""
    return run_label(run, get_model_spec(run["model"]).display_name)


# Which page owns each kind of queued job: the only page that offers to stop it.
JOB_PAGES = {"train": "Train", "tune": "Tune", "ablation": "Ablation", "audit": "Audit", "evaluate": "Compare",
             "predict": "Predict"}
# What Stop keeps, by kind of job.
STOP_HELP = {"audit": "Ends it between two steps; every result finished so far is stored and reused next time.",
             "evaluate": "Ends it between two batches; the runs evaluated so far keep their stored predictions.",
             "predict": "Ends it between two batches; nothing of it is kept (predictions are not stored)."}
DEFAULT_STOP_HELP = "Ends it cleanly after the current batch; finished work and the best checkpoint are kept."
SEEN_QUEUE = "queue.seen"  # + page key: (current job, busy) this page was last drawn for


def job_progress_and_stop(kind: str, page_key: str, waiting: str) -> Job | None:
    """The queue's current job as one progress line. Stop is offered only when the job is of this page's
    kind; otherwise the page says what the queue is busy with, that `waiting` ("this ablation will start
    after it") and where that job can be stopped. Returns the current job."""
    queue = shared_job_queue()
    current = queue.snapshot().current
    if current is None:
        return None
    st.progress(current.fraction_done, text=current.progress_text())
    if current.kind == kind:
        if st.button(f"Stop {current.title}", key=f"{page_key}.stop", icon=":material/stop:",
                     help=STOP_HELP.get(kind, DEFAULT_STOP_HELP)):
            stopped = queue.stop(current.job_id)
            when = "between two steps" if kind == "audit" else "after the current batch"
            st.toast(f"Stopping {when}." if stopped else f"{current.title} had already ended.")
    else:
        st.info(f"The queue is busy with {current.busy_text()}; {waiting}. Stop it on the "
                f"{JOB_PAGES.get(current.kind, 'Train')} page.", icon=":material/hourglass_top:")
    return current


def rerun_when_queue_changes(page_key: str) -> None:
    """From a polling fragment: rerun the whole page when a job starts or ends, so that widgets outside
    the fragment (a disabled Start button, the results) follow the queue."""
    snapshot = shared_job_queue().snapshot()
    current = snapshot.current
    seen = (current.job_id if current is not None else None, snapshot.busy)
    key = f"{SEEN_QUEUE}.{page_key}"
    previous = st.session_state.get(key, seen)
    st.session_state[key] = seen
    if previous != seen:
        st.rerun(scope="app")


def confirm_long_work(estimate, key: str) -> bool:
    """True when the work may be queued: at once when it is short, after a ticked box when it is long.
    The box's key holds the rounded estimate, so a bigger plan asks again."""
    if not estimate.long:
        return True
    st.warning(f"This is {estimate.describe()} of training on this machine, {estimate.explain()}.",
               icon=":material/timer:")
    return st.checkbox(f"I understand this takes {estimate.describe()}", key=f"{key}.{estimate.describe()}")


def runs_with_models(store: RunStore) -> list[dict]:
    """Runs with a model to apply or explain (completed or stopped, model.pt present), newest first."""
    return [run for run in store.list_runs() if run.get("status") in ("completed", "stopped")
            and store.model_path(run["run_id"]).exists()]


def choose_model_runs(runs: list[dict], key: str, purpose: str) -> list[dict]:
    """A multiselect of `runs` defaulting to the newest completed training run of each model; tuning trials
    and ablation cells are listed by their purpose and used (`purpose`: "audited") only when chosen."""
    from core.evaluation.compare import default_comparison_runs

    by_id = {run["run_id"]: run for run in runs}
    default = [run["run_id"] for run in default_comparison_runs(runs)]
    initial = {} if key in st.session_state else {"default": default}
    chosen = st.multiselect("Runs", list(by_id), key=key, format_func=lambda i: run_choice_label(by_id[i]),
                            help="Default: the newest completed training run of each model. Tuning trials and "
                                 f"ablation cells are listed by their purpose and only {purpose} when chosen.",
                            **initial)
    if chosen and chosen == default:
        st.caption("The newest completed training run of each model (tuning trials and ablation cells only when "
                   "you pick them).")
    return [by_id[run_id] for run_id in chosen if run_id in by_id]


def session_job(key: str) -> Job | None:
    """The job whose id this session stored under `key` when it queued it, while the queue remembers it."""
    job_id = st.session_state.get(key)
    return next((job for job in shared_job_queue().snapshot().jobs if job.job_id == job_id), None)
