"""One-level lookahead scoring: rate a coarse gist by the best of its children.

Why: expanding an LOD2 gist only swaps it for K LOD1 gists, which rarely carry the exact tokens a query needs
(a passkey's digits), so its *measured* one-step utility is ~0 even when a needle sits inside. Any scorer that
rates entries one step at a time therefore never walks down to a needle buried under a coarse gist (measured on
the retrieval experiment: the needle's block was never raw at budget 128, for every policy). Scoring the children
instead and giving each coarse gist the max of its children's scores lets the allocator expand the LOD2 holding
the needle first and the needle's LOD1 gist on the next refocus.

The view replaces each gist of level >= ``min_level`` by its children (one level only), so it has at most K x
the WC's entries: bounded by the budget, never by the history.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mchar.core.entries import Entry

CONTENT_POLICIES = ("lensnet", "similarity", "attention")
"""Score sources that read entry content, the ones ``allocator.lookahead`` applies to."""


def lookahead_view(
    entries: Sequence[Entry], block_size: int, min_level: int = 2
) -> tuple[list[Entry], list[int]]:
    """``(view, owner)``: ``entries`` with every gist of level >= ``min_level`` replaced by its children, and for
    each view entry the index of the entry it came from."""
    if min_level < 2:
        raise ValueError(
            f"lookahead min_level must be >= 2 (an LOD1 gist's child is a raw block), got {min_level}"
        )
    view: list[Entry] = []
    owner: list[int] = []
    for i, e in enumerate(entries):
        parts = e.children(block_size) if e.level >= min_level else [e]
        view.extend(parts)
        owner.extend([i] * len(parts))
    return view, owner


def max_by_owner(view_scores: torch.Tensor, owner: Sequence[int], n: int) -> torch.Tensor:
    """``[n]`` scores: each entry's max over its view entries (NaN view scores are ignored; all-NaN stays NaN)."""
    idx = torch.as_tensor(list(owner), dtype=torch.long, device=view_scores.device)
    vals = view_scores.float().nan_to_num(nan=float("-inf"))
    out = torch.full((n,), float("-inf"), device=view_scores.device)
    out = out.scatter_reduce(0, idx, vals, reduce="amax", include_self=True)
    return out.masked_fill(torch.isneginf(out), float("nan"))
