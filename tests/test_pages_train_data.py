"""The Train and Data pages' rough edges (issue 17): the run table, the ImageNet toggle, the CPU-contention
warning, and the Data page's size note, given splits and path errors. AppTest for the pages, plain
tests for what they call in core/."""

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from core.config import DataSpec, TrainConfig
from core.data.datasets import EXPECTED_LAYOUTS, DatasetError, describe_given_split, detect_format, prepare_data
from core.models import cached_imagenet_path, get_model_spec
from core.runs import RunStore
from core.training.callbacks import BatchProgress
from core.training.precision import contention_warning, live_contention_warning, timed_images_per_second
from pages.common import DATA_SPEC, VALUE_PREFIX
from tests.conftest import TINY_SYNTHETIC, write_image
from tests.test_pages import open_page

APP = str(Path(__file__).resolve().parents[1] / "streamlit_app.py")
TINY_VALUES = {"epochs": 1, "batch_size": 8, "image_size": 32, "split": "70:30", "val_fraction": 0.25,
               "synthetic_count": 40, "synthetic_image_size": 64}


@pytest.fixture
def offline(monkeypatch):
    """No network: torchvision's weights server does not answer (and the page's cached answer is cleared)."""
    def unreachable(request, timeout):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", unreachable)
    st.cache_data.clear()
    yield
    st.cache_data.clear()


@pytest.fixture
def app(tmp_path, monkeypatch, offline):
    monkeypatch.setenv("SKIN_RUNS_DIR", str(tmp_path / "runs"))
    test = AppTest.from_file(APP, default_timeout=60)
    for name, value in TINY_VALUES.items():
        test.session_state[VALUE_PREFIX + name] = value
    return test


def run_table(app: AppTest):
    return next(frame for frame in app.dataframe if "Test AUC" in frame.value.columns)


# The run table.

def store_runs(root: Path) -> tuple[dict, dict]:
    """A run still training (this process's pid, no metrics yet) and a finished tuning trial."""
    store = RunStore(root)
    config = TrainConfig(model="resnet18", epochs=3, batch_size=8, image_size=32).to_dict()
    running = store.create("resnet18", {"config": config, "weights": "random", "metrics": {}, "history": []})
    trial = store.create("hybrid_sresnet", {"config": config, "weights": "random", "history": [],
                                            "tags": {"study": "hybrid-ham", "trial": 3}})
    trial.update(status="completed", seconds=12.5,
                 metrics={"val": {"auc": 0.81, "accuracy": 0.75}, "test": {"auc": 0.79, "accuracy": 0.7}})
    return running.record, trial.record


def test_run_table_shows_no_none_names_purposes_and_fits_its_text_columns(app, tmp_path):
    running, trial = store_runs(tmp_path / "runs")
    app.session_state[DATA_SPEC] = TINY_SYNTHETIC
    open_page(app, "train")
    frame = run_table(app)
    rows = frame.value.set_index("Run")
    assert rows.loc[running["run_id"], "Status"] == "running"
    # Missing values stay missing (shown as the placeholder), never the text "None".
    assert rows.loc[running["run_id"], ["Val AUC", "Test AUC", "Seconds"]].isna().all()
    assert frame.proto.placeholder == "—"
    assert not (frame.value.astype(str) == "None").any().any()
    assert rows.loc[running["run_id"], "Purpose"] == "Training"
    assert rows.loc[trial["run_id"], "Purpose"] == "Tune trial 3 of study hybrid-ham"
    assert rows.loc[trial["run_id"], "Test AUC"] == pytest.approx(0.79)
    columns = json.loads(frame.proto.columns)
    assert {name: columns[name]["width"] for name in ("Model", "Status", "Purpose")} == {
        "Model": 130, "Status": 150, "Purpose": 200}
    # The delete list (the running run is not deletable) names the trial the way every page does.
    assert app.selectbox(key="train.delete_choice").options == [f"Hybrid S-ResNet · Tune trial 3 of study "
                                                                 f"hybrid-ham · {trial['run_id']}"]


