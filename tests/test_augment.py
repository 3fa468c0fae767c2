import torch

from core.data.augment import AugmentSettings, augment_batch, normalise


def test_shapes_range_and_reproducibility():
    images = torch.rand(6, 3, 32, 32)
    first = augment_batch(images, torch.Generator().manual_seed(0))
    second = augment_batch(images, torch.Generator().manual_seed(0))
    assert first.shape == images.shape and first.min() >= 0 and first.max() <= 1
    assert torch.equal(first, second)
    assert not torch.equal(first, augment_batch(images, torch.Generator().manual_seed(1)))


def test_flip_only_mirrors_images():
    images = torch.rand(8, 3, 16, 16)
    settings = AugmentSettings(flip_probability=1.0, max_rotation_degrees=0, brightness=0, contrast=0,
                               saturation=0, hue=0)
    flipped = augment_batch(images, torch.Generator().manual_seed(0), settings)
    assert torch.allclose(flipped, images.flip(3), atol=1e-5)


def test_no_op_settings_leave_images_unchanged():
    images = torch.rand(4, 3, 16, 16)
    settings = AugmentSettings(flip_probability=0.0, max_rotation_degrees=0, brightness=0, contrast=0,
                               saturation=0, hue=0)
    assert torch.allclose(augment_batch(images, torch.Generator().manual_seed(0), settings), images, atol=1e-5)


def test_normalise_uses_imagenet_statistics():
    grey = torch.full((1, 3, 2, 2), 0.485)
    assert abs(float(normalise(grey)[0, 0, 0, 0])) < 1e-6
