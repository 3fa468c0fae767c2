"""What the pages share: session-state keys (named once, here), persistent widgets, the job queue,
the chosen dataset and the config built from the widgets."""

from __future__ import annotations

import dataclasses
import time
import uuid

import streamlit as st
from streamlit.runtime.scriptrunner import get_script_run_ctx

from core import access
from core.cams import CamExplainer, explainer_for_run
from core.config import MODEL_NAMES, PRESETS, DataSpec, TrainConfig
from core.data.datasets import PreparedData, prepare_data
from core.evaluation.ood import OodDetector, ood_detector
from core.models import get_model_spec
from core.runs import RunStore, default_runs_dir, run_label
from core.training.jobs import Job, JobQueue, QueueLimitError, QueueSnapshot, describe_batch, shared_queue

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
QUIZ_TOKEN = "quiz.token"  # this session's random answer token: the quiz stores answers under it, never a name
QUIZ_QUESTION = "quiz.question"  # {"dataset", "image_id", "number"}: the image this session is asked about
QUIZ_MARKS = "quiz.marks"  # core.quiz.scoring.Marks on that image, from the image component's clicks
QUIZ_SEEN_CLICK = "quiz.seen_click"  # the component event last turned into a mark (its unix_time)
QUIZ_REVEAL = "quiz.reveal"  # {"answer_id", "image_id"} once the current image is answered: the reveal shows
VALUE_PREFIX, WIDGET_PREFIX = "value.", "widget."
# Classroom roles (core/access.py decides; these keys live only on the server, a browser cannot set them).
SESSION_OWNER = "access.owner"  # this session's id: whose jobs the queue's per-session limit counts
ADMIN_SINCE = "access.admin_since"  # time.time() of this session's password sign-in as admin
ACCESS_NOTICE = "access.notice"  # a message for the sidebar's next run ("the admin session expired")
SEEN_TRAINED = "start.seen_trained"  # runs with a model when a page waiting for runs last looked
SEEN_DEMO = "start.seen_demo"  # (demo batch active, its runs done) when the Start page last looked

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


def require_admin_page(title: str) -> None:
    """Stop a page that only the admin may use (Tune, Ablation, Predict: they queue work or read server
    paths), for a viewer who opens it anyway; the navigation does not list it for viewers."""
    if not can_administer():
        st.title(title)
        st.warning("This page is for the admin of this server: sign in on the sidebar to use it.",
                   icon=":material/lock:")
        st.stop()


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
    st.session_state[VALUE_PREFIX + "lr"] = preset.lr or "auto"


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
    values["lr"] = None if values.get("lr") in (None, "auto") else float(values["lr"])
    return TrainConfig(model=model, **values)


def shared_job_queue() -> SessionJobQueue:
    """The process's one queue (shared by every session and tab) as this session may use it."""
    return SessionJobQueue(shared_queue(run_store()), session_owner())


class SessionJobQueue:
    """The pages' only way to the job queue: it refuses a viewer's submit, resume, stop and clear, and
    passes this session's queue limit, so a forged rerun (a disabled button clicked anyway) changes
    nothing. A refusal is shown on the page and returns None (no job id)."""

    def __init__(self, queue: JobQueue, owner: str) -> None:
        self.queue, self.owner = queue, owner

    def snapshot(self) -> QueueSnapshot:
        return self.queue.snapshot()

    def wait_until_idle(self, timeout: float | None = None) -> bool:
        return self.queue.wait_until_idle(timeout)

    def active_count(self) -> int:
        return self.queue.active_count(self.owner)

    def submit(self, configs: list[TrainConfig], data: DataSpec, group: str = "") -> list[int] | None:
        return self._queue(lambda limit: self.queue.submit(configs, data, group, owner=self.owner, limit=limit))

    def submit_task(self, label: str, config: TrainConfig, data: DataSpec, task, kind: str = "tune") -> int | None:
        return self._queue(lambda limit: self.queue.submit_task(label, config, data, task, kind, owner=self.owner,
                                                                limit=limit))

    def submit_resume(self, run_id: str) -> int | None:
        """Raises ResumeError as JobQueue.submit_resume does (the Train page says why)."""
        return self._queue(lambda limit: self.queue.submit_resume(run_id, owner=self.owner, limit=limit))

    def stop(self, job_id: int) -> bool:
        if not allowed("stop jobs"):
            return False
        return self.queue.stop(job_id)

    def clear_queue(self) -> int:
        return self.queue.clear_queue() if allowed("clear the queue") else 0

    def _queue(self, submit):
        if not allowed("start jobs"):
            return None
        try:
            return submit(access_settings().queue_limit)
        except QueueLimitError as error:
            st.error(f"Not queued: {error}", icon=":material/block:")
            return None


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
        administer = can_administer()
        # A viewer sees Stop disabled; a forged click reaches queue.stop, which refuses it and says so.
        if st.button(f"Stop {current.title}", key=f"{page_key}.stop", icon=":material/stop:",
                     help=STOP_HELP.get(kind, DEFAULT_STOP_HELP), disabled=not administer):
            stopped = queue.stop(current.job_id)
            when = "between two steps" if kind == "audit" else "after the current batch"
            if administer:
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
    rerun_page_on_change(f"{SEEN_QUEUE}.{page_key}", seen)


