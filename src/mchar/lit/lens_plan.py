"""The host-side half of a LensNet training step, prepared off the step.

Everything a LensNet step builds on the host — the budget-respecting WC, its C candidate entries and the 1 + C
variant rows the base scores — depends only on (seed, step, prefix), not on the model. :class:`LensPlanner` is that
function, picklable, so a DataLoader worker prepares step ``s + 1``'s plan while the accelerator runs step ``s``
(``lensnet.plan_workers``); on a GPU the step is launch-bound and this host work was 10-15 % of it. The step and the
worker call the same planner with the same seeds, so a prepared plan is exactly the one the step would build.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from mchar.core.entries import Entry
from mchar.lit import windows as W


def perturb(entries: list[Entry], i: int, block_size: int) -> list[Entry]:
    """Entry ``i`` one step finer (gist -> children) or coarser (raw block -> its LOD1 gist)."""
    e = entries[i]
    repl = e.children(block_size) if e.level > 0 else [e.parent(block_size)]
    return [*entries[:i], *repl, *entries[i + 1 :]]


@dataclass
class LensPlan:
    """One step's WC (``entries``), its candidate indices (``cand``, sorted), the WC's and its variants' rows for
    ONE window (``rows``: row 0 the WC, row ``1 + j`` candidate ``j`` perturbed) and each candidate's utility sign
    (+1 a gist, whose gain is expanding it; -1 a raw block, whose gain is keeping it raw)."""

    entries: list[Entry]
    cand: np.ndarray
    rows: W.Rows
    cand_index: torch.Tensor
    sign: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> LensPlan:
        """On ``device`` (Lightning moves a batch's plan with its ids through this)."""
        return replace(
            self,
            rows=self.rows.to(device, non_blocking),
            cand_index=self.cand_index.to(device, non_blocking=non_blocking),
            sign=self.sign.to(device, non_blocking=non_blocking),
        )

    def pin_memory(self) -> LensPlan:
        """Page-locked copies (``DataLoader(pin_memory=True)``), so the move to the GPU can overlap compute."""
        return replace(
            self,
            rows=self.rows.pin_memory(),
            cand_index=self.cand_index.pin_memory(),
            sign=self.sign.pin_memory(),
        )


@dataclass(frozen=True)
class LensPlanner:
    """Draws a step's WC and candidates and builds their variant rows: a pure function of (seed, step, prefix)."""

    block_size: int
    depth: int
    budget: int
    horizon: int
    candidates: int
    random_edits: int
    random_fill: float
    seed: int
    position_mode: str = "centre"

    def sample(self, step: int, prefix: int, kind: str | None = None) -> tuple[list[Entry], np.ndarray]:
        """A WC and its C candidates: ``kind`` "fill" (:func:`~mchar.lit.windows.random_fill_wc`), "recent"
        (:func:`~mchar.lit.windows.random_wc`), or None = "fill" with probability ``random_fill`` (training)."""
        gen = np.random.default_rng(W.step_seed(self.seed, step, 11))
        shape = W.WindowShape(self.block_size, self.depth, prefix)
        fill = self.random_fill
        if kind == "fill" or (kind is None and fill > 0 and gen.random() < fill):
            wc = W.random_fill_wc(shape, self.budget, gen)
        else:
            wc = W.random_wc(shape, self.budget, gen, self.random_edits)
        return self.pick(list(wc.entries), gen)

    def pick(self, entries: list[Entry], gen: np.random.Generator) -> tuple[list[Entry], np.ndarray]:
        """``entries`` and C of their indices (sorted), the ones whose utilities a step measures."""
        c = min(self.candidates, len(entries))
        return entries, np.sort(gen.choice(len(entries), size=c, replace=False))

    def variant_rows(self, entries: list[Entry], cand: np.ndarray, prefix: int) -> W.Rows:
        """Rows (host) of the WC and its C one-entry variants for one window; the raw horizon closes each."""
        offs = W.bank_offsets(prefix + self.horizon, prefix, self.block_size, self.depth)
        layouts = [list(entries)] + [perturb(entries, int(i), self.block_size) for i in cand]
        slots = W.layouts_slots(layouts, self.block_size, offs, self.position_mode)
        return W.build_rows([(0, *s) for s in slots], prefix, self.horizon)

    def plan(self, entries: list[Entry], cand: np.ndarray, prefix: int) -> LensPlan:
        sign = [1.0 if entries[int(i)].level > 0 else -1.0 for i in cand]
        return LensPlan(
            entries,
            cand,
            self.variant_rows(entries, cand, prefix),
            torch.from_numpy(np.asarray(cand, dtype=np.int64)),
            torch.tensor(sign),
        )

    def __call__(self, step: int, ids: torch.Tensor) -> LensPlan:
        """The plan of training step ``step`` for a batch of windows ``ids`` (only their length matters)."""
        prefix = W.prefix_len(ids.shape[1], self.horizon, self.block_size)
        return self.plan(*self.sample(step, prefix), prefix)

    @classmethod
    def of(cls, hparams: Any) -> LensPlanner:
        """The planner of a LensNet module's hyper-parameters."""
        return cls(
            hparams.block_size,
            hparams.depth,
            hparams.budget,
            hparams.horizon,
            hparams.candidates,
            hparams.random_edits,
            hparams.random_fill,
            hparams.seed,
            hparams.position_mode,
        )
