"""LightningModule that pre-trains mchar's small base LM (next-token loss on corpus windows)."""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import torch
import torchmetrics
from torch import nn

from mchar.data.copy_batches import repeat_batch
from mchar.lit.clipping import ShardedNormClipping
from mchar.lit.gist_exposure import gist_exposure_loss


def warmup_cosine(step: int, warmup: int, total: int, floor: float = 0.1) -> float:
    """LR multiplier: linear warm-up, then cosine decay to ``floor``."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def next_token_loss(
    model: nn.Module,
    ids: torch.Tensor,
    labels: torch.Tensor | None = None,
    answer: torch.Tensor | None = None,
    answer_weight: float = 1.0,
) -> torch.Tensor:
    """Next-token NLL averaged over labelled tokens (-100 = padding), answer tokens weighted if given."""
    labels = (ids if labels is None else labels)[:, 1:]
    logits = model(input_ids=ids).logits[:, :-1]
    nll = nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(),
        labels.reshape(-1),
        ignore_index=-100,
        reduction="none",
    )
    weight = labels.reshape(-1).ne(-100).float()
    if answer is not None and answer_weight != 1.0:
        weight = weight * (1.0 + (answer_weight - 1.0) * answer[:, 1:].reshape(-1).float())
    return (nll * weight).sum() / weight.sum().clamp_min(1.0)


class BaseLMModule(ShardedNormClipping, L.LightningModule):
    """Causal-LM training of an HF model; validation perplexity through torchmetrics.

    ``answer_weight`` multiplies the training loss of the answer tokens of synthetic retrieval windows
    (``answer_mask``): a few tokens per window carry the long-range signal, and without the weight a CPU-sized
    run ends before the model learns to copy from far back. Validation NLL is always unweighted.

    ``copy_batch > 0`` adds, at every step, the masked NLL of a batch of synthetic copy windows
    (:func:`mchar.data.copy_batches.repeat_batch`, drawn from a generator seeded by ``seed`` and the global step,
    so a resumed fit sees the same batches): an induction warm-up that teaches copying while the text batches keep
    the language model. The term starts at global step ``copy_from_step``; its first ``copy_only_steps`` steps train
    it alone (the text batch is skipped): an ablation knob. On the 2-layer d128 retrieval base neither schedule
    formed an induction circuit on a CPU budget (copy loss ~5.1 vs chance 5.55 after 2,000 copy-only steps);
    ``model.local.induction_prior`` is what gives the local base the ability to copy.

    ``gist_exposure > 0`` adds that weight times :func:`mchar.lit.gist_exposure.gist_exposure_loss` on the same
    text batch (a seeded random layout per step): the base learns to read one-slot block summaries. With a
    ``summarizer`` (a GistNet) those summaries are its output, and it trains with the base on that loss.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 3e-3,
        weight_decay: float = 0.1,
        warmup_steps: int = 50,
        max_steps: int = 1000,
        answer_weight: float = 1.0,
        copy_batch: int = 0,
        copy_length: int = 64,
        copy_pool: int = 256,
        copy_from_step: int = 0,
        copy_only_steps: int = 0,
        gist_exposure: float = 0.0,
        gist_exposure_raw_prob: float = 0.5,
        gist_exposure_session_share: float = 0.0,
        budget: int | None = None,
        block_size: int = 16,
        depth: int = 2,
        position_mode: str = "centre",
        seed: int = 0,
        summarizer: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.summarizer = summarizer
        self.save_hyperparameters(ignore=["model", "summarizer"])
        self.val_nll = torchmetrics.MeanMetric()

    def _loss(
        self, ids: torch.Tensor, labels: torch.Tensor | None = None, answer: torch.Tensor | None = None
    ) -> torch.Tensor:
        return next_token_loss(self.model, ids, labels, answer, self.hparams.answer_weight)

    @staticmethod
    def _unpack(batch: torch.Tensor | dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        if isinstance(batch, dict):
            return batch["input_ids"], batch.get("labels")
        return batch, None

    def copy_loss(self, step: int) -> torch.Tensor:
        """Masked NLL of this step's synthetic copy batch (only copyable targets count)."""
        h = self.hparams
        gen = torch.Generator().manual_seed(h.seed * 1_000_003 + step)
        ids, mask = repeat_batch(h.copy_batch, h.copy_length, h.copy_pool, gen)
        labels = ids.masked_fill(mask == 0, -100).to(self.device)
        return self._loss(ids.to(self.device), labels)

    def exposure_loss(self, ids: torch.Tensor, step: int) -> torch.Tensor:
        """NLL of the batch with a seeded random mix of its blocks replaced by summaries (mean or ``summarizer``)."""
        h = self.hparams
        gen = np.random.default_rng([h.seed, step, 17])
        return gist_exposure_loss(
            self.model,
            ids,
            h.block_size,
            h.depth,
            gen,
            raw_prob=h.gist_exposure_raw_prob,
            position_mode=h.position_mode,
            session_share=h.gist_exposure_session_share,
            session_budget=h.budget,
            summary=self.summarizer,
        )

    def copy_phase(self, step: int) -> tuple[bool, bool]:
        """(copy term on, text loss on) at global step ``step``."""
        h = self.hparams
        copy_on = bool(h.copy_batch) and step >= h.copy_from_step
        copy_only = copy_on and step < h.copy_from_step + h.copy_only_steps
        return copy_on, not copy_only

    def training_step(self, batch: torch.Tensor | dict, batch_idx: int) -> torch.Tensor:
        step = int(self.global_step)
        copy_on, text_on = self.copy_phase(step)
        loss = torch.zeros((), device=self.device)
        if text_on:
            answer = batch.get("answer_mask") if isinstance(batch, dict) else None
            loss = self._loss(*self._unpack(batch), answer)
            self.log("train/loss", loss, prog_bar=True)
        if text_on and self.hparams.gist_exposure > 0:
            exposure = self.exposure_loss(self._unpack(batch)[0], step)
            self.log("train/gist_exposure_loss", exposure, prog_bar=True)
            loss = loss + self.hparams.gist_exposure * exposure
        if copy_on:
            copy = self.copy_loss(step)
            self.log("train/copy_loss", copy, prog_bar=True)
            loss = loss + copy
        return loss

    def validation_step(self, batch: torch.Tensor | dict, batch_idx: int) -> None:
        ids, labels = self._unpack(batch)
        counted = (labels if labels is not None else ids)[:, 1:].ne(-100).sum()
        self.val_nll.update(self._loss(ids, labels), weight=counted)

    def on_validation_epoch_end(self) -> None:
        nll = self.val_nll.compute()
        self.log_dict({"val/nll": nll, "val/ppl": torch.exp(nll)}, prog_bar=True, sync_dist=True)
        self.val_nll.reset()

    def configure_optimizers_plain(self) -> list[dict]:
        """Parameter groups: weight decay on matrices only (the base's and the summarizer's)."""
        params = [*self.model.parameters(), *(self.summarizer.parameters() if self.summarizer else [])]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        return [
            {"params": decay, "weight_decay": self.hparams.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def configure_optimizers(self):  # noqa: ANN201 - Lightning's union type
        opt = torch.optim.AdamW(self.configure_optimizers_plain(), lr=self.hparams.lr, betas=(0.9, 0.95))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: warmup_cosine(s, self.hparams.warmup_steps, self.hparams.max_steps)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
