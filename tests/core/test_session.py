"""MegaContextSession: exactness vs the plain base, KV reuse == no reuse, bounded per-token work."""

from __future__ import annotations

import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mchar.base.adapter import FrozenBaseLM, tiny_causal_lm
from mchar.core.allocator import FocusAllocator
from mchar.core.gistnet import GistNet
from mchar.core.lensnet import LensNet
from mchar.core.policies import LensNetPolicy
from mchar.core.session import MegaContextSession, common_prefix_slots
from mchar.core.tree import MegaContextTree

K = 8
VOCAB = 128


class ZeroPolicy:
    """No opinion strong enough to edit: the WC only changes through advance/fit."""

    allows_drop = False

    def scores(self, wc, tree, context):  # noqa: ANN001, ANN201
        return torch.zeros(len(wc))


class RandomPolicy:
    """Seeded random signed scores: forces expands and collapses at every refocus."""

    allows_drop = False

    def __init__(self, seed: int = 0) -> None:
        self.gen = torch.Generator().manual_seed(seed)

    def scores(self, wc, tree, context):  # noqa: ANN001, ANN201
        return torch.randn(len(wc), generator=self.gen) * 2


def _base(family: str) -> FrozenBaseLM:
    return FrozenBaseLM(tiny_causal_lm(family, vocab_size=VOCAB, hidden_size=32, layers=2, heads=4, seed=1))


def _session(
    base: FrozenBaseLM, budget: int, policy, reuse: bool = True, depth: int = 2
) -> MegaContextSession:  # noqa: ANN001
    torch.manual_seed(0)
    gist = GistNet(base.hidden_size, K, max_level=depth, out_scale=base.embedding_rms).eval()
    tree = MegaContextTree.in_memory(K, depth, base.hidden_size, base.embed, gist)
    alloc = FocusAllocator(tau_expand=0.2, tau_collapse=0.2, max_edits=4, cooldown=1, protect_tokens=K)
    return MegaContextSession(base, tree, alloc, policy, budget, refocus_every=K, reuse_cache=reuse)


_BASE = FrozenBaseLM(tiny_causal_lm("llama", vocab_size=VOCAB, hidden_size=32, layers=2, heads=4, seed=1))


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_all_raw_reproduces_base_logits(family: str) -> None:
    base = _base(family)
    s = _session(base, budget=128, policy=ZeroPolicy())
    hist, cont = _ids(43), _ids(9, seed=1)
    s.ingest(hist[:20])
    s.ingest(hist[20:])
    assert all(e.level == 0 for e in s.wc.entries)
    ref = base.forward_ids(torch.cat([hist, cont]).unsqueeze(0))[0]
    # one uncached forward of the WC is bit-for-bit the plain forward
    assert torch.equal(s.context_logits(), base.forward_ids(hist.unsqueeze(0))[0])
    # scoring through the KV cache matches the plain log-probs
    total, lp = s.score(cont)
    want = torch.log_softmax(ref[42:-1], -1).gather(-1, cont.unsqueeze(-1))[:, 0]
    torch.testing.assert_close(lp, want, atol=1e-5, rtol=1e-5)
    assert abs(total - float(want.sum())) < 1e-4
    assert s.num_tokens == 43  # commit=False leaves history alone
    # ... and a second score reuses the cache without drift
    torch.testing.assert_close(s.score(cont)[1], want, atol=1e-5, rtol=1e-5)
    # commit=True streams through ingest and gives the same numbers
    torch.testing.assert_close(s.score(cont, commit=True)[1], want, atol=1e-5, rtol=1e-5)
    assert s.num_tokens == 52
    torch.testing.assert_close(s.next_token_logits(), ref[-1], atol=1e-5, rtol=1e-5)


def _lens_policy(base: FrozenBaseLM) -> LensNetPolicy:
    torch.manual_seed(4)
    lens = LensNet(base.hidden_size, width=16, n_layers=1, n_heads=2, max_level=2, tail_tokens=K).eval()
    with torch.no_grad():
        lens.score[-1].weight.mul_(50.0)  # random init scores are tiny; make them cross the thresholds
    return LensNetPolicy(lens)


