"""Perplexity at budget: every policy at one budget, ΔNLL = 0 when the WC holds everything raw, CIs, telemetry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mchar.evals.components import POLICY_NAMES, EvalError, SessionSettings, load_components
from mchar.evals.perplexity import (
    confidence_interval,
    evaluate_policy,
    full_context_nll,
    make_documents,
    metrics_from_summary,
    summarise,
)
from mchar.evals.telemetry import DROPPED, UNSEEN, FocusRecorder
from tests.evals import build_tiny_base, token_stream

K, FINAL = 8, 16


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_base(tmp_path_factory.mktemp("tiny_base"))


@pytest.fixture(scope="module")
def docs() -> list[torch.Tensor]:
    return make_documents([token_stream(400, seed=i) for i in range(3)], 4 * 32 + FINAL, 3, sep=0)


def _run(base_dir: Path, docs: list[torch.Tensor], budget: int, **kw: object) -> dict:
    settings = SessionSettings(budget=budget, block_size=K, depth=2, protect_tokens=K, **kw)
    comp = load_components(base_dir, settings)
    res = {}
    for p in POLICY_NAMES:
        if comp.unavailable(p):
            continue
        res[p] = evaluate_policy(lambda p=p: comp.session(p), docs, FINAL, budget, map_document=0)
    return summarise(res, full_context_nll(comp.base, docs, FINAL))


def test_every_policy_runs_at_the_same_budget(base_dir: Path, docs: list[torch.Tensor]) -> None:
    assert len(docs) == 3 and all(d.numel() == 4 * 32 + FINAL for d in docs)
    summary = _run(base_dir, docs[:2], budget=32)
    assert set(summary["policies"]) == set(POLICY_NAMES) - {"lensnet"}
    m = metrics_from_summary(summary)
    for p in summary["policies"]:
        rec = summary["policies"][p]
        assert np.isfinite(rec["nll"]) and len(rec["per_document"]) == 2
        lo, hi = rec["ci"]
        assert lo <= rec["delta_nll"] <= hi
        assert 0.0 < rec["telemetry"]["budget_util"] <= 1.0
        assert rec["telemetry"]["residency"] >= 1.0
        assert abs(sum(rec["lod_histogram"].values()) - 1.0) < 1e-6
        for key in ("nll", "delta_nll", "delta_nll_ci_low", "delta_nll_ci_high"):
            assert f"ppl/{p}/{key}" in m
        for key in ("swap_rate", "budget_util", "residency", "raw_tokens", "gist_slots", "scored_raw_tokens"):
            assert f"focus/{p}/{key}" in m
        t = rec["telemetry"]  # what a WC costs is its raw tokens plus its gist entries, at every snapshot
        assert t["raw_tokens"] + t["gist_slots"] == pytest.approx(t["budget_util"] * 32)
        assert sum(v for k, v in m.items() if k.startswith(f"focus/{p}/lod_share/")) == pytest.approx(1.0)
    assert "ppl/full/nll" in m
    assert summary["policies"]["recency"]["telemetry"]["gist_slots"] == 0.0
    # what the scored tokens see: truncation fills the (block-aligned) budget with raw tokens; a cover pays for its
    # gists with raw blocks, never exceeding the budget
    scored = {p: summary["policies"][p]["telemetry"] for p in ("recency", "tree_recency")}
    assert scored["recency"]["scored_raw_tokens"] == 32 and scored["recency"]["scored_gist_slots"] == 0
    tree = scored["tree_recency"]
    assert tree["scored_gist_slots"] > 0 and tree["scored_raw_tokens"] + tree["scored_gist_slots"] <= 32
    assert tree["scored_raw_tokens"] < scored["recency"]["scored_raw_tokens"]
    assert summary["policies"]["gists_only"]["telemetry"]["gist_slots"] > 0.0
    # truncation drops history; gists_only never holds raw history beyond the protected/new blocks
    assert summary["policies"]["recency"]["lod_histogram"].get("dropped", 0) > 0
    assert "dropped" not in summary["policies"]["gists_only"]["lod_histogram"]


def test_budget_covering_everything_equals_full_context(base_dir: Path, docs: list[torch.Tensor]) -> None:
    # No voluntary collapses (tau_collapse high; by default gists_only/similarity/random collapse even with spare
    # room, by design): with room for every token raw, every policy *is* full context.
    summary = _run(base_dir, docs[:2], budget=256, tau_collapse=1e9)
    assert len(summary["policies"]) == len(POLICY_NAMES) - 1
    for p, rec in summary["policies"].items():
        assert rec["lod_histogram"] == {"0": pytest.approx(1.0)}, p
        assert rec["delta_nll"] == pytest.approx(0.0, abs=2e-5), p
        assert rec["ci"][0] <= rec["delta_nll"] <= rec["ci"][1]


def test_confidence_interval_brackets_the_mean() -> None:
    x = [0.3, -0.1, 0.5, 0.2, 0.05]
    for method in ("t", "bootstrap"):
        lo, hi = confidence_interval(x, method)
        assert lo < np.mean(x) < hi
    assert confidence_interval([0.4]) == (0.4, 0.4)
    wide = confidence_interval(x, "t", level=0.99)
    narrow = confidence_interval(x, "t", level=0.8)
    assert wide[0] < narrow[0] and wide[1] > narrow[1]


def test_recorder_focus_map_and_swap_rate() -> None:
    from mchar.core.entries import Entry
    from mchar.core.working_context import WorkingContext

    rec = FocusRecorder(budget=40, map_tokens=40)
    a = WorkingContext(8, 2, 40, 20, entries=[Entry(0, 0), Entry(0, 1)])
    rec.observe(a)
    b = WorkingContext(8, 2, 40, 36, entries=[Entry(0, 0), Entry(0, 1), Entry(0, 2), Entry(0, 3)])
    b.collapse(0)  # blocks 0 and 1 would need K=8 siblings; collapse of a raw block gives its LOD1 parent
    rec.observe(b)
    fmap = rec.focus_map()
    assert fmap.shape == (2, 40) and fmap.dtype == np.int8
    assert (fmap[0, 20:] == UNSEEN).all() and (fmap[0, :20] == 0).all()
    assert fmap[1, 0] == 1 and (fmap[1, 36:] == UNSEEN).all()
    s = rec.summary()
    assert 0.0 < s["swap_rate"] <= 1.0 and s["budget_util"] <= 1.0
    assert DROPPED == -1
    # raw tokens in view: 20, then blocks 1-3 (24) + the 4-token tail; gist entries: none, then block 0's gist
    assert s["raw_tokens"] == (20 + 28) / 2 and s["gist_slots"] == 0.5
    # the scored view counts only what observe_scored saw (nothing yet), not the stream's snapshots
    assert s["scored_raw_tokens"] == 0.0 and s["scored_gist_slots"] == 0.0
    rec.observe_scored(b)
    s = rec.summary()
    assert s["scored_raw_tokens"] == 28 and s["scored_gist_slots"] == 1 and s["snapshots"] == 2


def test_recorder_ignores_how_dropped_history_is_booked() -> None:
    """Truncation's dropped LOD1 entries merging into a dropped LOD2 is no focus change: with the same raw blocks
    in view, the swap rate is 0 and every entry in view keeps living; dropping a raw block is a swap."""
    from mchar.core.entries import Entry
    from mchar.core.working_context import WorkingContext

    def truncated(entries: list[Entry], dropped: list[bool]) -> WorkingContext:
        return WorkingContext(2, 2, 8, 16, entries=entries, dropped=dropped, allows_drop=True)

    rec = FocusRecorder(budget=8)
    raw = [Entry(0, 4), Entry(0, 5), Entry(0, 6), Entry(0, 7)]
    gists = [Entry(1, i) for i in range(4)]  # K = 2: tokens 0-7 as four LOD1 entries, or two LOD2 ones
    rec.observe(truncated([*gists, *raw], [True] * 4 + [False] * 4))
    rec.observe(truncated([Entry(2, 0), Entry(2, 1), *raw], [True] * 2 + [False] * 4))
    s = rec.summary()
    assert s["swap_rate"] == 0.0 and s["residency"] == 2.0
    rec.observe(truncated([Entry(2, 0), Entry(2, 1), *raw], [True] * 3 + [False] * 3))
    assert rec.summary()["swap_rate"] == pytest.approx((0.0 + 1 / 4) / 2)


def test_make_documents_concatenated_cuts_exact_lengths() -> None:
    docs = make_documents([[1] * 10, [2] * 10, [3] * 10], length=12, count=5, sep=0, within_files=False)
    assert [d.tolist() for d in docs] == [[1] * 10 + [0, 2], [2] * 9 + [0, 3, 3]]


def test_make_documents_within_files_never_cross_a_file_and_take_files_round_robin() -> None:
    files = [list(range(100, 130)), list(range(200, 205)), list(range(300, 320))]
    docs = [d.tolist() for d in make_documents(files, length=10, count=5, sep=0)]
    # first windows of every long-enough file, then second windows, ...; the 5-token file gives none
    assert docs == [
        list(range(100, 110)),
        list(range(300, 310)),
        list(range(110, 120)),
        list(range(310, 320)),
        list(range(120, 130)),
    ]
    assert make_documents(files, length=40, count=3, sep=0) == []


def test_relative_score_policies_spend_the_whole_budget(base_dir: Path, docs: list[torch.Tensor]) -> None:
    # similarity/random scores are z-scored/uniform: only their order means something. In fill mode (default) the
    # allocator lifts the absolute thresholds for them, so free room always goes to a gist; with fill off they may
    # collapse voluntarily and leave part of the budget empty.
    budget = 64
    full = _run(base_dir, docs[:2], budget=budget)["policies"]
    thresholded = _run(base_dir, docs[:2], budget=budget, fill_budget=False)["policies"]
    util = {
        p: (full[p]["telemetry"]["budget_util"], thresholded[p]["telemetry"]["budget_util"]) for p in full
    }
    for p in ("similarity", "random"):
        assert util[p][0] > util[p][1] + 0.1, util
        # as full as the oracle's WCs (measured: 0.77 vs 0.50 / 0.61 thresholded on this tiny stream)
        assert util[p][0] >= util["oracle"][0] - 1e-9, util
    # policies with absolute scores keep their thresholds either way
    assert full["gists_only"]["telemetry"] == thresholded["gists_only"]["telemetry"]


def test_paired_difference_to_the_reference_policy() -> None:
    from mchar.evals.perplexity import PolicyResult

    # Documents differ by a lot (0, 1, 2 nats); policy b is worse than a by 0.01 on every document.
    a = PolicyResult(nll=[1.0, 2.0, 3.0], telemetry=[])
    b = PolicyResult(nll=[1.01, 2.01, 3.01], telemetry=[])
    s = summarise({"a": a, "b": b}, [1.0, 2.0, 3.0], reference="a")
    vs = s["policies"]["b"]["vs_reference"]
    assert vs["mean"] == pytest.approx(0.01) and vs["wins"] == 3 and vs["documents"] == 3
    assert vs["ci"][0] == pytest.approx(0.01) == pytest.approx(vs["ci"][1])  # constant difference: exact
    m = metrics_from_summary(s)
    assert m["ppl/b/vs_a/mean"] == pytest.approx(0.01) and m["ppl/b/vs_a/wins"] == 3.0
    assert "vs_reference" not in s["policies"]["a"]
    # no reference run: no paired metrics
    assert not any("/vs_" in k for k in metrics_from_summary(summarise({"b": b}, None)))


def test_gap_to_recency_splits_into_the_covers_cost_and_the_focus() -> None:
    """``gap``: NLL(tree_recency) − NLL(recency) and NLL(lensnet) − NLL(tree_recency) per document, which add up to
    lensnet's paired difference to recency; absent unless both policies of a part ran."""
    from mchar.evals.perplexity import PolicyResult

    nll = {"recency": [1.0, 2.0, 3.5], "tree_recency": [1.1, 2.0, 3.6], "lensnet": [1.05, 2.2, 3.4]}
    s = summarise({p: PolicyResult(nll=v, telemetry=[]) for p, v in nll.items()}, None)
    cover, focus = s["gap"]["cover"], s["gap"]["focus"]
    assert (cover["policy"], cover["reference"]) == ("tree_recency", "recency")
    assert cover["mean"] == pytest.approx(0.2 / 3) and cover["wins"] == 2 and cover["documents"] == 3
    assert focus["mean"] == pytest.approx(-0.05 / 3) and focus["wins"] == 1
    lensnet_vs_recency = -s["policies"]["recency"]["vs_reference"]["mean"]
    assert cover["mean"] + focus["mean"] == pytest.approx(lensnet_vs_recency)
    m = metrics_from_summary(s)
    assert m["ppl/gap/cover/mean"] == pytest.approx(0.2 / 3) and m["ppl/gap/focus/documents"] == 3.0
    assert m["ppl/gap/cover/ci_low"] < m["ppl/gap/cover/mean"] < m["ppl/gap/cover/ci_high"]
    # without tree_recency neither part exists; a skipped policy counts as not run
    two = {p: PolicyResult(nll=nll[p], telemetry=[]) for p in ("recency", "lensnet")}
    assert "gap" not in summarise(two, None)
    skipped = {**two, "tree_recency": PolicyResult(skipped="needs depth >= 1")}
    assert "gap" not in summarise(skipped, None)
    assert not any(k.startswith("ppl/gap/") for k in metrics_from_summary(summarise(skipped, None)))


