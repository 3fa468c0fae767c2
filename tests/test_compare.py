"""The comparison behind the Compare page, the HTML report and the page itself (AppTest)."""

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from core.cli import main
from core.data.datasets import prepare_data
from core.evaluation.compare import build_comparison, comparison_figures, default_comparison_runs
from core.report import write_html_report
from core.training.loop import run_training
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


def plotly_figures_in(html_text: str) -> list[dict]:
    """The data and layout of every figure of a report, as plotly.js receives them."""
    import json

    decoder, figures = json.JSONDecoder(), []
    for match in re.finditer(r"Plotly\.newPlot\(\s*\"[^\"]+\",\s*", html_text):
        data, end = decoder.raw_decode(html_text, match.end())
        layout, _ = decoder.raw_decode(html_text, html_text.index("{", end))
        figures.append({"data": data, "layout": layout})
    return figures


def test_report_made_where_streamlit_is_imported_has_the_model_colours_and_names(trained):
    """Importing streamlit makes its placeholder template ("#000001" ...) plotly's default; the report
    built on the page then had black bars and heatmaps without model names."""
    import plotly.io as pio
    import streamlit  # noqa: F401 - its import is what changed the default template

    from core.figures import MODEL_COLOURS
    from core.report import report_html

    assert pio.templates.default == "streamlit"
    comparison = build_comparison(trained, default_comparison_runs(trained.list_runs()), resamples=50)
    text = report_html(comparison)
    placeholders = set(re.findall(r'"#0000[0-4]\d"', text)) - {'"#000000"'}
    assert not placeholders, f"Streamlit placeholder colours reached the report: {placeholders}"
    figures = plotly_figures_in(text)
    assert len(figures) == len(comparison_figures(comparison))
    names = [entry.name for entry in comparison.entries]
    bars = [figure for figure in figures if figure["data"] and figure["data"][0]["type"] == "bar"]
    assert len(bars) == 3
    for figure in bars:
        assert {trace["name"]: trace["marker"]["color"] for trace in figure["data"]} == {
            name: MODEL_COLOURS[name] for name in names}
    heatmaps = [figure for figure in figures if "p-values" in str(figure["layout"].get("title"))]
    assert len(heatmaps) == 2
    for figure in heatmaps:
        assert figure["layout"]["xaxis"]["ticktext"] == names and figure["layout"]["yaxis"]["ticktext"] == names
        assert figure["layout"]["xaxis"]["automargin"] and figure["layout"]["yaxis"]["automargin"]
    assert all(f["layout"]["template"]["layout"]["colorway"][0] != "#000001" for f in figures)


def test_p_values_are_written_one_way_everywhere(trained):
    from core.figures import p_value_matrix_figure
    from core.formatting import format_p_value

    assert [format_p_value(p) for p in (0.0, 0.00099, 0.001, 0.0271757, 0.5, 1.0, float("nan"))] == [
        "< 0.001", "< 0.001", "0.001", "0.027", "0.500", "1.000", "--"]
    figure = p_value_matrix_figure(["A", "B"], np.array([[1.0, 1e-7], [1e-7, 1.0]]), "McNemar")
    assert figure.data[0].text[0][1] == "< 0.001", "a tiny p-value printed as 0.000"
    comparison = build_comparison(trained, default_comparison_runs(trained.list_runs()), resamples=50)
    for line in comparison.readings:
        assert not re.search(r"p = 0\.000\b|e-\d", line), line


def without_timestamp(text: str) -> str:
    return re.sub(r"Written \d{4}-\d\d-\d\d \d\d:\d\d", "Written", text)


def test_cli_and_page_write_the_same_report_and_state_the_operating_point(trained, tmp_path, capsys):
    from core.report import report_html

    runs = default_comparison_runs(trained.list_runs())
    assert main(["compare", "--runs-dir", str(trained.root), "--sensitivity", "0.9",
                 "--report", str(tmp_path / "cli.html")]) == 0
    assert "operating point: sensitivity ≥ 0.90" in capsys.readouterr().err
    page_report = report_html(build_comparison(trained, runs, None, 0.9))  # what the page's button builds
    cli_report = (tmp_path / "cli.html").read_text(encoding="utf-8")
    assert without_timestamp(cli_report) == without_timestamp(page_report)
    assert "Operating point:</b> sensitivity ≥ 0.90" in cli_report
    assert "test sensitivity can fall below 0.90" in cli_report
    assert main(["compare", "--runs-dir", str(trained.root), "--threshold", "0.3", "--format", "csv"]) == 0
    assert "decision threshold 0.30" in capsys.readouterr().err
    assert main(["compare", "--runs-dir", str(trained.root), "--threshold", "1.5"]) == 2


