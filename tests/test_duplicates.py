"""Near-duplicate images (core.data.duplicates): planted copies are found, distinct images are not paired,
splits keep copies together unless told not to, runs record what crosses their split, the hashes live with
the image cache, and check-data prints a clean table."""

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

import core.data.duplicates
import core.data.images
from core.cli import main
from core.config import DataSpec, TrainConfig
from core.data.datasets import prepare_data
from core.data.duplicates import (
    DEFAULT_THRESHOLD,
    HASH_IMAGE_SIZE,
    find_near_duplicates,
    hash_images,
    merge_groups,
)
from core.data.images import decode_image
from core.data.synthetic import generate_synthetic
from core.training.loop import run_training
from pages.common import VALUE_PREFIX
from tests.conftest import TINY_CONFIG
from tests.test_pages import TINY_VALUES, open_page

ORIGINALS = 20
# Original index -> (kind of copy, the copy's label differs, the copy is in the given test part).
# The copies in the test part have both labels, so that a run trained on the set has a test AUC.
PLANTED = {1: ("resized", True, False), 4: ("jpeg", True, True), 7: ("cropped", False, True),
           10: ("resized", False, True), 13: ("jpeg", False, False), 16: ("cropped", True, False),
           19: ("cropped", False, False)}


def originals(count: int = ORIGINALS) -> list[Image.Image]:
    """Distinct pictures: lesions drawn by the synthetic generator (all alike in style) and random textures."""
    drawn = generate_synthetic(count=count - 4, image_size=128, seed=11).images
    rng = np.random.default_rng(3)
    textures = [rng.integers(0, 255, (8, 8, 3), dtype=np.uint8) for _ in range(4)]
    return [Image.fromarray(image) for image in drawn] + [
        Image.fromarray(texture).resize((128, 128), Image.Resampling.BICUBIC) for texture in textures]


def near_copy(image: Image.Image, kind: str, index: int) -> tuple[Image.Image, int]:
    """A planted copy and its JPEG quality: 90% size, JPEG quality 70, or 3% cut off two edges (each copy
    a different corner)."""
    width, height = image.size
    if kind == "resized":
        return image.resize((round(width * 0.9), round(height * 0.9)), Image.Resampling.BICUBIC), 95
    if kind == "jpeg":
        return image, 70
    cut_x, cut_y = round(width * 0.03), round(height * 0.03)
    boxes = [(cut_x, cut_y, width, height), (0, 0, width - cut_x, height - cut_y),
             (cut_x, 0, width, height - cut_y), (0, cut_y, width - cut_x, height)]
    return image.crop(boxes[index % 4]), 95


def make_planted_dataset(root: Path, split_column: bool) -> set[tuple[str, str]]:
    """labels.csv + images/ with ORIGINALS distinct images and the PLANTED copies; returns the planted pairs."""
    (root / "images").mkdir(parents=True)
    rows, pairs = [], set()
    for index, image in enumerate(originals()):
        image.save(root / "images" / f"original_{index:02d}.jpg", quality=95)
        rows.append({"image_id": f"original_{index:02d}", "melanoma": index % 2, "split": "train"})
        if index in PLANTED:
            kind, other_label, in_test = PLANTED[index]
            copy, quality = near_copy(image, kind, index)
            copy.save(root / "images" / f"copy_{index:02d}.jpg", quality=quality)
            rows.append({"image_id": f"copy_{index:02d}", "melanoma": (index + other_label) % 2,
                         "split": "test" if in_test else "train"})
            pairs.add((f"copy_{index:02d}", f"original_{index:02d}"))
    table = pd.DataFrame(rows)
    if not split_column:
        table = table.drop(columns="split")
    table.to_csv(root / "labels.csv", index=False)
    return pairs


def as_pairs(frame: pd.DataFrame) -> set[tuple[str, str]]:
    return {tuple(sorted(pair)) for pair in zip(frame["id_a"], frame["id_b"])}


def test_check_data_finds_every_planted_copy_and_no_false_pair(tmp_path, capsys):
    planted = make_planted_dataset(tmp_path / "planted", split_column=True)
    assert main(["check-data", str(tmp_path / "planted"), "--format", "csv", "--runs-dir", str(tmp_path / "runs")]) == 0
    output = capsys.readouterr()
    pairs = pd.read_csv(io.StringIO(output.out))
    assert as_pairs(pairs) == planted, "every planted copy found, no pair among the distinct originals"
    assert (pairs["distance"] <= DEFAULT_THRESHOLD).all()
    by_copy = pairs.assign(copy=pairs[["id_a", "id_b"]].min(axis=1)).set_index("copy")
    for index, (_, other_label, in_test) in PLANTED.items():
        row = by_copy.loc[f"copy_{index:02d}"]
        assert row["conflicting_labels"] == other_label
        assert row["crosses_splits"] == in_test, "a copy in the given test part crosses the split"
    assert f"{len(planted)} near-duplicate pair(s)" in output.err