# The ImageNet toggle, before Start.

def test_imagenet_toggle_says_before_start_that_weights_are_missing_offline(app):
    open_page(app, "train")
    assert app.toggle(key="widget.pretrained").value is False, "off by default: the run could not get them"
    captions = " ".join(caption.value for caption in app.caption)
    assert "ImageNet weights are not in the cache and there is no network" in captions
    assert "random initialisation" in app.toggle(key="widget.pretrained").help


def test_imagenet_toggle_is_on_and_quiet_when_the_cache_holds_the_weights(app):
    path = cached_imagenet_path(get_model_spec("resnet18"))  # the Hybrid S-ResNet's backbone file
    path.parent.mkdir(parents=True)
    path.write_bytes(b"")
    open_page(app, "train")
    assert app.toggle(key="widget.pretrained").value is True
    assert not any("not in the cache" in caption.value for caption in app.caption)
    app.multiselect(key="widget.models").set_value(["hybrid_sresnet", "resnet50"]).run()
    assert any("ImageNet weights of ResNet50 are not in the cache and there is no network" in caption.value
               for caption in app.caption)


def test_imagenet_toggle_says_weights_will_be_downloaded_when_online(app, monkeypatch):
    class Answer:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(urllib.request, "urlopen", lambda request, timeout: Answer())
    open_page(app, "train")
    assert app.toggle(key="widget.pretrained").value is True
    assert any("downloads them when the run starts" in caption.value for caption in app.caption)


# CPU contention.

def test_contention_warning_flags_a_third_of_the_timed_speed_and_not_nine_tenths():
    message = contention_warning(12, 36, "cpu", load=3.9, cores=2)
    assert message == ("Training runs at 12 img/s, 33% of the 36 img/s timed at start: another process may be "
                       "using the CPU (load average 3.9 on 2 cores).")
    assert contention_warning(33, 36, "cpu", load=3.9, cores=2) is None
    assert contention_warning(12, None) is None, "no timing (a requested precision): nothing to compare"


def test_timed_speed_comes_from_the_chosen_plan_in_run_json():
    run = {"config": {"batch_size": 32},
           "environment": {"device": "cpu", "precision": "bf16", "memory_format": "channels_last",
                           "step_seconds": {"fp32+channels_last": 2.0, "bf16+channels_last": 0.8}}}
    assert timed_images_per_second(run) == pytest.approx(40.0)
    assert timed_images_per_second({"config": {"batch_size": 32}, "environment": {"precision": "fp32"}}) is None

    def progress(batch, rate, epoch=1):
        return BatchProgress("run", "hybrid_sresnet", epoch, 2, batch, 40, 0.6, rate, 10.0, 60.0)

    assert live_contention_warning(progress(10, 12.0), run).startswith("Training runs at 12 img/s, 30% of the 40")
    assert live_contention_warning(progress(1, 12.0), run) is None, "the first batches are warm-up"
    assert live_contention_warning(progress(1, 12.0, epoch=2), run) is not None
    assert live_contention_warning(progress(10, 35.0), run) is None
    run["environment"]["precision_chosen_by"] = "cache"
    assert "of the 40 img/s timed for this setup earlier:" in live_contention_warning(progress(10, 12.0), run)


# The Data page.

def test_data_page_explains_the_drawing_size_of_the_synthetic_set(app):
    open_page(app, "data")
    assert any("drawn at 64 px; the models see it resized to the training image size, 32 px" in caption.value
               for caption in app.caption)


def test_bad_path_message_fits_the_page_and_the_cli_keeps_its_own(app, tmp_path):
    open_page(app, "data")
    app.radio(key="widget.source_kind").set_value("Local dataset").run()
    app.text_input(key="widget.data_path").input(str(tmp_path / "no-such-folder")).run()
    message = app.error[0].value
    assert "dataset path not found" in message and "class sub-folders" in message
    assert "the word" not in message and "synthetic set above" in message
    with pytest.raises(DatasetError) as cli_error:
        detect_format(str(tmp_path / "no-such-folder"))
    assert EXPECTED_LAYOUTS in str(cli_error.value) and "the word 'synthetic'" in str(cli_error.value)


