"""Where Optuna studies live: an SQLite file in the run store, or one database (PostgreSQL) that several
machines share. Optuna's RDB storage does the sharing: trial numbers come from the database, a waiting
trial is handed to one worker only, and each running trial records a heartbeat so that the trial of a
machine that died is failed (and its work can go to another) after GRACE_SECONDS."""

from __future__ import annotations

import threading
import time
import uuid
import warnings
from collections.abc import Callable
from datetime import datetime, timedelta

import optuna
import sqlalchemy
from optuna.trial import TrialState

HEARTBEAT_SECONDS = 60
GRACE_SECONDS = 180
CONNECT_TIMEOUT_SECONDS = 10
# A study user attribute per worker adding trials: {"left": trials it has yet to start, "at": when it last said
# so (epoch seconds)}. Between two of a worker's trials nothing in the study is RUNNING, so without it another
# worker that has finished would print the study before that worker's last trial.
WORKER_PREFIX = "worker:"
# Tables created by several workers at once on an empty database collide (optuna/optuna#1092); the
# loser finds them made when it tries again.
CREATION_ATTEMPTS = 5


class StudyStorageError(ValueError):
    """The study storage cannot be reached or opened; the message is one line naming the host."""


def describe_storage(url: str) -> str:
    """The URL with its password hidden."""
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return url


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """An RDB storage with heartbeats, a connection timeout and checked connections; any failure to
    reach it is a StudyStorageError."""
    try:
        given = parsed = sqlalchemy.engine.make_url(url)
    except sqlalchemy.exc.ArgumentError as error:
        raise StudyStorageError(f"not a database URL: {url!r} ({error})") from None
    engine_kwargs: dict = {"pool_pre_ping": True}  # a connection idle through a long trial may be gone
    if parsed.drivername in ("postgresql", "postgres"):
        # SQLAlchemy 2.0 reads postgresql:// as psycopg2, 2.1 as psycopg 3; requirements.txt installs psycopg2.
        parsed = parsed.set(drivername="postgresql+psycopg2")
    if parsed.drivername.startswith("postgresql") and "connect_timeout" not in parsed.query:
        engine_kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_SECONDS}
    if parsed.drivername.startswith("sqlite"):
        engine_kwargs["connect_args"] = {"timeout": 30}  # several workers on one file wait for its lock
    for attempt in range(1, CREATION_ATTEMPTS + 1):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(parsed.render_as_string(hide_password=False),
                                                  engine_kwargs=engine_kwargs,
                                                  heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS)
        except (sqlalchemy.exc.SQLAlchemyError, ImportError) as error:
            if attempt < CREATION_ATTEMPTS and _is_creation_race(error):
                time.sleep(0.2 * attempt)
                continue
            raise StudyStorageError(_unreachable(given, error)) from None
    raise AssertionError("unreachable")


def _is_creation_race(error: Exception) -> bool:
    return isinstance(error, sqlalchemy.exc.IntegrityError) or "already exists" in str(error)


def _unreachable(url: sqlalchemy.engine.URL, error: Exception) -> str:
    reason = str(getattr(error, "orig", None) or error.__cause__ or error).strip().splitlines()
    reason = reason[0] if reason else type(error).__name__
    shown = url.render_as_string(hide_password=True)
    if url.host:
        return f"cannot open the study storage on host {url.host} ({shown}): {reason}"
    return f"cannot open the study storage {shown}: {reason}"


def fail_dead_trials(study: optuna.Study) -> None:
    """Fail the running trials whose heartbeat stopped (their machine died or was killed)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


class StudyWorker:
    """This process's announcement in a shared study of how many trials it has yet to start: say `started_one`
    as each trial starts, `alive` as each ends, and `finished` at the end (also when it fails or is stopped)."""

    def __init__(self, study: optuna.Study, trials: int) -> None:
        self.study, self.left = study, trials
        self.key = f"{WORKER_PREFIX}{uuid.uuid4().hex[:12]}"
        self._announce()

    def _announce(self) -> None:
        self.study.set_user_attr(self.key, {"left": self.left, "at": time.time()})

    def started_one(self) -> None:
        self.left = max(0, self.left - 1)
        self._announce()

    def alive(self) -> None:
        self._announce()

    def finished(self) -> None:
        self.left = 0
        self._announce()


def workers_with_trials_to_start(study: optuna.Study) -> list[str]:
    """Workers that still mean to start trials and said so within GRACE_SECONDS (a worker killed between trials
    is not waited for longer)."""
    now = time.time()
    return [key for key, value in study.user_attrs.items()
            if key.startswith(WORKER_PREFIX) and isinstance(value, dict) and value.get("left", 0) > 0
            and now - float(value.get("at", 0)) < GRACE_SECONDS]


def trials_running_elsewhere(study: optuna.Study, started: datetime) -> list[optuna.trial.FrozenTrial]:
    """Trials still running that began after `started` less the grace period. Older ones left RUNNING
    by a killed process from before heartbeats would otherwise be waited for forever; start times are
    each machine's local clock, so machines that share a study should share a time zone."""
    fail_dead_trials(study)
    since = started - timedelta(seconds=GRACE_SECONDS)
    return [trial for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if trial.datetime_start is not None and trial.datetime_start >= since]


def wait_for_trials_elsewhere(study: optuna.Study, started: datetime, stop: threading.Event,
                              on_wait: Callable[[list[int]], None] | None = None, poll_seconds: float = 2.0) -> None:
    """Return once the trials other workers are running have ended and no worker has trials left to start (or
    `stop` is set), so that every worker ends by reporting the same, finished study. `on_wait` hears the
    running trials' numbers once (empty while the other workers are between trials)."""
    told = False
    while not stop.is_set():
        running = trials_running_elsewhere(study, started)
        if not running and not workers_with_trials_to_start(study):
            return
        if on_wait and not told:
            on_wait([trial.number for trial in running])
            told = True
        stop.wait(poll_seconds)
