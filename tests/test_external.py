"""External validation: `python -m core evaluate`, stored and reused predictions, the test-set choice in
comparisons, and the shift between a run's own test part and another dataset."""

import contextlib
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from core.cli import main
from core.data.images import decode_image
from core.evaluation.compare import build_comparison
from core.evaluation.external import INTERNAL_TEST, common_external_sets, evaluated_sets
from core.evaluation.inference import apply_run
from core.evaluation.shift import shift_rows, shift_table
from core.runs import RunStore
from tests.conftest import shared_isic_2017

TINY_FLAGS = ["--data", "synthetic", "--synthetic-count", "40", "--synthetic-image-size", "48", "--epochs", "1",
              "--batch-size", "8", "--no-pretrained", "--precision", "fp32", "--split", "70:30"]


def lesion_folder(root: Path, count: int = 8) -> Path:
    """An image-folder set (malignant/ benign/, JPEG and PNG, odd sizes): laid out unlike the training set."""
    rng = np.random.default_rng(5)
    for index in range(count):
        for name, tone in (("malignant", 60), ("benign", 170)):
            pixels = np.clip(rng.normal(tone, 40, size=(37 + index, 45, 3)), 0, 255).astype(np.uint8)
            path = root / name / f"{name}_{index}.{'png' if index % 2 else 'jpg'}"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path)
    return root


@pytest.fixture(scope="module")
def trained_pair(tmp_path_factory):
    """A resnet18 at 32 px and a Hybrid S-ResNet at 48 px, trained by the CLI once for this module."""
    runs_dir = tmp_path_factory.mktemp("external") / "runs"
    run_ids = []
    for model, size in (("resnet18", 32), ("hybrid_sresnet", 48)):
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(io.StringIO()):
            assert main(["train", "--model", model, *TINY_FLAGS, "--image-size", str(size),
                         "--runs-dir", str(runs_dir)]) == 0
        run_ids.append(printed.getvalue().split()[-1])
    return runs_dir, *run_ids


@pytest.fixture
def two_runs(trained_pair, tmp_path):
    """This test's own copy of the pair: evaluations are stored with the runs."""
    trained, small, large = trained_pair
    shutil.copytree(trained, tmp_path / "runs")
    return tmp_path / "runs", small, large


def test_evaluate_stores_reuses_and_prints_compares_table(tmp_path, capsys, two_runs):
    runs_dir, small, large = two_runs
    external = lesion_folder(tmp_path / "other-clinic")
    evaluate = ["evaluate", small, large, "--data", str(external), "--format", "csv", "--runs-dir", str(runs_dir)]
    assert main(evaluate) == 0
    captured = capsys.readouterr()
    table = pd.read_csv(pd.io.common.StringIO(captured.out))
    assert "2 run(s) evaluated, 0 reused" in captured.err
    assert list(table["Run"]) == [small, large]

    store = RunStore(runs_dir)
    sets = common_external_sets(store, [store.load(small), store.load(large)])
    assert len(sets) == 1 and sets[0].name == "other-clinic" and sets[0].images == 16 and sets[0].malignant == 8
    folder = runs_dir / small / "external" / sets[0].key
    record = json.loads((folder / "dataset.json").read_text())
    assert record["spec"]["source"] == str(external) and record["format"] == "imagefolder"
    assert record["fingerprint"] == sets[0].key and record["files_fingerprint"]
    stored = pd.read_csv(folder / "predictions.csv")
    assert len(stored) == 16 and set(stored["split"]) == {"external"}

    # The same table as compare's on that set: same columns, same values.
    assert main(["compare", "--runs", small, large, "--test-set", "other-clinic", "--format", "csv",
                 "--runs-dir", str(runs_dir)]) == 0
    assert capsys.readouterr().out == captured.out
    assert main(["compare", "--runs", small, "--format", "csv", "--runs-dir", str(runs_dir)]) == 0
    assert list(pd.read_csv(pd.io.common.StringIO(capsys.readouterr().out)).columns) == list(table.columns)

    # Again: nothing is computed, the table is the same.
    assert main(evaluate) == 0
    again = capsys.readouterr()
    assert "0 run(s) evaluated, 2 reused" in again.err and again.out == captured.out

    # A changed file makes the stored predictions stale.
    changed = next((external / "benign").glob("*.jpg"))
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    assert main(["evaluate", small, "--data", str(external), "--runs-dir", str(runs_dir)]) == 0
    assert "1 run(s) evaluated, 0 reused" in capsys.readouterr().err


