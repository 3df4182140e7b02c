"""Shared bits of the benchmarks: the JSON envelope every benchmark prints, environment stamp, median timing."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch

from mchar.host import host_info


def at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type`` for integer options: a size of 0 or a negative count stops in argparse's one line
    instead of a traceback from deep inside the benchmark."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def device_option(parser: argparse.ArgumentParser, name: str) -> torch.device:
    """``--device`` checked before anything is built: an unknown name or CUDA on a machine without it stops in
    argparse's one line, not in a traceback from the first ``.to``."""
    try:
        device = torch.device(name)
    except RuntimeError:
        parser.error(f"--device: unknown device {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {name}: this machine has no CUDA GPU")
    return device


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so a wall-clock stamp covers it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def environment() -> dict:
    """What the numbers were measured on (printed inside every benchmark's JSON): the host as MLflow runs tag it."""
    host = host_info()
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "device": host["accelerator"] if torch.cuda.is_available() else host["cpu"],
        **{k: v for k, v in host.items() if k != "torch_threads"},
    }


def emit(name: str, config: argparse.Namespace | dict, result: dict) -> dict:
    """Print (one line) and return a benchmark's result in the common envelope.

    Every benchmark's object starts with ``bench`` (its CLI name), ``config`` (the options it ran with) and ends with
    ``env``, so results from different benchmarks, machines and commits can be collected and compared by key.
    """
    cfg = dict(vars(config)) if isinstance(config, argparse.Namespace) else dict(config)
    out = {"bench": name, "config": cfg, **result, "env": environment()}
    print(json.dumps(out))
    return out


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
