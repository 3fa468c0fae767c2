"""The background training queue, driven directly (no UI)."""

import dataclasses
import threading
import time

import pytest

from core.training.jobs import JobQueue
from tests.conftest import TINY_CONFIG, TINY_SYNTHETIC


def wait_for(condition, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture
def queue(store):
    return JobQueue(store)


def test_queued_runs_finish_in_order_with_progress_and_history(queue, store):
    ids = queue.submit([TINY_CONFIG, dataclasses.replace(TINY_CONFIG, model="hybrid_sresnet", epochs=2)],
                       TINY_SYNTHETIC)
    assert ids == [1, 2]
    assert queue.wait_until_idle(timeout=120)
    first, second = queue.snapshot().jobs
    assert (first.state, second.state) == ("completed", "completed")
    assert first.progress.batch == first.progress.batches and first.progress.epoch == 1
    assert [entry["epoch"] for entry in second.history] == [1, 2]
    assert {run["run_id"] for run in store.list_runs()} == {first.run_id, second.run_id}
    assert second.finished_at >= first.finished_at


def test_stop_ends_the_current_run_cleanly_and_the_queue_goes_on(queue):
    long_run = dataclasses.replace(TINY_CONFIG, epochs=200)
    queue.submit([long_run, TINY_CONFIG], TINY_SYNTHETIC)
    wait_for(lambda: (job := queue.snapshot().current) is not None and job.history)
    queue.stop_current()
    assert queue.wait_until_idle(timeout=120)
    stopped, after = queue.snapshot().jobs
    assert stopped.state == "stopped" and 1 <= len(stopped.history) < 200
    assert after.state == "completed"


def test_clear_queue_drops_only_jobs_not_started(queue):
    queue.submit([dataclasses.replace(TINY_CONFIG, epochs=200)] + [TINY_CONFIG] * 3, TINY_SYNTHETIC)
    wait_for(lambda: queue.snapshot().current is not None)
    assert queue.clear_queue() == 3
    queue.stop_current()
    assert queue.wait_until_idle(timeout=120)
    assert [job.state for job in queue.snapshot().jobs] == ["stopped", "cancelled", "cancelled", "cancelled"]


def test_a_crashing_run_does_not_kill_the_queue(queue, tmp_path):
    broken = dataclasses.replace(TINY_CONFIG, weights_file=str(tmp_path / "missing.pt"))
    queue.submit([broken, TINY_CONFIG], TINY_SYNTHETIC)
    assert queue.wait_until_idle(timeout=120)
    failed, fine = queue.snapshot().jobs
    assert failed.state == "failed" and "weights file not found" in failed.error
    assert fine.state == "completed"


def test_bad_dataset_fails_the_job_with_its_message(queue, tmp_path):
    queue.submit([TINY_CONFIG], dataclasses.replace(TINY_SYNTHETIC, source=str(tmp_path / "nowhere"), format="auto"))
    assert queue.wait_until_idle(timeout=60)
    job = queue.snapshot().jobs[0]
    assert job.state == "failed" and "not found" in job.error


def test_the_same_warning_is_told_once(queue, monkeypatch):
    import core.models

    monkeypatch.setattr(core.models, "fetch_imagenet_state_dict", lambda spec: (None, "offline"))
    pretrained = dataclasses.replace(TINY_CONFIG, pretrained=True)
    queue.submit([pretrained, dataclasses.replace(pretrained, model="hybrid_sresnet")], TINY_SYNTHETIC)
    assert queue.wait_until_idle(timeout=120)
    snapshot = queue.snapshot()
    assert len(snapshot.warnings) == 1 and "random initialisation" in snapshot.warnings[0]
    assert all(len(job.warnings) == 1 for job in snapshot.jobs)


def test_snapshots_are_copies(queue):
    queue.submit([TINY_CONFIG], TINY_SYNTHETIC)
    assert queue.wait_until_idle(timeout=60)
    snapshot = queue.snapshot()
    snapshot.jobs[0].history.append({"epoch": 99})
    assert len(queue.snapshot().jobs[0].history) == 1


def test_background_task_reports_progress_result_errors_and_stop():
    import threading as threading_module

    from core.training.jobs import BackgroundTask

    release = threading_module.Event()

    def work(count, report, stop):
        for index in range(count):
            release.wait(5)
            if stop.is_set():
                return "stopped"
            report(index + 1, count)
        return "done"

    task = BackgroundTask(work, 4)
    assert not task.finished
    release.set()
    assert task.wait(10) and task.result == "done" and task.fraction == 1.0

    def broken(report, stop):
        raise ValueError("bad map")

    failing = BackgroundTask(broken)
    assert failing.wait(10) and failing.error == "ValueError: bad map"
    release.clear()
    stopping = BackgroundTask(work, 4)
    stopping.stop.set()
    release.set()
    assert stopping.wait(10) and stopping.result == "stopped"


def test_a_stopped_run_is_resumed_through_the_queue(queue, store):
    from core.training.loop import ResumeError

    queue.submit([dataclasses.replace(TINY_CONFIG, epochs=200)], TINY_SYNTHETIC)
    wait_for(lambda: (job := queue.snapshot().current) is not None and len(job.history) >= 1)
    queue.stop_current()
    assert queue.wait_until_idle(timeout=120)
    (stopped,) = queue.snapshot().jobs
    run = store.load(stopped.run_id)
    assert run["status"] == "stopped" and run["resumable"]
    done = len(run["history"])
    queue.submit_resume(stopped.run_id)
    with pytest.raises(ResumeError, match="already queued"):
        queue.submit_resume(stopped.run_id)
    wait_for(lambda: (job := queue.snapshot().current) is not None and len(job.history) > done)
    resumed = queue.snapshot().current
    assert resumed.run_id == stopped.run_id and resumed.history[0]["epoch"] == 1  # earlier epochs carried over
    queue.stop_current()
    assert queue.wait_until_idle(timeout=120)
    assert store.load(stopped.run_id)["status"] == "stopped" and len(store.list_runs()) == 1
    with pytest.raises(ResumeError, match="no run"):
        queue.submit_resume("missing")


def waiting_task(steps=()):
    """A study's task without training: reports its steps and one batch, then waits to be stopped."""
    from core.training.callbacks import BatchProgress

    def task(stop, callback):
        for step in steps:
            callback.on_step(step)
        callback.on_batch_end(BatchProgress("r", "resnet18", 1, 2, 3, 10, 0.7, 50.0, 6.0, 34.0))
        stop.wait(30)
        return "stopped", "stopped by request"

    return task


def test_a_study_reports_its_step_kind_and_title_through_the_queue(queue):
    from core.training.estimates import StepProgress, WorkItem

    work = WorkItem(2, 100)
    steps = [StepProgress("trial", 1, 3, current=work, later=(work, work)),
             StepProgress("trial", 2, 3, current=work, later=(work,))]
    job_id = queue.submit_task("Tune study demo", TINY_CONFIG, TINY_SYNTHETIC, waiting_task(steps), kind="tune")
    wait_for(lambda: (job := queue.snapshot().current) is not None and job.progress is not None)
    job = queue.snapshot().current
    assert (job.job_id, job.kind, job.title, job.describe_step()) == (job_id, "tune", "Tune study demo", "trial 2 of 3")
    assert job.progress_text().startswith("Tune study demo: trial 2 of 3 · epoch 1/2 · batch 3/10 · 50 img/s · ")
    queue.stop_current()
    assert queue.wait_until_idle(timeout=30)
    with pytest.raises(ValueError, match="unknown job kind"):
        queue.submit_task("x", TINY_CONFIG, TINY_SYNTHETIC, waiting_task(), kind="explain")


def test_stop_names_its_job_so_a_late_click_never_stops_the_next_one(queue):
    first = queue.submit_task("Ablation a", TINY_CONFIG, TINY_SYNTHETIC, waiting_task(), kind="ablation")
    second = queue.submit_task("Tune study b", TINY_CONFIG, TINY_SYNTHETIC, waiting_task(), kind="tune")
    wait_for(lambda: (job := queue.snapshot().current) is not None and job.job_id == first)
    assert not queue.stop(second), "the Tune page's Stop for a job still queued stops nothing"
    assert queue.snapshot().current.job_id == first
    assert queue.stop(first)
    wait_for(lambda: (job := queue.snapshot().current) is not None and job.job_id == second)
    assert not queue.stop(first), "a second click on the ablation's Stop does not stop the study behind it"
    assert queue.snapshot().current.state in ("preparing", "running")
    assert queue.stop(second) and queue.wait_until_idle(timeout=30)
    assert [job.state for job in queue.snapshot().jobs] == ["stopped", "stopped"]


def test_a_batch_of_runs_is_numbered_and_named(queue):
    blocker = queue.submit_task("Tune study busy", TINY_CONFIG, TINY_SYNTHETIC, waiting_task(), kind="tune")
    wait_for(lambda: (job := queue.snapshot().current) is not None and job.job_id == blocker)
    ids = queue.submit([TINY_CONFIG, dataclasses.replace(TINY_CONFIG, model="hybrid_sresnet")], TINY_SYNTHETIC,
                       group="Train all five")
    jobs = {job.job_id: job for job in queue.snapshot().jobs}
    assert [jobs[job_id].kind for job_id in ids] == ["train", "train"]
    assert [jobs[job_id].title for job_id in ids] == ["ResNet18 run 1 of 2 (Train all five)",
                                                      "Hybrid S-ResNet run 2 of 2 (Train all five)"]
    assert queue.clear_queue() == 2 and queue.stop(blocker)  # only the names matter; nothing needs to train
    assert queue.wait_until_idle(timeout=30)


def test_a_task_counting_its_own_steps_reports_progress_time_left_and_a_result(queue):
    """An audit trains nothing: it reports done/total steps and a text, and hands back its result."""
    halfway, release = threading.Event(), threading.Event()

    def task(stop, callback):
        callback.on_progress(0, 4, "ResNet18 (run 1 of 2)")
        time.sleep(0.2)
        callback.on_progress(2, 4, "ResNet50 (run 2 of 2)")
        halfway.set()
        release.wait(30)
        callback.on_progress(4, 4, "ResNet50 (run 2 of 2)")
        callback.on_result({"audited": 2})
        return "completed", None

    job_id = queue.submit_task("Audit of 2 run(s)", TINY_CONFIG, TINY_SYNTHETIC, task, kind="audit")
    assert halfway.wait(30)
    job = queue.snapshot().current
    assert (job.job_id, job.kind, job.state, job.fraction_done) == (job_id, "audit", "running", 0.5)
    assert 0 < job.seconds_left < 30, "the steps left at the pace of the steps so far"
    text = job.progress_text()
    assert text.startswith("Audit of 2 run(s): ResNet50 (run 2 of 2) · 2 of 4 steps done · about ")
    assert text.endswith(" s left") and "epoch" not in text and "preparing" not in text
    assert job.busy_text() == "Audit of 2 run(s) (ResNet50 (run 2 of 2) · 2 of 4 steps done)"
    release.set()
    assert queue.wait_until_idle(timeout=30)
    (finished,) = queue.snapshot().jobs
    assert (finished.state, finished.fraction_done, finished.result) == ("completed", 1.0, {"audited": 2})


def test_a_task_before_its_first_step_estimates_nothing_yet(queue):
    release = threading.Event()

    def task(stop, callback):
        callback.on_progress(0, 7)
        release.wait(30)
        return "completed", None

    queue.submit_task("Audit of 1 run(s)", TINY_CONFIG, TINY_SYNTHETIC, task, kind="audit")
    wait_for(lambda: (job := queue.snapshot().current) is not None and job.task_progress is not None)
    job = queue.snapshot().current
    assert job.progress_text() == "Audit of 1 run(s): 0 of 7 steps done · estimating time left ..."
    assert job.fraction_done == 0.0 and job.seconds_left is None
    release.set()
    assert queue.wait_until_idle(timeout=30)
