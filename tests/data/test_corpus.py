"""Corpus discovery: file-level deterministic split, skip counting, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from mchar.data.corpus import SPLITS, DataError, discover_corpus, split_of


def _make_tree(root: Path, n: int = 120) -> None:
    for i in range(n):
        sub = root / f"pkg{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"mod{i}.py").write_text(f"def f{i}():\n    return {i}\n" * 3)
    (root / "empty.py").write_text("   \n")
    (root / "bad.py").write_bytes(b"\xff\xfe\x00bad")
    (root / "site-packages").mkdir()
    (root / "site-packages" / "third.py").write_text("x = 1\n")
    (root / "notes.txt").write_text("not matched by the default glob\n")


def test_split_is_by_file_disjoint_and_sorted(tmp_path: Path) -> None:
    _make_tree(tmp_path)
    c = discover_corpus(tmp_path, fractions=(0.6, 0.2, 0.2), seed=1)
    all_files = [p for s in SPLITS for p in c[s]]
    assert len(all_files) == len(set(all_files)) == 120
    for s in SPLITS:
        assert c[s] == sorted(c[s])
        for p in c[s]:
            assert split_of(p.relative_to(tmp_path).as_posix(), 1, (0.6, 0.2, 0.2)) == s
    assert all("site-packages" not in str(p) for p in all_files)
    skipped = {
        k: sum(getattr(c.report[s], k) for s in SPLITS) for k in ("skipped_empty", "skipped_unreadable")
    }
    assert skipped == {"skipped_empty": 1, "skipped_unreadable": 1}
    assert sum(c.report[s].files_used for s in SPLITS) == 120


def test_split_stable_and_seed_dependent(tmp_path: Path) -> None:
    _make_tree(tmp_path)
    a = discover_corpus(tmp_path, seed=3).as_dict()
    b = discover_corpus(tmp_path, seed=3).as_dict()
    assert a == b
    rels = [f"pkg{i}/mod{i}.py" for i in range(200)]
    assert [split_of(r, 0) for r in rels] != [split_of(r, 1) for r in rels]
    # fractions are honoured roughly
    counts = {s: sum(split_of(f"f{i}.py", 0, (0.8, 0.1, 0.1)) == s for i in range(2000)) for s in SPLITS}
    assert 1500 < counts["train"] < 1700 and 120 < counts["test"] < 280


def test_max_files_keeps_every_split(tmp_path: Path) -> None:
    _make_tree(tmp_path)
    c = discover_corpus(tmp_path, max_files=6, fractions=(0.9, 0.05, 0.05))
    sizes = [len(c[s]) for s in SPLITS]
    assert sum(sizes) <= 6 and all(n >= 1 for n in sizes)
    assert c.as_dict() == discover_corpus(tmp_path, max_files=6, fractions=(0.9, 0.05, 0.05)).as_dict()


def test_nothing_usable_raises_one_line(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("")
    with pytest.raises(DataError) as err:
        discover_corpus(tmp_path, globs=("**/*.py",))
    assert "**/*.py" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(DataError):
        discover_corpus(tmp_path, fractions=(0.5, 0.5))


def test_default_root_is_stdlib() -> None:
    c = discover_corpus(max_files=12)
    assert c.train and c.test and all(p.suffix == ".py" for p in c.train)
