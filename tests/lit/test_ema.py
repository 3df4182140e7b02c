"""SubmoduleEMA: the average of one side net's weights, what validation and the export see, kept across a resume."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from mchar.lit.ema import SubmoduleEMA


class TwoPart(L.LightningModule):
    """A frozen ``base`` and a trained ``net``: the layout of the GistNet / LensNet modules."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.base = torch.nn.Linear(4, 4).requires_grad_(False)
        self.net = torch.nn.Linear(4, 1)
        self.seen_in_validation: list[torch.Tensor] = []

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(self.base(x)).squeeze(-1), y)

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        if batch_idx == 0:
            self.seen_in_validation.append(self.net.weight.detach().clone())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.net.parameters(), lr=0.3)


class LiveWeights(L.Callback):
    """The live ``net`` weight after every optimizer step (before any validation swaps it)."""

    def __init__(self) -> None:
        self.after_step: list[torch.Tensor] = []
        self.at_step_start: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: TwoPart, *args: object) -> None:
        self.at_step_start.append(pl_module.net.weight.detach().clone())

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: TwoPart, *args: object) -> None:
        self.after_step.append(pl_module.net.weight.detach().clone())


def _loader() -> DataLoader:
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    # one batch: the batches' order cannot change on resume
    return DataLoader(TensorDataset(x, x.sum(-1)), batch_size=8)


def _trainer(steps: int, callbacks: list[L.Callback], tmp: Path | None = None, val_every: int | None = None):
    return L.Trainer(
        max_steps=steps,
        max_epochs=-1,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=tmp is not None,
        default_root_dir=tmp,
        val_check_interval=val_every,
        check_val_every_n_epoch=None if val_every else 1,
        num_sanity_val_steps=0,
        limit_val_batches=1 if val_every else 0,
    )


def _ema(weights: list[torch.Tensor], decay: float) -> torch.Tensor:
    avg = weights[0]  # AveragedModel's first update copies the weights
    for w in weights[1:]:
        avg = decay * avg + (1 - decay) * w
    return avg


def test_the_module_ends_with_the_average_and_only_the_net_is_averaged() -> None:
    module, live = TwoPart(), LiveWeights()
    base_before = module.base.weight.clone()
    ema = SubmoduleEMA("net", decay=0.6)
    _trainer(6, [ema, live]).fit(module, _loader())
    assert len(live.after_step) == 6
    expected = _ema(live.after_step, 0.6)
    assert not torch.allclose(expected, live.after_step[-1])  # the average is not the last step
    torch.testing.assert_close(module.net.weight, expected)
    assert torch.equal(module.base.weight, base_before)
    averaged = sum(p.numel() for p in ema.average.module.parameters())
    assert averaged == sum(p.numel() for p in module.net.parameters())  # no copy of the frozen base


def test_validation_inside_the_fit_sees_the_average_and_training_goes_on_from_the_live_weights() -> None:
    module, live = TwoPart(), LiveWeights()
    _trainer(6, [SubmoduleEMA("net", decay=0.6), live], val_every=3).fit(module, _loader(), _loader())
    assert len(module.seen_in_validation) == 2
    torch.testing.assert_close(module.seen_in_validation[0], _ema(live.after_step[:3], 0.6))
    torch.testing.assert_close(live.at_step_start[3], live.after_step[2])  # swapped back before step 4


def test_a_resumed_fit_ends_with_the_uninterrupted_average(tmp_path: Path) -> None:
    whole = TwoPart()
    _trainer(8, [SubmoduleEMA("net", decay=0.6)]).fit(whole, _loader())

    first = TwoPart()
    _trainer(4, [SubmoduleEMA("net", decay=0.6)], tmp_path).fit(first, _loader())
    (ckpt,) = (tmp_path / "checkpoints").glob("*.ckpt")
    resumed = TwoPart()
    _trainer(8, [SubmoduleEMA("net", decay=0.6)], tmp_path).fit(resumed, _loader(), ckpt_path=ckpt)
    torch.testing.assert_close(resumed.net.weight, whole.net.weight)
    torch.testing.assert_close(resumed.net.bias, whole.net.bias)


def test_a_decay_outside_zero_one_is_refused() -> None:
    with pytest.raises(ValueError, match="EMA decay must be in"):
        SubmoduleEMA("net", decay=1.0)
