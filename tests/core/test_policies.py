"""Policies: registry, truncation builds, score shapes/signs, lensnet wrapping, batched oracle."""

from __future__ import annotations

import pytest
import torch

from mchar.core.allocator import FocusAllocator, initial_context
from mchar.core.entries import Entry
from mchar.core.policies import POLICIES, PolicyContext, QueryBlendPolicy, make_policy, standardise
from mchar.core.working_context import WorkingContext

from .test_working_context import FakeTree


def test_registry_and_unknown_name() -> None:
    from mchar import config

    # the names configs may use (checked without importing torch) are exactly the ones the core can build
    assert set(POLICIES) == set(config.POLICIES) >= {"recency", "sink_recent", "lensnet", "oracle"}
    with pytest.raises(ValueError, match=r"unknown policy 'x' \(available: attention, gists_only, lensnet"):
        make_policy("x")


def test_recency_keeps_only_recent_raw_and_drops_the_rest() -> None:
    tree = FakeTree(4, 2, 70)
    pol = make_policy("recency")
    wc = pol.build(tree, 30)
    wc.validate(tree)
    assert pol.allows_drop and wc.cost == 30 - 2 + 2 == 30 and wc.tail_len == 2
    live = [e for e, d in zip(wc.entries, wc.dropped, strict=True) if not d]
    assert live == [Entry(0, b) for b in range(10, 17)]
    assert wc.dropped_tokens == 40 and wc.telemetry()["dropped_tokens"] == 40
    assert wc.slot_map()[0] == (0, 40)


def test_sink_recent_keeps_first_block() -> None:
    tree = FakeTree(4, 2, 70)
    wc = make_policy("sink_recent", sink_blocks=1).build(tree, 30)
    wc.validate(tree)
    live = [e for e, d in zip(wc.entries, wc.dropped, strict=True) if not d]
    assert live[0] == Entry(0, 0) and live[1:] == [Entry(0, b) for b in range(11, 17)]
    assert wc.cost <= 30


def test_tree_recency_covers_everything_and_spends_the_budget_on_the_newest_blocks() -> None:
    tree = FakeTree(4, 2, 70)
    pol = make_policy("tree_recency")
    assert not pol.allows_drop and pol.relative_scores
    wc = pol.build(tree, 30)
    fill = FocusAllocator(tau_expand=-float("inf"), tau_collapse=float("inf"), max_edits=50)
    for _ in range(4):
        fill.refocus(wc, pol.scores(wc, tree))
    wc.validate(tree)
    assert not any(wc.dropped) and wc.cost <= 30
    raw = [e.index for e in wc.entries if e.level == 0]
    full_blocks = 70 // 4
    # the raw blocks are exactly the newest ones, and no further block fits raw
    assert raw == list(range(full_blocks - len(raw), full_blocks)) and len(raw) >= 3
    assert wc.cost + 3 > 30 or all(e.level == 0 for e in wc.entries)


def test_gists_only_never_expands_and_collapses_raw() -> None:
    tree = FakeTree(4, 2, 70)
    pol = make_policy("gists_only")
    wc = pol.build(tree, 30)
    assert all(e.level >= 1 for e in wc.entries)
    alloc = FocusAllocator(max_edits=50)
    wc = WorkingContext(4, 2, 100, 70, tree=tree)  # all raw
    scores = pol.scores(wc, tree)
    assert torch.all(scores < 0)
    alloc.refocus(wc, scores)
    assert all(e.level >= 1 for e in wc.entries)
    assert alloc.refocus(wc, pol.scores(wc, tree)) == []  # gists are left alone


def test_similarity_prefers_blocks_like_the_query() -> None:
    tree = FakeTree(4, 1, 40)
    tree.ids[8:12] = tree.ids[36:40]  # block 2 repeats the tail query exactly
    tree._build()
    wc = initial_context(tree, 10 + 3, expand_recent=False)
    s = make_policy("similarity").scores(wc, tree)
    assert s.shape == (len(wc),) and int(s[:-1].argmax()) == 2 and s.max() > 0 > s.min()


