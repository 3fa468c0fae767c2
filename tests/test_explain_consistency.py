"""The P(malignant) the Explain page shows for a run's test image is the one the run stored in
predictions.csv: the model gets the run's own prepared pixels at its image size (not a display-size copy
resized back) and runs in the run's recorded precision. Every model of the registry, several images."""

from __future__ import annotations

import dataclasses
import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from core.cams import decoded_inputs, explain_inputs, explainer_for_run, resize_image
from core.config import DataSpec, TrainConfig
from core.data.datasets import prepare_data
from core.models import MODEL_REGISTRY
from core.runs import RunStore
from core.stored_run import run_model_input, run_precision
from core.training.loop import run_training
from tests.conftest import TINY_CONFIG

APP = str(Path(__file__).resolve().parents[1] / "streamlit_app.py")
# Drawn at 64 px and trained at 32 px, so the dataset cache resizes: the old path (the dataset loaded at the
# 224 px display size, then resized to 32 px) fed the models other pixels than the run evaluated.
SPEC = DataSpec(synthetic_count=48, synthetic_image_size=64, synthetic_seed=3)
IMAGES_PER_RUN = 4
FP32_TOLERANCE = 1e-4
# A bf16 run's probabilities come from bf16-autocast convolutions, whose rounding depends on the batch
# they ran in (training evaluates in batches, Explain one image at a time): measured differences stay
# below 0.003 on these tiny models; 0.01 leaves room. The decision must agree unless P is this close to 0.5.
BF16_TOLERANCE = 0.01


@pytest.fixture(scope="module")
def fp32_runs(tmp_path_factory):
    store = RunStore(tmp_path_factory.mktemp("consistency") / "runs")
    data = prepare_data(SPEC, TINY_CONFIG, store.cache_dir)
    return store, {name: run_training(dataclasses.replace(TINY_CONFIG, model=name), data, store)
                   for name in MODEL_REGISTRY}


@pytest.fixture(scope="module")
def bf16_runs(fp32_runs, tmp_path_factory):
    """The fp32 runs as runs whose plan was bf16 autocast with channels-last (what `auto` picks for some
    models on CPUs with AMX or AVX-512 BF16, and on GPUs): their predictions.csv written again by
    training's own final evaluation under that plan, and the plan recorded in run.json as training records
    it. Training itself in bf16 would only change the weights, and costs minutes on a CPU that emulates bf16."""
    import shutil

    import torch

    from core.stored_run import load_trained_model
    from core.training.batches import TensorData
    from core.training.loop import _final_metrics
    from core.training.precision import ExecutionPlan

    store, runs = fp32_runs
    bf16_store = RunStore(tmp_path_factory.mktemp("consistency-bf16") / "runs")
    plan = ExecutionPlan(torch.device("cpu"), "bf16", True, "requested")
    data = prepare_data(SPEC, TINY_CONFIG, store.cache_dir)
    # predictions.csv holds the validation and test parts only: the training part need not be evaluated.
    parts = {split: TensorData.from_prepared(data, split, plan.device) for split in ("val", "test")}
    bf16_runs = {}
    for name, run in runs.items():
        shutil.copytree(store.root / run["run_id"], bf16_store.root / run["run_id"])
        model = load_trained_model(run, store.model_path(run["run_id"])).to(memory_format=plan.memory_format)
        metrics, predictions = _final_metrics(model, parts, data, plan, TINY_CONFIG)
        folder = bf16_store.open(run["run_id"])
        folder.save_table("predictions.csv", predictions)
        bf16_runs[name] = folder.update(metrics=metrics, environment={**run["environment"], **plan.describe()})
    return bf16_store, bf16_runs


def explained_probabilities(store: RunStore, run: dict) -> list[tuple[float, float]]:
    """(stored, explained) P(malignant) of the first test images, through the Explain page's code path:
    the run's dataset prepared as the run prepared it, `run_model_input`, `explainer_for_run`, `explain_inputs`."""
    assert run["status"] == "completed", run.get("error")
    data = prepare_data(DataSpec.from_dict(run["dataset"]["spec"]), TrainConfig.from_dict(run["config"]),
                        store.cache_dir)
    explainer = explainer_for_run(run, store.model_path(run["run_id"]))
    predictions = store.predictions(run["run_id"])
    test = predictions[predictions["split"] == "test"].head(IMAGES_PER_RUN)
    pairs = []
    for image_id, stored in zip(test["image_id"], test["prob_malignant"]):
        model_input = run_model_input(run, data, image_id)
        assert model_input.shape == (32, 32, 3)
        explained = explain_inputs([explainer], [model_input], resize_image(model_input, 224))
        assert explained.results[0].cam.shape == (224, 224)
        pairs.append((float(stored), explained.results[0].probability))
    assert len(pairs) == IMAGES_PER_RUN
    return pairs


