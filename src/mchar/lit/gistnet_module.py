"""GistNet substitutability training on a frozen base LM.

teacher = base on the raw window; student = base with earlier blocks replaced by gists (a random aligned mix of
LOD1..LODdepth per step, LOD2 computed from the LOD1 gists just made, with grad; or, with ``session_share``, a WC
like a session's at the allocator budget: raw present, gists behind it); loss on the H true next tokens
after the prefix: KL(teacher || student) and/or NLL, plus an optional contrastive term on adjacent LOD1 gists.
Only GistNet is in the optimizer; the base's weights never require grad and are left out of checkpoints (they
are re-inserted from the live base on load, so ``ckpt_path=last`` resumption works).

Validation reports, per window: ΔNLL@H = student NLL - teacher NLL for the mixed layout and for all-LODl layouts,
the *drop* baseline (the same entries removed instead of gisted), and the substitutability rate (share of single
spans whose ΔNLL is below ``substitutable_threshold``), and, given the budget, ``dnll_session`` /
``drop_dnll_session``: a session's recency-first cover at the budget against the same WC with its gists dropped
(plain truncation), i.e. what the gists a session actually holds are worth.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn

from mchar.core.allocator import initial_context
from mchar.core.entries import Entry
from mchar.lit import windows as W
from mchar.lit.base_lm import warmup_cosine
from mchar.lit.clipping import ShardedNormClipping
from mchar.lit.trainer import is_logging_step

BASE_PREFIX = "base."


def strip_frozen(state: dict[str, torch.Tensor], module: nn.Module) -> dict[str, torch.Tensor]:
    """Drop the frozen base's tensors from a checkpoint state dict (trainable ones, e.g. LoRA, stay)."""
    trainable = {f"{BASE_PREFIX}{n}" for n, p in module.base.named_parameters() if p.requires_grad}
    return {k: v for k, v in state.items() if not k.startswith(BASE_PREFIX) or k in trainable}


def restore_frozen(state: dict[str, torch.Tensor], module: nn.Module) -> None:
    """Put the live base's tensors back before a strict ``load_state_dict`` (resume, ``load_from_checkpoint``)."""
    for k, v in module.base.state_dict().items():
        state.setdefault(f"{BASE_PREFIX}{k}", v)


class FrozenBaseCheckpointMixin:
    """Checkpoint hooks shared by the GistNet, LensNet and end-to-end modules."""

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = strip_frozen(checkpoint["state_dict"], self)  # type: ignore[arg-type]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        restore_frozen(checkpoint["state_dict"], self)  # type: ignore[arg-type]


