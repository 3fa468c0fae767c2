"""Choosing precision and memory format per model and device by timing a few training steps.

bfloat16 autocast with channels_last is several times faster for some CNNs on CPUs with AMX or
AVX-512 BF16, and slower for others; the only reliable answer is to measure. The choice is cached
per model, device, image size, batch size and torch version, and recorded in run.json.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from core.config import TrainConfig
from core.environment import device_name
from core.training.callbacks import BatchProgress


@dataclass
class ExecutionPlan:
    device: torch.device
    precision: str = "fp32"  # fp32 or bf16 (autocast)
    channels_last: bool = False
    chosen_by: str = "default"  # default, requested, timed, cache
    step_seconds: dict[str, float] = field(default_factory=dict)
    # Evaluation runs a copy with each conv's BatchNorm folded into it (`core.models.fold_batch_norms`):
    # the same probabilities within float rounding, 1.1-1.3x faster on a CPU.
    fold_batch_norms: bool = True

    @property
    def name(self) -> str:
        return self.precision + ("+channels_last" if self.channels_last else "")

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def describe(self) -> dict:
        return {"precision": self.precision, "memory_format": "channels_last" if self.channels_last else "nchw",
                "precision_chosen_by": self.chosen_by, "step_seconds": self.step_seconds,
                "evaluation_conv_bn_folded": self.fold_batch_norms}


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def candidate_plans(device: torch.device) -> list[ExecutionPlan]:
    # channels_last fp32 was never slower than NCHW fp32 on CPU or CUDA in our timings, so NCHW is
    # only timed where channels_last is not supported well (MPS).
    if device.type not in ("cpu", "cuda"):
        return [ExecutionPlan(device, "fp32", False)]
    plans = [ExecutionPlan(device, "fp32", True)]
    if bf16_supported(device):
        plans.append(ExecutionPlan(device, "bf16", True))
    return plans


def time_training_step(model: nn.Module, plan: ExecutionPlan, batch_size: int, image_size: int,
                       repeats: int = 2) -> float:
    """Median seconds of a forward and backward pass on random images (after one warm-up)."""
    model = model.to(plan.device, memory_format=plan.memory_format).train()
    inputs = torch.randn(batch_size, 3, image_size, image_size, device=plan.device)
    inputs = inputs.contiguous(memory_format=plan.memory_format)
    targets = torch.randint(0, 2, (batch_size,), device=plan.device)
    times = []
    for _ in range(repeats + 1):
        # CUDA runs asynchronously: without waiting, the clock would time the kernel launches only.
        _wait_for(plan.device)
        started = time.perf_counter()
        with plan.autocast():
            loss = nn.functional.cross_entropy(model(inputs).float(), targets)
        loss.backward()
        model.zero_grad(set_to_none=True)
        _wait_for(plan.device)
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def _wait_for(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def choose_execution_plan(model: nn.Module, config: TrainConfig, device: torch.device,
                          cache_dir: Path | str | None = None) -> ExecutionPlan:
    """The fastest plan for this model, unless config.precision forces one."""
    if config.precision == "fp32":
        return ExecutionPlan(device, "fp32", False, "requested")
    if config.precision == "bf16":
        if not bf16_supported(device):
            raise ValueError(f"bfloat16 was requested but {device_name(device)} does not support it")
        return ExecutionPlan(device, "bf16", True, "requested")
    candidates = candidate_plans(device)
    if device.type not in ("cpu", "cuda"):
        return candidates[0]  # MPS: one plan, and time_training_step only waits for CUDA to finish
    key = "|".join(map(str, (config.model, device_name(device), config.image_size, config.batch_size,
                             torch.__version__, torch.get_num_threads())))
    cached = _read_cache(cache_dir).get(key)
    if cached:
        return ExecutionPlan(device, cached["precision"], cached["channels_last"], "cache", cached["step_seconds"])
    # A copy is timed, so the real model's batch-norm statistics and gradients stay untouched; and on forked
    # random streams, so its random images and dropout masks leave the run's own draws as a cached plan does.
    trial_model = copy.deepcopy(model)
    timings = {}
    gpus = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=gpus):
        for plan in candidates:
            timings[plan.name] = round(time_training_step(trial_model, plan, config.batch_size, config.image_size), 4)
    best = min(candidates, key=lambda plan: timings[plan.name])
    # A lone candidate is timed too: its step time is what the live speed is compared with
    # (contention_warning), on CPUs without bfloat16 as well.
    best.chosen_by, best.step_seconds = "timed" if len(candidates) > 1 else "default", timings
    _write_cache(cache_dir, key, {"precision": best.precision, "channels_last": best.channels_last,
                                  "step_seconds": timings})
    return best


def _cache_path(cache_dir) -> Path | None:
    return Path(cache_dir) / "execution-plans.json" if cache_dir else None


def _read_cache(cache_dir) -> dict:
    path = _cache_path(cache_dir)
    try:
        return json.loads(path.read_text()) if path and path.exists() else {}
    except (OSError, ValueError):
        return {}


def _write_cache(cache_dir, key: str, value: dict) -> None:
    path = _cache_path(cache_dir)
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = _read_cache(cache_dir)
        entries[key] = value
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(entries, indent=1))
        os.replace(temporary, path)
    except OSError:
        pass  # not caching only costs the timing again next time


# Below this share of the timed speed, training is slowed by something outside it. Without contention
# the live figure stays well above it: the data path takes under a tenth of a step (docs/PERFORMANCE.md),
# while a competing process was measured to cut a Hybrid epoch from 7-8 s to 36-81 s.
SLOW_SHARE = 0.5
# The first batches of a run include warm-up (allocations, oneDNN kernels), so they are not judged.
WARM_UP_BATCHES = 3


def timed_images_per_second(run: dict) -> float | None:
    """The training speed measured while choosing the run's execution plan (the chosen plan's step
    time in run.json), in images per second; None when the plan was not timed (a requested precision,
    or a device with one candidate)."""
    environment = run.get("environment") or {}
    plan = environment.get("precision", "") + ("+channels_last" if environment.get("memory_format")
                                               == "channels_last" else "")
    seconds = (environment.get("step_seconds") or {}).get(plan)
    batch_size = (run.get("config") or {}).get("batch_size")
    return batch_size / seconds if seconds and batch_size else None


def cpu_load() -> tuple[float | None, int]:
    """The one-minute load average (None where the OS has none) and the cores this process may use."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return load, cores


