"""bench/flops.py: FLOP counts against torchvision's published operation counts, and the CPU peak from lscpu."""

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision import models as tv

from bench import flops
from bench.flops import forward_flops, grouped_conv_backward_flops, parse_lscpu, training_step_flops
from core.models import build_model

# Excerpts of `lscpu` on the three kinds of machine this project is measured on.
XEON_AMX = """Vendor ID:                               GenuineIntel
Model name:                              Intel(R) Xeon(R) Platinum 8488C
Thread(s) per core:                      2
Core(s) per socket:                      1
Socket(s):                               1
CPU max MHz:                             3800.0000
CPU MHz:                                 2400.000
Flags:                                   fpu sse sse2 avx avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile
"""
EPYC_ZEN4 = """Vendor ID:                               AuthenticAMD
Model name:                              AMD EPYC 9R14
Core(s) per socket:                      2
Socket(s):                               1
CPU MHz:                                 2600.000
Flags:                                   fpu sse sse2 avx avx2 fma avx512f avx512_bf16
"""
EPYC_ZEN3 = """Vendor ID:                               AuthenticAMD
Model name:                              AMD EPYC
Core(s) per socket:                      2
Socket(s):                               1
BogoMIPS:                                4890.80
Flags:                                   fpu sse sse2 avx avx2 fma
"""


@pytest.mark.parametrize("name, weights", [
    ("resnet18", tv.ResNet18_Weights), ("resnet50", tv.ResNet50_Weights),
    ("densenet121", tv.DenseNet121_Weights), ("efficientnet_b0", tv.EfficientNet_B0_Weights)])
def test_forward_flops_agree_with_torchvision_published_counts(name, weights):
    # torchvision's meta "_ops" is GFLOPs counted as multiply-adds at 224 px (1000 classes; ours has 2).
    model, _ = build_model(name, pretrained=False)
    assert forward_flops(model, 224) / 2e9 == pytest.approx(weights.IMAGENET1K_V1.meta["_ops"], rel=0.01)


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0"])
def test_a_training_step_counts_forward_and_backward_for_every_image(name):
    model, _ = build_model(name, pretrained=False)
    forward = forward_flops(model, 64)
    step = training_step_flops(model, 64, batch=4)
    # Backward costs about twice the forward (gradients of inputs and of weights), less for the first layer.
    assert 2.5 * forward * 4 < step < 3.0 * forward * 4


@pytest.mark.parametrize("groups", [1, 64])
def test_a_convolution_backward_costs_twice_its_forward_whatever_its_groups(groups):
    conv = nn.Conv2d(64, 64, 3, padding=1, groups=groups)
    inputs = torch.randn(2, 64, 16, 16, requires_grad=True)
    counts = []
    for mapping in (None, {torch.ops.aten.convolution_backward: grouped_conv_backward_flops}):
        with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
            conv(inputs).sum().backward()
        counts.append({str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()})
    builtin, corrected = counts
    assert corrected["aten.convolution_backward"] == 2 * corrected["aten.convolution"]
    if groups == 1:  # where PyTorch's formula is right, ours agrees with it
        assert corrected == builtin
    else:  # PyTorch's counts a depthwise backward once per channel
        assert builtin["aten.convolution_backward"] > 30 * corrected["aten.convolution_backward"]


def test_peak_of_a_xeon_with_amx_counts_physical_cores_at_the_max_clock():
    peak = parse_lscpu(XEON_AMX)
    assert (peak.cores, peak.mhz, peak.fp32_per_cycle, peak.bf16_per_cycle) == (1, 3800.0, 64, 1024)
    assert peak.gflops("fp32") == pytest.approx(1 * 3.8 * 64)
    assert peak.gflops("bf16") == pytest.approx(1 * 3.8 * 1024)
    assert "amx_bf16" in peak.features


def test_peak_of_an_epyc_with_avx512_bf16_uses_its_256_bit_pipes():
    peak = parse_lscpu(EPYC_ZEN4)
    assert (peak.cores, peak.fp32_per_cycle, peak.bf16_per_cycle) == (2, 32, 64)
    assert peak.gflops("bf16") == pytest.approx(2 * 2.6 * 64)


def test_peak_of_an_avx2_epyc_without_a_clock_is_left_for_proc_cpuinfo():
    peak = parse_lscpu(EPYC_ZEN3)
    assert (peak.cores, peak.mhz, peak.fp32_per_cycle, peak.bf16_per_cycle) == (2, 0.0, 32, 32)
    assert peak.features == ("avx2", "fma")
    assert "bf16" in peak.describe()


def test_without_lscpu_the_peak_is_unknown_not_an_error(monkeypatch):
    def missing(*args, **kwargs):
        raise FileNotFoundError("lscpu")

    monkeypatch.setattr(flops.subprocess, "run", missing)
    assert flops.cpu_peak() is None
