"""Class activation maps: every model and fast method, the caller's model untouched, sessions kept
apart, localisation on the synthetic lesions, the CLI and the Explain page."""

import dataclasses
import io
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from streamlit.testing.v1 import AppTest

from core.cams import (
    FAST_METHODS,
    CamExplainer,
    agreement_matrices,
    contour_overlay,
    energy_inside,
    explain_image,
    image_tensor,
    overlay,
    pointing_game_hit,
    top_share_iou,
)
from core.cli import main
from core.data.datasets import prepare_data
from core.models import MODEL_REGISTRY, SMALL_INPUT_SIZE, build_model, small_input_note
from core.training.loop import run_training
from tests.conftest import TINY_CONFIG, TINY_SYNTHETIC, write_crafted_pickle

APP = str(Path(__file__).resolve().parents[1] / "streamlit_app.py")


@pytest.mark.parametrize("name", list(MODEL_REGISTRY))
def test_every_model_and_fast_method_gives_a_map_of_the_image_size(name):
    model, _ = build_model(name, pretrained=False)
    explainer = CamExplainer(model, name)
    image = torch.randn(1, 3, 48, 48)
    for method in FAST_METHODS:
        result = explainer.explain(image, method, target=1)
        assert result.cam.shape == (48, 48) and np.isfinite(result.cam).all() and result.cam.min() >= 0
        heat = result.normalised()
        assert heat.min() >= 0 and heat.max() <= 1
        assert 0 <= result.probability <= 1 and result.target_class == 1


def test_a_slow_method_runs():
    model, _ = build_model("resnet18", pretrained=False)
    result = CamExplainer(model, "resnet18").explain(torch.randn(1, 3, 32, 32), "scorecam")
    assert result.cam.shape == (32, 32)


def test_the_callers_model_is_unchanged():
    model, _ = build_model("densenet121", pretrained=False)
    model.train()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    CamExplainer(model, "densenet121").explain(torch.randn(1, 3, 32, 32))
    assert model.training, "still in training mode"
    assert all(parameter.requires_grad and parameter.grad is None for parameter in model.parameters())
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())
    assert not any(module._forward_hooks or module._backward_hooks for module in model.modules())


