"""How long training will take: before it starts (from earlier runs' recorded epoch times) and while it
runs (from the throughput measured in the running job).

A job that trains several runs (a tuning study, an ablation) says which of its runs is training and
what is left after it (`StepProgress`), so its time left covers the whole job, not only the current run.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.config import TrainConfig
from core.formatting import format_duration
from core.runs import RunStore
from core.training.callbacks import BatchProgress

# Training images per second at 224 px on the 2-core CPU of docs/PERFORMANCE.md (the engine's figures).
# Only used when no run of the model has been recorded yet, and always labelled as rough.
ROUGH_RATES_224 = {"resnet18": 48.0, "resnet50": 15.5, "densenet121": 15.7, "efficientnet_b0": 14.8,
                   "hybrid_sresnet": 51.5}
REFERENCE_SIZE = 224
# How throughput grows as images shrink: the engine's 128 px vs 224 px figures in docs/PERFORMANCE.md
# give exponents of 1.5 (ResNets, Hybrid) to 2.2 (EfficientNet); fixed costs per batch keep small
# images from gaining the full pixel ratio, so the lower one is used.
SIZE_EXPONENT = 1.5
# Building the model, timing its precision and the final evaluation, when no run has measured them.
ROUGH_OVERHEAD_SECONDS = 15.0
# Work longer than this is announced and must be confirmed before it is queued.
LONG_JOB_SECONDS = 30 * 60


@dataclass(frozen=True)
class WorkItem:
    """One run of a job's plan: `epochs` passes over `images_per_epoch` training images."""

    epochs: int
    images_per_epoch: int

    @property
    def images(self) -> int:
        return self.epochs * self.images_per_epoch


@dataclass(frozen=True)
class StepProgress:
    """Which run of a multi-run job is training ("trial 3 of 10", "cell 4 of 12") and the work after it."""

    noun: str  # trial, cell, run
    number: int  # 1-based
    total: int
    name: str = ""  # what this run is, e.g. the cell "70:30 x 50 epochs"
    current: WorkItem | None = None
    later: tuple[WorkItem, ...] = ()

    def describe(self) -> str:
        return f"{self.noun} {self.number} of {self.total}" + (f" ({self.name})" if self.name else "")

    @property
    def later_images(self) -> int:
        return sum(item.images for item in self.later)


@dataclass(frozen=True)
class Throughput:
    """Training images per second for one model and image size, the fixed cost of each run (model,
    final evaluation) and where the figures come from."""

    images_per_second: float
    source: str  # e.g. "measured in run resnet18-..." or "rough default for a 2-core CPU"
    rough: bool = False
    overhead_seconds: float = ROUGH_OVERHEAD_SECONDS


@dataclass(frozen=True)
class TimeEstimate:
    seconds: float
    images: int  # training images to go through, all epochs of all runs
    overhead_seconds: float  # of `seconds`, the runs' fixed costs
    sources: tuple[str, ...]  # where the rates come from
    rough: bool  # True when any rate is a default or scaled from another image size

    @property
    def long(self) -> bool:
        return self.seconds > LONG_JOB_SECONDS

    def describe(self) -> str:
        return f"about {format_duration(self.seconds)}"

    def explain(self) -> str:
        """The figures behind the estimate: "at about 85 img/s (measured in run ...)"."""
        training = self.seconds - self.overhead_seconds
        rate = self.images / training if training > 0 else 0.0
        shown = f"{rate:.0f}" if rate >= 10 else f"{rate:.2g}"
        return f"at about {shown} training images/s ({'; '.join(self.sources)})"


def images_per_epoch(total_images: int, config: TrainConfig) -> int:
    """Training images one epoch sees: the train part of the split minus the validation share."""
    return max(1, round(total_images * (1 - config.test_fraction) * (1 - config.val_fraction)))


