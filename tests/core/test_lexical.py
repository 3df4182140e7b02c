"""The lexical index and the ``lexical`` policy: rare shared tokens decide, indexing is incremental."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mchar.core.allocator import initial_context
from mchar.core.lexical import LexicalIndex
from mchar.core.policies import make_policy

from .test_working_context import FakeTree


def test_idf_weights_rare_tokens_and_spans_count_each_token_once() -> None:
    tree = FakeTree(4, 2, 0)
    # blocks: [1 2 3 9] [1 2 3 4] [1 2 3 4] [1 1 1 1]: token 9 in one block, 4 in two, 1 in all four
    tree.ingest(torch.tensor([1, 2, 3, 9, 1, 2, 3, 4, 1, 2, 3, 4, 1, 1, 1, 1]))
    index = LexicalIndex()
    index.update(tree)
    assert index.blocks == 4
    assert (
        index.idf(9) == math.log1p(4 / 1) > index.idf(4) == math.log1p(4 / 2) > index.idf(1) == math.log1p(1)
    )
    assert index.idf(7) == 0.0
    got = index.span_scores(torch.tensor([9, 4, 4, 7]), [(0, 1), (1, 2), (3, 4), (0, 4)]).tolist()
    expect = [index.idf(9), index.idf(4), 0.0, index.idf(9) + index.idf(4)]
    assert got == [float(torch.tensor(x).float()) for x in expect]


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(0, 12), min_size=8, max_size=80),
    st.lists(st.integers(0, 12), min_size=1, max_size=8),
    st.integers(1, 3),
)
def test_incremental_index_matches_a_brute_force_scan(ids: list[int], query: list[int], chunks: int) -> None:
    k = 4
    tree = FakeTree(k, 2, 0)
    index = LexicalIndex()
    step = -(-len(ids) // chunks)
    for c in range(0, len(ids), step):  # grown in pieces, as a session ingests
        tree.ingest(torch.tensor(ids[c : c + step]))
        index.update(tree)
    n = len(ids) // k
    blocks = [set(ids[b * k : (b + 1) * k]) for b in range(n)]
    spans = [(b, min(n, b + 2)) for b in range(n)]
    want = []
    for s, e in spans:
        held = set().union(*blocks[s:e]) & set(query)
        want.append(sum(math.log1p(n / sum(t in blk for blk in blocks)) for t in held))
    assert torch.allclose(
        index.span_scores(torch.tensor(query), spans), torch.tensor(want).float(), atol=1e-5
    )


def test_lexical_finds_the_needle_whose_key_matches() -> None:
    """Four needles share their wording and differ in one key token; the question names the third's key."""
    k, wording, keys = 4, [20, 21, 22], [30, 31, 32, 33]
    tree = FakeTree(k, 1, 0, vocab=40)
    filler = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(0))
    needles = {2: 0, 6: 1, 9: 2, 13: 3}  # block -> key
    for b, key in needles.items():
        filler[b * k : (b + 1) * k] = torch.tensor([*wording, keys[key]])
    tree.ingest(filler)
    tree.ingest(torch.tensor([*wording, keys[2]]))  # the question's block: the wording and the third key
    wc = initial_context(tree, 80, expand_recent=False)
    block_of = [e.start(k) // k for e in wc.entries]
    lex = make_policy("lexical", lookback=0).scores(wc, tree)[:-1]  # every block before the question's own
    ranked = [block_of[i] for i in lex.argsort(descending=True).tolist()]
    assert ranked[0] == 9 and set(ranked[1:4]) == {2, 6, 13} and lex.max() > 0 > lex.min()
    # with a block of lookback the block after the needle (where a long needle's value lands) ranks with it
    lex = make_policy("lexical").scores(wc, tree)[:-1]
    ranked = [block_of[i] for i in lex.argsort(descending=True).tolist()]
    assert set(ranked[:2]) == {9, 10} and set(ranked[2:8]) == {2, 3, 6, 7, 13, 14}
    with pytest.raises(ValueError, match="lookback must be >= 0"):
        make_policy("lexical", lookback=-1)


def test_a_new_or_shorter_tree_gets_a_new_index() -> None:
    policy = make_policy("lexical")
    a, b = FakeTree(4, 1, 0), FakeTree(4, 1, 0)
    a.ingest(torch.arange(16))
    b.ingest(torch.arange(8))
    assert policy.index(a).blocks == 4 and policy.index(b).blocks == 2 and policy.index(a).blocks == 4


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.lists(st.integers(0, 12), min_size=48, max_size=48), min_size=1, max_size=3),
    st.integers(1, 8),
    st.integers(0, 2),
    st.sampled_from([1.0, 3.0]),
    st.one_of(st.none(), st.integers(1, 5)),
)
def test_window_lexicon_scores_what_the_trees_index_scores(
    rows: list[list[int]], q: int, lookback: int, idf_power: float, max_df: int | None
) -> None:
    """LensNet trains on :class:`WindowLexicon` (a batch of windows at once) and is served the tree's incremental
    index: for the same tokens, query, spans, IDF power and df cap they agree."""
    from mchar.core.lexical import WindowLexicon

    k, prefix = 4, 40  # 10 complete blocks; tokens past the prefix are the horizon, never indexed
    ids = torch.tensor(rows)
    n = prefix // k
    spans = [(max(0, b - lookback), e) for b in range(n) for e in range(b + 1, min(n, b + 3) + 1)]
    lexicon = WindowLexicon.of(ids, k, prefix, q, idf_power=idf_power, max_df=max_df)
    starts = torch.tensor([s for s, _ in spans]).expand(len(rows), -1)
    ends = torch.tensor([e for _, e in spans]).expand(len(rows), -1)
    got = lexicon.span_scores(torch.arange(len(rows)), starts, ends)
    for r, row in enumerate(rows):
        tree = FakeTree(k, 2, 0)
        tree.ingest(torch.tensor(row[:prefix]))
        index = LexicalIndex()
        index.update(tree)
        want = index.span_scores(torch.tensor(row[prefix - q : prefix]), spans, idf_power, max_df)
        assert torch.allclose(got[r], want, atol=1e-4)


