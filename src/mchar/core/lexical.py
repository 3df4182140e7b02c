"""An inverted index of a tree's blocks: which blocks hold which token ids, for lexical block retrieval.

Query similarity (``SimilarityPolicy``) compares mean embeddings, so a question that shares its wording with several
needles ("the special magic number for X is") rates them all alike; only the rare tokens (the key X) tell them apart.
This index answers "which of these spans contains query token t" for every WC entry at once, weighting each token by
its rarity over the blocks indexed so far (inverse document frequency), the way BM25-style retrievers rank passages.

Cost: indexing is O(K) per completed block, done once (incremental); scoring is O(|query| x entries x log(postings))
per refocus, independent of the history's length except through the postings of the query's own tokens.

:class:`WindowLexicon` is the same score for a batch of training windows at once (LensNet's lexical input): the
query tokens' presence per block, prefix-summed over blocks, so any span's hits are one difference of two rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch


class LexicalIndex:
    """Postings (sorted block indices) per token id over a tree's complete blocks, grown as the tree grows."""

    def __init__(self) -> None:
        self.blocks = 0
        self._postings: dict[int, list[int]] = {}
        self._arrays: dict[int, np.ndarray] = {}

    def update(self, tree: Any) -> None:
        """Index the blocks the tree completed since the last call."""
        k = int(tree.block_size)
        n = int(tree.num_tokens) // k
        if n <= self.blocks:
            return
        ids = tree.tokens(self.blocks * k, n * k).reshape(n - self.blocks, k).tolist()
        for b, row in enumerate(ids, start=self.blocks):
            for tok in set(row):
                self._postings.setdefault(tok, []).append(b)
                self._arrays.pop(tok, None)
        self.blocks = n

    def idf(self, token: int) -> float:
        """``log(1 + N / df)``: 0 for a token no indexed block holds."""
        df = len(self._postings.get(int(token), ()))
        return math.log1p(self.blocks / df) if df else 0.0

    def _array(self, token: int) -> np.ndarray:
        arr = self._arrays.get(token)
        if arr is None:
            arr = self._arrays[token] = np.asarray(self._postings[token], dtype=np.int64)
        return arr

    def span_scores(
        self,
        query: torch.Tensor,
        spans: Sequence[tuple[int, int]],
        idf_power: float = 1.0,
        max_df: int | None = None,
    ) -> torch.Tensor:
        """For block spans ``[(b0, b1), ...]`` (end exclusive): the summed IDF (raised to ``idf_power``) of the
        distinct query tokens each holds; ``max_df`` ignores query tokens more than that many blocks hold (the words
        every needle shares), so their entries score nothing rather than a little."""
        starts = np.asarray([s for s, _ in spans], dtype=np.int64)
        ends = np.asarray([e for _, e in spans], dtype=np.int64)
        out = np.zeros(len(spans), dtype=np.float64)
        for tok in {int(t) for t in query.reshape(-1).tolist()}:
            if tok not in self._postings or (max_df is not None and len(self._postings[tok]) > max_df):
                continue
            post = self._array(tok)
            first = np.searchsorted(post, starts)  # the first posting at or after each span's start
            hit = (first < post.size) & (post[np.minimum(first, post.size - 1)] < ends)
            out += hit * self.idf(tok) ** idf_power
        return torch.from_numpy(out).float()


@dataclass(frozen=True)
class WindowLexicon:
    """Lexical block scores for a batch of windows: ``cum [B, N+1, Q]`` counts of blocks ``< n`` holding each query
    token, ``idf [B, Q]`` its weight (0 for a repeat within the query and for a token no block holds)."""

    cum: torch.Tensor
    idf: torch.Tensor

    @classmethod
    def of(
        cls,
        ids: torch.Tensor,
        block_size: int,
        prefix: int,
        query_tokens: int,
        idf_power: float = 1.0,
        max_df: int | None = None,
    ) -> WindowLexicon:
        """Index the ``prefix // block_size`` blocks of each window ``ids [B, T]`` against its query, the last
        ``query_tokens`` ids before ``prefix`` (the IDF is over the window's blocks, as the index's is over the tree's;
        ``idf_power`` / ``max_df`` as in :meth:`LexicalIndex.span_scores`: a settle's sharpened score)."""
        k, n = int(block_size), int(prefix) // int(block_size)
        q = min(int(query_tokens), int(prefix))
        query = ids[:, prefix - q : prefix]  # [B, Q]
        blocks = ids[:, : n * k].reshape(ids.shape[0], n, k)
        present = (blocks[:, :, :, None] == query[:, None, None, :]).any(2)  # [B, N, Q]
        repeat = ((query[:, :, None] == query[:, None, :]).tril(-1)).any(-1)  # an earlier copy in the query
        df = present.sum(1)
        kept = (df > 0) & ~repeat & (df <= (max_df if max_df is not None else n))
        idf = torch.where(kept, torch.log1p(n / df.clamp_min(1).float()) ** idf_power, 0.0)
        zero = present.new_zeros(ids.shape[0], 1, q, dtype=torch.int32)
        return cls(torch.cat([zero, present.cumsum(1, dtype=torch.int32)], 1), idf)

    def span_scores(self, rows_batch: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        """``[R, W]`` summed IDF of the distinct query tokens of window ``rows_batch[r]`` that block span
        ``[starts, ends)`` (``[R, W]`` block indices, end exclusive) holds."""
        cum = self.cum[rows_batch]  # [R, N+1, Q]
        q = cum.shape[-1]
        hi = cum.gather(1, ends[..., None].expand(-1, -1, q))
        lo = cum.gather(1, starts[..., None].expand(-1, -1, q))
        return ((hi > lo).float() * self.idf[rows_batch][:, None, :]).sum(-1)


@dataclass(frozen=True)
class LexicalInput:
    """The lexical match score a LensNet reads as an input: the newest ``tokens`` ids as the query (0 = no such
    input), each span widened by ``lookback`` / ``follow`` blocks, IDF to ``idf_power``, tokens more than ``max_df``
    blocks hold ignored. Training, sessions and wrappers read it from the net's ``lexical_*`` attributes alone."""

    tokens: int = 0
    lookback: int = 1
    follow: int = 0
    idf_power: float = 1.0
    max_df: int | None = None

    ATTRS = ("lexical_tokens", "lexical_lookback", "lexical_follow", "lexical_idf_power", "lexical_max_df")

    @classmethod
    def of(cls, net: Any) -> LexicalInput:
        """What ``net`` reads (these defaults where it has no such attribute, e.g. a LensNet exported before)."""
        return cls(*(getattr(net, a, f.default) for a, f in zip(cls.ATTRS, fields(cls), strict=True)))


__all__ = ["LexicalIndex", "LexicalInput", "WindowLexicon"]
