"""A read-only or full checkpoints folder, for real: a tmpfs mounted read-only, or too small for the next
checkpoint. The answer is a clear error; the runs already stored stay complete and listed. Needs root to
mount (CI runs as root); test_runs.py covers the read-only case through permissions for other users."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import subprocess

import pytest

from core.cli import main
from core.data.datasets import prepare_data
from core.runs import RunStore
from core.training.loop import run_training
from tests.conftest import TINY_CONFIG, TINY_SYNTHETIC

pytestmark = pytest.mark.slow

CLI_TRAIN = ["train", "--model", "resnet18", "--data", "synthetic", "--synthetic-count", "40",
             "--synthetic-image-size", "32", "--image-size", "32", "--epochs", "1", "--batch-size", "8",
             "--no-pretrained", "--precision", "fp32", "--split", "70:30", "--val-fraction", "0.25"]


@contextlib.contextmanager
def tmpfs(path, size: str):
    path.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fingerprint(root) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and ".cache" not in p.parts}


def stored_run(root) -> dict:
    store = RunStore(root)
    data = prepare_data(TINY_SYNTHETIC, TINY_CONFIG, None)
    run = run_training(TINY_CONFIG, data, store)
    assert run["status"] == "completed"
    return run


def test_a_read_only_store_refuses_new_runs_clearly_and_keeps_the_old(tmp_path, capsys):
    with tmpfs(tmp_path / "store", "200m") as root:
        old = stored_run(root)
        before = fingerprint(root)
        subprocess.run(["mount", "-o", "remount,ro", str(root)], check=True)
        assert main([*CLI_TRAIN, "--runs-dir", str(root)]) == 2
        message = capsys.readouterr().err
        assert "error: cannot create a run folder" in message and "Read-only file system" in message
        assert fingerprint(root) == before
        (listed,) = RunStore(root).list_runs()
        assert listed["run_id"] == old["run_id"] and listed["status"] == "completed"


def test_a_full_store_fails_the_new_run_clearly_and_keeps_the_old(tmp_path):
    # Room for one ResNet18 run while it trains (model.pt 45 MB + resume.pt 135 MB), not for a second
    # run next to the first's model.pt.
    with tmpfs(tmp_path / "store", "200m") as root:
        old = stored_run(root)
        before = fingerprint(root)
        store = RunStore(root)
        data = prepare_data(TINY_SYNTHETIC, TINY_CONFIG, None)
        new = run_training(dataclasses.replace(TINY_CONFIG, epochs=2), data, store)
        assert new["status"] == "failed" and "No space left on device" in new["error"]
        assert {path: digest for path, digest in fingerprint(root).items() if path.startswith(old["run_id"])} == before
        statuses = {run["run_id"]: run["status"] for run in store.list_runs()}
        assert statuses == {old["run_id"]: "completed", new["run_id"]: "failed"}
        leftovers = [p.name for p in (root / new["run_id"]).iterdir() if p.name.endswith(".tmp")]
        assert leftovers == [], "a failed write removes its temporary file"
