"""Held-out batches split between DDP ranks, variant gains, and LensNet's entry features (raw blocks as means or gists)."""

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


def test_entry_features_read_raw_blocks_as_their_mean_or_their_lod1_gist() -> None:
    from mchar.core.entries import Entry
    from mchar.lit.windows import entry_features

    k, prefix, d = 4, 32, 6
    g = torch.Generator().manual_seed(0)
    tok = torch.randn(2, prefix + 8, d, generator=g)
    gists = [torch.randn(2, prefix // k, d, generator=g), torch.randn(2, prefix // k**2, d, generator=g)]
    rows = [[Entry(2, 0), Entry(1, 4), Entry(1, 5), Entry(0, 6), Entry(0, 7)], [Entry(0, 0), Entry(2, 1)]]
    mean = entry_features(rows, [1, 0], tok, gists, k, prefix)
    gist = entry_features(rows, [1, 0], tok, gists, k, prefix, raw="gist")
    for part_m, part_g in zip(mean[1:], gist[1:], strict=True):
        assert torch.equal(part_m, part_g)  # levels, widths, distances, mask: the same either way
    for r, (b, ents) in enumerate(zip([1, 0], rows, strict=True)):
        for j, e in enumerate(ents):
            if e.level == 0:
                assert torch.allclose(mean[0][r, j], tok[b, e.index * k : (e.index + 1) * k].mean(0))
                assert torch.allclose(gist[0][r, j], gists[0][b, e.index])
            else:
                assert torch.equal(mean[0][r, j], gists[e.level - 1][b, e.index])
                assert torch.equal(gist[0][r, j], mean[0][r, j])
