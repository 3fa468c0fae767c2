import dataclasses

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
