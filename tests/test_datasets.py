import dataclasses
import os

import numpy as np
import pandas as pd
import pytest

from core.config import DataSpec
from core.data.datasets import DatasetError, detect_format, prepare_data, read_table
from tests.conftest import TINY_CONFIG, TINY_SYNTHETIC, write_image


def make_ham10000(root, lesions=12, images_per_lesion=2, masks=False):
    rows = []
    dx_codes = ["mel", "nv", "bcc", "bkl", "akiec", "df", "vasc", "nv"]
    for lesion in range(lesions):
        dx = dx_codes[lesion % len(dx_codes)]
        for copy in range(images_per_lesion):
            image_id = f"ISIC_{lesion * 10 + copy:07d}"
            part = 1 if lesion % 2 else 2
            colour = (50 + lesion * 7 % 200, 60, 70)
            write_image(root / f"HAM10000_images_part_{part}" / f"{image_id}.jpg", colour=colour)
            if masks:
                write_image(root / "HAM10000_segmentations" / f"{image_id}_segmentation.png", colour=(255, 255, 255))
            rows.append({"lesion_id": f"HAM_{lesion:07d}", "image_id": image_id, "dx": dx, "age": 50})
    pd.DataFrame(rows).to_csv(root / "HAM10000_metadata.csv", index=False)
    return root


def make_csv_dataset(root, count=20, split_column=False):
    rows = []
    for index in range(count):
        image_id = f"ISIC_{index:07d}"
        write_image(root / "images" / f"{image_id}.jpg", colour=(40 + index * 5, 80, 90))
        row = {"image_id": image_id, "melanoma": int(index % 3 == 0)}
        if split_column:
            row["official_split"] = "test" if index >= 15 else "train"
        rows.append(row)
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return root


def test_detects_each_format(tmp_path, image_folder):
    assert detect_format("synthetic") == "synthetic"
    assert detect_format(str(image_folder)) == "imagefolder"
    assert detect_format(str(make_ham10000(tmp_path / "ham"))) == "ham10000"
    assert detect_format(str(make_csv_dataset(tmp_path / "isic"))) == "csv"
    assert detect_format(str(tmp_path / "isic" / "labels.csv")) == "csv"


def test_unrecognised_layout_says_what_was_expected(tmp_path):
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "readme.txt").write_text("hello")
    with pytest.raises(DatasetError, match="expected .*class sub-folders.*HAM10000.*CSV"):
        detect_format(str(tmp_path / "stuff"))


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        detect_format(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="empty"):
        detect_format(str(tmp_path / "empty"))


def test_imagefolder_is_case_insensitive_and_maps_classes(tmp_path):
    root = tmp_path / "data"
    for index in range(4):
        write_image(root / "MALIGNANT" / f"m{index}.png")
        write_image(root / "benign" / f"b{index}.png")
    data_format, table, _ = read_table(DataSpec(source=str(root)))
    assert data_format == "imagefolder"
    assert sorted(table["label"].tolist()) == [0] * 4 + [1] * 4
    assert all(table.loc[table["image_id"].str.startswith("MALIGNANT"), "label"] == 1)


def test_imagefolder_with_train_and_test_folders_keeps_the_given_split(tmp_path):
    root = tmp_path / "presplit"
    for part, count in (("train", 12), ("test", 4)):
        for index in range(count):
            write_image(root / part / "Cancer" / f"c{index}.jpg")
            write_image(root / part / "NotCancer" / f"n{index}.jpg")
    data = prepare_data(DataSpec(source=str(root)), TINY_CONFIG, tmp_path / "cache")
    test_ids = data.table.loc[data.table["split"] == "test", "image_id"]
    assert len(test_ids) == 8 and all(i.startswith("test") for i in test_ids)
    assert (data.table["split"] == "val").sum() > 0


def test_custom_label_mapping_for_unknown_folder_names(tmp_path):
    root = tmp_path / "odd"
    for index in range(4):
        write_image(root / "Melanoma" / f"m{index}.png")
        write_image(root / "SebK" / f"s{index}.png")
    with pytest.raises(DatasetError, match="no images|cannot map"):
        read_table(DataSpec(source=str(root), format="imagefolder"))
    _, table, _ = read_table(DataSpec(source=str(root), format="imagefolder", label_map={"SebK": 0}))
    assert sorted(table["label"]) == [0] * 4 + [1] * 4


def test_ham10000_maps_dx_and_groups_lesions(tmp_path):
    root = make_ham10000(tmp_path / "ham", lesions=24, images_per_lesion=3)
    data = prepare_data(DataSpec(source=str(root)), dataclasses.replace(TINY_CONFIG, split="60:40"), None)
    assert data.format == "ham10000"
    assert len(data.table) == 72
    dx_by_lesion = {f"HAM_{i:07d}": ["mel", "nv", "bcc", "bkl", "akiec", "df", "vasc", "nv"][i % 8] for i in range(24)}
    expected = data.table["group"].map(lambda lesion: int(dx_by_lesion[lesion] in ("mel", "bcc", "akiec")))
    assert (data.table["label"] == expected).all()
    splits_per_lesion = data.table.groupby("group")["split"].nunique()
    assert (splits_per_lesion == 1).all(), "no lesion on both sides of a split"


