"""Datasets larger than memory: the image cache is written row by row and read a batch at a time."""

from __future__ import annotations

import dataclasses
import errno
import tracemalloc

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import core.data.images as images_module
from core.config import DataSpec
from core.data.datasets import prepare_data
from core.data.images import DiskImages, ImageCacheError, decode_images_cached
from core.training import batches as batches_module
from core.training.batches import TensorData
from core.training.loop import run_training
from tests.conftest import TINY_CONFIG, write_image


@pytest.fixture(scope="module")
def stored(tmp_path_factory) -> tuple[np.ndarray, DiskImages]:
    folder = tmp_path_factory.mktemp("disk")
    array = np.random.default_rng(0).integers(0, 256, (23, 4, 4, 3), dtype=np.uint8)
    np.save(folder / "images.npy", array)
    return array, DiskImages(folder / "images.npy")


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_disk_images_index_as_numpy_does(stored, data):
    array, disk = stored
    keep = data.draw(st.lists(st.integers(0, 22), min_size=1, max_size=23, unique=True).map(sorted))
    view_array, view_disk = array[keep], disk.subset(keep)
    assert view_disk.shape == view_array.shape
    key = data.draw(st.one_of(
        st.integers(-len(keep), len(keep) - 1),
        st.builds(slice, st.none() | st.integers(-30, 30), st.none() | st.integers(-30, 30),
                  st.none() | st.integers(1, 4) | st.integers(-4, -1)),
        st.lists(st.integers(-len(keep), len(keep) - 1), max_size=40).map(lambda rows: np.array(rows, dtype=np.int64)),
        st.lists(st.booleans(), min_size=len(keep), max_size=len(keep)).map(np.array),
    ))
    expected = view_array[key]
    assert np.array_equal(view_disk[key], expected)
    assert np.array_equal(np.asarray(view_disk), view_array)
    assert np.array_equal(np.stack(list(view_disk)), view_array)


def test_rows_outside_raise_index_error(stored):
    _, disk = stored
    with pytest.raises(IndexError):
        disk[23]
    with pytest.raises(IndexError):
        disk[np.array([0, 40])]


def write_folder(root, count: int) -> list[str]:
    paths = []
    for index in range(count):
        path = root / f"{index:03d}.jpg"
        write_image(path, colour=(40 + index % 200, 90, 200 - index % 200), size=(48, 36))
        paths.append(str(path))
    return paths


def test_the_cache_is_built_without_holding_the_dataset_in_memory(tmp_path):
    paths = write_folder(tmp_path / "images", 300)
    size = 96
    total = len(paths) * size * size * 3
    tracemalloc.start()
    decoded = decode_images_cached(paths, size, tmp_path / "cache", workers=2)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert isinstance(decoded.images, DiskImages) and decoded.images.shape == (300, size, size, 3)
    assert peak < total / 5, f"building held {peak:,} bytes of a {total:,}-byte dataset"
    in_memory = decode_images_cached(paths, size, None)
    assert np.array_equal(np.asarray(decoded.images), in_memory.images), "the same pixels as decoding in memory"


def test_skipped_files_keep_their_rows_out_of_the_cache(tmp_path):
    paths = write_folder(tmp_path / "images", 6)
    (tmp_path / "images" / "002.jpg").write_bytes(b"not a jpeg")
    decoded = decode_images_cached(paths, 16, tmp_path / "cache")
    again = decode_images_cached(paths, 16, tmp_path / "cache")
    assert decoded.kept.tolist() == again.kept.tolist() == [0, 1, 3, 4, 5]
    assert np.array_equal(np.asarray(again.images), decode_images_cached(paths, 16, None).images)


def test_an_old_compacted_cache_still_reads(tmp_path):
    """Caches written before rows were kept in place held only the readable files."""
    paths = write_folder(tmp_path / "images", 5)
    (tmp_path / "images" / "001.jpg").write_bytes(b"broken")
    expected = np.asarray(decode_images_cached(paths, 16, tmp_path / "cache").images)
    array_path = next((tmp_path / "cache").glob("images-*.npy"))
    np.save(array_path, expected)  # as np.save(images[kept]) wrote it
    again = decode_images_cached(paths, 16, tmp_path / "cache")
    assert np.array_equal(np.asarray(again.images), expected)


def fill_disk_after(monkeypatch, writes: int) -> None:
    calls = {"count": 0}
    real = images_module._write_exactly

    def write(fd, image, offset):
        calls["count"] += 1
        if calls["count"] > writes:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, image, offset)

    monkeypatch.setattr(images_module, "_write_exactly", write)


def test_a_full_disk_leaves_no_cache_taken_as_valid(tmp_path, monkeypatch):
    paths = write_folder(tmp_path / "images", 40)
    monkeypatch.setattr(images_module, "IN_MEMORY_FALLBACK_BYTES", 0)  # as if the dataset were too large for RAM
    fill_disk_after(monkeypatch, 10)
    with pytest.raises(ImageCacheError, match="cannot write the image cache.*No space left"):
        decode_images_cached(paths, 32, tmp_path / "cache", workers=2)
    assert not list((tmp_path / "cache").glob("images-*")), "no array, index or temporary file is left"
    monkeypatch.undo()
    decoded = decode_images_cached(paths, 32, tmp_path / "cache")  # room again: built afresh, complete
    assert np.array_equal(np.asarray(decoded.images), decode_images_cached(paths, 32, None).images)