def test_follow_gives_a_key_block_the_hits_of_the_block_after_it() -> None:
    """``follow=1``: a span also reads the block after it, so the block before a match scores with it (the probe's
    setting for needles whose key and value straddle a block boundary); negative reaches are refused."""
    k = 4
    tree = FakeTree(k, 1, 0, vocab=40)
    tree.ingest(
        torch.tensor([1, 2, 3, 4, 30, 5, 6, 7, 8, 9, 10, 11, 15, 16, 17, 18, 12, 13, 14, 30])
    )  # query: 30
    wc = initial_context(tree, 80, expand_recent=False)
    plain = make_policy("lexical", query_tokens=1, lookback=0).scores(wc, tree)
    ahead = make_policy("lexical", query_tokens=1, lookback=0, follow=1).scores(wc, tree)
    assert plain[1] > plain[0] == plain[2]  # block 1 holds token 30; blocks 0 and 2 do not
    assert ahead[0] == ahead[1] > ahead[2]  # block 0 now reads block 1's hit
    with pytest.raises(ValueError, match="follow must be >= 0"):
        make_policy("lexical", follow=-1)


def test_an_idf_power_lets_the_rarest_token_outweigh_words_several_blocks_share() -> None:
    """``idf_power``: each found token weighs IDF to that power. With plain IDF two shared words (each in two
    blocks) outscore one unique token; squared, the unique token wins (a needle's key against the wording every
    needle shares)."""
    tree = FakeTree(4, 2, 0)
    # blocks: [5 6 9 0] [5 6 0 0] [0 0 0 0] [0 0 0 0]: 9 in one block, 5 and 6 in two
    tree.ingest(torch.tensor([5, 6, 9, 0, 5, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]))
    index = LexicalIndex()
    index.update(tree)
    query, spans = torch.tensor([5, 6, 9]), [(0, 1), (1, 2)]
    idf1, idf2 = math.log1p(4 / 1), math.log1p(4 / 2)
    plain = index.span_scores(query, spans).tolist()
    assert plain == pytest.approx([idf1 + 2 * idf2, 2 * idf2])
    squared = index.span_scores(query, spans, idf_power=2.0).tolist()
    assert squared == pytest.approx([idf1**2 + 2 * idf2**2, 2 * idf2**2])
    assert idf1 < 2 * idf2 and idf1**2 > 2 * idf2**2  # the unique token alone now outweighs both shared ones
    assert make_policy("lexical", idf_power=2.0).idf_power == 2.0
    with pytest.raises(ValueError, match="idf_power must be > 0"):
        make_policy("lexical", idf_power=0.0)


def test_a_df_cap_silences_the_words_several_blocks_share() -> None:
    """``max_df``: query tokens more than that many blocks hold count nothing, so a block holding only the shared
    wording scores like one holding nothing (a distractor needle against the haystack), while the rare key still
    counts in full; a cap below one is refused."""
    tree = FakeTree(4, 2, 0)
    # blocks: [5 6 9 0] [5 6 0 0] [0 0 0 0] [0 0 0 0]: 9 in one block, 5 and 6 in two
    tree.ingest(torch.tensor([5, 6, 9, 0, 5, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]))
    index = LexicalIndex()
    index.update(tree)
    query, spans = torch.tensor([5, 6, 9]), [(0, 1), (1, 2), (2, 3)]
    idf1, idf2 = math.log1p(4 / 1), math.log1p(4 / 2)
    assert index.span_scores(query, spans, max_df=2).tolist() == pytest.approx(
        [idf1 + 2 * idf2, 2 * idf2, 0.0]
    )
    capped = index.span_scores(query, spans, idf_power=3.0, max_df=1).tolist()
    assert capped == pytest.approx([idf1**3, 0.0, 0.0])  # the shared block now ties the empty one
    assert make_policy("lexical", max_df=1).max_df == 1
    with pytest.raises(ValueError, match="max_df must be >= 1"):
        make_policy("lexical", max_df=0)
