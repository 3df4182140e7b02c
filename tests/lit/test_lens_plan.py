"""LensNet step plans: the spliced, packed variant rows equal rows built layout by layout; plans are pure functions
of (seed, step, prefix), and reusing a prefix's initial cover changes no WC."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mchar.core.allocator import initial_context
from mchar.lit import windows as W
from mchar.lit.lens_plan import LensPlanner, perturb


def _planner(**kw) -> LensPlanner:
    args = dict(
        block_size=4, depth=3, budget=40, horizon=6, candidates=8, random_edits=3, random_fill=0.5, seed=0
    )
    return LensPlanner(**(args | kw))


def _reference_rows(p: LensPlanner, entries, cand, prefix: int, windows: int) -> W.Rows:
    """One layout and window at a time, through the generic helpers."""
    offs = W.bank_offsets(prefix + p.horizon, prefix, p.block_size, p.depth)
    layouts = [list(entries)] + [perturb(entries, int(i), p.block_size) for i in cand]
    slots = [W.prefix_slots(lay, p.block_size, offs, p.position_mode) for lay in layouts]
    return W.build_rows([(w, *s) for s in slots for w in range(windows)], prefix, p.horizon)


@settings(max_examples=40, deadline=None)
@given(
    step=st.integers(0, 10_000),
    blocks=st.integers(8, 40),
    k=st.sampled_from([2, 4]),
    depth=st.integers(1, 3),
    kind=st.sampled_from(["fill", "recent"]),
    mode=st.sampled_from(["centre", "start", "end"]),
    windows=st.integers(1, 3),
)
def test_plan_rows_equal_the_rows_built_layout_by_layout(step, blocks, k, depth, kind, mode, windows) -> None:
    p = _planner(block_size=k, depth=depth, budget=blocks * k // 2 + k * 4, position_mode=mode)
    prefix = blocks * k
    entries, cand = p.sample(step, prefix, kind)
    plan = p.plan(entries, cand, prefix, windows)
    ref = _reference_rows(p, entries, cand, prefix, windows)
    for name in ("batch", "bank_idx", "positions", "mask"):
        got, want = getattr(plan.rows, name), getattr(ref, name)
        assert got.dtype == want.dtype and torch.equal(got, want), name
    assert plan.cand_index.tolist() == [list(cand)] * windows
    assert plan.sign.tolist() == [[1.0 if entries[int(i)].level > 0 else -1.0 for i in cand]] * windows
    moved = plan.to("cpu")
    assert torch.equal(moved.rows.bank_idx, plan.rows.bank_idx)


@settings(max_examples=30, deadline=None)
@given(steps=st.lists(st.integers(0, 10_000), min_size=1, max_size=3), blocks=st.integers(8, 30))
def test_a_plan_per_window_holds_each_windows_own_rows_and_candidates(steps, blocks) -> None:
    """``plan_windows``: window ``w``'s WC and variants are its own layouts (rows ``(1 + j) * B + w``), however the
    windows' WCs differ in length, and its candidates and signs are its own."""
    p = _planner()
    prefix = blocks * p.block_size
    picks = [p.sample(s, prefix) for s in steps]
    c = min(len(cand) for _, cand in picks)
    picks = [(e, cand[:c]) for e, cand in picks]
    plan = p.plan_windows(picks, prefix)
    b = len(picks)
    assert plan.windows == b and plan.n_rows == (1 + c) * b
    for w, (entries, cand) in enumerate(picks):
        ref = _reference_rows(p, entries, cand, prefix, 1)
        own = torch.arange(w, plan.n_rows, b)
        rows = plan.rows
        assert (rows.batch[own] == w).all()
        for name in ("bank_idx", "positions", "mask"):
            got, want = getattr(rows, name)[own], getattr(ref, name)
            assert torch.equal(got[:, got.shape[1] - want.shape[1] :], want), name
            assert not rows.mask[own][:, : got.shape[1] - want.shape[1]].any()
        assert plan.cand_index[w].tolist() == list(cand) and plan.entries[w] == entries
        assert plan.sign[w].tolist() == [1.0 if entries[int(i)].level > 0 else -1.0 for i in cand]


def test_a_plan_per_window_needs_as_many_candidates_in_every_window() -> None:
    p = _planner()
    (e0, c0), (e1, c1) = p.sample(0, 80), p.sample(1, 80)
    with pytest.raises(ValueError, match="same number of candidates"):
        p.plan_windows([(e0, c0), (e1, c1[:-1])], 80)


def test_a_plan_is_a_pure_function_of_seed_step_and_prefix() -> None:
    p = _planner()
    ids = torch.zeros(2, 40 * 4 + 6, dtype=torch.long)
    twin = pickle.loads(pickle.dumps(p))
    for step in range(6):
        a, b = p(step, ids), twin(step, ids)
        assert a.entries == b.entries and torch.equal(a.packed, b.packed)
    assert p(0, ids).entries != p(1, ids).entries or not torch.equal(p(0, ids).packed, p(1, ids).packed)
    assert _planner(seed=1)(0, ids).entries != p(0, ids).entries or not np.array_equal(
        _planner(seed=1)(0, ids).cand, p(0, ids).cand
    )


def test_reusing_the_prefix_cover_draws_the_same_wcs_and_keeps_the_cover_intact() -> None:
    p = _planner()
    prefix = 160
    shape = W.WindowShape(4, 3, prefix)
    for step in range(12):
        for kind in ("fill", "recent"):
            gen = np.random.default_rng(W.step_seed(0, step, 11))
            fresh = W.random_fill_wc(shape, 40, gen) if kind == "fill" else W.random_wc(shape, 40, gen, 3)
            entries, _ = p.sample(step, prefix, kind)
            assert entries == list(fresh.entries)
    for recent in (True, False):  # the cached covers were copied, never edited
        assert p.cover(prefix, recent).entries == initial_context(shape, 40, expand_recent=recent).entries
