"""Benchmark: how fast the CLI answers. Wall seconds of `python -m core --help`, `train --help` and `list`
(on a store with one run), each a fresh interpreter, the median of --repeats; and for a tiny `train` the
seconds from starting the process to its first finished batch, and to its end. With --compare DIR the same
figures for another checkout (an older commit, say) in the same run, since only ratios measured together
compare.

    python bench/cli_startup.py [--repeats 5] [--compare ../old-checkout]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Prints the wall clock at the first finished batch: ProgressBar is the CLI's own callback in every version.
FIRST_BATCH = """
import sys, time
import core.cli as cli
original = cli.ProgressBar.on_batch_end
def on_batch_end(self, progress):
    if not getattr(cli, "_first_batch_told", False):
        cli._first_batch_told = True
        print(f"FIRST_BATCH {time.time()}", file=sys.stderr, flush=True)
    original(self, progress)
cli.ProgressBar.on_batch_end = on_batch_end
sys.exit(cli.main(sys.argv[1:]))
"""
TINY_TRAIN = ["train", "--model", "resnet18", "--data", "synthetic", "--synthetic-count", "40",
              "--synthetic-image-size", "32", "--image-size", "32", "--epochs", "1", "--batch-size", "8",
              "--no-pretrained", "--precision", "fp32", "--split", "70:30"]


def seconds(command: list[str], cwd: Path) -> float:
    started = time.perf_counter()
    subprocess.run(command, cwd=cwd, check=True, capture_output=True)
    return time.perf_counter() - started


def one_run_store(folder: Path) -> Path:
    run = {"run_id": "20261208-000000-resnet18-abcd", "model": "resnet18", "status": "completed",
           "created_at": 1.0, "metrics": {"test": {"auc": 0.9, "accuracy": 0.8}},
           "config": {"image_size": 32, "epochs": 1}, "dataset": {"name": "synthetic"}, "weights": "random"}
    (folder / run["run_id"]).mkdir(parents=True)
    (folder / run["run_id"] / "run.json").write_text(json.dumps(run))
    return folder


def first_batch(cwd: Path, runs_dir: Path) -> tuple[float, float]:
    started = time.time()
    finished = subprocess.run([sys.executable, "-c", FIRST_BATCH, *TINY_TRAIN, "--runs-dir", str(runs_dir)],
                              cwd=cwd, check=True, capture_output=True, text=True)
    ended = time.time()
    stamp = next(float(line.split()[1]) for line in finished.stderr.splitlines() if line.startswith("FIRST_BATCH"))
    return stamp - started, ended - started


def measure(cwd: Path, repeats: int) -> dict[str, float]:
    python = [sys.executable, "-m", "core"]
    with tempfile.TemporaryDirectory() as scratch:
        store = one_run_store(Path(scratch) / "listed")
        figures = {
            "--help": statistics.median(seconds([*python, "--help"], cwd) for _ in range(repeats)),
            "train --help": statistics.median(seconds([*python, "train", "--help"], cwd) for _ in range(repeats)),
            "list": statistics.median(seconds([*python, "list", "--runs-dir", str(store)], cwd)
                                      for _ in range(repeats)),
        }
        # The synthetic set is drawn once into the store's cache; the runs after it reuse it, as a user's would.
        first_batch(cwd, Path(scratch) / "warm")
        timings = [first_batch(cwd, Path(scratch) / "warm") for _ in range(max(1, repeats // 2))]
    figures["train: first batch"] = statistics.median(first for first, _ in timings)
    figures["train: whole tiny run"] = statistics.median(whole for _, whole in timings)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compare", type=Path, help="another checkout to measure in the same run")
    args = parser.parse_args()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    print(f"{os.cpu_count()} cores of {cpu}, Python {platform.python_version()}; median of {args.repeats}")
    checkouts = {"this checkout": ROOT} | ({str(args.compare): args.compare.resolve()} if args.compare else {})
    results = {name: measure(path, args.repeats) for name, path in checkouts.items()}
    names = list(results)
    print(f"{'command':<24}" + "".join(f"{name[-28:]:>30}" for name in names))
    for command in results[names[0]]:
        print(f"{command:<24}" + "".join(f"{results[name][command]:>29.2f}s" for name in names))


if __name__ == "__main__":
    main()
