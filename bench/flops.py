"""How close a training step comes to what the processor can do: the step's FLOPs, counted by PyTorch's
`FlopCounterMode`, and the CPU's peak, computed from what `lscpu` says about it.

The peak is cores x clock x FLOPs per cycle per core, where FLOPs per cycle come from the widest vector
unit the flags show, assuming two fused multiply-add pipes (2 FLOPs per lane each):
- fp32: AVX-512 on Intel, 2 x 16 lanes x 2 = 64; AVX-512 on AMD (Zen 4 runs 512-bit instructions on its
  256-bit pipes) or AVX2 with FMA, 2 x 8 lanes x 2 = 32; SSE only, 2 x 4 x 2 = 16.
- bf16: AMX tiles (Intel), 1024 per cycle per core; AVX-512 BF16 dot products (two bf16 products per
  fp32 lane), twice the fp32 figure; without either, bf16 runs no faster than fp32.
Cores are physical cores (sockets x cores per socket), and the clock is the highest `lscpu` reports
(CPU max MHz, else the current MHz: a virtual machine often reports only its base clock, so turbo can
beat the "peak"). It is an upper bound no real network reaches: convolutions also move memory.
"""

from __future__ import annotations

import copy
import dataclasses
import subprocess
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count


@dataclass(frozen=True)
class CpuPeak:
    model_name: str
    cores: int
    mhz: float
    fp32_per_cycle: int
    bf16_per_cycle: int
    features: tuple[str, ...] = ()  # the flags the FLOPs per cycle were read from

    def gflops(self, precision: str) -> float:
        per_cycle = self.bf16_per_cycle if precision == "bf16" else self.fp32_per_cycle
        return self.cores * self.mhz * 1e-3 * per_cycle

    def describe(self) -> str:
        return (f"{self.model_name}: {self.cores} cores x {self.mhz / 1000:.2f} GHz x {self.fp32_per_cycle} fp32 "
                f"FLOP/cycle = {self.gflops('fp32'):.0f} GFLOP/s fp32, x {self.bf16_per_cycle} bf16 FLOP/cycle = "
                f"{self.gflops('bf16'):.0f} GFLOP/s bf16 ({', '.join(self.features) or 'no AVX'})")


def parse_lscpu(text: str) -> CpuPeak:
    """The peak of the CPU `lscpu`'s output describes."""
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    flags = set(fields.get("Flags", "").split())
    cores = int(fields.get("Core(s) per socket", 1)) * int(fields.get("Socket(s)", 1))
    mhz = next((float(fields[key]) for key in ("CPU max MHz", "CPU MHz") if fields.get(key)), 0.0)
    amd = "AMD" in fields.get("Vendor ID", "") or "AMD" in fields.get("Model name", "")
    if "avx512f" in flags:
        fp32 = 32 if amd else 64
    elif "avx2" in flags and "fma" in flags:
        fp32 = 32
    else:
        fp32 = 16
    if "amx_bf16" in flags:
        bf16 = 1024
    elif "avx512_bf16" in flags:
        bf16 = 2 * fp32
    else:
        bf16 = fp32
    features = tuple(flag for flag in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if flag in flags)
    return CpuPeak(fields.get("Model name", "unknown CPU"), cores, mhz, fp32, bf16, features)


def cpu_peak() -> CpuPeak | None:
    """This machine's CPU peak (the clock from /proc/cpuinfo when lscpu gives none); None where neither says
    the clock (no lscpu, not Linux)."""
    try:
        peak = parse_lscpu(subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout)
    except (OSError, subprocess.CalledProcessError):
        return None
    if peak.mhz:
        return peak
    try:
        with open("/proc/cpuinfo") as info:
            mhz = next(float(line.split(":")[1]) for line in info if line.startswith("cpu MHz"))
    except (OSError, StopIteration, ValueError):
        return None
    return dataclasses.replace(peak, mhz=mhz)


def grouped_conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                                _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    """FLOPs of a convolution's backward: each gradient asked for (of the input, of the weight) costs what the
    forward costs. PyTorch's own formula (torch 2.14) ignores groups, and counts a depthwise convolution's
    backward once per channel: 65x too much for EfficientNet-B0's 3x3 depthwise layers."""
    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def training_step_flops(model: nn.Module, size: int, batch: int, classes: int = 2) -> float:
    """FLOPs of one training step's forward and backward passes for a batch of `batch` images of `size` px
    (the optimiser's elementwise update is not counted: FlopCounterMode counts matrix products and
    convolutions). Counted on an fp32 copy on the CPU: the count does not depend on precision or device."""
    model = copy.deepcopy(model).float().cpu().train()
    inputs = torch.randn(batch, 3, size, size)
    labels = torch.randint(0, classes, (batch,))
    corrected = {torch.ops.aten.convolution_backward: grouped_conv_backward_flops}
    with FlopCounterMode(display=False, custom_mapping=corrected) as counter:
        nn.functional.cross_entropy(model(inputs), labels).backward()
    return float(counter.get_total_flops())


def forward_flops(model: nn.Module, size: int) -> float:
    """FLOPs of one image's forward pass (eval mode)."""
    model = copy.deepcopy(model).float().cpu().eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, size, size))
    return float(counter.get_total_flops())
