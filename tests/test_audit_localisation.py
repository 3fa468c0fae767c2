"""Localisation measures checked against quantus (the reference implementation of the XAI-evaluation
literature), SSIM against scikit-image, and both against small cases worked by hand from the papers'
definitions. quantus is installed without its dependencies (requirements-nodeps.txt says why)."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
from PIL import Image

from core.audit.localisation import (
    MEASURES,
    find_mask_files,
    load_masks,
    localisation_measures,
    structural_similarity,
    top_k_intersection,
)
from core.cams import pointing_game_hit
from core.data.images import decode_image
from tests.conftest import reference_package


@pytest.fixture(scope="module")
def quantus():
    return reference_package("quantus", "make install: pip install --no-deps -r requirements-nodeps.txt")


@pytest.fixture(scope="module")
def skimage_ssim():
    return reference_package("skimage.metrics", "pip install scikit-image").structural_similarity


# --- maps and masks -----------------------------------------------------------------------------

def ellipse_mask(size, rng):
    rows, columns = np.mgrid[:size, :size]
    centre = rng.uniform(0.25, 0.75, 2) * size
    radii = rng.uniform(0.08, 0.3, 2) * size
    return (((rows - centre[0]) / radii[0]) ** 2 + ((columns - centre[1]) / radii[1]) ** 2 <= 1).astype(np.uint8)


def blob(size, centre, width):
    rows, columns = np.mgrid[:size, :size]
    return np.exp(-((rows - centre[0]) ** 2 + (columns - centre[1]) ** 2) / (2 * width ** 2))


def maps_and_masks(size, seed, count=20):
    """Non-negative maps of five kinds (noise, a blob on the lesion, a blob away from it, a coarse map
    upsampled like a CAM, a ReLU'd one) with elliptic lesions. Tiny noise breaks exact ties, whose
    order quantus leaves to an unstable argsort."""
    rng = np.random.default_rng(seed)
    cams, masks = [], []
    for index in range(count):
        mask = ellipse_mask(size, rng)
        rows, columns = np.nonzero(mask)
        lesion_centre = np.array([rows.mean(), columns.mean()])
        kind = index % 5
        if kind == 0:
            cam = rng.random((size, size))
        elif kind == 1:
            cam = blob(size, lesion_centre + rng.normal(0, 0.05 * size, 2), rng.uniform(0.05, 0.2) * size)
        elif kind == 2:
            cam = blob(size, size - 1 - lesion_centre, rng.uniform(0.05, 0.2) * size)
        else:
            coarse = rng.normal(size=(7, 7)) + (kind == 4) * 0.5
            cam = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_LINEAR)
            cam = np.maximum(cam, 0) + (kind == 4) * 0.1 * np.maximum(cam, 0).max()
        cams.append(cam * rng.uniform(0.01, 100) + 1e-6 * rng.random((size, size)))
        masks.append(mask)
    return np.stack(cams), np.stack(masks)


def run_quantus(metric, cams, masks, **options):
    count, size = cams.shape[0], cams.shape[-1]
    instance = metric(disable_warnings=True, display_progressbar=False, normalise=False, abs=False, **options)
    scores = instance(model=None, x_batch=np.zeros((count, 3, size, size)), y_batch=np.zeros(count, dtype=int),
                      a_batch=cams[:, None].astype(np.float64), s_batch=masks[:, None].astype(np.float64),
                      channel_first=True)
    return np.asarray(scores, dtype=np.float64)


def ours(cams, masks, key, **options):
    return np.array([localisation_measures(cam, mask, **options)[key] for cam, mask in zip(cams, masks)])


CASES = [(32, 0), (32, 1), (96, 2), (96, 3)]


# --- against quantus ----------------------------------------------------------------------------

@pytest.mark.parametrize("size, seed", CASES)
def test_pointing_game_matches_quantus(quantus, size, seed):
    cams, masks = maps_and_masks(size, seed)
    expected = run_quantus(quantus.PointingGame, cams, masks)
    got = ours(cams, masks, "pointing_game")
    assert got.tolist() == expected.tolist()
    assert 0 < got.sum() < len(got), "the cases hold hits and misses"


def test_pointing_game_counts_a_tied_maximum_inside_as_a_hit_like_quantus(quantus):
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[20:28, 20:28] = 1
    cams = np.random.default_rng(4).random((3, 32, 32)) * 0.5
    cams[0, 2, 2] = cams[0, 24, 24] = 1.0  # first maximum outside, a tied one inside
    cams[1, 2, 2] = cams[1, 5, 9] = 1.0  # both outside
    cams[2, 21, 21] = cams[2, 2, 2] = 1.0  # first maximum inside
    masks = np.stack([mask] * 3)
    assert run_quantus(quantus.PointingGame, cams, masks).tolist() == [1.0, 0.0, 1.0]
    assert ours(cams, masks, "pointing_game").tolist() == [1.0, 0.0, 1.0]
    # The Explain page's pointing game is the same one, ties included.
    assert [pointing_game_hit(cam, mask) for cam in cams] == [True, False, True]


@pytest.mark.parametrize("size, seed", CASES)
def test_energy_inside_and_relevance_mass_match_quantus_relevance_mass_accuracy(quantus, size, seed):
    cams, masks = maps_and_masks(size, seed)
    expected = run_quantus(quantus.RelevanceMassAccuracy, cams, masks)
    np.testing.assert_allclose(ours(cams, masks, "energy_inside"), expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(ours(cams, masks, "relevance_mass"), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("size, seed", CASES)
def test_signed_maps_relevance_mass_is_quantus_positive_attribution_localisation(quantus, size, seed):
    """On signed maps relevance_mass keeps positive relevance only: quantus' AttributionLocalisation
    (Kohlbrenner et al. 2020) with positive_attributions=True computes that ratio (1e-9 added to the
    total). RelevanceMassAccuracy uses the raw map, as energy_inside does where the map's sum is positive."""
    cams, masks = maps_and_masks(size, seed)
    rng = np.random.default_rng(seed)
    shifts = [np.quantile(cam, rng.uniform(0.3, 0.9)) for cam in cams]
    signed = cams - np.array(shifts)[:, None, None]
    expected = run_quantus(quantus.AttributionLocalisation, signed, masks, positive_attributions=True)
    np.testing.assert_allclose(ours(signed, masks, "relevance_mass"), expected, rtol=0, atol=1e-6)
    raw = run_quantus(quantus.RelevanceMassAccuracy, signed, masks)
    positive_sum = signed.sum(axis=(1, 2)) > 0
    assert 0 < positive_sum.sum() < len(signed)
    np.testing.assert_allclose(ours(signed, masks, "energy_inside")[positive_sum], raw[positive_sum], rtol=0,
                               atol=1e-6)
    assert np.isnan(ours(signed, masks, "energy_inside")[~positive_sum]).all()
    assert np.abs(expected - raw).max() > 1e-3, "the two definitions differ on signed maps"


@pytest.mark.parametrize("size, seed", CASES)
def test_relevance_rank_matches_quantus(quantus, size, seed):
    cams, masks = maps_and_masks(size, seed)
    expected = run_quantus(quantus.RelevanceRankAccuracy, cams, masks)
    np.testing.assert_allclose(ours(cams, masks, "relevance_rank"), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("size, seed", CASES)
def test_top_k_intersection_matches_quantus_and_gives_top_iou(quantus, size, seed):
    """quantus' TopKIntersection divides the top-k pixels inside the mask by k, not by the union: it is
    not our IoU, but our IoU follows from it: IoU = I / (|mask| + k - I) with I = k * share."""
    cams, masks = maps_and_masks(size, seed)
    for top_share in (0.05, 0.2, 0.5):
        k = math.ceil(top_share * size * size - 1e-9)
        expected = run_quantus(quantus.TopKIntersection, cams, masks, k=k)
        got = np.array([top_k_intersection(cam, mask, k) for cam, mask in zip(cams, masks)])
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
        intersection = expected * k
        iou = intersection / (masks.sum(axis=(1, 2)) + k - intersection)
        np.testing.assert_allclose(ours(cams, masks, "top_iou", top_share=top_share), iou, rtol=0, atol=1e-6)


# --- hand-computed cases from the definitions ----------------------------------------------------

RAMP = np.arange(16, dtype=float).reshape(4, 4)  # 0 1 2 3 / 4 5 6 7 / 8 9 10 11 / 12 13 14 15
CORNER = np.zeros((4, 4), dtype=np.uint8)
CORNER[2:, 2:] = 1  # holds 10, 11, 14, 15


def test_hand_worked_ramp():
    got = localisation_measures(RAMP, CORNER, top_share=0.25)
    assert set(got) == set(MEASURES)
    assert got["energy_inside"] == pytest.approx(50 / 120)  # (10 + 11 + 14 + 15) / (0 + ... + 15)
    assert got["relevance_mass"] == pytest.approx(50 / 120)  # a non-negative map: the same number
    assert got["pointing_game"] == 1.0  # 15 is inside
    assert got["relevance_rank"] == 0.5  # K = 4; the top four are 15, 14, 13, 12: two inside
    assert got["top_iou"] == pytest.approx(1 / 3)  # top 25% = those four: |I| = 2, |U| = 4 + 4 - 2
    assert got["lesion_area"] == 0.25
    flipped = localisation_measures(15 - RAMP, CORNER, top_share=0.25)
    assert flipped["pointing_game"] == 0.0 and flipped["relevance_rank"] == 0.0 and flipped["top_iou"] == 0.0


def test_hand_worked_signed_map_keeps_positive_relevance_only():
    signed = RAMP - 6  # -6 ... 9
    got = localisation_measures(signed, CORNER)
    assert got["relevance_mass"] == pytest.approx((4 + 5 + 8 + 9) / (1 + 2 + 3 + 4 + 5 + 6 + 7 + 8 + 9))
    assert got["energy_inside"] == pytest.approx(26 / 24)  # signed sums: negative relevance cancels positive
    assert got["relevance_rank"] == 0.5 and got["pointing_game"] == 1.0  # ranks ignore the shift


def test_ties_at_the_cut_share_the_places_left():
    plateau = np.zeros((4, 4))
    plateau[:2, :2] = 1  # four tied maxima, one inside
    centre = np.zeros((4, 4), dtype=np.uint8)
    centre[1:3, 1:3] = 1
    got = localisation_measures(plateau, centre, top_share=0.5)
    assert got["pointing_game"] == 1.0  # one of the tied maxima, (1, 1), is inside
    assert pointing_game_hit(plateau, centre)  # though the first maximum, (0, 0), is not
    assert got["relevance_rank"] == 0.25  # the top four are exactly the four ones: one inside
    # Top 8: the four ones (one inside) and 4 of the 12 tied zeros, 3 of which are inside: 4 * 3 / 12 = 1
    # expected inside, so I = 2 and IoU = 2 / (4 + 8 - 2).
    assert got["top_iou"] == pytest.approx(0.2)
    assert top_k_intersection(plateau, centre, 8) == pytest.approx(2 / 8)


def test_nothing_to_measure_gives_nan():
    blank = localisation_measures(np.zeros((4, 4)), CORNER)
    assert blank["lesion_area"] == 0.25
    assert all(math.isnan(blank[key]) for key in MEASURES if key != "lesion_area")
    constant = localisation_measures(np.full((4, 4), 3.0), CORNER)
    assert constant["energy_inside"] == constant["relevance_mass"] == 0.25  # a uniform map scores the area
    assert all(math.isnan(constant[key]) for key in ("pointing_game", "relevance_rank", "top_iou"))
    no_lesion = localisation_measures(RAMP, np.zeros((4, 4)))
    assert no_lesion["lesion_area"] == 0.0
    assert all(math.isnan(no_lesion[key]) for key in MEASURES if key != "lesion_area")
    assert math.isnan(top_k_intersection(RAMP, np.zeros((4, 4)), 3))


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="same size"):
        localisation_measures(RAMP, np.zeros((3, 4)))
    with pytest.raises(ValueError, match="NaN"):
        localisation_measures(np.full((4, 4), np.nan), CORNER)
    with pytest.raises(ValueError, match="top_share"):
        localisation_measures(RAMP, CORNER, top_share=0)
    with pytest.raises(ValueError, match="k must"):
        top_k_intersection(RAMP, CORNER, 17)


# --- SSIM ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [32, 96])
def test_ssim_matches_scikit_image(skimage_ssim, size):
    rng = np.random.default_rng(size)
    cams, _ = maps_and_masks(size, seed=size, count=10)
    scaled = (cams - cams.min(axis=(1, 2), keepdims=True)) / np.ptp(cams, axis=(1, 2), keepdims=True)
    pairs = [(rng.random((size, size)), rng.random((size, size))) for _ in range(4)]
    pairs += [(scaled[i], scaled[i + 1]) for i in range(0, 10, 2)]
    pairs += [(scaled[0], np.clip(scaled[0] + rng.normal(0, 0.1, (size, size)), 0, 1))]
    values = []
    for first, second in pairs:
        expected = skimage_ssim(first, second, data_range=1, gaussian_weights=True, sigma=1.5,
                                use_sample_covariance=False)
        values.append(structural_similarity(first, second))
        assert values[-1] == pytest.approx(expected, abs=1e-6)
    assert min(values) < 0.2 and max(values) > 0.5, "the pairs span dissimilar and similar maps"
    assert structural_similarity(scaled[0], scaled[0]) == pytest.approx(1.0)
    single = scaled[1].astype(np.float32)
    assert structural_similarity(single, scaled[2]) == pytest.approx(structural_similarity(scaled[1], scaled[2]),
                                                                     abs=1e-6)


def test_ssim_refuses_maps_smaller_than_its_window():
    with pytest.raises(ValueError, match="at least 11"):
        structural_similarity(np.zeros((10, 32)), np.zeros((10, 32)))
    with pytest.raises(ValueError, match="same size"):
        structural_similarity(np.zeros((32, 32)), np.zeros((32, 33)))


# --- mask files ----------------------------------------------------------------------------------

def write_mask(path, width=8, height=8, box=(0, 0, 4, 4), value=255):
    array = np.zeros((height, width), dtype=np.uint8)
    left, top, right, bottom = box
    array[top:bottom, left:right] = value
    Image.fromarray(array).save(path, format="PNG")


def test_mask_files_are_found_by_name(tmp_path):
    for name in ["ISIC_0000001_segmentation.png", "ISIC_0000001_mask.png", "ISIC_0000001_b.png",
                 "ISIC_0000002_mask.png", "ISIC_0000002_zzz.png", "ISIC_0000003_lesion.PNG",
                 "ISIC_0000004_superpixels.png", "ISIC_0000005.png", "other_segmentation.png",
                 "ISIC_0000006_mask.jpg", "A_1_mask.png", "A_seg.png"]:
        write_mask(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not a mask")
    (tmp_path / "sub").mkdir()
    write_mask(tmp_path / "sub" / "ISIC_0000007_segmentation.png")
    ids = [f"ISIC_000000{i}" for i in range(1, 8)] + ["A", "A_1"]
    found = find_mask_files(tmp_path, ids)
    assert {key: path.name for key, path in found.items()} == {
        "ISIC_0000001": "ISIC_0000001_segmentation.png",  # ISIC 2018 task 1 wins
        "ISIC_0000002": "ISIC_0000002_mask.png",  # then _mask, before other suffixes
        "ISIC_0000003": "ISIC_0000003_lesion.PNG",  # any suffix, extension in any case
        "A": "A_seg.png",
        "A_1": "A_1_mask.png",  # the longest image id that fits
    }  # no superpixels, no image itself, no JPEG, no sub-folder, no unknown id
    assert find_mask_files(tmp_path, reversed(ids)) == found


def test_masks_are_loaded_squashed_like_the_images_and_unreadable_ones_skipped(tmp_path):
    # A 60 x 40 image and its mask: the box x < 15, y < 20 lands on x < 8, y < 16 at 32 x 32 when
    # squashed (a centre crop would put it at x < 4).
    write_mask(tmp_path / "wide_segmentation.png", width=60, height=40, box=(0, 0, 15, 20))
    image = np.zeros((40, 60, 3), dtype=np.uint8)
    image[:20, :15] = 255
    Image.fromarray(image).save(tmp_path / "wide.png")
    write_mask(tmp_path / "small_mask.png", width=8, height=8, box=(0, 0, 8, 4), value=1 * 255)
    (tmp_path / "broken_segmentation.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    masks = load_masks(tmp_path, ["wide", "small", "broken", "absent"], size=32)
    assert sorted(masks) == ["small", "wide"]
    assert [name for name, _ in masks.skipped] == ["broken_segmentation.png"]
    expected = np.zeros((32, 32), dtype=np.uint8)
    expected[:16, :8] = 1
    assert masks["wide"].dtype == np.uint8 and masks["wide"].shape == (32, 32)
    np.testing.assert_array_equal(masks["wide"], expected)
    np.testing.assert_array_equal(masks["wide"], (decode_image(tmp_path / "wide.png", 32)[..., 0] > 127))
    assert masks["small"][:16].all() and not masks["small"][16:].any()


def test_mask_folder_errors_are_one_line(tmp_path):
    with pytest.raises(ValueError, match="does not exist") as missing:
        load_masks(tmp_path / "nowhere", ["a"], 32)
    write_mask(tmp_path / "other_segmentation.png")
    with pytest.raises(ValueError, match=r"no mask in .* matches any of the 2 images \(expected "
                                         r"<image_id>_segmentation\.png") as unmatched:
        load_masks(tmp_path, ["a", "b"], 32)
    assert "\n" not in str(missing.value) and "\n" not in str(unmatched.value)