def test_ham10000_masks_are_loaded(tmp_path):
    root = make_ham10000(tmp_path / "ham", lesions=8, images_per_lesion=2, masks=True)
    data = prepare_data(DataSpec(source=str(root)), TINY_CONFIG, None)
    assert data.masks is not None and data.masks.shape == (16, 32, 32) and data.masks.max() == 1


def test_csv_dataset_with_isic_columns_and_split(tmp_path):
    root = make_csv_dataset(tmp_path / "isic", count=30, split_column=True)
    data = prepare_data(DataSpec(source=str(root)), TINY_CONFIG, tmp_path / "cache")
    assert data.format == "csv"
    assert set(data.table.loc[data.table["split"] == "test", "image_id"]) == {f"ISIC_{i:07d}" for i in range(15, 30)}
    assert data.table.set_index("image_id").loc["ISIC_0000003", "label"] == 1


def test_csv_without_needed_columns(tmp_path):
    root = make_csv_dataset(tmp_path / "isic")
    pd.DataFrame({"image_id": ["ISIC_0000000"], "age": [40]}).to_csv(root / "labels.csv", index=False)
    with pytest.raises(DatasetError, match="no label column"):
        read_table(DataSpec(source=str(root)))


def test_csv_labels_that_cannot_be_mapped(tmp_path):
    root = make_csv_dataset(tmp_path / "isic")
    table = pd.read_csv(root / "labels.csv")
    table["melanoma"] = ["maybe"] + table["melanoma"].tolist()[1:]
    table.to_csv(root / "labels.csv", index=False)
    with pytest.raises(DatasetError, match="cannot map melanoma value.*maybe"):
        read_table(DataSpec(source=str(root)))


def test_single_class_is_refused(tmp_path):
    root = tmp_path / "one-class"
    for index in range(6):
        write_image(root / "Cancer" / f"c{index}.jpg")
    with pytest.raises(DatasetError, match="only malignant"):
        prepare_data(DataSpec(source=str(root)), TINY_CONFIG, None)


def test_corrupt_images_are_skipped_and_counted(tmp_path, image_folder):
    broken = image_folder / "Cancer" / "broken.jpg"
    write_image(broken, size=(300, 300))
    broken.write_bytes(broken.read_bytes()[:400])  # truncated mid-scan
    (image_folder / "NotCancer" / "empty.png").write_bytes(b"")
    data = prepare_data(DataSpec(source=str(image_folder)), TINY_CONFIG, tmp_path / "cache")
    assert len(data.table) == 20
    assert sorted(reason.split(" ")[0] for _, reason in data.skipped) == ["corrupt", "not"]
    assert {image_id for image_id, _ in data.skipped} == {"Cancer/broken.jpg", "NotCancer/empty.png"}


def test_synthetic_split_is_the_same_for_every_model_and_depends_on_seed(tmp_path):
    first = prepare_data(TINY_SYNTHETIC, TINY_CONFIG, tmp_path)
    second = prepare_data(TINY_SYNTHETIC, dataclasses.replace(TINY_CONFIG, model="densenet121"), tmp_path)
    assert first.describe()["split_fingerprint"] == second.describe()["split_fingerprint"]
    other = prepare_data(TINY_SYNTHETIC, dataclasses.replace(TINY_CONFIG, seed=7), tmp_path)
    assert other.describe()["split_fingerprint"] != first.describe()["split_fingerprint"]
    assert first.masks is not None and first.images.shape[1:] == (32, 32, 3)


def test_max_images_takes_a_stratified_subset(tmp_path):
    spec = dataclasses.replace(TINY_SYNTHETIC, synthetic_count=80)
    data = prepare_data(spec, dataclasses.replace(TINY_CONFIG, max_images=40), tmp_path)
    assert 36 <= len(data.table) <= 44
    assert abs(data.table["label"].mean() - 0.35) < 0.1
    assert np.array_equal(data.images[0], prepare_data(spec, dataclasses.replace(TINY_CONFIG, max_images=40),
                                                       tmp_path).images[0])


def test_data_roots_restrict_dataset_paths(tmp_path, image_folder, monkeypatch):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    monkeypatch.setenv("DATA_ROOTS", str(allowed))
    with pytest.raises(DatasetError, match="outside the folders this dashboard may read"):
        detect_format(str(image_folder))
    inside = allowed / "data"
    inside.symlink_to(image_folder)  # a link inside the allowed folder that leads outside
    with pytest.raises(DatasetError, match="outside"):
        read_table(DataSpec(source=str(inside)))
    monkeypatch.setenv("DATA_ROOTS", f"{allowed}{os.pathsep}{image_folder}")
    assert detect_format(str(image_folder)) == "imagefolder"
    assert detect_format("synthetic") == "synthetic"
