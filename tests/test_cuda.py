"""CUDA, proven whenever a GPU is available (issue 14): every model trains with the precision plan timed on
the GPU, a run resumed on the GPU equals the uninterrupted one, CAMs and the audit run on the GPU, and a GPU
run's model loads and predicts on a machine without one.

Marked `cuda`: skipped without a CUDA device (tests/conftest.py), run by bench/gpu_check.sh on a GPU.
SKIN_TEST_DEVICE=cpu runs them on the CPU instead, which checks their logic where there is no GPU.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import core.audit.runner
from core.audit.maps import compute_maps
from core.audit.runner import AuditSettings, run_audit
from core.cams import explainer_for_run, image_tensor
from core.config import DataSpec, TrainConfig
from core.data.datasets import prepare_data
from core.environment import device_name
from core.models import MODEL_REGISTRY
from core.runs import RunStore
from core.stored_run import run_model_input
from core.training.loop import resume_training, run_training
from core.training.precision import bf16_supported
from tests.conftest import CUDA_TESTS_ON_CPU
from tests.test_resume import StopAfterEpoch

pytestmark = pytest.mark.cuda

DEVICE = "cpu" if CUDA_TESTS_ON_CPU else "cuda"
ROOT = Path(__file__).resolve().parents[1]
# 64 px, not the usual 32: the models' last feature maps are then 2 x 2, so Grad-CAM maps are not flat.
DATA = DataSpec(source="synthetic", synthetic_count=48, synthetic_image_size=64, synthetic_seed=3)
CONFIG = TrainConfig(model="hybrid_sresnet", epochs=1, batch_size=8, image_size=64, pretrained=False,
                     precision="auto", device=DEVICE, split="70:30", val_fraction=0.25)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Each registry model trained for one epoch on the device, with the precision plan timed there."""
    store = RunStore(tmp_path_factory.mktemp("device-runs"))
    data = prepare_data(DATA, CONFIG, store.cache_dir)
    runs = {name: run_training(dataclasses.replace(CONFIG, model=name), data, store) for name in MODEL_REGISTRY}
    return store, data, runs


def plan_name(environment: dict) -> str:
    return environment["precision"] + ("+channels_last" if environment["memory_format"] == "channels_last" else "")


@pytest.mark.parametrize("model", list(MODEL_REGISTRY))
def test_every_model_trains_an_epoch_with_the_precision_plan_timed_on_the_device(trained, model):
    store, data, runs = trained
    run = runs[model]
    assert run["status"] == "completed", run.get("error")
    environment = store.load(run["run_id"])["environment"]  # as run.json stores it
    device = torch.device(DEVICE)
    assert environment["device"] == DEVICE and environment["device_name"] == device_name(device)
    # fp32 and, where the device has it, bf16 autocast, both channels_last: the plans time_training_step timed.
    timed = environment["step_seconds"]
    expected = {"fp32+channels_last"} | ({"bf16+channels_last"} if bf16_supported(device) else set())
    assert set(timed) == expected
    assert all(seconds > 0 for seconds in timed.values()), timed
    assert environment["precision_chosen_by"] == ("timed" if len(expected) > 1 else "default")
    assert plan_name(environment) == min(timed, key=timed.get), timed  # the fastest one trained
    (epoch,) = run["history"]
    assert all(math.isfinite(epoch[key]) for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"))
    assert all(math.isfinite(run["metrics"][split]["accuracy"]) for split in ("train", "val", "test"))
    predictions = pd.read_csv(store.root / run["run_id"] / "predictions.csv")
    assert len(predictions) == len(data.indices("val")) + len(data.indices("test"))
    assert predictions["prob_malignant"].between(0, 1).all()


@pytest.fixture
def deterministic(monkeypatch):
    """Deterministic GPU kernels while the test runs, restored afterwards: two runs can then agree to rounding.
    (Kernels without a deterministic version, such as adaptive average pooling's backward pass, only warn.)"""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    saved = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[:2]
    torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])


