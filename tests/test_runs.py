import json
import os

import pytest

from core.runs import RunStore, RunStoreError, write_json


def test_folders_without_a_finished_run_json_are_not_listed(store):
    folder = store.create("resnet18", {"config": {}})
    (store.root / "half-written").mkdir()
    (store.root / "half-written" / ".run.json.123.tmp").write_text("{")
    (store.root / "garbage").mkdir()
    (store.root / "garbage" / "run.json").write_text("{not json")
    assert [run["run_id"] for run in store.list_runs()] == [folder.run_id]


def test_a_running_run_whose_process_died_is_shown_as_failed(store):
    folder = store.create("resnet18", {})
    record = json.loads((folder.path / "run.json").read_text())
    record["pid"] = 2**22 + 12345  # no such process
    (folder.path / "run.json").write_text(json.dumps(record))
    run = store.load(folder.run_id)
    assert run["status"] == "failed" and "ended without finishing" in run["error"]
    assert store.load(store.create("resnet18", {}).run_id)["status"] == "running"


def test_nan_is_stored_as_null(tmp_path):
    write_json(tmp_path / "x.json", {"auc": float("nan"), "nested": [float("inf"), 1.0]})
    assert json.loads((tmp_path / "x.json").read_text()) == {"auc": None, "nested": [None, 1.0]}


def test_read_only_store_gives_a_clear_error(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root ignores file permissions")
    root = tmp_path / "locked"
    root.mkdir()
    root.chmod(0o500)
    with pytest.raises(RunStoreError, match="cannot create a run folder"):
        RunStore(root).create("resnet18", {})


def test_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "run.json"
    write_json(path, {"status": "completed"})

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(RunStoreError, match="No space left"):
        write_json(path, {"status": "running"})
    assert json.loads(path.read_text()) == {"status": "completed"}
    assert list(tmp_path.iterdir()) == [path], "no temporary file left behind"


def test_delete(store):
    folder = store.create("resnet18", {})
    store.delete(folder.run_id)
    assert store.list_runs() == []
