"""Local text corpus discovery and a deterministic, file-level train/val/test split.

Splitting is by *file* (hash of the relative path with a seed), so held-out documents are never trained on
and every machine, file-system ordering or Python version produces the same split.
"""

from __future__ import annotations

import fnmatch
import hashlib
import sysconfig
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mchar.errors import MCharError

SPLITS: tuple[str, str, str] = ("train", "val", "test")
DEFAULT_GLOBS: tuple[str, ...] = ("**/*.py",)
# site-packages is third-party code and test-data folders hold deliberately odd files; the stdlib's own
# test modules are real, long code and stay in (undecodable ones are skipped and counted anyway).
DEFAULT_EXCLUDE: tuple[str, ...] = (
    "site-packages/*",
    "*/site-packages/*",
    "*/__pycache__/*",
    "test/*data*/*",
    "*/tests/data/*",
)


class DataError(MCharError, ValueError):
    """Raised when the data pipeline has nothing usable to work with (message: one clear line)."""


@dataclass
class SplitReport:
    """What happened to the files of one split (skips are counted, never silent)."""

    files_used: int = 0
    skipped_empty: int = 0
    skipped_unreadable: int = 0
    chars: int = 0


@dataclass
class CorpusSplits:
    """Files per split (sorted absolute paths) plus the per-split report."""

    root: Path
    train: list[Path] = field(default_factory=list)
    val: list[Path] = field(default_factory=list)
    test: list[Path] = field(default_factory=list)
    report: dict[str, SplitReport] = field(default_factory=dict)

    def __getitem__(self, split: str) -> list[Path]:
        if split not in SPLITS:
            raise KeyError(f"unknown split {split!r}; expected one of {SPLITS}")
        return getattr(self, split)

    def as_dict(self) -> dict[str, list[Path]]:
        return {s: list(self[s]) for s in SPLITS}


def default_root() -> Path:
    """The Python standard library directory: always present, offline, real long-range code."""
    return Path(sysconfig.get_paths()["stdlib"])


def read_text(path: str | Path) -> str | None:
    """UTF-8 text of a file, or None when it cannot be read or decoded."""
    try:
        return Path(path).read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _unit_hash(key: str) -> float:
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_of(relpath: str, seed: int = 0, fractions: Sequence[float] = (0.9, 0.05, 0.05)) -> str:
    """Split a relative path belongs to: a pure function of (seed, posix relpath, fractions)."""
    u = _unit_hash(f"{seed}:{relpath}")
    total = float(sum(fractions))
    acc = 0.0
    for name, frac in zip(SPLITS, fractions, strict=True):
        acc += frac / total
        if u < acc:
            return name
    return SPLITS[[i for i, f in enumerate(fractions) if f > 0][-1]]


def _validate_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    if len(fractions) != 3 or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise DataError(
            f"split fractions must be 3 non-negative numbers with a positive sum, got {fractions!r}"
        )
    return (float(fractions[0]), float(fractions[1]), float(fractions[2]))


def iter_matching(root: Path, globs: Iterable[str], exclude: Iterable[str]) -> Iterator[tuple[str, Path]]:
    """(posix relpath, path) of regular files under root matching any glob and no exclude pattern."""
    excl = tuple(exclude)
    seen: set[str] = set()
    for pattern in globs:
        for p in root.glob(pattern):
            rel = p.relative_to(root).as_posix()
            if rel in seen or any(fnmatch.fnmatchcase(rel, e) for e in excl):
                continue
            if p.is_file():
                seen.add(rel)
                yield rel, p


def discover_corpus(
    root: str | Path | None = None,
    globs: Sequence[str] = DEFAULT_GLOBS,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    fractions: Sequence[float] = (0.9, 0.05, 0.05),
    seed: int = 0,
    max_files: int | None = None,
) -> CorpusSplits:
    """Discover text files and split them by file.

    ``max_files`` keeps a deterministic hash-ordered subset of *usable* files, giving every split with a
    positive fraction at least one file (when it has any), so tiny configs still have held-out data. Empty and unreadable/undecodable files
    are skipped and counted per split. Raises ``DataError`` when nothing usable remains.
    """
    root_path = Path(root) if root is not None else default_root()
    fr = _validate_fractions(fractions)
    by_split: dict[str, list[tuple[float, str, Path]]] = {s: [] for s in SPLITS}
    for rel, path in iter_matching(root_path, globs, exclude):
        by_split[split_of(rel, seed, fr)].append((_unit_hash(f"order:{seed}:{rel}"), rel, path))

    quota: dict[str, float] = dict.fromkeys(SPLITS, float("inf"))
    if max_files is not None:
        if max_files < 1:
            raise DataError(f"max_files must be >= 1, got {max_files}")
        active = [s for s, f in zip(SPLITS, fr, strict=True) if f > 0]
        q = {s: max(1, round(max_files * f / sum(fr))) for s, f in zip(SPLITS, fr, strict=True) if f > 0}
        # Trim the largest quota until the total fits (never below one file per active split).
        while sum(q.values()) > max(max_files, len(active)):
            biggest = max(q, key=lambda s: q[s])
            if q[biggest] <= 1:
                break
            q[biggest] -= 1
        quota = {s: float(q.get(s, 0)) for s in SPLITS}

    out = CorpusSplits(root=root_path)
    for s in SPLITS:
        rep = SplitReport()
        kept: list[Path] = []
        # Hash order picks a deterministic subset under max_files; usable files count toward the quota.
        for _, _, path in sorted(by_split[s]):
            if len(kept) >= quota[s]:
                break
            text = read_text(path)
            if text is None:
                rep.skipped_unreadable += 1
            elif not text.strip():
                rep.skipped_empty += 1
            else:
                rep.files_used += 1
                rep.chars += len(text)
                kept.append(path)
        setattr(out, s, sorted(kept))
        out.report[s] = rep
    if not any(out.report[s].files_used for s in SPLITS):
        raise DataError(
            f"no usable text files under {root_path} for globs {list(globs)} (exclude {list(exclude)})"
        )
    return out


def normalize_files_by_split(
    files_by_split: CorpusSplits | Mapping[str, Sequence[str | Path]],
) -> dict[str, list[Path]]:
    """Accept a ``CorpusSplits`` or a plain mapping split -> paths; missing splits become empty lists."""
    if isinstance(files_by_split, CorpusSplits):
        return files_by_split.as_dict()
    unknown = set(files_by_split) - set(SPLITS)
    if unknown:
        raise DataError(f"unknown split names {sorted(unknown)}; expected {list(SPLITS)}")
    return {s: [Path(p) for p in files_by_split.get(s, [])] for s in SPLITS}
