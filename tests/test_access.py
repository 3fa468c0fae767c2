"""Classroom roles in core/: the admin password hash, the sign-in throttle with a fake clock, session expiry,
role resolution from the environment and secrets, the queue's per-session limit and the demo's progress line."""

import hmac
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from core import access
from core.access import (
    ADMIN,
    VIEWER,
    AccessSettings,
    LoginThrottle,
    PasswordHashError,
    hash_password,
    load_access_settings,
    parse_password_hash,
    resolve_role,
    session_expired,
    sign_in,
    verify_password,
)
from core.config import MODEL_NAMES
from core.runs import RunStore
from core.training.jobs import JobQueue, QueueLimitError, describe_batch
from tests.conftest import TINY_CONFIG, TINY_SYNTHETIC

ROOT = Path(__file__).resolve().parents[1]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_hash_round_trip_and_wrong_password():
    encoded = hash_password("correct horse")
    assert verify_password("correct horse", encoded)
    assert not verify_password("correct hors", encoded)
    assert not verify_password("", encoded)
    assert "correct horse" not in encoded


def test_hash_is_salted_and_says_its_parameters():
    first, second = hash_password("same"), hash_password("same")
    assert first != second, "a fresh salt each time"
    parsed = parse_password_hash(first)
    assert first.startswith("scrypt$n=16384,r=8,p=1$")
    assert (parsed.n, parsed.r, parsed.p, len(parsed.salt), len(parsed.key)) == (2**14, 8, 1, 16, 32)
    assert parsed.encode() == first
    assert hash_password("same", salt=parsed.salt) == first, "deterministic given the salt"


@pytest.mark.parametrize("bad", ["", "plain-password", "pbkdf2$x$y$z", "scrypt$n=16384,r=8$c2FsdHNhbHQ$a2V5",
                                 "scrypt$n=3,r=8,p=1$c2FsdHNhbHRz$" + "A" * 43,  # n not a power of two
                                 "scrypt$n=16384,r=8,p=1$c2FsdHNhbHRz$a2V5",  # key too short
                                 "scrypt$n=1073741824,r=8,p=1$c2FsdHNhbHRz$" + "A" * 43,  # gigabytes per attempt
                                 "scrypt$n=16384,r=8,p=1$not base64!$" + "A" * 43])
def test_malformed_hashes_are_refused(bad):
    with pytest.raises(PasswordHashError):
        parse_password_hash(bad)


def test_the_keys_are_compared_with_compare_digest(monkeypatch):
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(access.hmac, "compare_digest", spy)
    encoded = hash_password("pw")
    assert verify_password("pw", encoded) and not verify_password("nope", encoded)
    assert len(calls) == 2 and all(len(a) == len(b) == 32 for a, b in calls)


def test_throttle_per_session_grows_and_tells_the_wait():
    clock = FakeClock()
    throttle = LoginThrottle(clock=clock, free_failures=3, base_wait=2.0, max_wait=30.0)
    for _ in range(3):
        assert throttle.wait_seconds("a") == 0
        throttle.record_failure("a")
    assert throttle.wait_seconds("a") == pytest.approx(2.0)
    assert throttle.wait_seconds("b") == 0, "another session is not slowed by a's failures"
    clock.now += 2.0
    assert throttle.wait_seconds("a") == 0
    throttle.record_failure("a")
    assert throttle.wait_seconds("a") == pytest.approx(4.0), "doubles"
    for _ in range(10):
        throttle.record_failure("a")
    assert throttle.wait_seconds("a") == pytest.approx(30.0), "capped"
    throttle.record_success("a")
    assert throttle.wait_seconds("a") == 0


def test_throttle_across_the_server_slows_everyone_after_many_sessions_fail():
    clock = FakeClock()
    throttle = LoginThrottle(clock=clock, free_failures=3, server_failures=5, server_window=60.0)
    for session in range(5):  # five fresh sessions, one failure each: no session is slowed on its own
        clock.now += 1.0
        throttle.record_failure(f"s{session}")
    assert throttle.wait_seconds("new") == pytest.approx(56.0), "until the oldest failure leaves the window"
    clock.now += 56.0
    assert throttle.wait_seconds("new") == 0


