"""The paper's augmentations (horizontal flip, rotation, colour jitter) on whole batches of tensors.

Each image of a batch gets its own random parameters, drawn from a seeded generator, and the work is
a few vectorised tensor operations on the training device instead of PIL calls per image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# RGB <-> YIQ: hue is a rotation of the (I, Q) plane.
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)
_LUMA = torch.tensor([0.299, 0.587, 0.114])


@dataclass(frozen=True)
class AugmentSettings:
    flip_probability: float = 0.5
    max_rotation_degrees: float = 20.0
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.03  # fraction of a full turn


def to_unit_float(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 N x 3 x H x W -> float32 in [0, 1], keeping the memory format."""
    return images_uint8.float().div_(255)


def normalise(images: torch.Tensor) -> torch.Tensor:
    """ImageNet mean/std normalisation of [0, 1] images."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


def augment_batch(images: torch.Tensor, generator: torch.Generator,
                  settings: AugmentSettings = AugmentSettings()) -> torch.Tensor:
    """Random flip, rotation and colour jitter of [0, 1] images, one draw per image."""
    count = images.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return (torch.rand(count, generator=generator) * (high - low) + low).to(images.device)

    flip = (torch.rand(count, generator=generator) < settings.flip_probability).to(images.device)
    images = torch.where(flip.view(-1, 1, 1, 1), images.flip(3), images)
    if settings.max_rotation_degrees > 0:
        images = rotate(images, uniform(-settings.max_rotation_degrees, settings.max_rotation_degrees))
    images = jitter_colour(
        images,
        brightness=uniform(1 - settings.brightness, 1 + settings.brightness),
        contrast=uniform(1 - settings.contrast, 1 + settings.contrast),
        saturation=uniform(1 - settings.saturation, 1 + settings.saturation),
        hue=uniform(-settings.hue, settings.hue),
    )
    return images.clamp_(0, 1)


def rotate(images: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate each image about its centre; the corners are filled by reflection."""
    radians = degrees * (math.pi / 180)
    cos, sin = torch.cos(radians), torch.sin(radians)
    zeros = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zeros], 1), torch.stack([sin, cos, zeros], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def jitter_colour(images: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor,
                  saturation: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """torchvision's ColorJitter factors, applied per image in one pass each."""
    def per_image(values: torch.Tensor) -> torch.Tensor:
        return values.view(-1, 1, 1, 1)

    luma = _LUMA.to(images.device).view(1, 3, 1, 1)
    images = images * per_image(brightness)
    mean_grey = (images * luma).sum(1, keepdim=True).mean((2, 3), keepdim=True)
    images = (images - mean_grey) * per_image(contrast) + mean_grey
    grey = (images * luma).sum(1, keepdim=True)
    images = (images - grey) * per_image(saturation) + grey
    return _rotate_hue(images, hue * 2 * math.pi)


def _rotate_hue(images: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    cos, sin = torch.cos(angles), torch.sin(angles)
    ones, zeros = torch.ones_like(cos), torch.zeros_like(cos)
    rotation = torch.stack([
        torch.stack([ones, zeros, zeros], 1),
        torch.stack([zeros, cos, -sin], 1),
        torch.stack([zeros, sin, cos], 1),
    ], 1)  # N x 3 x 3 in YIQ space
    to_yiq, to_rgb = _RGB_TO_YIQ.to(images.device), _YIQ_TO_RGB.to(images.device)
    transform = to_rgb @ rotation @ to_yiq  # N x 3 x 3 in RGB space
    return torch.einsum("nij,njhw->nihw", transform, images)
