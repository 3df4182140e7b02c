"""What machine a number was measured on: stamped on every tracked run and every benchmark result."""

from __future__ import annotations

import os
import platform


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
    return {
        "cpu": cpu,
        "cpu_count": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "accelerator": ", ".join(gpus) if gpus else "none",
        "platform": platform.platform(),
    }