def test_a_run_resumed_on_the_device_equals_the_uninterrupted_run(tmp_path, deterministic):
    # Hybrid S-ResNet's head has dropout, which draws from the GPU's generator on CUDA. fp32 is requested so
    # that both runs train the same plan (a timed choice could differ between them).
    config = dataclasses.replace(CONFIG, epochs=2, precision="fp32")
    store, whole_store = RunStore(tmp_path / "resumed"), RunStore(tmp_path / "uninterrupted")
    data = prepare_data(DATA, config, store.cache_dir)
    whole = run_training(config, data, whole_store)
    assert whole["status"] == "completed", whole.get("error")
    stop = threading.Event()
    stopped = run_training(config, data, store, StopAfterEpoch(1, stop), stop)
    run_id = stopped["run_id"]
    assert stopped["status"] == "stopped" and len(stopped["history"]) == 1  # and one batch of epoch 2 was trained
    state = torch.load(store.resume_path(run_id), map_location="cpu", weights_only=True)
    assert len(state["cuda_rng"]) == (torch.cuda.device_count() if DEVICE == "cuda" else 0)

    # Control: the same resume without the device's random state (as if it were not restored) must differ,
    # or the comparison below could not tell a restored generator from a lost one.
    control_store = RunStore(tmp_path / "control")
    shutil.copytree(store.root / run_id, control_store.root / run_id)
    if DEVICE == "cuda":
        state["cuda_rng"] = []
    else:
        state["torch_rng"] = torch.Generator().manual_seed(config.seed).get_state()
    torch.save(state, control_store.resume_path(run_id))
    control = resume_training(run_id, control_store, data=data)

    resumed = resume_training(run_id, store, data=data)
    assert resumed["status"] == "completed" and [h["epoch"] for h in resumed["history"]] == [1, 2]
    for mine, reference in zip(resumed["history"], whole["history"]):
        for key in ("train_loss", "train_acc", "val_loss", "val_auc", "lr"):
            assert mine[key] == pytest.approx(reference[key], rel=1e-4, abs=1e-5), key
    for key in ("auc", "accuracy"):
        assert resumed["metrics"]["test"][key] == pytest.approx(whole["metrics"]["test"][key], abs=1e-4), key
    mine, reference = (pd.read_csv(where.root / run["run_id"] / "predictions.csv")
                       for where, run in ((store, resumed), (whole_store, whole)))
    np.testing.assert_allclose(mine["prob_malignant"], reference["prob_malignant"], atol=1e-4)
    assert control["history"][1]["train_loss"] != pytest.approx(whole["history"][1]["train_loss"], rel=1e-3)


def test_a_timed_plan_and_a_cached_one_train_the_same_numbers_on_the_device(tmp_path, deterministic):
    # Timing draws random images and dropout masks from the device's generator; the run's own draws must not
    # depend on whether its plan was timed or read from the cache. (bf16 rounding amplifies the last bits of
    # the kernels that are not deterministic, hence rel 1e-3; a lost random stream changes the loss by percent.)
    store = RunStore(tmp_path / "runs")
    data = prepare_data(DATA, CONFIG, store.cache_dir)
    timed, cached = (run_training(CONFIG, data, store) for _ in range(2))
    assert cached["environment"]["precision_chosen_by"] == "cache"
    assert plan_name(cached["environment"]) == plan_name(timed["environment"])
    for key in ("train_loss", "val_loss"):
        assert cached["history"][0][key] == pytest.approx(timed["history"][0][key], rel=1e-3), key


def malignant_and_benign_maps(explainer, images: np.ndarray, method: str) -> np.ndarray:
    return np.stack([compute_maps(explainer, images, method, target) for target in (1, 0)])


@pytest.mark.parametrize("model", list(MODEL_REGISTRY))
def test_grad_cam_on_the_device_matches_the_cpu(trained, model):
    store, data, runs = trained
    run = runs[model]
    path = store.model_path(run["run_id"])
    on_device, on_cpu = explainer_for_run(run, path, DEVICE), explainer_for_run(run, path, "cpu")
    assert next(on_device.model.parameters()).device.type == DEVICE
    predictions = pd.read_csv(store.root / run["run_id"] / "predictions.csv")
    test = predictions[predictions["split"] == "test"]
    images = np.stack([run_model_input(run, data, image_id) for image_id in test["image_id"]])
    # After one epoch every Grad-CAM map of a model can be zero (negative everywhere before the ReLU), so
    # LayerCAM, which keeps each location's positive gradients, is compared too and sets the scale.
    maps = {method: (malignant_and_benign_maps(on_device, images, method),
                     malignant_and_benign_maps(on_cpu, images, method)) for method in ("gradcam", "layercam")}
    scale = max(cpu_maps.max() for _, cpu_maps in maps.values())
    assert scale > 0, "every map is zero: nothing to compare"
    for method, (device_maps, cpu_maps) in maps.items():
        assert device_maps.shape == cpu_maps.shape == (2, len(images), 64, 64)
        # TF32 convolutions (cuDNN's default) and another summation order: close, not equal.
        assert np.abs(device_maps - cpu_maps).max() <= 0.05 * scale, method
        if cpu_maps.std() > 0:
            assert np.corrcoef(device_maps.ravel(), cpu_maps.ravel())[0, 1] > 0.99, method
    # The single-image path reports the P(malignant) the run stored, in its recorded precision.
    tolerance = 0.03 if run["environment"]["precision"] == "bf16" else 0.01
    for image, stored in zip(images[:2], test["prob_malignant"]):
        result = on_device.explain(image_tensor(image), "gradcam")
        assert result.probability == pytest.approx(stored, abs=tolerance)
        assert result.cam.shape == (64, 64) and np.isfinite(result.cam).all()


