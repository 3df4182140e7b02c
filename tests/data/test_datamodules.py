"""DataModules: packing into windows, skip counting, on-disk cache, deterministic shuffling, task batches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mchar.data.corpus import DataError
from mchar.data.datamodules import LongDocDataModule, TaskDataModule
from mchar.data.tasks import export_jsonl, generate_examples
from mchar.data.tokenizer import train_tokenizer


def _doc(i: int, n_lines: int) -> str:
    return "".join(f"def f{i}_{j}(x):\n    return x + {i * j}\n" for j in range(n_lines))


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    train_tokenizer(d, texts=[_doc(i, 30) for i in range(20)], vocab_size=512)
    return d


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, list[Path]]:
    root = tmp_path / "corpus"
    root.mkdir()
    out: dict[str, list[Path]] = {"train": [], "val": [], "test": []}
    sizes = {"train": [2, 40, 5, 80, 1], "val": [10, 3], "test": [25]}
    for split, ns in sizes.items():
        for k, n in enumerate(ns):
            p = root / f"{split}_{k}.py"
            p.write_text(_doc(k, n))
            out[split].append(p)
    (root / "empty.py").write_text("")
    (root / "bad.py").write_bytes(b"\xff\xfe\xfa")
    out["train"] += [root / "empty.py", root / "bad.py"]
    return out


def _stream(tok: Any, paths: list[Path]) -> list[int]:
    ids: list[int] = []
    for p in sorted(paths):
        text = p.read_bytes().decode("utf-8", errors="strict") if p.name != "bad.py" else ""
        if text.strip():
            ids += tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
    return ids


def test_packing_matches_eos_joined_stream(
    files: dict[str, list[Path]], tok_dir: Path, tmp_path: Path
) -> None:
    dm = LongDocDataModule(files, str(tok_dir), window=64, batch_size=4, cache_dir=tmp_path / "cache")
    dm.setup("fit")
    st = dm.stats["train"]
    assert (st["docs_used"], st["skipped_empty"], st["skipped_unreadable"]) == (5, 1, 1)
    stream = _stream(dm.tokenizer, files["train"])
    ds = dm.datasets["train"]
    assert len(ds) == -(-len(stream) // 64) == st["windows"]
    got: list[int] = []
    for row in ds:
        got += row["input_ids"][: int(row["n_valid"])].tolist()
    assert got == stream
    batch = next(iter(dm.val_dataloader()))
    assert batch["input_ids"].shape[1] == 64 and batch["input_ids"].dtype == torch.long
    assert torch.equal(
        batch["labels"][batch["attention_mask"] == 1], batch["input_ids"][batch["attention_mask"] == 1]
    )
    last = dm.datasets["train"][len(ds) - 1]
    n = int(last["n_valid"])
    if n < 64:
        b = dm.train_dataloader().collate_fn([last])
        assert (b["labels"][0, n:] == -100).all() and (b["attention_mask"][0, n:] == 0).all()


def test_stride_overlap(files: dict[str, list[Path]], tok_dir: Path, tmp_path: Path) -> None:
    dm = LongDocDataModule(files, tok_dir, window=32, stride=16, cache_dir=tmp_path / "cache")
    dm.setup("fit")
    stream = _stream(dm.tokenizer, files["train"])
    ds = dm.datasets["train"]
    for k in range(len(ds) - 1):
        assert ds[k]["input_ids"].tolist() == stream[16 * k : 16 * k + 32]
    tail = ds[len(ds) - 1]
    covered = 16 * (len(ds) - 1) + int(tail["n_valid"])
    assert covered == len(stream)


def test_cache_reused_and_invalidated(
    files: dict[str, list[Path]], tok_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    first = LongDocDataModule(files, tok_dir, window=64, cache_dir=cache)
    first.setup("fit")

    def boom(*a: Any, **k: Any) -> Any:
        raise AssertionError("cache miss: re-tokenised")

    second = LongDocDataModule(files, tok_dir, window=64, cache_dir=cache)
    monkeypatch.setattr(second, "_windows", boom)
    second.setup("fit")
    assert second.stats == first.stats
    assert [r["input_ids"].tolist() for r in second.datasets["train"]] == [
        r["input_ids"].tolist() for r in first.datasets["train"]
    ]
    key = first.cache_key("train")
    files["train"][0].write_text(_doc(99, 7))
    assert LongDocDataModule(files, tok_dir, window=64, cache_dir=cache).cache_key("train") != key
    assert LongDocDataModule(files, tok_dir, window=32, cache_dir=cache).cache_key("val") != first.cache_key(
        "val"
    )


def test_shuffle_is_seeded(files: dict[str, list[Path]], tok_dir: Path, tmp_path: Path) -> None:
    def order(seed: int) -> list[list[int]]:
        dm = LongDocDataModule(files, tok_dir, window=16, batch_size=4, seed=seed, cache_dir=tmp_path / "c")
        dm.setup("fit")
        return [b["input_ids"][:, 0].tolist() for b in dm.train_dataloader()]

    assert order(1) == order(1)
    assert order(1) != order(2)
    dm = LongDocDataModule(files, tok_dir, window=16, batch_size=4, cache_dir=tmp_path / "c")
    a = [b["input_ids"].tolist() for b in dm.val_dataloader()]
    assert a == [b["input_ids"].tolist() for b in dm.val_dataloader()]


def test_task_mix_adds_synthetic_windows(files: dict[str, list[Path]], tok_dir: Path, tmp_path: Path) -> None:
    dm = LongDocDataModule(
        files, tok_dir, window=256, task_mix_fraction=0.5, mix_episodes=1, cache_dir=tmp_path / "c"
    )
    dm.setup("fit")
    st = dm.stats["train"]
    assert st["mix_windows"] == st["windows"] >= 1
    assert len(dm.datasets["train"]) == st["windows"] + st["mix_windows"]
    assert dm.stats["val"]["mix_windows"] == 0
    text = dm.tokenizer.decode(dm.datasets["train"][len(dm.datasets["train"]) - 1]["input_ids"].tolist())
    assert any(q in text for q in ("# What is", "# Which variables", "# Look up"))


def test_mix_windows_fill_the_window_and_mark_answers(
    files: dict[str, list[Path]], tok_dir: Path, tmp_path: Path
) -> None:
    dm = LongDocDataModule(
        files, tok_dir, window=256, task_mix_fraction=0.5, mix_episodes=2, cache_dir=tmp_path / "c"
    )
    dm.setup("fit")
    ds = dm.datasets["train"]
    natural = dm.stats["train"]["windows"]
    for row in (ds[i] for i in range(natural, len(ds))):
        assert int(row["n_valid"]) == 256  # exact fill: GistNet/LensNet keep only complete windows
        ids, mask = row["input_ids"], row["answer_mask"].bool()
        assert mask.any() and mask[-8:].any()  # the last episode's answer closes the window
        answer_text = dm.tokenizer.decode(ids[mask].tolist())
        assert any(ch.isdigit() or ch.isalpha() for ch in answer_text)
        assert "What" not in answer_text and "KV[" not in answer_text  # queries are not marked
    assert not ds[0]["answer_mask"].any()  # natural windows carry no answers
    batch = next(iter(dm.train_dataloader()))
    assert batch["answer_mask"].dtype == torch.bool and batch["answer_mask"].shape == batch["input_ids"].shape


def test_no_usable_train_text_raises(tmp_path: Path, tok_dir: Path) -> None:
    (tmp_path / "e.py").write_text("  \n")
    dm = LongDocDataModule({"train": [tmp_path / "e.py"]}, tok_dir, window=16, cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match="no usable training text"):
        dm.setup("fit")
    with pytest.raises(DataError):
        LongDocDataModule({"train": []}, tok_dir, window=16, stride=32)


def test_task_datamodule_generate_and_jsonl(tok_dir: Path, tmp_path: Path) -> None:
    texts = [_doc(i, 60) for i in range(4)]
    dm = TaskDataModule(
        str(tok_dir),
        generate={"tasks": ["passkey", "kv_retrieval"], "lengths": [400], "n_per": 2, "texts": texts},
        batch_size=2,
    )
    batches = list(dm.test_dataloader())
    assert sum(len(b["id"]) for b in batches) == 4
    b = batches[0]
    for i in range(2):
        lab = b["labels"][i]
        answer_ids = lab[lab != -100].tolist()
        assert dm.tokenizer.decode(answer_ids) == b["answer"][i]
        assert int((lab != -100).nonzero()[0]) == b["answer_start"][i]
    exs = generate_examples("passkey", 3, 400, dm.tokenizer, texts=texts)
    good = export_jsonl(exs, tmp_path / "good.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    dm2 = TaskDataModule(tok_dir, jsonl={"val": [good, empty, tmp_path / "missing.jsonl"]}, max_length=100)
    dm2.setup()
    assert dm2.stats["val"] == {"files_used": 1, "skipped_empty": 1, "skipped_unreadable": 1}
    assert all(len(e["input_ids"]) <= 100 for e in dm2.examples["val"])
    with pytest.raises(DataError):
        TaskDataModule(tok_dir, jsonl=[empty]).setup()


def test_mix_answer_tail_moves_the_last_answer(
    files: dict[str, list[Path]], tok_dir: Path, tmp_path: Path
) -> None:
    dm = LongDocDataModule(
        files, tok_dir, window=256, task_mix_fraction=0.5, mix_answer_tail=40, cache_dir=tmp_path / "c"
    )
    dm.setup("fit")
    ds = dm.datasets["train"]
    for row in (ds[i] for i in range(dm.stats["train"]["windows"], len(ds))):
        last = int(row["answer_mask"].nonzero().max())
        assert int(row["n_valid"]) == 256 and 256 - 1 - last == 40
    with pytest.raises(DataError, match="mix_answer_tail"):
        LongDocDataModule(files, tok_dir, window=64, mix_answer_tail=32)


def test_curriculum_runs_phases_in_order(files: dict[str, list[Path]], tok_dir: Path, tmp_path: Path) -> None:
    from mchar.data.datamodules import CurriculumDataModule

    def phase(window: int, batch: int) -> LongDocDataModule:
        return LongDocDataModule(files, tok_dir, window=window, batch_size=batch, cache_dir=tmp_path / "c")

    dm = CurriculumDataModule([phase(16, 4), phase(64, 1)], [7, 3])
    dm.setup("fit")
    shapes = [tuple(b["input_ids"].shape) for b in dm.train_dataloader()]
    assert shapes == [(4, 16)] * 7 + [(1, 64)] * 3  # phase 1 wraps around its (shuffled) windows
    assert len(dm.train_dataloader()) == 10
    assert next(iter(dm.val_dataloader()))["input_ids"].shape[1] == 64
    with pytest.raises(DataError, match="one positive step count"):
        CurriculumDataModule([phase(16, 4)], [0])


@given(n=st.integers(2, 60), world=st.integers(2, 8))
def test_rank_shares_of_an_eval_split_cover_it_once(n: int, world: int) -> None:
    """Under DDP every evaluation sample is scored by exactly one rank (no padded repeats); one process: no sampler."""
    from types import SimpleNamespace

    import lightning as L

    from mchar.data.datamodules import rank_share

    dm = L.LightningDataModule()
    data = list(range(n))
    assert rank_share(dm, data) is None
    shares = []
    for rank in range(world):
        dm.trainer = SimpleNamespace(world_size=world, global_rank=rank)  # type: ignore[assignment]
        sampler = rank_share(dm, data)
        shares.append([] if sampler is None else list(sampler))
    if n < world:  # too few for every rank to get one: Lightning's own sampler keeps the ranks in step
        assert shares == [[]] * world
    else:
        assert sorted(i for s in shares for i in s) == data
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
