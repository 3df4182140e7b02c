"""Storage backends: format checks, mismatch errors, corruption detection, torn-tail recovery, refresh atomicity."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from mchar.bench.fault import make_fns, token_stream
from mchar.core import storage as storage_mod
from mchar.core.storage import HEADER_SIZE, DiskStorage, MemoryStorage, StorageError
from mchar.core.tree import MegaContextTree

K, DEPTH, DIM = 4, 2, 8
EMBED, GIST = make_fns(DIM, seed=2)
MODEL = "tiny/llama-test"


def make_tree(path: Path, n: int = 101, dtype: str = "float16") -> MegaContextTree:
    tree = MegaContextTree.create(
        path,
        block_size=K,
        depth=DEPTH,
        dim=DIM,
        embed_fn=EMBED,
        gist_fn=GIST,
        dtype=dtype,
        base_model_id=MODEL,
        fsync_metadata=False,
    )
    tree.ingest(token_stream(0, n))
    return tree


def snapshot(tree: MegaContextTree) -> list[torch.Tensor]:
    return [tree.tokens()] + [tree.gists(lv).clone() for lv in range(1, DEPTH + 1)]


def reopen(path: Path, **kw) -> MegaContextTree:
    return MegaContextTree.open(path, embed_fn=EMBED, gist_fn=GIST, **kw)


def assert_snapshot(tree: MegaContextTree, snap: list[torch.Tensor]) -> None:
    got = snapshot(tree)
    for a, b in zip(got, snap, strict=True):
        assert torch.equal(a, b)


@pytest.fixture
def tree_dir(tmp_path: Path) -> tuple[Path, list[torch.Tensor]]:
    path = tmp_path / "tree"
    tree = make_tree(path)
    snap = snapshot(tree)
    tree.close()
    return path, snap


def test_layout_header_and_metadata(tree_dir: tuple[Path, list[torch.Tensor]]) -> None:
    path, snap = tree_dir
    names = sorted(p.name for p in path.iterdir())
    assert names == ["lod0.ids", "lod1.gists", "lod2.gists", "metadata.json"]
    meta = json.loads((path / "metadata.json").read_text())
    for key in (
        "base_model_id",
        "dim",
        "block_size",
        "depth",
        "dtype",
        "gist_version",
        "created",
        "modified",
    ):
        assert key in meta
    assert [lv["count"] for lv in meta["levels"]] == [101, 25, 6]
    assert (path / "lod0.ids").stat().st_size == HEADER_SIZE + 101 * 4
    assert (path / "lod1.gists").stat().st_size == HEADER_SIZE + 25 * DIM * 2
    raw = (path / "lod0.ids").read_bytes()
    assert raw[:8] == storage_mod.MAGIC
    assert np.array_equal(np.frombuffer(raw[HEADER_SIZE:], dtype="<u4"), snap[0].numpy())


def test_reopen_readonly_and_create_twice(tree_dir: tuple[Path, list[torch.Tensor]]) -> None:
    path, snap = tree_dir
    with reopen(path, readonly=True) as ro:
        assert_snapshot(ro, snap)
        with pytest.raises(StorageError, match="read-only"):
            ro.ingest(token_stream(101, 102))
    with pytest.raises(StorageError, match="already exists"):
        make_tree(path)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("base_model_id", "other/model"),
        ("dim", DIM * 2),
        ("block_size", K * 2),
        ("dtype", "bfloat16"),
        ("depth", 3),
    ],
)
def test_reopen_mismatch_names_key(
    tree_dir: tuple[Path, list[torch.Tensor]], key: str, value: object
) -> None:
    path, _ = tree_dir
    with pytest.raises(StorageError, match=f"{key} mismatch") as ei:
        DiskStorage.open(path, **{key: value})
    assert "\n" not in str(ei.value)


def test_matching_expectations_open(tree_dir: tuple[Path, list[torch.Tensor]]) -> None:
    path, snap = tree_dir
    with reopen(path, base_model_id=MODEL, dim=DIM, block_size=K, dtype="fp16", depth=DEPTH) as t:
        assert_snapshot(t, snap)


def _rewrite_header(path: Path, **fields: int) -> None:
    raw = bytearray(path.read_bytes())
    vals = list(storage_mod._HEADER_BODY.unpack(bytes(raw[: HEADER_SIZE - 4])))
    order = [
        "magic",
        "format_version",
        "header_size",
        "level",
        "dtype",
        "block_size",
        "dim",
        "stride",
        "depth",
    ]
    for k, v in fields.items():
        vals[order.index(k)] = v
    body = storage_mod._HEADER_BODY.pack(*vals)
    raw[: HEADER_SIZE - 4] = body
    raw[HEADER_SIZE - 4 : HEADER_SIZE] = struct.pack("<I", zlib.crc32(body))
    path.write_bytes(bytes(raw))


def test_header_field_mismatch_is_named(tree_dir: tuple[Path, list[torch.Tensor]]) -> None:
    path, _ = tree_dir
    _rewrite_header(path / "lod1.gists", dim=DIM + 1)
    with pytest.raises(StorageError, match=r"lod1\.gists: header dim mismatch"):
        reopen(path)


def test_corrupted_header_detected(tree_dir: tuple[Path, list[torch.Tensor]]) -> None:
    path, _ = tree_dir
    f = path / "lod2.gists"
    raw = bytearray(f.read_bytes())
    raw[40] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(StorageError, match=r"lod2\.gists: header checksum"):
        reopen(path)
    raw[:8] = b"NOTATREE"
    f.write_bytes(bytes(raw))
    with pytest.raises(StorageError, match="bad magic"):
        reopen(path)


def test_truncated_file_detected(tree_dir: tuple[Path, list[torch.Tensor]]) -> None:
    path, _ = tree_dir
    f = path / "lod0.ids"
    os.truncate(f, f.stat().st_size - 3)
    with pytest.raises(StorageError, match=r"lod0\.ids: truncated"):
        reopen(path)
    os.truncate(f, 10)
    with pytest.raises(StorageError, match="header truncated"):
        reopen(path)


def test_payload_corruption_detected(tree_dir: tuple[Path, list[torch.Tensor]]) -> None:
    path, _ = tree_dir
    f = path / "lod1.gists"
    raw = bytearray(f.read_bytes())
    raw[HEADER_SIZE + 5] ^= 0x01
    f.write_bytes(bytes(raw))
    with pytest.raises(StorageError, match="checksum mismatch"):
        reopen(path)
    reopen(path, verify=False).close()  # opt-out exists for huge trees


@pytest.mark.parametrize("readonly", [False, True])
def test_torn_tail_discarded(tree_dir: tuple[Path, list[torch.Tensor]], readonly: bool) -> None:
    path, snap = tree_dir
    sizes = {}
    for name in ("lod0.ids", "lod1.gists", "lod2.gists"):
        with open(path / name, "ab") as fh:
            fh.write(os.urandom(37))
        sizes[name] = (path / name).stat().st_size
    with reopen(path, readonly=readonly) as t:
        assert_snapshot(t, snap)
        for name, size in sizes.items():
            assert (path / name).stat().st_size == (size if readonly else size - 37)
        if not readonly:
            t.ingest(token_stream(101, 400))
            ref = MegaContextTree.in_memory(K, DEPTH, DIM, EMBED, GIST, dtype="float16")
            ref.ingest(token_stream(0, 400))
            assert torch.equal(t.tokens(), ref.tokens())
            for lv in range(1, DEPTH + 1):
                assert torch.equal(t.gists(lv), ref.gists(lv))


def test_uncommitted_appends_are_discarded(tmp_path: Path) -> None:
    st = DiskStorage.create(tmp_path / "s", block_size=K, depth=1, dim=DIM, fsync_metadata=False)
    st.append_tokens(torch.arange(10))
    st.commit()
    st.append_tokens(torch.arange(5))  # never committed: lost on "crash"
    st.append_gists(1, torch.ones(2, DIM))
    assert st.count(0) == 15 and st.committed_count(0) == 10
    st.close()
    st2 = DiskStorage.open(tmp_path / "s")
    assert st2.count(0) == 10 and st2.count(1) == 0
    assert torch.equal(st2.read_tokens(0, 10), torch.arange(10))
    st2.close()


def test_metadata_problems(tree_dir: tuple[Path, list[torch.Tensor]], tmp_path: Path) -> None:
    path, _ = tree_dir
    with pytest.raises(StorageError, match="no metadata.json"):
        DiskStorage.open(tmp_path / "nowhere")
    (path / "lod2.gists").unlink()
    with pytest.raises(StorageError, match=r"lod2\.gists: level file missing"):
        reopen(path)
    (path / "metadata.json").write_text("{not json")
    with pytest.raises(StorageError, match="unreadable metadata"):
        reopen(path)
    (path / "metadata.json").write_text(json.dumps({"format": "mchar-tree", "format_version": 99}))
    with pytest.raises(StorageError, match="format_version mismatch"):
        reopen(path)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_gist_dtype_roundtrip_exact(tmp_path: Path, dtype: str) -> None:
    tdt = getattr(torch, dtype)
    g = torch.randn(7, DIM).to(tdt)
    st = DiskStorage.create(
        tmp_path / dtype, block_size=K, depth=1, dim=DIM, dtype=dtype, fsync_metadata=False
    )
    st.append_gists(1, g)
    st.commit()
    st.close()
    st = DiskStorage.open(tmp_path / dtype, dtype=tdt)
    out = st.read_gists(1, 0, 7)
    assert out.dtype == tdt and torch.equal(out, g)
    assert torch.equal(st.gather_gists(1, [6, 0, 3]), g[[6, 0, 3]])
    st.close()


@pytest.mark.parametrize("backend", ["memory", "disk"])
def test_backend_contract(tmp_path: Path, backend: str) -> None:
    if backend == "memory":
        st = MemoryStorage(K, 2, DIM, "float32", MODEL)
    else:
        st = DiskStorage.create(
            tmp_path / "s", block_size=K, depth=2, dim=DIM, dtype="float32", base_model_id=MODEL
        )
    st.append_tokens([1, 2, 3])
    st.append_tokens(np.array([4], dtype=np.int32))
    assert torch.equal(st.read_tokens(1, 4), torch.tensor([2, 3, 4]))
    with pytest.raises(IndexError):
        st.read_tokens(0, 5)
    with pytest.raises(IndexError):
        st.read_gists(3, 0, 0)
    with pytest.raises(ValueError):
        st.append_tokens([-1])
    with pytest.raises(ValueError):
        st.append_gists(1, torch.zeros(2, DIM + 1))
    st.append_gists(1, torch.arange(2 * DIM, dtype=torch.float32).view(2, DIM))
    # a growing file is re-mapped: read, append, read again
    assert st.read_gists(1, 0, 2).shape == (2, DIM)
    st.append_gists(1, torch.ones(1, DIM))
    assert torch.equal(st.read_gists(1, 2, 3), torch.ones(1, DIM))
    st.commit()
    assert st.metadata()["counts" if backend == "memory" else "levels"] is not None
    assert st.committed_count(1) == 3 and st.gist_version == 0
    st.begin_refresh()
    st.write_refreshed_gists(1, 1, torch.full((1, DIM), 5.0))
    assert torch.equal(st.read_gists(1, 1, 2), torch.arange(DIM, 2 * DIM, dtype=torch.float32).view(1, DIM))
    assert torch.equal(st.read_gists(1, 1, 2, staged=True), torch.full((1, DIM), 5.0))
    st.commit_refresh(3)
    assert st.gist_version == 3
    assert torch.equal(st.read_gists(1, 1, 2), torch.full((1, DIM), 5.0))
    st.close()


def _die(st: DiskStorage) -> None:
    """Simulate the process dying: drop file handles and the writer lock, without any cleanup."""
    for f in st._files:
        f.close()
    st._unlock()


def test_single_writer_lock(tree_dir: tuple[Path, list[torch.Tensor]]) -> None:
    path, snap = tree_dir
    writer = reopen(path)
    with pytest.raises(StorageError, match="already open for writing"):
        reopen(path)
    with reopen(path, readonly=True) as ro:  # readers never block
        assert_snapshot(ro, snap)
    writer.close()
    reopen(path).close()


def test_refresh_crash_before_publish_keeps_old(
    tree_dir: tuple[Path, list[torch.Tensor]], monkeypatch
) -> None:
    path, snap = tree_dir
    tree = reopen(path)
    monkeypatch.setattr(tree.storage, "_publish", lambda **kw: (_ for _ in ()).throw(KeyboardInterrupt()))
    tree.storage.begin_refresh()
    tree.storage.write_refreshed_gists(1, 0, torch.zeros(1, DIM))
    with pytest.raises(KeyboardInterrupt):
        tree.storage.commit_refresh(5)
    _die(tree.storage)  # staging files stay behind, nothing cleaned up
    assert list(path.glob("*.refresh"))
    with reopen(path) as t:
        assert t.gist_version == 0
        assert_snapshot(t, snap)
    assert not list(path.glob("*.refresh"))


def test_refresh_crash_after_publish_rolls_forward(
    tree_dir: tuple[Path, list[torch.Tensor]], monkeypatch
) -> None:
    path, _ = tree_dir
    tree = reopen(path)
    real_replace = os.replace

    def dying_replace(src, dst):  # metadata publish succeeds, the level-file swap "crashes"
        if str(src).endswith(".refresh"):
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(storage_mod.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        tree.refresh(lambda x, level: x.mean(dim=1) + 1.0, version=4)
    monkeypatch.setattr(storage_mod.os, "replace", real_replace)
    _die(tree.storage)
    meta = json.loads((path / "metadata.json").read_text())
    assert meta["refresh_pending"]["version"] == 4
    with pytest.raises(StorageError, match="refresh is pending"):
        reopen(path, readonly=True)
    with reopen(path) as t:
        assert t.gist_version == 4
        ref = MegaContextTree.in_memory(
            K, DEPTH, DIM, EMBED, lambda x, level: x.mean(dim=1) + 1.0, dtype="float16"
        )
        ref.ingest(token_stream(0, 101))
        for lv in range(1, DEPTH + 1):
            assert torch.equal(t.gists(lv), ref.gists(lv))
    assert json.loads((path / "metadata.json").read_text())["refresh_pending"] is None