def test_query_blend_adds_weighted_z_scores_and_refuses_what_cannot_blend() -> None:
    """The settle's blend: z(policy) + w * z(query), z-scored again; weight 0 is the policy's own order."""
    tree = FakeTree(4, 1, 40)
    tree.ids[8:12] = tree.ids[36:40]  # block 2 repeats the tail query
    tree._build()
    wc = initial_context(tree, 10 + 3, expand_recent=False)
    recent, sim = make_policy("tree_recency"), make_policy("similarity")
    a, b = recent.scores(wc, tree), sim.scores(wc, tree)
    for w in (0.0, 0.5, 3.0):
        blend = QueryBlendPolicy(recent, sim, w)
        assert blend.name == "tree_recency" and blend.relative_scores and not blend.allows_drop
        assert torch.allclose(blend.scores(wc, tree), standardise(standardise(a) + w * standardise(b)))
    assert torch.equal(QueryBlendPolicy(recent, sim, 0.0).scores(wc, tree).argsort(), a.argsort())
    # a large weight ranks by the query: the block that repeats it comes first among the old ones
    assert int(QueryBlendPolicy(recent, sim, 50.0).scores(wc, tree)[:-1].argmax()) == 2
    with pytest.raises(ValueError, match="'recency' does not rank by relative scores"):
        QueryBlendPolicy(make_policy("recency"), sim, 1.0)
    with pytest.raises(ValueError, match="'gists_only' does not rank"):
        QueryBlendPolicy(make_policy("gists_only"), sim, 1.0)
    with pytest.raises(ValueError, match="weight must be >= 0"):
        QueryBlendPolicy(recent, sim, -1.0)
    with pytest.raises(ValueError, match="recency must be >= 0"):
        QueryBlendPolicy(recent, sim, 1.0, recency=-0.5)


def test_query_blend_recency_term_fills_newest_first() -> None:
    """``recency``: + r * z(recency ramp) inside the blend; a large r orders the entries newest first."""
    tree = FakeTree(4, 1, 40)
    tree.ids[8:12] = tree.ids[36:40]  # block 2 repeats the tail query
    tree._build()
    wc = initial_context(tree, 10 + 3, expand_recent=False)
    sim = make_policy("similarity")
    own, q = make_policy("random", seed=3).scores(wc, tree), sim.scores(wc, tree)
    ramp = make_policy("tree_recency").scores(wc, tree)
    for r in (0.0, 0.7, 2.0):
        blend = QueryBlendPolicy(make_policy("random", seed=3), sim, 1.0, recency=r).scores(wc, tree)
        expect = standardise(standardise(own) + standardise(q) + r * standardise(ramp))
        assert torch.allclose(blend, expect, atol=1e-6)
    flat = QueryBlendPolicy(make_policy("random", seed=3), sim, 0.0, recency=1e3).scores(wc, tree)
    assert torch.equal(flat.argsort(), ramp.argsort())


def test_random_is_seeded() -> None:
    tree = FakeTree(4, 1, 40)
    wc = initial_context(tree, 20)
    a = make_policy("random", seed=3).scores(wc, tree)
    b = make_policy("random", seed=3).scores(wc, tree)
    assert torch.equal(a, b) and a.abs().max() <= 1


def test_lensnet_policy_passes_features_and_works_with_real_lensnet() -> None:
    tree = FakeTree(4, 2, 70)
    wc = initial_context(tree, 30)
    seen = {}

    def fake(entry_embeds, levels, widths, distances, tail_embeds):  # noqa: ANN001, ANN202
        seen.update(e=entry_embeds, l=levels, w=widths, d=distances, t=tail_embeds)
        return -distances.float()

    s = make_policy("lensnet", lensnet=fake).scores(wc, tree)
    assert s.shape == (len(wc),) and seen["e"].shape == (len(wc), 8)
    assert seen["w"].tolist() == [e.width(4) for e in wc.entries]
    assert seen["d"][-1] == 70 - wc.entries[-1].end(4) and seen["t"].shape == (4, 8)
    from mchar.core.lensnet import LensNet

    net = LensNet(d_model=8, width=16, n_layers=1, n_heads=2, max_level=2, tail_tokens=4)
    s = make_policy("lensnet", lensnet=net).scores(wc, tree)
    assert s.shape == (len(wc),) and torch.isfinite(s).all()
    FocusAllocator().refocus(wc, s)
    assert wc.cost <= 30


