"""Benchmark: the default explanation audit on this machine.

The default is five models (the newest ordinary run of each in --runs-dir), the method the Explain page starts
from for them (HiResCAM on the demo's 96 px runs, Grad-CAM from 128 px), 50 test images at
the runs' own size (96 px on the demo), randomisation in 4 steps, the 5 artefacts, localisation and
deletion/insertion. Goal (issue 12): 3 minutes or less on the 2-core CPU. Results are stored beside the
runs and reused, so the benchmark audits into a scratch copy of the run store each time (nothing is
reused) and prints the time per model and check.

    python bench/audit.py [--runs-dir checkpoints] [--images 50] [--methods hirescam]
"""

from __future__ import annotations

import argparse
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from core.audit.runner import AuditSettings, run_audit  # noqa: E402
from core.cams import default_run_method  # noqa: E402
from core.evaluation.compare import default_comparison_runs  # noqa: E402
from core.runs import RunStore  # noqa: E402


def cpu_name() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown CPU"


def scratch_copy(source: Path, run_ids: list[str], target: Path) -> RunStore:
    """The runs' model, run.json and predictions without any stored audit, and the dataset cache."""
    for run_id in run_ids:
        shutil.copytree(source / run_id, target / run_id, ignore=shutil.ignore_patterns("audit", "resume.pt"))
    if (source / ".cache").is_dir():
        (target / ".cache").symlink_to((source / ".cache").resolve())
    return RunStore(target)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs-dir", default="checkpoints")
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--methods", default=None, help="comma-separated (default: the Explain page's method)")
    args = parser.parse_args()
    source = RunStore(args.runs_dir)
    runs = default_comparison_runs(source.list_runs())
    if not runs:
        print(f"no completed runs in {args.runs_dir}: train the demo first (python -m core train --model all "
              "--data synthetic)", file=sys.stderr)
        return 1
    methods = args.methods.split(",") if args.methods else [default_run_method(runs)]
    settings = AuditSettings(methods=tuple(methods), images=args.images)
    print(f"CPU: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"runs: {', '.join(run['run_id'] for run in runs)} at "
          f"{sorted({run['config']['image_size'] for run in runs})} px")
    with tempfile.TemporaryDirectory() as scratch:
        store = scratch_copy(source.root, [run["run_id"] for run in runs], Path(scratch))
        started = time.perf_counter()
        audit = run_audit(store, runs, settings)
        total = time.perf_counter() - started
    print(f"\n{'model':<18}{'check':<16}{'method':<10}{'images':>7}{'seconds':>9}")
    for record in audit.records:
        print(f"{record['model']:<18}{record['check']:<16}{record['method']:<10}{len(record['images']):>7}"
              f"{record['seconds']:>9.1f}")
    computed = sum(record["seconds"] for record in audit.records)
    print(f"\ndefault audit: {total:.0f} s in all ({computed:.0f} s in the checks, the rest loading data and "
          f"models); goal <= 180 s: {'met' if total <= 180 else 'NOT met'}")
    for note in audit.notes:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
