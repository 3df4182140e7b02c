"""Shared bits of the benchmarks: environment stamp and median timing."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

import torch


def environment() -> dict:
    """What the numbers were measured on (printed inside every benchmark's JSON)."""
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": device,
        "python": platform.python_version(),
    }


def median_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in seconds (CUDA-synchronised when a GPU is in use)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
