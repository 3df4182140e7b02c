"""Exact-match accuracy on the synthetic long-context tasks, for any greedy decoder."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch

GreedyFn = Callable[[list[int], int], list[int]]
"""(prompt token ids, number of new tokens) -> generated token ids."""


def full_context_greedy(base: Any) -> GreedyFn:
    """Greedy decoding with the plain base model over the whole prompt (the full-context reference)."""

    @torch.no_grad()
    def generate(prompt: list[int], n: int) -> list[int]:
        ids = torch.tensor([prompt], device=base.device)
        pos = torch.arange(len(prompt), device=base.device)[None]
        logits, cache = base.forward_embeds(base.embed(ids), pos, use_cache=True)
        out: list[int] = []
        for step in range(n):
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
            if step + 1 == n:
                break
            p = torch.tensor([[len(prompt) + step]], device=base.device)
            logits, cache = base.forward_embeds(
                base.embed(torch.tensor([[nxt]], device=base.device)),
                p,
                past_key_values=cache,
                use_cache=True,
            )
        return out

    return generate


def answer_accuracy(generate: GreedyFn, tokenizer: Any, examples: Sequence[dict]) -> dict[str, float]:
    """Share of examples whose greedy continuation reproduces the answer's tokens exactly, per task and overall."""
    hits: dict[str, list[float]] = defaultdict(list)
    for ex in examples:
        prompt = tokenizer.encode(ex["context"] + ex["query"], add_special_tokens=False)
        target = tokenizer.encode(ex["answer"], add_special_tokens=False)
        produced = generate(prompt, len(target))
        hits[ex["task"]].append(float(produced == target))
    out = {f"{task}": sum(v) / len(v) for task, v in hits.items()}
    everything = [x for v in hits.values() for x in v]
    out["overall"] = sum(everything) / max(1, len(everything))
    return out
