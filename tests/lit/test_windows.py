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
