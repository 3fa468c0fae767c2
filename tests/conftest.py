"""Tiny, fast fixtures: 32 px images, a few dozen of them, one epoch, no network."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from core.config import DataSpec, TrainConfig
from core.runs import RunStore

TINY_SYNTHETIC = DataSpec(source="synthetic", synthetic_count=40, synthetic_image_size=32, synthetic_seed=1)
TINY_CONFIG = TrainConfig(model="resnet18", epochs=1, batch_size=8, image_size=32, pretrained=False,
                          precision="fp32", split="70:30", val_fraction=0.25)


@pytest.fixture(autouse=True)
def isolated_torch_home(tmp_path, monkeypatch):
    """No test reads or writes the user's torch hub cache."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    import torch.hub

    monkeypatch.setattr(torch.hub, "_hub_dir", None)


@pytest.fixture
def store(tmp_path) -> RunStore:
    return RunStore(tmp_path / "checkpoints")


def write_crafted_pickle(path, marker) -> None:
    """A .pt-looking file whose unpickling would create `marker`: proof that code ran if it exists."""
    import pickle

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path.write_bytes(pickle.dumps({"weight": Exploit()}, protocol=2))


def write_image(path, colour=(120, 80, 60), size=(40, 30), mode="RGB", fmt=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.zeros((size[1], size[0], 3), dtype=np.uint8) + np.array(colour, dtype=np.uint8)
    array[: size[1] // 2] //= 2  # not flat, so orientation and resizing are observable
    Image.fromarray(array).convert(mode).save(path, format=fmt)


@pytest.fixture
def image_folder(tmp_path):
    """Cancer/ and NotCancer/ folders with 10 small JPEGs each."""
    root = tmp_path / "folder-data"
    for index in range(10):
        write_image(root / "Cancer" / f"c{index}.jpg", colour=(60, 30, 20 + index))
        write_image(root / "NotCancer" / f"n{index}.jpg", colour=(200, 150, 120 + index))
    return root
