"""One run on two processes: torchrun with DistributedDataParallel on the CPU (gloo).

The slow tests start real `python -m torch.distributed.run --standalone --nproc_per_node 2 -m core ...`
launches on a tiny synthetic set; the fast ones check the pieces (shares, shards, steps, loss weighting,
random streams) in this process, where everything is a single process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from core.cli import main
from core.runs import RESUME_FILE, RunStore
from core.training.distributed import SINGLE_PROCESS, DistributedContext
from core.training.loop import epoch_batches, steps_per_epoch

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 2
BATCH = 8
TRAIN_ARGS = ["--model", "resnet18", "--data", "synthetic", "--synthetic-count", "120", "--synthetic-image-size",
              "32", "--image-size", "32", "--epochs", str(EPOCHS), "--batch-size", str(BATCH), "--no-pretrained",
              "--precision", "fp32", "--split", "70:30", "--val-fraction", "0.25"]
TRAIN_IMAGES = 63  # of the 120 synthetic images, with this split and validation fraction


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]


def start(command: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    _, stderr = process.communicate(timeout=timeout)
    return process.returncode, stderr


def only_run(runs: Path) -> dict:
    (run,) = RunStore(runs).list_runs()
    return run


def worker_pid(launcher: int, rank: int) -> int:
    """The pid of the worker of `rank` that torchrun (pid `launcher`) started."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environment = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if parent == launcher and f"RANK={rank}".encode() in environment:
            return int(entry.name)
    raise AssertionError(f"torchrun {launcher} has no worker of rank {rank}")


