"""Benchmark: `python -m core train --model all --data synthetic` with its defaults, end to end.

Goal (issue 2): all five models in 6 minutes or less on a 2-core CPU, each with test AUC >= 0.90.
Runs in a fresh, temporary run store (so the synthetic set is drawn and precision is timed as on a
first run) and prints one line per model and the total.

    python bench/demo_training.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

GOAL_SECONDS = 360
GOAL_AUC = 0.90


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", help="run store to write into instead of a temporary folder")
    parser.add_argument("extra", nargs="*", help="extra flags for `python -m core train`")
    args = parser.parse_args()
    runs_dir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="demo-bench-"))
    command = [sys.executable, "-m", "core", "train", "--model", "all", "--data", "synthetic",
               "--runs-dir", str(runs_dir), *args.extra]
    started = time.perf_counter()
    finished = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    total = time.perf_counter() - started
    if finished.returncode != 0:
        print(finished.stderr[-3000:])
    print(f"machine: {torch.get_num_threads()} threads, {_cpu()}; torch {torch.__version__}")
    print(f"{'model':<16} {'precision':<20} {'seconds':>8} {'test AUC':>9} {'test acc':>9}")
    ok = True
    for path in sorted(runs_dir.glob("*/run.json"), key=lambda p: json.loads(p.read_text())["created_at"]):
        run = json.loads(path.read_text())
        test = run["metrics"].get("test", {})
        auc = test.get("auc") or float("nan")
        ok &= auc >= GOAL_AUC
        plan = f"{run['environment']['precision']}+{run['environment']['memory_format']}"
        accuracy = test.get("accuracy") or float("nan")
        print(f"{run['model']:<16} {plan:<20} {run['seconds']:>8.1f} {auc:>9.4f} {accuracy:>9.4f}")
    ok &= total <= GOAL_SECONDS
    print(f"total wall time {total:.0f} s (goal <= {GOAL_SECONDS} s, every test AUC >= {GOAL_AUC}): "
          f"{'met' if ok else 'NOT met'}")
    return 0


def _cpu() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
