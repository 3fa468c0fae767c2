"""Benchmark: the near-duplicate check on a real dataset. Decoding with and without hashing into a fresh
cache (cold), loading it again with its stored hashes (warm), the all-pairs search alone, and the search
at HAM10000's size (10,015 images). Prints the pairs found and the machine.

    python bench/duplicates.py [--data ../shared/data/isic2017] [--size 224]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from core.config import DataSpec, TrainConfig  # noqa: E402
from core.data.datasets import prepare_data, read_table  # noqa: E402
from core.data.duplicates import DEFAULT_THRESHOLD, HASH_BITS, HASH_IMAGE_SIZE, find_near_duplicates  # noqa: E402
from core.data.images import decode_image, hash_file  # noqa: E402

HAM10000_IMAGES = 10_015


def cpu_name() -> str:
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return "unknown CPU"


def timed(function, *args, **kwargs):
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - started


def pooled_seconds(function, paths: list[str]) -> float:
    """`function` over every path in the image cache's thread pool."""
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(function, paths))
    return time.perf_counter() - started


def ham10000_sized_hashes(hashes: np.ndarray, seed: int = 0) -> np.ndarray:
    """The dataset's hashes repeated up to 10,015 images, each repeat with the same 24 random bits of all its
    views flipped: as far from its source as two different lesions, with views as close to the whole image as
    a photo's are."""
    rng = np.random.default_rng(seed)
    rows = np.resize(np.arange(len(hashes)), HAM10000_IMAGES)
    repeated = hashes[rows].copy()
    for row in range(len(hashes), HAM10000_IMAGES):
        flips = np.zeros(hashes.shape[2] * 64, dtype=np.uint8)
        flips[rng.choice(len(flips), 24, replace=False)] = 1
        repeated[row] ^= np.packbits(flips).view(np.uint64)
    return repeated


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "isic2017"))
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    spec, config = DataSpec(source=args.data), TrainConfig(image_size=args.size)
    _, table, _ = read_table(spec)
    print(f"{cpu_name()}, {os.cpu_count()} cores; {len(table)} images of {args.data} at {args.size} px")
    with tempfile.TemporaryDirectory() as temporary:
        cache = Path(temporary) / "cache"
        paths = table["path"].tolist()
        decode_only = pooled_seconds(lambda path: decode_image(path, args.size), paths)
        hashing = pooled_seconds(hash_file, paths)
        data, cold = timed(prepare_data, spec, config, cache)
        _, warm = timed(prepare_data, spec, config, cache)
        _, other_size = timed(prepare_data, spec, TrainConfig(image_size=args.size // 2), cache)
        pairs, search = timed(find_near_duplicates, data.hashes)
        print(f"cold (decode + hash, into a fresh cache): {cold:.1f} s; decoding alone {decode_only:.1f} s, hashing "
              f"alone (decoding at {HASH_IMAGE_SIZE} px included) {hashing:.1f} s "
              f"({hashing / len(paths) * 1000:.1f} ms per image)")
        print(f"warm (cached images and hashes, split included): {warm:.2f} s; the all-pairs search {search:.2f} s")
        print(f"another image size ({args.size // 2} px, a fresh image cache, the stored hashes): {other_size:.1f} s")
        _, large_search = timed(find_near_duplicates, ham10000_sized_hashes(data.hashes))
        noise = np.random.default_rng(1).integers(0, 2**63, (HAM10000_IMAGES, *data.hashes.shape[1:]), dtype=np.uint64)
        _, noise_search = timed(find_near_duplicates, noise)
        print(f"search at HAM10000's size ({HAM10000_IMAGES:,} images): {large_search:.1f} s; {noise_search:.1f} s for "
              "random hashes (noise-like images, whose crops share nothing with the whole: the worst case)")
        table = data.near_duplicate_pairs()
        print(f"{len(pairs)} near-duplicate pairs (<= {DEFAULT_THRESHOLD} of {HASH_BITS} bits), "
              f"{int(table['conflicting_labels'].sum())} with conflicting labels, "
              f"{int(table['crosses_splits'].sum())} across the grouped split (the dataset's own split)")
        ungrouped = prepare_data(spec, TrainConfig(image_size=args.size, group_near_duplicates=False), cache)
        print(f"without grouping, {int(ungrouped.near_duplicate_pairs()['crosses_splits'].sum())} pairs cross "
              f"the split (seed {config.seed}, {config.split})")
        print(table.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
