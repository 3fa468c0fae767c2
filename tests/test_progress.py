"""Time estimates and the progress line of a job: pure functions on made-up runs, no training."""

import dataclasses

import pytest

from core.config import DataSpec
from core.formatting import format_duration
from core.training.callbacks import BatchProgress
from core.training.estimates import (
    ROUGH_OVERHEAD_SECONDS,
    ROUGH_RATES_224,
    StepProgress,
    WorkItem,
    estimate_runs,
    images_per_epoch,
    measured_throughput,
    run_throughput,
    seconds_left,
)
from core.training.jobs import Job
from tests.conftest import TINY_CONFIG

# Epoch 2 of 5, batch 14 of 40: 54 of 200 batches done, 120 s left in this run.
PROGRESS = BatchProgress(run_id="r", model="hybrid_sresnet", epoch=2, epochs=5, batch=14, batches=40, loss=0.5,
                         images_per_second=85.0, elapsed_seconds=44.0, eta_seconds=120.0)
TRIAL = WorkItem(epochs=5, images_per_epoch=400)


def record_run(store, model: str, image_size: int, epoch_seconds: list[float], train_images: int,
               status: str = "completed") -> str:
    """A run.json as training writes it, with only what estimates read: 5 s beyond its epochs."""
    folder = store.create(model, {
        "config": {"image_size": image_size}, "status": status, "seconds": sum(epoch_seconds) + 5.0,
        "dataset": {"class_counts": {"train": {"benign": train_images - 10, "malignant": 10}}},
        "history": [{"epoch": number, "seconds": seconds} for number, seconds in enumerate(epoch_seconds, start=1)],
    })
    return folder.run_id


def test_durations_read_as_people_say_them():
    assert [format_duration(s) for s in (0.2, 40, 89, 360, 5399, 5400, 18000, 50000)] == [
        "1 s", "40 s", "89 s", "6 min", "90 min", "1.5 h", "5 h", "14 h"]


def test_images_per_epoch_is_the_train_part_less_validation():
    config = dataclasses.replace(TINY_CONFIG, split="80:20", val_fraction=0.15)
    assert images_per_epoch(1000, config) == 680
    assert images_per_epoch(1000, dataclasses.replace(config, split="60:40")) == 510


def test_throughput_comes_from_the_newest_run_of_that_model_and_size(store):
    record_run(store, "resnet18", 96, [10.0, 10.0], train_images=500)  # 100 img/s
    newest = record_run(store, "resnet18", 96, [20.0, 30.0], train_images=500)  # 1000 images in 50 s
    record_run(store, "resnet50", 96, [1.0], train_images=500)
    throughput = measured_throughput(store, "resnet18", 96)
    assert throughput.images_per_second == pytest.approx(20.0)
    assert throughput.source == f"measured in run {newest}" and not throughput.rough
    assert throughput.overhead_seconds == pytest.approx(5.0)
    assert run_throughput({"history": []}) is None


def test_a_run_at_another_size_is_scaled_and_otherwise_a_labelled_default(store):
    source = record_run(store, "densenet121", 64, [10.0], train_images=400)  # 40 img/s at 64 px
    scaled = measured_throughput(store, "densenet121", 128)
    assert scaled.images_per_second == pytest.approx(40 / 2**1.5) and scaled.rough  # twice the side
    assert scaled.source == f"scaled from run {source} at 64 px"
    default = measured_throughput(store, "efficientnet_b0", 112)
    assert default.images_per_second == pytest.approx(ROUGH_RATES_224["efficientnet_b0"] * 2**1.5)
    assert default.rough and "rough default" in default.source
    assert default.overhead_seconds == ROUGH_OVERHEAD_SECONDS


