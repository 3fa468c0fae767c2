"""Benchmark: the speed levers issue 16 names, each measured against the engine's eager step on this machine.

- torch.compile of the model (default mode, and max-autotune-no-cudagraphs), and of the forward pass with
  its loss: the first step (the compile) and the steady step;
- batch size 16, 32 and 64;
- intra-op threads (1 against all), and the training step run on a worker thread after the main thread
  has used OpenMP (how the dashboard trains: libgomp's spin-wait is throttled then);
- conv + BatchNorm folding for evaluation (`core.models.fold_batch_norms`, as the engine's evaluation, CAMs
  and audit use it), with the largest difference in P(malignant) it causes.

Each training figure is images/s, the median of `--steps` steps after 2 warm-up steps, on random uint8
images through the engine's batch preparation in the engine's precision plan for the model and size.

    python bench/levers.py [--models resnet18 efficientnet_b0] [--sizes 96 128] [--steps 6] [--no-compile] [--only-eval]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.flops import cpu_peak  # noqa: E402
from bench.throughput import median_step_seconds  # noqa: E402
from core.config import TrainConfig  # noqa: E402
from core.models import build_model, fold_batch_norms  # noqa: E402
from core.training.batches import prepare_batch  # noqa: E402
from core.training.precision import ExecutionPlan, candidate_plans, choose_execution_plan  # noqa: E402


def timed_steps(step, steps: int) -> tuple[float, float]:
    """(seconds of the first step, median seconds of the `steps` steps after 2 warm-up steps)."""
    started = time.perf_counter()
    step()
    return time.perf_counter() - started, median_step_seconds(step, steps)


def interleaved_medians(first, second, steps: int) -> tuple[float, float]:
    """Median seconds of each of two steps, alternated after one warm-up of each: a drift in the machine's
    speed (a neighbour, the clock) then weighs on both alike, which timing one after the other does not."""
    first(), second()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(steps):
        for step, record in ((first, times[0]), (second, times[1])):
            started = time.perf_counter()
            step()
            record.append(time.perf_counter() - started)
    return statistics.median(times[0]), statistics.median(times[1])


def training_step(name: str, size: int, batch: int, plan: ExecutionPlan, compile_mode: str | None = None,
                  compile_loss: bool = False):
    """One engine-like training step on random images; optionally compiled."""
    model, _ = build_model(name, pretrained=False)
    model.to(plan.device, memory_format=plan.memory_format).train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (256, 3, size, size), dtype=torch.uint8)  # as TensorData holds them

    def forward_loss(inputs, labels):
        with plan.autocast():
            return criterion(model(inputs).float(), labels)

    if compile_mode is not None and compile_loss:
        forward_loss = torch.compile(forward_loss, mode=compile_mode)
    elif compile_mode is not None:
        compiled = torch.compile(model, mode=compile_mode)

        def forward_loss(inputs, labels):  # noqa: F811 (the compiled model in place of the eager one)
            with plan.autocast():
                return criterion(compiled(inputs).float(), labels)

    def step() -> None:
        rows = torch.randint(0, len(images), (batch,), generator=generator)
        inputs = prepare_batch(images[rows], plan, True, generator)
        loss = forward_loss(inputs, torch.randint(0, 2, (batch,), generator=generator))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        loss.item()

    return step


def on_worker_thread(step):
    """The step run on a fresh thread each time, as the job queue's training thread runs it."""
    def threaded() -> None:
        worker = threading.Thread(target=step)
        worker.start()
        worker.join()
    return threaded


