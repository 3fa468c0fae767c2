import dataclasses

import pytest
import torch

from core.models import build_model
from core.training.precision import choose_execution_plan
from tests.conftest import TINY_CONFIG


def test_forced_fp32():
    model, _ = build_model("resnet18", pretrained=False)
    plan = choose_execution_plan(model, TINY_CONFIG, torch.device("cpu"))
    assert plan.precision == "fp32" and plan.chosen_by == "requested"


def test_auto_times_the_options_and_caches_the_choice(tmp_path):
    model, _ = build_model("resnet18", pretrained=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = dataclasses.replace(TINY_CONFIG, precision="auto")
    plan = choose_execution_plan(model, config, torch.device("cpu"), tmp_path)
    assert plan.chosen_by in ("timed", "default")
    if plan.chosen_by == "timed":
        assert plan.name in plan.step_seconds and all(seconds > 0 for seconds in plan.step_seconds.values())
        again = choose_execution_plan(model, config, torch.device("cpu"), tmp_path)
        assert again.chosen_by == "cache" and again.name == plan.name
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "timing used a copy"


def test_a_timed_plan_and_a_cached_one_train_the_same_numbers(store):
    # Timing draws random images and dropout masks (Hybrid S-ResNet's head); the run's own draws must not
    # depend on whether its plan was timed or read from the cache.
    from core.data.datasets import prepare_data
    from core.training.loop import run_training
    from tests.conftest import TINY_SYNTHETIC

    config = dataclasses.replace(TINY_CONFIG, model="hybrid_sresnet", precision="auto")
    data = prepare_data(TINY_SYNTHETIC, config, store.cache_dir)
    timed, cached = (run_training(config, data, store) for _ in range(2))
    assert timed["environment"]["precision_chosen_by"] in ("timed", "default")
    assert cached["environment"]["precision_chosen_by"] == "cache"
    assert cached["history"][0]["train_loss"] == pytest.approx(timed["history"][0]["train_loss"], rel=1e-6)