def test_a_grid_of_long_cells_is_estimated_in_hours_and_flagged_long(store):
    record_run(store, "resnet18", 224, [100.0], train_images=1000)  # 10 img/s
    cells = [("resnet18", 224, WorkItem(epochs, 680)) for _split in range(3) for epochs in (25, 50, 75, 100)]
    estimate = estimate_runs(store, cells)
    assert estimate.images == 750 * 680
    assert estimate.seconds == pytest.approx(750 * 680 / 10 + 12 * 5), "each run's fixed 5 s included"
    assert estimate.long and estimate.describe() == "about 14 h" and not estimate.rough
    assert estimate.explain().startswith("at about 10 training images/s (measured in run ")
    short = estimate_runs(store, [("resnet18", 224, WorkItem(1, 680))])
    assert not short.long and short.describe() == "about 73 s"


def test_time_left_covers_the_runs_after_the_current_one():
    assert seconds_left(None) is None
    assert seconds_left(PROGRESS) == 120.0, "a single run: its own estimate"
    step = StepProgress("trial", 1, 3, current=TRIAL, later=(TRIAL, TRIAL))
    # Before any run of the job finished: the current run's pace, 120 s for its remaining 73% of 2000 images,
    # and a rough fixed cost for each later run.
    assert seconds_left(PROGRESS, step) == pytest.approx(120 + 4000 * 120 / (0.73 * 2000) + 2 * ROUGH_OVERHEAD_SECONDS)
    # Once runs finished, their whole wall time per image (model building, final evaluation) is used.
    assert seconds_left(PROGRESS, step, finished_images=1000, finished_seconds=50) == pytest.approx(120 + 4000 * 0.05)


def tune_job(**changes) -> Job:
    job = Job(7, TINY_CONFIG, DataSpec(), state="running", kind="tune", label="Tune study hybrid-ham",
              progress=PROGRESS, step=StepProgress("trial", 3, 10, current=TRIAL, later=(TRIAL,) * 7))
    return dataclasses.replace(job, **changes)


def test_a_study_progress_line_names_the_study_the_trial_and_the_whole_time_left():
    job = tune_job(finished_images=4000, finished_seconds=200)  # 0.05 s per image
    left = 120 + 7 * 2000 * 0.05  # about 14 min
    assert job.progress_text() == ("Tune study hybrid-ham: trial 3 of 10 · epoch 2/5 · batch 14/40 · 85 img/s · "
                                   f"loss 0.500 · about {format_duration(left)} left")
    assert format_duration(left) == "14 min"
    assert job.busy_text() == "Tune study hybrid-ham (trial 3 of 10)"
    # By images: 4000 done + 27% of 2000, out of that plus the rest of this trial and 7 more.
    assert job.fraction_done == pytest.approx(4540 / (4540 + 1460 + 14000))


def test_an_ablation_cell_is_named_and_a_waiting_job_says_it_is_preparing():
    step = StepProgress("cell", 4, 12, name="70:30 x 50 epochs", current=TRIAL)
    job = tune_job(kind="ablation", label="Ablation ablation-grid", step=step, progress=None)
    assert job.progress_text() == ("Ablation ablation-grid: cell 4 of 12 (70:30 x 50 epochs) · "
                                   "preparing data and timing precision ...")
    assert job.fraction_done == 0.0


def test_runs_of_a_batch_say_which_run_they_are():
    job = Job(2, TINY_CONFIG, DataSpec(), state="running", group="Train all five", progress=PROGRESS,
              step=StepProgress("run", 2, 5))
    assert job.title == "ResNet18 run 2 of 5 (Train all five)"
    assert job.progress_text().startswith("ResNet18 run 2 of 5 (Train all five): epoch 2/5 · batch 14/40 · ")
    assert job.progress_text().endswith("about 2 min left"), "a run's own time left, not its batch's"
    assert job.fraction_done == pytest.approx(54 / 200)
    single = dataclasses.replace(job, group="", step=StepProgress("run", 1, 1))
    assert single.progress_text().startswith("ResNet18: epoch 2/5")
    assert dataclasses.replace(single, resume_run="abc").title == "ResNet18 (resume abc)"
