"""LightningDataModules: packed long-document LM windows and synthetic retrieval tasks.

Tokenised windows are built with ``datasets.Dataset.from_generator`` and cached on disk under a key of
(files, tokenizer, window/stride/mix settings), so the second run of an experiment skips tokenisation.
Shuffling is a plain ``DataLoader(shuffle=True)`` with a seeded generator: Lightning swaps in a
``DistributedSampler`` under DDP, which must not be pre-empted by a custom sampler here.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from mchar.data.corpus import SPLITS, CorpusSplits, DataError, normalize_files_by_split, read_text
from mchar.data.tasks import MIX_TASKS, TASKS, Haystack, generate_examples, load_jsonl, make_training_window
from mchar.data.tokenizer import make_encoder, resolve_tokenizer, tokenizer_fingerprint

CACHE_VERSION = 2


def default_cache_dir() -> Path:
    """``$MCHAR_CACHE_DIR`` or ``~/.cache/mchar``: tokenised data outlives any single run directory."""
    return Path(os.environ.get("MCHAR_CACHE_DIR", Path.home() / ".cache" / "mchar")) / "tokenized"


def files_fingerprint(paths: Sequence[Path]) -> str:
    """Hash of (resolved path, size, mtime) per file: detects edits without re-reading every file."""
    h = hashlib.sha256()
    for p in sorted(Path(x).resolve() for x in paths):
        try:
            st = p.stat()
            h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}|missing\n".encode())
    return h.hexdigest()[:16]


def _encode_batch(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Batch-encode without special tokens (the Rust backend in parallel when available)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    enc = make_encoder(tokenizer)
    return [enc(t) for t in texts]


def pad_collate(batch: Sequence[Mapping[str, Any]], pad_id: int = 0) -> dict[str, Any]:
    """Right-pad ``input_ids``/``labels`` to the batch max; labels are -100 on padding; metadata kept as lists."""
    longest = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), longest), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), longest), dtype=torch.long)
    for i, b in enumerate(batch):
        x = torch.as_tensor(b["input_ids"], dtype=torch.long)
        n = int(b.get("n_valid", len(x)))
        ids[i, : len(x)] = x
        mask[i, :n] = 1
        lab = torch.as_tensor(b["labels"], dtype=torch.long) if "labels" in b else x
        labels[i, :n] = lab[:n]
    out: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if "answer_mask" in batch[0]:
        answer = torch.zeros((len(batch), longest), dtype=torch.bool)
        for i, b in enumerate(batch):
            m = torch.as_tensor(b["answer_mask"], dtype=torch.bool)
            answer[i, : len(m)] = m
        out["answer_mask"] = answer
    for key in batch[0]:
        if key not in ("input_ids", "labels", "n_valid", "attention_mask", "answer_mask"):
            out[key] = [b[key] for b in batch]
    return out


class _Collate:
    """Picklable collate (DataLoader workers may be spawned processes)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, batch: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        return pad_collate(batch, self.pad_id)