def test_throttle_is_thread_safe():
    throttle = LoginThrottle(server_failures=10_000, server_window=3600)
    threads = [threading.Thread(target=lambda: [throttle.record_failure("x") for _ in range(500)]) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert throttle._sessions["x"][0] == 4000 and len(throttle._recent) == 4000


def test_wait_text_reads_naturally():
    assert [access.wait_text(s) for s in (0.2, 5, 119.5, 600, 7199, 8 * 3600, 8 * 3600 - 60)] == [
        "1 s", "5 s", "2 min", "10 min", "2 h", "8 h", "7 h 59 min"]


def test_sign_in_refuses_while_throttled_without_checking_the_password(monkeypatch):
    clock = FakeClock()
    throttle = LoginThrottle(clock=clock, free_failures=2, base_wait=5.0)
    settings = AccessSettings(password_hash=hash_password("right"))
    assert not sign_in(settings, throttle, "s", "wrong").ok
    second = sign_in(settings, throttle, "s", "wrong")
    assert not second.ok and "try again in 5 s" in second.message and second.wait_seconds == pytest.approx(5.0)
    checked = []
    monkeypatch.setattr(access, "verify_password", lambda *args: checked.append(args) or True)
    third = sign_in(settings, throttle, "s", "right")
    assert not third.ok and "Too many failed attempts" in third.message and not checked
    clock.now += 5.0
    assert sign_in(settings, throttle, "s", "right").ok
    assert throttle.wait_seconds("s") == 0, "a success clears the session's failures"


def test_roles_without_configuration_everyone_administers():
    settings = load_access_settings(environ={}, secrets_={})
    assert not settings.classroom
    assert resolve_role(settings, None, 0.0) == ADMIN
    assert settings.queue_limit == access.DEFAULT_QUEUE_LIMIT >= len(MODEL_NAMES)


def test_roles_from_the_environment_and_secrets():
    encoded = hash_password("pw")
    from_env = load_access_settings(environ={"SKIN_ADMIN_PASSWORD_HASH": encoded, "SKIN_ADMIN_SESSION_HOURS": "2",
                                             "SKIN_QUEUE_LIMIT": "3"}, secrets_={})
    assert from_env.classroom and from_env.session_seconds == 7200 and from_env.queue_limit == 3
    from_secrets = load_access_settings(environ={}, secrets_={"admin_password_hash": encoded, "queue_limit": 6})
    assert from_secrets.password_hash == encoded and from_secrets.queue_limit == 6
    other = hash_password("other")
    both = load_access_settings(environ={"SKIN_ADMIN_PASSWORD_HASH": other}, secrets_={"admin_password_hash": encoded})
    assert both.password_hash == other, "the environment wins"
    assert resolve_role(from_env, None, 100.0) == VIEWER
    assert resolve_role(from_env, 100.0, 100.0 + 7199) == ADMIN
    assert resolve_role(from_env, 100.0, 100.0 + 7200) == VIEWER, "expired"
    assert session_expired(from_env, 100.0, 100.0 + 7200) and not session_expired(from_env, None, 1e9)


def test_roles_through_streamlit_login_and_admin_emails():
    secrets_ = {"auth": {"redirect_uri": "http://localhost:8501/oauth2callback"},
                "admin_emails": ["Teacher@School.org"]}
    settings = load_access_settings(environ={}, secrets_=secrets_)
    assert settings.classroom and settings.login_configured and not settings.password_hash
    assert resolve_role(settings, None, 0.0, "teacher@school.org") == ADMIN
    assert resolve_role(settings, None, 0.0, "student@school.org") == VIEWER
    assert resolve_role(settings, None, 0.0, None) == VIEWER
    emails = load_access_settings(environ={"SKIN_ADMIN_EMAILS": "a@x.org, b@x.org"}, secrets_={"auth": {}})
    assert emails.admin_emails == {"a@x.org", "b@x.org"}


def test_a_malformed_configuration_is_an_error_not_an_open_server():
    with pytest.raises(PasswordHashError):
        load_access_settings(environ={"SKIN_ADMIN_PASSWORD_HASH": "hunter2"}, secrets_={})
    assert AccessSettings(problem="unreadable").classroom
    with pytest.raises(ValueError):
        load_access_settings(environ={"SKIN_QUEUE_LIMIT": "0"}, secrets_={})


def test_hash_password_command_reads_stdin_and_prints_a_hash():
    done = subprocess.run([sys.executable, "-m", "core", "hash-password"], input="s3cret\n", capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    printed = done.stdout.strip()
    assert verify_password("s3cret", printed) and "s3cret" not in printed
    empty = subprocess.run([sys.executable, "-m", "core", "hash-password"], input="", capture_output=True, text=True,
                           cwd=ROOT, timeout=120)
    assert empty.returncode == 2 and "empty" in empty.stderr


@pytest.fixture
def idle_queue(tmp_path):
    """A queue whose worker is held up by a task, so that queued jobs stay queued while counted."""
    queue = JobQueue(RunStore(tmp_path / "runs"))
    release = threading.Event()

    def hold(stop, callback):
        callback.on_progress(0, 1, "holding")
        while not (release.is_set() or stop.is_set()):
            stop.wait(0.02)
        return "completed", None

    queue.submit_task("hold", TINY_CONFIG, TINY_SYNTHETIC, hold, kind="audit")
    while queue.snapshot().current is None:  # the worker has taken it
        time.sleep(0.01)
    yield queue
    queue.clear_queue()
    release.set()
    assert queue.wait_until_idle(timeout=30)


def test_queue_limit_counts_active_jobs_per_owner(idle_queue):
    ids = idle_queue.submit([TINY_CONFIG] * 5, TINY_SYNTHETIC, owner="alice", limit=5)
    assert len(ids) == 5 and idle_queue.active_count("alice") == 5
    with pytest.raises(QueueLimitError) as refused:
        idle_queue.submit([TINY_CONFIG], TINY_SYNTHETIC, owner="alice", limit=5)
    assert "at most 5" in str(refused.value) and refused.value.active == 5
    with pytest.raises(QueueLimitError):
        idle_queue.submit_task("audit", TINY_CONFIG, TINY_SYNTHETIC, lambda stop, cb: ("completed", None),
                               kind="audit", owner="alice", limit=5)
    assert idle_queue.active_count("alice") == 5, "a refused batch queues nothing"
    assert idle_queue.submit([TINY_CONFIG] * 2, TINY_SYNTHETIC, owner="bob", limit=5), "others are not affected"
    idle_queue.clear_queue()
    assert idle_queue.active_count("alice") == 0
    assert idle_queue.submit([TINY_CONFIG], TINY_SYNTHETIC, owner="alice", limit=5), "finished jobs free the slots"


def test_queue_limit_refuses_a_whole_batch_that_would_exceed_it(idle_queue):
    idle_queue.submit([TINY_CONFIG] * 2, TINY_SYNTHETIC, owner="alice", limit=5)
    with pytest.raises(QueueLimitError):
        idle_queue.submit([TINY_CONFIG] * 4, TINY_SYNTHETIC, owner="alice", limit=5)
    assert idle_queue.active_count("alice") == 2
    assert idle_queue.submit([TINY_CONFIG] * 20, TINY_SYNTHETIC), "no limit: scripts and the CLI queue freely"


def test_queue_limit_holds_under_concurrent_submits(idle_queue):
    outcomes = []

    def submit():
        try:
            outcomes.append(idle_queue.submit([TINY_CONFIG], TINY_SYNTHETIC, owner="alice", limit=3))
        except QueueLimitError:
            outcomes.append(None)

    threads = [threading.Thread(target=submit) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(outcome is not None for outcome in outcomes) == 3 and idle_queue.active_count("alice") == 3


def test_describe_batch_names_done_runs_and_the_current_epoch(idle_queue):
    import dataclasses

    from core.training.callbacks import BatchProgress

    ids = idle_queue.submit([dataclasses.replace(TINY_CONFIG, model=model) for model in MODEL_NAMES], TINY_SYNTHETIC,
                            group="Train all five")
    snapshot = idle_queue.snapshot()
    assert describe_batch(snapshot, "Train all five") == "0 of 5 done, waiting behind hold"
    assert describe_batch(snapshot, "other") is None
    jobs = {job.job_id: job for job in snapshot.jobs}
    jobs[ids[0]].state = "completed"
    jobs[ids[1]].state = "running"
    jobs[ids[1]].progress = BatchProgress(run_id="r", model="resnet50", epoch=3, epochs=5, batch=1, batches=4,
                                          loss=0.5, images_per_second=10.0, elapsed_seconds=1.0, eta_seconds=9.0)
    assert describe_batch(snapshot, "Train all five") == "1 of 5 done, ResNet50 epoch 3 of 5"
    for job_id in ids:
        jobs[job_id].state = "completed"
    assert describe_batch(snapshot, "Train all five") is None, "nothing to wait for"
