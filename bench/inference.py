"""Benchmark: inference over a test set for the five models, engine vs the plain pipeline, with the peak
memory (max RSS) of each, every measurement in a fresh process so the peaks do not mix.

The engine predicts from the decoded cache with its chosen precision; the plain pipeline decodes the
JPEGs with PIL through a DataLoader and runs fp32 NCHW under torch.no_grad.

    python bench/inference.py [--images 256] [--size 224]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def measure(pipeline: str, model_name: str, folder: str, size: int, cache_dir: str) -> dict:
    from bench.throughput import reference_loader
    from core.config import DataSpec, TrainConfig
    from core.data.datasets import prepare_data
    from core.environment import select_device
    from core.models import build_model
    from core.training.batches import TensorData
    from core.training.loop import evaluate
    from core.training.precision import choose_execution_plan

    model, _ = build_model(model_name, pretrained=False)
    model.eval()
    if pipeline == "engine":
        data = prepare_data(DataSpec(source=folder, format="imagefolder"), TrainConfig(image_size=size), cache_dir)
        config = TrainConfig(model=model_name, image_size=size, batch_size=32, pretrained=False)
        plan = choose_execution_plan(model, config, select_device("auto"), cache_dir)
        model.to(plan.device, memory_format=plan.memory_format)
        # Every image counts as a test image here, as in the reference.
        data.table["split"] = "test"
        test = TensorData.from_prepared(data, "test", plan.device)
        started = time.perf_counter()
        evaluate(model, test, plan, 64)
        seconds, count = time.perf_counter() - started, len(test)
    else:
        loader = reference_loader(Path(folder), size, 64, augment=False)
        started, count = time.perf_counter(), 0
        with torch.no_grad():
            for images, _ in loader:
                torch.softmax(model(images), 1)
                count += len(images)
        seconds = time.perf_counter() - started
    return {"images_per_second": count / seconds, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--child", nargs=4, metavar=("PIPELINE", "MODEL", "FOLDER", "CACHE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        pipeline, model_name, folder, cache_dir = args.child
        print(json.dumps(measure(pipeline, model_name, folder, args.size, cache_dir)))
        return 0
    from bench.throughput import make_image_folder
    from core.models import MODEL_REGISTRY

    with tempfile.TemporaryDirectory() as temporary:
        folder, cache_dir = Path(temporary) / "images", Path(temporary) / "cache"
        source = make_image_folder(folder, args.images)
        print(f"{torch.get_num_threads()} threads, {source}, {args.size} px, batch 64, one process per cell")
        print(f"{'model':<16} {'reference img/s':>16} {'engine img/s':>13} {'ratio':>6} {'reference MiB':>14} "
              f"{'engine MiB':>11}")
        for name in MODEL_REGISTRY:
            results = {}
            for pipeline in ("reference", "engine"):
                finished = subprocess.run([sys.executable, __file__, "--size", str(args.size), "--child", pipeline,
                                           name, str(folder), str(cache_dir)], capture_output=True, text=True)
                results[pipeline] = json.loads(finished.stdout.strip().splitlines()[-1])
            reference, engine = results["reference"], results["engine"]
            print(f"{name:<16} {reference['images_per_second']:>16.1f} {engine['images_per_second']:>13.1f} "
                  f"{engine['images_per_second'] / reference['images_per_second']:>5.1f}x "
                  f"{reference['peak_mib']:>14.0f} {engine['peak_mib']:>11.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
