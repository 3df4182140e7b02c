"""MegaContextTree: streaming invariance, counts, spans, tail handling, backends agree, refresh."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mchar.bench.fault import make_fns, token_stream
from mchar.core.entries import Entry, node_span
from mchar.core.storage import MemoryStorage, StorageError
from mchar.core.tree import MegaContextTree

K, DEPTH, DIM = 4, 3, 8
EMBED, GIST = make_fns(DIM, seed=1)


def mem_tree(dtype: str = "float32", **kw) -> MegaContextTree:
    return MegaContextTree.in_memory(K, DEPTH, DIM, EMBED, GIST, dtype=dtype, **kw)


def ingest_chunked(tree: MegaContextTree, ids: torch.Tensor, cuts: list[int]) -> None:
    bounds = sorted({0, len(ids), *[c for c in cuts if 0 < c < len(ids)]})
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        tree.ingest(ids[a:b])


def assert_same(a: MegaContextTree, b: MegaContextTree) -> None:
    assert a.num_tokens == b.num_tokens
    assert torch.equal(a.tokens(), b.tokens())
    for level in range(1, DEPTH + 1):
        assert a.num_nodes(level) == b.num_nodes(level)
        assert torch.equal(a.gists(level), b.gists(level)), level


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(0, 300), cuts=st.lists(st.integers(0, 300), max_size=40))
def test_streaming_chunk_invariance(n: int, cuts: list[int]) -> None:
    ids = token_stream(0, n, seed=3)
    whole, chunked = mem_tree("float16"), mem_tree("float16")
    whole.ingest(ids)
    ingest_chunked(chunked, ids, cuts)
    assert_same(whole, chunked)


def test_one_token_at_a_time_equals_bulk() -> None:
    ids = token_stream(0, 150, seed=4)
    bulk, single = mem_tree(), mem_tree()
    bulk.ingest(ids)
    for t in ids:
        single.ingest(t.reshape(1))
    assert_same(bulk, single)


@pytest.mark.parametrize("n", [0, 1, 3, 4, 15, 16, 63, 64, 65, 200])
def test_gist_counts_per_level(n: int) -> None:
    tree = mem_tree()
    tree.ingest(token_stream(0, n))
    assert tree.num_nodes(0) == tree.num_tokens == n
    for level in range(1, DEPTH + 1):
        assert tree.num_nodes(level) == n // K**level
    assert tree.num_blocks == n // K
    assert torch.equal(tree.tail_tokens(), token_stream(n - n % K, n))


def test_node_spans_match_gist_content() -> None:
    """With a mean-pool gist_fn, gist (l, i) is the mean of the embeddings over node_span(l, i)."""
    tree = MegaContextTree.in_memory(K, DEPTH, DIM, EMBED, lambda x, level: x.mean(dim=1))
    ids = token_stream(0, 3 * K**DEPTH + 7)
    tree.ingest(ids)
    emb = EMBED(ids)
    for level in range(1, DEPTH + 1):
        for i in range(tree.num_nodes(level)):
            s, e = node_span(level, i, K)
            assert tree.node_span(level, i) == (s, e)
            assert e - s == K**level
            torch.testing.assert_close(tree.gists(level, i, i + 1)[0], emb[s:e].mean(0), atol=1e-5, rtol=1e-5)


def test_tail_never_gisted_and_calls_batched() -> None:
    calls: list[tuple[int, tuple[int, ...]]] = []
    embeds: list[tuple[int, ...]] = []

    def gist_fn(x: torch.Tensor, level: int) -> torch.Tensor:
        assert x.dim() == 3 and x.shape[0] >= 1 and x.shape[1:] == (K, DIM), x.shape
        assert not torch.is_grad_enabled()
        calls.append((level, tuple(x.shape)))
        return x.mean(dim=1)

    def embed_fn(ids: torch.Tensor) -> torch.Tensor:
        embeds.append(tuple(ids.shape))
        return EMBED(ids)

    tree = MegaContextTree.in_memory(K, DEPTH, DIM, embed_fn, gist_fn)
    tree.ingest(token_stream(0, K - 1))  # only a tail: nothing gisted
    assert calls == [] and embeds == []
    tree.ingest(token_stream(K - 1, 2 * K**2 + 3))  # completes 8 blocks + 2 LOD2 nodes in one call
    assert calls == [(1, (2 * K, K, DIM)), (2, (2, K, DIM))]
    assert embeds == [(2 * K, K)]
    assert tree.tail_tokens().numel() == 3


def test_gist_batch_splits_calls_without_changing_result() -> None:
    ids = token_stream(0, 500)
    a, b = mem_tree(), mem_tree(gist_batch=3)
    a.ingest(ids)
    b.ingest(ids)
    assert_same(a, b)


def test_entry_embeddings() -> None:
    tree = mem_tree()
    ids = token_stream(0, 2 * K**DEPTH + 5)
    tree.ingest(ids)
    entries = [Entry(0, 0), Entry(1, 1), Entry(2, 1), Entry(3, 1), Entry(0, 2 * K**2)]
    out = tree.entry_embeddings(entries)
    assert out.shape == (K + 1 + 1 + 1 + K, DIM)
    torch.testing.assert_close(out[:K], EMBED(ids[:K]))
    torch.testing.assert_close(out[K], tree.gists(1, 1, 2)[0].float())
    torch.testing.assert_close(out[K + 1], tree.gists(2, 1, 2)[0].float())
    torch.testing.assert_close(out[K + 2], tree.gists(3, 1, 2)[0].float())
    torch.testing.assert_close(out[K + 3 :], EMBED(ids[2 * K**3 : 2 * K**3 + K]))
    assert tree.entry_embeddings([]).shape == (0, DIM)
    with pytest.raises(IndexError):
        tree.entry_embeddings([Entry(0, tree.num_blocks)])  # the tail is not a block
    with pytest.raises(IndexError):
        tree.entry_embeddings([Entry(3, 2)])


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_memory_and_disk_agree(tmp_path: Path, dtype: str) -> None:
    ids = token_stream(0, 777, seed=9)
    mem = mem_tree(dtype)
    mem.ingest(ids)
    disk = MegaContextTree.create(
        tmp_path / "t",
        block_size=K,
        depth=DEPTH,
        dim=DIM,
        embed_fn=EMBED,
        gist_fn=GIST,
        dtype=dtype,
        fsync_metadata=False,
    )
    ingest_chunked(disk, ids, list(range(0, 777, 37)))
    assert_same(mem, disk)
    assert disk.gists(1).dtype == mem.gists(1).dtype == getattr(torch, dtype)
    disk.close()
    reopened = MegaContextTree.open(tmp_path / "t", embed_fn=EMBED, gist_fn=GIST)
    assert_same(mem, reopened)
    assert torch.equal(reopened.tail_tokens(), mem.tail_tokens())
    reopened.ingest(token_stream(777, 900, seed=9))  # continue after reopen
    mem.ingest(token_stream(777, 900, seed=9))
    assert_same(mem, reopened)
    reopened.close()


def test_refresh_memory() -> None:
    tree = mem_tree()
    tree.ingest(token_stream(0, 300))
    old = [tree.gists(lv).clone() for lv in range(1, DEPTH + 1)]
    v = tree.refresh(lambda x, level: x.mean(dim=1) * 2.0, version=7)
    assert v == tree.gist_version == 7
    ref = MegaContextTree.in_memory(K, DEPTH, DIM, EMBED, lambda x, level: x.mean(dim=1) * 2.0)
    ref.ingest(token_stream(0, 300))
    for lv in range(1, DEPTH + 1):
        assert not torch.equal(tree.gists(lv), old[lv - 1])
        assert torch.equal(tree.gists(lv), ref.gists(lv))
    tree.ingest(token_stream(300, 400))  # later ingests use the new gist_fn
    ref.ingest(token_stream(300, 400))
    assert_same(tree, ref)


def test_refresh_persists_on_disk(tmp_path: Path) -> None:
    def new_fn(x: torch.Tensor, level: int) -> torch.Tensor:
        return x.mean(dim=1) - 0.5

    tree = MegaContextTree.create(
        tmp_path / "t", block_size=K, depth=DEPTH, dim=DIM, embed_fn=EMBED, gist_fn=GIST, fsync_metadata=False
    )
    tree.ingest(token_stream(0, 333))
    assert tree.gist_version == 0
    assert tree.refresh(new_fn) == 1
    expected = [tree.gists(lv).clone() for lv in range(1, DEPTH + 1)]
    tree.close()
    assert not list((tmp_path / "t").glob("*.refresh"))
    again = MegaContextTree.open(tmp_path / "t", embed_fn=EMBED, gist_fn=new_fn)
    assert again.gist_version == 1
    assert again.storage.metadata()["gist_version"] == 1
    ref = MegaContextTree.in_memory(K, DEPTH, DIM, EMBED, new_fn, dtype="float16")
    ref.ingest(token_stream(0, 333))
    for lv in range(1, DEPTH + 1):
        assert torch.equal(again.gists(lv), expected[lv - 1])
        assert torch.equal(again.gists(lv), ref.gists(lv))
    again.close()


def test_bad_functions_and_storage_mismatch() -> None:
    with pytest.raises(StorageError, match="block_size"):
        MegaContextTree(K + 1, DEPTH, MemoryStorage(K, DEPTH, DIM), EMBED, GIST)
    tree = MegaContextTree.in_memory(
        K, 1, DIM, EMBED, lambda x, level: x[:, :2].reshape(x.shape[0], -1)[:, :3]
    )
    with pytest.raises(ValueError, match="gist_fn returned"):
        tree.ingest(token_stream(0, K))
    with pytest.raises(TypeError):
        mem_tree().ingest(torch.ones(3))