def test_check_data_table_has_one_pair_per_line_and_nothing_else_on_stdout(tmp_path, capsys):
    planted = make_planted_dataset(tmp_path / "planted", split_column=True)
    assert main(["check-data", str(tmp_path / "planted"), "--runs-dir", str(tmp_path / "runs")]) == 0
    output = capsys.readouterr()
    header, *lines = output.out.strip().splitlines()
    assert header.split()[:3] == ["id_a", "id_b", "distance"]
    assert len(lines) == len(planted)
    for line in lines:
        assert sum(f"_{index:02d} " in f"{line} " for index in PLANTED) == 1, "both ids of one pair on each line"
        assert "copy_" in line and "original_" in line
    assert sum("CONFLICT" in line for line in lines) == sum(other for _, other, _ in PLANTED.values())
    assert "reading" not in output.out and "reading" in output.err, "progress goes to stderr"


def test_no_pairs_among_the_synthetic_set():
    """The synthetic images all share one style (a lesion on skin under a vignette): a hard negative case."""
    data = prepare_data(DataSpec(synthetic_count=160, synthetic_image_size=96), TINY_CONFIG, None)
    assert data.hashes.shape[0] == 160
    assert len(data.near_duplicate_pairs()) == 0


def test_splits_keep_near_duplicates_together_unless_switched_off(tmp_path):
    planted = make_planted_dataset(tmp_path / "planted", split_column=False)
    spec = DataSpec(source=str(tmp_path / "planted"))
    crossed_when_off = 0
    for seed in range(6):
        config = dataclasses.replace(TINY_CONFIG, seed=seed)
        grouped = prepare_data(spec, config, tmp_path / "cache")
        pairs = grouped.near_duplicate_pairs()
        assert as_pairs(pairs) == planted
        assert not pairs["crosses_splits"].any(), f"seed {seed}: a pair across the split"
        assert grouped.describe()["near_duplicates"]["grouped"] is True
        ungrouped = prepare_data(spec, dataclasses.replace(config, group_near_duplicates=False), tmp_path / "cache")
        crossed_when_off += int(ungrouped.near_duplicate_pairs()["crosses_splits"].sum())
    assert crossed_when_off > 0, "without grouping, copies fall on both sides for some seed"


def test_merged_groups_join_lesions_and_copies_and_keep_other_names():
    groups = ["lesion_b", "lesion_b", "lesion_a", "lesion_c", "single_d", "single_e"]
    pairs = np.array([[1, 2, 5], [3, 4, 9]])  # lesion_b ~ lesion_a, lesion_c ~ single_d
    assert merge_groups(groups, pairs).tolist() == ["lesion_a", "lesion_a", "lesion_a", "lesion_c", "lesion_c",
                                                    "single_e"]
    assert merge_groups(groups, np.zeros((0, 3), dtype=np.int64)).tolist() == groups


def flipped(words: np.ndarray, rng: np.random.Generator, count: int) -> np.ndarray:
    """`words` (uint64, last axis the words of one hash) with `count` random bits of each hash flipped."""
    bits = np.unpackbits(words.view(np.uint8), axis=-1)
    for index in np.ndindex(bits.shape[:-1]):
        bits[index][rng.choice(bits.shape[-1], count, replace=False)] ^= 1
    return np.packbits(bits, axis=-1).view(np.uint64)


@pytest.mark.parametrize("kind", ["photo-like", "noise-like"])
def test_vectorised_search_matches_a_plain_comparison_of_every_pair(kind):
    """Photo-like: views close to their whole image (the pruned search); noise-like: views unrelated to it
    (the search that compares every view)."""
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**63, (150, 6, 3), dtype=np.uint64)
    if kind == "photo-like":
        hashes[:, 1:] = flipped(np.repeat(hashes[:, :1], 5, axis=1), rng, 12)
    for copy, source, view in ((100, 3, 2), (101, 50, 5), (102, 50, 0)):  # close through a view (or the whole)
        hashes[copy] = flipped(np.repeat(hashes[source, view][None], 6, axis=0), rng, 6)
    bits = np.unpackbits(hashes.view(np.uint8), axis=-1)
    for threshold in (8, DEFAULT_THRESHOLD, 40):
        expected = set()
        for a in range(150):
            for b in range(a + 1, 150):
                distance = min([int((bits[a, 0] != bits[b, view]).sum()) for view in range(6)]
                               + [int((bits[a, view] != bits[b, 0]).sum()) for view in range(1, 6)])
                if distance <= threshold:
                    expected.add((a, b, distance))
        assert {(3, 100), (50, 101), (50, 102)} <= {(a, b) for a, b, _ in expected}, "the planted pairs are there"
        assert {tuple(row) for row in find_near_duplicates(hashes, threshold).tolist()} == expected