@pytest.mark.parametrize(
    ("family", "policy"), [("llama", "random"), ("gpt2", "random"), ("qwen2", "lensnet")]
)
def test_generation_with_kv_reuse_equals_recompute(family: str, policy: str) -> None:
    base = _base(family)
    prompt = _ids(150, seed=2)
    runs = {}
    for reuse in (True, False):
        pol = RandomPolicy(3) if policy == "random" else _lens_policy(base)
        s = _session(base, budget=48, policy=pol, reuse=reuse)
        s.ingest(prompt)
        edits_before = s.stats.edits
        greedy = s.generate(32)
        sampled = s.generate(16, greedy=False, temperature=0.8, top_k=20, seed=5)
        runs[reuse] = (greedy, sampled, s.stats.edits - edits_before, list(s.stats.fed_slots), s)
    assert runs[True][0] == runs[False][0]
    assert runs[True][1] == runs[False][1]
    assert runs[True][2] > 0, "refocus edits must happen mid-generation"
    s = runs[True][4]
    assert s.wc.cost <= 48 and s.stats.max_wc_slots <= 48
    # the cached run feeds mostly one slot per token; the reference recomputes the whole WC each time
    assert statistics.median(runs[True][3]) == 1
    assert sum(runs[True][3]) < sum(runs[False][3]) / 4


def test_stop_ids_and_sampling_seed() -> None:
    base = _base("llama")
    s = _session(base, budget=40, policy=ZeroPolicy())
    s.ingest(_ids(30))
    first = s.generate(5)
    s2 = _session(base, budget=40, policy=ZeroPolicy())
    s2.ingest(_ids(30))
    out = s2.generate(20, stop_ids=[first[2]])
    assert out == first[:3]