@pytest.fixture
def csv_with_official_split(tmp_path):
    """ISIC's layout: labels.csv (image_id, melanoma, official_split) beside images/; 8 val rows of 48."""
    root = tmp_path / "isic-like"
    lines = ["image_id,melanoma,official_split"]
    for index in range(48):
        label = int(index % 3 == 0)
        write_image(root / "images" / f"ISIC_{index:07d}.jpg", colour=(60 + 100 * (1 - label), 40, 30 + index))
        lines.append(f"ISIC_{index:07d},{label},{'val' if index < 8 else 'train'}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


def test_data_page_says_validation_is_the_csvs_official_split_and_test_is_drawn(app, csv_with_official_split):
    open_page(app, "data")
    app.radio(key="widget.source_kind").set_value("Local dataset").run()
    app.text_input(key="widget.data_path").input(str(csv_with_official_split)).run()
    assert not app.exception and not app.error
    data = prepare_data(app.session_state[DATA_SPEC], TrainConfig(image_size=32, split="70:30", val_fraction=0.25),
                        None)
    counts = data.table["split"].value_counts()
    assert counts["val"] == 8, "the CSV's val rows are the validation part"
    sentence = next(caption.value for caption in app.caption if caption.value.startswith("Validation"))
    assert sentence == ("Validation is the dataset's official split: the 8 images marked val in the CSV's split "
                        "column ('Validation share of train' is not used); test is drawn from the other 40 "
                        "images: about 30% of them (Train:test 70:30), stratified by class.")
    assert 0.2 <= counts["test"] / 40 <= 0.4


def test_given_split_is_described_only_when_the_dataset_gives_one(tmp_path):
    config = TrainConfig(image_size=32, split="80:20")
    synthetic = prepare_data(TINY_SYNTHETIC, config, tmp_path / "cache")
    assert describe_given_split(synthetic, config) is None
    for index in range(6):
        write_image(tmp_path / "split" / "train" / "Cancer" / f"c{index}.jpg")
        write_image(tmp_path / "split" / "train" / "NotCancer" / f"n{index}.jpg", colour=(200, 150, 120))
        write_image(tmp_path / "split" / "test" / ("Cancer" if index % 2 else "NotCancer") / f"t{index}.jpg")
    folders = prepare_data(DataSpec(source=str(tmp_path / "split")), config, None)
    assert describe_given_split(folders, config) == (
        "Validation is about 15% of the training part, drawn stratified by class; test is the 6 images in its "
        "test folder.")


def test_a_lone_precision_candidate_is_timed_so_live_speed_has_a_reference(tmp_path, monkeypatch):
    import torch

    import core.training.precision
    from core.environment import describe_environment
    from core.models import build_model
    from core.training.precision import choose_execution_plan

    monkeypatch.setattr(core.training.precision, "bf16_supported", lambda device: False)  # a CPU without bfloat16
    config = TrainConfig(model="resnet18", batch_size=4, image_size=32, precision="auto")
    model, _ = build_model("resnet18", pretrained=False)
    plan = choose_execution_plan(model, config, torch.device("cpu"), tmp_path)
    assert plan.name == "fp32+channels_last" and plan.chosen_by == "default"
    assert list(plan.step_seconds) == ["fp32+channels_last"]
    run = {"config": config.to_dict(), "environment": describe_environment(torch.device("cpu"), plan)}
    assert timed_images_per_second(run) == pytest.approx(4 / plan.step_seconds["fp32+channels_last"])
    assert choose_execution_plan(model, config, torch.device("cpu"), tmp_path).chosen_by == "cache"
