import dataclasses
import json
import subprocess
import sys

import pytest

from core.cli import main

TINY_FLAGS = ["--data", "synthetic", "--synthetic-count", "40", "--synthetic-image-size", "32", "--image-size", "32",
              "--epochs", "1", "--batch-size", "8", "--no-pretrained", "--precision", "fp32", "--split", "70:30"]


def test_train_list_and_compare_end_to_end(tmp_path, capsys):
    runs_dir = str(tmp_path / "runs")
    assert main(["train", "--model", "resnet18", *TINY_FLAGS, "--runs-dir", runs_dir, "--lr", "0.002",
                 "--no-augment"]) == 0
    assert main(["train", "--model", "hybrid_sresnet", *TINY_FLAGS, "--runs-dir", runs_dir, "--dropout", "0.2"]) == 0
    out = capsys.readouterr().out.split()
    run_ids = [line for line in out if "-resnet18-" in line or "-hybrid_sresnet-" in line]
    assert len(run_ids) == 2
    run = json.loads((tmp_path / "runs" / run_ids[0] / "run.json").read_text())
    assert run["config"]["lr"] == 0.002 and run["config"]["augment"] is False and run["status"] == "completed"
    assert json.loads((tmp_path / "runs" / run_ids[1] / "run.json").read_text())["config"]["dropout"] == 0.2

    assert main(["list", "--runs-dir", runs_dir]) == 0
    listing = capsys.readouterr().out.strip().splitlines()
    assert len(listing) == 2 and "completed" in listing[0]

    assert main(["compare", "--runs-dir", runs_dir]) == 0
    table = capsys.readouterr().out
    assert "Hybrid S-ResNet" in table and "ResNet18" in table and "G-mean" in table and "Train acc" in table
    assert "[" in table, "test metrics carry bootstrap intervals"
    assert main(["compare", "--runs-dir", runs_dir, "--seed", "3"]) == 0
    table = capsys.readouterr().out
    assert main(["compare", "--runs-dir", runs_dir, "--format", "csv"]) == 0
    csv_text = capsys.readouterr().out
    assert csv_text.startswith("Model,Run,Train acc,Train acc low,Train acc high,Test acc,Test acc low")
    assert main(["compare", "--runs-dir", runs_dir, "--seed", "3"]) == 0
    assert capsys.readouterr().out == table, "intervals are reproducible from the seed"
    assert main(["compare", "--runs-dir", runs_dir, "--format", "latex", "--runs", run_ids[0]]) == 0
    assert "\\begin{tabular}" in capsys.readouterr().out


def test_paper_preset(tmp_path):
    assert main(["train", "--preset", "paper", *TINY_FLAGS, "--runs-dir", str(tmp_path)]) == 0
    run = json.loads(next(tmp_path.glob("*/run.json")).read_text())
    assert run["config"]["lr"] == 2.52e-4 and run["config"]["weight_decay"] == 1.99e-6
    assert run["config"]["image_size"] == 32, "an explicit flag wins over the preset"


def test_the_quick_demo_gives_each_model_its_own_learning_rate(tmp_path):
    """lr left automatic: EfficientNet-B0 gets the larger step it needs to learn the demo set in 5 epochs, the
    others 1e-3; run.json records the rate used, and an explicit --lr or the paper preset wins."""
    from core.config import PAPER_PRESET, DataSpec, TrainConfig

    assert TrainConfig(model="efficientnet_b0").resolved(DataSpec()).lr == 3e-3
    assert TrainConfig(model="resnet50").resolved(DataSpec()).lr == 1e-3
    assert TrainConfig(model="efficientnet_b0", lr=5e-4).learning_rate == 5e-4
    assert dataclasses.replace(PAPER_PRESET, model="efficientnet_b0").learning_rate == 2.52e-4
    assert main(["train", "--model", "efficientnet_b0", *TINY_FLAGS, "--runs-dir", str(tmp_path / "auto")]) == 0
    assert main(["train", "--model", "efficientnet_b0", *TINY_FLAGS, "--runs-dir", str(tmp_path / "set"),
                 "--lr", "0.002"]) == 0
    recorded = [json.loads(next((tmp_path / name).glob("*/run.json")).read_text())["config"]["lr"]
                for name in ("auto", "set")]
    assert recorded == [3e-3, 0.002]


@pytest.mark.parametrize("arguments, message", [
    (["train", "--data", "/no/such/folder"], "dataset path not found"),
    (["train", "--data", "synthetic", "--lr", "-1"], "learning rate must be positive"),
    (["train", "--data", "synthetic", "--split", "80-20"], "split must look like 80:20"),
    (["train", "--data", "synthetic", "--label-map", "mel=2"], "NAME=0 or NAME=1"),
    (["compare", "--runs", "nope"], "no run(s) nope"),
])
def test_bad_input_gives_one_line_and_exit_code_2(tmp_path, capsys, arguments, message):
    assert main([*arguments, "--runs-dir", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith("error: ") and message in error[-1]


def test_empty_store(tmp_path, capsys):
    assert main(["list", "--runs-dir", str(tmp_path)]) == 0
    assert main(["compare", "--runs-dir", str(tmp_path)]) == 0
    assert "no runs" in capsys.readouterr().err


@pytest.mark.parametrize("command", [[], ["train"], ["list"], ["compare"]])
def test_help(command):
    finished = subprocess.run([sys.executable, "-m", "core", *command, "--help"], capture_output=True, text=True)
    assert finished.returncode == 0 and "usage: python -m core" in finished.stdout


LIGHT_CLI_SCRIPT = """
import contextlib, io, json, sys, time
started = time.perf_counter()
from core.cli import build_parser, main
commands = [[], *([name] for name in build_parser()._subparsers._group_actions[0].choices)]
for command in commands:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        main([*command, "--help"])
with contextlib.redirect_stdout(io.StringIO()) as listing:
    main(["list", "--runs-dir", sys.argv[1]])
print(json.dumps({"commands": len(commands), "listing": listing.getvalue(), "seconds": time.perf_counter() - started,
                  "loaded": sorted(m for m in ("torch", "torchvision", "pytorch_grad_cam", "cv2", "optuna", "pandas",
                                               "sklearn", "scipy", "plotly") if m in sys.modules)}))
"""


def test_help_and_list_load_neither_torch_nor_grad_cam(tmp_path):
    """`python -m core --help`, every command's --help and `list` answer at once: no torch, grad-cam, Optuna,
    pandas or scientific stack behind them (a fresh interpreter, since this one has them loaded)."""
    run = {"run_id": "20261208-000000-resnet18-abcd", "model": "resnet18", "status": "completed", "created_at": 1.0,
           "metrics": {"test": {"auc": 0.9, "accuracy": 0.8}}, "config": {"image_size": 32, "epochs": 1},
           "dataset": {"name": "synthetic"}, "weights": "random"}
    (tmp_path / run["run_id"]).mkdir()
    (tmp_path / run["run_id"] / "run.json").write_text(json.dumps(run))
    finished = subprocess.run([sys.executable, "-c", LIGHT_CLI_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                              check=True)
    outcome = json.loads(finished.stdout)
    assert outcome["commands"] == 13 and outcome["loaded"] == []
    assert outcome["listing"].startswith(run["run_id"]) and "test AUC 0.9000 acc 0.8000" in outcome["listing"]
