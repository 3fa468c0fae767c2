"""Benchmark: peak memory (max RSS) of training and of Grad-CAM per model, engine vs the plain fp32
pipeline, each measurement in a fresh process. Training: 3 steps at batch 32; Grad-CAM: one image.

    python bench/memory.py [--size 224]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def measure(kind: str, model_name: str, size: int) -> float:
    import torch
    from torch import nn

    from core.models import build_model
    from core.training.precision import ExecutionPlan, bf16_supported

    model, _ = build_model(model_name, pretrained=False)
    images = torch.randn(32 if kind.startswith("train") else 1, 3, size, size)
    if kind == "train-reference":
        optimiser = torch.optim.AdamW(model.parameters())
        for _ in range(3):
            nn.functional.cross_entropy(model(images), torch.zeros(32, dtype=torch.long)).backward()
            optimiser.step()
            optimiser.zero_grad()
    elif kind == "train-engine":
        # The plan the engine picks for this model on this CPU (see bench/throughput.py): bf16 +
        # channels_last where supported, except EfficientNetB0 which stays fp32 + channels_last.
        device = torch.device("cpu")
        precision = "bf16" if bf16_supported(device) and model_name != "efficientnet_b0" else "fp32"
        plan = ExecutionPlan(device, precision, True)
        model.to(memory_format=plan.memory_format)
        optimiser = torch.optim.AdamW(model.parameters())
        inputs = images.contiguous(memory_format=plan.memory_format)
        for _ in range(3):
            with plan.autocast():
                loss = nn.functional.cross_entropy(model(inputs).float(), torch.zeros(32, dtype=torch.long))
            loss.backward()
            optimiser.step()
            optimiser.zero_grad()
    elif kind == "cam-reference":
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        from core.models import get_model_spec

        with GradCAM(model=model, target_layers=[get_model_spec(model_name).target_layer(model)]) as cam:
            cam(input_tensor=images, targets=[ClassifierOutputTarget(1)])
    else:
        from core.cams import CamExplainer

        CamExplainer(model, model_name).explain(images)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--child", nargs=2, metavar=("KIND", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], args.child[1], args.size)))
        return 0
    from core.models import MODEL_REGISTRY

    kinds = ("train-reference", "train-engine", "cam-reference", "cam-engine")
    print(f"peak memory (max RSS, MiB) at {args.size} px, one process per cell")
    print(f"{'model':<16} " + " ".join(f"{kind:>16}" for kind in kinds))
    for name in MODEL_REGISTRY:
        peaks = []
        for kind in kinds:
            finished = subprocess.run([sys.executable, __file__, "--size", str(args.size), "--child", kind, name],
                                      capture_output=True, text=True)
            peaks.append(float(finished.stdout.strip().splitlines()[-1]))
        print(f"{name:<16} " + " ".join(f"{peak:>16.0f}" for peak in peaks), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
