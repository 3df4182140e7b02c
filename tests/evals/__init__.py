"""Evaluation tests share one tiny local base (random Llama + a ~300-token byte-level BPE) built on the fly."""

from __future__ import annotations

from pathlib import Path

TEXT = (
    "def add(a, b):\n    return a + b\n\n"
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\n"
    "# the passkey is 12345, remember it\nvalue = compute(value) * 2\nprint(value)\n"
)


def build_tiny_base(directory: Path, vocab: int = 300, max_positions: int = 4096) -> Path:
    """Save a tiny random Llama and a tiny tokenizer into ``directory`` (HF format, offline-loadable)."""
    from mchar.base.adapter import tiny_causal_lm
    from mchar.data.tokenizer import train_tokenizer

    tok = train_tokenizer(directory, texts=[TEXT * 20], vocab_size=vocab, min_frequency=1)
    model = tiny_causal_lm(
        "llama", vocab_size=len(tok), hidden_size=32, layers=2, heads=4, max_positions=max_positions, seed=0
    )
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def token_stream(n: int, seed: int = 0) -> list[int]:
    """Deterministic pseudo-text ids with some repetition (so context helps a little even for a random LM)."""
    import random

    rng = random.Random(seed)
    motif = [rng.randrange(3, 290) for _ in range(40)]
    out: list[int] = []
    while len(out) < n:
        out.extend(motif if rng.random() < 0.5 else [rng.randrange(3, 290) for _ in range(40)])
    return out[:n]
