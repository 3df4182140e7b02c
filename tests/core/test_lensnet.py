"""LensNet: bidirectional, padding mask respected, batch == loop, tail matters, export round trip."""

from __future__ import annotations

import pytest
import torch

from mchar.core.lensnet import LensNet, entry_embedding, from_pretrained

D = 32


def _inputs(w: int = 6, t: int = 5, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(w, D, generator=g) * 0.02
    levels = torch.randint(0, 3, (w,), generator=g)
    widths = torch.tensor([8 ** max(int(lv), 1) for lv in levels])
    distances = torch.arange(w, 0, -1) * 8.0
    tail = torch.randn(t, D, generator=g) * 0.02
    return embeds, levels, widths, distances, tail


def _net() -> LensNet:
    torch.manual_seed(0)
    return LensNet(D, width=32, n_layers=2, n_heads=4, max_level=2, tail_tokens=8).eval()


def test_shape_and_bidirectional() -> None:
    net = _net()
    e, lv, wd, ds, tail = _inputs()
    s = net(e, lv, wd, ds, tail)
    assert s.shape == (6,)
    e2 = e.clone()
    e2[-1] += 0.05
    assert not torch.allclose(s[0], net(e2, lv, wd, ds, tail)[0]), "entry 0 must see the last entry"
    tail2 = tail.clone()
    tail2[-1] += 0.05
    assert not torch.allclose(s[0], net(e, lv, wd, ds, tail2)[0]), "scores must depend on the tail"
    assert net(e, lv, wd, ds, None).shape == (6,)


def test_padding_mask_and_batch_equals_loop() -> None:
    net = _net()
    samples = [_inputs(w, t, seed=w) for w, t in [(6, 5), (3, 2), (4, 0)]]
    bw, bt = 6, 5
    embeds = torch.zeros(3, bw, D)
    levels = torch.zeros(3, bw, dtype=torch.long)
    widths = torch.ones(3, bw)
    dists = torch.zeros(3, bw)
    tails = torch.zeros(3, bt, D)
    mask = torch.zeros(3, bw, dtype=torch.bool)
    tmask = torch.zeros(3, bt, dtype=torch.bool)
    for i, (e, lv, wd, ds, tail) in enumerate(samples):
        w, t = e.shape[0], tail.shape[0]
        embeds[i, :w], levels[i, :w], widths[i, :w], dists[i, :w], mask[i, :w] = e, lv, wd, ds, True
        if t:
            tails[i, bt - t :], tmask[i, bt - t :] = tail, True  # left-padded tail
    # garbage in the padding must not leak into real scores
    embeds[~mask] = 7.0
    tails[~tmask] = -3.0
    batch = net(embeds, levels, widths, dists, tails, mask=mask, tail_mask=tmask)
    for i, (e, lv, wd, ds, tail) in enumerate(samples):
        w = e.shape[0]
        single = net(e, lv, wd, ds, tail if tail.shape[0] else None)
        torch.testing.assert_close(batch[i, :w], single, atol=1e-5, rtol=1e-4)
        assert torch.all(batch[i, w:] == 0)


def test_gradients_and_round_trip(tmp_path) -> None:
    net = _net().train()
    e, lv, wd, ds, tail = _inputs()
    net(e, lv, wd, ds, tail).pow(2).sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    net.save_pretrained(tmp_path / "lens")
    again = from_pretrained(tmp_path / "lens").eval()
    net.eval()
    assert again.config_dict() == net.config_dict()
    assert torch.equal(net(e, lv, wd, ds, tail), again(e, lv, wd, ds, tail))


def test_entry_embedding_convention() -> None:
    block = torch.randn(8, D)
    assert torch.allclose(entry_embedding(0, block), block.mean(0))
    gist = torch.randn(1, D)
    assert torch.equal(entry_embedding(2, gist), gist[0])


def test_query_similarity_feature_reads_the_newest_valid_tail_tokens(tmp_path) -> None:
    from mchar.core.lensnet import query_similarity

    e, lv, wd, ds, tail = _inputs(w=6, t=5)
    sim = query_similarity(e[None], tail[None], None, 3)
    want = torch.nn.functional.cosine_similarity(e, tail[-3:].mean(0, keepdim=True), dim=-1)
    assert torch.allclose(sim[0], want, atol=1e-6)
    # left padding does not move the query: pad two junk columns in front, masked out
    padded = torch.cat([torch.randn(2, D) * 5, tail[-2:]])[None]
    mask = torch.tensor([[False, False, True, True]])
    assert torch.allclose(
        query_similarity(e[None], padded, mask, 3)[0],
        torch.nn.functional.cosine_similarity(e, tail[-2:].mean(0, keepdim=True), dim=-1),
        atol=1e-6,
    )
    assert torch.equal(query_similarity(e[None], None, None, 3), torch.zeros(1, 6))
    torch.manual_seed(0)
    net = LensNet(D, width=32, n_layers=1, n_heads=4, max_level=2, tail_tokens=8, query_tokens=3).eval()
    assert net.features[0].in_features == 3
    s = net(e, lv, wd, ds, tail)
    net.save_pretrained(tmp_path / "q")
    back = from_pretrained(tmp_path / "q")
    assert back.query_tokens == 3 and torch.allclose(back(e, lv, wd, ds, tail), s)
    with torch.no_grad():  # the feature reaches the score: a different query, a different score
        assert not torch.allclose(net(e, lv, wd, ds, -tail), s)


def test_recency_prior_ranks_an_untrained_lensnet_like_recency(tmp_path) -> None:
    """With the prior, newer entries score higher before any training; it exports, reloads, and 0 = no path."""
    from torchmetrics.functional import spearman_corrcoef

    torch.manual_seed(0)
    w = 40
    e, lv, wd = torch.randn(w, D), torch.zeros(w, dtype=torch.long), torch.full((w,), 8)
    ds = torch.arange(w - 1, -1, -1) * 8  # oldest first, the newest entry ends at the cursor
    net = LensNet(D, width=32, n_layers=1, n_heads=4, max_level=2, recency_prior=1.0).eval()
    plain = LensNet(D, width=32, n_layers=1, n_heads=4, max_level=2).eval()
    assert plain.prior is None and "prior.weight" not in plain.state_dict()
    with torch.no_grad():
        s = net(e, lv, wd, ds)
    assert spearman_corrcoef(s, -ds.float()) > 0.9
    net.save_pretrained(tmp_path / "p")
    back = from_pretrained(tmp_path / "p")
    assert back.recency_prior == 1.0 and torch.equal(back(e, lv, wd, ds), s)
    with pytest.raises(ValueError, match="recency_prior"):
        LensNet(D, recency_prior=-1.0)


def test_similarity_prior_lifts_the_entry_that_matches_the_query(tmp_path) -> None:
    """With a similarity prior an untrained LensNet ranks the far entry equal to the query above the recent ones
    (the recency prior alone keeps it at the bottom); it exports, reloads, and needs the features it weighs."""
    torch.manual_seed(0)
    w = 12
    e, lv, wd = torch.randn(w, D), torch.zeros(w, dtype=torch.long), torch.full((w,), 8)
    ds = torch.arange(w - 1, -1, -1) * 8
    tail = e[0:1].repeat(4, 1)  # the query repeats the OLDEST entry
    kw = dict(width=32, n_layers=1, n_heads=4, max_level=2, tail_tokens=4, query_tokens=4, recency_prior=0.5)
    with torch.no_grad():
        for layer in (recency := LensNet(D, **kw).eval()).score[-1:]:
            layer.weight.zero_()  # isolate the prior path: the learned head starts at ~0 anyway
        both = LensNet(D, **kw, similarity_prior=4.0).eval()
        both.load_state_dict(recency.state_dict() | {"prior.weight": both.prior.weight.clone()})
        assert recency(e, lv, wd, ds, tail).argmin() == 0
        assert both(e, lv, wd, ds, tail).argmax() == 0
    both.save_pretrained(tmp_path / "s")
    assert from_pretrained(tmp_path / "s").similarity_prior == 4.0
    with pytest.raises(ValueError, match="similarity_prior"):
        LensNet(D, query_tokens=0, recency_prior=0.5, similarity_prior=1.0)


def test_lexical_prior_lifts_the_entry_that_holds_the_query_tokens(tmp_path) -> None:
    """The lexical match is z-scored per row over real entries (its scale does not matter, padding stays out);
    with a lexical prior an untrained LensNet ranks the far entry holding the query's tokens first; a LensNet built
    to read it refuses to score without it; it exports and reloads."""
    torch.manual_seed(0)
    w = 12
    e, lv, wd = torch.randn(w, D), torch.zeros(w, dtype=torch.long), torch.full((w,), 8)
    ds = torch.arange(w - 1, -1, -1) * 8
    lex = torch.zeros(w)
    lex[0] = 3.0  # only the OLDEST entry holds the query's rare tokens
    kw = dict(width=32, n_layers=1, n_heads=4, max_level=2, recency_prior=0.5, lexical_tokens=8)
    net = LensNet(D, **kw, lexical_prior=4.0, lexical_follow=1).eval()
    with torch.no_grad():
        net.score[-1].weight.zero_()  # the prior path alone
        s = net(e, lv, wd, ds, lexical=lex)
        assert s.argmax() == 0
        assert torch.allclose(net(e, lv, wd, ds, lexical=lex * 10 + 5), s, atol=1e-5)  # z-scored: scale-free
        pad = torch.ones(2, w + 3, dtype=torch.bool)
        pad[0, w:] = False
        batch = [torch.stack([torch.cat([x, x[:3]])] * 2) for x in (e, lv, wd, ds)]
        padded = net(*batch, mask=pad, lexical=torch.cat([lex, torch.full((3,), 99.0)]).expand(2, -1))
        assert torch.allclose(
            padded[0, :w], s, atol=1e-5
        )  # padding's lexical values never reach real entries
    with pytest.raises(ValueError, match="pass lexical="):
        net(e, lv, wd, ds)
    net.save_pretrained(tmp_path / "x")
    back = from_pretrained(tmp_path / "x")
    assert (back.lexical_tokens, back.lexical_prior, back.lexical_lookback, back.lexical_follow) == (
        8,
        4.0,
        1,
        1,
    )
    assert (back.lexical_idf_power, back.lexical_max_df) == (1.0, None)
    sharp = LensNet(D, **kw, lexical_idf_power=3.0, lexical_max_df=4)
    sharp.save_pretrained(tmp_path / "y")
    back = from_pretrained(tmp_path / "y")
    assert (back.lexical_idf_power, back.lexical_max_df) == (3.0, 4)
    with pytest.raises(ValueError, match="lexical_max_df"):
        LensNet(D, **kw, lexical_max_df=0)
    gist_reader = LensNet(D, **kw, raw_embedding="gist")
    gist_reader.save_pretrained(tmp_path / "z")
    assert from_pretrained(tmp_path / "z").raw_embedding == "gist"
    assert back.raw_embedding == "mean"
    with pytest.raises(ValueError, match="raw_embedding"):
        LensNet(D, **kw, raw_embedding="cls")
    from mchar import config
    from mchar.core.lensnet import RAW_EMBEDDINGS

    assert (
        RAW_EMBEDDINGS == config.LENSNET_RAW_EMBEDDINGS
    )  # the config check allows exactly what LensNet reads
    with pytest.raises(ValueError, match="lexical_prior"):
        LensNet(D, recency_prior=0.5, lexical_prior=1.0)


def test_an_ensemble_scores_the_mean_of_its_members_z_scores_and_round_trips(tmp_path) -> None:
    """Per-WC z-scored members averaged (a LensNet is defined up to shift and scale); batched rows with padding
    score as each row alone; the export reloads by its kind; members reading other inputs are refused."""
    from mchar.core.lensnet import LensNetEnsemble, standardise_rows

    torch.manual_seed(1)
    a, b = _net(), LensNet(D, width=32, n_layers=1, n_heads=4, max_level=2, tail_tokens=8).eval()
    ens = LensNetEnsemble([a, b]).eval()
    e, lv, wd, ds, tail = _inputs()
    want = (
        standardise_rows(a(e, lv, wd, ds, tail)[None]) + standardise_rows(b(e, lv, wd, ds, tail)[None])
    ) / 2
    torch.testing.assert_close(ens(e, lv, wd, ds, tail), want[0])
    e2, lv2, wd2, ds2, tail2 = _inputs(w=4, seed=1)
    pad = lambda x, y: torch.stack([x, torch.cat([y, torch.zeros_like(x[: len(x) - len(y)])])])  # noqa: E731
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    rows = ens(pad(e, e2), pad(lv, lv2), pad(wd, wd2), pad(ds, ds2), torch.stack([tail, tail2]), mask=mask)
    torch.testing.assert_close(rows[0], ens(e, lv, wd, ds, tail))
    torch.testing.assert_close(rows[1, :4], ens(e2, lv2, wd2, ds2, tail2))
    assert torch.equal(rows[1, 4:], torch.zeros(2))
    ens.save_pretrained(tmp_path / "ens")
    back = from_pretrained(tmp_path / "ens")
    assert isinstance(back, LensNetEnsemble) and len(back.members) == 2
    torch.testing.assert_close(back.eval()(e, lv, wd, ds, tail), ens(e, lv, wd, ds, tail))
    a.save_pretrained(tmp_path / "one")
    assert type(from_pretrained(tmp_path / "one")) is LensNet
    assert (ens.raw_embedding, ens.tail_tokens, ens.d_model) == ("mean", 8, D)
    other = LensNet(D, width=32, n_layers=1, n_heads=4, max_level=2, tail_tokens=16)
    with pytest.raises(ValueError, match="members read different inputs .tail_tokens"):
        LensNetEnsemble([a, other])
