"""FocusAllocator: greedy/stochastic refocus, cooldown, protected tail, hard budget, initial context."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mchar.core.allocator import FocusAllocator, initial_context
from mchar.core.entries import Entry
from mchar.core.working_context import BudgetExceeded, WorkingContext, coarsest_cover, min_cost

from .test_working_context import FakeTree

# MCHAR_HYPOTHESIS_EXAMPLES=5000 for a deep run; the default keeps the file well under 30 s
PROPS = settings(
    max_examples=int(os.environ.get("MCHAR_HYPOTHESIS_EXAMPLES", 150)),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def test_initial_context_expands_recent_first() -> None:
    tree = FakeTree(4, 2, 70)
    wc = initial_context(tree, 30)
    wc.validate(tree)
    assert wc.cost <= 30 and wc.cost > 30 - 3
    levels = [e.level for e in wc.entries]
    assert levels[-1] == 0 and levels[0] == 2  # newest raw, oldest coarse
    assert levels == sorted(levels, reverse=True)


def test_initial_context_names_budget_when_too_small() -> None:
    tree = FakeTree(4, 1, 70)  # 17 LOD1 gists + 2 tail tokens = 19
    with pytest.raises(BudgetExceeded, match=r"allocator\.budget=18"):
        initial_context(tree, 18)
    assert initial_context(tree, 19).cost == 19


def test_greedy_expands_best_and_collapses_worst() -> None:
    wc = WorkingContext(4, 1, 20, 16, entries=[Entry(1, j) for j in range(4)])
    alloc = FocusAllocator(tau_expand=0.1, tau_collapse=0.1, max_edits=4, cooldown=0)
    edits = alloc.refocus(wc, torch.tensor([0.0, 0.9, 0.5, 0.0]))
    assert [e.kind for e in edits] == ["expand", "expand"]
    assert wc.entries == (Entry(1, 0), Entry(0, 1), Entry(0, 2), Entry(1, 3)) and wc.cost == 10
    # now a raw block is worthless and a gist is valuable, but the budget is tight -> swap
    wc2 = WorkingContext(4, 1, 10, 16, entries=[Entry(1, 0), Entry(0, 1), Entry(0, 2), Entry(1, 3)])
    edits = alloc.refocus(wc2, torch.tensor([0.0, -0.5, 0.3, 0.8]))
    assert [e.kind for e in edits] == ["collapse", "expand"]
    assert wc2.entries == (Entry(1, 0), Entry(1, 1), Entry(0, 2), Entry(0, 3)) and wc2.cost == 10


def test_no_swap_when_collapse_would_lose_more_than_expand_gains() -> None:
    wc = WorkingContext(4, 1, 10, 16, entries=[Entry(1, 0), Entry(0, 1), Entry(0, 2), Entry(1, 3)])
    alloc = FocusAllocator(tau_expand=0.1, tau_collapse=0.1)
    before = wc.copy()
    assert alloc.refocus(wc, torch.tensor([0.0, 0.9, 0.9, 0.5])) == []
    assert wc == before and alloc.stats.skipped_no_room == 1


@pytest.mark.parametrize(("group_score", "collapsed"), [("mean", Entry(2, 0)), ("max", Entry(1, 4))])
def test_group_score_mean_or_max_picks_what_to_collapse(group_score: str, collapsed: Entry) -> None:
    # Four LOD1 siblings: one valuable (2.0), three not (-1.0): mean -0.25, max 2.0. A raw block scores 0.0.
    entries = [Entry(1, 0), Entry(1, 1), Entry(1, 2), Entry(1, 3), Entry(0, 4), Entry(0, 5)]
    wc = WorkingContext(4, 2, 12, 24, entries=entries)
    scores = dict(zip(entries, [2.0, -1.0, -1.0, -1.0, 0.0, 1.0], strict=True))
    alloc = FocusAllocator(group_score=group_score)  # type: ignore[arg-type]
    alloc.advance(wc, 25, scores)  # one more token: something must be collapsed
    assert collapsed in wc.entries and wc.cost <= 12
    with pytest.raises(ValueError, match="group_score"):
        FocusAllocator(group_score="median")  # type: ignore[arg-type]


def _coarse_then_fine() -> tuple[WorkingContext, list[Entry]]:
    # K=4, depth 2, 32 tokens: one LOD2 gist (tokens 0-15) + four LOD1 siblings (16-31); cost 5, budget 8.
    entries = [Entry(2, 0), Entry(1, 4), Entry(1, 5), Entry(1, 6), Entry(1, 7)]
    return WorkingContext(4, 2, 8, 32, entries=entries), entries


def test_parent_group_score_keeps_what_was_expanded_for_its_parent() -> None:
    kept = {}
    for mode in ("parent", "mean"):
        wc, entries = _coarse_then_fine()
        alloc = FocusAllocator(tau_expand=-1e9, tau_collapse=1e9, cooldown=0, group_score=mode)  # type: ignore[arg-type]
        edits = alloc.refocus(wc, dict(zip(entries, [1.0, 0.5, 0.5, 0.5, 0.5], strict=True)))
        assert [e.kind for e in edits] == ["expand"] and wc.cost == 8
        alloc.refocus(wc, {})  # a later refocus without opinions: the cooldown is over
        # The new LOD1 children look worthless on their own (-1); the right-hand group is worth 0.5.
        scores = {e: (-1.0 if e.index < 4 else 0.5) for e in wc.entries}
        alloc.advance(wc, 33, scores)  # one more token: one group must go
        kept[mode] = Entry(2, 0) not in wc.entries
    # parent: the group keeps its parent's 1.0, so the 0.5 group is collapsed; mean: the children's -1 loses.
    assert kept == {"parent": True, "mean": False}


def test_parent_group_score_skips_expands_that_would_be_collapsed_next() -> None:
    for mode, expands in (("parent", 0), ("mean", 1)):
        wc, entries = _coarse_then_fine()
        alloc = FocusAllocator(tau_expand=-1e9, tau_collapse=1e9, group_score=mode)  # type: ignore[arg-type]
        # The LOD2 gist (0.2) is worth less than keeping the LOD1 group (0.5): expanding it only churns.
        edits = alloc.refocus(wc, dict(zip(entries, [0.2, 0.5, 0.5, 0.5, 0.5], strict=True)))
        assert sum(e.kind == "expand" for e in edits) == expands, mode


def test_the_churn_guard_set_aside_fills_the_room_the_next_block_leaves() -> None:
    """The churn guard skips an expand whose group would be the lowest keep-score; set aside (``guard_with_room =
    False``, a settle's ablation) it still does so where the next block's arrival must collapse something, and opens
    such gists where the expand and the next block both fit."""
    # K=4, depth 1, 24 tokens: LOD1 gists over blocks 0-3 (scores 1, 1, -1, -1), raw blocks 4-5 (keep-scores 1);
    # cost 12. An expand costs 3 and the next block 4 more.
    entries = [Entry(1, 0), Entry(1, 1), Entry(1, 2), Entry(1, 3), Entry(0, 4), Entry(0, 5)]
    scores = dict(zip(entries, [1.0, 1.0, -1.0, -1.0, 1.0, 1.0], strict=True))
    # budget 40: room for every expand and the next block; 20: room for one (12 + 3 + 4 <= 20), then the second
    # would be the lowest keep-score when the next block arrives (15 + 3 + 4 > 20)
    for guard, budget, expands in ((True, 40, 0), (False, 40, 4), (False, 20, 1)):
        wc = WorkingContext(4, 1, budget, 24, entries=entries)
        alloc = FocusAllocator(tau_expand=-1e9, tau_collapse=1e9, cooldown=0, group_score="parent")
        alloc.guard_with_room = guard
        edits = alloc.refocus(wc, scores)
        assert [e.kind for e in edits] == ["expand"] * expands, (guard, budget)
        assert wc.cost == 12 + 3 * expands


def test_cooldown_blocks_flip_back() -> None:
    wc = WorkingContext(4, 1, 40, 16, entries=[Entry(1, j) for j in range(4)])
    alloc = FocusAllocator(tau_expand=0.1, tau_collapse=0.1, cooldown=2)
    alloc.refocus(wc, torch.tensor([0.9, 0.0, 0.0, 0.0]))
    assert wc[0] == Entry(0, 0)
    for _ in range(2):  # the newly expanded block cannot be collapsed for 2 refocuses
        assert alloc.refocus(wc, torch.tensor([-0.9, 0.0, 0.0, 0.0])) == []
    assert [e.kind for e in alloc.refocus(wc, torch.tensor([-0.9, 0.0, 0.0, 0.0]))] == ["collapse"]


def test_protected_tail_never_collapses_voluntarily() -> None:
    wc = WorkingContext(4, 1, 100, 18)
    alloc = FocusAllocator(tau_collapse=0.1, max_edits=10, protect_tokens=8)
    alloc.refocus(wc, -torch.ones(len(wc)))
    assert wc.entries[-2:] == (Entry(0, 2), Entry(0, 3))  # blocks ending after token 10
    assert all(e.level == 1 for e in wc.entries[:2])


def test_max_edits_cap_and_telemetry() -> None:
    wc = WorkingContext(4, 1, 100, 64)
    alloc = FocusAllocator(tau_collapse=0.1, max_edits=3)
    assert len(alloc.refocus(wc, -torch.ones(len(wc)))) == 3
    t = alloc.telemetry()
    assert t["collapses"] == 3 and t["refocuses"] == 1 and 0 < t["budget_utilisation"] <= 1
    assert t["swap_rate"] == pytest.approx(3 / len(wc))


def test_advance_fits_by_worst_score_and_keeps_protected() -> None:
    tree = FakeTree(4, 2, 80)
    wc = WorkingContext(4, 2, 24, 20, tree=tree)  # 5 raw blocks = 20
    alloc = FocusAllocator(protect_tokens=4)
    alloc.refocus(wc, torch.tensor([0.0, 0.0, -0.05, 0.0, 0.0]))  # under threshold: no edits
    alloc.advance(wc, 28)  # 7 blocks = 28 > 24 -> collapse the worst-scored block (2) first
    assert wc.entries[2] == Entry(1, 2) and wc.cost <= 24
    wc.validate(tree)


def test_stochastic_is_seeded() -> None:
    def run(seed: int) -> list:
        wc = WorkingContext(4, 1, 100, 64, entries=[Entry(1, j) for j in range(16)])
        alloc = FocusAllocator(stochastic=True, top_k=8, seed=seed, max_edits=3)
        return [e.before for e in alloc.refocus(wc, torch.linspace(0.3, 1.0, 16))]

    assert run(1) == run(1)
    assert any(run(1) != run(s) for s in range(2, 8))


@PROPS
@given(
    k=st.sampled_from([2, 3, 4]),
    depth=st.integers(1, 3),
    t=st.integers(0, 120),
    slack=st.integers(0, 40),
    stochastic=st.booleans(),
    seed=st.integers(0, 10**6),
    steps=st.integers(1, 6),
)
def test_refocus_and_advance_never_exceed_budget(
    k: int, depth: int, t: int, slack: int, stochastic: bool, seed: int, steps: int
) -> None:
    tree = FakeTree(k, depth, t + 40 * steps)
    # the cheapest cover is not monotone in T (a tail token costs 1): budget for the worst point on the way
    budget = max(min_cost(k, depth, x) for x in range(t, t + 40 * steps + 1)) + slack
    wc = WorkingContext(k, depth, budget, t, entries=coarsest_cover(k, depth, t), tree=tree, strict=True)
    g = torch.Generator().manual_seed(seed)
    alloc = FocusAllocator(
        tau_expand=0.0,
        tau_collapse=0.0,
        max_edits=int(torch.randint(0, 6, (1,), generator=g)),
        cooldown=int(torch.randint(0, 3, (1,), generator=g)),
        protect_tokens=int(torch.randint(0, 2 * k, (1,), generator=g)),
        stochastic=stochastic,
        seed=seed,
    )
    for _ in range(steps):
        alloc.refocus(wc, torch.randn(len(wc), generator=g))
        wc.validate(tree)
        assert wc.cost <= budget
        alloc.advance(wc, wc.num_tokens + int(torch.randint(0, 40, (1,), generator=g)))
        wc.validate(tree)
        assert wc.cost <= budget


def test_fill_budget_ignores_the_sign_of_scores() -> None:
    # Scores that only rank (all negative here): thresholds would collapse everything; filling keeps the budget used.
    entries = [Entry(1, 0), Entry(1, 1), Entry(0, 2), Entry(0, 3)]
    scores = torch.tensor([-0.9, -0.3, -0.5, -0.1])
    thresholded = WorkingContext(4, 1, 16, 16, entries=entries)
    FocusAllocator(tau_expand=0.1, tau_collapse=0.1, max_edits=8, cooldown=0).refocus(thresholded, scores)
    assert thresholded.cost < 10  # both raw blocks collapsed, nothing expanded
    filled = WorkingContext(4, 1, 16, 16, entries=entries)
    alloc = FocusAllocator(tau_expand=0.1, tau_collapse=0.1, max_edits=8, cooldown=0, fill_budget=True)
    edits = alloc.refocus(filled, scores)
    assert [e.kind for e in edits] == ["expand"] and filled.cost == 13  # the best gist takes the free slots
    assert Entry(0, 2) in filled.entries and Entry(0, 3) in filled.entries  # no block left a slot empty