class LongDocDataModule(L.LightningDataModule):
    """Per-split corpus files -> fixed ``window``-token LM windows.

    Documents are concatenated into one stream with EOS separators: long documents span several windows,
    short ones are packed together. Windows start every ``stride`` tokens (default: ``window``, no overlap);
    the final partial window is padded (labels -100). ``task_mix_fraction`` of the *train* windows are
    synthetic retrieval windows (``make_training_window``) built from train text, to teach long-range use; they
    fill the window exactly (corpus tokens in front) and mark their answer tokens in ``answer_mask``; with
    ``mix_answer_tail`` the last answer is followed by that many corpus tokens (for side nets that score a horizon).
    Batches: ``input_ids``, ``attention_mask``, ``labels`` (= input_ids; the model shifts), ``answer_mask``.
    """

    def __init__(
        self,
        files_by_split: CorpusSplits | Mapping[str, Sequence[str | Path]],
        tokenizer: Any,
        window: int = 512,
        stride: int | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        task_mix_fraction: float = 0.0,
        mix_episodes: int = 2,
        mix_answer_tail: int = 0,
        mix_tasks: Sequence[str] = TASKS,
        cache_dir: str | Path | None = None,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        if window < 2:
            raise DataError(f"window must be >= 2 tokens, got {window}")
        stride = window if stride is None else stride
        if not 1 <= stride <= window:
            raise DataError(f"stride must be in [1, window={window}], got {stride}")
        if not 0.0 <= task_mix_fraction < 1.0:
            raise DataError(f"task_mix_fraction must be in [0, 1), got {task_mix_fraction}")
        self.files = normalize_files_by_split(files_by_split)
        # Keep a path rather than the object when given one: cheap to pickle into spawned workers/ranks.
        self._tokenizer_spec = tokenizer
        self._tokenizer: Any | None = None
        self.window, self.stride = window, stride
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.task_mix_fraction, self.mix_episodes = task_mix_fraction, mix_episodes
        if not 0 <= mix_answer_tail < window // 2:
            raise DataError(f"mix_answer_tail must be in [0, window/2), got {mix_answer_tail}")
        self.mix_answer_tail = mix_answer_tail
        unknown = sorted(set(mix_tasks) - set(MIX_TASKS))
        if unknown or not mix_tasks:
            raise DataError(f"mix_tasks: need a non-empty subset of {list(MIX_TASKS)}, got {list(mix_tasks)}")
        self.mix_tasks = tuple(mix_tasks)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.pin_memory = pin_memory
        self.datasets: dict[str, Any] = {}
        self.stats: dict[str, dict[str, int]] = {}

    # ------------------------------------------------------------------ tokenizer / cache keys
    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = resolve_tokenizer(self._tokenizer_spec)
        return self._tokenizer

    @property
    def eos_id(self) -> int:
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos is None:
            raise DataError("tokenizer has no eos_token_id (needed to separate packed documents)")
        return int(eos)

    @property
    def pad_id(self) -> int:
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return int(pad) if pad is not None else self.eos_id

    def cache_key(self, split: str) -> str:
        mix = (
            (self.task_mix_fraction, self.mix_episodes, self.mix_answer_tail, self.mix_tasks, self.seed)
            if split == "train"
            else None
        )
        payload = json.dumps(
            [
                CACHE_VERSION,
                split,
                files_fingerprint(self.files[split]),
                tokenizer_fingerprint(self.tokenizer),
            ]
            + [self.window, self.stride, self.eos_id, self.pad_id, mix]
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:20]

    def cache_path(self, split: str) -> Path:
        return self.cache_dir / f"{split}-{self.cache_key(split)}"

    # ------------------------------------------------------------------ building
    def _windows(self, split: str, stats: dict[str, int]) -> Iterator[dict[str, Any]]:
        """Packed windows of the natural stream, then (train only) the synthetic mix windows."""
        w, s, eos, pad = self.window, self.stride, self.eos_id, self.pad_id
        buf: list[int] = []
        paths = sorted(self.files[split])
        chunk = 32
        for start in range(0, len(paths), chunk):
            texts = []
            for p in paths[start : start + chunk]:
                text = read_text(p)
                if text is None:
                    stats["skipped_unreadable"] += 1
                elif not text.strip():
                    stats["skipped_empty"] += 1
                else:
                    texts.append(text)
            for ids in _encode_batch(self.tokenizer, texts):
                if not ids:
                    stats["skipped_empty"] += 1
                    continue
                stats["docs_used"] += 1
                stats["tokens"] += len(ids)
                buf.extend(ids)
                buf.append(eos)
                while len(buf) >= w:
                    stats["windows"] += 1
                    yield {"input_ids": buf[:w], "n_valid": w, "answer_mask": [0] * w}
                    del buf[:s]
        # Leftover tokens not yet covered by any window (with overlap, a tail shorter than w - s is covered).
        covered = stats["windows"] > 0 and len(buf) <= w - s
        if buf and not covered:
            stats["windows"] += 1
            yield {"input_ids": buf + [pad] * (w - len(buf)), "n_valid": len(buf), "answer_mask": [0] * w}
        if split == "train" and self.task_mix_fraction > 0 and stats["docs_used"]:
            yield from self._mix_windows(paths, stats)

    def _mix_windows(self, paths: Sequence[Path], stats: dict[str, int]) -> Iterator[dict[str, Any]]:
        f = self.task_mix_fraction
        n_mix = math.ceil(f / (1.0 - f) * stats["windows"])
        hay = Haystack.from_files(paths)
        enc = make_encoder(self.tokenizer)
        filler = self._filler_tokens(paths)
        for j in range(n_mix):
            seed = self.seed * 1_000_003 + j
            text, spans = make_training_window(
                hay,
                self.window,
                seed=seed,
                tokenizer=enc,
                num_episodes=self.mix_episodes,
                tasks=self.mix_tasks,
            )
            ids, answer = self._encode_marked(text, spans)
            ids, answer = ids[-self.window :], answer[-self.window :]
            short = self.window - len(ids)
            start = (seed * 7919) % max(1, len(filler) - self.window)
            if short:  # BPE line packing leaves a few tokens free: fill them with corpus text in front
                ids, answer = filler[start : start + short] + ids, [0] * short + answer
            last = max((i for i, a in enumerate(answer) if a), default=len(answer) - 1)
            shift = self.mix_answer_tail - (len(ids) - 1 - last)
            if shift > 0:  # corpus text after the last answer, so its query ends inside a scored prefix
                ids, answer = ids[shift:] + filler[start : start + shift], answer[shift:] + [0] * shift
            stats["mix_windows"] += 1
            yield {"input_ids": ids, "n_valid": len(ids), "answer_mask": answer}

    def _filler_tokens(self, paths: Sequence[Path], want: int = 1 << 16) -> list[int]:
        """A pool of train-split tokens (>= one window) to top up synthetic windows to the exact window length."""
        size = max(want, self.window)
        pool: list[int] = []
        for p in paths:
            if len(pool) >= size:
                break
            text = read_text(p)
            if text:
                pool += _encode_batch(self.tokenizer, [text])[0]
        if pool and len(pool) < self.window:  # tiny corpora: repeat to cover one window
            pool *= 1 + self.window // len(pool)
        return pool[:size] or [self.eos_id]

    def _encode_marked(self, text: str, spans: Sequence[tuple[int, int]]) -> tuple[list[int], list[int]]:
        """Token ids of ``text`` and a 0/1 mask of the tokens overlapping any character span."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            e = backend.encode(text, add_special_tokens=False)
            ids, pieces = list(e.ids), list(e.offsets)
        else:  # any tokenizer: token spans from the lengths of the encoded prefixes
            enc = make_encoder(self.tokenizer)
            ids = enc(text)
            pieces = [(i, i + 1) for i in range(len(ids))]
            spans = [(len(enc(text[:a])), len(enc(text[:b]))) for a, b in spans]
        return ids, [int(any(a < e and b > s for s, e in spans)) for a, b in pieces]

    def build_split(self, split: str) -> tuple[Any, dict[str, int]]:
        """Load the split's windows from cache, or tokenise and cache them (atomic rename)."""
        import datasets

        target = self.cache_path(split)
        stats_file = target / "stats.json"
        features = datasets.Features(
            {
                "input_ids": datasets.Sequence(datasets.Value("int32"), length=self.window),
                "n_valid": datasets.Value("int32"),
                "answer_mask": datasets.Sequence(datasets.Value("int8"), length=self.window),
            }
        )

        def load() -> tuple[Any, dict[str, int]]:
            st = json.loads(stats_file.read_text())
            if not (target / "dataset").exists():  # empty split: datasets cannot reload a 0-row save
                return datasets.Dataset.from_dict(
                    {"input_ids": [], "n_valid": [], "answer_mask": []}, features=features
                ), st
            return datasets.load_from_disk(str(target / "dataset")), st

        if stats_file.exists():
            return load()
        stats = dict.fromkeys(
            ("docs_used", "skipped_empty", "skipped_unreadable", "tokens", "windows", "mix_windows"), 0
        )
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".build-{split}-", dir=self.cache_dir))
        bars_were_on = not datasets.are_progress_bars_disabled()
        datasets.disable_progress_bars()  # per-split bars would drown the training log
        try:
            # In-process generator (no num_proc), so ``stats`` is filled as windows stream to Arrow.
            try:
                ds = datasets.Dataset.from_generator(
                    self._windows,
                    features=features,
                    gen_kwargs={"split": split, "stats": stats},
                    cache_dir=str(tmp / "hf"),
                    fingerprint=self.cache_key(split),
                )
            except ValueError:
                if stats["windows"] or stats["mix_windows"]:
                    raise
                # datasets refuses a generator that yields nothing; an empty split is legal (counted).
                ds = datasets.Dataset.from_dict(
                    {"input_ids": [], "n_valid": [], "answer_mask": []}, features=features
                )
            if len(ds):
                ds.save_to_disk(str(tmp / "dataset"))
            (tmp / "stats.json").write_text(json.dumps(stats, sort_keys=True))
            shutil.rmtree(tmp / "hf", ignore_errors=True)
            try:
                os.replace(tmp, target)
            except OSError:  # another process finished first: use theirs
                shutil.rmtree(tmp, ignore_errors=True)
        finally:
            if bars_were_on:
                datasets.enable_progress_bars()
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return load()

    # ------------------------------------------------------------------ Lightning hooks
    def prepare_data(self) -> None:
        """Rank-0 only under DDP: fill the cache so every rank's ``setup`` just loads it."""
        for split in SPLITS:
            if self.files[split]:
                self.build_split(split)

    def setup(self, stage: str | None = None) -> None:
        for split in SPLITS:
            if split in self.datasets:
                continue
            if self.files[split]:
                ds, stats = self.build_split(split)
            else:
                ds, stats = (
                    [],
                    dict.fromkeys(("docs_used", "skipped_empty", "skipped_unreadable", "windows"), 0),
                )
            if hasattr(ds, "set_format"):
                ds.set_format("torch", columns=["input_ids", "n_valid", "answer_mask"])
            self.datasets[split], self.stats[split] = ds, stats
        if stage in (None, "fit") and len(self.datasets["train"]) == 0:
            raise DataError(
                f"no usable training text: {len(self.files['train'])} train files, stats {self.stats['train']}"
            )

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            self.setup(None if split == "train" else "validate")
        gen = torch.Generator().manual_seed(self.seed) if shuffle else None
        sampler = None if split == "train" else rank_share(self, self.datasets[split])
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size,
            shuffle=shuffle,
            sampler=sampler,
            generator=gen,
            num_workers=self.num_workers,
            collate_fn=_Collate(self.pad_id),
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


