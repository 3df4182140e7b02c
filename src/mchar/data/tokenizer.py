"""Byte-level BPE training on the train split, saved as an offline-reloadable HF tokenizer directory.

Byte-level means every byte sequence is encodable (no UNK), so held-out files can never break encoding.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from mchar.data.corpus import DataError, read_text

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
DEFAULT_SPECIAL_TOKENS: tuple[str, ...] = (EOS_TOKEN, PAD_TOKEN)


def _iter_texts(
    files: Iterable[str | Path] | None, texts: Iterable[str] | None, max_chars: int | None
) -> Iterator[str]:
    """Texts in a deterministic order (files sorted), stopping once ``max_chars`` have been yielded."""
    budget = max_chars if max_chars is not None else float("inf")
    sources: list[Iterable[str]] = []
    if files is not None:
        sources.append(t for t in (read_text(p) for p in sorted(Path(f) for f in files)) if t)
    if texts is not None:
        sources.append(texts)
    for source in sources:
        for text in source:
            if budget <= 0:
                return
            if not text:
                continue
            chunk = text if len(text) <= budget else text[: int(budget)]
            budget -= len(chunk)
            yield chunk


def train_tokenizer(
    out_dir: str | Path,
    files: Iterable[str | Path] | None = None,
    texts: Iterable[str] | None = None,
    vocab_size: int = 8192,
    min_frequency: int = 2,
    max_chars: int | None = None,
    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
    model_max_length: int = 1 << 20,
) -> Any:
    """Train a byte-level BPE (train split only: pass train files) and ``save_pretrained`` it to ``out_dir``.

    Returns the ``PreTrainedTokenizerFast``; ``AutoTokenizer.from_pretrained(out_dir)`` reloads it offline.
    ``max_chars`` caps the training text for speed. Same inputs give a byte-identical ``tokenizer.json``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if EOS_TOKEN not in special_tokens or PAD_TOKEN not in special_tokens:
        raise DataError(
            f"special_tokens must include {EOS_TOKEN!r} and {PAD_TOKEN!r}, got {list(special_tokens)}"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    seen = 0

    def counted() -> Iterator[str]:
        nonlocal seen
        for t in _iter_texts(files, texts, max_chars):
            seen += len(t)
            yield t

    tok.train_from_iterator(counted(), trainer=trainer)
    if seen == 0:
        raise DataError("tokenizer training got no text (empty file list / texts)")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        unk_token=None,
        pad_token=PAD_TOKEN,
        model_max_length=model_max_length,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return fast


def load_tokenizer(path: str | Path) -> Any:
    """Reload a saved tokenizer directory offline through the standard ``AutoTokenizer`` path."""
    from transformers import AutoTokenizer

    p = Path(path)
    if not (p / "tokenizer.json").exists() and not (p / "tokenizer_config.json").exists():
        raise DataError(f"no tokenizer found in {p} (expected tokenizer.json from save_pretrained)")
    return AutoTokenizer.from_pretrained(str(p), local_files_only=True)


def resolve_tokenizer(tokenizer: Any) -> Any:
    """A tokenizer object from either a directory path or an already-built tokenizer."""
    if isinstance(tokenizer, (str, Path)):
        return load_tokenizer(tokenizer)
    return tokenizer


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Stable hash of a tokenizer's vocabulary/merges/special tokens (cache keys for tokenized data)."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        payload = backend.to_str()
    elif hasattr(tokenizer, "get_vocab"):
        payload = json.dumps(sorted(tokenizer.get_vocab().items()))
    else:
        payload = repr(tokenizer)
    extra = f"|eos={getattr(tokenizer, 'eos_token_id', None)}|pad={getattr(tokenizer, 'pad_token_id', None)}"
    return hashlib.sha256((payload + extra).encode("utf-8")).hexdigest()[:16]


def make_encoder(tokenizer: Any) -> Callable[[str], list[int]]:
    """``text -> token ids`` (no special tokens) for HF tokenizers, ``tokenizers.Tokenizer`` or callables."""
    if hasattr(tokenizer, "encode"):

        def enc(text: str) -> list[int]:
            try:
                out = tokenizer.encode(text, add_special_tokens=False)
            except TypeError:
                out = tokenizer.encode(text)
            return list(getattr(out, "ids", out))

        return enc
    if callable(tokenizer):

        def call(text: str) -> list[int]:
            out = tokenizer(text)
            if isinstance(out, dict) or hasattr(out, "keys"):
                out = out["input_ids"]
            return list(getattr(out, "ids", out))

        return call
    raise DataError(f"cannot tokenize with {type(tokenizer).__name__}: need .encode or a callable")


def make_token_counter(tokenizer: Any | None, chars_per_token: float = 4.0) -> Callable[[str], int]:
    """``text -> number of tokens``; without a tokenizer, approximate as ``len(text) / chars_per_token``.

    Accepts HF tokenizers, ``tokenizers.Tokenizer``, or any callable returning ids, an ``input_ids``
    mapping, or directly an int count.
    """
    if tokenizer is None:
        return lambda text: int(round(len(text) / chars_per_token))
    if not hasattr(tokenizer, "encode") and callable(tokenizer):

        def count(text: str) -> int:
            out = tokenizer(text)
            if isinstance(out, int):
                return out
            if isinstance(out, dict) or hasattr(out, "keys"):
                out = out["input_ids"]
            return len(getattr(out, "ids", out))

        return count
    enc = make_encoder(tokenizer)
    return lambda text: len(enc(text))