def fragment_running_alone() -> bool:
    """Whether this fragment runs on its own (its run_every timer), not within a full run of the page."""
    context = get_script_run_ctx()
    return bool(context is not None and context.fragment_ids_this_run)


def rerun_page_on_change(key: str, seen) -> None:
    """From a polling fragment: rerun the whole page once `seen` (what the page shows depends on) differs from
    what it was last drawn for. Only a fragment running on its own reruns the page: within a full run, a rerun
    would throw away the click that started that run (Delete pressed as a run ends); the change is then kept
    for the fragment's next tick."""
    previous = st.session_state.get(key, seen)
    if previous == seen:
        st.session_state[key] = seen
    elif fragment_running_alone():
        st.session_state[key] = seen
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


def secrets_dict() -> dict:
    """Streamlit's secrets as a dict; empty without a secrets.toml (st.secrets raises then)."""
    try:
        return st.secrets.to_dict() if st.secrets.load_if_toml_exists() else {}
    except Exception:  # noqa: BLE001 - an unreadable secrets.toml: access_settings() locks down below
        return {"admin_password_hash": "unreadable secrets.toml"}


def access_settings() -> access.AccessSettings:
    """The deployment's roles and queue limit. A configuration that cannot be read makes everyone a viewer
    (and says so in the sidebar) rather than leaving a classroom server open."""
    try:
        return access.load_access_settings(secrets_=secrets_dict())
    except ValueError as error:
        return access.AccessSettings(problem=f"The access configuration cannot be used: {error}")


def session_owner() -> str:
    """A random id for this browser session, made once: the queue counts its jobs under it."""
    if SESSION_OWNER not in st.session_state:
        st.session_state[SESSION_OWNER] = uuid.uuid4().hex
    return st.session_state[SESSION_OWNER]


def login_email(settings: access.AccessSettings) -> str | None:
    """The e-mail of a user logged in through Streamlit's st.login, where an [auth] section is configured."""
    if not settings.login_configured:
        return None
    try:
        return st.user.email if st.user.is_logged_in else None
    except (AttributeError, KeyError):  # a provider that gives no e-mail claim
        return None


def current_role() -> str:
    """access.ADMIN or access.VIEWER for this session now; an expired admin sign-in is forgotten here,
    with a notice for the sidebar."""
    settings = access_settings()
    signed_in_at = st.session_state.get(ADMIN_SINCE)
    now = time.time()
    if access.session_expired(settings, signed_in_at, now):
        st.session_state[ADMIN_SINCE] = None
        st.session_state[ACCESS_NOTICE] = "The admin session expired: sign in again to change things."
        signed_in_at = None
    return access.resolve_role(settings, signed_in_at, now, login_email(settings))


def can_administer() -> bool:
    """Whether this session may change things (train, stop, delete, set paths, pick the quiz set): always
    without a classroom configuration, else only a signed-in admin."""
    return current_role() == access.ADMIN


def allowed(action: str) -> bool:
    """can_administer(), and when not, the refusal shown on the page: the server-side check behind every
    control a viewer sees disabled."""
    if can_administer():
        return True
    st.error(f"Only the admin can {action} on this server (sign in on the sidebar).", icon=":material/lock:")
    return False


def delete_run(store: RunStore, run_id: str) -> bool:
    """Delete a run and its files, for an admin only; False (and the reason shown) otherwise."""
    if not allowed("delete runs"):
        return False
    try:
        store.delete(run_id)
    except (KeyError, OSError) as error:
        st.error(f"Could not delete {run_id}: {error}")
        return False
    return True