def test_hashes_are_stored_with_the_image_cache_and_not_computed_again(tmp_path, monkeypatch):
    make_planted_dataset(tmp_path / "planted", split_column=False)
    spec, cache = DataSpec(source=str(tmp_path / "planted")), tmp_path / "cache"
    first = prepare_data(spec, TINY_CONFIG, cache)
    hash_files = list(cache.glob("files-*.hashes-v*.npy"))
    assert len(hash_files) == 1 and len(list(cache.glob("images-*.npy"))) == 1

    def no_hashing(*args, **kwargs):
        raise AssertionError("hashed again")

    with monkeypatch.context() as patched:
        patched.setattr(core.data.images, "hash_image", no_hashing)
        patched.setattr(core.data.duplicates, "hash_images", no_hashing)
        again = prepare_data(spec, TINY_CONFIG, cache)
        # Another image size decodes the files again, but one hash file serves every size.
        other_size = prepare_data(spec, dataclasses.replace(TINY_CONFIG, image_size=48), cache)
    assert np.array_equal(again.hashes, first.hashes) and np.array_equal(other_size.hashes, first.hashes)
    assert other_size.describe()["split_fingerprint"] == first.describe()["split_fingerprint"], \
        "the near-duplicates, and so the split, do not depend on the image size"

    # A cache written before hashes existed gets them once, without decoding at its own size again.
    hash_files[0].unlink()
    sizes = []

    def recording_decode(path, size):
        sizes.append(size)
        return decode_image(path, size)

    monkeypatch.setattr(core.data.images, "decode_image", recording_decode)
    rebuilt = prepare_data(spec, TINY_CONFIG, cache)
    assert np.array_equal(rebuilt.hashes, first.hashes) and hash_files[0].exists()
    assert set(sizes) == {HASH_IMAGE_SIZE}


def test_hashes_do_not_depend_on_the_thread_count():
    images = np.stack([np.asarray(image.resize((64, 64))) for image in originals(8)])
    assert np.array_equal(hash_images(images, workers=1), hash_images(images, workers=3))


def test_run_json_records_near_duplicates_across_the_split(tmp_path, store):
    make_planted_dataset(tmp_path / "planted", split_column=True)
    config = dataclasses.replace(TINY_CONFIG, group_near_duplicates=False)
    data = prepare_data(DataSpec(source=str(tmp_path / "planted")), config, tmp_path / "cache")
    run = run_training(config, data, store)
    assert run["status"] == "completed", run.get("error")
    recorded = json.loads((store.root / run["run_id"] / "run.json").read_text())["dataset"]["near_duplicates"]
    pairs = data.near_duplicate_pairs()
    assert recorded["pairs"] == len(PLANTED) == len(pairs)
    assert recorded["cross_split_pairs"] == int(pairs["crosses_splits"].sum()) >= 3, "the given test copies at least"
    assert recorded["conflicting_labels"] == sum(other for _, other, _ in PLANTED.values())
    assert recorded["grouped"] is False and recorded["threshold"] == DEFAULT_THRESHOLD


def test_runs_stored_before_grouping_existed_reload_without_it():
    old = {key: value for key, value in TrainConfig().to_dict().items() if key != "group_near_duplicates"}
    assert TrainConfig.from_dict(old).group_near_duplicates is False
    assert TrainConfig.from_dict(TrainConfig().to_dict()).group_near_duplicates is True


def test_data_page_lists_the_pairs_and_whether_the_split_keeps_them(tmp_path, monkeypatch):
    make_planted_dataset(tmp_path / "planted", split_column=True)
    monkeypatch.setenv("SKIN_RUNS_DIR", str(tmp_path / "runs"))
    app = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "streamlit_app.py"), default_timeout=60)
    for name, value in TINY_VALUES.items():
        app.session_state[VALUE_PREFIX + name] = value
    open_page(app, "data")
    app.radio(key="widget.source_kind").set_value("Local dataset").run()
    app.text_input(key="widget.data_path").input(str(tmp_path / "planted")).run()
    assert not app.exception and not app.error
    assert [header.value for header in app.subheader if header.value == "Near-duplicates"]
    metrics = {metric.label: metric.value for metric in app.metric}
    assert metrics["Pairs"] == str(len(PLANTED))
    assert metrics["Conflicting labels"] == str(sum(other for _, other, _ in PLANTED.values()))
    table = next(frame.value for frame in app.dataframe if "id_a" in frame.value.columns)
    assert len(table) == len(PLANTED)
    assert any("keeps near-duplicates together" in caption.value for caption in app.caption)
    assert app.warning, "conflicting labels are pointed out"

    app.toggle(key="widget.group_near_duplicates").set_value(False).run()
    assert not app.exception
    assert any("grouping is off" in caption.value for caption in app.caption)