def test_two_sessions_on_one_model_get_their_own_maps():
    # A fixed initialisation: some random ones give all-zero maps for both images, and nothing to tell apart.
    torch.manual_seed(0)
    model, _ = build_model("resnet18", pretrained=False)
    explainer = CamExplainer(model, "resnet18")
    images = [torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(seed)) for seed in (1, 2)]
    expected = [explainer.explain(image, "gradcam", target=1).cam for image in images]
    assert not np.allclose(expected[0], expected[1])
    failures = []

    def session(index):
        for _ in range(8):
            cam = explainer.explain(images[index], "gradcam", target=1).cam
            if not np.allclose(cam, expected[index], atol=1e-5):
                failures.append(index)

    threads = [threading.Thread(target=session, args=(index,)) for index in (0, 1, 0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures


def test_measures_on_constructed_maps():
    mask = np.zeros((10, 10), dtype=np.uint8)
    mask[2:5, 2:5] = 1
    inside = np.zeros((10, 10), dtype=np.float32)
    inside[3, 3] = 1.0
    assert energy_inside(inside, mask) == 1.0 and pointing_game_hit(inside, mask)
    assert np.isnan(energy_inside(np.zeros((10, 10)), mask))
    ramp = np.tile(np.arange(10, dtype=np.float32), (10, 1))
    assert top_share_iou(ramp, ramp) == 1.0 and top_share_iou(ramp, ramp[:, ::-1]) == 0.0
    image = np.full((10, 10, 3), 128, dtype=np.uint8)
    from core.cams import CamResult

    assert CamResult("resnet18", np.full((4, 4), 0.3, np.float32), 0.6, 1, "gradcam").uniform
    assert not CamResult("resnet18", ramp, 0.6, 1, "gradcam").uniform
    assert overlay(image, ramp / 9).shape == (10, 10, 3) and contour_overlay(image, ramp / 9).shape == (10, 10, 3)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The Hybrid S-ResNet trained for a few epochs on the synthetic set at 96 px (at 64 px the last
    feature map is 2 x 2 and no CAM can localise)."""
    from core.runs import RunStore

    store = RunStore(tmp_path_factory.mktemp("cams") / "runs")
    spec = dataclasses.replace(TINY_SYNTHETIC, synthetic_count=300, synthetic_image_size=96)
    config = dataclasses.replace(TINY_CONFIG, model="hybrid_sresnet", epochs=6, image_size=96, batch_size=16,
                                 precision="auto")
    data = prepare_data(spec, config, store.cache_dir)
    run = run_training(config, data, store)
    return store, run, data


@pytest.mark.slow
def test_a_run_explainer_hooks_the_layer_for_its_image_size(trained):
    from core.cams import explainer_for_run
    from core.stored_run import load_trained_model

    store, run, data = trained
    explainer = explainer_for_run(run, store.model_path(run["run_id"]))
    spec = MODEL_REGISTRY["hybrid_sresnet"]
    assert explainer.target_layer is spec.small_input_layer(explainer.model), "96 px: the stride-8 stage"
    result = explainer.explain(image_tensor(data.images[data.indices("test")[0]]), target=1)
    assert result.layer == "backbone.layer2, 12×12"
    assert result.method == explainer.default_method == "hirescam", "the registry's method for small inputs"
    unsized = CamExplainer(load_trained_model(run, store.model_path(run["run_id"])), "hybrid_sresnet")
    assert unsized.target_layer is spec.target_layer(unsized.model), "no size given: the last stage, as before"


@pytest.mark.slow
def test_a_trained_model_looks_at_the_lesion_more_than_a_random_map(trained):
    from core.stored_run import load_trained_model

    store, run, data = trained
    assert run["metrics"]["test"]["auc"] > 0.8
    explainer = CamExplainer(load_trained_model(run, store.model_path(run["run_id"])), "hybrid_sresnet")
    malignant = [row for row in data.indices("test") if data.table["label"].iloc[row] == 1]
    rng = np.random.default_rng(0)
    ours, random_maps = [], []
    for row in malignant:
        result = explainer.explain(image_tensor(data.images[row]), "gradcam", target=1)
        if result.all_zero:
            continue
        ours.append(energy_inside(result.cam, data.masks[row]))
        random_maps.append(energy_inside(rng.random(result.cam.shape), data.masks[row]))
    assert len(ours) >= 5
    print(f"CAM energy inside the lesion: {np.mean(ours):.3f}, random maps: {np.mean(random_maps):.3f}")
    assert np.mean(ours) > np.mean(random_maps) + 0.03


@pytest.mark.slow
def test_cli_explain_writes_the_figure(trained, tmp_path):
    store, run, data = trained
    Image.fromarray(data.images[0]).save(tmp_path / "lesion.png")
    assert main(["explain", "--image", str(tmp_path / "lesion.png"), "--runs-dir", str(store.root),
                 "--out", str(tmp_path / "out"), "--method", "gradcam++"]) == 0
    figure = Image.open(tmp_path / "out" / "lesion-gradcam++.png")
    assert figure.width > 224 and figure.height > 2 * 224
    # Without --method: the Explain page's default for the run's size, on the run's own layer (96 px here).
    assert main(["explain", "--image", str(tmp_path / "lesion.png"), "--runs-dir", str(store.root),
                 "--out", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "lesion-hirescam.json").read_text())
    assert [(row["method"], row["layer"]) for row in summary] == [("hirescam", "backbone.layer2, 12×12")]
    (tmp_path / "bad.png").write_bytes(b"not an image")
    assert main(["explain", "--image", str(tmp_path / "bad.png"), "--runs-dir", str(store.root)]) == 2


@pytest.mark.slow
def test_explain_image_resizes_maps_back(trained):
    store, run, data = trained
    from core.stored_run import load_trained_model

    explainer = CamExplainer(load_trained_model(run, store.model_path(run["run_id"])), "hybrid_sresnet")
    big = np.asarray(Image.fromarray(data.images[0]).resize((224, 224)))
    explained = explain_image([(explainer, 96)], big)
    assert explained.results[0].cam.shape == (224, 224)
    road = explainer.faithfulness(big, explained.results[0], 96)
    assert np.isfinite(road) and -1 <= road <= 1
    correlation, iou = agreement_matrices(explained.results * 2)
    assert correlation[0, 1] == pytest.approx(1.0) and iou[0, 1] == pytest.approx(1.0)


@pytest.mark.slow
def test_a_crafted_model_file_is_refused_not_executed(trained, tmp_path):
    from core.stored_run import load_trained_model

    store, run, _ = trained
    crafted, marker = tmp_path / "model.pt", tmp_path / "pwned"
    write_crafted_pickle(crafted, marker)
    with pytest.raises(ValueError, match="not a plain state_dict"):
        load_trained_model(run, crafted)
    assert not marker.exists()


def explain_page(store, monkeypatch) -> AppTest:
    monkeypatch.setenv("SKIN_RUNS_DIR", str(store.root))
    app = AppTest.from_file(APP, default_timeout=120)
    app.session_state["data.spec"] = dataclasses.replace(TINY_SYNTHETIC, synthetic_count=300, synthetic_image_size=96)
    app.run()
    app.switch_page("pages/explain.py").run()
    assert not app.exception, app.exception
    return app


@pytest.mark.slow
def test_explain_page_shows_the_row_and_measures(trained, monkeypatch):
    store, run, data = trained
    app = explain_page(store, monkeypatch)
    assert app.get("download_button"), "the figure can be downloaded"
    assert len(app.get("plotly_chart")) == 3, "the colour bar and the agreement matrices"
    assert app.toggle(key="widget.cam_show_mask").value, "the lesion outline is on by default where masks exist"
    assert "Localisation" in [header.value for header in app.subheader]
    size = run["config"]["image_size"]
    assert size < SMALL_INPUT_SIZE and small_input_note(size) in [caption.value for caption in app.caption], \
        "a small model's maps say which layer they hook, and why"
    assert app.selectbox(key="widget.cam_method").value == "hirescam", "the registry's method for a 96 px model"
    app.selectbox(key="explain.browse").set_value("Wrong").run()
    assert not app.exception
    app.selectbox(key="widget.cam_method").set_value("eigencam").run()
    app.toggle(key="widget.cam_shared_scale").set_value(True).run()
    app.selectbox(key="widget.cam_target").set_value("Benign").run()
    assert not app.exception


@pytest.mark.parametrize("content, message", [
    (b"\x89PNG\r\n\x1a\n broken", "Cannot use"),
    (b"plain text", "Cannot use"),
])
@pytest.mark.slow
def test_explain_page_bad_uploads(trained, monkeypatch, content, message):
    store, _, _ = trained
    app = explain_page(store, monkeypatch)
    app.radio(key="widget.explain_source").set_value("Upload").run()
    assert not app.exception
    uploader = app.get("file_uploader")
    assert uploader, "an upload widget is shown"
    # AppTest cannot drive st.file_uploader; the decoding path it uses is tested directly instead.
    from core.data.images import ImageError, decode_image

    with pytest.raises(ImageError):
        decode_image(io.BytesIO(content), 64)


def test_grayscale_and_rgba_uploads_decode(tmp_path):
    from core.data.images import decode_image

    for mode in ("L", "RGBA"):
        buffer = io.BytesIO()
        Image.new(mode, (300, 200)).save(buffer, format="PNG")
        assert decode_image(io.BytesIO(buffer.getvalue()), 224).shape == (224, 224, 3)


@pytest.mark.slow
def test_explain_page_opens_what_compare_sent(trained, monkeypatch):
    from pages.common import EXPLAIN_REQUEST

    store, run, _ = trained
    test_ids = store.predictions(run["run_id"]).query("split == 'test'")["image_id"].tolist()
    sent = [test_ids[4], test_ids[1], "not-a-test-image"]
    monkeypatch.setenv("SKIN_RUNS_DIR", str(store.root))
    app = AppTest.from_file(APP, default_timeout=120)
    app.run()
    app.session_state[EXPLAIN_REQUEST] = {"run_ids": [run["run_id"]], "image_ids": sent}
    app.switch_page("pages/explain.py").run()
    assert not app.exception, app.exception
    assert EXPLAIN_REQUEST not in app.session_state, "the request is consumed once"
    for _ in range(2):  # and kept across reruns
        assert app.multiselect(key="explain.runs").value == [run["run_id"]]
        assert app.selectbox(key="explain.browse").value == "From Compare"
        assert [option.split(" · ")[0] for option in app.selectbox(key="explain.image_id").options] == sent[:2]
        app.run()
        assert not app.exception, app.exception
    app.selectbox(key="explain.browse").set_value("Wrong").run()
    app.run()
    assert app.selectbox(key="explain.browse").value == "Wrong", "another choice stays chosen"


def test_explain_page_without_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("SKIN_RUNS_DIR", str(tmp_path / "none"))
    app = AppTest.from_file(APP, default_timeout=60).run()
    app.switch_page("pages/explain.py").run()
    assert not app.exception and "Train models first" in app.info[0].value


@pytest.mark.slow
def test_batch_measures_average_over_images(trained):
    from core.cams import batch_measures
    from core.stored_run import load_trained_model

    store, run, data = trained
    explainer = CamExplainer(load_trained_model(run, store.model_path(run["run_id"])), "hybrid_sresnet")
    rows = [row for row in data.indices("test") if data.table["label"].iloc[row] == 1][:6]
    progress = []
    summary = batch_measures([(explainer, 96)], ["Hybrid S-ResNet"], data.images[rows], data.masks[rows],
                             report=lambda done, total: progress.append((done, total)))
    assert summary["images"] == 6 and progress[-1] == (6, 6)
    assert 0 < summary["rows"][0]["CAM energy inside the lesion"] < 1
    assert 0 <= summary["rows"][0]["Pointing-game hit rate"] <= 1
    row = summary["rows"][0]
    scored = 6 - row["All-zero maps"]
    assert row["Pointing game"].startswith(f"{round(row['Pointing-game hit rate'] * scored)}/{scored}")


def test_pointing_game_text_says_how_many_all_zero_maps_were_left_out():
    from core.cams import pointing_game_text

    assert pointing_game_text([True] * 33 + [False] * 6, 11) == "33/39 (11 all-zero maps left out)"
    assert pointing_game_text([True, False], 1) == "1/2 (1 all-zero map left out)"
    assert pointing_game_text([True, False], 0) == "1/2"


def test_the_lesion_area_line_is_named_in_the_legend_not_over_a_bar():
    from core.figures import localisation_bars_figure

    rows = [{"Model": name, "CAM energy inside the lesion": 0.4, "Pointing-game hit rate": 0.9}
            for name in ("ResNet18", "EfficientNetB0")]
    figure = localisation_bars_figure(rows, 0.3)
    assert not figure.layout.annotations
    assert any(trace.name.startswith("lesion area 30%") for trace in figure.data)


def test_the_colour_bar_follows_the_colour_map_and_the_scale():
    from core.cams import colour_map_colours, overlay
    from core.figures import colour_bar_figure

    colours = colour_map_colours("jet", count=64)
    codes = np.linspace(0, 255, 64).round()
    ramp = ((codes + 0.5) / 255).astype(np.float32)[None]  # what overlay turns back into these codes
    painted = overlay(np.zeros((1, 64, 3), dtype=np.uint8), ramp, opacity=1.0, colour_map="jet")[0]
    assert colours == [f"rgb({r},{g},{b})" for r, g, b in painted.tolist()], "the bar has the overlay's colours"
    assert list(colour_bar_figure(colours, 0.42, "shared").layout.xaxis.ticktext) == ["0", "0.42"]
    assert list(colour_bar_figure(colours, None, "own").layout.xaxis.ticktext) == ["0", "max"]


def test_a_slow_method_reports_progress_within_each_model():
    from core.cams import explain_inputs

    model, _ = build_model("resnet18", pretrained=False)
    image = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    reports = []
    explain_inputs([CamExplainer(model, "resnet18")], [image], image, "scorecam",
                   report=lambda done, total: reports.append((done, total)))
    assert len({done for done, _ in reports if done < 100}) > 10, "progress moves during the model's passes"
    assert [done for done, _ in reports] == sorted(done for done, _ in reports)
    assert reports[-1] == (100, 100)


def test_a_cancelled_ablation_cam_leaves_the_shared_model_whole():
    from core.cams import CamCancelled

    model, _ = build_model("resnet18", pretrained=False)
    explainer = CamExplainer(model, "resnet18")
    image = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    before = explainer.explain(image, "gradcam", target=1).cam
    stop = threading.Event()

    def progress(fraction):
        if fraction > 0.2:
            stop.set()

    with pytest.raises(CamCancelled):
        explainer.explain(image, "ablationcam", target=1, progress=progress, stop=stop)
    from pytorch_grad_cam.ablation_layer import AblationLayer

    assert explainer.model.layer4[-1] is explainer.target_layer, "the target layer is back in its place"
    assert not any(isinstance(module, AblationLayer) for module in explainer.model.modules())
    assert np.allclose(explainer.explain(image, "gradcam", target=1).cam, before)


def wait_until(app: AppTest, condition, timeout: float = 120) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition(app):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.5)
        app.run()
        assert not app.exception, app.exception


@pytest.mark.slow
def test_explain_page_batch_view_and_slow_method_run_in_the_background(trained, monkeypatch):
    store, _, _ = trained
    app = explain_page(store, monkeypatch)
    app.slider(key="explain.batch_count").set_value(6).run()
    app.button(key="explain.batch_start").click().run()
    assert not app.exception
    wait_until(app, lambda a: any(frame.value.columns[0] == "Model" and "Pointing-game hit rate" in frame.value
                                  for frame in a.dataframe))
    app.toggle(key="explain.faithfulness").set_value(True).run()
    assert not app.exception
    app.selectbox(key="widget.cam_method").set_value("scorecam").run()
    assert not app.exception
    wait_until(app, lambda a: a.get("download_button"))


def test_an_explainer_hooks_a_layer_named_in_place_of_the_registrys():
    """bench/cam_layers.py compares stages: a named module is hooked, and its maps follow its own resolution."""
    model, _ = build_model("resnet18", pretrained=False)
    model.eval()
    image = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    registry = CamExplainer(model, "resnet18", image_size=96)
    named = CamExplainer(model, "resnet18", image_size=96, layer="layer3")
    assert registry.target_layer is registry.model.layer2[-1]
    assert named.target_layer is named.model.layer3 and named.layer.describe() == "layer3"
    result = named.explain(image, "gradcam", target=1)
    assert result.layer == "layer3" and result.cam.shape == (96, 96)
    assert CamExplainer(model, "resnet18", image_size=224).default_method == "gradcam", "the paper's, from 128 px"
    with pytest.raises(ValueError, match="no layer 'layer9'"):
        CamExplainer(model, "resnet18", image_size=96, layer="layer9")


def test_the_figures_subtitles_wrap_within_their_tile():
    """The PNG figure (Explain's download, `explain`, `predict --cams`) names method and layer under each title:
    long subtitles wrap within their own tile instead of running into the next column."""
    from PIL import ImageDraw, ImageFont

    from core.figures import _wrapped, labelled_grid

    tile = np.zeros((32, 32, 3), dtype=np.uint8)
    short = labelled_grid([("A", "P(malignant) 0.500 -> benign", [tile])], tile=160)
    subtitle = "P(malignant) 0.912 -> malignant | HiResCAM on backbone.layer2, 12×12 | all-zero map"
    long = labelled_grid([("A", subtitle, [tile]), ("B", subtitle, [tile])], tile=160)
    assert long.shape[0] > short.shape[0], "the header grows with the lines"
    font = ImageFont.load_default(size=12)
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = _wrapped(draw, subtitle.split(" | "), font, 160)
    assert len(lines) >= 2 and all(draw.textlength(text, font=font) <= 160 for text in lines)
    assert " ".join(lines).replace(" | ", " ") == subtitle.replace(" | ", " ")
