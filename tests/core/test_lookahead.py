"""Lookahead scoring: the view, max pooling, and an allocator that reaches a needle under a coarse gist."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mchar.core.allocator import FocusAllocator, initial_context
from mchar.core.entries import Entry
from mchar.core.lookahead import lookahead_view, max_by_owner
from mchar.core.policies import LookaheadPolicy, Policy, make_policy

from .test_working_context import FakeTree

K = 4


def test_view_replaces_only_coarse_gists_by_their_children() -> None:
    entries = [Entry(2, 0), Entry(1, 4), Entry(0, 5), Entry(2, 1)]
    view, owner = lookahead_view(entries, K)
    assert view == [*Entry(2, 0).children(K), Entry(1, 4), Entry(0, 5), *Entry(2, 1).children(K)]
    assert owner == [0] * K + [1, 2] + [3] * K
    assert lookahead_view(entries, K, min_level=3) == (entries, [0, 1, 2, 3])
    with pytest.raises(ValueError, match="min_level must be >= 2"):
        lookahead_view(entries, K, min_level=1)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=30), st.integers(0, 10_000))
def test_max_by_owner_is_the_groupwise_max(groups: list[int], seed: int) -> None:
    owner = sorted(groups)
    n = max(owner) + 2  # the last owner has no view entry: its score is NaN (no opinion)
    vals = torch.randn(len(owner), generator=torch.Generator().manual_seed(seed))
    vals[0] = float("nan")
    out = max_by_owner(vals, owner, n)
    for i in range(n):
        mine = [float(v) for v, o in zip(vals, owner, strict=True) if o == i and not math.isnan(float(v))]
        if mine:
            assert float(out[i]) == pytest.approx(max(mine))
        else:
            assert math.isnan(float(out[i]))


class NeedlePolicy(Policy):
    """Scores only what a one-step scorer could see: the needle's own LOD1 gist or raw block is +1, else -1."""

    name = "needle"
    relative_scores = True

    def __init__(self, block: int) -> None:
        self.block = block

    def scores(self, wc, tree, context=None) -> torch.Tensor:  # noqa: ANN001
        return torch.tensor([1.0 if e.level <= 1 and e.index == self.block else -1.0 for e in wc.entries])


def _refocus(policy: Policy, rounds: int) -> list[Entry]:
    tree = FakeTree(K, 2, 100)  # 25 blocks; block 3 (tokens 12-15) lies under LOD2 gist 0
    wc = initial_context(tree, 40)
    alloc = FocusAllocator(tau_expand=-math.inf, tau_collapse=math.inf, max_edits=4, cooldown=0)
    for _ in range(rounds):
        alloc.refocus(wc, policy.scores(wc, tree))
        wc.validate(tree)
        assert wc.cost <= 40
    return list(wc.entries)


def test_lookahead_walks_down_to_a_needle_a_one_step_scorer_never_reaches() -> None:
    needle = Entry(0, 3)
    assert Entry(2, 0) in _refocus(NeedlePolicy(3), 0)  # the needle starts under a coarse gist
    assert needle not in _refocus(NeedlePolicy(3), 6)
    assert needle in _refocus(LookaheadPolicy(NeedlePolicy(3)), 6)


def test_lookahead_wraps_by_name_and_refuses_truncation() -> None:
    pol = make_policy("similarity", lookahead=True)
    assert isinstance(pol, LookaheadPolicy) and pol.name == "similarity" and pol.relative_scores
    tree = FakeTree(K, 2, 100)
    wc = initial_context(tree, 40)
    scores = pol.scores(wc, tree)
    assert scores.shape == (len(wc),) and not torch.isnan(scores).any()
    with pytest.raises(ValueError, match="'recency' truncates"):
        make_policy("recency", lookahead=True)