def eval_fusion(name: str, size: int, batch: int, steps: int, plan: ExecutionPlan) -> tuple[float, float, float, int]:
    """(eager img/s, conv+BN folded img/s, largest |P(malignant) difference|, pairs folded) for evaluation in
    the plan's precision and memory format, folded by the engine's own `fold_batch_norms`."""
    model, _ = build_model(name, pretrained=False)
    model.eval()
    # Random BatchNorm statistics, so that folding them is not a no-op on a fresh model.
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
    folded = copy.deepcopy(model)
    pairs = fold_batch_norms(folded)
    model.to(plan.device, memory_format=plan.memory_format)
    folded.to(plan.device, memory_format=plan.memory_format)
    inputs = torch.randn(batch, 3, size, size, generator=generator).to(plan.device,
                                                                         memory_format=plan.memory_format)

    def probabilities(network):
        with plan.autocast():
            return torch.softmax(network(inputs).float(), 1)[:, 1]

    with torch.inference_mode():
        eager_seconds, folded_seconds = interleaved_medians(lambda: probabilities(model),
                                                            lambda: probabilities(folded), steps)
        difference = (probabilities(model) - probabilities(folded)).abs().max()
    return batch / eager_seconds, batch / folded_seconds, float(difference), pairs


def lever_cases(name: str, size: int, plan: ExecutionPlan, threads: int, with_compile: bool):
    """(lever, training step, batch) in the order measured; the first is the engine's eager step."""
    yield f"eager, {plan.name}, batch 32", training_step(name, size, 32, plan), 32
    for batch in (16, 64):
        yield f"eager, batch {batch}", training_step(name, size, batch, plan), batch
    torch.set_num_threads(1)
    yield "eager, 1 thread", training_step(name, size, 32, plan), 32
    torch.set_num_threads(threads)
    yield "eager, on a worker thread", on_worker_thread(training_step(name, size, 32, plan)), 32
    if with_compile:
        for mode in ("default", "max-autotune-no-cudagraphs"):
            yield f"compile(model), {mode}", training_step(name, size, 32, plan, mode), 32
        yield "compile(forward + loss), default", training_step(name, size, 32, plan, "default", True), 32
        torch._dynamo.reset()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet18", "efficientnet_b0"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[96, 128])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--no-compile", action="store_true", help="leave out torch.compile (minutes per case)")
    parser.add_argument("--only-eval", action="store_true", help="only the evaluation lever (conv+BN folding)")
    args = parser.parse_args()
    device = torch.device("cpu")
    threads = torch.get_num_threads()
    peak = cpu_peak()
    print(f"{peak.describe() if peak else 'CPU peak unknown'}; torch {torch.__version__}, {threads} threads, "
          f"median of {args.steps} steps")
    print(f"{'model':<16} {'size':>4} {'lever':<44} {'first step s':>12} {'img/s':>7} {'vs eager':>8}")
    with tempfile.TemporaryDirectory() as cache:
        for name in args.models:
            for size in args.sizes:
                config = TrainConfig(model=name, image_size=size, batch_size=32, pretrained=False)
                plan = (candidate_plans(device)[-1] if args.only_eval else  # the plan itself is not timed then
                        choose_execution_plan(build_model(name, pretrained=False)[0], config, device, Path(cache)))
                eager = None
                cases = [] if args.only_eval else lever_cases(name, size, plan, threads, not args.no_compile)
                for lever, step, batch in cases:
                    first, seconds = timed_steps(step, args.steps)
                    rate = batch / seconds
                    eager = eager or rate
                    print(f"{name:<16} {size:>4} {lever:<44} {first:>12.1f} {rate:>7.1f} {rate / eager:>7.2f}x",
                          flush=True)
                # Evaluation runs in the training plan's precision, and the CAMs and the audit in fp32 NCHW.
                for eval_plan in {plan.name: plan, "fp32": ExecutionPlan(device)}.values():
                    eager_rate, folded_rate, difference, pairs = eval_fusion(name, size, 64, args.steps, eval_plan)
                    lever = f"eval {eval_plan.name}: conv+BN folded"
                    print(f"{name:<16} {size:>4} {lever:<44} {'':>12} {folded_rate:>7.1f} "
                          f"{folded_rate / eager_rate:>7.2f}x  (eager {eager_rate:.1f} img/s; {pairs} pairs; "
                          f"largest P difference {difference:.1e})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
