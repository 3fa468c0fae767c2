import numpy as np

from core.data.synthetic import generate_synthetic, load_or_generate_synthetic


def test_same_seed_gives_identical_images():
    first = generate_synthetic(count=12, image_size=32, seed=3)
    second = generate_synthetic(count=12, image_size=32, seed=3)
    assert np.array_equal(first.images, second.images)
    assert np.array_equal(first.masks, second.masks)
    assert not np.array_equal(first.images, generate_synthetic(count=12, image_size=32, seed=4).images)


def test_shapes_labels_and_masks():
    data = generate_synthetic(count=40, image_size=48, seed=0, malignant_fraction=0.25)
    assert data.images.shape == (40, 48, 48, 3) and data.images.dtype == np.uint8
    assert data.masks.shape == (40, 48, 48)
    assert data.labels.sum() == 10
    assert all(mask.sum() > 0 for mask in data.masks), "every image has a lesion"


def test_malignant_lesions_are_larger_and_more_colourful_on_average():
    data = generate_synthetic(count=120, image_size=64, seed=0, malignant_fraction=0.5)
    area = data.masks.reshape(len(data.masks), -1).mean(1)
    assert area[data.labels == 1].mean() > 1.5 * area[data.labels == 0].mean()
    spread = [data.images[i][data.masks[i] == 1].std(0).mean() for i in range(len(data.labels))]
    spread = np.array(spread)
    assert spread[data.labels == 1].mean() > spread[data.labels == 0].mean()


def test_confounder_only_on_the_requested_share_of_malignant_images():
    data = generate_synthetic(count=60, image_size=32, seed=0, malignant_fraction=0.5, confounder_fraction=0.4)
    assert not data.confounded[data.labels == 0].any()
    assert data.confounded.sum() == round(30 * 0.4)
    plain = generate_synthetic(count=60, image_size=32, seed=0, malignant_fraction=0.5)
    changed = np.flatnonzero((data.images != plain.images).any(axis=(1, 2, 3)))
    assert set(changed) == set(np.flatnonzero(data.confounded)), "the artifact is the only difference"


def test_ruler_confounder_is_drawn():
    data = generate_synthetic(count=20, image_size=64, seed=0, confounder_fraction=1.0, confounder_kind="ruler")
    assert data.confounded.sum() == data.labels.sum()


def test_cache_round_trip(tmp_path):
    first = load_or_generate_synthetic(tmp_path, count=10, image_size=32, seed=5)
    assert len(list(tmp_path.glob("synthetic-*.npz"))) == 1
    second = load_or_generate_synthetic(tmp_path, count=10, image_size=32, seed=5)
    assert np.array_equal(first.images, second.images)
    assert np.array_equal(first.confounded, second.confounded)


def test_the_mask_follows_the_lesion_when_a_ruler_turns_the_image():
    # A ruler along the left edge is drawn by transposing the image; the lesion mask must be transposed too.
    # Each image's generator is seeded by its index, so the same set without the ruler has the same lesions
    # in their untransposed place: the ruled image matches either that image or its transpose.
    options = dict(count=30, image_size=64, seed=4, confounder_kind="ruler")
    ruled, plain = generate_synthetic(confounder_fraction=1.0, **options), generate_synthetic(**options)
    turned = 0
    for image, mask, plain_image, plain_mask, confounded in zip(ruled.images, ruled.masks, plain.images, plain.masks,
                                                                ruled.confounded):
        if not confounded:
            continue
        grey, plain_grey = image.mean(2).ravel(), plain_image.mean(2)
        transposed = np.corrcoef(grey, plain_grey.T.ravel())[0, 1] > np.corrcoef(grey, plain_grey.ravel())[0, 1]
        assert np.array_equal(mask, plain_mask.T if transposed else plain_mask)
        turned += transposed
    assert turned >= 2
