"""Batch prediction and the out-of-distribution score, on a small ResNet18 trained on the synthetic set (32 px,
300 images, 2 epochs): the score separates real ISIC 2017 photos from the synthetic test images; predict on a
folder, the CLI and the Predict page; the Explain page's flag on an upload."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score
from streamlit.testing.v1 import AppTest

import core.evaluation.ood
import core.stored_run
from core.config import DataSpec, TrainConfig
from core.data.datasets import DatasetError, PreparedData, prepare_data
from core.data.images import decode_images_cached
from core.evaluation.ood import DETECTOR_FILE, SUMMARY_FILE, ood_detector
from core.evaluation.predict import PREDICTION_COLUMNS, image_files, predict_images, predict_uploads, score_images
from core.runs import RunStore
from core.stored_run import run_image_size
from core.training.jobs import shared_queue
from core.training.loop import run_training
from pages.common import PREDICT_RUNS
from tests.conftest import TINY_CONFIG, TINY_SYNTHETIC, shared_isic_2017

APP = str(Path(__file__).resolve().parents[1] / "streamlit_app.py")
# 300 images: a validation part (36 images) big enough for a steady 95th percentile. A threshold other than
# 0.5, to see that decisions are taken at the run's own.
OOD_DATA = DataSpec(synthetic_count=300, synthetic_image_size=64)
OOD_CONFIG = TrainConfig(model="resnet18", epochs=1, batch_size=32, image_size=32, pretrained=False,
                         precision="fp32", threshold=0.3)
SMALL_CONFIG = dataclasses.replace(TINY_CONFIG, image_size=40)  # another size: each run decodes at its own
ISIC_PHOTOS = 40


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[RunStore, dict, dict, PreparedData]:
    """A tiny 40 px run (older) and the 32 px run the tests are about (the newest: every page's default)."""
    store = RunStore(tmp_path_factory.mktemp("predict") / "runs")
    small = run_training(SMALL_CONFIG, prepare_data(TINY_SYNTHETIC, SMALL_CONFIG, store.cache_dir), store)
    data = prepare_data(OOD_DATA, OOD_CONFIG, store.cache_dir)
    run = run_training(OOD_CONFIG, data, store)
    assert run["status"] == small["status"] == "completed", run.get("error") or small.get("error")
    return store, store.load(run["run_id"]), store.load(small["run_id"]), data


@pytest.fixture
def pages_store(trained, monkeypatch) -> RunStore:
    store = trained[0]
    monkeypatch.setenv("SKIN_RUNS_DIR", str(store.root))
    yield store
    queue = shared_queue(store)
    queue.clear_queue()
    queue.stop_current()
    assert queue.wait_until_idle(timeout=60)


def isic_photos(count: int = ISIC_PHOTOS) -> list[Path]:
    """Real ISIC 2017 photos, spread over the set; read where they are, never copied into the project."""
    folder = shared_isic_2017() / "images"
    photos = sorted(folder.glob("*.jpg"))
    return photos[:: max(len(photos) // count, 1)][:count]


def test_the_ood_score_separates_real_isic_photos_from_the_synthetic_test_images(trained):
    store, run, _, data = trained
    photos = isic_photos()
    detector = ood_detector(run, store)
    summary = json.loads((store.root / run["run_id"] / SUMMARY_FILE).read_text())
    assert summary["method"] == "mahalanobis feature ensemble"
    assert [stage["feature_dim"] for stage in summary["stages"]] == [64, 128, 256, 512], "ResNet18's four stages"
    assert summary["n_train"] == len(data.indices("train")) and summary["n_val"] == len(data.indices("val"))
    assert summary["threshold"] == pytest.approx(detector.threshold)

    size = run_image_size(run)
    synthetic = score_images(run, store, data.images[data.indices("test")], detector=detector)
    real = score_images(run, store, decode_images_cached([str(p) for p in photos], size, None).images,
                        detector=detector)
    labels = np.r_[np.zeros(len(synthetic.ood_scores)), np.ones(len(real.ood_scores))]
    auc = roc_auc_score(labels, np.r_[synthetic.ood_scores, real.ood_scores])
    print(f"OOD AUC ISIC vs synthetic test {auc:.3f}; flagged: ISIC {real.out_of_distribution.mean():.0%}, "
          f"synthetic test {synthetic.out_of_distribution.mean():.0%}, validation {summary['val_flagged_share']:.0%}")
    assert auc >= 0.95
    assert real.out_of_distribution.mean() >= 0.8, "most real photos are flagged"
    assert summary["val_flagged_share"] <= 0.1, "about 5% of the validation images are flagged by construction"
    assert synthetic.out_of_distribution.mean() <= 0.2, "the synthetic test images are mostly in distribution"


def test_the_detector_is_stored_reused_and_refitted_when_the_model_changes(trained, tmp_path, monkeypatch):
    store, run, _, _ = trained
    ood_detector(run, store)
    copy = RunStore(tmp_path / "runs")
    shutil.copytree(store.root / run["run_id"], copy.root / run["run_id"])
    fitted = ood_detector(run, copy)

    def unreachable(*args, **kwargs):
        raise DatasetError("dataset path not found: /moved/away")

    monkeypatch.setattr(core.stored_run, "prepare_data", unreachable)  # how the OOD fit loads a run's data
    reused = ood_detector(run, copy)
    assert reused.threshold == pytest.approx(fitted.threshold)
    for stage, again in zip(fitted.stages, reused.stages, strict=True):
        np.testing.assert_allclose(again.means, stage.means)
        np.testing.assert_allclose(again.precision, stage.precision, rtol=1e-6)
    later = (copy.root / run["run_id"] / DETECTOR_FILE).stat().st_mtime + 10
    os.utime(copy.model_path(run["run_id"]), (later, later))  # a resumed run's newer model.pt
    with pytest.raises(ValueError, match=r"the dataset of run .* cannot be loaded .*dataset path not found"):
        ood_detector(run, copy)


@pytest.fixture
def folder(trained, tmp_path) -> tuple[Path, list[str]]:
    """Three of the run's own test images as lossless PNGs at its size, two ISIC photos, one corrupt file and a
    text file (not an image: not counted)."""
    _, run, _, data = trained
    root = tmp_path / "new-images"
    root.mkdir()
    test_ids = list(data.table["image_id"].iloc[data.indices("test")[:3]])
    for image_id in test_ids:
        row = int(np.flatnonzero(data.table["image_id"].to_numpy() == image_id)[0])
        Image.fromarray(data.images[row]).save(root / f"{image_id}.png")
    for photo in isic_photos(2):
        shutil.copy(photo, root / photo.name)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "notes.txt").write_text("not an image")
    return root, test_ids


def test_predict_on_a_folder_skips_the_corrupt_file_and_matches_the_stored_predictions(trained, folder):
    store, run, small, _ = trained
    root, test_ids = folder
    paths = image_files(root)
    result = predict_images([run, small], store, paths)
    assert list(result.table.columns) == list(PREDICTION_COLUMNS)
    assert result.images == 5 and len(result.table) == 5 * 2, "one row per readable image and run"
    assert [name for name, _ in result.skipped] == ["broken.jpg"]
    assert list(result.table["run_id"][:2]) == [run["run_id"], small["run_id"]], "each image's runs together"
    for one in (run, small):
        rows = result.table[result.table["run_id"] == one["run_id"]]
        threshold = one["config"]["threshold"]
        assert (rows["threshold"] == threshold).all()
        assert (rows["decision"] == np.where(rows["prob_malignant"] >= threshold, "malignant", "benign")).all()
        assert rows["ood_score"].notna().all() and (rows["out_of_distribution"] == (
            rows["ood_score"] > rows["ood_threshold"])).all()
    assert run["config"]["threshold"] == 0.3

    stored = store.predictions(run["run_id"]).set_index("image_id")["prob_malignant"]
    mine = result.table[result.table["run_id"] == run["run_id"]].set_index("image")["prob_malignant"]
    for image_id in test_ids:
        assert mine[f"{image_id}.png"] == pytest.approx(stored[image_id], abs=1e-6)

    uploads = [(path.name, path.read_bytes()) for path in sorted(root.iterdir())]
    from_memory = predict_uploads([run, small], store, uploads)
    pd.testing.assert_frame_equal(from_memory.table.drop(columns="path"), result.table.drop(columns="path"))
    assert from_memory.skipped[0][0] == "broken.jpg" and len(from_memory.skipped) == 2, "the text file too"


def test_the_cli_prints_only_the_table_and_writes_the_csv_and_one_figure_per_image(trained, folder, tmp_path, capsys):
    from core.cli import main

    store, run, _, _ = trained
    root, _ = folder
    out, cams = tmp_path / "out" / "predictions.csv", tmp_path / "cams"
    assert main(["predict", run["run_id"], "--images", str(root), "--out", str(out), "--cams", str(cams),
                 "--runs-dir", str(store.root)]) == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert lines[0].split() == ["image", "model", "P", "decision", "OOD"]
    assert len(lines) == 1 + 5 and all("ResNet18" in line for line in lines[1:])
    table = pd.read_csv(out)
    assert list(table.columns) == list(PREDICTION_COLUMNS) and len(table) == 5
    assert len(list(cams.glob("*.png"))) == 5
    assert "skipped 1 unreadable image(s) of 6" in captured.err
    flagged = int(table["out_of_distribution"].sum())
    assert flagged >= 1 and f"{flagged} of 5 images look unlike run {run['run_id']}'s training data" in captured.err

    assert main(["predict", "--images", str(tmp_path / "nowhere"), "--out", str(out),
                 "--runs-dir", str(store.root)]) == 2
    assert "is not a folder" in capsys.readouterr().err


def prediction_table(app: AppTest) -> pd.DataFrame:
    return next(frame.value for frame in app.dataframe if "prob_malignant" in frame.value.columns)


def open_page(page: str, **state) -> AppTest:
    app = AppTest.from_file(APP, default_timeout=120)
    for key, value in state.items():
        app.session_state[key] = value
    app.run()
    app.switch_page(f"pages/{page}.py").run()
    assert not app.exception, app.exception
    return app


@pytest.mark.slow
def test_the_predict_page_predicts_a_folder_and_uploads(pages_store, trained, folder):
    _, run, _, _ = trained
    root, _ = folder
    app = open_page("predict")
    assert app.title[0].value == "Predict"
    assert app.multiselect(key=PREDICT_RUNS).value == [run["run_id"]], "the newest run of each model"
    assert app.button(key="predict.start").disabled, "nothing to predict yet"
    app.radio(key="widget.predict_source").set_value("Folder on the server").run()
    app.text_input(key="widget.predict_folder").input(str(root)).run()
    assert not app.exception and not app.error
    app.button(key="predict.start").click().run()
    assert not app.exception, app.exception
    shown = prediction_table(app)
    assert len(shown) == 5 and set(shown["image"]) == {path.name for path in root.iterdir()} - {"broken.jpg",
                                                                                                  "notes.txt"}
    assert [metric.value for metric in app.metric][:3] == ["5", "1", "1"]
    assert any("look unlike run" in warning.value for warning in app.warning)
    assert app.get("download_button"), "a CSV download"

    app.radio(key="widget.predict_source").set_value("Upload images").run()
    uploads = [(path.name, path.read_bytes(), "image/png") for path in sorted(root.glob("*.png"))]
    app.file_uploader(key="predict.uploads").set_value(uploads).run()
    app.button(key="predict.start").click().run()
    assert not app.exception, app.exception
    assert len(prediction_table(app)) == 3


@pytest.mark.slow
def test_the_predict_page_queues_a_large_folder(pages_store, trained, tmp_path):
    _, run, _, data = trained
    root = tmp_path / "many"
    root.mkdir()
    for row in data.indices("test")[:30]:
        Image.fromarray(data.images[row]).save(root / f"{data.table['image_id'].iloc[row]}.png")
    app = open_page("predict")
    app.radio(key="widget.predict_source").set_value("Folder on the server").run()
    app.text_input(key="widget.predict_folder").input(str(root)).run()
    assert any("background queue" in caption.value for caption in app.caption)
    app.button(key="predict.start").click().run()
    assert not app.exception, app.exception
    assert shared_queue(pages_store).wait_until_idle(timeout=120)
    app.run()
    assert not app.exception, app.exception
    assert len(prediction_table(app)) == 30


def test_the_explain_page_flags_an_upload_unlike_the_training_images(pages_store, trained):
    store, run, _, data = trained
    detector = ood_detector(run, store)
    photos = isic_photos()
    scores = score_images(run, store, decode_images_cached([str(p) for p in photos], run_image_size(run),
                                                           None).images, detector=detector).ood_scores
    unlike = photos[int(np.argmax(scores))]
    test_rows = data.indices("test")
    own = score_images(run, store, data.images[test_rows], detector=detector).ood_scores
    like = data.images[test_rows[int(np.argmin(own))]]
    buffer = io.BytesIO()
    Image.fromarray(like).save(buffer, format="PNG")

    app = open_page("explain", **{"explain.runs": [run["run_id"]]})
    app.radio(key="widget.explain_source").set_value("Upload").run()
    app.file_uploader(key="explain.upload").set_value((unlike.name, unlike.read_bytes(), "image/jpeg")).run()
    assert not app.exception, app.exception
    assert any("unlike this model's training images — treat P(malignant) with caution" in warning.value
               for warning in app.warning)
    app.file_uploader(key="explain.upload").set_value(("own.png", buffer.getvalue(), "image/png")).run()
    assert not app.exception, app.exception
    assert not any("unlike this model's training images" in warning.value for warning in app.warning)
    assert any("like this model's training images" in caption.value for caption in app.caption)
