"""Benchmark: training throughput of the engine vs the plain PyTorch pipeline such papers use, and vs timm's
data path (the strongest peer a speed-minded user would pick), with each step's share of the CPU's peak.

Reference pipeline: torchvision ImageFolder over JPEG files, PIL transforms (Resize, RandomHorizontalFlip,
RandomRotation, ColorJitter, ToTensor, Normalize), a DataLoader with 2 workers, fp32, NCHW, AdamW.
timm peer: `timm.data.create_loader` over the same JPEGs (its own training augmentation, uint8 fast collate,
its prefetcher normalising on the device, 2 workers), channels_last, and bf16 autocast where the engine's plan
uses bf16; AdamW. timm is a benchmark-only dependency: `pip install timm` (the column is left out without it).
Engine: images decoded once into the uint8 cache, augmentation on tensors, precision and memory format
chosen per model by timing (bf16 + channels_last where faster). Same JPEGs (real ISIC 2017 images when
../shared/data/isic2017 exists, else synthetic ones written as JPEG), same batch size, same models,
measured in one process, one after the other. Prints images/s and the engine's ratio against both peers per
model and size, the FLOPs of one training step per image (torch.utils.flop_counter), the GFLOP/s the engine
reaches and their share of the CPU's peak for the engine's precision (how the peak is computed: bench/flops.py).

    python bench/throughput.py [--sizes 128 224] [--steps 6] [--images 256] [--device auto|cpu|cuda]

On CUDA both pipelines train on the GPU (the reference's DataLoader still decodes on the CPU).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torchvision import datasets, transforms

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.flops import cpu_peak, training_step_flops  # noqa: E402
from core.config import DataSpec, TrainConfig  # noqa: E402
from core.data.augment import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from core.data.datasets import prepare_data  # noqa: E402
from core.environment import device_name, select_device  # noqa: E402
from core.models import MODEL_REGISTRY, build_model  # noqa: E402
from core.training.batches import TensorData, prepare_batch  # noqa: E402
from core.training.precision import ExecutionPlan, choose_execution_plan  # noqa: E402

ISIC = ROOT.parent / "shared" / "data" / "isic2017"


def make_image_folder(folder: Path, count: int) -> str:
    """Cancer/ and NotCancer/ folders of real ISIC JPEGs (links), or of synthetic JPEGs."""
    for name in ("Cancer", "NotCancer"):
        (folder / name).mkdir(parents=True, exist_ok=True)
    if ISIC.exists():
        labels = pd.read_csv(ISIC / "labels.csv").head(count)
        for image_id, melanoma in zip(labels["image_id"], labels["melanoma"]):
            target = folder / ("Cancer" if melanoma else "NotCancer") / f"{image_id}.jpg"
            target.symlink_to(ISIC / "images" / f"{image_id}.jpg")
        return f"{count} ISIC 2017 JPEGs (256 px)"
    from PIL import Image

    from core.data.synthetic import generate_synthetic

    synthetic = generate_synthetic(count, 256, 0)
    for index, (image, label) in enumerate(zip(synthetic.images, synthetic.labels)):
        Image.fromarray(image).save(folder / ("Cancer" if label else "NotCancer") / f"{index}.jpg", quality=90)
    return f"{count} synthetic JPEGs (256 px)"


def median_step_seconds(step, steps: int) -> float:
    """Median time between the ends of consecutive steps (so waiting for data counts), after 2 warm-up steps."""
    ends = []
    for _ in range(steps + 2):
        step()
        ends.append(time.perf_counter())
    return statistics.median(np.diff(ends[1:]))


def reference_loader(folder: Path, size: int, batch: int, augment: bool) -> torch.utils.data.DataLoader:
    """The plain pipeline's data: ImageFolder, PIL transforms, a DataLoader with 2 workers."""
    steps = [transforms.Resize((size, size))]
    if augment:
        steps += [transforms.RandomHorizontalFlip(), transforms.RandomRotation(20),
                  transforms.ColorJitter(0.2, 0.2, 0.2, 0.03)]
    steps += [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return torch.utils.data.DataLoader(datasets.ImageFolder(str(folder), transforms.Compose(steps)),
                                       batch_size=batch, shuffle=augment, num_workers=2, drop_last=augment)


def endless(loader):
    """A loader's batches, epoch after epoch."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("fewer images than one batch: raise --images or lower --batch-size")


def reference_images_per_second(name: str, folder: Path, size: int, batch: int, steps: int,
                                device: torch.device) -> float:
    loader = reference_loader(folder, size, batch, augment=True)
    model, _ = build_model(name, pretrained=False)
    model.to(device).train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    batches = endless(loader)

    def step() -> None:
        images, labels = next(batches)
        loss = criterion(model(images.to(device)), labels.to(device))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        loss.item()  # waits for a GPU to finish the step, as the engine's step does

    return batch / median_step_seconds(step, steps)


def engine_images_per_second(name: str, data, size: int, batch: int, steps: int, cache_dir: Path,
                             device: torch.device) -> tuple[float, ExecutionPlan]:
    config = TrainConfig(model=name, image_size=size, batch_size=batch, pretrained=False)
    model, _ = build_model(name, pretrained=False)
    plan = choose_execution_plan(model, config, device, cache_dir)
    model.to(device, memory_format=plan.memory_format).train()
    train = TensorData.from_prepared(data, "train", device)
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    generator = torch.Generator().manual_seed(0)

    def step() -> None:
        rows = torch.randint(0, len(train), (batch,), generator=generator)
        inputs = prepare_batch(train.images[rows], plan, True, generator)
        with plan.autocast():
            loss = criterion(model(inputs).float(), train.labels[rows].to(device))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        loss.item()

    return batch / median_step_seconds(step, steps), plan


def timm_images_per_second(name: str, folder: Path, size: int, batch: int, steps: int, device: torch.device,
                           precision: str) -> float:
    """timm's training data path (create_loader with its prefetcher) feeding the same model, channels_last,
    in `precision` (the engine's plan's, so the two differ only in how data arrives)."""
    from timm.data import create_dataset, create_loader

    dataset = create_dataset("", root=str(folder), is_training=True)
    loader = create_loader(dataset, input_size=(3, size, size), batch_size=batch, is_training=True,
                           mean=IMAGENET_MEAN, std=IMAGENET_STD, num_workers=2, device=device,
                           use_prefetcher=True, persistent_workers=True)
    model, _ = build_model(name, pretrained=False)
    model.to(device, memory_format=torch.channels_last).train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    autocast = ExecutionPlan(device, precision).autocast
    batches = endless(loader)

    def step() -> None:
        images, labels = next(batches)
        with autocast():
            loss = criterion(model(images.contiguous(memory_format=torch.channels_last)).float(), labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        loss.item()

    return batch / median_step_seconds(step, steps)


def timm_available() -> bool:
    try:
        import timm.data  # noqa: F401
    except ImportError:
        return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 224])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--models", nargs="+", default=list(MODEL_REGISTRY))
    parser.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto")
    args = parser.parse_args()
    device = select_device(args.device)
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary) / "images"
        source = make_image_folder(folder, args.images)
        print(f"{device_name(device)} ({device.type}), {torch.get_num_threads()} threads, torch {torch.__version__}, "
              f"batch {args.batch_size}, median of {args.steps} steps after 2 warm-up steps, {source}")
        peak = cpu_peak() if device.type == "cpu" else None
        if peak is not None:
            print(f"peak: {peak.describe()}")
        with_timm = timm_available()
        if not with_timm:
            print("timm is not installed (pip install timm): its column is left out")
        print(f"{'model':<16} {'size':>4} {'plain img/s':>11} {'timm img/s':>10} {'engine img/s':>12} {'vs plain':>8} "
              f"{'vs timm':>7}  {'engine plan':<20} {'GFLOP/img':>9} {'GFLOP/s':>8} {'of peak':>7}")
        for size in args.sizes:
            data = prepare_data(DataSpec(source=str(folder), format="imagefolder"),
                                TrainConfig(image_size=size, split="80:20"), Path(temporary) / "cache")
            for name in args.models:
                reference = reference_images_per_second(name, folder, size, args.batch_size, args.steps, device)
                engine, plan = engine_images_per_second(name, data, size, args.batch_size, args.steps,
                                                        Path(temporary) / "cache", device)
                timm = (timm_images_per_second(name, folder, size, args.batch_size, args.steps, device, plan.precision)
                        if with_timm else float("nan"))
                per_image = training_step_flops(build_model(name, pretrained=False)[0], size, 2) / 2 / 1e9
                achieved = per_image * engine
                share = f"{achieved / peak.gflops(plan.precision):>6.1%}" if peak is not None else "     -"
                print(f"{name:<16} {size:>4} {reference:>11.1f} {timm:>10.1f} {engine:>12.1f} "
                      f"{engine / reference:>7.2f}x {engine / timm:>6.2f}x  {plan.name:<20} {per_image:>9.2f} "
                      f"{achieved:>8.1f} {share:>7}",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