def substitutability_loss(
    kind: str, teacher: torch.Tensor, student: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KL / NLL / KL+NLL on horizon logits ``[R, H, V]``."""
    nll = W.token_nll(student, targets).mean()
    logs = {"nll": nll.detach()}
    if kind == "nll":
        return nll, logs
    kl = W.token_kl(teacher, student).mean()
    logs["kl"] = kl.detach()
    return (kl if kind == "kl" else kl + nll), logs


def contrastive_term(lod1: torch.Tensor, margin: float) -> torch.Tensor:
    """``relu(margin - cos_dist(g_i, g_{i+1}))`` over adjacent LOD1 gists: keeps gists of different blocks apart."""
    if lod1.shape[1] < 2:
        return lod1.sum() * 0.0
    cos = F.cosine_similarity(lod1[:, 1:], lod1[:, :-1], dim=-1)
    return F.relu(margin - (1.0 - cos)).mean()


def collect_metrics(metrics: nn.ModuleDict, prefix: str) -> dict[str, torch.Tensor]:
    """Compute and reset every updated metric as ``<prefix>/<name>`` (``__`` in a key stands for ``/``).

    Under DDP "updated" means on any rank: a metric's compute syncs its states across ranks, so every rank must
    compute the same metrics in the same order, also a rank whose share of a set held no window.
    """
    names = list(metrics)
    if not names:
        return {}
    updated = torch.tensor(
        [int(metrics[n].update_called) for n in names], dtype=torch.int32, device=metrics[names[0]].device
    )
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(updated, op=torch.distributed.ReduceOp.MAX)
    out = {}
    for name, on_some_rank in zip(names, updated.tolist(), strict=True):
        metric = metrics[name]
        if on_some_rank:
            with warnings.catch_warnings():  # "compute before update" on a rank that had nothing of this set
                warnings.simplefilter("ignore", UserWarning)
                out[f"{prefix}/{name.replace('__', '/')}"] = metric.compute()
        metric.reset()
    return out


def metric_sets(val_sets: Sequence[str], names: Sequence[str], **kwargs: Any) -> nn.ModuleDict:
    """One ``MeanMetric`` per name for each named validation set (``val``, ``val_retrieval``, ...).

    Lightning runs one val dataloader per set (``dataloader_idx`` = position in ``val_sets``); each set's metrics
    are logged as ``<set>/<name>`` at every validation, so every held-out set gets its own training trend.
    """
    return nn.ModuleDict(
        {
            s: nn.ModuleDict({n.replace("/", "__"): torchmetrics.MeanMetric(**kwargs) for n in names})
            for s in val_sets
        }
    )


class MultiSetValidation:
    """Validation over the named sets of ``self.val_sets`` (one val dataloader each), shared by the side nets.

    The module provides ``evaluate_batch(batch, batch_idx) -> {name: per-window values}``; every set is logged as
    ``<set>/<name>`` at the optimizer step, after ``finish_set`` (default: unchanged) may add derived values.
    """

    val_sets: tuple[str, ...]
    val_metrics: nn.ModuleDict

    def validation_step(self, batch: torch.Tensor, batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch.shape[0] == 0:  # a rank's padding batch (W.RankBatches)
            return
        metrics = self.val_metrics[self.val_sets[dataloader_idx]]
        trainer = self._trainer  # type: ignore[attr-defined]
        if trainer is not None:  # the batch's index among all ranks' (W.RankBatches): single-process seeds
            batch_idx = W.global_batch_index(batch_idx, trainer.global_rank, trainer.world_size)
        for name, vals in self.evaluate_batch(batch, batch_idx).items():  # type: ignore[attr-defined]
            metrics[name.replace("/", "__")].update(vals)

    def finish_set(self, prefix: str, metrics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return metrics

    def on_validation_epoch_end(self) -> None:
        out: dict[str, torch.Tensor] = {}
        for s in self.val_sets:
            out |= self.finish_set(s, collect_metrics(self.val_metrics[s], s))
        step = float(self.global_step)  # type: ignore[attr-defined]
        self.log_dict({**out, "step": step}, sync_dist=False)  # type: ignore[attr-defined]


class GistNetModule(MultiSetValidation, FrozenBaseCheckpointMixin, ShardedNormClipping, L.LightningModule):
    """Trains ``gistnet`` so that its gists substitute for the raw blocks they summarise."""

    def __init__(
        self,
        base: nn.Module,
        gistnet: nn.Module,
        *,
        block_size: int,
        depth: int,
        horizon: int,
        loss: str = "kl+nll",
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        max_steps: int = 200,
        warmup_steps: int = 10,
        contrastive_weight: float = 0.0,
        contrastive_margin: float = 0.2,
        substitutable_threshold: float = 0.5,
        position_mode: str = "centre",
        raw_prob: float = 0.25,
        val_raw_prob: float = 0.25,
        keep_raw_blocks: int = 1,
        keep_raw_max: int | None = None,
        val_keep_raw_blocks: int = 1,
        upper_weight: float = 0.0,
        upper_keep_raw_blocks: int = 12,
        budget: int | None = None,
        session_share: float = 0.0,
        session_edits: int = 3,
        seed: int = 0,
        val_seed: int = 0,
        val_sets: Sequence[str] = ("val",),
    ) -> None:
        super().__init__()
        if session_share > 0 and budget is None:
            raise ValueError(
                "gistnet.session_share > 0 needs the allocator budget the session layouts are built at"
            )
        self.base = base
        self.base.requires_grad_(False)
        self.gistnet = gistnet
        self.save_hyperparameters(ignore=["base", "gistnet"])
        self.k, self.depth, self.horizon = block_size, depth, horizon
        self.val_sets = tuple(val_sets)
        names = [
            "teacher_nll",
            "student_nll",
            "dnll",
            "drop_dnll",
            "span_dnll",
            "span_drop_dnll",
            "subst_rate",
        ]
        names += [f"dnll_lod{lv}" for lv in range(1, depth + 1)]
        names += [f"drop_dnll_lod{lv}" for lv in range(1, depth + 1)]
        if budget is not None:
            names += ["dnll_session", "drop_dnll_session"]
        self.val_metrics = metric_sets(self.val_sets, names)

    # ------------------------------------------------------------------ core computation
    def gist_fn(self, x: torch.Tensor, level: int) -> torch.Tensor:
        return self.gistnet(x, level)

    def prefix(self, ids: torch.Tensor) -> int:
        return W.prefix_len(ids.shape[1], self.horizon, self.k)

    def bank(self, ids: torch.Tensor, prefix: int) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """Token embeddings, gists of every level (with grad when GistNet trains) and the source bank."""
        tok = self.base.embed(ids[:, : prefix + self.horizon])
        gists = W.build_gists(self.gist_fn, tok[:, :prefix], self.k, self.depth)
        return tok, gists, W.source_bank(tok, gists)

    def student_logits(
        self, bank: torch.Tensor, layouts: list[tuple[int, np.ndarray, np.ndarray]], prefix: int
    ) -> torch.Tensor:
        rows = W.build_rows(layouts, prefix, self.horizon, bank.device)
        return W.horizon_logits(self.base, W.gather_rows(bank, rows), rows, self.horizon)

    def same_layout(
        self, n: int, entries: list, prefix: int, ids_len: int, dropped: list[bool] | None = None
    ) -> list[tuple[int, np.ndarray, np.ndarray]]:
        offs = W.bank_offsets(ids_len, prefix, self.k, self.depth)
        b, p = W.prefix_slots(entries, self.k, offs, self.hparams.position_mode, dropped)
        return [(i, b, p) for i in range(n)]

    def train_layout(self, step: int, prefix: int) -> list:
        """A random aligned mix of levels behind ``keep_raw_blocks`` raw ones (with ``keep_raw_max``, a number drawn
        from that range each step), or with probability ``session_share`` a session-like WC at the budget."""
        hp = self.hparams
        gen = np.random.default_rng(W.step_seed(hp.seed, step, 3))
        keep = hp.keep_raw_blocks
        if hp.keep_raw_max is not None:
            keep = int(gen.integers(hp.keep_raw_blocks, hp.keep_raw_max + 1))
        return W.training_layout(
            prefix,
            self.k,
            self.depth,
            gen,
            keep,
            hp.raw_prob,
            hp.session_share,
            hp.budget,
            hp.session_edits,
        )

    def upper_layout(self, step: int, prefix: int) -> list[Entry] | None:
        """One upper level (2..depth, drawn per step among those with a node that fits) behind
        ``upper_keep_raw_blocks`` raw blocks, raw elsewhere: where a session's far gists sit (None if none fits)."""
        keep = self.hparams.upper_keep_raw_blocks
        layouts = [W.level_layout(prefix, self.k, lv, keep) for lv in range(2, self.depth + 1)]
        fitting = [ents for lv, ents in enumerate(layouts, start=2) if any(e.level == lv for e in ents)]
        if not fitting:
            return None
        gen = np.random.default_rng(W.step_seed(self.hparams.seed, step, 7))
        return fitting[int(gen.integers(0, len(fitting)))]

    def upper_loss(
        self,
        tok: torch.Tensor,
        gists: list[torch.Tensor],
        prefix: int,
        step: int,
        teacher: torch.Tensor,
        targets: torch.Tensor,
    ) -> torch.Tensor | None:
        """The substitutability loss of :meth:`upper_layout`, its gists built from level-1 gists without gradient:
        it trains the upper levels' parameters alone (with ``gistnet.shared`` false, the LOD2+ nets), so the level-1
        net keeps learning only where the main layouts put it, next to the horizon."""
        entries = self.upper_layout(step, prefix)
        if entries is None:
            return None
        level1 = gists[0].detach()
        upper = W.build_gists(self.gist_fn, level1, self.k, self.depth, first_level=2)
        bank = W.source_bank(tok, [level1, *upper])
        student = self.student_logits(
            bank, self.same_layout(tok.shape[0], entries, prefix, tok.shape[1]), prefix
        )
        return substitutability_loss(self.hparams.loss, teacher, student, targets)[0]

    def compute_loss(self, ids: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One training loss (used by ``training_step`` and by the plain-loop benchmark alike)."""
        ids = ids.to(self.device)
        prefix = self.prefix(ids)
        targets = ids[:, prefix : prefix + self.horizon]
        with torch.no_grad():
            teacher = W.teacher_logits(self.base, ids, prefix, self.horizon)
        tok, gists, bank = self.bank(ids, prefix)
        entries = self.train_layout(step, prefix)
        student = self.student_logits(
            bank, self.same_layout(ids.shape[0], entries, prefix, tok.shape[1]), prefix
        )
        loss, logs = substitutability_loss(self.hparams.loss, teacher, student, targets)
        if self.hparams.contrastive_weight > 0:
            c = contrastive_term(gists[0], self.hparams.contrastive_margin)
            loss = loss + self.hparams.contrastive_weight * c
            logs["contrastive"] = c.detach()
        if self.hparams.upper_weight > 0:
            u = self.upper_loss(tok, gists, prefix, step, teacher, targets)
            if u is not None:
                loss = loss + self.hparams.upper_weight * u
                logs["upper_loss"] = u.detach()
        with torch.no_grad():
            logs["dnll"] = logs["nll"] - W.token_nll(teacher, targets).mean()
        logs["loss"] = loss.detach()
        return loss, logs

    # ------------------------------------------------------------------ Lightning
    def step_loss(self, batch: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of one optimisation step (Lightning and the plain-loop benchmark both call this)."""
        return self.compute_loss(batch, step)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss, logs = self.step_loss(batch, int(self.global_step))
        if is_logging_step(self):
            self.log_dict({f"train/{k}": v for k, v in logs.items()}, batch_size=batch.shape[0])
        return loss

    @torch.no_grad()
    def evaluate_batch(self, ids: torch.Tensor, batch_idx: int) -> dict[str, torch.Tensor]:
        """Per-window ΔNLL values of every validation layout (vectorised over the batch)."""
        ids = ids.to(self.device)
        n = ids.shape[0]
        prefix = self.prefix(ids)
        targets = ids[:, prefix : prefix + self.horizon]
        teacher = W.teacher_logits(self.base, ids, prefix, self.horizon)
        t_nll = W.token_nll(teacher, targets).mean(1)
        tok, _, bank = self.bank(ids, prefix)
        t_len = tok.shape[1]
        # validation layouts are drawn from ``val_seed``, not the training seed: seed replicates validate alike
        gen = np.random.default_rng(W.step_seed(self.hparams.val_seed, batch_idx, 5))
        layouts: list[tuple[str, list, bool]] = []
        mixed = W.random_layout(
            prefix, self.k, self.depth, gen, self.hparams.val_keep_raw_blocks, self.hparams.val_raw_prob
        )
        layouts += [("dnll", mixed, False), ("drop_dnll", mixed, True)]
        for lv in range(1, self.depth + 1):
            ents = W.level_layout(prefix, self.k, lv, self.hparams.val_keep_raw_blocks)
            if any(e.level == lv for e in ents):
                layouts += [(f"dnll_lod{lv}", ents, False), (f"drop_dnll_lod{lv}", ents, True)]
            n_nodes = (prefix // self.k - self.hparams.val_keep_raw_blocks) // self.k ** (lv - 1)
            if n_nodes > 0:
                span = W.single_span_layout(prefix, self.k, lv, int(gen.integers(0, n_nodes)))
                layouts += [(f"span{lv}", span, False), (f"spandrop{lv}", span, True)]
        if self.hparams.budget is not None:
            # a session's cover at the budget, against the same WC with its gists truncated away
            shape = W.WindowShape(self.k, self.depth, prefix)
            cover = list(initial_context(shape, self.hparams.budget).entries)
            layouts += [("dnll_session", cover, False), ("drop_dnll_session", cover, True)]
        rows: list[tuple[int, np.ndarray, np.ndarray]] = []
        for _, ents, drop in layouts:
            rows += self.same_layout(n, ents, prefix, t_len, [e.level > 0 for e in ents] if drop else None)
        nll = W.token_nll(self.student_logits(bank, rows, prefix), targets.repeat(len(layouts), 1))
        nll = nll.mean(1).view(len(layouts), n)
        out = {"teacher_nll": t_nll, "student_nll": nll[0]}
        spans, span_drops = [], []
        for j, (name, _, _) in enumerate(layouts):
            d = nll[j] - t_nll
            if name.startswith("spandrop"):
                span_drops.append(d)
            elif name.startswith("span"):
                spans.append(d)
            else:
                out[name] = d
        if spans:
            s = torch.cat(spans)
            out["span_dnll"] = s
            out["span_drop_dnll"] = torch.cat(span_drops)
            out["subst_rate"] = (s < self.hparams.substitutable_threshold).float()
        return out

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(
            self.gistnet.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: warmup_cosine(s, self.hparams.warmup_steps, self.hparams.max_steps)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def export(self, directory: str | Path) -> Path:
        """GistNet as ``model.safetensors`` + ``config.json`` (loads with ``mchar.core.gistnet.from_pretrained``)."""
        return self.gistnet.save_pretrained(directory)
