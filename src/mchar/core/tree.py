"""The MegaContext tree: append-only token history plus a pyramid of gists, over any :class:`TreeStorage`.

Streaming contract: ``ingest`` accepts chunks of any size and the resulting tree depends only on the token
sequence, not on how it was chunked, provided ``gist_fn`` is batch-invariant (row i of the output depends only
on row i of the input). To make that hold across chunk boundaries, parents are always built from the
*stored* children (i.e. after rounding to the storage dtype), never from fresh full-precision values.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from mchar.core.entries import Entry, node_span
from mchar.core.protocols import EmbedFn, GistFn
from mchar.core.storage import DiskStorage, MemoryStorage, StorageError, TreeStorage

__all__ = ["MegaContextTree", "StorageError"]


class MegaContextTree:
    """Append-only tree: level 0 = tokens, level l >= 1 = one gist per K**l tokens (full blocks only)."""

    def __init__(
        self,
        block_size: int,
        depth: int,
        storage: TreeStorage,
        embed_fn: EmbedFn,
        gist_fn: GistFn,
        *,
        gist_batch: int | None = None,
    ) -> None:
        """``gist_batch`` caps nodes per gist_fn call (None: all nodes completed by one ingest in one call)."""
        if storage.block_size != block_size or storage.depth != depth:
            raise StorageError(
                f"tree (block_size={block_size}, depth={depth}) does not match its storage "
                f"(block_size={storage.block_size}, depth={storage.depth})"
            )
        if embed_fn is None or gist_fn is None:
            raise ValueError("embed_fn and gist_fn are required")
        self.block_size = block_size
        self.depth = depth
        self.storage = storage
        self.embed_fn = embed_fn
        self.gist_fn = gist_fn
        self.gist_batch = gist_batch
        self._emb_dtype: torch.dtype | None = None
        self._emb_device: torch.device | None = None
        if self._missing_nodes() and not getattr(storage, "readonly", False):
            # storage holds tokens whose gists were never built (e.g. written by a raw importer): catch up
            self._build(self.gist_fn)
            self.storage.commit()

    # ------------------------------------------------------------------ constructors
    @classmethod
    def in_memory(
        cls,
        block_size: int,
        depth: int,
        dim: int,
        embed_fn: EmbedFn,
        gist_fn: GistFn,
        *,
        dtype: str | torch.dtype = "float32",
        base_model_id: str = "",
        **kw: Any,
    ) -> MegaContextTree:
        storage = MemoryStorage(block_size, depth, dim, dtype, base_model_id)
        return cls(block_size, depth, storage, embed_fn, gist_fn, **kw)

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        *,
        block_size: int,
        depth: int,
        dim: int,
        embed_fn: EmbedFn,
        gist_fn: GistFn,
        dtype: str | torch.dtype = "float16",
        base_model_id: str = "",
        gist_batch: int | None = None,
        **storage_kw: Any,
    ) -> MegaContextTree:
        """New on-disk tree at ``path`` (see :meth:`DiskStorage.create` for ``storage_kw``)."""
        storage = DiskStorage.create(
            path,
            block_size=block_size,
            depth=depth,
            dim=dim,
            dtype=dtype,
            base_model_id=base_model_id,
            **storage_kw,
        )
        return cls(block_size, depth, storage, embed_fn, gist_fn, gist_batch=gist_batch)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        embed_fn: EmbedFn,
        gist_fn: GistFn,
        gist_batch: int | None = None,
        **expect: Any,
    ) -> MegaContextTree:
        """Reopen an on-disk tree; ``expect`` (base_model_id, dim, block_size, depth, dtype, readonly, ...)
        is checked/forwarded by :meth:`DiskStorage.open`."""
        storage = DiskStorage.open(path, **expect)
        return cls(storage.block_size, storage.depth, storage, embed_fn, gist_fn, gist_batch=gist_batch)

    # ------------------------------------------------------------------ queries
    @property
    def dim(self) -> int:
        return self.storage.dim

    @property
    def num_tokens(self) -> int:
        return self.storage.count(0)

    @property
    def num_blocks(self) -> int:
        """Complete raw blocks (= LOD1 nodes once built)."""
        return self.num_tokens // self.block_size

    @property
    def gist_version(self) -> int:
        return self.storage.gist_version

    def num_nodes(self, level: int) -> int:
        """Nodes at ``level`` (level 0 = tokens)."""
        if not 0 <= level <= self.depth:
            raise IndexError(f"level must be in [0, {self.depth}], got {level}")
        return self.storage.count(level)

    def node_span(self, level: int, index: int) -> tuple[int, int]:
        return node_span(level, index, self.block_size)

    def tokens(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Token ids [start, end) as int64 (end defaults to all tokens)."""
        end = self.num_tokens if end is None else end
        return self.storage.read_tokens(start, end)

    def gists(self, level: int, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Gists [start, end) of ``level`` as [n, d] in the storage dtype, on CPU."""
        end = self.storage.num_gists(level) if end is None else end
        return self.storage.read_gists(level, start, end)

    def tail_tokens(self) -> torch.Tensor:
        """The incomplete newest block (0..K-1 tokens), never gisted."""
        return self.tokens(self.num_blocks * self.block_size, self.num_tokens)

    def entry_embeddings(self, entries: Sequence[Entry]) -> torch.Tensor:
        """Embeddings of working-context entries in order: K token embeddings per raw block, 1 per gist.

        Returned on the embed_fn's device and dtype (gists are cast to it)."""
        raw = [e.index for e in entries if e.level == 0]
        for e in entries:
            if e.level < 0 or e.level > self.depth:
                raise IndexError(f"entry level {e.level} outside [0, {self.depth}]")
            n = self.num_blocks if e.level == 0 else self.storage.num_gists(e.level)
            if not 0 <= e.index < n:
                raise IndexError(f"{e} does not exist (level has {n} complete nodes)")
        raw_emb = None
        if raw:
            idx = torch.as_tensor(raw, dtype=torch.int64)
            ids = self._block_ids(idx)
            raw_emb = self._embed(ids)  # [R, K, d]
        dtype, device = self._embed_meta()
        gist_rows: dict[int, torch.Tensor] = {}
        gist_pos: dict[int, dict[int, int]] = {}
        for level in sorted({e.level for e in entries if e.level > 0}):
            ix = sorted({e.index for e in entries if e.level == level})
            gist_rows[level] = self.storage.gather_gists(level, np.asarray(ix)).to(device=device, dtype=dtype)
            gist_pos[level] = {i: j for j, i in enumerate(ix)}
        pieces: list[torch.Tensor] = []
        r = 0
        for e in entries:
            if e.level == 0:
                assert raw_emb is not None
                pieces.append(raw_emb[r])
                r += 1
            else:
                j = gist_pos[e.level][e.index]
                pieces.append(gist_rows[e.level][j : j + 1])
        if not pieces:
            return torch.empty(0, self.dim, dtype=dtype, device=device)
        return torch.cat(pieces, dim=0)

    def _block_ids(self, block_idx: torch.Tensor) -> torch.Tensor:
        """Token ids [R, K] of raw blocks (one contiguous read when they are contiguous)."""
        K = self.block_size
        lo, hi = int(block_idx.min()), int(block_idx.max()) + 1
        span = self.storage.read_tokens(lo * K, hi * K).view(hi - lo, K)
        return span[block_idx - lo]

    # ------------------------------------------------------------------ ingest
    def ingest(self, ids: Any) -> int:
        """Append tokens (any chunk size), build every gist they complete, commit. Returns num_tokens."""
        t = torch.as_tensor(ids).reshape(-1)
        if t.numel():
            self.storage.append_tokens(t)
            self._build(self.gist_fn)
        self.storage.commit()
        return self.num_tokens

    def _missing_nodes(self) -> bool:
        return any(
            self.storage.count(level) < self.storage.count(level - 1) // self.block_size
            for level in range(1, self.depth + 1)
        )

    @torch.no_grad()
    def _build(self, gist_fn: GistFn) -> None:
        """Append every gist whose K children now exist, one batched gist_fn call per level (or per chunk)."""
        K = self.block_size
        for level in range(1, self.depth + 1):
            have = self.storage.count(level)
            ready = self.storage.count(level - 1) // K
            step = self.gist_batch or max(ready - have, 1)
            for s in range(have, ready, step):
                e = min(ready, s + step)
                out = self._compute(gist_fn, level, s, e, staged=False)
                self.storage.append_gists(level, out)

    def _children(self, level: int, s: int, e: int, *, staged: bool) -> torch.Tensor:
        """Inputs [e-s, K, d] of the level-``level`` nodes s..e-1."""
        K = self.block_size
        if level == 1:
            ids = self.storage.read_tokens(s * K, e * K).view(e - s, K)
            return self._embed(ids)
        dtype, device = self._embed_meta()
        kids = self.storage.read_gists(level - 1, s * K, e * K, staged=staged)
        return kids.view(e - s, K, self.dim).to(device=device, dtype=dtype)

    def _compute(self, gist_fn: GistFn, level: int, s: int, e: int, *, staged: bool) -> torch.Tensor:
        children = self._children(level, s, e, staged=staged)
        out = gist_fn(children, level)
        if tuple(out.shape) != (e - s, self.dim):
            raise ValueError(
                f"gist_fn returned {tuple(out.shape)} for level {level}, expected {(e - s, self.dim)}"
            )
        return out.detach()

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        emb = self.embed_fn(ids)
        if tuple(emb.shape) != (*ids.shape, self.dim):
            raise ValueError(f"embed_fn returned {tuple(emb.shape)}, expected {(*ids.shape, self.dim)}")
        self._emb_dtype, self._emb_device = emb.dtype, emb.device
        return emb.detach()

    def _embed_meta(self) -> tuple[torch.dtype, torch.device]:
        if self._emb_dtype is None or self._emb_device is None:
            with torch.no_grad():
                self._embed(torch.zeros(1, dtype=torch.int64))
        assert self._emb_dtype is not None and self._emb_device is not None
        return self._emb_dtype, self._emb_device

    # ------------------------------------------------------------------ refresh
    @torch.no_grad()
    def refresh(self, gist_fn: GistFn | None = None, version: int | None = None) -> int:
        """Recompute every gist bottom-up with ``gist_fn`` (e.g. a retrained GistNet) and stamp ``version``.

        All-or-nothing on disk: readers see either the old or the new gists, never a mix.
        ``gist_fn`` becomes the tree's gist_fn for later ingests. Returns the new gist_version.
        """
        gist_fn = self.gist_fn if gist_fn is None else gist_fn
        version = self.gist_version + 1 if version is None else int(version)
        self.storage.commit()
        self.storage.begin_refresh()
        try:
            for level in range(1, self.depth + 1):
                n = self.storage.count(level)
                step = self.gist_batch or max(n, 1)
                for s in range(0, n, step):
                    e = min(n, s + step)
                    out = self._compute(gist_fn, level, s, e, staged=True)
                    self.storage.write_refreshed_gists(level, s, out)
            self.storage.commit_refresh(version)
        except BaseException:
            self.storage.abort_refresh()
            raise
        self.gist_fn = gist_fn
        return version

    def close(self) -> None:
        self.storage.close()

    def __enter__(self) -> MegaContextTree:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        counts = ", ".join(f"L{lv}={self.storage.count(lv)}" for lv in range(self.depth + 1))
        return f"MegaContextTree(K={self.block_size}, depth={self.depth}, dim={self.dim}, {counts})"