def test_the_audit_runs_on_the_device_and_agrees_with_the_cpu(trained, monkeypatch, tmp_path):
    store, data, runs = trained
    run = runs["hybrid_sresnet"]
    cpu_store = RunStore(tmp_path / "cpu-audit")  # results are stored per run: the CPU's go to a copy
    shutil.copytree(store.root / run["run_id"], cpu_store.root / run["run_id"])
    loaded_on = []
    load = core.audit.runner.load_trained_model

    def recording_load(*args, **kwargs):
        model = load(*args, **kwargs)
        loaded_on.append(next(model.parameters()).device.type)
        return model

    monkeypatch.setattr(core.audit.runner, "load_trained_model", recording_load)
    settings = AuditSettings(images=8, steps=2, road=True)
    audit = run_audit(store, [run], settings, device=DEVICE)
    reference = run_audit(cpu_store, [run], settings, device="cpu")
    assert loaded_on == [DEVICE, "cpu"]
    assert audit.computed == reference.computed == 4 and not audit.notes  # the four checks, masks included
    report, cpu_report = (result.report for result in (audit, reference))
    run_id = run["run_id"]
    assert math.isfinite(report["randomisation"][run_id]["gradcam"]["final_spearman"])
    assert report["artefacts"][run_id]  # one entry per artefact kind
    for check, measures in (("faithfulness", ("deletion", "insertion", "road")), ("localisation", ("energy_inside",))):
        for measure in measures:
            value, cpu_value = report[check][run_id]["gradcam"][measure], cpu_report[check][run_id]["gradcam"][measure]
            assert math.isfinite(value) and value == pytest.approx(cpu_value, abs=0.05), (check, measure)


def test_a_gpu_run_loads_and_predicts_where_cuda_is_hidden(trained):
    store, data, runs = trained
    # A CPU-only machine: the stored files must not need CUDA to load, and the run must predict what it stored.
    script = textwrap.dedent("""
        import json, sys

        import numpy as np
        import pandas as pd
        import torch

        from core.audit.runner import run_data
        from core.cams import explainer_for_run, image_tensor
        from core.evaluation.inference import apply_run
        from core.runs import RunStore

        assert not torch.cuda.is_available()
        store, cache, differences = RunStore(sys.argv[1]), {}, {}
        for run_id in sys.argv[2:]:
            run = store.load(run_id)
            plain = torch.load(store.model_path(run_id), weights_only=True)  # no map_location: stored on the CPU
            assert all(tensor.device.type == "cpu" for tensor in plain.values())
            predictions = pd.read_csv(store.root / run_id / "predictions.csv")
            data = run_data(run, store, cache)
            rows = pd.Series(np.arange(len(data.table)), index=data.table["image_id"])[predictions["image_id"]]
            probabilities = apply_run(run, store, data.images[rows.to_numpy()]).probabilities
            cam = explainer_for_run(run, store.model_path(run_id)).explain(image_tensor(data.images[rows.iloc[0]]))
            assert np.isfinite(cam.cam).all()
            differences[run["model"]] = float(np.abs(probabilities - predictions["prob_malignant"]).max())
        print(json.dumps(differences))
    """)
    completed = subprocess.run(
        [sys.executable, "-c", script, str(store.root), *(run["run_id"] for run in runs.values())],
        cwd=ROOT, env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    differences = json.loads(completed.stdout.strip().splitlines()[-1])
    assert set(differences) == set(MODEL_REGISTRY)
    for model, difference in differences.items():
        # bf16 on another device's kernels rounds differently; fp32 differs by TF32 convolutions on the GPU.
        tolerance = 0.03 if runs[model]["environment"]["precision"] == "bf16" else 0.01
        assert difference <= tolerance, (model, difference)


def test_a_dataset_too_large_for_memory_streams_to_the_device_through_pinned_memory(tmp_path, monkeypatch):
    """Small datasets sit on the device as one tensor; a large one is read from the image cache a batch at a
    time into pinned memory, and trains to the same numbers."""
    from core.training import batches
    from core.training.batches import TensorData
    from tests.conftest import write_image

    root = tmp_path / "folder"
    for index in range(16):
        write_image(root / "Cancer" / f"c{index}.jpg", colour=(60, 30 + 5 * index, 20))
        write_image(root / "NotCancer" / f"n{index}.jpg", colour=(200, 150 - 5 * index, 120))
    config = dataclasses.replace(CONFIG, model="resnet18", image_size=32, precision="fp32", epochs=2)
    store = RunStore(tmp_path / "runs")
    data = prepare_data(DataSpec(source=str(root)), config, store.cache_dir)
    device = torch.device(DEVICE)
    on_device = TensorData.from_prepared(data, "train", device)
    streamed = TensorData.from_prepared(data, "train", device, residency="disk")
    assert on_device.residency == "memory" and on_device.images.device.type == DEVICE
    rows = torch.tensor([3, 0, 3, len(streamed) - 1])
    batch = streamed.batch(rows)
    assert batch.is_pinned() == (DEVICE == "cuda")
    assert torch.equal(batch.to(device), on_device.batch(rows.to(device)))
    in_memory = run_training(config, data, store)
    monkeypatch.setattr(batches, "IN_MEMORY_MAX_BYTES", 0)
    from_disk = run_training(config, data, store)
    assert from_disk["environment"]["data_residency"] == "disk"
    assert [e["val_auc"] for e in from_disk["history"]] == pytest.approx([e["val_auc"] for e in in_memory["history"]],
                                                                         abs=1e-4)