def test_each_run_sees_the_images_at_its_own_size(tmp_path, capsys, two_runs):
    runs_dir, small, large = two_runs
    external = lesion_folder(tmp_path / "other-clinic", count=3)
    assert main(["evaluate", small, large, "--data", str(external), "--runs-dir", str(runs_dir)]) == 0
    store = RunStore(runs_dir)
    (key,) = evaluated_sets(store, small)
    for run_id, size in ((small, 32), (large, 48)):
        run = store.load(run_id)
        stored = pd.read_csv(runs_dir / run_id / "external" / key / "predictions.csv").set_index("image_id")
        for image_id in stored.index:
            expected = apply_run(run, store, decode_image(external / image_id, size)[None]).probabilities[0]
            assert stored.loc[image_id, "prob_malignant"] == pytest.approx(expected, abs=1e-6)


def test_the_runs_own_predictions_are_reproduced_by_the_same_path(tmp_path, capsys, two_runs):
    """apply_run on a run's own test images gives its predictions.csv: external numbers are computed the
    way the internal ones were."""
    from core.stored_run import load_run_data

    runs_dir, small, _ = two_runs
    store = RunStore(runs_dir)
    run = store.load(small)
    data = load_run_data(run, store)
    rows = data.indices("test")
    outputs = apply_run(run, store, data.images[rows])
    stored = store.predictions(small).query("split == 'test'").set_index("image_id")
    np.testing.assert_allclose(outputs.probabilities, stored.loc[data.table["image_id"].iloc[rows], "prob_malignant"],
                               atol=1e-6)


def test_comparison_and_shift_on_an_external_set(tmp_path, capsys, two_runs):
    runs_dir, small, large = two_runs
    external = lesion_folder(tmp_path / "other-clinic")
    assert main(["evaluate", small, large, "--data", str(external), "--runs-dir", str(runs_dir)]) == 0
    store = RunStore(runs_dir)
    runs = [store.load(small), store.load(large)]
    (key,) = evaluated_sets(store, small)
    internal = build_comparison(store, runs, target_sensitivity=0.8, resamples=200)
    outside = build_comparison(store, runs, target_sensitivity=0.8, resamples=200, test_set=key)
    assert internal.test_set == INTERNAL_TEST and outside.test_set == key
    assert outside.paired, "every run was evaluated on the same external images"
    assert list(outside.table["Threshold"]) == list(internal.table["Threshold"]), "thresholds come from validation"
    assert len(outside.entries[0].test) == 16
    rows = shift_rows(internal, outside, resamples=200)
    assert [row["run"] for row in rows] == [small, large]
    for row, inside, there in zip(rows, internal.table.to_dict("records"), outside.table.to_dict("records")):
        assert row["auc_internal"] == inside["AUC"] and row["auc_external"] == there["AUC"]
        assert row["auc_change"] == pytest.approx(there["AUC"] - inside["AUC"])
        assert row["auc_change_low"] <= row["auc_change"] <= row["auc_change_high"]
        assert row["sensitivity_external"] == there["Recall"]
    text = shift_table(rows)
    assert list(text.columns[:4]) == ["Model", "Threshold (internal validation)", "AUC internal", "AUC external"]


def test_evaluate_refuses_a_missing_dataset_and_an_unknown_test_set(tmp_path, capsys, two_runs):
    runs_dir, small, _ = two_runs
    assert main(["evaluate", "--data", str(tmp_path / "nowhere"), "--runs-dir", str(runs_dir)]) == 2
    assert "dataset path not found" in capsys.readouterr().err
    assert main(["compare", "--test-set", "elsewhere", "--runs-dir", str(runs_dir)]) == 2
    assert "have not all been evaluated on 'elsewhere'" in capsys.readouterr().err


def test_evaluating_on_the_training_set_says_it_is_not_external(tmp_path, capsys, two_runs):
    runs_dir, small, _ = two_runs
    assert main(["evaluate", small, *TINY_FLAGS[:6], "--runs-dir", str(runs_dir)]) == 0
    assert "trained on this very dataset" in capsys.readouterr().err