def wait_for_epochs(runs: Path, epochs: int, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        for run_json in runs.glob("*/run.json"):
            if len(json.loads(run_json.read_text())["history"]) >= epochs:
                return
        time.sleep(0.02)
    raise AssertionError(f"no run reached epoch {epochs} in {timeout} s")


def assert_covers_every_image_once(runs: Path, run: dict) -> pd.DataFrame:
    folder = runs / run["run_id"]
    predictions, split = pd.read_csv(folder / "predictions.csv"), pd.read_csv(folder / "split.csv")
    assert predictions["image_id"].is_unique
    held_out = split[split["split"] != "train"]
    assert sorted(predictions["image_id"]) == sorted(held_out["image_id"])
    assert predictions["prob_malignant"].between(0, 1).all()
    return predictions


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The same run on two processes (torchrun) and on one (in this process)."""
    base = tmp_path_factory.mktemp("distributed")
    two, one = base / "two", base / "one"
    process = start(torchrun("-m", "core", "train", *TRAIN_ARGS, "--runs-dir", str(two)))
    assert main(["train", *TRAIN_ARGS, "--runs-dir", str(one)]) == 0
    code, stderr = finish(process)
    assert code == 0, stderr
    return two, one


@pytest.mark.slow
def test_a_run_on_two_processes_is_an_ordinary_run(uninterrupted):
    two, one = uninterrupted
    ddp, single = only_run(two), only_run(one)
    assert ddp["status"] == "completed", ddp.get("error")
    assert set(ddp) == set(single)
    assert ddp["config"] == single["config"] and ddp["dataset"] == single["dataset"]
    assert set(ddp["environment"]) - set(single["environment"]) == {"distributed"}
    assert ddp["environment"]["distributed"] == {"world_size": 2, "backend": "gloo", "nodes": 1}
    assert [set(entry) for entry in ddp["history"]] == [set(entry) for entry in single["history"]]
    assert [entry["epoch"] for entry in ddp["history"]] == list(range(1, EPOCHS + 1))
    assert {split: set(values) for split, values in ddp["metrics"].items()} == {
        split: set(values) for split, values in single["metrics"].items()}
    weights = torch.load(two / ddp["run_id"] / "model.pt", weights_only=True)
    reference = torch.load(one / single["run_id"] / "model.pt", weights_only=True)
    assert {k: v.shape for k, v in weights.items()} == {k: v.shape for k, v in reference.items()}
    assert sorted(path.name for path in (two / ddp["run_id"]).iterdir()) == sorted(
        path.name for path in (one / single["run_id"]).iterdir())
    # Every validation and test image once, in the order one process writes them.
    predictions = assert_covers_every_image_once(two, ddp)
    single_predictions = pd.read_csv(one / single["run_id"] / "predictions.csv")
    columns = ["image_id", "split", "label"]
    pd.testing.assert_frame_equal(predictions[columns], single_predictions[columns])
    pd.testing.assert_frame_equal(pd.read_csv(two / ddp["run_id"] / "split.csv"),
                                  pd.read_csv(one / single["run_id"] / "split.csv"))


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_and_the_run_resumes_under_torchrun(tmp_path, uninterrupted):
    runs = tmp_path / "runs"
    process = start(torchrun("-m", "core", "train", *TRAIN_ARGS, "--runs-dir", str(runs)))
    wait_for_epochs(runs, 1, process)
    os.kill(worker_pid(process.pid, rank=1), signal.SIGTERM)  # rank 1 writes nothing: rank 0 learns of it
    code, stderr = finish(process, timeout=180)
    assert code != 0, stderr  # a stopped run is not a completed one, as on one process
    run = only_run(runs)
    assert run["status"] == "stopped" and run["resumable"], run
    assert "stopped by request" in run["message"]
    state = torch.load(runs / run["run_id"] / RESUME_FILE, weights_only=True)
    assert 1 <= state["epoch"] < EPOCHS
    # The optimizer steps of the finished epochs, as documented: the global batches of one process.
    steps = steps_per_epoch(TRAIN_IMAGES, BATCH, world_size=2)
    assert steps == steps_per_epoch(TRAIN_IMAGES, BATCH) == TRAIN_IMAGES // BATCH + 1
    assert state["scheduler"]["last_epoch"] == state["epoch"] * steps
    assert {int(values["step"]) for values in state["optimizer"]["state"].values()} == {state["epoch"] * steps}

    code, stderr = finish(start(torchrun("-m", "core", "resume", run["run_id"], "--runs-dir", str(runs))))
    assert code == 0, stderr
    resumed = RunStore(runs).load(run["run_id"])
    assert resumed["status"] == "completed" and not resumed["resumable"]
    assert [entry["epoch"] for entry in resumed["history"]] == list(range(1, EPOCHS + 1))
    assert resumed["resumes"][0]["environment"]["distributed"]["world_size"] == 2
    assert not (runs / run["run_id"] / RESUME_FILE).exists()
    assert_covers_every_image_once(runs, resumed)
    # Same world size, same numbers as the run that was never stopped.
    whole = only_run(uninterrupted[0])
    for mine, reference in zip(resumed["history"], whole["history"]):
        for key in ("train_loss", "val_loss", "val_auc", "lr"):
            assert mine[key] == pytest.approx(reference[key], rel=1e-5, abs=1e-6), key
    assert resumed["metrics"]["test"]["auc"] == pytest.approx(whole["metrics"]["test"]["auc"], abs=1e-6)


@pytest.mark.slow
def test_a_dataset_missing_on_one_process_fails_on_both_before_anything_is_written(tmp_path):
    runs = tmp_path / "runs"
    launcher = tmp_path / "rank_one_elsewhere.py"
    launcher.write_text(textwrap.dedent("""
        import os, sys
        from core.cli import main
        args = sys.argv[1:]
        if os.environ["RANK"] == "1":  # the dataset this machine was given does not exist
            args[args.index("--data") + 1] = "/nonexistent/isic"
        sys.exit(main(args))
    """))
    code, stderr = finish(start(torchrun(str(launcher), "train", *TRAIN_ARGS, "--runs-dir", str(runs))))
    assert code != 0
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2, stderr  # one line from each process (each written whole)
    assert all(line.count("error:") == 1 and "dataset path not found: /nonexistent/isic" in line
               for line in errors), errors
    assert any(line.startswith("error: rank 1: ") for line in errors), errors
    assert not RunStore(runs).list_runs()
    assert not [path for path in runs.iterdir() if not path.name.startswith(".")]  # only the image cache


def test_other_commands_refuse_to_run_under_torchrun(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["list", "--runs-dir", str(tmp_path)]) == 2
    assert "only train and resume run under torchrun" in capsys.readouterr().err


def test_a_single_process_needs_no_process_group():
    stop = threading.Event()
    rows = torch.arange(10)
    generator = torch.Generator()
    assert not SINGLE_PROCESS.is_distributed and SINGLE_PROCESS.is_main and SINGLE_PROCESS.describe() == {}
    assert SINGLE_PROCESS.share(rows) is rows and SINGLE_PROCESS.shard(7) == range(7)
    assert SINGLE_PROCESS.sum(1.5, 2) == [1.5, 2] and not SINGLE_PROCESS.should_stop(stop)
    assert SINGLE_PROCESS.augmentation_generator(generator, 0, 1) is generator
    loss = torch.tensor(0.25)
    assert SINGLE_PROCESS.weighted_loss(loss, 3, 3) is loss
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("count", [0, 1, 5, 21, 36])
def test_the_processes_shares_and_shards_cover_everything_once(count):
    ranks = [DistributedContext(rank, 3, rank, "gloo") for rank in range(3)]
    rows = torch.randperm(count)
    assert sorted(torch.cat([rank.share(rows) for rank in ranks]).tolist()) == sorted(rows.tolist())
    assert [i for rank in ranks for i in rank.shard(count)] == list(range(count))  # rank order is the order


def test_steps_per_epoch_are_those_of_one_process_unless_the_last_batch_is_too_small_to_share():
    order = torch.arange(63)
    for world_size in (1, 2, 4):
        for batch_size in (8, 10, 16):
            batches = epoch_batches(order, batch_size, world_size)
            assert len(batches) == steps_per_epoch(63, batch_size, world_size)
            assert all(len(batch) >= 2 * world_size for batch in batches)
    assert steps_per_epoch(63, 8, 2) == steps_per_epoch(63, 8) == 8  # the last batch of 7 is shared 4 + 3
    assert steps_per_epoch(63, 10, 2) == 6 < steps_per_epoch(63, 10) == 7  # 3 images cannot give 2 to each


def test_weighting_each_share_makes_the_averaged_gradient_the_whole_batchs():
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 2)
    inputs, targets = torch.randn(7, 4), torch.randint(0, 2, (7,))
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    whole = torch.autograd.grad(criterion(layer(inputs), targets), layer.weight)[0]
    ranks = [DistributedContext(rank, 2, rank, "gloo") for rank in range(2)]
    rows = torch.arange(7)
    gradients = []
    for rank in ranks:
        mine = rank.share(rows)  # 4 and 3 images
        loss = rank.weighted_loss(criterion(layer(inputs[mine]), targets[mine]), len(mine), len(rows))
        gradients.append(torch.autograd.grad(loss, layer.weight)[0])
    torch.testing.assert_close(sum(gradients) / 2, whole)  # what DDP's average gives


def test_augmentation_differs_per_process_and_repeats_per_epoch():
    def draws(rank: int, epoch: int) -> list[float]:
        generator = DistributedContext(rank, 2, rank, "gloo").augmentation_generator(torch.Generator(), 7, epoch)
        return torch.rand(3, generator=generator).tolist() + torch.rand(1).tolist()  # augmentation, dropout

    state = torch.get_rng_state()
    try:
        assert draws(0, 1) == draws(0, 1)  # a resumed epoch draws what it would have drawn
        assert draws(0, 1) != draws(1, 1) and draws(0, 1) != draws(0, 2)
    finally:
        torch.set_rng_state(state)


def test_a_global_batch_too_small_to_share_is_refused():
    with pytest.raises(ValueError, match="at least 8 images per batch"):
        DistributedContext(0, 4, 0, "gloo").check_batch_size(6, 100)
    DistributedContext(0, 4, 0, "gloo").check_batch_size(8, 100)
    SINGLE_PROCESS.check_batch_size(2, 2)