def run_throughput(run: dict) -> float | None:
    """Training images per second of a recorded run: its epochs' wall time (validation included, as it
    will be next time) over the training images those epochs saw. None without usable history."""
    history = run.get("history") or []
    seconds = sum(entry.get("seconds") or 0.0 for entry in history)
    counts = ((run.get("dataset") or {}).get("class_counts") or {}).get("train") or {}
    train_images = sum(counts.values())
    if not history or seconds <= 0 or train_images <= 0:
        return None
    return len(history) * train_images / seconds


def run_overhead(run: dict) -> float | None:
    """Seconds of a finished run outside its epochs (final evaluation, writing files)."""
    history = run.get("history") or []
    if not run.get("seconds") or not history:
        return None
    return max(0.0, run["seconds"] - sum(entry.get("seconds") or 0.0 for entry in history))


def measured_throughput(store: RunStore, model: str, image_size: int) -> Throughput:
    """The newest recorded run of this model at this image size; else one at another size, scaled by
    SIZE_EXPONENT; else a rough default, labelled as such."""
    scaled = None
    for run in store.list_runs():  # newest first
        if run.get("model") != model:
            continue
        rate = run_throughput(run)
        size = (run.get("config") or {}).get("image_size")
        if rate is None or not size:
            continue
        overhead = run_overhead(run)
        overhead = ROUGH_OVERHEAD_SECONDS if overhead is None else overhead
        if size == image_size:
            return Throughput(rate, f"measured in run {run['run_id']}", overhead_seconds=overhead)
        if scaled is None:
            scaled = Throughput(rate * (size / image_size) ** SIZE_EXPONENT,
                                f"scaled from run {run['run_id']} at {size} px", rough=True, overhead_seconds=overhead)
    if scaled is not None:
        return scaled
    rate = ROUGH_RATES_224.get(model, min(ROUGH_RATES_224.values())) * (REFERENCE_SIZE / image_size) ** SIZE_EXPONENT
    return Throughput(rate, "rough default for a 2-core CPU (no run of this model recorded yet)", rough=True)


def estimate_runs(store: RunStore, runs: list[tuple[str, int, WorkItem]]) -> TimeEstimate:
    """Seconds to train each (model, image size, work) one after another, at each model's recorded rate
    plus its runs' fixed cost."""
    seconds, images, overhead, sources, rough = 0.0, 0, 0.0, [], False
    rates: dict[tuple[str, int], Throughput] = {}  # each lookup reads every run.json
    for model, image_size, work in runs:
        if (model, image_size) not in rates:
            rates[model, image_size] = measured_throughput(store, model, image_size)
        throughput = rates[model, image_size]
        seconds += work.images / throughput.images_per_second + throughput.overhead_seconds
        images += work.images
        overhead += throughput.overhead_seconds
        rough = rough or throughput.rough
        if throughput.source not in sources:
            sources.append(throughput.source)
    return TimeEstimate(seconds, images, overhead, tuple(sources), rough)


def seconds_left(progress: BatchProgress | None, step: StepProgress | None = None,
                 finished_images: float = 0.0, finished_seconds: float = 0.0) -> float | None:
    """Time left for a whole job: the current run's own estimate plus the runs after it at the rate this
    job has measured (its finished runs, else the current run so far). None before anything was measured."""
    if progress is None:
        return None
    if step is None or not step.later:
        return progress.eta_seconds
    later = _later_seconds(progress, step, finished_images, finished_seconds)
    return None if later is None else progress.eta_seconds + later


def _later_seconds(progress: BatchProgress, step: StepProgress, finished_images: float,
                   finished_seconds: float) -> float | None:
    if finished_images > 0 and finished_seconds > 0:
        # Whole finished runs, their final evaluation included.
        return step.later_images * finished_seconds / finished_images
    overhead = len(step.later) * ROUGH_OVERHEAD_SECONDS  # the current run cannot tell its own fixed cost yet
    remaining = (1 - progress.fraction_done) * step.current.images if step.current else 0.0
    if remaining >= 1 and progress.eta_seconds > 0:
        # The run's own estimate is elapsed time over batches done, so this ratio includes its validation.
        return step.later_images * progress.eta_seconds / remaining + overhead
    if progress.images_per_second > 0:
        return step.later_images / progress.images_per_second + overhead
    return None
