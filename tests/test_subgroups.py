"""Subgroup metrics and skin tone: the ITA of patches of known CIELAB colour, what is left out as not skin,
and the subgroup table on tiny HAM10000- and CSV-layout datasets with hand-made predictions."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from skimage.color import lab2rgb
from sklearn.metrics import roc_auc_score

from core import figures
from core.config import DataSpec, TrainConfig
from core.data import images
from core.data.datasets import DatasetError, prepare_data
from core.data.skin_tone import (
    ITA_CATEGORY_NAMES,
    image_ita,
    individual_typology_angle,
    ita_category,
    ita_from_lab,
    srgb_to_lab,
)
from core.evaluation import subgroups
from core.evaluation.compare import ModelPredictions
from core.evaluation.subgroups import (
    ALL,
    format_subgroup_table,
    group_values,
    skin_tone_angles,
    subgroup_table,
)

# One CIELAB skin colour (L*, a*, b*) well inside each ITA category, with that category.
SKIN_COLOURS = (
    ((76.0, 6.0, 12.0), "very light"),  # 65.2 degrees
    ((72.0, 9.0, 20.0), "light"),  # 47.7
    ((64.0, 11.0, 20.0), "intermediate"),  # 35.0
    ((57.0, 13.0, 22.0), "tan"),  # 17.7
    ((46.0, 12.0, 22.0), "brown"),  # -10.3
    ((32.0, 10.0, 22.0), "dark"),  # -39.3
)
LESION_LAB = (28.0, 14.0, 16.0)  # a dark brown lesion
RESAMPLES = 200


def lab_colour(lab) -> np.ndarray:
    """The sRGB uint8 colour of one CIELAB value."""
    return np.round(lab2rgb(np.array([[lab]], dtype=np.float64))[0, 0] * 255).astype(np.uint8)


def lab_patch(lab, size: int = 32) -> np.ndarray:
    return np.broadcast_to(lab_colour(lab), (size, size, 3)).copy()


def expected_ita(lab) -> float:
    return math.degrees(math.atan((lab[0] - 50) / lab[2]))


def disc(size: int, centre: tuple[float, float], radius: float) -> np.ndarray:
    """size x size bool: a disc at `centre` (row, column as shares of the side) of `radius` (share of the side)."""
    rows, columns = np.mgrid[:size, :size]
    return np.hypot((rows + 0.5) / size - centre[0], (columns + 0.5) / size - centre[1]) <= radius


# --- skin tone ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("lab", "category"), SKIN_COLOURS)
def test_ita_of_a_flat_patch_is_its_colours_angle(lab, category):
    angle = individual_typology_angle(lab_patch(lab))
    assert angle == pytest.approx(expected_ita(lab), abs=0.5)
    assert ita_category(angle) == category


def test_srgb_to_lab_is_the_d65_standard():
    # Reference values of the CIE 1976 L*a*b* of sRGB white and pure red under D65 (e.g. Lindbloom's calculator).
    lab = srgb_to_lab(np.array([[[255, 255, 255], [255, 0, 0]]], dtype=np.uint8))[0]
    np.testing.assert_allclose(lab[0], [100.0, 0.0, 0.0], atol=0.01)
    np.testing.assert_allclose(lab[1], [53.24, 80.09, 67.20], atol=0.05)


@pytest.mark.parametrize(("angle", "category"), [
    (55.01, "very light"), (55.0, "light"), (41.01, "light"), (41.0, "intermediate"), (28.01, "intermediate"),
    (28.0, "tan"), (10.01, "tan"), (10.0, "brown"), (-29.99, "brown"), (-30.0, "dark"), (-80.0, "dark"),
    (89.0, "very light"), (math.nan, "unknown"),
])
def test_ita_categories_put_each_limit_in_the_darker_category(angle, category):
    assert ita_category(angle) == category


def test_ita_from_lab_needs_a_yellowish_colour():
    assert ita_from_lab(70.0, 20.0) == pytest.approx(45.0)
    assert math.isnan(ita_from_lab(70.0, 0.0))
    assert math.isnan(ita_from_lab(70.0, -5.0))


@pytest.mark.parametrize(("lab", "category"), SKIN_COLOURS)
def test_a_dark_lesion_in_the_middle_is_left_out_without_a_mask(lab, category):
    image = lab_patch(lab, 48)
    image[disc(48, (0.5, 0.5), 0.3)] = lab_colour(LESION_LAB)
    angle = individual_typology_angle(image)
    assert angle == pytest.approx(expected_ita(lab), abs=0.5)
    assert ita_category(angle) == category


def test_a_lesion_of_skin_like_lightness_is_left_out_by_the_disc():
    # Close enough in L* to pass the lightness band, so only the central disc keeps it out.
    skin, lesion = (72.0, 9.0, 20.0), (62.0, 18.0, 34.0)
    image = lab_patch(skin, 48)
    image[disc(48, (0.5, 0.5), 0.3)] = lab_colour(lesion)
    assert individual_typology_angle(image) == pytest.approx(expected_ita(skin), abs=0.5)


def test_the_mask_leaves_out_an_off_centre_lesion():
    skin, lesion = (72.0, 9.0, 20.0), (62.0, 18.0, 34.0)  # light skin, a tan-coloured lesion
    image = lab_patch(skin, 48)
    mask = disc(48, (0.7, 0.7), 0.6)  # off centre and large: most pixels outside the central disc are lesion
    image[mask] = lab_colour(lesion)
    assert individual_typology_angle(image, mask.astype(np.uint8)) == pytest.approx(expected_ita(skin), abs=0.5)
    unmasked = individual_typology_angle(image)
    assert abs(unmasked - expected_ita(skin)) > 2  # the disc alone would have measured the lesion too
    # An empty mask is taken for a failed segmentation: the disc stands in for it.
    assert individual_typology_angle(image, np.zeros((48, 48), np.uint8)) == pytest.approx(unmasked)


def test_a_large_image_is_measured_on_a_pixel_grid_that_keeps_its_mask_aligned():
    skin, lesion = (57.0, 13.0, 22.0), (62.0, 18.0, 34.0)
    image = lab_patch(skin, 240)
    mask = disc(240, (0.7, 0.7), 0.6)
    image[mask] = lab_colour(lesion)
    assert individual_typology_angle(image, mask.astype(np.uint8)) == pytest.approx(expected_ita(skin), abs=0.5)


def test_vignette_hair_glare_and_ink_are_not_skin():
    skin = (64.0, 11.0, 20.0)
    image = lab_patch(skin, 64)
    corners = ~disc(64, (0.5, 0.5), 0.5)
    image[corners] = (4, 3, 3)  # the dermatoscope's black field edge
    image[disc(64, (0.5, 0.5), 0.56) & ~disc(64, (0.5, 0.5), 0.5)] = lab_colour((35.0, 6.0, 11.0))  # its fade
    image[::9, :] = lab_colour((22.0, 4.0, 6.0))  # hair across the skin
    image[10:13, 20:26] = (255, 255, 255)  # glare
    image[50:54, 10:40] = lab_colour((40.0, 30.0, -40.0))  # purple ink
    assert individual_typology_angle(image) == pytest.approx(expected_ita(skin), abs=0.5)


def test_an_image_without_skin_to_measure_is_nan():
    grey = np.full((32, 32, 3), 140, np.uint8)
    assert math.isnan(individual_typology_angle(grey))  # b* = 0: no colour, no skin tone
    covered = np.ones((32, 32), np.uint8)
    assert math.isnan(individual_typology_angle(lab_patch(SKIN_COLOURS[0][0]), covered))
    with pytest.raises(ValueError, match="shape"):
        individual_typology_angle(lab_patch(SKIN_COLOURS[0][0]), np.ones((8, 8), np.uint8))


def test_image_ita_measures_each_image_with_its_own_mask():
    images = np.stack([lab_patch(lab) for lab, _ in SKIN_COLOURS])
    masks = np.zeros((len(images), 32, 32), np.uint8)
    masks[:, 10:20, 10:20] = 1
    angles = image_ita(images, masks)
    np.testing.assert_allclose(angles, [expected_ita(lab) for lab, _ in SKIN_COLOURS], atol=0.5)
    np.testing.assert_allclose(image_ita(images), angles, atol=1e-9)
    assert image_ita(images[:2], [None, masks[1]]).shape == (2,)


# --- a HAM10000 layout with metadata --------------------------------------------------------------------------

COUNT = 60
AGES = (25, 35, 50, 65, 80, None)
PLACES = ("back", "face", "lower extremity")


def ham_row(index: int) -> dict:
    malignant = index % 2 == 1
    return {
        "lesion_id": f"HAM_{index:07d}", "image_id": f"ISIC_{index:07d}",
        "dx": ("mel" if index % 4 == 1 else "bcc") if malignant else "nv", "dx_type": "histo",
        "age": AGES[index % len(AGES)],
        "sex": "male" if index < 30 else "female" if index < 54 else "unknown",
        "localization": PLACES[index % len(PLACES)],
        "dataset": "vidir_modern" if index < 40 else "rosendahl",
    }


def skin_lab(index: int):
    return SKIN_COLOURS[(index // 10) % len(SKIN_COLOURS)][0]


def write_lesion_image(path, skin, size: int = 40) -> None:
    image = lab_patch(skin, size)
    image[disc(size, (0.5, 0.5), 0.25)] = lab_colour(LESION_LAB)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, quality=95, subsampling=0)


@pytest.fixture
def ham_dataset(tmp_path):
    """60 images of 10 per skin tone, half malignant; 30 men, 24 women and 6 of unknown sex."""
    root = tmp_path / "ham"
    rows = [ham_row(index) for index in range(COUNT)]
    for index, row in enumerate(rows):
        write_lesion_image(root / "HAM10000_images_part_1" / f"{row['image_id']}.jpg", skin_lab(index))
    pd.DataFrame(rows).to_csv(root / "HAM10000_metadata.csv", index=False)
    return DataSpec(source=str(root))


def predictions(image_ids, labels, seed: int) -> pd.DataFrame:
    """Scores that separate the classes imperfectly, differently for each seed."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    scores = np.clip(0.35 + 0.3 * labels + rng.normal(0, 0.2, len(labels)), 0.01, 0.99)
    return pd.DataFrame({"image_id": list(image_ids), "label": labels, "prob_malignant": scores})


