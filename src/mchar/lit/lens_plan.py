"""The host-side half of a LensNet training step: its *plan*.

Everything a LensNet step builds on the host — the budget-respecting WC, its C candidate entries and the 1 + C
variant rows the base scores — depends only on (seed, step, prefix), not on the model: :class:`LensPlanner` is that
function (validation and the probes draw their WCs from it too). On a GPU the step is launch-bound and this host
work is what ``bench train-step`` counts as loss construction, so the planner is built for it: the variants' slots
are spliced from the WC's own (one :func:`~mchar.lit.windows.prefix_slots` for the WC, one for every candidate's
replacement entries), the rows are filled with one masked assignment, the recency-first cover of a prefix is made
once, and the plan goes to the device as ONE int64 buffer (pageable host-to-device copies each block the host).

Preparing plans in DataLoader worker processes was tried and measured: receiving a batch from a worker cost the
main process 1.2 ms (ids alone) to 2.4 ms (with its plan) on the 2-core host, more than building the plan, and
steps/s fell to 0.93x (CPU) and 0.94x / 0.89x (H200, one / two workers).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from mchar.core.allocator import initial_context
from mchar.core.entries import Entry
from mchar.core.working_context import WorkingContext
from mchar.lit import windows as W


def perturb(entries: list[Entry], i: int, block_size: int) -> list[Entry]:
    """Entry ``i`` one step finer (gist -> children) or coarser (raw block -> its LOD1 gist)."""
    e = entries[i]
    return [*entries[:i], *replacement(e, block_size), *entries[i + 1 :]]


def replacement(e: Entry, block_size: int) -> list[Entry]:
    """What a candidate becomes in its variant: a gist's children, a raw block's LOD1 gist."""
    return e.children(block_size) if e.level > 0 else [e.parent(block_size)]


@dataclass
class LensPlan:
    """One step's WC per window (``entries``), each window's candidate indices (``cand`` ``[B, C]``, sorted) and,
    packed in ONE int64 tensor, the rows of the WCs and their variants (variant-major, windows inner: rows
    ``0..B-1`` the WCs, row ``(1 + j) * B + w`` window ``w``'s candidate ``j`` perturbed), the candidates' indices
    and their utility signs (+1 a gist, whose gain is expanding it; -1 a raw block, whose gain is keeping it raw).
    Most steps share one WC across the batch (``entries`` then holds the same list B times); on-policy and settle
    steps give every window its own."""

    entries: list[list[Entry]]
    cand: np.ndarray
    # [batch (R) | bank idx (R*L) | positions (R*L) | mask (R*L) | cand (B*C) | sign (B*C)]
    packed: torch.Tensor
    n_rows: int
    width: int

    @property
    def windows(self) -> int:
        return len(self.entries)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> LensPlan:
        """On ``device``: one copy."""
        return replace(self, packed=self.packed.to(device, non_blocking=non_blocking))

    def _parts(self) -> list[torch.Tensor]:
        r, n, c = self.n_rows, self.n_rows * self.width, self.cand.size
        return list(self.packed.split([r, n, n, n, c, c]))

    @property
    def rows(self) -> W.Rows:
        batch, idx, pos, mask, _, _ = self._parts()
        shape = (self.n_rows, self.width)
        return W.Rows(batch, idx.view(shape), pos.view(shape), mask.view(shape).bool())

    @property
    def cand_index(self) -> torch.Tensor:
        """``[B, C]`` each window's candidate entry indices (gather LensNet's scores with it)."""
        return self._parts()[4].view(self.cand.shape)

    @property
    def sign(self) -> torch.Tensor:
        """``[B, C]`` each candidate's utility sign."""
        return self._parts()[5].view(self.cand.shape).float()