def test_a_policy_scored_on_fewer_documents_is_compared_on_those() -> None:
    """``eval.oracle_documents``: the oracle's ΔNLL and its paired difference use only the documents it scored."""
    from mchar.evals.perplexity import PolicyResult

    full = [1.0, 2.0, 3.0]
    ref = PolicyResult(nll=[1.5, 2.5, 3.5], telemetry=[])
    few = PolicyResult(nll=[1.1, 2.1], telemetry=[])
    s = summarise({"lensnet": ref, "oracle": few}, full, reference="lensnet")
    rec = s["policies"]["oracle"]
    assert rec["documents"] == 2 and s["policies"]["lensnet"]["documents"] == 3
    assert rec["delta_nll"] == pytest.approx(0.1) and rec["full_nll"] == pytest.approx(1.5)
    assert rec["vs_reference"]["documents"] == 2 and rec["vs_reference"]["mean"] == pytest.approx(-0.4)
    m = metrics_from_summary(s)
    assert m["ppl/oracle/documents"] == 2.0 and m["ppl/oracle/full_nll"] == pytest.approx(1.5)
    assert "full_nll" not in s["policies"]["lensnet"]


def test_query_similarity_blends_the_settle_of_relative_score_policies_only(base_dir: Path) -> None:
    from mchar.core.policies import QueryBlendPolicy

    comp = load_components(base_dir, SessionSettings(budget=64, block_size=K, depth=2, query_similarity=2.0))
    for name in ("tree_recency", "random"):
        qp = comp.session(name).query_policy
        assert isinstance(qp, QueryBlendPolicy) and qp.weight == 2.0 and qp.query.name == "similarity"
    for name in (
        "recency",
        "sink_recent",
        "gists_only",
        "similarity",
    ):  # nothing to blend, or blending is a no-op
        assert comp.session(name).query_policy is None
    off = load_components(base_dir, SessionSettings(budget=64, block_size=K, depth=2))
    assert all(off.session(p).query_policy is None for p in ("tree_recency", "random"))
    lexical = load_components(
        base_dir,
        SessionSettings(budget=64, block_size=K, depth=2, query_similarity=1.0, query_scorer="lexical"),
    )
    assert lexical.session("tree_recency").query_policy.query.name == "lexical"
    assert lexical.session("lexical").query_policy is None  # blending with itself is a no-op
    ahead = load_components(
        base_dir,
        SessionSettings(
            budget=64,
            block_size=K,
            depth=2,
            query_similarity=1.0,
            query_scorer="lexical",
            query_follow=1,
            query_idf_power=3.0,
            query_rebuild="coarsest",
            query_tau_expand=0.5,
            query_max_df=3,
            query_churn_guard=False,
            query_recency=0.5,
        ),
    )
    # allocator.query_follow / query_idf_power: the settle's lexical scorer reads a block ahead and sharpens its IDF;
    # the lexical policy streams without either and settles on that scorer; query_rebuild reaches the session
    settle = ahead.session("tree_recency")
    query = settle.query_policy.query
    assert (query.follow, query.idf_power, settle.query_rebuild) == (1, 3.0, "coarsest")
    assert settle.query_tau_expand == 0.5 and lexical.session("tree_recency").query_tau_expand is None
    assert settle.query_churn_guard is False and lexical.session("tree_recency").query_churn_guard is True
    # query_recency: the ramp joins the settle's blend of a policy with an order of its own, never tree_recency's
    assert settle.query_policy.recency == 0.0 and ahead.session("random").query_policy.recency == 0.5
    assert lexical.session("random").query_policy.recency == 0.0
    lex = ahead.session("lexical")
    assert (lex.policy.follow, lex.policy.idf_power) == (0, 1.0)
    assert lex.query_policy.name == "lexical"
    assert (lex.query_policy.follow, lex.query_policy.idf_power, lex.query_policy.max_df) == (1, 3.0, 3)
    assert (
        query.max_df == 3 and lex.policy.max_df is None
    )  # the cap reaches the settle's scorer, not streaming
    assert lexical.session("tree_recency").query_rebuild == "off"
    with pytest.raises(EvalError, match="query_rebuild"):
        SessionSettings(budget=64, block_size=K, depth=2, query_rebuild="fresh").check()
    with pytest.raises(EvalError, match="query_max_df"):
        SessionSettings(budget=64, block_size=K, depth=2, query_max_df=0).check()
    with pytest.raises(EvalError, match="query_tau_expand"):
        SessionSettings(budget=64, block_size=K, depth=2, query_tau_expand=float("nan")).check()