def model(name: str, test: pd.DataFrame, threshold: float = 0.5) -> ModelPredictions:
    return ModelPredictions(name, {"run_id": name}, test.iloc[:0], test, threshold)


@pytest.fixture
def ham_models():
    ids = [f"ISIC_{index:07d}" for index in range(COUNT)] + ["ISIC_9999999"]  # the last is not in the metadata
    labels = [index % 2 for index in range(COUNT)] + [1]
    return [model("ResNet18", predictions(ids, labels, 1)), model("Hybrid S-ResNet", predictions(ids, labels, 2), 0.4)]


def test_sex_groups_count_images_and_mark_the_small_one(ham_dataset, ham_models, tmp_path):
    ids = ham_models[0].test["image_id"]
    values = group_values(ham_dataset, "sex", ids, tmp_path / "cache")
    assert values.loc["ISIC_0000000"] == "male" and values.loc["ISIC_9999999"] == "unknown"
    table = subgroup_table(ham_models, values, resamples=RESAMPLES, seed=0)
    first = table[table["Model"] == "ResNet18"].set_index("Group")
    assert list(first.index) == [ALL, "female", "male", "unknown"]
    assert first.loc[ALL, ["n", "positives", "negatives"]].tolist() == [61, 31, 30]
    assert first.loc["male", ["n", "positives", "negatives"]].tolist() == [30, 15, 15]
    assert first.loc["female", ["n", "positives", "negatives"]].tolist() == [24, 12, 12]
    assert first.loc["unknown", ["n", "positives", "negatives"]].tolist() == [7, 4, 3]  # 6 unknown + 1 unlisted
    assert first["too_small"].tolist() == [False, False, False, True]
    assert len(table) == 8 and set(table["Model"]) == {"ResNet18", "Hybrid S-ResNet"}


