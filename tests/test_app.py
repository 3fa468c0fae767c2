"""The dashboard entry page, run headless with Streamlit's AppTest."""

import dataclasses
from pathlib import Path

from streamlit.testing.v1 import AppTest

from core.datasets import prepare_data
from core.training import run_training
from tests.conftest import TINY_CONFIG, TINY_SYNTHETIC

APP = str(Path(__file__).resolve().parents[1] / "streamlit_app.py")


def test_empty_store_shows_how_to_train(tmp_path, monkeypatch):
    monkeypatch.setenv("SKIN_RUNS_DIR", str(tmp_path / "runs"))
    app = AppTest.from_file(APP, default_timeout=30).run()
    assert not app.exception
    assert "python -m core train" in app.info[0].value


def test_runs_are_listed_and_compared(tmp_path, monkeypatch, store):
    monkeypatch.setenv("SKIN_RUNS_DIR", str(store.root))
    data = prepare_data(TINY_SYNTHETIC, TINY_CONFIG, store.cache_dir)
    for model in ("resnet18", "hybrid_sresnet"):
        run_training(dataclasses.replace(TINY_CONFIG, model=model), data, store)
    app = AppTest.from_file(APP, default_timeout=30).run()
    assert not app.exception
    runs_table, comparison = app.dataframe[0].value, app.dataframe[1].value
    assert len(runs_table) == 2 and set(runs_table["Status"]) == {"completed"}
    assert list(comparison["Model"]) == ["ResNet18", "Hybrid S-ResNet"]