def test_query_lookahead_applies_to_the_settle_only(base_dir: Path) -> None:
    """``allocator.query_lookahead``: content scorers stream on one-step scores and settle with the lookahead (or
    the reverse); unset, the settle follows ``allocator.lookahead``."""
    from mchar.core.policies import LookaheadPolicy, QueryBlendPolicy

    def settings(**kw: object) -> SessionSettings:
        return SessionSettings(budget=64, block_size=K, depth=2, **kw)

    split = load_components(base_dir, settings(lookahead=False, query_lookahead=True))
    s = split.session("similarity")
    assert not isinstance(s.policy, LookaheadPolicy) and isinstance(s.query_policy, LookaheadPolicy)
    assert split.session("tree_recency").query_policy is None  # not a content scorer: nothing to look at
    blend = load_components(base_dir, settings(lookahead=False, query_lookahead=True, query_similarity=1.0))
    qp = blend.session("similarity").query_policy
    assert isinstance(qp, LookaheadPolicy)  # similarity blends with nothing, but settles with the lookahead
    qp = blend.session("tree_recency").query_policy
    assert isinstance(qp, QueryBlendPolicy) and isinstance(qp.query, LookaheadPolicy)
    reverse = load_components(base_dir, settings(lookahead=True, query_lookahead=False))
    s = reverse.session("similarity")
    assert isinstance(s.policy, LookaheadPolicy) and not isinstance(s.query_policy, LookaheadPolicy)
    same = load_components(base_dir, settings(lookahead=True, query_lookahead=True))
    assert same.session("similarity").query_policy is None  # the settle scores as it streams


