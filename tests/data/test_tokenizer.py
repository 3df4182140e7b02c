"""Byte-level BPE: trains on tiny text quickly, reloads offline via AutoTokenizer, deterministic."""

from __future__ import annotations

from pathlib import Path

import pytest

from mchar.data.corpus import DataError
from mchar.data.tokenizer import (
    EOS_TOKEN,
    PAD_TOKEN,
    load_tokenizer,
    make_encoder,
    make_token_counter,
    tokenizer_fingerprint,
    train_tokenizer,
)

TEXTS = [f"def func_{i}(x):\n    return x * {i} + len('abc')\n\n" * 5 for i in range(60)]


def test_train_save_reload_roundtrip(tmp_path: Path) -> None:
    tok = train_tokenizer(tmp_path / "tok", texts=TEXTS, vocab_size=512)
    again = load_tokenizer(tmp_path / "tok")
    sample = "def héllo_wörld():\n\treturn '∑ unseen bytes'\n"
    ids = again.encode(sample, add_special_tokens=False)
    assert again.decode(ids) == sample  # byte-level: no UNK, exact round trip
    assert ids == tok.encode(sample, add_special_tokens=False)
    assert again.eos_token == EOS_TOKEN and again.pad_token == PAD_TOKEN
    assert again.eos_token_id != again.pad_token_id
    assert len(again) <= 512
    assert tokenizer_fingerprint(tok) == tokenizer_fingerprint(again)


def test_deterministic_and_capped(tmp_path: Path) -> None:
    train_tokenizer(tmp_path / "a", texts=TEXTS, vocab_size=400)
    train_tokenizer(tmp_path / "b", texts=TEXTS, vocab_size=400)
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (
        tmp_path / "b" / "tokenizer.json"
    ).read_bytes()
    capped = train_tokenizer(tmp_path / "c", texts=TEXTS, vocab_size=400, max_chars=100)
    assert tokenizer_fingerprint(capped) != tokenizer_fingerprint(load_tokenizer(tmp_path / "a"))


def test_train_from_files_and_errors(tmp_path: Path) -> None:
    f = tmp_path / "x.py"
    f.write_text(TEXTS[0])
    tok = train_tokenizer(tmp_path / "tok", files=[f, tmp_path / "missing.py"], vocab_size=300)
    assert tok.decode(tok.encode("return x", add_special_tokens=False)) == "return x"
    with pytest.raises(DataError):
        train_tokenizer(tmp_path / "none", texts=[], vocab_size=300)
    with pytest.raises(DataError):
        load_tokenizer(tmp_path / "nowhere")


def test_counters_accept_any_tokenizer_shape(tmp_path: Path) -> None:
    tok = train_tokenizer(tmp_path / "tok", texts=TEXTS, vocab_size=300)
    text = "return x * 3"
    n = len(tok.encode(text, add_special_tokens=False))
    assert make_token_counter(tok)(text) == n
    assert make_token_counter(tok.backend_tokenizer)(text) == n  # tokenizers.Tokenizer -> Encoding
    assert make_token_counter(lambda s: s.split())(text) == 4
    assert make_token_counter(lambda s: {"input_ids": [1, 2]})(text) == 2
    assert make_token_counter(lambda s: 7)(text) == 7
    assert make_token_counter(None, chars_per_token=4)(text) == 3
    assert make_encoder(tok)(text) == tok.encode(text, add_special_tokens=False)