def contention_warning(live: float, timed: float | None, device: str = "cpu", load: float | None = None,
                       cores: int | None = None, timed_when: str = "at start") -> str | None:
    """A sentence when live training runs at under SLOW_SHARE of the speed timed at its start, else None."""
    if not timed or live >= SLOW_SHARE * timed:
        return None
    where = "the CPU" if device == "cpu" else f"the {device.upper()} or the CPU"
    busy = f" (load average {load:.1f} on {cores} cores)" if load is not None and cores else ""
    return (f"Training runs at {live:.0f} img/s, {live / timed:.0%} of the {timed:.0f} img/s timed {timed_when}: "
            f"another process may be using {where}{busy}.")


def live_contention_warning(progress: BatchProgress | None, run: dict) -> str | None:
    """contention_warning for a running job's latest BatchProgress and its run.json, past the warm-up."""
    if progress is None or (progress.epoch == 1 and progress.batch < WARM_UP_BATCHES):
        return None
    load, cores = cpu_load()
    environment = run.get("environment") or {}
    # A cached plan was timed by an earlier run with the same model, device, image and batch size.
    when = "for this setup earlier" if environment.get("precision_chosen_by") == "cache" else "at start"
    return contention_warning(progress.images_per_second, timed_images_per_second(run),
                              environment.get("device", "cpu"), load, cores, when)
