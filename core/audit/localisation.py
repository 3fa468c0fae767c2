"""How well a class activation map localises the lesion, measured against a lesion mask.

Every measure compares one H x W map with one H x W 0/1 mask of the same size (the mask decoded with
`load_masks`, squashed to the map's size exactly as `core.data.images.decode_image` squashes the image).
The measures and where they come from:

- energy inside (the dashboard's `core.cams.energy_inside`) and Relevance Mass Accuracy (Arras, Osman,
  Samek 2022, "CLEVR-XAI", Information Fusion 81): the share of the map's mass inside the mask;
- the pointing game (Zhang et al. 2018, "Top-down neural attention by excitation backprop", IJCV);
- Relevance Rank Accuracy (Arras et al. 2022): the share of the K highest pixels inside the mask, K the
  mask's pixel count;
- the IoU of the map's top share of pixels with the mask;
- the lesion's share of the image, which is what a map blind to the lesion scores on energy inside.

`structural_similarity` is SSIM (Wang et al. 2004) between two maps, used by the randomisation sanity
check. The measures are checked against the quantus package and SSIM against scikit-image in
tests/test_audit_localisation.py.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from core.cams import energy_inside, pointing_game_hit
from core.data.images import ImageError, decode_mask

MEASURES = ("energy_inside", "pointing_game", "relevance_mass", "relevance_rank", "top_iou", "lesion_area")


def _checked(cam: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    cam = np.asarray(cam, dtype=np.float64)
    inside = np.asarray(mask) > 0
    if cam.ndim != 2 or cam.shape != inside.shape:
        raise ValueError(f"map {cam.shape} and mask {inside.shape} must be two-dimensional and the same size")
    if not np.isfinite(cam).all():
        raise ValueError("the map holds NaN or infinite values")
    return cam, inside


def _top_inside(values: np.ndarray, inside: np.ndarray, count: int) -> float:
    """How many of the `count` highest values lie inside; pixels tied at the cut share the places left
    equally (the mean over every order of the tied pixels), so the result can be fractional."""
    values, inside = values.ravel(), inside.ravel()
    cut = np.partition(values, values.size - count)[values.size - count]
    above, tied = values > cut, values == cut
    places_left = count - int(above.sum())
    return float((above & inside).sum()) + places_left * float((tied & inside).sum()) / float(tied.sum())


def top_k_intersection(cam: np.ndarray, mask: np.ndarray, k: int) -> float:
    """Share of the map's `k` highest pixels that lie inside the mask (quantus' TopKIntersection,
    Theiner et al. 2021). Ties at the cut: see `localisation_measures`. NaN for an empty mask or a
    constant map."""
    cam, inside = _checked(cam, mask)
    if not 0 < k <= cam.size:
        raise ValueError(f"k must be between 1 and the map's {cam.size} pixels, not {k}")
    if not inside.any() or cam.max() == cam.min():
        return math.nan
    return _top_inside(cam, inside, k) / k


def localisation_measures(cam: np.ndarray, mask: np.ndarray, top_share: float = 0.2) -> dict[str, float]:
    """How well one map localises the lesion: a dict of floats, keys `MEASURES`.

    cam: H x W map (a CAM is >= 0, any magnitude; signed maps are accepted); mask: H x W, lesion > 0.

    - energy_inside: share of the map's sum inside the mask (`core.cams.energy_inside`).
    - pointing_game: 1.0 when the map's maximum falls inside the mask, else 0.0 (`core.cams.pointing_game_hit`:
      a tied maximum counts as a hit if any of its pixels is inside, as in quantus' PointingGame).
    - relevance_mass: Relevance Mass Accuracy (Arras et al. 2022), positive relevance inside the mask
      over all positive relevance, i.e. computed on max(map, 0). For a non-negative map such as a CAM it
      is exactly energy_inside: the key is kept for the name readers know from the literature, and it
      differs only on signed maps, where energy_inside lets negative relevance cancel positive.
    - relevance_rank: Relevance Rank Accuracy (Arras et al. 2022): with K the mask's pixel count, the
      share of the map's K highest pixels that lie inside the mask.
    - top_iou: intersection over union of the map's top `top_share` of pixels (the ceil(top_share * H * W)
      highest) with the mask.
    - lesion_area: the mask's share of the image, the energy_inside of a map that ignores the lesion
      (a uniform map) and the expected relevance_rank of a random one.

    Ties in relevance_rank and top_iou: pixels tied at the cut share the places left equally, which is
    the mean over every order of the tied pixels (quantus sorts with an unstable argsort, so it picks an
    arbitrary order). Without ties both are the usual counts.

    NaN where there is nothing to measure: every measure but lesion_area for an empty mask; pointing_game,
    relevance_rank and top_iou for a constant map (all-zero included), which points nowhere;
    energy_inside for a map summing to 0 and relevance_mass for one with no positive value.
    """
    if not 0 < top_share <= 1:
        raise ValueError(f"top_share must be in (0, 1], not {top_share}")
    cam, inside = _checked(cam, mask)
    lesion_pixels = int(inside.sum())
    measures = dict.fromkeys(MEASURES, math.nan)
    measures["lesion_area"] = lesion_pixels / inside.size
    if lesion_pixels == 0:
        return measures
    measures["energy_inside"] = energy_inside(cam, inside)
    positive = np.maximum(cam, 0.0)
    positive_total = float(positive.sum())
    if positive_total > 0:
        measures["relevance_mass"] = float(positive[inside].sum()) / positive_total
    if cam.max() == cam.min():
        return measures
    measures["pointing_game"] = float(pointing_game_hit(cam, inside))
    measures["relevance_rank"] = _top_inside(cam, inside, lesion_pixels) / lesion_pixels
    top_count = max(1, math.ceil(top_share * cam.size - 1e-9))
    intersection = _top_inside(cam, inside, top_count)
    measures["top_iou"] = intersection / (lesion_pixels + top_count - intersection)
    return measures


def structural_similarity(first: np.ndarray, second: np.ndarray) -> float:
    """Mean SSIM (Wang et al. 2004) of two maps each already scaled to [0, 1].

    Data range 1, C1 = 0.01^2, C2 = 0.03^2, local statistics under a Gaussian window of sigma 1.5
    truncated at 3.5 sigma (radius 5) with reflected borders, population (not sample) covariance, and
    the mean taken over the image less a 5-pixel border: the same number as
    `skimage.metrics.structural_similarity(first, second, data_range=1, gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False)`, computed in float64. Both maps must be at least 11 x 11.
    """
    first = np.asarray(first, dtype=np.float64)
    second = np.asarray(second, dtype=np.float64)
    if first.ndim != 2 or first.shape != second.shape:
        raise ValueError(f"maps {first.shape} and {second.shape} must be two-dimensional and the same size")
    sigma, truncate = 1.5, 3.5
    radius = int(truncate * sigma + 0.5)
    if min(first.shape) < 2 * radius + 1:
        raise ValueError(f"maps must be at least {2 * radius + 1} x {2 * radius + 1} for SSIM, not {first.shape}")

    def local_mean(values: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(values, sigma, mode="reflect", truncate=truncate)

    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mean_x, mean_y = local_mean(first), local_mean(second)
    var_x = local_mean(first * first) - mean_x * mean_x
    var_y = local_mean(second * second) - mean_y * mean_y
    cov = local_mean(first * second) - mean_x * mean_y
    ssim = ((2 * mean_x * mean_y + c1) * (2 * cov + c2)) / ((mean_x ** 2 + mean_y ** 2 + c1) * (var_x + var_y + c2))
    return float(ssim[radius:-radius, radius:-radius].mean())


# Mask file names, best first; any other `<image_id>_<suffix>.png` comes after these.
PREFERRED_SUFFIXES = ("segmentation", "mask")
# ISIC 2017 shipped `<image_id>_superpixels.png` beside its images: never a lesion mask.
NOT_MASKS = ("superpixels",)


def find_mask_files(masks_dir: str | Path, image_ids: Iterable[str]) -> dict[str, Path]:
    """The mask file of each image that has one: `{image_id: path}` for the PNG files of `masks_dir`
    (not its sub-folders; extension in any case) named `<image_id>_segmentation.png` (ISIC 2018 task 1),
    `<image_id>_mask.png` or `<image_id>_<suffix>.png`. When an image has several, `_segmentation` wins,
    then `_mask`, then the other suffixes by name. A name that fits several image ids (ids that extend
    one another at an underscore) goes to the longest. Files matching no id are ignored."""
    ids = set(image_ids)
    candidates: dict[str, list[tuple[int, str, Path]]] = {}
    for path in sorted(Path(masks_dir).iterdir()):
        if path.suffix.lower() != ".png" or not path.is_file():
            continue
        stem = path.stem
        for cut in range(len(stem) - 1, 0, -1):  # the longest image id first
            if stem[cut] == "_" and stem[:cut] in ids:
                suffix = stem[cut + 1:].lower()
                if suffix and suffix not in NOT_MASKS:
                    rank = PREFERRED_SUFFIXES.index(suffix) if suffix in PREFERRED_SUFFIXES else len(PREFERRED_SUFFIXES)
                    candidates.setdefault(stem[:cut], []).append((rank, path.name, path))
                break
    return {image_id: min(found)[2] for image_id, found in candidates.items()}


class Masks(dict):
    """`{image_id: size x size uint8 0/1 mask}`, plus `skipped`: the `(file name, reason)` of each mask
    file that matched an image but could not be read (those images have no entry)."""

    def __init__(self, masks: dict[str, np.ndarray], skipped: list[tuple[str, str]]):
        super().__init__(masks)
        self.skipped = skipped


def load_masks(masks_dir: str | Path, image_ids: Iterable[str], size: int) -> Masks:
    """The lesion masks of the images that have one (file names: `find_mask_files`), each a size x size
    uint8 array of 0/1. A mask of any size or aspect is squashed to size x size with a plain resize, no
    crop, as `core.data.images.decode_image` squashes the image, so mask and image pixels correspond.

    Returns a `Masks` dict; unreadable mask files are left out and listed in its `skipped` attribute.
    Raises ValueError (one line) when the folder does not exist, or when none of its masks matches any
    of the image ids.
    """
    folder = Path(masks_dir)
    if not folder.is_dir():
        raise ValueError(f"mask folder {folder} does not exist or is not a folder")
    ids = list(dict.fromkeys(image_ids))
    files = find_mask_files(folder, ids)
    if not files:
        raise ValueError(f"no mask in {folder} matches any of the {len(ids)} images (expected "
                         "<image_id>_segmentation.png, <image_id>_mask.png or <image_id>_<suffix>.png)")
    masks: dict[str, np.ndarray] = {}
    skipped: list[tuple[str, str]] = []
    for image_id in ids:
        if image_id not in files:
            continue
        try:
            masks[image_id] = decode_mask(files[image_id], size)
        except (ImageError, Image.DecompressionBombError) as error:
            skipped.append((files[image_id].name, str(error)))
    return Masks(masks, skipped)