def test_train_on_isic_2017_then_evaluate_on_an_image_folder(tmp_path, capsys):
    """The issue's check: a run trained on the real ISIC 2017 images (a small subset, 32 px), evaluated on a
    labelled set laid out differently (class folders, PNG)."""
    isic_2017 = shared_isic_2017()
    runs_dir = tmp_path / "runs"
    assert main(["train", "--model", "resnet18", "--data", str(isic_2017), "--max-images", "60", "--image-size", "32",
                 "--epochs", "1", "--batch-size", "8", "--no-pretrained", "--precision", "fp32",
                 "--runs-dir", str(runs_dir)]) == 0
    run_id = capsys.readouterr().out.split()[-1]
    used = set(pd.read_csv(runs_dir / run_id / "split.csv")["image_id"])
    labels = pd.read_csv(isic_2017 / "labels.csv")
    unused = labels[~labels["image_id"].isin(used)]
    folder = tmp_path / "isic-as-folders"
    for label, name in ((1, "Cancer"), (0, "NotCancer")):
        for image_id in unused.loc[unused["melanoma"] == label, "image_id"].head(6):
            (folder / name).mkdir(parents=True, exist_ok=True)
            source = isic_2017 / "images" / f"{image_id}.jpg"
            Image.open(source).resize((64, 48)).save(folder / name / f"{image_id}.png")
    assert main(["evaluate", run_id, "--data", str(folder), "--format", "csv", "--runs-dir", str(runs_dir)]) == 0
    captured = capsys.readouterr()
    table = pd.read_csv(pd.io.common.StringIO(captured.out))
    assert len(table) == 1 and table["Run"][0] == run_id and np.isfinite(table["AUC"][0])
    assert "12 images, 6 malignant" in captured.err
    shutil.rmtree(folder)


@pytest.mark.slow
def test_compare_page_evaluates_in_the_queue_then_shows_the_external_set_and_the_shift(tmp_path, capsys, two_runs,
                                                                                        monkeypatch):
    from streamlit.testing.v1 import AppTest

    from core.training.jobs import shared_queue

    runs_dir, small, large = two_runs
    external = lesion_folder(tmp_path / "other-clinic")
    monkeypatch.setenv("SKIN_RUNS_DIR", str(runs_dir))
    app = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "streamlit_app.py"), default_timeout=60).run()
    app.switch_page("pages/compare.py").run()
    assert not app.exception, app.exception
    assert app.selectbox(key="compare.test_set").options == ["The runs' own test part (internal)"]
    assert any("near-duplicate" in block.value for block in app.markdown)

    app.text_input(key="compare.external_path").set_value(str(tmp_path / "nowhere")).run()
    app.button(key="compare.evaluate").click().run()
    assert "dataset path not found" in app.error[0].value, "a wrong folder is refused before anything is queued"

    app.text_input(key="compare.external_path").set_value(str(external)).run()
    app.button(key="compare.evaluate").click().run()
    assert not app.exception, app.exception
    assert shared_queue(RunStore(runs_dir)).wait_until_idle(timeout=120)
    app.run()
    assert not app.exception, app.exception
    chosen = app.selectbox(key="compare.test_set")
    (external_set,) = common_external_sets(RunStore(runs_dir), [RunStore(runs_dir).load(small)])
    assert chosen.value == external_set.key, "the new set becomes the chosen test set"
    assert "other-clinic: 16 images, 8 malignant (external)" in chosen.options
    assert any("Metrics on the other-clinic images (external)" in header.value for header in app.subheader)
    assert any(header.value.startswith("Shift: internal test part vs other-clinic") for header in app.subheader)
    shift = next(frame.value for frame in app.dataframe if "AUC change" in frame.value.columns)
    assert list(shift["Model"]) == ["ResNet18", "Hybrid S-ResNet"]
    store = RunStore(runs_dir)
    assert all(evaluated_sets(store, run_id) for run_id in (small, large)), "stored with each run"
    assert app.selectbox(key="compare.subgroups_by").options == ["(choose a grouping)", "Skin tone (ITA)"]
    app.selectbox(key="compare.subgroups_by").set_value("ita").run()
    assert not app.exception, app.exception
    groups = next(frame.value for frame in app.dataframe if "Group" in frame.value.columns)
    assert set(groups["Model"]) == {"ResNet18", "Hybrid S-ResNet"}
    assert (groups.groupby("Model")["Group"].first() == "All").all()
    assert groups.loc[groups["Group"] == "All", "n"].tolist() == [16, 16]
