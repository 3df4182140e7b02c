"""Storage backends for the MegaContext tree: one interface, in memory or on disk.

Level 0 holds token ids, level l >= 1 holds gists (one ``dim`` vector per node). Both backends keep an
*appended* count (visible to this process at once) and a *committed* count (what survives a crash).

On-disk layout (one directory per tree)::

    lod0.ids        header + uint32 token ids            (fixed stride 4 B)
    lod1.gists      header + dim values per gist           (fixed stride dim * itemsize)
    ...
    lod{depth}.gists
    metadata.json   ids, dims, dtype, gist_version, committed count + crc32 per level

Commit protocol (why it is crash-safe against ``kill -9`` at any instant):

1. new records are appended to the level files (optionally fsync'd),
2. the committed counts and running crc32 of every level are published by writing ``metadata.json.tmp``,
   fsync'ing it and ``os.replace``-ing it over ``metadata.json`` (atomic on POSIX).

A crash before step 2 leaves bytes past the committed length (a torn tail); ``open`` truncates each file
to ``header + count * stride`` and never reads those bytes as data. A file *shorter* than its committed
length, a bad header or a crc mismatch is corruption and raises :class:`StorageError`.

Gist refresh writes whole new level files next to the old ones (``*.refresh``), publishes a
``refresh_pending`` record in the metadata, then renames them into place; ``open`` rolls a published
refresh forward and deletes unpublished staging files, so a refresh is all-or-nothing.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import struct
import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX: no single-writer lock
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "DiskStorage",
    "MemoryStorage",
    "StorageError",
    "StorageSpec",
    "TreeStorage",
    "GIST_DTYPES",
]

FORMAT_NAME = "mchar-tree"
FORMAT_VERSION = 1
MAGIC = b"MCHARTRE"
HEADER_SIZE = 128
_HEADER_BODY = struct.Struct("<8sHHHHIIIHH64s28x")  # 124 bytes, then crc32 of those bytes
assert _HEADER_BODY.size == HEADER_SIZE - 4

TOKEN_DTYPE_CODE = 0
# name -> (torch dtype, header code, numpy storage dtype, itemsize). bf16 is stored as its raw uint16 bits.
GIST_DTYPES: dict[str, tuple[torch.dtype, int, type, int]] = {
    "float16": (torch.float16, 1, np.float16, 2),
    "bfloat16": (torch.bfloat16, 2, np.uint16, 2),
    "float32": (torch.float32, 3, np.float32, 4),
}
_DTYPE_ALIASES = {
    "fp16": "float16",
    "half": "float16",
    "bf16": "bfloat16",
    "fp32": "float32",
    "float": "float32",
}


class StorageError(RuntimeError):
    """A tree on disk cannot be opened or written safely (mismatch, corruption, misuse)."""


def dtype_name(dtype: str | torch.dtype) -> str:
    """Canonical gist dtype name ('float16' | 'bfloat16' | 'float32')."""
    if isinstance(dtype, torch.dtype):
        for name, (tdt, *_rest) in GIST_DTYPES.items():
            if tdt == dtype:
                return name
        raise StorageError(f"unsupported gist dtype {dtype}; use one of {sorted(GIST_DTYPES)}")
    name = _DTYPE_ALIASES.get(dtype, dtype)
    if name not in GIST_DTYPES:
        raise StorageError(f"unsupported gist dtype {dtype!r}; use one of {sorted(GIST_DTYPES)}")
    return name


@dataclass(frozen=True)
class StorageSpec:
    """What a tree's bytes mean: reopening with a different spec is an error, never a silent reinterpretation."""

    block_size: int
    depth: int
    dim: int
    dtype: str = "float32"
    base_model_id: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", dtype_name(self.dtype))
        if self.block_size < 2:
            raise ValueError(f"block_size must be >= 2, got {self.block_size}")
        if self.depth < 1:
            raise ValueError(f"depth must be >= 1, got {self.depth}")
        if self.dim < 1:
            raise ValueError(f"dim must be >= 1, got {self.dim}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return GIST_DTYPES[self.dtype][0]


def _as_ids(ids: Any) -> torch.Tensor:
    t = torch.as_tensor(ids).reshape(-1).to("cpu")
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise TypeError(f"token ids must be integers, got {t.dtype}")
    t = t.to(torch.int64)
    if t.numel() and (int(t.min()) < 0 or int(t.max()) > 0xFFFFFFFF):
        raise ValueError("token ids must lie in [0, 2**32)")
    return t


class TreeStorage(ABC):
    """Append-only per-level arrays with commit, range reads and an all-or-nothing gist refresh."""

    spec: StorageSpec

    @property
    def block_size(self) -> int:
        return self.spec.block_size

    @property
    def depth(self) -> int:
        return self.spec.depth

    @property
    def dim(self) -> int:
        return self.spec.dim

    @property
    def dtype(self) -> torch.dtype:
        """Gist dtype as stored (reads return this dtype)."""
        return self.spec.torch_dtype

    @property
    def base_model_id(self) -> str:
        return self.spec.base_model_id

    @property
    @abstractmethod
    def gist_version(self) -> int: ...

    @abstractmethod
    def count(self, level: int) -> int:
        """Records appended at ``level`` (tokens for level 0, gists otherwise), committed or not."""

    @abstractmethod
    def committed_count(self, level: int) -> int:
        """Records at ``level`` that would survive a crash now."""

    def num_tokens(self) -> int:
        return self.count(0)

    def num_gists(self, level: int) -> int:
        self._check_gist_level(level)
        return self.count(level)

    @abstractmethod
    def append_tokens(self, ids: Any) -> None: ...

    @abstractmethod
    def append_gists(self, level: int, gists: torch.Tensor) -> None: ...

    @abstractmethod
    def read_tokens(self, start: int, end: int) -> torch.Tensor:
        """Token ids [start, end) as int64."""

    @abstractmethod
    def read_gists(self, level: int, start: int, end: int, *, staged: bool = False) -> torch.Tensor:
        """Gists [start, end) of ``level`` as [n, dim] in the storage dtype (``staged``: refresh buffer)."""

    def gather_gists(self, level: int, indices: np.ndarray | list[int]) -> torch.Tensor:
        """Gists at arbitrary indices (default: one range read)."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size == 0:
            return torch.empty(0, self.dim, dtype=self.dtype)
        lo, hi = int(idx.min()), int(idx.max()) + 1
        return self.read_gists(level, lo, hi)[torch.from_numpy(idx - lo)]

    @abstractmethod
    def commit(self) -> None:
        """Make everything appended so far durable (atomically)."""

    @abstractmethod
    def begin_refresh(self) -> None:
        """Open a staging buffer per gist level, to be filled by :meth:`write_refreshed_gists`."""

    @abstractmethod
    def write_refreshed_gists(self, level: int, start: int, gists: torch.Tensor) -> None: ...

    @abstractmethod
    def commit_refresh(self, version: int) -> None:
        """Atomically swap every staged level in and stamp ``gist_version``."""

    @abstractmethod
    def abort_refresh(self) -> None: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (does not commit)."""

    def metadata(self) -> dict[str, Any]:
        return {
            "base_model_id": self.base_model_id,
            "block_size": self.block_size,
            "depth": self.depth,
            "dim": self.dim,
            "dtype": self.spec.dtype,
            "gist_version": self.gist_version,
            "counts": [self.committed_count(level) for level in range(self.depth + 1)],
        }

    # helpers shared by both backends
    def _check_gist_level(self, level: int) -> None:
        if not 1 <= level <= self.depth:
            raise IndexError(f"gist level must be in [1, {self.depth}], got {level}")

    def _check_range(self, level: int, start: int, end: int, n: int | None = None) -> None:
        n = self.count(level) if n is None else n
        if not 0 <= start <= end <= n:
            raise IndexError(f"range [{start}, {end}) out of bounds for level {level} with {n} records")

    def _check_gists(self, gists: torch.Tensor) -> torch.Tensor:
        if gists.dim() != 2 or gists.shape[1] != self.dim:
            raise ValueError(f"gists must be [n, {self.dim}], got {tuple(gists.shape)}")
        return gists.detach().to("cpu", self.dtype).contiguous()


class _Buffer:
    """Growable tensor (amortised O(1) appends) for the in-memory backend."""

    def __init__(self, tail: tuple[int, ...], dtype: torch.dtype) -> None:
        self.data = torch.empty((16, *tail), dtype=dtype)
        self.n = 0

    def append(self, x: torch.Tensor) -> None:
        need = self.n + x.shape[0]
        if need > self.data.shape[0]:
            cap = max(need, 2 * self.data.shape[0])
            new = torch.empty((cap, *self.data.shape[1:]), dtype=self.data.dtype)
            new[: self.n] = self.data[: self.n]
            self.data = new
        self.data[self.n : need] = x
        self.n = need

    def view(self) -> torch.Tensor:
        return self.data[: self.n]


class MemoryStorage(TreeStorage):
    """RAM backend with the same semantics as :class:`DiskStorage` (commit only records counts)."""

    def __init__(
        self,
        block_size: int,
        depth: int,
        dim: int,
        dtype: str | torch.dtype = "float32",
        base_model_id: str = "",
    ) -> None:
        self.spec = StorageSpec(block_size, depth, dim, dtype_name(dtype), base_model_id)
        self._levels = [_Buffer((), torch.int64)] + [_Buffer((dim,), self.dtype) for _ in range(depth)]
        self._committed = [0] * (depth + 1)
        self._version = 0
        self._staged: dict[int, torch.Tensor] | None = None

    @property
    def gist_version(self) -> int:
        return self._version

    def count(self, level: int) -> int:
        return self._levels[level].n

    def committed_count(self, level: int) -> int:
        return self._committed[level]

    def append_tokens(self, ids: Any) -> None:
        self._levels[0].append(_as_ids(ids))

    def append_gists(self, level: int, gists: torch.Tensor) -> None:
        self._check_gist_level(level)
        self._levels[level].append(self._check_gists(gists))

    def read_tokens(self, start: int, end: int) -> torch.Tensor:
        self._check_range(0, start, end)
        return self._levels[0].view()[start:end].clone()

    def read_gists(self, level: int, start: int, end: int, *, staged: bool = False) -> torch.Tensor:
        self._check_gist_level(level)
        self._check_range(level, start, end)
        src = self._staged_level(level) if staged else self._levels[level].view()
        return src[start:end].clone()

    def commit(self) -> None:
        self._committed = [b.n for b in self._levels]

    def begin_refresh(self) -> None:
        self._staged = {}

    def _staged_level(self, level: int) -> torch.Tensor:
        if self._staged is None:
            raise StorageError("no refresh in progress: call begin_refresh() first")
        if level not in self._staged:
            self._staged[level] = self._levels[level].view().clone()
        return self._staged[level]

    def write_refreshed_gists(self, level: int, start: int, gists: torch.Tensor) -> None:
        self._check_gist_level(level)
        g = self._check_gists(gists)
        self._check_range(level, start, start + g.shape[0])
        self._staged_level(level)[start : start + g.shape[0]] = g

    def commit_refresh(self, version: int) -> None:
        if self._staged is None:
            raise StorageError("no refresh in progress: call begin_refresh() first")
        for level, data in self._staged.items():
            self._levels[level].data[: data.shape[0]] = data
        self._staged = None
        self._version = int(version)

    def abort_refresh(self) -> None:
        self._staged = None


# --------------------------------------------------------------------------------------------------- disk


def _header_model_field(base_model_id: str) -> bytes:
    raw = base_model_id.encode("utf-8")
    if len(raw) <= 64:
        return raw
    return ("sha256:" + hashlib.sha256(raw).hexdigest()[:56]).encode("ascii")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _LevelFile:
    """One fixed-stride level file: header, appended records, a lazily refreshed read-only memmap."""

    def __init__(self, path: Path, level: int, spec: StorageSpec, *, writable: bool) -> None:
        self.path = path
        self.level = level
        self.spec = spec
        if level == 0:
            self.np_dtype: Any = np.dtype("<u4")
            self.shape_tail: tuple[int, ...] = ()
            self.code = TOKEN_DTYPE_CODE
        else:
            _, self.code, npdt, _ = GIST_DTYPES[spec.dtype]
            self.np_dtype = np.dtype(npdt).newbyteorder("<")
            self.shape_tail = (spec.dim,)
        self.stride = int(self.np_dtype.itemsize * (spec.dim if level else 1))
        self.writable = writable
        self.fh: Any = None
        self.count = 0
        self.crc = 0
        self._mm: np.memmap | None = None
        self._mm_count = 0

    # header
    def header_bytes(self) -> bytes:
        body = _HEADER_BODY.pack(
            MAGIC,
            FORMAT_VERSION,
            HEADER_SIZE,
            self.level,
            self.code,
            self.spec.block_size,
            self.spec.dim,
            self.stride,
            self.spec.depth,
            0,
            _header_model_field(self.spec.base_model_id),
        )
        return body + struct.pack("<I", zlib.crc32(body))

    def check_header(self, raw: bytes) -> None:
        name = self.path.name
        if len(raw) < HEADER_SIZE:
            raise StorageError(f"{name}: header truncated ({len(raw)} of {HEADER_SIZE} bytes)")
        body, (crc,) = raw[: HEADER_SIZE - 4], struct.unpack("<I", raw[HEADER_SIZE - 4 : HEADER_SIZE])
        if body[:8] != MAGIC:
            raise StorageError(f"{name}: bad magic {body[:8]!r} (not an mchar tree level file)")
        if zlib.crc32(body) != crc:
            raise StorageError(f"{name}: header checksum mismatch (corrupted header)")
        magic, ver, hsize, level, code, bsz, dim, stride, depth, _, model = _HEADER_BODY.unpack(body)
        expected = {
            "format_version": (ver, FORMAT_VERSION),
            "header_size": (hsize, HEADER_SIZE),
            "level": (level, self.level),
            "dtype": (code, self.code),
            "block_size": (bsz, self.spec.block_size),
            "dim": (dim, self.spec.dim),
            "stride": (stride, self.stride),
            "depth": (depth, self.spec.depth),
            "base_model_id": (model.rstrip(b"\0"), _header_model_field(self.spec.base_model_id)),
        }
        for key, (got, want) in expected.items():
            if got != want:
                raise StorageError(f"{name}: header {key} mismatch: file has {got!r}, metadata says {want!r}")

    # lifecycle
    def create(self, fsync: bool) -> None:
        with open(self.path, "xb") as f:
            f.write(self.header_bytes())
            f.flush()
            if fsync:
                os.fsync(f.fileno())

    def open(self, committed: int, crc: int, *, verify: bool) -> None:
        name = self.path.name
        if not self.path.is_file():
            raise StorageError(f"{name}: level file missing")
        with open(self.path, "rb") as f:
            self.check_header(f.read(HEADER_SIZE))
        size = self.path.stat().st_size
        want = HEADER_SIZE + committed * self.stride
        if size < want:
            raise StorageError(f"{name}: truncated file ({size} bytes < {want} committed bytes)")
        if verify and self.payload_crc(committed) != crc:
            raise StorageError(f"{name}: payload checksum mismatch (committed data corrupted)")
        if size > want and self.writable:
            os.truncate(self.path, want)  # torn tail from a crash: never committed, discard
        self.count, self.crc = committed, crc
        if self.writable:
            self.fh = open(self.path, "r+b")  # noqa: SIM115 - lives as long as the storage

    def payload_crc(self, n: int) -> int:
        """crc32 of the first ``n`` records, read in bounded chunks."""
        crc, left = 0, n * self.stride
        with open(self.path, "rb") as f:
            f.seek(HEADER_SIZE)
            while left > 0:
                chunk = f.read(min(left, 16 << 20))
                if not chunk:
                    break
                crc = zlib.crc32(chunk, crc)
                left -= len(chunk)
        return crc

    def close(self) -> None:
        self._mm = None
        if self.fh is not None:
            self.fh.close()
            self.fh = None

    # data
    def append(self, arr: np.ndarray) -> None:
        if self.fh is None:
            raise StorageError(f"{self.path.name}: storage opened read-only")
        data = np.ascontiguousarray(arr, dtype=self.np_dtype).tobytes()
        self.fh.seek(HEADER_SIZE + self.count * self.stride)
        self.fh.write(data)
        self.fh.flush()
        self.crc = zlib.crc32(data, self.crc)
        self.count += arr.shape[0]

    def sync(self) -> None:
        if self.fh is not None:
            os.fsync(self.fh.fileno())

    def _map(self, end: int) -> np.memmap:
        if self._mm is None or self._mm_count < end:
            # the file grew since the last map: remap over everything appended so far
            self._mm = np.memmap(
                self.path,
                dtype=self.np_dtype,
                mode="r",
                offset=HEADER_SIZE,
                shape=(self.count, *self.shape_tail),
            )
            self._mm_count = self.count
        return self._mm

    def read(self, start: int, end: int) -> np.ndarray:
        if end <= start:
            return np.empty((0, *self.shape_tail), dtype=self.np_dtype)
        return np.array(self._map(end)[start:end])

    def gather(self, idx: np.ndarray) -> np.ndarray:
        if idx.size == 0:
            return np.empty((0, *self.shape_tail), dtype=self.np_dtype)
        return np.array(self._map(int(idx.max()) + 1)[idx])


class DiskStorage(TreeStorage):
    """Directory-per-tree backend: fixed-stride memory-mapped level files + atomically published metadata."""

    METADATA = "metadata.json"

    def __init__(
        self, path: str | os.PathLike[str], spec: StorageSpec, *, _token: object = None, **kw: Any
    ) -> None:
        if _token is not DiskStorage._PRIVATE:
            raise TypeError("use DiskStorage.create(...) or DiskStorage.open(...)")
        self.path = Path(path)
        self.spec = spec
        self.readonly: bool = kw.get("readonly", False)
        self.fsync_data: bool = kw.get("fsync_data", False)
        self.fsync_metadata: bool = kw.get("fsync_metadata", True)
        self._files = [
            _LevelFile(self.path / self.level_filename(level), level, spec, writable=not self.readonly)
            for level in range(spec.depth + 1)
        ]
        self._meta: dict[str, Any] = {}
        self._committed = [0] * (spec.depth + 1)
        self._staging: dict[int, _LevelFile] | None = None

    _PRIVATE = object()
    _lock_fd: int | None = None

    def _lock(self) -> None:
        """Single writer per tree: an exclusive advisory lock on lod0.ids (released by the kernel on kill)."""
        if fcntl is None or self._lock_fd is not None:
            return
        fd = os.open(self._files[0].path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise StorageError(
                f"{self.path}: tree is already open for writing (by this or another process)"
            ) from None
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)  # closing the fd releases the flock
            self._lock_fd = None

    @staticmethod
    def level_filename(level: int) -> str:
        return "lod0.ids" if level == 0 else f"lod{level}.gists"

    # ------------------------------------------------------------------ create / open
    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        *,
        block_size: int,
        depth: int,
        dim: int,
        dtype: str | torch.dtype = "float16",
        base_model_id: str = "",
        fsync_data: bool = False,
        fsync_metadata: bool = True,
    ) -> DiskStorage:
        """Create an empty tree directory (fails if one already exists there)."""
        path = Path(path)
        spec = StorageSpec(block_size, depth, dim, dtype_name(dtype), base_model_id)
        if (path / cls.METADATA).exists():
            raise StorageError(f"{path}: a tree already exists here (use DiskStorage.open)")
        path.mkdir(parents=True, exist_ok=True)
        self = cls(path, spec, _token=cls._PRIVATE, fsync_data=fsync_data, fsync_metadata=fsync_metadata)
        for f in self._files:
            if f.path.exists():  # leftovers of an interrupted create (no metadata was ever published)
                f.path.unlink()
            f.create(fsync=fsync_metadata)
        now = _now()
        self._meta = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "base_model_id": base_model_id,
            "block_size": block_size,
            "depth": depth,
            "dim": dim,
            "dtype": spec.dtype,
            "gist_version": 0,
            "commit_seq": 0,
            "created": now,
            "modified": now,
            "levels": [],
            "refresh_pending": None,
        }
        self._lock()
        for f in self._files:
            f.open(0, 0, verify=False)
        self._publish()
        return self

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        block_size: int | None = None,
        depth: int | None = None,
        dim: int | None = None,
        dtype: str | torch.dtype | None = None,
        base_model_id: str | None = None,
        readonly: bool = False,
        verify: bool = True,
        fsync_data: bool = False,
        fsync_metadata: bool = True,
    ) -> DiskStorage:
        """Open an existing tree; each given expectation must match or a one-line StorageError names the key.

        A torn tail (bytes past the committed length) is discarded; committed data is never modified.
        ``verify`` re-checks the crc32 of every committed payload (reads each file once).
        """
        path = Path(path)
        meta = cls._read_metadata(path)
        expect = {
            "base_model_id": base_model_id,
            "block_size": block_size,
            "depth": depth,
            "dim": dim,
            "dtype": None if dtype is None else dtype_name(dtype),
        }
        for key, want in expect.items():
            if want is not None and meta.get(key) != want:
                raise StorageError(
                    f"{path}: {key} mismatch: tree has {meta.get(key)!r}, caller expects {want!r}"
                )
        try:
            spec = StorageSpec(
                meta["block_size"], meta["depth"], meta["dim"], meta["dtype"], meta["base_model_id"]
            )
        except (KeyError, ValueError, StorageError) as e:
            raise StorageError(f"{path}: invalid metadata.json ({e})") from e
        self = cls(
            path,
            spec,
            _token=cls._PRIVATE,
            readonly=readonly,
            fsync_data=fsync_data,
            fsync_metadata=fsync_metadata,
        )
        try:
            self._open_files(meta, readonly=readonly, verify=verify)
        except BaseException:
            self.close()
            raise
        return self

    def _open_files(self, meta: dict[str, Any], *, readonly: bool, verify: bool) -> None:
        path = self.path
        if not readonly:
            if not self._files[0].path.is_file():
                raise StorageError(f"{path}: lod0.ids: level file missing")
            self._lock()
            meta = self._read_metadata(path)  # re-read under the lock: a previous writer may have committed
        self._meta = meta
        if meta.get("refresh_pending") is not None and readonly:
            raise StorageError(
                f"{path}: an interrupted gist refresh is pending; open it writable once to recover"
            )
        if not readonly:
            self._recover_refresh()
        depth = self.spec.depth
        levels = self._meta.get("levels") or [{"count": 0, "crc32": 0}] * (depth + 1)
        if len(levels) != depth + 1:
            raise StorageError(f"{path}: metadata.json lists {len(levels)} levels, expected {depth + 1}")
        for f, rec in zip(self._files, levels, strict=True):
            f.open(int(rec["count"]), int(rec["crc32"]), verify=verify)
        self._committed = [int(rec["count"]) for rec in levels]

    @classmethod
    def _read_metadata(cls, path: Path) -> dict[str, Any]:
        mpath = path / cls.METADATA
        if not mpath.is_file():
            raise StorageError(f"{path}: no {cls.METADATA} (not a tree, or its creation was interrupted)")
        try:
            meta = json.loads(mpath.read_text("utf-8"))
        except (OSError, ValueError) as e:
            raise StorageError(f"{mpath}: unreadable metadata ({e})") from e
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
            raise StorageError(f"{mpath}: not an mchar tree metadata file")
        if meta.get("format_version") != FORMAT_VERSION:
            raise StorageError(
                f"{mpath}: format_version mismatch: file has {meta.get('format_version')!r}, "
                f"this code reads {FORMAT_VERSION}"
            )
        return meta

    def _write_metadata(self) -> None:
        tmp = self.path / (self.METADATA + ".tmp")
        data = json.dumps(self._meta, indent=1, sort_keys=True).encode("utf-8")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            if self.fsync_metadata:
                os.fsync(f.fileno())
        os.replace(tmp, self.path / self.METADATA)
        if self.fsync_metadata:
            _fsync_dir(self.path)

    def _staging_path(self, level: int) -> Path:
        return self.path / (self.level_filename(level) + ".refresh")

    def _recover_refresh(self) -> None:
        """Roll a published refresh forward; delete staging files a crash left unpublished."""
        pending = self._meta.get("refresh_pending")
        for level in range(1, self.spec.depth + 1):
            sp = self._staging_path(level)
            if pending is not None and str(level) in pending["levels"]:
                if sp.exists():
                    os.replace(sp, self.path / self.level_filename(level))
            elif sp.exists():
                sp.unlink()
        if pending is not None:
            for level_s, rec in pending["levels"].items():
                self._meta["levels"][int(level_s)]["crc32"] = rec["crc32"]
            self._meta["gist_version"] = pending["version"]
            self._meta["refresh_pending"] = None
            self._write_metadata()

    # ------------------------------------------------------------------ TreeStorage
    @property
    def gist_version(self) -> int:
        return int(self._meta.get("gist_version", 0))

    def count(self, level: int) -> int:
        return self._files[level].count

    def committed_count(self, level: int) -> int:
        return self._committed[level]

    def _writable(self) -> None:
        if self.readonly:
            raise StorageError(f"{self.path}: opened read-only")

    def append_tokens(self, ids: Any) -> None:
        self._writable()
        self._files[0].append(_as_ids(ids).numpy().astype(np.uint32))

    def _to_np(self, g: torch.Tensor) -> np.ndarray:
        if g.dtype == torch.bfloat16:
            return g.view(torch.int16).numpy().view(np.uint16)
        return g.numpy()

    def _from_np(self, arr: np.ndarray) -> torch.Tensor:
        if self.spec.dtype == "bfloat16":
            return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(arr)

    def append_gists(self, level: int, gists: torch.Tensor) -> None:
        self._writable()
        self._check_gist_level(level)
        self._files[level].append(self._to_np(self._check_gists(gists)))

    def read_tokens(self, start: int, end: int) -> torch.Tensor:
        self._check_range(0, start, end)
        return torch.from_numpy(self._files[0].read(start, end).astype(np.int64))

    def read_gists(self, level: int, start: int, end: int, *, staged: bool = False) -> torch.Tensor:
        self._check_gist_level(level)
        self._check_range(level, start, end)
        f = self._staged_file(level) if staged else self._files[level]
        return self._from_np(f.read(start, end))

    def gather_gists(self, level: int, indices: np.ndarray | list[int]) -> torch.Tensor:
        self._check_gist_level(level)
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.count(level)):
            raise IndexError(f"gist index out of bounds for level {level} with {self.count(level)} records")
        return self._from_np(self._files[level].gather(idx))

    def commit(self) -> None:
        self._writable()
        if self._staging is not None:
            raise StorageError("cannot commit appends while a refresh is in progress")
        counts = [f.count for f in self._files]
        if counts == self._committed and self._meta.get("levels"):
            return
        if self.fsync_data:
            for f in self._files:
                f.sync()
        self._publish()

    def _publish(self, refresh_pending: dict[str, Any] | None = None) -> None:
        self._meta["levels"] = [
            {
                "file": f.path.name,
                "count": f.count,
                "crc32": f.crc,
                "bytes": HEADER_SIZE + f.count * f.stride,
            }
            for f in self._files
        ]
        self._meta["commit_seq"] = int(self._meta.get("commit_seq", 0)) + 1
        self._meta["modified"] = _now()
        self._meta["refresh_pending"] = refresh_pending
        self._write_metadata()
        self._committed = [f.count for f in self._files]

    # refresh
    def begin_refresh(self) -> None:
        self._writable()
        if [f.count for f in self._files] != self._committed:
            raise StorageError("commit() pending appends before a refresh")
        self.abort_refresh()
        self._staging = {}

    def _staged_file(self, level: int) -> _LevelFile:
        if self._staging is None:
            raise StorageError("no refresh in progress: call begin_refresh() first")
        if level not in self._staging:
            sp = self._staging_path(level)
            if sp.exists():
                sp.unlink()
            src = self._files[level]
            sf = _LevelFile(sp, level, self.spec, writable=True)
            sf.create(fsync=False)
            sf.open(0, 0, verify=False)
            # start from a copy of the current gists so a partial refresh of a level stays well-defined
            chunk = max(1, (64 << 20) // src.stride)
            for s in range(0, src.count, chunk):
                sf.append(src.read(s, min(src.count, s + chunk)))
            self._staging[level] = sf
        return self._staging[level]

    def write_refreshed_gists(self, level: int, start: int, gists: torch.Tensor) -> None:
        self._check_gist_level(level)
        g = self._to_np(self._check_gists(gists))
        self._check_range(level, start, start + g.shape[0])
        sf = self._staged_file(level)
        data = np.ascontiguousarray(g, dtype=sf.np_dtype).tobytes()
        sf.fh.seek(HEADER_SIZE + start * sf.stride)
        sf.fh.write(data)
        sf.fh.flush()
        sf._mm = None

    def commit_refresh(self, version: int) -> None:
        if self._staging is None:
            raise StorageError("no refresh in progress: call begin_refresh() first")
        staged = self._staging
        pending: dict[str, Any] = {"version": int(version), "levels": {}}
        for level, sf in staged.items():
            sf.sync()
            sf.crc = sf.payload_crc(sf.count)
            pending["levels"][str(level)] = {"crc32": sf.crc}
            sf.close()
        # 1) publish intent: from here on the only valid outcome is the new gists (open() rolls forward),
        # so an error below must not delete the staging files (abort_refresh becomes a no-op)
        self._publish(refresh_pending=pending)
        self._staging = None
        # 2) swap files in, 3) publish the final state
        for level, sf in staged.items():
            old = self._files[level]
            old.close()
            os.replace(sf.path, old.path)
            old.crc = sf.crc
            old.fh = open(old.path, "r+b")  # noqa: SIM115
        if self.fsync_metadata:
            _fsync_dir(self.path)
        self._meta["gist_version"] = int(version)
        self._publish(refresh_pending=None)

    def abort_refresh(self) -> None:
        if self._staging:
            for sf in self._staging.values():
                sf.close()
                if sf.path.exists():
                    sf.path.unlink()
        self._staging = None

    def close(self) -> None:
        self.abort_refresh()
        for f in self._files:
            f.close()
        self._unlock()

    def metadata(self) -> dict[str, Any]:
        return json.loads(json.dumps(self._meta))

    def disk_bytes(self) -> int:
        """Total bytes of every file in the tree directory (for overhead accounting)."""
        return sum(p.stat().st_size for p in self.path.iterdir() if p.is_file())

    def __enter__(self) -> DiskStorage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
