"""Benchmark: Grad-CAM latency per model and for the five-model row at 224 x 224 on this machine.

Goals (issue 5): the five maps in <= 0.5 s in total with the models loaded, and no model slower than
1.5x its own forward plus backward pass. Compared with the grad-cam package used naively (a new CAM
object per call, parameters requiring gradients). Prints medians of --repeats calls.

    python bench/gradcam.py [--size 224] [--repeats 7] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from core.cams import CamExplainer  # noqa: E402
from core.environment import device_name, select_device  # noqa: E402
from core.models import MODEL_REGISTRY, build_model, get_model_spec  # noqa: E402


def median_seconds(call, repeats: int) -> float:
    call()  # warm-up
    times = []
    for _ in range(repeats):
        _wait_for_gpu()
        started = time.perf_counter()
        call()
        _wait_for_gpu()  # CUDA runs asynchronously: the time is the work's, not the launches'
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _wait_for_gpu() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def time_model(name: str, image: torch.Tensor, repeats: int) -> tuple[float, float, float]:
    """(ours, naive grad-cam, plain forward+backward) median seconds for one model."""
    model, _ = build_model(name, pretrained=False)
    model.to(image.device).eval()
    explainer = CamExplainer(model, name)
    ours = median_seconds(lambda: explainer.explain(image, "gradcam"), repeats)
    layer = get_model_spec(name).target_layer(model)

    def naive():
        with GradCAM(model=model, target_layers=[layer]) as cam:
            cam(input_tensor=image, targets=[ClassifierOutputTarget(1)])

    def forward_backward():
        model.zero_grad()
        model(image)[0, 1].backward()

    return ours, median_seconds(naive, repeats), median_seconds(forward_backward, repeats)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()
    device = select_device(args.device)
    torch.manual_seed(0)
    image = torch.randn(1, 3, args.size, args.size).to(device)
    print(f"{device_name(device)} ({device.type}), {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{args.size} px, median of {args.repeats}")
    print(f"{'model':<16} {'ours ms':>8} {'naive ms':>9} {'fwd+bwd ms':>11} {'ours/fwd+bwd':>13} {'speed-up':>9}")
    total_ours = total_naive = 0.0
    worst_ratio = 0.0
    for name in MODEL_REGISTRY:
        ours, naive_seconds, reference = time_model(name, image, args.repeats)
        total_ours, total_naive = total_ours + ours, total_naive + naive_seconds
        worst_ratio = max(worst_ratio, ours / reference)
        print(f"{name:<16} {ours * 1000:>8.0f} {naive_seconds * 1000:>9.0f} {reference * 1000:>11.0f} "
              f"{ours / reference:>13.2f} {naive_seconds / ours:>8.1f}x")
    print(f"five-model row: ours {total_ours:.3f} s, naive {total_naive:.3f} s "
          f"(goal <= 0.5 s: {'met' if total_ours <= 0.5 else 'NOT met'}; "
          f"worst model {worst_ratio:.2f}x its forward+backward, goal <= 1.5x: "
          f"{'met' if worst_ratio <= 1.5 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