def test_group_metrics_are_sklearns_on_that_group_and_gaps_are_to_the_whole_set(ham_dataset, ham_models, tmp_path):
    values = group_values(ham_dataset, "sex", ham_models[0].test["image_id"], tmp_path / "cache")
    table = subgroup_table(ham_models, values, resamples=RESAMPLES, seed=0)
    for entry in ham_models:
        test = entry.test.assign(group=values.astype(object).reindex(entry.test["image_id"]).fillna("unknown").values)
        rows = table[table["Model"] == entry.name].set_index("Group")
        for group, part in [(ALL, test)] + list(test.groupby("group")):
            labels, scores = part["label"].to_numpy(), part["prob_malignant"].to_numpy()
            called = scores >= entry.threshold
            row = rows.loc[group]
            assert row["AUC"] == pytest.approx(roc_auc_score(labels, scores))
            assert row["Sensitivity"] == pytest.approx(called[labels == 1].mean())
            assert row["Specificity"] == pytest.approx((~called[labels == 0]).mean())
            for title in ("AUC", "Sensitivity", "Specificity"):
                assert row[f"{title} low"] <= row[title] <= row[f"{title} high"]
                assert row[f"{title} gap"] == pytest.approx(row[title] - rows.loc[ALL, title])
    assert (table.loc[table["Group"] == ALL, "AUC gap"] == 0).all()