def test_a_small_dataset_falls_back_to_memory_when_the_disk_is_full(tmp_path, monkeypatch):
    paths = write_folder(tmp_path / "images", 12)
    fill_disk_after(monkeypatch, 3)
    decoded = decode_images_cached(paths, 16, tmp_path / "cache")
    assert isinstance(decoded.images, np.ndarray) and decoded.images.shape == (12, 16, 16, 3)
    assert not list((tmp_path / "cache").glob("images-*"))


def test_too_little_free_space_is_refused_before_decoding(tmp_path, monkeypatch):
    paths = write_folder(tmp_path / "images", 8)
    monkeypatch.setattr(images_module, "IN_MEMORY_FALLBACK_BYTES", 0)
    monkeypatch.setattr(images_module.shutil, "disk_usage", lambda _: pd.Series({"free": 1000}))
    monkeypatch.setattr(images_module, "decode_image", lambda *a: pytest.fail("decoded despite no room"))
    with pytest.raises(ImageCacheError, match="GB needed"):
        decode_images_cached(paths, 16, tmp_path / "cache")


@pytest.fixture
def folder_data(tmp_path):
    root = tmp_path / "folder-data"
    for index in range(24):
        write_image(root / "Cancer" / f"c{index}.jpg", colour=(60, 30 + 3 * index, 20 + index))
        write_image(root / "NotCancer" / f"n{index}.jpg", colour=(200, 150 - 2 * index, 120 + index))
    return prepare_data(DataSpec(source=str(root)), TINY_CONFIG, tmp_path / "cache")


def test_batches_from_disk_equal_batches_from_memory(folder_data):
    on_disk = TensorData.from_prepared(folder_data, "train", torch.device("cpu"), residency="disk")
    in_memory = TensorData.from_prepared(folder_data, "train", torch.device("cpu"), residency="memory")
    assert on_disk.residency == "disk" and in_memory.residency == "memory"
    rows = torch.tensor([5, 0, 5, 3, len(on_disk) - 1])
    assert torch.equal(on_disk.batch(rows), in_memory.batch(rows))
    assert torch.equal(on_disk.batch(slice(2, 9)), in_memory.batch(slice(2, 9)))
    assert torch.equal(on_disk.labels, in_memory.labels)


def test_a_small_dataset_is_held_in_memory_and_a_large_one_streamed(folder_data, monkeypatch):
    assert batches_module.choose_residency(folder_data, torch.device("cpu")) == "memory"
    monkeypatch.setattr(batches_module, "IN_MEMORY_MAX_BYTES", 1000)
    assert batches_module.choose_residency(folder_data, torch.device("cpu")) == "disk"


def test_training_from_disk_gives_the_numbers_of_training_in_memory(folder_data, tmp_path, monkeypatch):
    from core.runs import RunStore

    config = dataclasses.replace(TINY_CONFIG, epochs=2)
    in_memory = run_training(config, folder_data, RunStore(tmp_path / "a"))
    monkeypatch.setattr(batches_module, "IN_MEMORY_MAX_BYTES", 0)
    on_disk = run_training(config, folder_data, RunStore(tmp_path / "b"))
    assert in_memory["status"] == on_disk["status"] == "completed"
    assert in_memory["environment"]["data_residency"] == "memory"
    assert on_disk["environment"]["data_residency"] == "disk"
    assert on_disk["metrics"] == in_memory["metrics"]
    assert [e["val_auc"] for e in on_disk["history"]] == [e["val_auc"] for e in in_memory["history"]]


def test_a_queued_run_shows_how_far_decoding_has_got(tmp_path):
    from core.runs import RunStore
    from core.training.jobs import Job, JobQueue

    root = tmp_path / "folder"
    for index in range(10):
        write_image(root / "Cancer" / f"c{index}.jpg", colour=(60, 30 + 5 * index, 20))
        write_image(root / "NotCancer" / f"n{index}.jpg", colour=(200, 150 - 5 * index, 120))
    queue = JobQueue(RunStore(tmp_path / "runs"))
    queue.submit([TINY_CONFIG], DataSpec(source=str(root)))
    assert queue.wait_until_idle(timeout=120)
    (job,) = queue.snapshot().jobs
    assert job.state == "completed" and job.decoded == (20, 20)
    decoding = Job(1, TINY_CONFIG, DataSpec(source=str(root)), state="preparing", decoded=(1_234, 100_000))
    assert decoding.progress_text().endswith("decoding images into the cache: 1,234 of 100,000")


def test_near_duplicate_pairs_are_found_once_and_then_read(tmp_path, monkeypatch):
    import core.data.duplicates as duplicates

    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**63, (50, duplicates.VIEW_COUNT, duplicates.HASH_WORDS), dtype=np.int64)
    hashes = hashes.astype(np.uint64)
    hashes[7] = hashes[3]  # one planted pair
    found = duplicates.load_or_find_near_duplicates(hashes, tmp_path)
    assert found[:, :2].tolist() == [[3, 7]]
    monkeypatch.setattr(duplicates, "find_near_duplicates", lambda *a: pytest.fail("searched again"))
    assert np.array_equal(duplicates.load_or_find_near_duplicates(hashes, tmp_path), found)
    monkeypatch.undo()
    hashes[8] = hashes[3]  # other images: another digest, searched afresh
    assert duplicates.load_or_find_near_duplicates(hashes, tmp_path)[:, :2].tolist() == [[3, 7], [3, 8], [7, 8]]
