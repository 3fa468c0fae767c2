"""The comparison behind the Compare page, the HTML report and the page itself (AppTest)."""

import dataclasses
import re
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from core.cli import main
from core.compare import build_comparison, comparison_figures, default_comparison_runs
from core.datasets import prepare_data
from core.report import write_html_report
from core.training import run_training
from tests.conftest import TINY_CONFIG, TINY_SYNTHETIC

APP = str(Path(__file__).resolve().parents[1] / "streamlit_app.py")
MODELS = ("resnet18", "hybrid_sresnet", "efficientnet_b0")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from core.runs import RunStore

    store = RunStore(tmp_path_factory.mktemp("compare") / "runs")
    spec = dataclasses.replace(TINY_SYNTHETIC, synthetic_count=80)
    data = prepare_data(spec, TINY_CONFIG, store.cache_dir)
    for model in MODELS:
        run_training(dataclasses.replace(TINY_CONFIG, model=model, epochs=2), data, store)
    return store


def test_comparison_of_runs_on_the_same_images(trained):
    runs = default_comparison_runs(trained.list_runs())
    comparison = build_comparison(trained, runs, resamples=200)
    assert [entry.name for entry in comparison.entries] == ["ResNet18", "EfficientNetB0", "Hybrid S-ResNet"]
    assert comparison.paired
    assert comparison.delong.shape == (3, 3) and (comparison.delong.diagonal() == 1).all()
    assert len(comparison.readings) == 2
    row = comparison.table.iloc[0]
    assert row["AUC low"] <= row["AUC"] <= row["AUC high"]
    figures = comparison_figures(comparison)
    assert {"Confusion matrices (test)", "ROC curves", "Precision-recall curves", "Calibration",
            "DeLong p-values (AUC)", "McNemar p-values (accuracy)", "Training curves"} <= set(figures)


def test_operating_point_at_sensitivity_is_chosen_on_validation(trained):
    runs = default_comparison_runs(trained.list_runs())
    comparison = build_comparison(trained, runs, target_sensitivity=0.9, resamples=50)
    for entry in comparison.entries:
        val = entry.val
        called = val["prob_malignant"] >= entry.threshold
        assert called[val["label"] == 1].mean() >= 0.9


def test_unpaired_runs_get_no_tests(trained, tmp_path):
    runs = default_comparison_runs(trained.list_runs())
    other = dict(runs[0])
    predictions = trained.predictions(other["run_id"])
    shuffled = predictions.assign(image_id=predictions["image_id"] + "_other")
    folder = trained.root / "other-run"
    folder.mkdir(exist_ok=True)
    shuffled.to_csv(folder / "predictions.csv", index=False)
    other["run_id"] = "other-run"
    comparison = build_comparison(trained, [runs[1], other], resamples=50)
    assert not comparison.paired and comparison.delong is None


def test_html_report_is_self_contained(trained, tmp_path):
    comparison = build_comparison(trained, default_comparison_runs(trained.list_runs()), resamples=50)
    path = write_html_report(comparison, tmp_path / "report.html")
    text = path.read_text()
    assert not re.search(r"<script[^>]*\bsrc=", text), "no script is loaded from elsewhere"
    assert text.count("<script") >= 10 and "Plotly.newPlot" in text
    for title in ("ROC curves", "Calibration", "DeLong p-values (AUC)", "Hybrid S-ResNet"):
        assert title in text


def test_cli_compare_writes_the_report(trained, tmp_path, capsys):
    assert main(["compare", "--runs-dir", str(trained.root), "--resamples", "100",
                 "--report", str(tmp_path / "out.html")]) == 0
    assert (tmp_path / "out.html").stat().st_size > 100_000
    assert main(["compare", "--runs-dir", str(trained.root), "--report", "/no/such/dir/x.html"]) == 2


def test_compare_page_with_runs_and_threshold_modes(trained, monkeypatch):
    monkeypatch.setenv("SKIN_RUNS_DIR", str(trained.root))
    app = AppTest.from_file(APP, default_timeout=60).run()
    app.switch_page("pages/compare.py").run()
    assert not app.exception, app.exception
    assert len(app.dataframe[0].value) == 3
    assert len(app.get("plotly_chart")) >= 9
    app.radio(key="widget.compare_mode").set_value("At sensitivity ≥ X").run()
    assert not app.exception
    app.slider(key="widget.compare_sensitivity").set_value(0.95).run()
    assert not app.exception
    app.button(key="compare.build_report").click().run()
    assert not app.exception
    assert app.get("download_button")


def test_compare_page_without_runs_points_to_train(tmp_path, monkeypatch):
    monkeypatch.setenv("SKIN_RUNS_DIR", str(tmp_path / "empty"))
    app = AppTest.from_file(APP, default_timeout=60).run()
    app.switch_page("pages/compare.py").run()
    assert not app.exception
    assert "Train models first" in app.info[0].value