def test_age_bands_localization_site_and_dx(ham_dataset, tmp_path):
    ids = [f"ISIC_{index:07d}" for index in range(COUNT)]
    ages = group_values(ham_dataset, "age", ids, None)
    assert list(ages.cat.categories) == ["under 30", "30-44", "45-59", "60-74", "75 and over", "unknown"]
    assert ages.value_counts().to_dict() == {band: 10 for band in ages.cat.categories}
    assert ages.loc["ISIC_0000004"] == "75 and over" and ages.loc["ISIC_0000005"] == "unknown"
    places = group_values(ham_dataset, "localization", ids, None)
    assert places.value_counts().to_dict() == {"back": 20, "face": 20, "lower extremity": 20, "unknown": 0}
    sites = group_values(ham_dataset, "site", ids, None)  # HAM10000's `dataset` column
    assert sites.value_counts().to_dict() == {"rosendahl": 20, "vidir_modern": 40, "unknown": 0}
    diagnoses = group_values(ham_dataset, "dx", ids, None)
    assert diagnoses.value_counts().to_dict() == {"bcc": 15, "mel": 15, "nv": 30, "unknown": 0}
    # A group of one class has no AUC, and is too small to judge, but is still shown.
    test = predictions(ids, [index % 2 for index in range(COUNT)], 3)
    table = subgroup_table([model("ResNet18", test)], diagnoses, resamples=RESAMPLES).set_index("Group")
    assert math.isnan(table.loc["mel", "AUC"]) and table.loc["mel", "Sensitivity"] >= 0
    assert table.loc["mel", "too_small"] and math.isnan(table.loc["mel", "Specificity"])


def test_a_missing_column_names_the_columns_there_are(ham_dataset, tmp_path):
    with pytest.raises(DatasetError, match=r"no 'skin_type' column.*dx_type, age, sex, localization, dataset"):
        group_values(ham_dataset, "skin_type", ["ISIC_0000000"], None)
    metadata = pd.read_csv(f"{ham_dataset.source}/HAM10000_metadata.csv").drop(columns="dataset")
    metadata.to_csv(f"{ham_dataset.source}/HAM10000_metadata.csv", index=False)  # an older HAM10000 release
    with pytest.raises(DatasetError, match=r"no 'site' column \(looked for dataset"):
        group_values(ham_dataset, "site", ["ISIC_0000000"], None)
    # Any column of the metadata is a subgroup, in any case.
    assert group_values(ham_dataset, "DX_TYPE", ["ISIC_0000000"], None).iloc[0] == "histo"