def rank_share(dm: L.LightningDataModule, dataset: Any) -> Any:
    """Under DDP, the sampler of this rank's share of an evaluation split, no sample repeated: Lightning's
    DistributedSampler pads the last round with repeats, which the synced means then count twice (validation runs
    under no_grad, so ranks with one batch fewer never wait on each other). ``None`` in one process."""
    trainer = getattr(dm, "trainer", None)
    if trainer is None or trainer.world_size < 2 or len(dataset) < trainer.world_size:
        return None
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

    return UnrepeatedDistributedSampler(
        dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
    )


class TaskDataModule(L.LightningDataModule):
    """Synthetic retrieval examples as (prompt + answer) token sequences with loss on the answer only.

    Sources: ``jsonl`` (a split -> paths mapping, or a path list used as the test split) and/or ``generate``
    (kwargs: ``tasks``, ``lengths``, ``n_per``, ``seed``, ``splits``, plus ``generate_examples`` options such
    as ``texts``/``files``/``depths``). Prompt and answer are tokenised separately so the answer's token span
    is exact, as in loglikelihood scoring. Batches add ``answer_start`` and the example metadata.
    """

    def __init__(
        self,
        tokenizer: Any,
        jsonl: Mapping[str, Sequence[str | Path]] | Sequence[str | Path] | None = None,
        generate: Mapping[str, Any] | None = None,
        batch_size: int = 1,
        num_workers: int = 0,
        max_length: int | None = None,
    ) -> None:
        super().__init__()
        if jsonl is None and generate is None:
            raise DataError("TaskDataModule needs jsonl paths or generate= arguments")
        if jsonl is None:
            self.jsonl: dict[str, list[Path]] = {}
        elif isinstance(jsonl, Mapping):
            self.jsonl = {s: [Path(p) for p in v] for s, v in jsonl.items()}
        else:
            self.jsonl = {"test": [Path(p) for p in jsonl]}
        self.generate = dict(generate or {})
        self._tokenizer_spec = tokenizer
        self._tokenizer: Any | None = None
        self.batch_size, self.num_workers, self.max_length = batch_size, num_workers, max_length
        self.examples: dict[str, list[dict[str, Any]]] = {}
        self.stats: dict[str, dict[str, int]] = {}

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = resolve_tokenizer(self._tokenizer_spec)
        return self._tokenizer

    def _raw_examples(self) -> dict[str, list[dict[str, Any]]]:
        raw: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
        for split, paths in self.jsonl.items():
            if split not in raw:
                raise DataError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
            st = self.stats.setdefault(split, {"files_used": 0, "skipped_empty": 0, "skipped_unreadable": 0})
            for p in paths:
                try:
                    rows = load_jsonl(p)
                except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                    st["skipped_unreadable"] += 1
                    continue
                if not rows:
                    st["skipped_empty"] += 1
                    continue
                st["files_used"] += 1
                raw[split].extend(rows)
        if self.generate:
            g = dict(self.generate)
            tasks = g.pop("tasks", TASKS)
            lengths = g.pop("lengths", (512,))
            n_per = g.pop("n_per", 4)
            seed = g.pop("seed", 0)
            splits = g.pop("splits", ("test",))
            if "tokenizer" not in g:
                g["tokenizer"] = self.tokenizer
            for k, split in enumerate(splits):
                for task in tasks:
                    for length in lengths:
                        raw[split].extend(generate_examples(task, n_per, length, seed=seed + 7919 * k, **g))
        return raw

    def _encode(self, ex: Mapping[str, Any]) -> dict[str, Any]:
        enc = make_encoder(self.tokenizer)
        prompt = enc(ex["context"] + ex["query"])
        answer = enc(ex["answer"])
        if self.max_length is not None and len(prompt) + len(answer) > self.max_length:
            prompt = prompt[len(prompt) + len(answer) - self.max_length :]  # keep the query end
        ids = prompt + answer
        labels = [-100] * len(prompt) + answer
        meta = {k: ex[k] for k in ("task", "id", "needle_depth", "answer") if k in ex}
        return {"input_ids": ids, "labels": labels, "answer_start": len(prompt), **meta}

    def setup(self, stage: str | None = None) -> None:
        if self.examples:
            return
        raw = self._raw_examples()
        self.examples = {s: [self._encode(ex) for ex in raw[s]] for s in SPLITS}
        if not any(self.examples.values()):
            raise DataError(
                f"no usable task examples (jsonl {self.jsonl}, generate {bool(self.generate)}): {self.stats}"
            )

    def _loader(self, split: str) -> DataLoader:
        self.setup()
        pad = getattr(self.tokenizer, "pad_token_id", None)
        pad = pad if pad is not None else (getattr(self.tokenizer, "eos_token_id", None) or 0)
        return DataLoader(
            self.examples[split],
            batch_size=self.batch_size,
            shuffle=split == "train",
            sampler=None if split == "train" else rank_share(self, self.examples[split]),
            generator=torch.Generator().manual_seed(0) if split == "train" else None,
            num_workers=self.num_workers,
            collate_fn=_Collate(int(pad)),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")


class _PhasedBatches(torch.utils.data.IterableDataset):
    """``steps[i]`` batches from loader ``i``, in order; each loader is re-iterated (reshuffled) when exhausted."""

    def __init__(self, loaders: Sequence[DataLoader], steps: Sequence[int]) -> None:
        self.loaders, self.steps = list(loaders), list(steps)

    def __len__(self) -> int:
        return sum(self.steps)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for loader, n in zip(self.loaders, self.steps, strict=True):
            it, done = iter(loader), 0
            while done < n:
                try:
                    batch = next(it)
                except StopIteration:
                    it = iter(loader)
                    continue
                done += 1
                yield batch


class CurriculumDataModule(L.LightningDataModule):
    """Short-to-long window curriculum: phase ``i`` trains ``steps[i]`` steps on ``phases[i]``'s windows.

    Copying from far back is learned much faster on short windows (few distractors per query) and then carries
    over to long ones with a little long-window training; each phase keeps tokens per step equal by scaling its
    batch. Validation uses the last (longest) phase. Under DDP each phase's loader gets a ``DistributedSampler``.
    """

    def __init__(self, phases: Sequence[LongDocDataModule], steps: Sequence[int]) -> None:
        super().__init__()
        if not phases or len(phases) != len(steps) or min(steps) < 1:
            raise DataError(f"curriculum needs one positive step count per phase, got {list(steps)}")
        self.phases, self.steps = list(phases), list(steps)

    def prepare_data(self) -> None:
        for p in self.phases:
            p.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        for p in self.phases:
            p.setup(stage)

    def train_dataloader(self) -> DataLoader:
        loaders = []
        for p in self.phases:
            ds = p.datasets["train"]
            sampler: Any = None
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                sampler = torch.utils.data.DistributedSampler(ds, shuffle=True, seed=p.seed)
            gen = torch.Generator().manual_seed(p.seed) if sampler is None else None
            loaders.append(
                DataLoader(
                    ds,
                    batch_size=p.batch_size,
                    shuffle=sampler is None,
                    sampler=sampler,
                    generator=gen,
                    collate_fn=_Collate(p.pad_id),
                )
            )
        return DataLoader(_PhasedBatches(loaders, self.steps), batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return self.phases[-1].val_dataloader()
