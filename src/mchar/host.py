"""What machine a number was measured on: stamped on every tracked run and every benchmark result."""

from __future__ import annotations

import os
import platform

KERNEL_PINS = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")


def host_info() -> dict[str, str]:
    """The hardware a run used: CPU kernels differ across machines, so a base trained with the same seed and config
    on another CPU model gives slightly different numbers (and every later stage with it). Logged to tell them apart."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    # the kernel level PyTorch dispatches to (AVX2 / AVX512) and the knobs that pin it: what actually makes the
    # same config round differently on two CPU kinds (an AMD EPYC and an Intel Xeon host trained different bases)
    pins = {k: os.environ[k] for k in KERNEL_PINS if os.environ.get(k)}
    return {
        "cpu": cpu,
        "cpu_count": str(os.cpu_count()),
        "cpu_kernels": torch.backends.cpu.get_cpu_capability(),
        "kernel_pins": ", ".join(f"{k}={v}" for k, v in pins.items()) or "none",
        "torch_threads": str(torch.get_num_threads()),
        "accelerator": ", ".join(gpus) if gpus else "none",
        "platform": platform.platform(),
    }