def test_lensnet_scores_are_shift_and_scale_free() -> None:
    """A Bradley–Terry LensNet is defined up to shift/scale: the allocator must see the same decisions."""
    tree = FakeTree(4, 2, 70)
    wc = initial_context(tree, 30)

    def raw(entry_embeds, levels, widths, distances, tail_embeds):  # noqa: ANN001, ANN202
        return -distances.float()

    def shifted(*feats):  # noqa: ANN002, ANN202
        return 7.0 * raw(*feats) - 1000.0  # all far below -tau_collapse before standardising

    a = make_policy("lensnet", lensnet=raw).scores(wc, tree)
    b = make_policy("lensnet", lensnet=shifted).scores(wc, tree)
    assert torch.allclose(a, b, atol=1e-5)
    assert abs(float(a.mean())) < 1e-5 and abs(float(a.std()) - 1.0) < 1e-5
    wa, wb = initial_context(tree, 30), initial_context(tree, 30)
    FocusAllocator().refocus(wa, a)
    FocusAllocator().refocus(wb, b)
    assert list(wa.entries) == list(wb.entries)
    from mchar.core.policies import standardise

    assert standardise(torch.tensor([3.0])).tolist() == [0.0]
    assert standardise(torch.tensor([2.0, 2.0])).tolist() == [0.0, 0.0]
    nan = standardise(torch.tensor([float("nan"), 1.0, 3.0]))
    assert torch.isnan(nan[0]) and nan[1:].tolist() == pytest.approx([-0.7071, 0.7071], abs=1e-4)


def test_run_policy_rebuilds_truncation_and_refocuses_others() -> None:
    tree = FakeTree(4, 2, 70)
    wc = initial_context(tree, 30)
    alloc = FocusAllocator()
    new, edits = alloc.run_policy(wc, make_policy("recency"), tree)
    assert new is not wc and new.num_dropped > 0 and edits == []
    same, _ = alloc.run_policy(wc, make_policy("random", seed=0), tree)
    assert same is wc and wc.cost <= 30


@pytest.fixture(scope="module")
def base_lm():  # noqa: ANN201
    from mchar.base.adapter import FrozenBaseLM, tiny_causal_lm

    return FrozenBaseLM(tiny_causal_lm("llama", vocab_size=64, hidden_size=16, layers=1, heads=2))


def test_oracle_matches_unbatched_counterfactuals(base_lm) -> None:  # noqa: ANN001
    k = 4
    tree = FakeTree(k, 2, 42, d=16, vocab=64)
    tree.table = base_lm.embed(torch.arange(64)).detach()
    tree._build()
    wc = initial_context(tree, 20)
    fut = torch.randint(0, 64, (6,), generator=torch.Generator().manual_seed(0))
    ctx = PolicyContext(base_lm=base_lm, future_tokens=fut)
    scores = make_policy("oracle", batch_size=3).scores(wc, tree, ctx)
    assert scores.shape == (len(wc),) and torch.isfinite(scores).all()

    def horizon_nll(w: WorkingContext) -> float:
        emb, pos, _ = w.assemble(tree)
        x = torch.cat([emb, base_lm.embed(fut[:-1]).unsqueeze(0)], 1)
        p = torch.cat([pos, torch.arange(42, 47).unsqueeze(0)], 1)
        logits, _ = base_lm.forward_embeds(x, p)
        lg = logits[0, emb.shape[1] - 1 : emb.shape[1] - 1 + 6]
        return float(torch.nn.functional.cross_entropy(lg, fut))

    base = horizon_nll(wc)
    big = wc.copy(budget=10**6)
    for i, e in enumerate(wc.entries):
        v = big.copy()
        if e.level > 0:
            v.expand(i)
            want = base - horizon_nll(v)
        else:
            v.collapse(i)
            want = horizon_nll(v) - base
        assert scores[i].item() == pytest.approx(want, abs=1e-4)
    with pytest.raises(ValueError, match="future_tokens"):
        make_policy("oracle").scores(wc, tree, PolicyContext(base_lm=base_lm))


