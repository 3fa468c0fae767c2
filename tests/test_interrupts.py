"""Killed processes: SIGKILL during training and in the middle of a checkpoint write leaves the run
store consistent, and the run resumes from its last finished epoch. SIGTERM stops a run cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from core.cli import main
from core.runs import RESUME_FILE, RunStore

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 6
TRAIN_ARGS = ["--model", "resnet18", "--data", "synthetic", "--synthetic-count", "120", "--synthetic-image-size",
              "48", "--image-size", "48", "--epochs", str(EPOCHS), "--batch-size", "8", "--no-pretrained",
              "--precision", "fp32", "--split", "70:30", "--val-fraction", "0.25"]


def start_training(runs: Path, prelude: str = "") -> subprocess.Popen:
    """`python -m core train` in a child process, optionally after `prelude` (a patch)."""
    code = f"{textwrap.dedent(prelude)}\nimport sys\nfrom core.cli import main\nsys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", code, "train", *TRAIN_ARGS, "--runs-dir", str(runs)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_epochs(runs: Path, epochs: int, process: subprocess.Popen, timeout: float = 240) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        for run_json in runs.glob("*/run.json"):
            try:
                if len(json.loads(run_json.read_text())["history"]) >= epochs:
                    return run_json.parent
            except (OSError, ValueError):
                pass  # never happens with atomic writes; tolerated so that the assertion below says it
        time.sleep(0.02)
    raise AssertionError(f"no run reached epoch {epochs} in {timeout} s")


def assert_consistent(store: RunStore) -> dict:
    """One run, listed as failed and resumable, every file under its real name complete."""
    runs = store.list_runs()
    assert len(runs) == 1
    run = runs[0]
    assert run["status"] == "failed" and run["resumable"], run
    assert "ended without finishing" in run["error"]
    folder = store.root / run["run_id"]
    assert not list(folder.glob(".*.tmp")), "the killed process's partial writes are cleaned up"
    assert not (folder / "predictions.csv").exists()
    torch.load(folder / "model.pt", weights_only=True)
    state = torch.load(folder / RESUME_FILE, weights_only=True)
    assert 1 <= state["epoch"] < EPOCHS
    return run


def resume_and_check(store: RunStore, run: dict) -> None:
    assert main(["resume", run["run_id"], "--runs-dir", str(store.root)]) == 0
    resumed = store.load(run["run_id"])
    assert resumed["status"] == "completed" and not resumed["resumable"]
    assert [entry["epoch"] for entry in resumed["history"]] == list(range(1, EPOCHS + 1))
    assert resumed["metrics"]["test"]["auc"] is not None
    assert (store.root / run["run_id"] / "predictions.csv").exists()
    assert not (store.root / run["run_id"] / RESUME_FILE).exists()


def test_sigkill_during_training_then_resume(tmp_path):
    runs = tmp_path / "runs"
    process = start_training(runs)
    wait_for_epochs(runs, 2, process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    store = RunStore(runs)
    run = assert_consistent(store)
    resume_and_check(store, run)


@pytest.mark.parametrize("target", ["model.pt", RESUME_FILE, "run.json"])
def test_sigkill_in_the_middle_of_a_checkpoint_write(tmp_path, target):
    """The second epoch's write of `target` dies half-way: the file under its real name is still the
    first epoch's, the half-written temporary is removed, and the run resumes."""
    runs = tmp_path / "runs"
    prelude = f"""
        import os, signal
        import core.runs
        original, writes = core.runs.write_atomically, []

        def dying_write(path, write):
            if path.name == {target!r}:
                writes.append(path)
                if len(writes) == (3 if path.name == "run.json" else 2):  # run.json is also written at the start
                    temporary = path.with_name(f".{{path.name}}.{{os.getpid()}}.dead00.tmp")
                    write(temporary)
                    with open(temporary, "r+b") as handle:
                        handle.truncate(max(1, temporary.stat().st_size // 2))
                    os.kill(os.getpid(), signal.SIGKILL)
            original(path, write)

        core.runs.write_atomically = dying_write
    """
    process = start_training(runs, prelude)
    process.wait(timeout=300)
    assert process.returncode == -signal.SIGKILL, process.communicate()
    folder = next(runs.glob("*-resnet18-*"))
    assert list(folder.glob(".*.tmp")), "the kill left a half-written temporary file"
    store = RunStore(runs)
    run = assert_consistent(store)
    resume_and_check(store, run)


def test_sigterm_stops_the_run_cleanly_and_it_resumes(tmp_path):
    runs = tmp_path / "runs"
    process = start_training(runs)
    wait_for_epochs(runs, 1, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1, stderr  # a run that did not complete
    store = RunStore(runs)
    (run,) = store.list_runs()
    assert run["status"] == "stopped" and run["resumable"], run
    resume_and_check(store, run)
