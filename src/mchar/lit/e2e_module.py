"""End-to-end (on-policy) training: GistNet + LensNet on the WCs the allocator actually builds, optional LoRA.

Schedule ``alternate`` (default): odd steps train GistNet (+LoRA) on the substitutability loss of the WCs the
greedy allocator builds from LensNet's scores; even steps train LensNet on counterfactual utilities measured with
the *current* GistNet (so its labels never go stale, the upstream JT2 problem). ``joint`` sums both losses every
step. One AdamW over parameter groups: in alternate mode the idle group has ``grad=None`` and AdamW skips it
(no weight-decay drift either). Ablations: ``train_gistnet``, ``train_lensnet``, ``lora``.

LoRA (:mod:`mchar.core.lora`) wraps the base's attention projections, ``B`` zero-initialised so step 0 is exactly
the frozen base. The teacher always runs with LoRA disabled (it is the frozen base's own prediction on the raw
context). The export holds the adapter next to the nets, and evaluation re-applies it with that GistNet.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mchar.core.lora import LORA_TARGETS, LoRALinear, add_lora, lora_disabled, lora_state, save_lora
from mchar.lit import windows as W
from mchar.lit.base_lm import warmup_cosine
from mchar.lit.gistnet_module import substitutability_loss
from mchar.lit.lensnet_module import LensNetModule


class E2EModule(LensNetModule):
    """GistNet + LensNet (+ LoRA) trained on allocator-built working contexts."""

    # an alternate step leaves the idle group without a gradient, which DDP's reducer refuses unless told
    ddp_find_unused_parameters = True

    def __init__(
        self,
        base: nn.Module,
        gistnet: nn.Module,
        lensnet: nn.Module,
        *,
        schedule: str = "alternate",
        train_gistnet: bool = True,
        train_lensnet: bool = True,
        lora: bool = False,
        lora_rank: int = 4,
        lora_alpha: float = 8.0,
        gist_loss: str = "kl+nll",
        gist_lr: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(base, gistnet, lensnet, train_gistnet=train_gistnet, **kwargs)
        if schedule not in ("alternate", "joint"):
            raise ValueError(f"e2e.schedule: {schedule!r} is not one of alternate, joint")
        if not (train_gistnet or train_lensnet or lora):
            raise ValueError("e2e: nothing to train (train_gistnet, train_lensnet and lora are all off)")
        self.save_hyperparameters(ignore=["base", "gistnet", "lensnet"])
        self.lensnet.requires_grad_(train_lensnet)
        self.lora_layers: list[LoRALinear] = []
        if lora:
            self.lora_layers = add_lora(self.base_model(), rank=lora_rank, alpha=lora_alpha)

    def phase(self, step: int) -> str:
        """'gist', 'lens' or 'joint' for a global step (odd = GistNet, even = LensNet)."""
        hp = self.hparams
        gist_side = hp.train_gistnet or hp.lora
        if hp.schedule == "joint" and gist_side and hp.train_lensnet:
            return "joint"
        if not hp.train_lensnet:
            return "gist"
        if not gist_side:
            return "lens"
        return "gist" if step % 2 == 1 else "lens"

    def gist_loss(self, ids: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Substitutability on the WCs the allocator builds from LensNet scores (one WC per window)."""
        ids = ids.to(self.device)
        n = ids.shape[0]
        prefix = self.prefix(ids)
        targets = ids[:, prefix : prefix + self.horizon]
        with torch.no_grad(), lora_disabled(self.lora_layers):
            teacher = W.teacher_logits(self.base, ids, prefix, self.horizon)
        tok = self.base.embed(ids[:, : prefix + self.horizon])
        with torch.no_grad():
            gen = np.random.default_rng(W.step_seed(self.hparams.seed, step, 19))
            wcs = self.allocate("lensnet", n, tok, self.gists(tok, prefix), prefix, gen, ids=ids)
        gists = self.gists(tok, prefix, grad=True)
        bank = W.source_bank(tok, gists)
        offs = W.bank_offsets(prefix + self.horizon, prefix, self.k, self.depth)
        spec = [(i, *self.slots(wc.entries, offs)) for i, wc in enumerate(wcs)]
        rows = W.build_rows(spec, prefix, self.horizon, bank.device)
        student = W.horizon_logits(self.base, W.gather_rows(bank, rows), rows, self.horizon)
        loss, logs = substitutability_loss(self.hparams.gist_loss, teacher, student, targets)
        with torch.no_grad():
            logs["dnll"] = logs["nll"] - W.token_nll(teacher, targets).mean()
        return loss, {f"gist_{k}": v for k, v in logs.items()}

    def step_loss(self, batch: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        phase = self.phase(step)
        logs: dict[str, torch.Tensor] = {}
        loss = batch.new_zeros((), dtype=torch.float32)
        if phase in ("gist", "joint"):
            g, gl = self.gist_loss(batch, step)
            loss, logs = loss + g, logs | gl
        if phase in ("lens", "joint"):
            lens, ll = self.lens_loss(batch, step)
            loss, logs = loss + lens, logs | ll
        logs["phase_gist"] = torch.tensor(float(phase != "lens"))
        return loss, logs

    def param_groups(self) -> list[dict[str, Any]]:
        hp = self.hparams
        groups = []
        if hp.train_gistnet:
            groups.append(
                {"params": list(self.gistnet.parameters()), "lr": hp.gist_lr or hp.lr, "name": "gistnet"}
            )
        if hp.lora:
            groups.append(
                {
                    "params": [p for m in self.lora_layers for p in (m.lora_a, m.lora_b)],
                    "lr": hp.gist_lr or hp.lr,
                    "name": "lora",
                }
            )
        if hp.train_lensnet:
            groups += self.lensnet_groups(hp.lr)
        return groups

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(
            self.param_groups(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: warmup_cosine(s, self.hparams.warmup_steps, self.hparams.max_steps)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def base_model(self) -> nn.Module:
        return self.base.model if hasattr(self.base, "model") else self.base

    def lora_state(self) -> dict[str, torch.Tensor]:
        return lora_state(self.base_model())

    def export(self, directory: Any) -> Any:
        """GistNet and LensNet (safetensors + config) and, with LoRA, ``lora.safetensors`` + ``lora.json``."""
        out = Path(directory)
        self.gistnet.save_pretrained(out / "gistnet")
        self.lensnet.save_pretrained(out / "lensnet")
        if self.lora_layers:
            hp = self.hparams
            save_lora(self.base_model(), out, hp.lora_rank, hp.lora_alpha, LORA_TARGETS)
        return out
