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


# The longest work first, so that the two pytest-xdist workers (pyproject.toml) finish together: the browser
# tests (one group, on one worker) and the modules that train models of their own (docs/TESTING.md has the times).
LONGEST_FIRST = ("@browser", "test_audit.py", "test_interrupts.py", "test_cams.py", "test_shared_studies.py",
                 "test_distributed.py", "test_tuning.py", "test_quiz.py", "test_external.py", "test_cli.py",
                 "test_explain_consistency.py", "test_predict.py", "test_compare.py", "test_resume.py")


def longest_first_rank(item) -> int:
    group = "@browser" if item.get_closest_marker("browser") else Path(str(item.fspath)).name
    return LONGEST_FIRST.index(group) if group in LONGEST_FIRST else len(LONGEST_FIRST)


def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist's loadgroup, but a test without a group goes with its module rather than alone: a module's
    trained runs (its module-scoped fixtures) are then made once, on one worker."""
    from xdist.scheduler import LoadGroupScheduling

    class ModuleOrGroupScheduling(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            if nodeid.rfind("@") > nodeid.rfind("]"):
                return nodeid.split("@")[-1]
            return nodeid.split("::")[0]

    return ModuleOrGroupScheduling(config, log)


def pytest_configure(config):
    """Under pytest-xdist each worker gets its share of the cores: two workers each running a full OpenMP team
    on two cores spin against each other. Servers and CLI processes a test starts inherit the share."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        threads = str(max(1, len(os.sched_getaffinity(0)) // workers))
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = threads
        torch.set_num_threads(int(threads))


def pytest_collection_modifyitems(config, items):
    """The longest work first (stable otherwise); tests marked cuda are skipped where no CUDA device is
    available, so CI without a GPU passes."""
    import torch

    items.sort(key=longest_first_rank)
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
def seeded_random_state():
    """Every test starts from the same global random state, whatever ran before it in its process: the workers
    run tests in another order than one process does, and a test must not pass or fail by that order."""
    import random

    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


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


@pytest.fixture(scope="session")
def five_trained_runs(tmp_path_factory) -> Path:
    """Five tiny runs of the five models on one synthetic split, made by the engine once per test session (per
    xdist worker); tests get copies (`five_runs`)."""
    import dataclasses

    from core.config import DataSpec, TrainConfig
    from core.data.datasets import prepare_data
    from core.runs import RunStore
    from core.training.loop import run_training

    root = tmp_path_factory.mktemp("five-runs") / "runs"
    store = RunStore(root)
    config = TrainConfig(epochs=2, batch_size=16, image_size=32, pretrained=False, precision="fp32")
    data = prepare_data(DataSpec(synthetic_count=120, synthetic_image_size=64), config, store.cache_dir)
    for model in ("resnet18", "resnet50", "densenet121", "efficientnet_b0", "hybrid_sresnet"):
        run_training(dataclasses.replace(config, model=model), data, store)
    return root


@pytest.fixture
def five_runs(five_trained_runs, runs_dir):
    """This test's own copy of the five runs, in `runs_dir`, before the server starts: a test may write into its
    store (quiz answers, audits, deletions) without another test seeing it."""
    import shutil

    shutil.copytree(five_trained_runs, runs_dir, dirs_exist_ok=True)
    return RunStore(runs_dir)
