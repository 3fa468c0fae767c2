"""Benchmark: a dataset larger than memory. Writes a synthetic JPEG set (100,000 images of 300 x 225 by
default, like HAM10000 downsized), then measures, each step in its own process so that its peak resident
memory is its own:

- building the decoded image cache (images/s; decoding, resizing and perceptual hashing on every core);
- training throughput of resnet18 with batches read from the cache on disk, against the same split held in
  memory (the engine's batch path: class-balanced order, augmentation, the precision plan);
- peak RSS of each step, and of the disk-backed training at a quarter of the images (memory must not grow
  with the dataset).

    python bench/scale.py [--images 100000] [--size 128] [--steps 150] [--workdir DIR] [--keep]

`--steps 0` trains the whole epoch (68,000 training images: about 50 minutes per variant at the 23 images/s of
2 AMD EPYC cores); the default times 150 batches drawn from the epoch's order over the whole training part,
which reads rows from all over the cache as a full epoch does. The generated files are deleted afterwards unless
`--keep`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = 8  # images per drawn lesion: the eight flips and rotations, each cropped and tinted differently
WIDTH, HEIGHT = 300, 225


def _write_base(job: tuple[Path, int, int]) -> int:
    """Draw one lesion and write its VARIANTS files; returns 1 if malignant."""
    from PIL import Image

    from core.data.synthetic import draw_image, unit_grid

    root, base, seed = job
    rng = np.random.default_rng([seed, base])
    malignant = bool(rng.random() < 0.35)
    image, _ = draw_image(rng, unit_grid(128), malignant, None)
    folder = root / ("malignant" if malignant else "benign")
    for variant in range(VARIANTS):
        view = np.rot90(image, variant % 4)
        view = view[:, ::-1] if variant >= 4 else view
        side = int(128 * rng.uniform(0.75, 1.0))
        top, left = rng.integers(0, 129 - side, size=2)
        crop = view[top: top + side, left: left + side].astype(np.float32) * rng.uniform(0.9, 1.1, 3)
        picture = Image.fromarray(np.clip(crop, 0, 255).astype(np.uint8)).resize((WIDTH, HEIGHT),
                                                                                 Image.Resampling.BILINEAR)
        picture.save(folder / f"img_{base * VARIANTS + variant:07d}.jpg", quality=90)
    return int(malignant)


def generate(root: Path, images: int, seed: int) -> dict:
    for name in ("benign", "malignant"):
        (root / name).mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    bases = -(-images // VARIANTS)
    with Pool(os.cpu_count()) as pool:
        malignant = sum(pool.imap_unordered(_write_base, [(root, base, seed) for base in range(bases)], chunksize=64))
    files = sum(1 for _ in root.rglob("*.jpg"))
    size = sum(path.stat().st_size for path in root.rglob("*.jpg"))
    return {"images": files, "malignant": malignant * VARIANTS, "seconds": time.perf_counter() - started,
            "megabytes": size / 1e6}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def _spec_and_config(args):
    from core.config import DataSpec, TrainConfig

    spec = DataSpec(source=str(args.workdir / "images"), format="imagefolder")
    config = TrainConfig(model="resnet18", image_size=args.size, pretrained=False, max_images=args.max_images,
                         batch_size=args.batch_size, seed=0, device="cpu")
    return spec, config


def phase_cache(args) -> dict:
    """Build the decoded cache (and the hashes, near-duplicate pairs and split) from the files."""
    from core.data.datasets import prepare_data

    spec, config = _spec_and_config(args)
    started = time.perf_counter()
    data = prepare_data(spec, config, args.workdir / "cache")
    seconds = time.perf_counter() - started
    cache = sum(path.stat().st_size for path in (args.workdir / "cache").glob("images-*.npy"))
    return {"images": len(data.table), "seconds": seconds, "images_per_second": len(data.table) / seconds,
            "cache_gigabytes": cache / 1e9, "near_duplicate_pairs": int(len(data.near_duplicates)),
            "peak_rss_mb": _peak_rss_mb()}


def phase_train(args) -> dict:
    """Steps of resnet18 through the engine's batch path, the split on disk or in memory."""
    import torch
    from torch import nn

    from core.data.datasets import prepare_data
    from core.models import build_model
    from core.training.batches import TensorData, prepare_batch, training_order
    from core.training.precision import choose_execution_plan

    spec, config = _spec_and_config(args)
    started = time.perf_counter()
    data = prepare_data(spec, config, args.workdir / "cache")
    train = TensorData.from_prepared(data, "train", torch.device("cpu"), residency=args.residency)
    loaded = time.perf_counter() - started
    torch.manual_seed(0)
    model, _ = build_model("resnet18", pretrained=False)
    plan = choose_execution_plan(model, config, torch.device("cpu"), args.workdir / "cache")
    model.to(memory_format=plan.memory_format).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    generator = torch.Generator().manual_seed(0)
    order = training_order(train.labels, True, generator)
    batches = [order[i: i + config.batch_size] for i in range(0, len(order), config.batch_size)]
    warmup = 5
    batches = batches[: warmup + args.steps] if args.steps else batches
    read_seconds, timed_images, timed_started = 0.0, 0, None
    for number, rows in enumerate(batches):
        if number == warmup:
            timed_started = time.perf_counter()
        read_started = time.perf_counter()
        images = train.batch(rows)
        if number >= warmup:
            read_seconds += time.perf_counter() - read_started
        inputs = prepare_batch(images, plan, True, generator)
        with plan.autocast():
            loss = criterion(model(inputs).float(), train.labels[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if number >= warmup:
            timed_images += len(rows)
    seconds = time.perf_counter() - timed_started
    return {"residency": train.residency, "train_images": len(train), "load_seconds": loaded,
            "timed_images": timed_images, "images_per_second": timed_images / seconds,
            "read_share": read_seconds / seconds, "plan": plan.name, "peak_rss_mb": _peak_rss_mb()}


def run_phase(args, phase: str, **extra) -> dict:
    command = [sys.executable, __file__, "--phase", phase, "--workdir", str(args.workdir), "--size", str(args.size),
               "--steps", str(args.steps), "--batch-size", str(args.batch_size)]
    for key, value in extra.items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def cpu_name() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=150, help="timed batches per variant (0: the whole epoch)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, help="where the images and the cache go (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the generated images and cache")
    parser.add_argument("--phase", choices=("cache", "train"), help=argparse.SUPPRESS)
    parser.add_argument("--residency", choices=("disk", "memory"), help=argparse.SUPPRESS)
    parser.add_argument("--max-images", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(phase_cache(args) if args.phase == "cache" else phase_train(args)))
        return
    import torch

    temporary = args.workdir is None
    args.workdir = Path(args.workdir or tempfile.mkdtemp(prefix="scale-bench-"))
    print(f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}; {args.images:,} images of "
          f"{WIDTH} x {HEIGHT} in {args.workdir}", flush=True)
    try:
        if not (args.workdir / "images").exists():
            made = generate(args.workdir / "images", args.images, args.seed)
            print(f"generated {made['images']:,} JPEGs ({made['malignant']:,} malignant, {made['megabytes']:,.0f} MB) "
                  f"in {made['seconds']:.0f} s", flush=True)
        cache = run_phase(args, "cache")
        print(f"cache: {cache['images']:,} images at {args.size} px in {cache['seconds']:.0f} s = "
              f"{cache['images_per_second']:.0f} images/s, {cache['cache_gigabytes']:.2f} GB on disk, "
              f"{cache['near_duplicate_pairs']:,} near-duplicate pairs; peak RSS {cache['peak_rss_mb']:,.0f} MB",
              flush=True)
        rows = []
        for residency, max_images in (("disk", None), ("memory", None), ("disk", args.images // 4)):
            extra = {"residency": residency, **({"max_images": max_images} if max_images else {})}
            result = run_phase(args, "train", **extra)
            rows.append(result)
            print(f"train resnet18 {args.size} px, {result['residency']:>6}, {result['train_images']:>7,} training "
                  f"images: {result['images_per_second']:6.1f} img/s over {result['timed_images']:,} images "
                  f"(reading batches {result['read_share']:.1%} of the time, plan {result['plan']}), split ready "
                  f"in {result['load_seconds']:.0f} s, peak RSS {result['peak_rss_mb']:,.0f} MB", flush=True)
        disk, memory = rows[0], rows[1]
        print(f"disk / memory throughput: {disk['images_per_second'] / memory['images_per_second']:.2f}; "
              f"peak RSS on disk {disk['peak_rss_mb']:,.0f} MB ({'meets' if disk['peak_rss_mb'] <= 3072 else 'misses'}"
              f" the 3 GB goal); with a quarter of the images {rows[2]['peak_rss_mb']:,.0f} MB")
    finally:
        if temporary and not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
        elif not args.keep:
            for name in ("images", "cache"):
                shutil.rmtree(args.workdir / name, ignore_errors=True)


if __name__ == "__main__":
    main()
