"""Benchmark: the data path. Building the decoded uint8 cache once vs decoding JPEGs with PIL every
epoch, and the share of each training step spent waiting for data (engine vs the plain DataLoader).

    python bench/datapath.py [--images 512] [--size 224] [--model resnet18]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.throughput import make_image_folder, reference_loader  # noqa: E402
from core.config import DataSpec, TrainConfig  # noqa: E402
from core.data.datasets import prepare_data  # noqa: E402
from core.environment import select_device  # noqa: E402
from core.models import build_model  # noqa: E402
from core.training.batches import TensorData, prepare_batch  # noqa: E402
from core.training.precision import choose_execution_plan  # noqa: E402


def pil_epoch_seconds(folder: Path, size: int) -> float:
    """One pass of what the plain pipeline does every epoch: open, decode and resize every JPEG."""
    started = time.perf_counter()
    for path in sorted(folder.rglob("*.jpg")):
        with Image.open(path) as image:
            image.convert("RGB").resize((size, size))
    return time.perf_counter() - started


def reference_wait_share(folder: Path, size: int, model_name: str, batch: int, steps: int) -> float:
    loader = reference_loader(folder, size, batch, augment=True)
    model, _ = build_model(model_name, pretrained=False)
    optimiser = torch.optim.AdamW(model.parameters())
    waits, totals = [], []
    batches = iter(loader)
    for step in range(steps + 2):
        started = time.perf_counter()
        try:
            images, labels = next(batches)
        except StopIteration:  # a small folder runs out of batches: start the next epoch
            batches = iter(loader)
            images, labels = next(batches)
        waited = time.perf_counter() - started
        nn.functional.cross_entropy(model(images), labels).backward()
        optimiser.step()
        optimiser.zero_grad()
        if step >= 2:
            waits.append(waited)
            totals.append(time.perf_counter() - started)
    return sum(waits) / sum(totals)


def engine_wait_share(data, size: int, model_name: str, batch: int, steps: int, cache_dir: Path) -> float:
    """Time spent getting a batch ready (gather from the cache, augment, normalise) over the step."""
    config = TrainConfig(model=model_name, image_size=size, batch_size=batch, pretrained=False)
    model, _ = build_model(model_name, pretrained=False)
    plan = choose_execution_plan(model, config, select_device("auto"), cache_dir)
    model.to(plan.device, memory_format=plan.memory_format).train()
    train = TensorData.from_prepared(data, "train", plan.device)
    optimiser = torch.optim.AdamW(model.parameters())
    generator = torch.Generator().manual_seed(0)
    waits, totals = [], []
    for step in range(steps + 2):
        started = time.perf_counter()
        rows = torch.randint(0, len(train), (batch,), generator=generator)
        inputs = prepare_batch(train.images[rows], plan, True, generator)
        waited = time.perf_counter() - started
        with plan.autocast():
            loss = nn.functional.cross_entropy(model(inputs).float(), train.labels[rows].to(plan.device))
        loss.backward()
        optimiser.step()
        optimiser.zero_grad()
        loss.item()
        if step >= 2:
            waits.append(waited)
            totals.append(time.perf_counter() - started)
    return sum(waits) / sum(totals)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--model", default="resnet18", help="the cheapest model shows the data path at its worst")
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary) / "images"
        source = make_image_folder(folder, args.images)
        print(f"{torch.get_num_threads()} threads, {source}, {args.size} px, model {args.model}, batch 32")
        started = time.perf_counter()
        data = prepare_data(DataSpec(source=str(folder), format="imagefolder"),
                            TrainConfig(image_size=args.size), Path(temporary) / "cache")
        build = time.perf_counter() - started
        started = time.perf_counter()
        prepare_data(DataSpec(source=str(folder), format="imagefolder"), TrainConfig(image_size=args.size),
                     Path(temporary) / "cache")
        cached = time.perf_counter() - started
        epochs = [pil_epoch_seconds(folder, args.size) for _ in range(3)]
        print(f"decoded cache: built once in {build:.2f} s, loaded again in {cached:.2f} s; "
              f"PIL decoding every epoch: {statistics.median(epochs):.2f} s per epoch "
              f"(the cache pays for itself after {build / statistics.median(epochs):.1f} epochs)")
        reference = reference_wait_share(folder, args.size, args.model, 32, args.steps)
        engine = engine_wait_share(data, args.size, args.model, 32, args.steps, Path(temporary) / "cache")
        print(f"share of each training step spent waiting for data: reference {reference:.0%}, engine {engine:.0%} "
              "(goal: under 10%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