@pytest.mark.parametrize("name", list(MODEL_REGISTRY))
def test_explained_probability_is_the_stored_prediction(fp32_runs, name):
    store, runs = fp32_runs
    assert run_precision(runs[name]) == "fp32"
    for stored, explained in explained_probabilities(store, runs[name]):
        assert explained == pytest.approx(stored, abs=FP32_TOLERANCE)


@pytest.mark.parametrize("name", list(MODEL_REGISTRY))
def test_a_bf16_run_is_explained_in_bf16_with_the_same_decision(bf16_runs, name):
    store, runs = bf16_runs
    assert run_precision(runs[name]) == "bf16"
    for stored, explained in explained_probabilities(store, runs[name]):
        assert explained == pytest.approx(stored, abs=BF16_TOLERANCE)
        if abs(stored - 0.5) > BF16_TOLERANCE:
            assert (explained >= 0.5) == (stored >= 0.5)


def test_a_run_input_must_come_from_the_runs_own_preparation(fp32_runs):
    store, runs = fp32_runs
    run = runs["resnet18"]
    image_id = store.predictions(run["run_id"]).query("split == 'test'")["image_id"].iloc[0]
    display = prepare_data(SPEC, dataclasses.replace(TINY_CONFIG, image_size=224), store.cache_dir)
    with pytest.raises(ValueError, match="prepared at 224 px"):
        run_model_input(run, display, image_id)
    other = prepare_data(dataclasses.replace(SPEC, synthetic_seed=4), TINY_CONFIG, store.cache_dir)
    with pytest.raises(ValueError, match="not the one run"):
        run_model_input(run, other, image_id)


def test_uploads_and_resizes_go_through_the_dataset_caches_own_functions(tmp_path, fp32_runs):
    """An upload is decoded at each model's size as the dataset cache decodes a file, and `resize_image`
    resamples as the synthetic set's cache does, pixel for pixel."""
    from core.data.synthetic import generate_synthetic

    store, _ = fp32_runs
    drawn = generate_synthetic(count=SPEC.synthetic_count, image_size=64, seed=SPEC.synthetic_seed)
    data = prepare_data(SPEC, TINY_CONFIG, store.cache_dir)
    assert np.array_equal(np.stack([resize_image(image, 32) for image in drawn.images]), data.images)
    for label, folder in ((0, "benign"), (1, "malignant")):
        for index in np.flatnonzero(drawn.labels == label)[:4]:
            (tmp_path / "files" / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(drawn.images[index]).save(tmp_path / "files" / folder / f"{index}.jpg", quality=90)
    files = prepare_data(DataSpec(source=str(tmp_path / "files")), TINY_CONFIG, tmp_path / "cache")
    for row, path in enumerate(files.table["path"]):
        content = Path(path).read_bytes()
        assert np.array_equal(decoded_inputs(content, [32])[0], files.images[row])


def shown_probabilities(app: AppTest) -> list[float]:
    return [float(re.search(r"P\(malignant\) ([0-9.]+)", caption.value).group(1)) for caption in app.caption
            if caption.value.startswith("P(malignant)")]


@pytest.mark.slow
def test_the_explain_page_shows_the_stored_prediction_of_every_run(fp32_runs, monkeypatch):
    """End to end: the tiles' captions on the page are the stored predictions (to their 3 decimals)."""
    store, runs = fp32_runs
    monkeypatch.setenv("SKIN_RUNS_DIR", str(store.root))
    app = AppTest.from_file(APP, default_timeout=120)
    app.run()
    app.switch_page("pages/explain.py").run()
    assert not app.exception, app.exception
    chosen = app.multiselect(key="explain.runs").value
    assert set(chosen) == {run["run_id"] for run in runs.values()}
    stored = {run_id: store.predictions(run_id).query("split == 'test'").set_index("image_id")["prob_malignant"]
              for run_id in chosen}
    image_ids = list(stored[chosen[0]].index[:2])
    for image_id in image_ids:
        app.selectbox(key="explain.image_id").set_value(image_id).run()
        assert not app.exception, app.exception
        shown = shown_probabilities(app)
        assert len(shown) == len(chosen)
        for run_id, probability in zip(chosen, shown):
            assert probability == pytest.approx(float(stored[run_id][image_id]), abs=0.0006), (run_id, image_id)
        # The picker names the reference run's stored value with the same digits as its tile.
        picker = app.selectbox(key="explain.image_id")
        assert f"P(malignant) {shown[0]:.3f}" in picker.format_func(image_id)


def test_uploads_reach_each_model_at_its_own_size(fp32_runs):
    store, runs = fp32_runs
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 200, 3), dtype=np.uint8)).save(buffer, "PNG")
    inputs = decoded_inputs(buffer.getvalue(), [32, 48])
    assert [image.shape for image in inputs] == [(32, 32, 3), (48, 48, 3)]
    explainer = explainer_for_run(runs["resnet18"], store.model_path(runs["resnet18"]["run_id"]))
    explained = explain_inputs([explainer, explainer], inputs, resize_image(inputs[1], 224))
    assert all(result.cam.shape == (224, 224) for result in explained.results)
