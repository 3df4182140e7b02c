"""WorkingContext invariants: unit tests plus property-based random edit sequences (hypothesis)."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mchar.core.entries import Entry
from mchar.core.positions import gist_position
from mchar.core.working_context import (
    BudgetExceeded,
    IllegalEdit,
    WorkingContext,
    WorkingContextError,
    coarsest_cover,
    min_cost,
)

# MCHAR_HYPOTHESIS_EXAMPLES=5000 for a deep run; the default keeps the file well under 30 s
PROPS = settings(
    max_examples=int(os.environ.get("MCHAR_HYPOTHESIS_EXAMPLES", 300)),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


class FakeTree:
    """Tiny in-test stand-in for MegaContextTree (same read contract): gists are means of their children."""

    def __init__(
        self, block_size: int, depth: int, num_tokens: int, d: int = 8, vocab: int = 50, seed: int = 0
    ) -> None:
        g = torch.Generator().manual_seed(seed)
        self.block_size, self.depth = block_size, depth
        self.table = torch.randn(vocab, d, generator=g)
        self.ids = torch.randint(0, vocab, (num_tokens,), generator=g)
        self.levels: dict[int, torch.Tensor] = {}
        self._build()

    def embed_fn(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table[ids]

    def _build(self) -> None:
        k = self.block_size
        cur = self.embed_fn(self.ids)
        for level in range(1, self.depth + 1):
            n = cur.shape[0] // k
            cur = cur[: n * k].reshape(n, k, cur.shape[-1]).mean(1)
            self.levels[level] = cur

    def ingest(self, ids: torch.Tensor) -> None:
        self.ids = torch.cat([self.ids, ids])
        self._build()

    @property
    def num_tokens(self) -> int:
        return int(self.ids.numel())

    def num_nodes(self, level: int) -> int:
        return self.num_tokens if level == 0 else int(self.levels[level].shape[0])

    def tokens(self, start: int, end: int) -> torch.Tensor:
        return self.ids[start:end]

    def gists(self, level: int, start: int, end: int) -> torch.Tensor:
        return self.levels[level][start:end]

    def tail_tokens(self) -> torch.Tensor:
        return self.ids[(self.num_tokens // self.block_size) * self.block_size :]

    def entry_embeddings(self, entries: list[Entry]) -> torch.Tensor:
        k = self.block_size
        parts = [
            self.embed_fn(self.ids[e.start(k) : e.end(k)])
            if e.level == 0
            else self.levels[e.level][e.index : e.index + 1]
            for e in entries
        ]
        return torch.cat(parts)


def snapshot(wc: WorkingContext) -> tuple:
    return (wc.entries, wc.dropped, wc.cost, wc.num_tokens)


# ---------------------------------------------------------------------------- unit tests
def test_default_is_all_raw_and_cost_counts_tail() -> None:
    wc = WorkingContext(4, 2, 100, 37)
    assert wc.entries == tuple(Entry(0, b) for b in range(9))
    assert wc.cost == 37 and wc.tail_len == 1 and wc.num_slots == 37


def test_budget_is_hard_at_construction() -> None:
    with pytest.raises(BudgetExceeded):
        WorkingContext(4, 2, 36, 37)


def test_collapse_requires_aligned_complete_siblings() -> None:
    wc = WorkingContext(4, 2, 100, 32, strict=True)
    for i in range(4):
        wc.collapse(i)  # raw -> LOD1
    wc.collapse(4)  # raw block 4 -> LOD1 gist 4
    before = snapshot(wc)
    with pytest.raises(IllegalEdit, match="not the first"):
        wc.collapse(1)  # LOD1 index 1 is not aligned
    with pytest.raises(IllegalEdit, match="expected sibling"):
        wc.collapse(4)  # gist (1,4) is aligned but (1,5).. are still raw
    assert snapshot(wc) == before
    parent = wc.collapse(0)
    assert parent == Entry(2, 0) and wc.entries[0] == Entry(2, 0)


def test_collapse_at_depth_and_expand_raw_rejected() -> None:
    wc = WorkingContext(2, 1, 100, 8, strict=True)
    wc.collapse(0)
    with pytest.raises(IllegalEdit, match="depth"):
        wc.collapse(0)
    with pytest.raises(IllegalEdit, match="raw block"):
        wc.expand(1)
    with pytest.raises(IllegalEdit, match="no such entry"):
        wc.expand(99)


def test_expand_over_budget_leaves_state() -> None:
    wc = WorkingContext(4, 2, 10, 16, entries=[Entry(2, 0)], strict=True)
    assert wc.expand(0) == [Entry(1, j) for j in range(4)] and wc.cost == 4
    assert wc.expand(0) == [Entry(0, 0)] and wc.cost == 7
    wc.expand(1)
    assert wc.cost == 10
    before = snapshot(wc)
    with pytest.raises(BudgetExceeded, match="budget 10"):
        wc.expand(2)
    assert snapshot(wc) == before
    assert isinstance(BudgetExceeded("x"), IllegalEdit)


def test_gist_not_in_tree_is_rejected() -> None:
    with pytest.raises(IllegalEdit, match="not in the tree"):
        WorkingContext(4, 2, 100, 12, entries=[Entry(2, 0)])  # LOD2 needs 16 tokens
    with pytest.raises(IllegalEdit, match="gap"):
        WorkingContext(4, 2, 100, 12, entries=[Entry(0, 0), Entry(0, 2)])


def test_drops_only_when_allowed() -> None:
    wc = WorkingContext(4, 1, 100, 12)
    with pytest.raises(IllegalEdit, match="allow"):
        wc.drop(0)
    wc = WorkingContext(4, 1, 100, 12, allows_drop=True, strict=True)
    wc.drop(0)
    assert wc.cost == 8 and wc.num_dropped == 1 and wc.dropped_tokens == 4
    assert wc.slot_map().node_index[0] == 4  # dropped entries are not fed
    with pytest.raises(IllegalEdit, match="dropped"):
        wc.collapse(0)
    wc.restore(0)
    assert wc.cost == 12


def test_advance_makes_raw_blocks_and_fits_by_collapsing_oldest() -> None:
    wc = WorkingContext(4, 2, 12, 6, strict=True)
    new = wc.advance(9)
    assert new == [Entry(0, 1)] and wc.cost == 9
    wc.advance(13)  # 3 raw blocks + 1 tail = 13 > 12 -> oldest block collapses
    assert wc.entries == (Entry(1, 0), Entry(0, 1), Entry(0, 2)) and wc.cost == 10
    before = snapshot(wc)
    with pytest.raises(BudgetExceeded):
        wc.advance(200)  # coarsest cover of 200 tokens at depth 2 does not fit 12
    assert snapshot(wc) == before
    with pytest.raises(IllegalEdit, match="append-only"):
        wc.advance(3)


def test_positions_and_slot_map() -> None:
    k = 4
    tree = FakeTree(k, 2, 37)
    wc = WorkingContext(
        k,
        2,
        100,
        37,
        entries=[Entry(2, 0), Entry(1, 4), Entry(0, 5), Entry(1, 6), Entry(1, 7), Entry(0, 8)],
        tree=tree,
        strict=True,
    )
    emb, pos, slots = wc.assemble(tree)
    assert emb.shape == (1, wc.cost, 8) and pos.shape == (1, wc.cost)
    assert slots[0] == (2, 0) and slots[1] == (1, 4) and slots[2] == (0, 20)
    assert pos[0, 0] == gist_position(0, 16) == 8 and pos[0, 1] == 18 and pos[0, 2] == 20
    assert torch.all(pos[0, 1:] >= pos[0, :-1])
    assert slots.entry_index[-1] == -1 and slots[len(slots) - 1] == (0, 36)
    assert torch.allclose(emb[0, 0], tree.levels[2][0]) and torch.allclose(
        emb[0, 2], tree.embed_fn(tree.ids[20])
    )
    assert torch.allclose(emb[0, -1], tree.embed_fn(tree.ids[36]))
    for mode, first in (("start", 0), ("end", 15)):
        assert wc.assemble(tree, position_mode=mode)[1][0, 0] == first
    with pytest.raises(ValueError, match="position_mode"):
        wc.assemble(tree, position_mode="middle")


def test_first_difference_and_equality() -> None:
    a = WorkingContext(4, 2, 100, 30)
    b = a.copy()
    assert a == b and a.first_difference(b) == a.num_slots
    b.advance(34)  # the old tail becomes a raw block: prefix fully reusable
    assert a.first_difference(b) == a.num_slots and a != b
    c = a.copy()
    c.collapse(3)
    assert a.first_difference(c) == 12 and c.first_difference(a) == 12


def test_cover_and_min_cost() -> None:
    cover = coarsest_cover(2, 3, 22)
    assert cover == [Entry(3, 0), Entry(3, 1), Entry(2, 4), Entry(1, 10)]
    assert min_cost(2, 3, 22) == 4
    assert min_cost(2, 3, 23) == 5


def test_roundtrip_dict_and_lod_histogram() -> None:
    wc = WorkingContext(4, 2, 100, 37)
    wc.collapse(0)
    assert WorkingContext.from_dict(wc.to_dict()) == wc
    assert wc.lod_histogram() == {0: 8, 1: 1}


# ---------------------------------------------------------------------------- properties
@st.composite
def scenario(draw: st.DrawFn) -> tuple[int, int, int, int, list[tuple[str, int]]]:
    k = draw(st.sampled_from([2, 3, 4]))
    depth = draw(st.integers(1, 3))
    t = draw(st.integers(0, 6 * k**2))
    slack = draw(st.integers(0, 3 * k * k))
    ops = draw(
        st.lists(
            st.tuples(st.sampled_from(["expand", "collapse", "advance", "drop"]), st.integers(-2, 60)),
            max_size=40,
        )
    )
    return k, depth, t, slack, ops


def run_ops(wc: WorkingContext, ops: list[tuple[str, int]]) -> tuple[int, int]:
    legal = illegal = 0
    for op, arg in ops:
        before = wc.copy(budget=max(wc.budget, wc.cost))
        was_legal = True
        try:
            if op == "expand":
                wc.expand(arg)
            elif op == "collapse":
                wc.collapse(arg)
            elif op == "drop":
                wc.drop(arg)
            else:
                wc.advance(wc.num_tokens + arg % 7)
        except WorkingContextError:
            was_legal = False
            assert wc == before, f"{op}({arg}) failed but changed the WC"
        legal += was_legal
        illegal += not was_legal
        wc.validate()
        assert wc.cost <= wc.budget
        pos = wc.position_ids()
        assert pos.numel() == wc.cost
        assert torch.all(pos[1:] >= pos[:-1])
    return legal, illegal


@PROPS
@given(scenario())
def test_random_edit_sequences_keep_invariants(s: tuple) -> None:
    k, depth, t, slack, ops = s
    budget = min_cost(k, depth, t) + slack
    wc = WorkingContext(k, depth, budget, t, entries=coarsest_cover(k, depth, t), strict=True)
    run_ops(wc, ops)


@PROPS
@given(scenario(), st.data())
def test_expand_then_collapse_is_identity(s: tuple, data: st.DataObject) -> None:
    k, depth, t, slack, ops = s
    wc = WorkingContext(k, depth, 10**6, t, entries=coarsest_cover(k, depth, t), strict=True)
    run_ops(wc, ops)
    gists = [i for i, e in enumerate(wc.entries) if e.level > 0]
    if not gists:
        return
    i = data.draw(st.sampled_from(gists))
    before = wc.copy()
    wc.expand(i)
    wc.collapse(i)
    assert wc == before
    raws = [i for i, e in enumerate(wc.entries) if e.level == 0]
    if raws:
        j = data.draw(st.sampled_from(raws))
        wc.collapse(j)
        wc.expand(j)
        assert wc == before


@PROPS
@given(scenario(), st.data())
def test_illegal_collapses_of_misaligned_groups_are_rejected(s: tuple, data: st.DataObject) -> None:
    k, depth, t, _, ops = s
    wc = WorkingContext(k, depth, 10**6, t, entries=coarsest_cover(k, depth, t))
    run_ops(wc, ops)
    for i, e in enumerate(wc.entries):
        if e.level > 0 and e.index % k:
            before = wc.copy()
            with pytest.raises(IllegalEdit):
                wc.collapse(i)
            assert wc == before


@PROPS
@given(scenario())
def test_the_exception_free_collapse_check_agrees_with_collapse_error(s: tuple) -> None:
    """``collapse_size`` (the allocator's and the LensNet planner's fast check) says legal exactly when
    ``collapse_error`` does, and how many entries the collapse replaces."""
    k, depth, t, _, ops = s
    wc = WorkingContext(k, depth, 10**6, t, entries=coarsest_cover(k, depth, t), allows_drop=True)
    run_ops(wc, ops)
    for i in range(-1, len(wc) + 1):
        error = wc.collapse_error(i)
        assert (wc.collapse_size(i) > 0) == (error is None), (i, error)
        if error is None:
            assert wc.collapse_size(i) == len(wc.collapse_group(i))


@PROPS
@given(scenario())
def test_first_difference_matches_slot_comparison(s: tuple) -> None:
    k, depth, t, _, ops = s
    a = WorkingContext(k, depth, 10**6, t, entries=coarsest_cover(k, depth, t), allows_drop=True)
    b = a.copy()
    run_ops(b, ops)
    sa, sb = a.slot_map().nodes(), b.slot_map().nodes()
    n = 0
    while n < min(len(sa), len(sb)) and sa[n] == sb[n]:
        n += 1
    assert a.first_difference(b) == n == b.first_difference(a)


def test_assembly_matches_tree_under_random_edits() -> None:
    k, depth = 3, 2
    tree = FakeTree(k, depth, 50)
    wc = WorkingContext(k, depth, 60, 50, entries=coarsest_cover(k, depth, 50, tree), tree=tree, strict=True)
    g = torch.Generator().manual_seed(1)
    for _ in range(200):
        i = int(torch.randint(0, len(wc), (1,), generator=g))
        with contextlib.suppress(WorkingContextError):
            wc.expand(i) if torch.rand(1, generator=g) < 0.6 else wc.collapse(i)
        emb, pos, slots = wc.assemble(tree)
        assert emb.shape[1] == wc.cost <= 60
        for s in (0, emb.shape[1] // 2, emb.shape[1] - 1):
            level, node = slots[s]
            want = tree.embed_fn(tree.ids[node]) if level == 0 else tree.levels[level][node]
            assert torch.allclose(emb[0, s], want)


@given(
    k=st.integers(2, 16),
    depth=st.integers(1, 4),
    n=st.integers(0, 600),
    then_each=st.integers(0, 40),
)
@settings(max_examples=60, deadline=None)
def test_stream_min_cost_is_the_peak_cover_cost_of_the_stream(
    k: int, depth: int, n: int, then_each: int
) -> None:
    """What a session needs to stream n tokens in whole blocks and then generate: the largest coarsest-cover cost
    at each block boundary, at n, and at each generated token; never less than the final length's own cost."""
    from mchar.core.working_context import stream_min_cost

    lengths = [t for t in (*range(k, n + 1, k), *range(n, n + then_each + 1)) if t > 0]
    expected = max((min_cost(k, depth, t) for t in lengths), default=0)
    assert stream_min_cost(k, depth, n, then_each) == expected >= min_cost(k, depth, n)
