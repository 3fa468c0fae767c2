"""Where training runs: device selection and the environment block of run.json."""

from __future__ import annotations

import platform
import sys

import torch
import torchvision


def select_device(requested: str = "auto") -> torch.device:
    """CUDA, else Apple MPS, else CPU; an explicit request that cannot be met is an error."""
    mps_available = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if mps_available else torch.device("cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was requested but no CUDA GPU is available")
    if requested == "mps" and not mps_available:
        raise ValueError("device mps was requested but Apple MPS is not available")
    return torch.device(requested)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    return _cpu_model() or platform.processor() or "CPU"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def describe_environment(device: torch.device, plan=None) -> dict:
    """The environment block of run.json: versions, device, threads, precision."""
    environment = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "platform": platform.platform(),
        "device": device.type,
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    if plan is not None:
        environment.update(plan.describe())
    return environment