def test_an_exported_lensnet_ensemble_streams_as_the_lensnet_policy(
    base_dir: Path, docs: list[torch.Tensor], tmp_path: Path
) -> None:
    """``scripts/lensnet_ensemble.py`` writes seed replicates as one export; ``eval.lensnet_dir`` loads it like one
    LensNet and the ``lensnet`` policy streams with it; members that read other inputs write nothing."""
    import subprocess
    import sys

    from mchar.core.lensnet import LensNet, LensNetEnsemble

    script = Path(__file__).resolve().parents[2] / "scripts" / "lensnet_ensemble.py"
    for i, tail in enumerate((8, 8, 16)):
        torch.manual_seed(i)
        LensNet(32, width=16, n_layers=1, n_heads=4, tail_tokens=tail, recency_prior=0.5).save_pretrained(
            tmp_path / f"m{i}"
        )
    run = [sys.executable, str(script)]
    subprocess.run([*run, str(tmp_path / "ens"), str(tmp_path / "m0"), str(tmp_path / "m1")], check=True)
    bad = subprocess.run(
        [*run, str(tmp_path / "bad"), str(tmp_path / "m0"), str(tmp_path / "m2")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and "tail_tokens" in bad.stderr and not (tmp_path / "bad").exists()
    settings = SessionSettings(budget=32, block_size=K, depth=2, protect_tokens=K)
    comp = load_components(base_dir, settings, lensnet=tmp_path / "ens")
    assert isinstance(comp.lensnet, LensNetEnsemble) and len(comp.lensnet.members) == 2
    res = evaluate_policy(lambda: comp.session("lensnet"), docs[:1], FINAL, 32, map_document=0)
    assert np.isfinite(res.nll)
