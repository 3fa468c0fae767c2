"""Tiny, fast fixtures: 32 px images, a few dozen of them, one epoch, no network."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import browser_support
import numpy as np
import pytest
from PIL import Image

from core.config import DataSpec, TrainConfig
from core.runs import RunStore

ISIC_2017 = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "isic2017"


def reference_package(name: str, install: str):
    """Skipped on a developer machine without the package; in CI a missing reference fails."""
    try:
        return pytest.importorskip(name)
    except pytest.skip.Exception:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed ({install})")  # CI must not pass by skipping the reference check
        raise


def shared_isic_2017() -> Path:
    """The real ISIC 2017 images beside the project (read in place, never copied into it): skipped where
    they are absent, failed in CI, which runs in a clone beside ../shared."""
    if not (ISIC_2017 / "images").is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"CI runs beside ../shared; {ISIC_2017} is missing")
        pytest.skip("../shared/data/isic2017 is not here")
    return ISIC_2017


# SKIN_TEST_DEVICE=cpu runs the tests marked cuda on the CPU instead of skipping them: a check of their
# logic on a machine without a GPU (tests/test_cuda.py reads it too).
CUDA_TESTS_ON_CPU = os.environ.get("SKIN_TEST_DEVICE") == "cpu"


def pytest_collection_modifyitems(config, items):
    """Tests marked cuda are skipped where no CUDA device is available, so CI without a GPU passes."""
    import torch

    if CUDA_TESTS_ON_CPU or torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device (bench/gpu_check.sh runs these on a GPU)")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


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
    # A faint shading of its own (darker only, so masks stay masks): otherwise every test image is the same
    # picture in another colour, a near-duplicate of all the others that the split would keep in one group.
    rng = np.random.default_rng(zlib.crc32("/".join(Path(path).parts[-3:]).encode()))
    shade = Image.fromarray(rng.uniform(0.75, 1.0, (4, 4)).astype(np.float32))
    shade = np.clip(np.asarray(shade.resize(size, Image.Resampling.BICUBIC)), 0.75, 1.0)
    Image.fromarray((array * shade[..., None]).astype(np.uint8)).convert(mode).save(path, format=fmt)


@pytest.fixture
def image_folder(tmp_path):
    """Cancer/ and NotCancer/ folders with 10 small JPEGs each."""
    root = tmp_path / "folder-data"
    for index in range(10):
        write_image(root / "Cancer" / f"c{index}.jpg", colour=(60, 30, 20 + index))
        write_image(root / "NotCancer" / f"n{index}.jpg", colour=(200, 150, 120 + index))
    return root


# Real-browser fixtures (helpers in browser_support.py).

@pytest.fixture
def runs_dir(tmp_path):
    return tmp_path / "runs"


@pytest.fixture
def dashboard(runs_dir):
    server, url = browser_support.start_dashboard(runs_dir)
    yield url
    server.terminate()
    server.wait(timeout=20)


@pytest.fixture
def page():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=browser_support.CHROMIUM,
                                             args=browser_support.CHROMIUM_ARGS)
        tab = browser.new_page(viewport={"width": 1400, "height": 1800})
        yield tab
        browser.close()


@pytest.fixture
def five_runs(runs_dir):
    """Five tiny runs of the five models on one synthetic split, made by the engine before the server starts."""
    import dataclasses

    from core.config import DataSpec, TrainConfig
    from core.data.datasets import prepare_data
    from core.runs import RunStore
    from core.training.loop import run_training

    store = RunStore(runs_dir)
    config = TrainConfig(epochs=2, batch_size=16, image_size=32, pretrained=False, precision="fp32")
    data = prepare_data(DataSpec(synthetic_count=120, synthetic_image_size=64), config, store.cache_dir)
    for model in ("resnet18", "resnet50", "densenet121", "efficientnet_b0", "hybrid_sresnet"):
        run_training(dataclasses.replace(config, model=model), data, store)
    return store