def test_datasets_without_metadata_only_offer_skin_tone(image_folder):
    for spec in (DataSpec(source="synthetic", synthetic_count=8), DataSpec(source=str(image_folder))):
        with pytest.raises(DatasetError, match="only 'ita'"):
            group_values(spec, "sex", ["x"], None)


def test_skin_tone_groups_of_the_ham_images_and_their_cache(ham_dataset, tmp_path, monkeypatch):
    ids = [f"ISIC_{index:07d}" for index in range(COUNT)] + ["ISIC_9999999"]
    cache = tmp_path / "cache"
    tones = group_values(ham_dataset, "ita", ids, cache, image_size=40)
    assert list(tones.cat.categories) == list(ITA_CATEGORY_NAMES) + ["unknown"]
    assert [tones.loc[f"ISIC_{index:07d}"] for index in range(COUNT)] == [
        SKIN_COLOURS[(index // 10) % 6][1] for index in range(COUNT)]
    assert tones.loc["ISIC_9999999"] == "unknown"
    angles = skin_tone_angles(ham_dataset, ids[:12], cache, image_size=40)
    np.testing.assert_allclose(angles.iloc[:10], expected_ita(SKIN_COLOURS[0][0]), atol=1.0)  # JPEG, 40 px
    assert len(list(cache.glob("ita-*.json"))) == 1

    def no_measuring(*args, **kwargs):
        raise AssertionError("the cached angles should have been used")

    monkeypatch.setattr(subgroups, "individual_typology_angle", no_measuring)
    again = group_values(ham_dataset, "ita", ids, cache, image_size=40)
    pd.testing.assert_series_equal(again, tones)
    with pytest.raises(AssertionError, match="cached"):  # another size is another measurement
        group_values(ham_dataset, "ita", ids[:1], cache, image_size=32)


def test_skin_tone_reads_the_images_training_decoded(ham_dataset, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    # The fixture is one picture in six skin tones: near-duplicates all, which one split cannot hold apart.
    prepare_data(ham_dataset, TrainConfig(image_size=40, group_near_duplicates=False), cache)

    def no_decoding(*args, **kwargs):
        raise AssertionError("the images were decoded again")

    monkeypatch.setattr(images, "decode_image", no_decoding)
    ids = [f"ISIC_{index:07d}" for index in range(0, COUNT, 7)]
    tones = group_values(ham_dataset, "ita", ids, cache, image_size=40)
    assert tones.tolist() == [SKIN_COLOURS[(index // 10) % 6][1] for index in range(0, COUNT, 7)]


def test_skin_tone_uses_the_datasets_masks(tmp_path):
    root = tmp_path / "ham-masks"
    skin, lesion = (72.0, 9.0, 20.0), (62.0, 18.0, 34.0)
    rows = [ham_row(index) for index in range(2)]
    for row in rows:
        image = lab_patch(skin, 48)
        mask = disc(48, (0.7, 0.7), 0.6)
        image[mask] = lab_colour(lesion)
        (root / "HAM10000_images_part_1").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / "HAM10000_images_part_1" / f"{row['image_id']}.png")
        (root / "HAM10000_segmentation").mkdir(exist_ok=True)
        if row["image_id"].endswith("0"):
            Image.fromarray(mask.astype(np.uint8) * 255).save(
                root / "HAM10000_segmentation" / f"{row['image_id']}_segmentation.png")
    pd.DataFrame(rows).to_csv(root / "HAM10000_metadata.csv", index=False)
    angles = skin_tone_angles(DataSpec(source=str(root)), [row["image_id"] for row in rows], None, image_size=48)
    assert angles.iloc[0] == pytest.approx(expected_ita(skin), abs=0.5)  # its mask leaves the lesion out
    assert abs(angles.iloc[1] - expected_ita(skin)) > 2  # no mask: the central disc misses most of the lesion


def test_skin_tone_of_the_synthetic_set(tmp_path):
    spec = DataSpec(source="synthetic", synthetic_count=12, synthetic_image_size=64, synthetic_seed=3)
    ids = [f"synthetic_{index:05d}" for index in range(12)] + ["synthetic_99999"]
    angles = skin_tone_angles(spec, ids, tmp_path / "cache")
    assert np.isfinite(angles.iloc[:12]).all() and math.isnan(angles.iloc[12])
    # The synthetic palette runs from pale to mid-brown skin, darkened by shading: nothing lighter or darker.
    assert angles.iloc[:12].between(-30, 80).all()
    tones = group_values(spec, "ita", ids, tmp_path / "cache")
    assert set(tones.iloc[:12]) <= set(ITA_CATEGORY_NAMES) - {"dark"}


# --- a CSV dataset ----------------------------------------------------------------------------------------------


@pytest.fixture
def csv_dataset(tmp_path):
    """ISIC-style labels.csv with a hospital column and an age_approx column beside an images folder."""
    root = tmp_path / "isic"
    hospitals = ["north"] * 24 + ["south"] * 22 + ["east"] * 4 + [""] * 2
    rows = []
    for index, hospital in enumerate(hospitals):
        image_id = f"img_{index:03d}"
        write_lesion_image(root / "images" / f"{image_id}.jpg", skin_lab(index), size=24)
        rows.append({"image_name": f"{image_id}.jpg", "melanoma": index % 2, "hospital": hospital,
                     "age_approx": 20 + 10 * (index % 7)})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return DataSpec(source=str(root)), [f"img_{index:03d}" for index in range(len(hospitals))]


def test_any_categorical_column_of_a_csv_dataset(csv_dataset, tmp_path):
    spec, ids = csv_dataset
    values = group_values(spec, "hospital", ids, None)
    assert list(values.cat.categories) == ["east", "north", "south", "unknown"]
    test = predictions(ids, [index % 2 for index in range(len(ids))], 4)
    table = subgroup_table([model("DenseNet121", test)], values, resamples=RESAMPLES).set_index("Group")
    assert table.loc[["north", "south", "east", "unknown"], "n"].tolist() == [24, 22, 4, 2]
    assert table.loc[["north", "south", "east", "unknown"], "too_small"].tolist() == [False, False, True, True]
    part = test[values.reindex(test["image_id"]).to_numpy() == "north"]
    assert table.loc["north", "AUC"] == pytest.approx(roc_auc_score(part["label"], part["prob_malignant"]))
    ages = group_values(spec, "age", ids, None)  # ISIC's age_approx stands in for age
    assert ages.loc["img_000"] == "under 30" and ages.loc["img_006"] == "75 and over"
    with pytest.raises(DatasetError, match=r"labels.csv has no 'ward' column.*image_name, melanoma, hospital"):
        group_values(spec, "ward", ids, None)
    with pytest.raises(DatasetError, match="not a category"):
        group_values(spec, "image_name", ids, None)


def test_numeric_groups_sort_by_value(tmp_path):
    values = pd.Series(["10", "2", "1", None], index=["a", "b", "c", "d"])
    test = predictions(["a", "b", "c", "d"], [0, 1, 0, 1], 5)
    table = subgroup_table([model("ResNet18", test)], values, resamples=RESAMPLES)
    assert table["Group"].tolist() == [ALL, "1", "2", "10", "unknown"]


# --- output -------------------------------------------------------------------------------------------------------


def test_formats_and_the_forest_figure(ham_dataset, ham_models, tmp_path):
    values = group_values(ham_dataset, "site", ham_models[0].test["image_id"], None)
    table = subgroup_table(ham_models, values, resamples=RESAMPLES)
    text = format_subgroup_table(table, "table")
    assert "too small to judge" in text and "vidir_modern" in text and "positives" in text
    first = table.iloc[1]
    assert f"{first['AUC']:.3f} [{first['AUC low']:.3f}, {first['AUC high']:.3f}]" in text
    assert f"{first['AUC gap']:+.3f}" in text
    latex = format_subgroup_table(table, "latex")
    assert "\\begin{tabular}" in latex and "vidir\\_modern" in latex
    from io import StringIO

    parsed = pd.read_csv(StringIO(format_subgroup_table(table, "csv")))
    assert {"AUC low", "AUC high", "Sensitivity gap", "too_small", "n", "positives"} <= set(parsed.columns)
    assert len(parsed) == len(table)
    with pytest.raises(ValueError, match="unknown format"):
        format_subgroup_table(table, "html")

    figure = subgroup_forest_figure_checked(table)
    faded = [trace for trace in figure.data if trace.opacity is not None and trace.opacity < 1]
    assert faded and all(trace.marker.symbol == "circle-open" for trace in faded)
    ticks = figure.layout.yaxis.ticktext
    assert ticks[0].startswith(ALL) and any("too small" in tick for tick in ticks)
    assert len(figure.layout.shapes) == 2 * 2  # the whole-set line of each model in each panel


def subgroup_forest_figure_checked(table):
    figure = figures.subgroup_forest_figure(table)
    assert figure.layout.template.layout.paper_bgcolor is not None  # named template, not streamlit's
    assert [annotation.text for annotation in figure.layout.annotations][:2] == ["AUC [95% CI]",
                                                                               "Sensitivity [95% CI]"]
    drawn = [trace for trace in figure.data if trace.x is not None and trace.x[0] is not None]
    assert {trace.name for trace in drawn} == set(table["Model"])
    return figure


def test_compare_and_evaluate_by_subgroup_from_the_cli(ham_dataset, tmp_path, capsys):
    """`compare --by` groups a run's own test images by its dataset's metadata; `evaluate --by` groups an
    external set's images by that set's metadata; both print one CSV row per model and group."""
    from io import StringIO

    from core.cli import main

    runs_dir = str(tmp_path / "runs")
    assert main(["train", "--model", "resnet18", "--data", ham_dataset.source, "--image-size", "32", "--epochs", "1",
                 "--batch-size", "8", "--no-pretrained", "--precision", "fp32", "--split", "60:40",
                 "--no-duplicate-grouping", "--runs-dir", runs_dir]) == 0
    run_id = capsys.readouterr().out.split()[-1]
    test_ids = pd.read_csv(tmp_path / "runs" / run_id / "split.csv").query("split == 'test'")["image_id"]
    assert main(["compare", "--by", "sex", "--format", "csv", "--resamples", "50", "--runs-dir", runs_dir]) == 0
    table = pd.read_csv(StringIO(capsys.readouterr().out))
    expected = pd.DataFrame([ham_row(int(i.split("_")[1])) for i in test_ids])["sex"].value_counts()
    assert table["Group"].iloc[0] == "All" and table["n"].iloc[0] == len(test_ids)
    assert dict(zip(table["Group"].iloc[1:], table["n"].iloc[1:])) == expected.to_dict()
    assert table["too_small"].iloc[1:].all(), "a 60-image set has fewer than 10 of each class per sex"

    other = tmp_path / "other-clinic"
    rows = [dict(ham_row(index), image_id=f"ISIC_{index + 500:07d}") for index in range(24)]
    for index, row in enumerate(rows):
        write_lesion_image(other / "HAM10000_images_part_1" / f"{row['image_id']}.jpg", skin_lab(index))
    pd.DataFrame(rows).to_csv(other / "HAM10000_metadata.csv", index=False)
    assert main(["evaluate", "--data", str(other), "--by", "localization", "--format", "csv", "--resamples", "50",
                 "--runs-dir", runs_dir]) == 0
    table = pd.read_csv(StringIO(capsys.readouterr().out))
    assert table["n"].iloc[0] == 24
    assert dict(zip(table["Group"].iloc[1:], table["n"].iloc[1:])) == {place: 8 for place in PLACES}
    assert main(["evaluate", "--data", str(other), "--by", "ita", "--resamples", "50", "--runs-dir", runs_dir]) == 0
    assert "very light" in capsys.readouterr().out
    assert main(["compare", "--by", "hospital", "--runs-dir", runs_dir]) == 2
    assert "has no 'hospital' column" in capsys.readouterr().err
