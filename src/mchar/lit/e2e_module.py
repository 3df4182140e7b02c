"""End-to-end (on-policy) training: GistNet + LensNet on the WCs the allocator actually builds, optional LoRA.

Schedule ``alternate`` (default): odd steps train GistNet (+LoRA) on the substitutability loss of the WCs the
greedy allocator builds from LensNet's scores; even steps train LensNet on counterfactual utilities measured with
the *current* GistNet (so its labels never go stale, the upstream JT2 problem). ``joint`` sums both losses every
step. One AdamW over parameter groups: in alternate mode the idle group has ``grad=None`` and AdamW skips it
(no weight-decay drift either). Ablations: ``train_gistnet``, ``train_lensnet``, ``lora``.

LoRA is a minimal in-house wrapper (peft is not a dependency): ``y = W x + (alpha/r) B A x`` on the base's
attention projections, ``B`` zero-initialised so step 0 is exactly the frozen base. The teacher always runs with
LoRA disabled (it is the frozen base's own prediction on the raw context).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mchar.lit import windows as W
from mchar.lit.base_lm import warmup_cosine
from mchar.lit.gistnet_module import substitutability_loss
from mchar.lit.lensnet_module import LensNetModule

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int = 4, alpha: float = 8.0) -> None:
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.randn(rank, base.in_features) / math.sqrt(base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        self.scale = alpha / rank
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.enabled:
            return y
        return y + (x @ self.lora_a.t().to(x.dtype)) @ self.lora_b.t().to(x.dtype) * self.scale


def add_lora(
    model: nn.Module, targets: Sequence[str] = LORA_TARGETS, rank: int = 4, alpha: float = 8.0
) -> list[LoRALinear]:
    """Wrap every ``nn.Linear`` whose attribute name is in ``targets``; returns the wrappers."""
    added = []
    for _, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                wrapped = LoRALinear(child, rank, alpha)
                setattr(parent, name, wrapped)
                added.append(wrapped)
    if not added:
        raise ValueError(f"lora: no nn.Linear named {list(targets)} in the base model")
    return added


@contextmanager
def lora_disabled(layers: Sequence[LoRALinear]) -> Iterator[None]:
    prev = [layer.enabled for layer in layers]
    for layer in layers:
        layer.enabled = False
    try:
        yield
    finally:
        for layer, p in zip(layers, prev, strict=True):
            layer.enabled = p


class E2EModule(LensNetModule):
    """GistNet + LensNet (+ LoRA) trained on allocator-built working contexts."""

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
            model = base.model if hasattr(base, "model") else base
            self.lora_layers = add_lora(model, rank=lora_rank, alpha=lora_alpha)

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
            wcs = self.allocate("lensnet", n, tok, self.gists(tok, prefix), prefix, gen)
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
            groups.append({"params": list(self.lensnet.parameters()), "lr": hp.lr, "name": "lensnet"})
        return groups

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(
            self.param_groups(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: warmup_cosine(s, self.hparams.warmup_steps, self.hparams.max_steps)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def lora_state(self) -> dict[str, torch.Tensor]:
        model = self.base.model if hasattr(self.base, "model") else self.base
        return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if "lora_" in n}

    def export(self, directory: Any) -> Any:
        """GistNet and LensNet (safetensors + config) and, with LoRA, ``lora.safetensors``."""
        from safetensors.torch import save_file

        out = Path(directory)
        self.gistnet.save_pretrained(out / "gistnet")
        self.lensnet.save_pretrained(out / "lensnet")
        if self.lora_layers:
            save_file(self.lora_state(), str(out / "lora.safetensors"))
        return out
