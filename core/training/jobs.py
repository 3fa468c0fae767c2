"""Training runs in the background: a queue worked through by one thread, observed by snapshots.

The dashboard holds one `JobQueue` per process (shared by every browser tab), submits runs to it and
polls `snapshot()`; nothing here knows about the UI. A stop request ends the current run cleanly
after its current batch; one run failing never stops the runs queued behind it.

Work that trains nothing (an explanation audit) queues as a task too, so that it never shares the CPU
with training; it reports `done` of `total` steps through `callback.on_progress` instead of batches.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from core.config import DataSpec, TrainConfig
from core.data.datasets import PreparedData, prepare_data
from core.formatting import format_duration
from core.models import get_model_spec
from core.runs import RunStore
from core.training.callbacks import BatchProgress, EpochRecord, TrainingCallback
from core.training.estimates import StepProgress, seconds_left
from core.training.loop import ResumeError, resume_data_spec, resume_training, run_training

ACTIVE_STATES = ("queued", "preparing", "running")
# What a job does, and so which page owns it (may stop it): runs, a tuning study, an ablation, an audit,
# an external evaluation, a batch prediction.
JOB_KINDS = ("train", "tune", "ablation", "audit", "evaluate", "predict")

_queues: dict[str, JobQueue] = {}


class QueueLimitError(RuntimeError):
    """An owner (a browser session) already has as many queued or running jobs as it may."""

    def __init__(self, active: int, wanted: int, limit: int) -> None:
        self.active, self.wanted, self.limit = active, wanted, limit
        super().__init__(f"this session already has {active} job(s) queued or running and may have at most {limit}; "
                         f"{wanted} more would exceed that. Wait for one to finish (the others keep running).")
_queues_lock = threading.Lock()


@dataclass(frozen=True)
class TaskProgress:
    """Progress of a task measured in its own steps rather than training batches (an audit's results):
    `done` of `total`, and what it works on now ("ResNet50 (run 2 of 5)")."""

    done: int
    total: int
    text: str = ""

    @property
    def fraction_done(self) -> float:
        return min(max(self.done, 0) / max(self.total, 1), 1.0)

    def describe(self) -> str:
        counted = f"{self.done} of {self.total} steps done"
        return f"{self.text} · {counted}" if self.text else counted


@dataclass
class Job:
    """One queued or finished training run, as the UI sees it."""

    job_id: int
    config: TrainConfig
    data: DataSpec
    state: str = "queued"  # queued, preparing, running, then the run's status (completed, stopped, ...)
    run_id: str | None = None
    progress: BatchProgress | None = None
    history: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    submitted_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    # A job can be a whole study instead of one run: task(stop, callback) trains runs one after another
    # (reporting through the callback) and returns (state, error).
    task: Callable | None = None
    label: str = ""
    resume_run: str | None = None  # continue this stopped or failed run instead of starting a new one
    kind: str = "train"  # one of JOB_KINDS
    group: str = ""  # what queued a batch of runs together, e.g. "Train all five"
    step: StepProgress | None = None  # which run of the job (or of its batch) this is: trial 3 of 10
    decoded: tuple[int, int] | None = None  # images decoded into the cache so far, of how many (a new dataset)
    # Training images and seconds of the job's finished runs: the rate its later runs are estimated at.
    finished_images: float = 0.0
    finished_seconds: float = 0.0
    started_at: float | None = None  # when the worker took the job (time.time())
    task_progress: TaskProgress | None = None  # a task's own steps, when it reports them instead of batches
    result: Any = None  # what a task handed back for the pages to show (an audit's results)
    owner: str = ""  # who queued it (a browser session's id; empty from scripts): the per-owner limit counts it

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def title(self) -> str:
        """How the job is named everywhere: "Tune study hybrid-ham", "ResNet18 run 2 of 5 (Train all five)"."""
        if self.kind != "train":
            return self.label
        name = get_model_spec(self.config.model).display_name
        if self.step is not None and self.step.total > 1:
            name += f" run {self.step.number} of {self.step.total}"
        extra = self.group or (f"resume {self.resume_run}" if self.resume_run else "")
        return f"{name} ({extra})" if extra else name

    @property
    def seconds_left(self) -> float | None:
        """For the whole job: a study's later trials or cells included; a task's steps left at the pace of
        its steps so far."""
        if self.task_progress is not None and self.progress is None:
            return self._task_seconds_left()
        step = self.step if self.kind != "train" else None  # a batch's other runs are jobs of their own
        return seconds_left(self.progress, step, self.finished_images, self.finished_seconds)

    def _task_seconds_left(self) -> float | None:
        done, total = self.task_progress.done, self.task_progress.total
        if done <= 0 or self.started_at is None:
            return None
        return max(time.time() - self.started_at, 0.0) / done * max(total - done, 0)

    @property
    def fraction_done(self) -> float:
        """Of the whole job, by training images (by runs where the plan's sizes are unknown), or by a
        task's own steps."""
        if self.task_progress is not None and self.progress is None:
            return self.task_progress.fraction_done
        run_fraction = min(self.progress.fraction_done, 1.0) if self.progress else 0.0
        step = self.step
        if self.kind == "train" or step is None:
            return run_fraction
        if step.current is not None:
            done = self.finished_images + run_fraction * step.current.images
            return min(done / max(done + (1 - run_fraction) * step.current.images + step.later_images, 1), 1.0)
        return min((step.number - 1 + run_fraction) / max(step.total, 1), 1.0)

    def describe_step(self) -> str:
        """"trial 3 of 10" for a study; empty for a single run (its title says "run 2 of 5")."""
        return self.step.describe() if self.step is not None and self.kind != "train" else ""

    def progress_text(self) -> str:
        """One line: "Tune study X: trial 3 of 10 · epoch 2/5 · batch 14/40 · 85 img/s · about 6 min left",
        or for a task counting its own steps "Audit of 5 runs: ResNet50 (run 2 of 5) · 7 of 20 steps done ·
        about 40 s left"."""
        step_text = self.describe_step()
        parts = [step_text] if step_text else []
        progress = self.progress
        if progress is None and self.task_progress is not None:
            parts.append(self.task_progress.describe())
            left = self.seconds_left
            parts.append(f"about {format_duration(left)} left" if left is not None else "estimating time left ...")
            return f"{self.title}: " + " · ".join(parts)
        if progress is None and self.decoded is not None and self.decoded[0] < self.decoded[1]:
            parts.append(f"decoding images into the cache: {self.decoded[0]:,} of {self.decoded[1]:,}")
            return f"{self.title}: " + " · ".join(parts)
        if progress is None:  # a new run (or a study's next one) builds its model and times precision first
            parts.append("preparing data and timing precision ...")
            return f"{self.title}: " + " · ".join(parts)
        parts += [f"epoch {progress.epoch}/{progress.epochs}", f"batch {progress.batch}/{progress.batches}",
                  f"{progress.images_per_second:.0f} img/s", f"loss {progress.loss:.3f}"]
        left = self.seconds_left
        parts.append(f"about {format_duration(left)} left" if left is not None else "estimating time left ...")
        return f"{self.title}: " + " · ".join(parts)

    def busy_text(self) -> str:
        """What the queue is busy with, for pages that do not own this job: "Tune study X (trial 3 of 10)"."""
        detail = self.describe_step() or (self.task_progress.describe() if self.task_progress else "")
        return self.title + (f" ({detail})" if detail else "")


@dataclass(frozen=True)
class QueueSnapshot:
    """A consistent copy of the queue at one moment; safe to read from any thread."""

    jobs: tuple[Job, ...]
    warnings: tuple[str, ...]

    @property
    def current(self) -> Job | None:
        return next((job for job in self.jobs if job.state in ("preparing", "running")), None)

    @property
    def queued(self) -> tuple[Job, ...]:
        return tuple(job for job in self.jobs if job.state == "queued")

    @property
    def busy(self) -> bool:
        return any(job.active for job in self.jobs)


def batch_jobs(snapshot: QueueSnapshot, group: str) -> list[Job]:
    """The jobs of the newest batch queued under `group` ("Train all five"), in their order; empty when
    the queue remembers none."""
    newest = max((job for job in snapshot.jobs if job.group == group and job.step is not None),
                 key=lambda job: job.job_id, default=None)
    if newest is None:
        return []
    first = newest.job_id - newest.step.number + 1  # a batch's jobs get consecutive ids under the lock
    return [job for job in snapshot.jobs if job.group == group and first <= job.job_id < first + newest.step.total]


def describe_batch(snapshot: QueueSnapshot, group: str) -> str | None:
    """"2 of 5 done, ResNet50 epoch 3 of 5" while the newest `group` batch has a job queued or running;
    None otherwise."""
    jobs = batch_jobs(snapshot, group)
    if not any(job.active for job in jobs):
        return None
    total = jobs[0].step.total
    done = sum(not job.active for job in jobs)
    text = f"{done} of {total} done"
    current = next((job for job in jobs if job.state in ("preparing", "running")), None)
    if current is not None:
        name = get_model_spec(current.config.model).display_name
        progress = current.progress
        text += f", {name} epoch {progress.epoch} of {progress.epochs}" if progress else f", {name} starting"
    elif snapshot.current is not None:
        text += f", waiting behind {snapshot.current.title}"
    return text


class _JobCallback(TrainingCallback):
    """Copies the engine's progress into the job, under the queue's lock."""

    def __init__(self, queue: JobQueue, job: Job) -> None:
        self.queue, self.job = queue, job

    def on_run_start(self, run: dict) -> None:
        with self.queue._lock:
            self.job.run_id, self.job.state = run["run_id"], "running"
            self.job.history = list(run.get("history") or [])  # a resumed run's earlier epochs

    def on_batch_end(self, progress: BatchProgress) -> None:
        with self.queue._lock:
            self.job.progress = progress

    def on_epoch_end(self, record: EpochRecord) -> None:
        with self.queue._lock:
            self.job.history = [*self.job.history, dataclasses.asdict(record)]

    def on_run_end(self, run: dict) -> None:
        images = _trained_images(run)
        if images and run.get("seconds"):
            with self.queue._lock:
                self.job.finished_images += images
                self.job.finished_seconds += float(run["seconds"])

    def on_warning(self, message: str) -> None:
        self.queue._warn(self.job, message)

    def on_step(self, step: StepProgress) -> None:
        """A study's task reports which of its runs starts now (and what is left after it)."""
        with self.queue._lock:
            self.job.step, self.job.progress = step, None

    def on_progress(self, done: int, total: int, text: str = "") -> None:
        """A task that trains nothing reports its own steps: `done` of `total`, and what it works on now."""
        with self.queue._lock:
            self.job.state = "running"
            self.job.task_progress = TaskProgress(int(done), int(total), text)

    def on_result(self, result: Any) -> None:
        """A task hands back what the pages show when it has ended (kept with the finished job)."""
        with self.queue._lock:
            self.job.result = result


def _trained_images(run: dict) -> int:
    """Training images a finished run went through (its finished epochs; a pruned trial has few)."""
    counts = ((run.get("dataset") or {}).get("class_counts") or {}).get("train") or {}
    return len(run.get("history") or []) * sum(counts.values())


class JobQueue:
    """Runs submitted training jobs one after another on a background thread."""

    def __init__(self, store: RunStore, keep_finished: int = 50) -> None:
        self.store = store
        self.keep_finished = keep_finished
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._jobs: deque[Job] = deque()
        self._warnings: list[str] = []
        self._ids = itertools.count(1)
        self._stop_current = threading.Event()
        self._prepared: tuple[tuple, PreparedData] | None = None  # the last dataset, reused by the next job
        self._worker = threading.Thread(target=self._work, name="training-queue", daemon=True)
        self._worker.start()

    def submit(self, configs: list[TrainConfig], data: DataSpec, group: str = "", owner: str = "",
               limit: int | None = None) -> list[int]:
        """Queue one run per config on the same data; returns the job ids. `group` names the batch
        ("Train all five") in each run's title, which also says "run 2 of 5". With a `limit`, the whole
        batch is refused (QueueLimitError) when `owner` would have more than `limit` active jobs."""
        with self._lock:
            self._admit(owner, len(configs), limit)
            jobs = [Job(next(self._ids), config, data, group=group, step=StepProgress("run", number, len(configs)),
                        owner=owner) for number, config in enumerate(configs, start=1)]
            self._jobs.extend(jobs)
            self._trim()
            self._wake.notify()
            return [job.job_id for job in jobs]

    def submit_task(self, label: str, config: TrainConfig, data: DataSpec, task: Callable, kind: str = "tune",
                    owner: str = "", limit: int | None = None) -> int:
        """Queue a study (tuning, ablation) that trains several runs, or other long work (an audit); it
        waits its turn like a run, so two jobs never share the CPU. The task may report its runs through
        `callback.on_step`, or its own steps through `callback.on_progress(done, total, text)`, and hand
        back a result through `callback.on_result`."""
        if kind not in JOB_KINDS:
            raise ValueError(f"unknown job kind {kind!r} (choose from {', '.join(JOB_KINDS)})")
        with self._lock:
            self._admit(owner, 1, limit)
            job = Job(next(self._ids), config, data, task=task, label=label, kind=kind, owner=owner)
            self._jobs.append(job)
            self._trim()
            self._wake.notify()
            return job.job_id

    def submit_resume(self, run_id: str, owner: str = "", limit: int | None = None) -> int:
        """Queue the continuation of a stopped or failed run from its last finished epoch."""
        run = self.store.load(run_id)
        if run is None:
            raise ResumeError(f"no run {run_id}")
        if not run.get("resumable"):
            raise ResumeError(f"run {run_id} is {run['status']} and has no resume checkpoint")
        spec = resume_data_spec(run)
        with self._lock:
            if any(job.resume_run == run_id and job.active for job in self._jobs):
                raise ResumeError(f"run {run_id} is already queued to resume")
            self._admit(owner, 1, limit)
            job = Job(next(self._ids), TrainConfig.from_dict(run["config"]), spec, resume_run=run_id,
                      label=f"resume {run_id}", owner=owner)
            self._jobs.append(job)
            self._trim()
            self._wake.notify()
            return job.job_id

    def active_count(self, owner: str) -> int:
        """Jobs of this owner queued or running."""
        with self._lock:
            return self._active_count(owner)

    def _active_count(self, owner: str) -> int:
        return sum(job.active and job.owner == owner for job in self._jobs)

    def _admit(self, owner: str, wanted: int, limit: int | None) -> None:
        # Under the queue's lock, so two reruns of one session cannot both pass the check.
        if limit is None:
            return
        active = self._active_count(owner)
        if active + wanted > limit:
            raise QueueLimitError(active, wanted, limit)

    def stop_current(self) -> None:
        """End the running job cleanly after its current batch (status 'stopped', best checkpoint kept)."""
        self._stop_current.set()

    def stop(self, job_id: int) -> bool:
        """Stop this job if it is the one running; False when it is not (any more). A page's Stop button
        names a job, so a click that arrives after that job ended never stops the next one."""
        with self._lock:
            current = next((job for job in self._jobs if job.state in ("preparing", "running")), None)
            if current is None or current.job_id != job_id:
                return False
            self._stop_current.set()
            return True

    def clear_queue(self) -> int:
        """Drop every job not started yet; returns how many were dropped."""
        with self._lock:
            queued = [job for job in self._jobs if job.state == "queued"]
            for job in queued:
                job.state, job.finished_at = "cancelled", time.time()
            return len(queued)

    def snapshot(self) -> QueueSnapshot:
        with self._lock:
            jobs = tuple(dataclasses.replace(job, history=list(job.history), warnings=list(job.warnings))
                         for job in self._jobs)
            return QueueSnapshot(jobs, tuple(self._warnings))

    def wait_until_idle(self, timeout: float | None = None) -> bool:
        """Block until no job is queued or running (for scripts and tests)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.snapshot().busy:
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def _warn(self, job: Job, message: str) -> None:
        with self._lock:
            job.warnings.append(message)
            if message not in self._warnings:  # the same warning is told once, not once per run
                self._warnings.append(message)

    def _trim(self) -> None:
        finished = [job for job in self._jobs if not job.active]
        for job in finished[: max(0, len(finished) - self.keep_finished)]:
            self._jobs.remove(job)

    def _next_job(self) -> Job:
        with self._lock:
            while True:
                job = next((job for job in self._jobs if job.state == "queued"), None)
                if job is not None:
                    job.state, job.started_at = "preparing", time.time()
                    self._stop_current.clear()
                    return job
                self._wake.wait()

    def _work(self) -> None:
        while True:
            job = self._next_job()
            try:
                state, error = self._run(job)
            except Exception as failure:  # noqa: BLE001 - the worker must outlive any one job
                state, error = "failed", f"{type(failure).__name__}: {failure}"
                traceback.print_exc()
            with self._lock:
                job.state, job.error, job.finished_at = state, error, time.time()

    def _run(self, job: Job) -> tuple[str, str | None]:
        if job.task is not None:
            return job.task(self._stop_current, _JobCallback(self, job))
        data = self._prepare(job)
        if self._stop_current.is_set():
            return "stopped", "stopped before training started"
        if job.resume_run is not None:
            run = resume_training(job.resume_run, self.store, _JobCallback(self, job), self._stop_current, data)
        else:
            run = run_training(job.config, data, self.store, _JobCallback(self, job), self._stop_current)
        return run["status"], run.get("error")

    def _prepare(self, job: Job) -> PreparedData:
        """The job's dataset, reusing the previous job's when data and split settings are the same."""
        config = job.config.resolved(job.data)
        key = (job.data, config.image_size, config.split, config.val_fraction, config.seed, config.max_images)
        if self._prepared is not None and self._prepared[0] == key:
            return self._prepared[1]
        self._prepared = None  # free the old arrays before decoding new ones

        def decoded(done: int, total: int) -> None:
            job.decoded = (done, total)

        data = prepare_data(job.data, config, self.store.cache_dir, decoded)
        self._prepared = (key, data)
        return data


def shared_queue(store: RunStore) -> JobQueue:
    """The process-wide queue of a run store. Kept here rather than in a UI cache, so that clearing
    the dashboard's caches can never start a second worker training at the same time."""
    key = str(store.root.resolve())
    with _queues_lock:
        if key not in _queues:
            _queues[key] = JobQueue(store)
        return _queues[key]


class BackgroundTask:
    """One function run on a thread, with progress the page can poll (slow CAM methods, batch
    measures). The function gets `report(done, total)` and `stop` (an Event) and returns a result."""

    def __init__(self, function, *args, **kwargs) -> None:
        self._lock = threading.Lock()
        self.done, self.total = 0, 1
        self.result, self.error = None, None
        self.stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(function, args, kwargs), daemon=True,
                                        name="background-task")
        self._thread.start()

    def _report(self, done: int, total: int) -> None:
        with self._lock:
            self.done, self.total = done, max(total, 1)

    def _run(self, function, args, kwargs) -> None:
        try:
            result = function(*args, report=self._report, stop=self.stop, **kwargs)
            with self._lock:
                self.result = result
        except Exception as failure:  # noqa: BLE001 - shown on the page instead of lost in a thread
            with self._lock:
                self.error = f"{type(failure).__name__}: {failure}"

    @property
    def finished(self) -> bool:
        return not self._thread.is_alive()

    @property
    def fraction(self) -> float:
        with self._lock:
            return min(self.done / self.total, 1.0)

    def wait(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return self.finished
