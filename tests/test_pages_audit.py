"""The Audit page, the Explain page's sanity flag and the report's audit section, through AppTest, on one tiny
ResNet18 run (32 px) audited on 4 images: stored results shown at once, an audit run through the queue, errors."""

import re
import shutil
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

import core.audit.maps
import core.audit.runner
from core.audit.runner import AuditSettings, run_audit
from core.audit.store import AUDIT_FOLDER, save_result
from core.data.datasets import prepare_data
from core.evaluation.compare import build_comparison
from core.report import report_html
from core.runs import RunStore
from core.training.jobs import shared_queue
from core.training.loop import run_training
from pages.common import AUDIT_RUNS
from tests.conftest import TINY_CONFIG, TINY_SYNTHETIC

APP = str(Path(__file__).resolve().parents[1] / "streamlit_app.py")
TINY_AUDIT = AuditSettings(methods=("gradcam", "edges"), checks=("randomisation",), images=4, steps=2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[RunStore, dict]:
    store = RunStore(tmp_path_factory.mktemp("audit-pages") / "runs")
    data = prepare_data(TINY_SYNTHETIC, TINY_CONFIG, store.cache_dir)
    return store, run_training(TINY_CONFIG, data, store)


@pytest.fixture
def store(trained, monkeypatch) -> RunStore:
    """The trained run, with no audit stored yet, as the pages' run store."""
    store, run = trained
    shutil.rmtree(store.root / run["run_id"] / AUDIT_FOLDER, ignore_errors=True)
    monkeypatch.setenv("SKIN_RUNS_DIR", str(store.root))
    yield store
    queue = shared_queue(store)
    queue.clear_queue()
    queue.stop_current()
    assert queue.wait_until_idle(timeout=60)


def open_page(page: str) -> AppTest:
    app = AppTest.from_file(APP, default_timeout=120)
    app.run()
    app.switch_page(f"pages/{page}.py").run()
    assert not app.exception, app.exception
    return app


def texts(elements) -> list[str]:
    return [element.value for element in elements]


def test_the_audit_page_without_runs_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("SKIN_RUNS_DIR", str(tmp_path / "runs"))
    app = open_page("audit")
    assert app.title[0].value == "Audit"
    assert "No trained runs yet" in app.info[0].value
    assert not app.button


@pytest.mark.slow
def test_runs_without_an_audit_say_not_audited_and_a_bad_masks_folder_is_refused(store, tmp_path):
    store_runs = store.list_runs()
    app = open_page("audit")
    assert app.multiselect(key=AUDIT_RUNS).value == [store_runs[0]["run_id"]], "the newest run of each model"
    assert any("Not audited yet" in text for text in texts(app.info))
    assert not app.button(key="audit.start").disabled
    app.text_input(key="widget.audit_masks").input(str(tmp_path / "no-masks-here")).run()
    assert not app.exception
    assert "does not exist or is not a folder" in app.error[0].value
    assert app.button(key="audit.start").disabled


@pytest.mark.slow
def test_stored_results_are_shown_at_once_without_recomputing(store, trained, monkeypatch):
    _, run = trained
    run_audit(store, [store.load(run["run_id"])], TINY_AUDIT)

    def refuse(*args, **kwargs):
        raise AssertionError("the page computed maps instead of showing the stored results")

    monkeypatch.setattr(core.audit.runner, "compute_maps", refuse)
    monkeypatch.setattr(core.audit.maps, "compute_maps", refuse)
    app = open_page("audit")  # a fresh session: nothing of the audit above is in it
    sanity = app.dataframe[0].value
    verdicts = dict(zip(sanity["Method"], sanity["Verdict"]))
    assert verdicts["Image edges"] == "FAILS", "the control that ignores the model must fail"
    assert set(verdicts) == {"Grad-CAM", "Image edges"}
    captions = texts(app.caption)
    assert any(text.startswith("On 4 test images per run (seed 0); 2 randomisation steps; computed ")
               and "falls towards 0" in text for text in captions)
    assert any("No localisation results" in text for text in captions)
    assert any("No faithfulness (deletion/insertion) results" in text for text in captions)
    names = [button.label for button in app.get("download_button")]
    assert names == ["audit.json", "settings.json", "randomisation.csv"]


def test_the_audit_runs_in_the_queue_and_its_results_appear(store):
    app = open_page("audit")
    assert app.multiselect(key="widget.audit_methods").value == ["hirescam"], "what Explain shows a 32 px run"
    app.multiselect(key="widget.audit_checks").set_value(["randomisation"]).run()
    app.number_input(key="widget.audit_images").set_value(4).run()
    app.number_input(key="widget.audit_steps").set_value(2).run()
    assert any(text.startswith("1 run(s) × 1 method(s), 1 check(s) on 4 test images: 1 step. ")
               for text in texts(app.caption))
    app.button(key="audit.start").click().run()
    assert not app.exception, app.exception
    queue = shared_queue(store)
    (job,) = [job for job in queue.snapshot().jobs if job.kind == "audit"][-1:]
    assert job.title == "Audit of 1 run(s)"
    assert queue.wait_until_idle(timeout=120)
    app.run()
    assert not app.exception, app.exception
    assert "1 result(s) computed, 0 reused" in app.success[0].value
    assert app.dataframe[0].value["Verdict"].tolist() == ["passes"]
    app.button(key="audit.start").click().run()  # the same audit again: its result is reused
    assert queue.wait_until_idle(timeout=120)
    app.run()
    assert "0 result(s) computed, 1 reused" in app.success[0].value


def test_masks_matching_no_image_fail_the_audit_with_a_message(store, tmp_path):
    empty = tmp_path / "masks"
    empty.mkdir()
    app = open_page("audit")
    app.multiselect(key="widget.audit_checks").set_value(["localisation"]).run()
    app.number_input(key="widget.audit_images").set_value(4).run()
    app.text_input(key="widget.audit_masks").input(str(empty)).run()
    app.button(key="audit.start").click().run()
    assert shared_queue(store).wait_until_idle(timeout=120)
    app.run()
    assert not app.exception, app.exception
    assert re.match(r"The audit failed: no mask in .* matches any of the 4 images", app.error[0].value)


def write_randomisation_result(store: RunStore, run: dict, fails: bool, spearman: float) -> None:
    save_result(store.root / run["run_id"], {
        "check": "randomisation", "method": "hirescam", "key": f"test{int(fails)}", "run_id": run["run_id"],
        "model": run["model"], "seed": 0, "images": ["a", "b", "c"], "settings": {"steps": 2}, "seconds": 1.0,
        "summary": {"fails": fails, "final_spearman": spearman, "fail_threshold": 0.5}, "per_image": []})


def test_the_explain_page_flags_a_map_that_fails_the_sanity_check(store, trained):
    _, run = trained
    app = open_page("explain")  # 32 px runs: the page starts from HiResCAM, and flags that method's verdict
    assert any("HiResCAM of ResNet18 not audited yet" in text for text in texts(app.caption))
    assert not app.warning

    write_randomisation_result(store, run, fails=True, spearman=0.83)
    app = open_page("explain")
    assert any(text.startswith("HiResCAM fails the randomisation sanity check for this model (Spearman 0.83 with "
                               "the trained maps after the whole network is randomised")
               and text.endswith("do not trust this map.") for text in texts(app.warning))

    shutil.rmtree(store.root / run["run_id"] / AUDIT_FOLDER)
    write_randomisation_result(store, run, fails=False, spearman=0.12)
    app = open_page("explain")
    assert not app.warning
    assert any(text.startswith("Passes the randomisation sanity check (Spearman 0.12") for text in texts(app.caption))


def test_the_report_has_the_audit_section_when_an_audit_exists(store, trained, tmp_path):
    from core.cli import main

    _, run = trained
    runs = [store.load(run["run_id"])]
    assert "Explanation audit" not in report_html(build_comparison(store, runs, resamples=50))
    run_audit(store, runs, TINY_AUDIT)
    page_report = report_html(build_comparison(store, runs))
    assert "<h2>Explanation audit</h2>" in page_report and "<h3>Randomisation sanity check</h3>" in page_report
    assert '<td class="fails">FAILS</td>' in page_report
    assert "No localisation results" in page_report
    assert main(["compare", "--runs-dir", str(store.root), "--report", str(tmp_path / "cli.html")]) == 0
    cli_report = (tmp_path / "cli.html").read_text(encoding="utf-8")

    def without_timestamp(text: str) -> str:
        return re.sub(r"Written \d{4}-\d{2}-\d{2} \d{2}:\d{2}", "", text)

    assert without_timestamp(cli_report) == without_timestamp(page_report)