def access_sidebar() -> None:
    """The classroom's sidebar: sign in as admin (password, throttled), the session's time left, sign out;
    nothing at all without a classroom configuration."""
    settings = access_settings()
    if not settings.classroom:
        return
    st.divider()
    if settings.problem:
        st.error(settings.problem, icon=":material/lock:")
    administer = can_administer()  # first: it notices an expired sign-in
    notice = st.session_state.pop(ACCESS_NOTICE, None)
    if notice:
        st.warning(notice, icon=":material/timer_off:")
    email = login_email(settings)
    if administer:
        signed_in_at = st.session_state.get(ADMIN_SINCE)
        if signed_in_at is not None:
            left = access.wait_text(settings.session_seconds - (time.time() - signed_in_at))
            st.success(f"Signed in as admin (for {left} more).", icon=":material/admin_panel_settings:")
            if st.button("Sign out", key="access.sign_out", icon=":material/logout:"):
                st.session_state[ADMIN_SINCE] = None
                st.rerun()
        else:
            st.success(f"Admin: {email}.", icon=":material/admin_panel_settings:")
            if st.button("Log out", key="access.log_out", icon=":material/logout:"):
                st.logout()
        return
    st.caption("Viewing: you can browse the results, explanations and the quiz. The teacher signs in to train.")
    if settings.password_hash:
        with st.form("access.sign_in_form", clear_on_submit=True, border=False):  # no password kept in the widget
            password = st.text_input("Admin password", type="password", key="access.password")
            submitted = st.form_submit_button("Sign in as admin", icon=":material/login:", key="access.sign_in")
        if submitted:
            result = access.sign_in(settings, access.shared_login_throttle(), session_owner(), password)
            if result.ok:
                st.session_state[ADMIN_SINCE] = time.time()
                st.rerun()
            st.error(result.message, icon=":material/lock:")
    if settings.login_configured and settings.admin_emails and not email:
        if st.button("Log in with the identity provider", key="access.log_in", icon=":material/login:"):
            st.login()


ALL_FIVE = "Train all five"  # the group of the Train page's batch of the five models, and of the demo runs


def queue_all_five(data: DataSpec, config_for=current_config) -> list[int] | None:
    """Queue one run of each model (the Train page's "Train all five", and the first visit's demo runs)."""
    return shared_job_queue().submit([config_for(model) for model in MODEL_NAMES], data, group=ALL_FIVE)


def demo_config(model: str) -> TrainConfig:
    """The Quick demo defaults, whatever this session's Train page widgets say."""
    return dataclasses.replace(PRESETS["quick"], model=model)


@st.cache_data(ttl=5, show_spinner=False)
def trained_runs_in(root: str) -> int:
    # The entry point asks on every rerun of every session: one directory scan per 5 s is enough.
    return len(runs_with_models(RunStore(root)))


def has_trained_runs() -> bool:
    """Whether any run has a model to compare or explain (the entry point opens on Start when none has)."""
    return trained_runs_in(str(run_store().root)) > 0


@st.fragment(run_every=3.0)
def waiting_for_runs() -> None:
    """For a page with no runs to show: what it is waiting for (the demo runs training, with progress), or
    where to start, with a link; polled, and the page redrawn once a run has finished."""
    # A change, not a count: a page may have reasons of its own to show no run.
    rerun_page_on_change(SEEN_TRAINED, len(runs_with_models(run_store())))
    progress = describe_batch(shared_job_queue().snapshot(), ALL_FIVE)
    if progress:
        st.info(f"The demo runs are training: {progress}. This page fills in as they finish.",
                icon=":material/hourglass_top:")
    elif can_administer():
        st.info("No trained runs yet. Train models first: the Start page prepares the five demo runs in one click, "
                "the Train page trains your own.", icon=":material/info:")
    else:
        st.info("No trained runs yet: wait for the teacher to train the models.", icon=":material/info:")
    st.page_link("pages/start.py", label="Go to the Start page", icon=":material/flag:")
    if can_administer():
        st.page_link("pages/train.py", label="Go to the Train page", icon=":material/model_training:")


@st.cache_resource(max_entries=10, show_spinner="Loading the model ...")
def cached_explainer(runs_dir: str, run_id: str, model_version: float) -> CamExplainer:
    """One explainer per run for the whole server: models are loaded once (Streamlit computes a missing
    entry once even when many sessions ask at the same moment); the explainer's lock keeps sessions that
    use it at the same time apart. `model_version` (model.pt's mtime) reloads a resumed run's model."""
    store = RunStore(runs_dir)
    return explainer_for_run(store.load(run_id), store.model_path(run_id))


def model_version(store: RunStore, run_id: str) -> float:
    return store.model_path(run_id).stat().st_mtime


def run_data(store: RunStore, run: dict) -> PreparedData:
    """The run's dataset prepared as the run prepared it (its image size, split and subset): the pixels its
    predictions.csv was computed from. Runs that do not record their dataset get the Data page's."""
    config = TrainConfig.from_dict(run.get("config") or {})
    recorded = (run.get("dataset") or {}).get("spec")
    spec = DataSpec.from_dict(recorded) if recorded else current_data_spec()
    return load_prepared(spec, config.image_size, config.split, config.val_fraction, config.seed, config.max_images,
                         str(store.cache_dir), config.group_near_duplicates)
