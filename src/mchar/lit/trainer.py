"""One place that turns ``TrainerConfig`` into a ``lightning.Trainer`` (loops, checkpoints, precision, DDP)."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar

from mchar.config import TrainerConfig

# Lightning warnings every mchar fit would print, none of which asks anything of the user:
for _message in (
    # the frozen base (and the layers a LoRA adapter wraps) stays in eval mode on purpose: no dropout, fixed norms
    r"Found \d+ module\(s\) in eval mode at the start of training",
    # the curriculum's outer loader is an IterableDataset with a length, always read by one process (num_workers=0)
    r"Your `IterableDataset` has `__len__` defined",
    # Lightning's own call into torch's pytree API, deprecated by newer torch releases; nothing for a user to change
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # MultiSetValidation logs values its torchmetrics already synced across ranks (``collect_metrics``), identical
    # on every rank; the advice to add ``sync_dist`` for epoch-level tensors would only average them again
    r"It is recommended to use `self\.log\('(val[a-z_]*/[^']*|step)'",
):
    warnings.filterwarnings("ignore", message=_message)


class _NoAdvert(logging.Filter):
    """Drops Lightning's per-fit tip to install its cloud logger: mchar logs to MLflow, and a quickstart's five
    fits printed it five times."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NoAdvert())


def build_trainer(
    tcfg: TrainerConfig,
    max_steps: int,
    ckpt_dir: str | Path | None,
    logger: Any = None,
    val_check_interval: int | None = None,
    limit_val_batches: int | float | None = None,
    callbacks: list[Any] | None = None,
    monitor: str | None = None,
    every_n_train_steps: int | None = None,
    find_unused_parameters: bool = False,
) -> L.Trainer:
    """A Trainer for one stage; ``trainer.max_steps`` (when set) overrides the stage's own step count.

    ``find_unused_parameters``: the module's steps do not always use every trained parameter (e2e's alternate
    schedule), so a DDP strategy gets Lightning's ``*_find_unused_parameters_true`` variant."""
    steps = tcfg.max_steps or max_steps
    cbs: list[Any] = list(callbacks or [])
    if ckpt_dir is not None:
        cbs.append(
            ModelCheckpoint(
                dirpath=str(ckpt_dir),
                save_last=True,
                save_top_k=1 if monitor else 0,
                monitor=monitor,
                mode="min",
                every_n_train_steps=every_n_train_steps or max(1, min(steps, 50)),
            )
        )
    if tcfg.enable_progress_bar:
        cbs.append(TQDMProgressBar(refresh_rate=max(1, tcfg.log_every_n_steps // 2)))
    interval = tcfg.val_check_interval or val_check_interval or steps
    kwargs: dict[str, Any] = dict(
        accelerator=tcfg.accelerator,
        devices=tcfg.devices,
        num_nodes=tcfg.num_nodes,
        strategy=ddp_variant(tcfg.strategy, find_unused_parameters),
        precision=tcfg.precision,
        max_steps=steps,
        max_epochs=-1,
        val_check_interval=min(interval, steps),
        check_val_every_n_epoch=None,
        log_every_n_steps=tcfg.log_every_n_steps,
        gradient_clip_val=tcfg.gradient_clip_val,
        enable_progress_bar=tcfg.enable_progress_bar,
        deterministic=tcfg.deterministic,
        logger=logger if logger is not None else False,
        callbacks=cbs,
        enable_checkpointing=ckpt_dir is not None,
        num_sanity_val_steps=0,
        enable_model_summary=False,
        # no_grad, not inference_mode: metric states reset inside a stand-alone ``validate`` (the trend's step 0)
        # would otherwise become inference tensors that the in-fit validation cannot update
        inference_mode=False,
    )
    if limit_val_batches is not None:
        kwargs["limit_val_batches"] = limit_val_batches
    kwargs.update(tcfg.extra)
    return L.Trainer(**kwargs)


def ddp_variant(strategy: Any, find_unused_parameters: bool) -> Any:
    """``ddp`` / ``ddp_spawn`` / ``ddp_fork`` / ``ddp_notebook`` -> their ``_find_unused_parameters_true`` registry
    names when asked; any other strategy (auto, fsdp, a Strategy object) as it is."""
    if find_unused_parameters and strategy in ("ddp", "ddp_spawn", "ddp_fork", "ddp_notebook"):
        return f"{strategy}_find_unused_parameters_true"
    return strategy


@contextmanager
def full_weights(trainer: Any) -> Iterator[None]:
    """Entered by every rank around rank zero's export: under FSDP a module's own parameters are this rank's flat
    shard outside forward (a ``save_pretrained`` there writes one shard), so they are gathered whole on rank zero
    for the block; under any other strategy a no-op."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    model = getattr(trainer.strategy, "model", None)
    if isinstance(model, FSDP):
        with FSDP.summon_full_params(model, writeback=False, rank0_only=True):
            yield
    else:
        yield


def wait_for_rank_zero(trainer: L.Trainer, what: str) -> None:
    """Every rank waits here until rank zero has published ``what`` (a no-op on one process).

    Under DDP every rank runs the pipeline, and the next stage loads this one's export from disk: a rank that ran
    ahead found the base missing, started training a second one on its own, and the two ranks hung in unmatched
    collectives (``trainer=ddp_cpu`` with ``stages=[base_lm,gistnet]`` from scratch).
    """
    trainer.strategy.barrier(what)


@contextmanager
def rank_zero_export(trainer: L.Trainer, what: str) -> Iterator[bool]:
    """Every rank enters around a side net's export; the block gets whether this rank writes it (rank zero), with
    the weights whole (:func:`full_weights`), and every rank leaves once it is on disk (:func:`wait_for_rank_zero`)."""
    with full_weights(trainer):
        yield trainer.is_global_zero
    wait_for_rank_zero(trainer, what)


def is_logging_step(module: L.LightningModule) -> bool:
    """Whether this training step's metrics reach the loggers (every ``log_every_n_steps``, as Lightning decides).

    ``self.log`` bookkeeping costs ~1.5 ms per call of a dict of tensors; on a small side-net step (~25 ms) that is
    5 % of the throughput spent on values no logger ever receives, so train metrics are only built when they ship.
    Outside a Trainer (plain loops, tests) every step counts as a logging step.
    """
    trainer = module._trainer
    if trainer is None:
        return True
    return (trainer.global_step + 1) % max(1, trainer.log_every_n_steps) == 0 or trainer.global_step == 0