def test_defaults_are_ordinary_training_runs_and_tagged_runs_say_what_they_are(trained, tmp_path, capsys):
    import json
    import shutil

    from core.runs import RunStore, run_label

    store = RunStore(tmp_path / "runs")
    shutil.copytree(trained.root, store.root)
    newest = store.list_runs()[0]
    for run, tags in ((newest, {"study": "hybrid-ham", "trial": 3}), (store.list_runs()[1],
                                                                      {"ablation": "ablation-components",
                                                                       "cell": "ResNet18 baseline"})):
        path = store.root / run["run_id"] / "run.json"
        record = json.loads(path.read_text())
        record.update(tags=tags, created_at=record["created_at"] + 3600)  # newer than every ordinary run
        path.write_text(json.dumps(record))
    runs = store.list_runs()
    assert {run["model"] for run in runs[:2]} and all(run.get("tags") for run in runs[:2])
    defaults = default_comparison_runs(runs)
    assert all(not run.get("tags") for run in defaults)
    assert len(defaults) == len(MODELS) - 2
    labels = [run_label(run, "X") for run in runs[:2]]
    assert labels[0] == f"X · Tune trial 3 of study hybrid-ham · {runs[0]['run_id']}"
    assert labels[1] == f"X · Ablation: ResNet18 baseline (study ablation-components) · {runs[1]['run_id']}"
    assert main(["list", "--runs-dir", str(store.root)]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].endswith("[Tune trial 3 of study hybrid-ham]") and "[" not in listing[-1]


def test_per_image_table_finds_disagreements_and_confident_mistakes():
    import pandas as pd

    from core.evaluation.compare import Comparison, ModelPredictions, filter_images, per_image_table

    def entry(name, probabilities, threshold=0.5):
        test = pd.DataFrame({"image_id": ["a", "b", "c", "d"], "split": "test", "label": [1, 0, 1, 0],
                             "prob_malignant": probabilities})
        return ModelPredictions(name, {"run_id": name}, test.iloc[:0], test, threshold)

    entries = [entry("M1", [0.9, 0.2, 0.4, 0.95]), entry("M2", [0.8, 0.6, 0.45, 0.7], threshold=0.65)]
    table = per_image_table(Comparison(entries, pd.DataFrame(), paired=True))
    assert table["called malignant"].tolist() == [2, 0, 0, 2]  # M2's 0.6 on b is below its 0.65
    assert table["models disagree"].tolist() == [False, False, False, False]
    entries[1] = entry("M2", [0.8, 0.6, 0.45, 0.7], threshold=0.5)
    table = per_image_table(Comparison(entries, pd.DataFrame(), paired=True))
    assert table["models disagree"].tolist() == [False, True, False, False]
    assert table["models wrong"].tolist() == [0, 1, 2, 2]
    assert table["worst mistake"].round(3).tolist() == [0.0, 0.6, 0.6, 0.95]
    assert filter_images(table, "Most confident mistakes")["image_id"].tolist() == ["d", "b", "c"]
    assert filter_images(table, "Models disagree at their thresholds")["image_id"].tolist() == ["b"]
    assert filter_images(table, "True malignant")["image_id"].tolist() == ["a", "c"]
    assert table["spread"].round(3).tolist() == [0.1, 0.4, 0.05, 0.25]


def test_cli_compare_writes_the_report(trained, tmp_path, capsys):
    assert main(["compare", "--runs-dir", str(trained.root), "--resamples", "100",
                 "--report", str(tmp_path / "out.html")]) == 0
    assert (tmp_path / "out.html").stat().st_size > 100_000
    assert main(["compare", "--runs-dir", str(trained.root), "--report", "/no/such/dir/x.html"]) == 2


@pytest.mark.slow
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


@pytest.mark.slow
def test_compare_page_states_its_runs_and_sends_disagreements_to_explain(trained, monkeypatch):
    from pages.common import EXPLAIN_REQUEST, FROM_COMPARE

    monkeypatch.setenv("SKIN_RUNS_DIR", str(trained.root))
    app = AppTest.from_file(APP, default_timeout=60).run()
    app.switch_page("pages/compare.py").run()
    assert not app.exception, app.exception
    assert any("newest completed training run of each model" in caption.value for caption in app.caption)
    assert any("pAUC (TPR ≥ 0.8, ISIC 2024)" in caption.value and "0.02 a random one" in caption.value
               and "AUC (sens ≥ 0.8, ISIC 2017–19)" in caption.value for caption in app.caption)
    assert {"AUC (sens ≥ 0.8, ISIC 2017–19)", "pAUC (TPR ≥ 0.8, ISIC 2024)", "Average precision"} <= set(
        app.dataframe[0].value.columns)
    table = app.dataframe[0].value
    assert list(table.columns[:5]) == ["Model", "Threshold", "AUC", "Sensitivity (recall)", "Specificity"]
    app.selectbox(key="compare.explorer_filter").set_value("True malignant").run()
    assert not app.exception, app.exception
    shown = app.dataframe[-1].value  # the explorer's table, last on the page
    assert set(shown["true class"]) == {"malignant"}
    app.button(key="compare.explain_picked").click().run()
    assert EXPLAIN_REQUEST not in app.session_state, "Explain consumes the request once"
    request = app.session_state[FROM_COMPARE]
    runs = default_comparison_runs(trained.list_runs())
    assert request["run_ids"] == [run["run_id"] for run in runs]
    assert request["image_ids"] == shown["image_id"].head(20).tolist()


def test_compare_page_without_runs_points_to_train(tmp_path, monkeypatch):
    monkeypatch.setenv("SKIN_RUNS_DIR", str(tmp_path / "empty"))
    app = AppTest.from_file(APP, default_timeout=60).run()
    app.switch_page("pages/compare.py").run()
    assert not app.exception
    assert "Train models first" in app.info[0].value