def test_refocus_pending_only_when_tokens_arrived_since_the_last_refocus() -> None:
    base = _base("llama")
    s = _session(base, budget=40, policy=RandomPolicy(2))
    s.ingest(_ids(3 * K))  # a multiple of K: the periodic refocus has just run
    before = s.stats.refocuses
    assert s.refocus_pending() == 0 and s.stats.refocuses == before
    s.ingest(_ids(K // 2, seed=5))  # a question shorter than a block: no periodic refocus yet
    assert s.stats.refocuses == before
    s.refocus_pending()
    assert s.stats.refocuses == before + 1
    assert s.wc.cost <= 40
    s.refocus_pending()
    assert s.stats.refocuses == before + 1


def test_per_token_work_is_bounded() -> None:
    base = _base("llama")
    budget = 32
    per_token = {}
    for mult in (2, 12):
        s = _session(base, budget=budget, policy=RandomPolicy(1), depth=3)
        s.ingest(_ids(budget * mult, seed=mult))
        s.stats.reset()
        s.generate(2 * K)
        assert s.wc.cost <= budget and len(s.wc) <= budget
        assert s.stats.max_wc_slots <= budget
        per_token[mult] = sum(s.stats.fed_slots) / (2 * K)
        assert max(s.stats.fed_slots) <= budget
    # 6x more history does not mean more slots fed per generated token
    assert per_token[12] <= per_token[2] * 1.5 + 1


def test_common_prefix_matches_wc_first_difference() -> None:
    base = _base("llama")
    s = _session(base, budget=48, policy=RandomPolicy(7))
    s.ingest(_ids(120))
    for step in range(30):
        before_wc, before = s.wc.copy(), s.segments()
        s.ingest([step % VOCAB])
        assert common_prefix_slots(before, s.segments()) == before_wc.first_difference(s.wc)


@pytest.mark.parametrize("mode", ["centre", "start", "end"])
def test_segment_assembly_matches_wc_assemble(mode: str) -> None:
    base = _base("llama")
    s = _session(base, budget=48, policy=RandomPolicy(2))
    s.position_mode = mode
    s.ingest(_ids(150))
    s.generate(12)
    x, pos = s._materialise(s.segments(), 0)
    wx, wpos, _ = s.wc.assemble(s.tree, base.embed, position_mode=mode)
    assert any(e.level > 0 for e in s.wc.entries) and any(e.level == 0 for e in s.wc.entries)
    torch.testing.assert_close(x, wx.to(x.dtype))
    assert torch.equal(pos, wpos)


class QuestionNeedlePolicy:
    """Has an opinion only once the question has arrived: the needle's own LOD1 gist or raw block is +1, else -1
    (a one-step scorer, so reaching the raw needle from under an LOD2 gist needs lookahead and several rounds)."""

    name = "question_needle"
    allows_drop = False
    relative_scores = True

    def __init__(self, block: int, question_at: int) -> None:
        self.block, self.question_at = block, question_at

    def scores(self, wc, tree, context):  # noqa: ANN001, ANN201
        if wc.num_tokens < self.question_at:
            return torch.zeros(len(wc))
        return torch.tensor([1.0 if e.level <= 1 and e.index == self.block else -1.0 for e in wc.entries])


@pytest.mark.parametrize("rounds", [1, 2, 4])
def test_query_rounds_walk_down_to_the_needle_and_stop_when_settled(rounds: int) -> None:
    import math

    from mchar.core.entries import Entry
    from mchar.core.policies import LookaheadPolicy

    base = _base("llama")
    history = 4 * K * K  # four LOD2 gists' worth; block 2 lies under LOD2 gist 0
    gist = GistNet(base.hidden_size, K, max_level=2, out_scale=base.embedding_rms).eval()
    tree = MegaContextTree.in_memory(K, 2, base.hidden_size, base.embed, gist)
    alloc = FocusAllocator(
        tau_expand=-math.inf, tau_collapse=math.inf, max_edits=4, cooldown=0, protect_tokens=K
    )
    policy = LookaheadPolicy(QuestionNeedlePolicy(2, question_at=history + 1))
    s = MegaContextSession(base, tree, alloc, policy, 48, refocus_every=K, query_rounds=rounds)
    for c in range(0, history, K):
        s.ingest(_ids(K, seed=c))
    assert Entry(2, 0) in s.wc.entries  # the needle starts under a coarse gist
    s.ingest(_ids(K // 2, seed=99))  # the question: shorter than a block, no periodic refocus yet
    before = s.stats.refocuses
    s.refocus_pending()
    s.wc.validate(tree)
    assert s.wc.cost <= 48
    # round 1 expands the LOD2 gist, round 2 the needle's LOD1 gist, round 3 finds nothing left to do
    assert (Entry(0, 2) in s.wc.entries) == (rounds >= 2)
    assert s.stats.refocuses - before == min(rounds, 3)


class SettingSpy:
    """Scores like recency and records one allocator setting (``attr``) each scoring pass ran under."""

    name = "setting_spy"
    allows_drop = False
    relative_scores = True

    def __init__(self, attr: str = "cooldown") -> None:
        self.allocator, self.seen, self.attr = None, [], attr

    def scores(self, wc, tree, context):  # noqa: ANN001, ANN201
        self.seen.append(getattr(self.allocator, self.attr))
        return torch.linspace(-1.0, 1.0, len(wc))


@pytest.mark.parametrize(
    ("attr", "value", "bad", "error"),
    [
        ("cooldown", None, -1, "query_cooldown must be >= 0"),
        ("cooldown", 0, -1, "query_cooldown must be >= 0"),
        ("cooldown", 1, -1, "query_cooldown must be >= 0"),
        ("tau_expand", None, float("inf"), "query_tau_expand must be a finite number"),
        ("tau_expand", 0.5, float("nan"), "query_tau_expand must be a finite number"),
    ],
)
def test_the_settle_runs_under_its_own_allocator_settings_and_streaming_keeps_its_own(
    attr: str, value: float | None, bad: float, error: str
) -> None:
    """The settle before an answer may replace the streaming cooldown (it vetoes re-expanding what a refocus just
    collapsed, and a vetoed round has no edits, ending the settle) and expand threshold (``query_cooldown``,
    ``query_tau_expand``); streaming refocuses keep theirs, and the allocator has them back afterwards."""
    import math

    base = _base("llama")
    gist = GistNet(base.hidden_size, K, max_level=2, out_scale=base.embedding_rms).eval()
    tree = MegaContextTree.in_memory(K, 2, base.hidden_size, base.embed, gist)
    alloc = FocusAllocator(tau_expand=-math.inf, tau_collapse=math.inf, cooldown=2, protect_tokens=K)
    streaming_value = getattr(alloc, attr)
    spy = SettingSpy(attr)
    spy.allocator = alloc
    s = MegaContextSession(
        base, tree, alloc, spy, 48, refocus_every=K, query_rounds=3, **{f"query_{attr}": value}
    )
    s.ingest(_ids(6 * K))
    streaming = len(spy.seen)
    s.ingest(_ids(K // 2, seed=5))
    s.refocus_pending()
    assert streaming > 0 and set(spy.seen[:streaming]) == {streaming_value}
    assert set(spy.seen[streaming:]) == {streaming_value if value is None else value}
    assert getattr(alloc, attr) == streaming_value
    with pytest.raises(ValueError, match=error):
        _session_with(base, **{f"query_{attr}": bad})


def test_the_settle_may_set_the_churn_guard_aside_and_streaming_keeps_it() -> None:
    """``query_churn_guard=False``: the settle's rounds run with the allocator's churn guard set aside where there is
    room (``guard_with_room``), streaming refocuses with it, and the allocator has it back afterwards."""
    import math

    base = _base("llama")
    gist = GistNet(base.hidden_size, K, max_level=2, out_scale=base.embedding_rms).eval()
    tree = MegaContextTree.in_memory(K, 2, base.hidden_size, base.embed, gist)
    alloc = FocusAllocator(tau_expand=-math.inf, tau_collapse=math.inf, cooldown=2, protect_tokens=K)
    spy = SettingSpy("guard_with_room")
    spy.allocator = alloc
    s = MegaContextSession(
        base, tree, alloc, spy, 48, refocus_every=K, query_rounds=3, query_churn_guard=False
    )
    s.ingest(_ids(6 * K))
    streaming = len(spy.seen)
    s.ingest(_ids(K // 2, seed=5))
    s.refocus_pending()
    assert streaming > 0 and set(spy.seen[:streaming]) == {True}
    assert set(spy.seen[streaming:]) == {False} and alloc.guard_with_room is True


def test_a_settle_threshold_opens_only_what_stands_out() -> None:
    """From the coarsest cover a budget-filling settle spends every free slot, on gists its scorer rates low too; with
    ``query_tau_expand`` it walks down to the needle alone and leaves the rest of the budget unused."""
    import math

    from mchar.core.entries import Entry
    from mchar.core.policies import LookaheadPolicy

    base = _base("llama")
    history = 4 * K * K
    layouts = {}
    for tau in (None, 0.0):
        gist = GistNet(base.hidden_size, K, max_level=2, out_scale=base.embedding_rms).eval()
        tree = MegaContextTree.in_memory(K, 2, base.hidden_size, base.embed, gist)
        alloc = FocusAllocator(
            tau_expand=-math.inf, tau_collapse=math.inf, max_edits=4, cooldown=0, protect_tokens=K
        )
        settle = LookaheadPolicy(QuestionNeedlePolicy(2, question_at=history + 1))
        s = MegaContextSession(
            base,
            tree,
            alloc,
            ZeroPolicy(),
            64,
            refocus_every=K,
            query_rounds=4,
            query_policy=settle,
            query_rebuild="coarsest",
            query_tau_expand=tau,
        )
        for c in range(0, history, K):
            s.ingest(_ids(K, seed=c))
        s.ingest(_ids(K // 2, seed=99))
        s.refocus_pending()
        s.wc.validate(tree)
        layouts[tau] = s.wc
    tail = history + K // 2 - K  # the protected tail's first token
    opened = [e for e in layouts[0.0].entries if e.level == 0 and e.start(K) < tail]
    assert opened == [Entry(0, 2)]  # the needle alone, raw
    assert layouts[0.0].cost < layouts[None].cost <= 64  # filling spent slots the threshold leaves free


def test_a_query_policy_scores_the_settle_only_and_the_streaming_policy_comes_back() -> None:
    import math

    base = _base("llama")
    gist = GistNet(base.hidden_size, K, max_level=2, out_scale=base.embedding_rms).eval()
    tree = MegaContextTree.in_memory(K, 2, base.hidden_size, base.embed, gist)
    alloc = FocusAllocator(tau_expand=-math.inf, tau_collapse=math.inf, cooldown=2, protect_tokens=K)
    streaming, query = SettingSpy(), SettingSpy()
    streaming.allocator = query.allocator = alloc
    s = MegaContextSession(
        base, tree, alloc, streaming, 48, refocus_every=K, query_rounds=3, query_policy=query
    )
    s.ingest(_ids(6 * K))
    before = len(streaming.seen)
    assert before > 0 and not query.seen
    s.ingest(_ids(K // 2, seed=5))
    s.refocus_pending()
    assert len(streaming.seen) == before and query.seen  # only the query policy scored the settle
    assert s.policy is streaming
    s.ingest(_ids(K, seed=6))
    assert len(streaming.seen) > before  # streaming refocuses score with the streaming policy again


@pytest.mark.parametrize("rebuild", ["recent", "coarsest"])
def test_query_rebuild_settles_from_a_fresh_wc(rebuild: str) -> None:
    """``query_rebuild``: whatever the stream left in the WC, the settle starts from a fresh one (``recent``: the
    allocator's recency-first WC; ``coarsest``: the coarsest cover alone), which a settle scorer with no opinion then
    leaves as it is, and the answer reads that WC through the cache as a fresh forward would; ``off`` keeps the
    stream's WC; an unknown value is refused."""
    from mchar.config import QUERY_REBUILDS
    from mchar.core.session import QUERY_REBUILDS as CORE_REBUILDS

    assert QUERY_REBUILDS == CORE_REBUILDS
    base = _base("llama")
    ids = _ids(10 * K)
    settled = {}
    for mode, reuse in (("off", True), (rebuild, True), (rebuild, False)):
        s = _session(base, budget=48, policy=RandomPolicy(3), reuse=reuse)
        s.query_policy, s.query_rebuild = ZeroPolicy(), mode
        s.ingest(ids)
        streamed = [(e.level, e.index) for e in s.wc.entries]
        s.refocus_pending()
        settled[mode, reuse] = [(e.level, e.index) for e in s.wc.entries], s.generate(3)
        fresh_wc = s.allocator.initial_context(s.tree, 48, expand_recent=rebuild == "recent")
        fresh = [(e.level, e.index) for e in fresh_wc.entries]
        assert streamed != fresh  # the random stream left a WC of its own
        assert settled[mode, reuse][0] == (streamed if mode == "off" else fresh)
    assert settled[rebuild, True] == settled[rebuild, False]  # the cached answer reads the rebuilt WC exactly
    # a settle without a query policy settles as it streams: nothing to rebuild for (a fixed cover could not walk back)
    s = _session(base, budget=48, policy=RandomPolicy(3))
    s.query_rebuild = rebuild
    s.ingest(ids)
    s.allocator.max_edits = 0  # the settle's rounds edit nothing: the WC is what the settle started from
    s.ingest(_ids(3, seed=9))
    before = [(e.level, e.index) for e in s.wc.entries]
    s.refocus_pending()
    assert [(e.level, e.index) for e in s.wc.entries] == before
    with pytest.raises(ValueError, match="query_rebuild must be one of"):
        _session_with(base, query_rebuild="fresh")


def test_query_rounds_must_be_positive() -> None:
    base = _base("llama")
    with pytest.raises(ValueError, match="query_rounds must be >= 1"):
        _session_with(base, query_rounds=0)


def _session_with(base: FrozenBaseLM, **kwargs) -> MegaContextSession:  # noqa: ANN003
    gist = GistNet(base.hidden_size, K, max_level=2, out_scale=base.embedding_rms).eval()
    tree = MegaContextTree.in_memory(K, 2, base.hidden_size, base.embed, gist)
    return MegaContextSession(base, tree, FocusAllocator(), ZeroPolicy(), 40, **kwargs)


@given(
    budget=st.integers(2 * K, 6 * K),
    prompt=st.integers(1, 12 * K),
    settle_at=st.integers(0, 4 * K),
    generated=st.integers(1, 3 * K),
    sink=st.booleans(),
)
@settings(max_examples=25, deadline=None)
def test_a_truncation_baseline_never_holds_a_gist_however_tokens_arrive(
    budget: int, prompt: int, settle_at: int, generated: int, sink: bool
) -> None:
    """``recency`` / ``sink_recent`` are truncation: every slot the base reads is a raw token, after a prompt, a
    question's settle at any offset from the periodic refocus, and each token generated after it (when a block
    completes between two refocuses the oldest block leaves the view; it used to become a LOD1 gist)."""
    from mchar.core.policies import RecencyPolicy, SinkRecentPolicy

    policy = SinkRecentPolicy(sink_blocks=1) if sink else RecencyPolicy()
    session = _session(_BASE, budget, policy)
    session.ingest(_ids(prompt))
    session.ingest(_ids(settle_at, seed=1))
    session.refocus_pending()
    for tok in _ids(generated, seed=2).tolist():
        session.ingest([tok])
        wc = session.wc
        slots = wc.slot_map()
        assert set(slots.levels.tolist()) == {0} and wc.cost <= budget
        assert int(slots.node_index[-1]) == session.num_tokens - 1  # the newest token is in view
