"""Held-out batches split between DDP ranks: every window once, single-process batch indices, equal counts."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from mchar.lit.windows import RankBatches, chunk_windows, global_batch_index


@given(n=st.integers(1, 40), batch=st.integers(1, 6), world=st.integers(1, 5))
def test_rank_batches_cover_every_batch_once_at_its_global_index(n: int, batch: int, world: int) -> None:
    windows = torch.arange(n * 3).reshape(n, 3)
    whole = chunk_windows(windows, batch)
    shares = [list(RankBatches(windows, batch, rank, world)) for rank in range(world)]
    assert len({len(s) for s in shares}) == 1  # every rank validates as many batches (padding included)
    seen = {}
    for rank, share in enumerate(shares):
        for local, b in enumerate(share):
            if b.shape[0] == 0:  # padding: scores nothing
                assert b.shape[1] == 3
                continue
            g = global_batch_index(local, rank, world)
            assert g not in seen and torch.equal(b, whole[g])
            seen[g] = b
    assert sorted(seen) == list(range(len(whole)))


@given(
    seed=st.integers(0, 10_000),
    n_layouts=st.integers(1, 6),
    mode=st.sampled_from(["centre", "start", "end"]),
    windows=st.integers(1, 4),
)
def test_layouts_slots_and_per_window_rows_match_one_layout_at_a_time(
    seed: int, n_layouts: int, mode: str, windows: int
) -> None:
    """The vectorised slots of several layouts equal :func:`prefix_slots` of each; rows built once and repeated per
    window equal rows built for every (window, layout) pair."""
    import numpy as np

    from mchar.lit.windows import bank_offsets, build_rows, layouts_slots, prefix_slots, random_layout

    k, depth, prefix, horizon = 4, 2, 64, 4
    gen = np.random.default_rng(seed)
    layouts = [random_layout(prefix, k, depth, gen) for _ in range(n_layouts)]
    offs = bank_offsets(prefix + horizon, prefix, k, depth)
    together = layouts_slots(layouts, k, offs, mode)
    alone = [prefix_slots(layout, k, offs, mode) for layout in layouts]
    assert len(together) == len(alone)
    for (b1, p1), (b2, p2) in zip(together, alone, strict=True):
        assert np.array_equal(b1, b2) and np.array_equal(p1, p2)
    shared = build_rows([(0, b, p) for b, p in alone], prefix, horizon).per_window(windows)
    each = build_rows([(w, b, p) for b, p in alone for w in range(windows)], prefix, horizon)
    for name in ("batch", "bank_idx", "positions", "mask"):
        assert torch.equal(getattr(shared, name), getattr(each, name)), name
