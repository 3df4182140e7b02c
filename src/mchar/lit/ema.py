"""An exponential moving average of one trained side net (LensNet, GistNet), swapped in for validation and the export.

Why not Lightning's ``EMAWeightAveraging``: it averages the whole LightningModule, and a side-net module holds the
frozen base (and GistNet) too, so it would keep a second copy of the base and lerp every frozen weight after every
step. This callback averages only the named submodule with the same engine (``torch.optim.swa_utils.AveragedModel``
with ``get_ema_multi_avg_fn``); its state (the average and the count) rides in the checkpoint, so a killed fit
resumes with the same average.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class SubmoduleEMA(L.Callback):
    """EMA of ``pl_module.<attr>``'s parameters (and buffers), updated after every optimizer step.

    During validation inside the fit the averaged weights stand in for the live ones; when training ends they
    replace the live ones for good, so whatever the stage exports afterwards is the average.
    """

    def __init__(self, attr: str, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.attr, self.decay = attr, float(decay)
        self.average: AveragedModel | None = None
        self._last_step = 0

    @property
    def state_key(self) -> str:
        return f"SubmoduleEMA[{self.attr}]"

    def _target(self, pl_module: L.LightningModule) -> torch.nn.Module:
        return getattr(pl_module, self.attr)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self.average is not None:
            return
        # Lightning restores callback state after ``setup``, so a resumed fit fills this average (load_state_dict)
        self.average = AveragedModel(
            self._target(pl_module), multi_avg_fn=get_ema_multi_avg_fn(self.decay), use_buffers=True
        )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        # one update per optimizer step (a batch that only accumulates gradients leaves global_step where it was)
        if self.average is not None and trainer.global_step > self._last_step:
            self.average.update_parameters(self._target(pl_module))
            self._last_step = trainer.global_step

    def _pairs(self, pl_module: L.LightningModule) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(averaged, live) tensors, or none before the first update (the live weights are all there is then)."""
        if self.average is None or not int(self.average.n_averaged):
            return []
        return list(zip(_tensors(self.average.module), _tensors(self._target(pl_module)), strict=True))

    def _swap(self, pl_module: L.LightningModule) -> None:
        for avg, live in self._pairs(pl_module):
            tmp = avg.detach().clone()
            avg.detach().copy_(live.detach())
            live.detach().copy_(tmp)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit":
            self._swap(pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit":
            self._swap(pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for avg, live in self._pairs(pl_module):
            live.detach().copy_(avg.detach())

    def state_dict(self) -> dict[str, Any]:
        state = {} if self.average is None else self.average.state_dict()
        return {"average": state, "last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = int(state_dict["last_step"])
        if state_dict["average"]:
            assert self.average is not None, "restored before setup"
            self.average.load_state_dict(state_dict["average"])


# the share of the average that the first averaged step's weights may still hold at the end before a fit is warned
FIRST_STEP_SHARE_MAX = 0.25


def ema_callbacks(
    attr: str, decay: float | None, strategy: Any, steps: int | None = None
) -> list[L.Callback]:
    """``<stage>.ema_decay``: the stage's :class:`SubmoduleEMA` over ``pl_module.<attr>``, or none. Under FSDP each
    rank holds a shard of the net, so the average (of whole weights) is left out with a warning, not refused: a
    default decay must not make ``trainer=fsdp`` unusable. A fit of ``steps`` too short for the decay is warned:
    the average starts at the first step's (near-initial) weights, which keep ``decay ** (steps - 1)`` of it."""
    from lightning.pytorch.utilities import rank_zero_warn

    if decay is None:
        return []
    if "fsdp" in str(strategy).lower():
        rank_zero_warn(
            f"{attr}.ema_decay: no weight average under an FSDP strategy; {attr} is exported from its last step"
        )
        return []
    if steps and decay ** (steps - 1) > FIRST_STEP_SHARE_MAX:
        rank_zero_warn(
            f"{attr}.ema_decay={decay}: after {steps} steps the first step's weights still hold "
            f"{decay ** (steps - 1):.0%} of the exported average (it spans ~{1 / (1 - decay):.0f} steps); "
            "lower the decay or train longer"
        )
    return [SubmoduleEMA(attr, decay)]


def _tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]
