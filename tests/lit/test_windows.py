"""Held-out batches split between DDP ranks: every window once, single-process batch indices, equal counts."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from mchar.lit.windows import RankBatches, chunk_windows, global_batch_index, token_kl, variant_cross_entropy


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


@given(st.integers(1, 3), st.integers(1, 4), st.integers(0, 2**16))
def test_variant_cross_entropy_gains_are_the_kl_gains(windows: int, variants: int, seed: int) -> None:
    """Rows stacked window-inner: per row, KL to its window's teacher plus that window's teacher entropy, so gains
    between rows of one window equal the KL gains."""
    gen = torch.Generator().manual_seed(seed)
    teacher = 3 * torch.randn(windows, 5, 11, generator=gen)
    student = 3 * torch.randn(variants * windows, 5, 11, generator=gen)
    batch = torch.arange(windows).repeat(variants)
    ce = variant_cross_entropy(teacher, student)
    logp = torch.log_softmax(teacher, -1)
    entropy = -(logp.exp() * logp).sum(-1)
    torch.testing.assert_close(ce, token_kl(teacher[batch], student) + entropy[batch], atol=1e-5, rtol=1e-5)
