from functools import cache

import numpy as np
import pytest

from core.audit.artefacts import ARTEFACT_KINDS, ARTEFACT_NAMES, border_band, paste_artefact
from core.data.synthetic import INK_COLOURS, generate_synthetic

SIZES = (32, 96)
IMAGES = 6


@cache
def _synthetic(size: int):
    return generate_synthetic(count=12, image_size=size, seed=0)


def _benign(size: int):
    data = _synthetic(size)
    chosen = np.flatnonzero(data.labels == 0)[:IMAGES]
    return data.images[chosen], data.masks[chosen]


def test_every_kind_has_a_name():
    assert set(ARTEFACT_NAMES) == set(ARTEFACT_KINDS)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("kind", ARTEFACT_KINDS)
def test_artefact_lies_outside_the_lesion_and_changes_only_its_footprint(kind, size):
    images, masks = _benign(size)
    for index, (image, mask) in enumerate(zip(images, masks)):
        before = image.copy()
        pasted, footprint = paste_artefact(image, kind, np.random.default_rng(index), mask)
        assert np.array_equal(image, before), "the input image is not modified"
        assert pasted.shape == image.shape and pasted.dtype == np.uint8
        assert footprint.shape == mask.shape and footprint.dtype == bool
        assert footprint.any(), f"{kind} left no footprint on image {index}"
        assert not (footprint & (mask > 0)).any(), "the artefact never covers the lesion"
        # Exact: opacity at or below the footprint threshold is dropped, so the footprint is all that changed.
        assert np.array_equal(pasted[~footprint], image[~footprint])
        change = np.abs(pasted.astype(np.int16) - image.astype(np.int16)).mean(axis=-1)[footprint].mean()
        assert change > 8, f"{kind} barely shows ({change:.1f} grey levels on average)"


@pytest.mark.parametrize("kind", ARTEFACT_KINDS)
def test_same_generator_seed_gives_the_same_artefact(kind):
    image, mask = (array[0] for array in _benign(96))
    first = paste_artefact(image, kind, np.random.default_rng(5), mask)
    second = paste_artefact(image, kind, np.random.default_rng(5), mask)
    other = paste_artefact(image, kind, np.random.default_rng(6), mask)
    assert np.array_equal(first[0], second[0]) and np.array_equal(first[1], second[1])
    assert not np.array_equal(first[0], other[0])


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("kind", ARTEFACT_KINDS)
def test_without_a_mask_the_artefact_stays_in_the_border_band(kind, size):
    band = border_band(size)
    assert band[0].all() and not band[size // 2, size // 2]
    images, _ = _benign(size)
    for index, image in enumerate(images):
        pasted, footprint = paste_artefact(image, kind, np.random.default_rng(index))
        assert footprint.any()
        assert not (footprint & ~band).any()
        assert np.array_equal(pasted[~footprint], image[~footprint])


def test_unknown_kind_and_bad_inputs_are_refused():
    image, mask = (array[0] for array in _benign(32))
    with pytest.raises(ValueError, match="ink, ruler, dark_corners, gel_bubble, hair"):
        paste_artefact(image, "sticker", np.random.default_rng(0), mask)
    with pytest.raises(ValueError):
        paste_artefact(image.astype(np.float32), "ink", np.random.default_rng(0), mask)
    with pytest.raises(ValueError):
        paste_artefact(image, "ink", np.random.default_rng(0), mask[:16])


def test_pasted_ink_has_the_synthetic_confounders_colours():
    images, masks = _benign(96)
    for index, (image, mask) in enumerate(zip(images, masks)):
        pasted, footprint = paste_artefact(image, "ink", np.random.default_rng(index), mask)
        # The stroke's soft edge is a blend with the skin, so judge its core: the most changed quarter,
        # where the synthetic mark's opacity (0.85) leaves the ink colour plus 15% of the skin.
        change = np.abs(pasted.astype(np.int16) - image.astype(np.int16)).sum(axis=-1)
        core = footprint & (change >= np.quantile(change[footprint], 0.75))
        colour = pasted[core].mean(axis=0)
        nearest = np.linalg.norm(INK_COLOURS - colour, axis=1).min()
        assert nearest < 65, f"ink core colour {colour.round()} is far from every INK_COLOURS entry"
        assert nearest < 0.6 * np.linalg.norm(image[core].mean(axis=0) - colour), "it looks like ink, not skin"
