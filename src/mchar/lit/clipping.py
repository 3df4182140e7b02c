"""Gradient clipping by norm that also holds under FSDP."""

from __future__ import annotations

import torch


class ShardedNormClipping:
    """Clip by norm under ``trainer=fsdp`` too. Lightning's FSDP precision plugin refuses ``gradient_clip_val`` with
    the norm algorithm (every trainer config clips by norm); the FSDP-wrapped model's own ``clip_grad_norm_`` takes
    the norm over every rank's shard, which is what a plain ``clip_grad_norm_`` computes on one process."""

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        model = self.trainer.model  # type: ignore[attr-defined]
        if gradient_clip_val and gradient_clip_algorithm in (None, "norm") and isinstance(model, FSDP):
            model.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(  # type: ignore[misc]
            optimizer, gradient_clip_val, gradient_clip_algorithm
        )
