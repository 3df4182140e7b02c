"""Timing the same training steps under a Lightning Trainer and a plain loop (shared by the train benches)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import lightning as L
import torch

from mchar.bench.common import sync


class StepClock(L.Callback):
    """Timestamps after every optimizer step, so Trainer setup/teardown is not counted."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        sync(pl_module.device)
        self.stamps.append(time.perf_counter())


def steps_per_second(stamps: Sequence[float], warmup: int) -> float:
    """Steady-state rate: steps after ``warmup`` divided by the time they took."""
    window = stamps[warmup:]
    return (len(window) - 1) / (window[-1] - window[0])


def lightning_stamps(
    module: L.LightningModule, batches: Sequence[object], device: torch.device | None = None
) -> list[float]:
    """Fit ``module`` on ``batches`` (one step each) with a bare one-device Trainer (the CPU unless ``device`` is a
    GPU); return per-step timestamps."""
    clock = StepClock()
    device = device or torch.device("cpu")
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=[device.index or 0] if device.type == "cuda" else 1,
        max_steps=len(batches),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock],
        num_sanity_val_steps=0,
        limit_val_batches=0,
        gradient_clip_val=None,
    )
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(list(batches), batch_size=None))
    return clock.stamps


def alternate(sides: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Run every side once per repeat, reversing the order on every other repeat (ABBA): whichever side runs first
    in a repeat meets a colder or warmer machine, and a fixed order turns that into a bias between the sides."""
    rates: dict[str, list[float]] = {name: [] for name in sides}
    order = list(sides)
    for i in range(repeats):
        for name in order if i % 2 == 0 else reversed(order):
            rates[name].append(sides[name]())
    return rates


def paired_ratios(rates: dict[str, list[float]]) -> list[float]:
    """Lightning over plain within each repeat (the two ran back to back)."""
    return [light / plain for light, plain in zip(rates["lightning"], rates["plain"], strict=True)]


def paired_ratio(rates: dict[str, list[float]]) -> float:
    """The headline Lightning/plain ratio: the median of the per-repeat ratios. Each pair ran back to back, so its
    ratio cancels the machine's drift between repeats (this VM's speed moves ~30 % over hours); the ratio of the
    two medians pairs sides from different moments and read 0.93-0.99 over runs that paired at 0.96-0.99."""
    return statistics.median(paired_ratios(rates))