def test_policies_work_on_the_real_tree() -> None:
    from mchar.core.tree import MegaContextTree

    table = torch.randn(50, 8)

    def gist_fn(children: torch.Tensor, level: int) -> torch.Tensor:
        return children.mean(1)

    tree = MegaContextTree.in_memory(4, 2, 8, embed_fn=lambda ids: table[ids], gist_fn=gist_fn)
    tree.ingest(torch.randint(0, 50, (70,)))
    for name in ("similarity", "lexical", "random", "gists_only", "tree_recency"):
        wc = initial_context(tree, 30)
        FocusAllocator().refocus(wc, make_policy(name).scores(wc, tree))
        wc.validate(tree)
        emb, pos, slots = wc.assemble(tree)
        assert emb.shape == (1, wc.cost, 8) and len(slots) == wc.cost <= 30
    for name in ("recency", "sink_recent"):
        wc = make_policy(name).build(tree, 30)
        assert wc.assemble(tree)[0].shape[1] == wc.cost <= 30
    wc = initial_context(tree, 30)
    tree.ingest(torch.randint(0, 50, (9,)))
    FocusAllocator(protect_tokens=8).advance(wc, tree.num_tokens)
    wc.validate(tree)
    assert wc.num_tokens == 79 and wc.cost <= 30 and wc.entries[-1] == Entry(0, 18)


def test_a_gist_reading_lensnet_sees_each_raw_block_as_its_lod1_gist() -> None:
    """``raw_embedding="gist"``: the policy hands LensNet a raw block's stored LOD1 gist instead of its token mean."""
    from mchar.core.lensnet import LensNet
    from mchar.core.policies import entry_vectors
    from mchar.core.tree import MegaContextTree

    table = torch.randn(50, 8)
    tree = MegaContextTree.in_memory(
        4, 2, 8, embed_fn=lambda ids: table[ids], gist_fn=lambda c, level: c.mean(1) * 3 + level
    )
    tree.ingest(torch.randint(0, 50, (70,)))
    wc = initial_context(tree, 30)
    raw = [i for i, e in enumerate(wc.entries) if e.level == 0]
    assert raw and len(raw) < len(wc)
    means, gists = entry_vectors(wc, tree), entry_vectors(wc, tree, "gist")
    for i, e in enumerate(wc.entries):
        own = tree.entry_embeddings([e.parent(4) if e.level == 0 else e]).reshape(-1).float()
        assert torch.allclose(gists[i], own)
        if e.level == 0:
            assert torch.allclose(means[i], table[tree.tokens(e.start(4), e.end(4))].mean(0))
            assert not torch.allclose(gists[i], means[i])
        else:
            assert torch.allclose(means[i], gists[i])
    seen = {}
    net = LensNet(
        d_model=8, width=16, n_layers=1, n_heads=2, max_level=2, tail_tokens=4, raw_embedding="gist"
    )
    forward = net.forward

    def spy(entry_embeds, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        seen["e"] = entry_embeds
        return forward(entry_embeds, *args, **kwargs)

    net.forward = spy  # type: ignore[method-assign]
    make_policy("lensnet", lensnet=net).scores(wc, tree)
    assert torch.allclose(seen["e"].float(), gists)


@pytest.mark.parametrize("per_slot", [False, True])
def test_attention_scores_are_the_attention_each_entry_receives(base_lm, per_slot: bool) -> None:  # noqa: ANN001
    k = 4
    tree = FakeTree(k, 2, 42, d=16, vocab=64)
    tree.table = base_lm.embed(torch.arange(64)).detach()
    tree._build()
    wc = initial_context(tree, 20)
    pol = make_policy("attention", base_lm=base_lm, query_tokens=3, per_slot=per_slot)
    assert pol.relative_scores and not pol.allows_drop
    scores = pol.scores(wc, tree)
    # the reference: the HF model's own eager attention weights on the assembled WC, rows of the last 3 slots
    emb, pos, slots = wc.assemble(tree)
    model = base_lm.model
    model.set_attn_implementation("eager")
    try:
        out = model(inputs_embeds=emb, position_ids=pos, output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")
    mass = torch.stack(out.attentions)[:, 0, :, -3:, :].mean(dim=(0, 1, 2))
    for i in range(len(wc)):
        mine = mass[slots.entry_index == i]
        want = mine.mean() if per_slot else mine.sum()
        assert scores[i].item() == pytest.approx(torch.log(want).item(), abs=1e-5)
    FocusAllocator().refocus(wc, scores)
    wc.validate(tree)
    with pytest.raises(ValueError, match="needs a base_lm"):
        make_policy("attention").scores(wc, tree)