def _packed_plan(
    entries: list[list[Entry]], cand: np.ndarray, grid: np.ndarray, mask: np.ndarray, sign: np.ndarray
) -> LensPlan:
    """A plan from its per-window WCs and candidates ``[B, C]``, its rows' (bank index, position) ``grid [2, R, L]``
    (variant-major, windows inner) and ``mask [R, L]``, and the candidates' signs ``[B, C]``."""
    b = len(entries)
    batch = np.tile(np.arange(b, dtype=np.int64), grid.shape[1] // b)
    packed = np.concatenate([batch, grid.reshape(-1), mask.reshape(-1), cand.reshape(-1), sign.reshape(-1)])
    return LensPlan(entries, cand, torch.from_numpy(packed), len(batch), grid.shape[2])


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
    _covers: dict = field(default_factory=dict, compare=False, repr=False)

    def cover(self, prefix: int, expand_recent: bool) -> WorkingContext:
        """A fresh copy of ``initial_context`` at the budget (made once per prefix and kind)."""
        key = (prefix, expand_recent)
        if key not in self._covers:
            shape = W.WindowShape(self.block_size, self.depth, prefix)
            self._covers[key] = initial_context(shape, self.budget, expand_recent=expand_recent)
        return self._covers[key].copy()

    def sample(self, step: int, prefix: int, kind: str | None = None) -> tuple[list[Entry], np.ndarray]:
        """A WC and its C candidates: ``kind`` "fill" (:func:`~mchar.lit.windows.random_fill_wc`), "recent"
        (:func:`~mchar.lit.windows.random_wc`), or None = "fill" with probability ``random_fill`` (training)."""
        gen = np.random.default_rng(W.step_seed(self.seed, step, 11))
        shape = W.WindowShape(self.block_size, self.depth, prefix)
        fill = self.random_fill
        if kind == "fill" or (kind is None and fill > 0 and gen.random() < fill):
            wc = W.random_fill_wc(shape, self.budget, gen, start=self.cover(prefix, expand_recent=False))
        else:
            wc = W.random_wc(
                shape, self.budget, gen, self.random_edits, start=self.cover(prefix, expand_recent=True)
            )
        return self.pick(list(wc.entries), gen)

    def pick(
        self, entries: list[Entry], gen: np.random.Generator, most: int | None = None
    ) -> tuple[list[Entry], np.ndarray]:
        """``entries`` and C of their indices (sorted), the ones whose utilities a step measures: ``candidates``,
        or ``most`` if fewer, or all of them if fewer still."""
        c = min(self.candidates, len(entries), most or len(entries))
        return entries, np.sort(gen.choice(len(entries), size=c, replace=False))

    def plan(self, entries: list[Entry], cand: np.ndarray, prefix: int, windows: int = 1) -> LensPlan:
        """The plan of a WC and its candidates for ``windows`` windows: left-padded rows, the raw horizon closing
        each (repeated per window here, on the host: no per-window kernels on the device).

        A variant's prefix slots are the WC's with the candidate's span replaced by its replacement's (a slot
        depends on its own entry only), so every row is four ranges of one source (WC slots, all replacements'
        slots, the horizon): [0, s) of the WC, the replacement, [t, n) of the WC, the horizon, gathered at once."""
        k, c = self.block_size, len(cand)
        offs = W.bank_offsets(prefix + self.horizon, prefix, k, self.depth)
        repl = [replacement(entries[int(i)], k) for i in cand]
        flat = [*entries, *(e for r in repl for e in r)]
        bank, pos = W.prefix_slots(flat, k, offs, self.position_mode)
        sizes = np.array([k if e.level == 0 else 1 for e in flat])
        ends = np.cumsum(sizes)
        n = int(ends[len(entries) - 1])  # the WC's own slots; the replacements' follow
        h = np.arange(prefix, prefix + self.horizon, dtype=np.int64)
        bank, pos = np.concatenate([bank, h]), np.concatenate([pos, h])
        src_h = len(bank) - self.horizon
        ci = np.asarray(cand, dtype=np.int64)
        s = np.where(ci > 0, ends[np.maximum(ci - 1, 0)], 0)  # the candidate's slot span [s, t) in the WC
        t = ends[ci]
        r_end = ends[len(entries) - 1 + np.cumsum([len(r) for r in repl])]
        r_start = np.concatenate([[n], r_end[:-1]])
        # four (source start, length) ranges per row; row 0 = the WC: [0, n), nothing, nothing, horizon
        starts = np.zeros((c + 1, 4), dtype=np.int64)
        lens = np.zeros((c + 1, 4), dtype=np.int64)
        starts[1:, 1], starts[1:, 2], starts[:, 3] = r_start, t, src_h
        lens[0, 0], lens[:, 3] = n, self.horizon
        lens[1:, 0], lens[1:, 1], lens[1:, 2] = s, r_end - r_start, n - t
        starts, lens = starts.reshape(-1), lens.reshape(-1)
        src = np.repeat(starts - (np.cumsum(lens) - lens), lens) + np.arange(lens.sum())
        row_len = lens.reshape(c + 1, 4).sum(1)
        width = int(row_len.max())
        mask = np.arange(width)[None, :] >= (width - row_len)[:, None]  # each row's slots: its right end
        grid = np.zeros((2, c + 1, width), dtype=np.int64)
        grid[0][mask], grid[1][mask] = bank[src], pos[src]
        grid, mask = np.repeat(grid, windows, axis=1), np.repeat(mask, windows, axis=0)
        sign = np.where(np.fromiter((entries[i].level for i in ci), np.int64, count=c) > 0, 1, -1)
        tiled_cand, tiled_sign = np.tile(ci, (windows, 1)), np.tile(sign, (windows, 1))
        return _packed_plan([entries] * windows, tiled_cand, grid, mask, tiled_sign)

    def plan_windows(self, picks: list[tuple[list[Entry], np.ndarray]], prefix: int) -> LensPlan:
        """The plan of one WC and candidate set per window (``picks[w]`` for window ``w``; every window the same
        number of candidates): each window's rows as :meth:`plan` builds them, interleaved variant-major and
        left-padded to the widest."""
        sizes = {len(c) for _, c in picks}
        if len(sizes) != 1:
            raise ValueError(f"every window needs the same number of candidates, got {sorted(sizes)}")
        own = [self.plan(entries, cand, prefix) for entries, cand in picks]
        b, c, width = len(own), sizes.pop(), max(p.width for p in own)
        grid = np.zeros((2, c + 1, b, width), dtype=np.int64)
        mask = np.zeros((c + 1, b, width), dtype=bool)
        for w, p in enumerate(own):
            rows = p.rows
            grid[0, :, w, width - p.width :] = rows.bank_idx.numpy()
            grid[1, :, w, width - p.width :] = rows.positions.numpy()
            mask[:, w, width - p.width :] = rows.mask.numpy()
        return _packed_plan(
            [p.entries[0] for p in own],
            np.stack([p.cand[0] for p in own]),
            grid.reshape(2, (c + 1) * b, width),
            mask.reshape((c + 1) * b, width),
            np.stack([p.sign[0].long().numpy() for p in own]),
        )

    def __call__(self, step: int, ids: torch.Tensor) -> LensPlan:
        """The plan of training step ``step`` for a batch of windows ``ids``."""
        prefix = W.prefix_len(ids.shape[1], self.horizon, self.block_size)
        return self.plan(*self.sample(step, prefix), prefix, windows=ids.shape[0])

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
