"""A split's images and labels as the training loop reads them, one batch at a time."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch

from core.data.augment import augment_batch, normalise, to_unit_float
from core.data.datasets import PreparedData
from core.data.images import DiskImages
from core.training.precision import ExecutionPlan

# A split is copied into memory (or onto the GPU) when all three together take at most this much, and at most a
# quarter of the memory free: gathering rows from one tensor is the fastest path. Larger datasets stay in the
# image cache on disk and are read a batch at a time, so memory does not grow with the dataset.
IN_MEMORY_MAX_BYTES = 2 << 30


def choose_residency(data: PreparedData, device: torch.device) -> str:
    """'memory' (one tensor in RAM, or on the GPU) or 'disk' (batches read from the image cache)."""
    if not isinstance(data.images, DiskImages):
        return "memory"  # already in memory (the synthetic set, or a cache that could not be written)
    free = _free_memory(device)
    return "memory" if data.images.nbytes <= min(IN_MEMORY_MAX_BYTES, free // 4) else "disk"


def _free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return IN_MEMORY_MAX_BYTES * 4


@dataclass
class TensorData:
    """A split's images and labels. In memory the images are one uint8 tensor (N x 3 x H x W, channels-last in
    memory, on the training device); on disk they stay `DiskImages` and each batch is read when asked for,
    into pinned memory when it goes to a GPU."""

    images: torch.Tensor | DiskImages
    labels: torch.Tensor
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def from_prepared(cls, data: PreparedData, split: str, device: torch.device,
                      residency: str | None = None) -> TensorData:
        """`residency` is 'memory' or 'disk'; by default `choose_residency` picks it."""
        rows = data.indices(split)
        labels = torch.from_numpy(data.table["label"].to_numpy()[rows].astype(np.int64))
        residency = residency or choose_residency(data, device)
        if residency == "disk" and isinstance(data.images, DiskImages):
            return cls(data.images.subset(rows), labels.to(device), device)
        # NHWC uint8 viewed as NCHW is exactly the channels_last layout: no copy of pixels later.
        images = torch.from_numpy(np.ascontiguousarray(data.images[rows])).permute(0, 3, 1, 2)
        return cls(images.to(device), labels.to(device), device)

    @property
    def residency(self) -> str:
        return "disk" if isinstance(self.images, DiskImages) else "memory"

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, rows: torch.Tensor | slice) -> torch.Tensor:
        """The uint8 images of `rows` (an index tensor or a slice), N x 3 x H x W."""
        if not isinstance(self.images, DiskImages):
            return self.images[rows]
        if isinstance(rows, torch.Tensor):
            rows = rows.cpu().numpy()
        images = torch.from_numpy(self.images[rows]).permute(0, 3, 1, 2)
        # Pinned memory lets prepare_batch's copy to the GPU run asynchronously.
        return images.pin_memory() if self.device.type == "cuda" else images


def training_order(labels: torch.Tensor, weighted: bool, generator: torch.Generator) -> torch.Tensor:
    """One epoch's sample order: class-balanced draws with replacement (WeightedRandomSampler), or a
    plain permutation."""
    if not weighted:
        return torch.randperm(len(labels), generator=generator)
    counts = torch.bincount(labels.cpu(), minlength=2).clamp(min=1).double()
    weights = (1.0 / counts)[labels.cpu()]
    sampler = torch.utils.data.WeightedRandomSampler(weights, len(labels), replacement=True, generator=generator)
    return torch.tensor(list(sampler), dtype=torch.int64)


def prepare_batch(images_uint8: torch.Tensor, plan: ExecutionPlan, augment: bool,
                  generator: torch.Generator | None) -> torch.Tensor:
    images = to_unit_float(images_uint8.to(plan.device, non_blocking=True))
    if augment:
        images = augment_batch(images, generator)
    return normalise(images).contiguous(memory_format=plan.memory_format)
