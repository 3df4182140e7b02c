"""LensNet: score every working-context entry (positive = worth expanding, negative = safe to collapse).

Why it looks like this:

* **Bidirectional** self-attention over all entries (upstream's LensNet was causal, so early entries could not
  see what came after them, including the cursor). Every entry attends to every other and to the tail.
* The **recent tail** (the newest raw tokens, i.e. the "query") is appended as extra sequence positions with
  its own type embedding and learned from-the-end positions, so scores can depend on what is being asked now.
* Per-entry features: entry embedding (RMS-normalised, projected ``d_model -> width``), LOD embedding,
  ``log(span width)`` and ``log1p(distance to cursor)`` (log-scaled so a 1M-token history does not blow up
  the input; divided by ``log(2**20)`` so typical values are O(1)).
* **Query similarity** (``query_tokens > 0``): the cosine between each entry and the mean of the newest
  ``query_tokens`` tail embeddings is a third scalar feature. A 2-layer net trained for minutes does not
  rediscover this match from the raw tail on its own (measured: on passkey prompts the needle block ranked
  near the *bottom*, while the plain ``similarity`` policy ranked it in the top 3), and with it LensNet can
  start from what the similarity baseline knows and learn when to trust it.
* **Lexical match** (``lexical_tokens > 0``): the summed IDF of the newest ``lexical_tokens`` token ids found in each
  entry's span (or the ``lexical_lookback`` blocks before it and the ``lexical_follow`` after it), z-scored over the WC, is one more scalar feature: the
  ``lexical`` policy's score (:mod:`mchar.core.lexical`). Embeddings cannot tell apart needles worded alike that differ
  in one key token; token ids can. The caller computes it (it needs ids, which LensNet never sees) and passes
  ``lexical=``; ``lexical_prior`` is its initial weight on the prior path below.
* **Recency prior** (``recency_prior > 0``): a linear path from the unscaled scalar features (``log width``,
  ``log1p distance``, query similarity) straight to the score, initialised to ``-recency_prior * log1p(distance)``,
  so an untrained LensNet already ranks like ``recency`` and training learns where content should overrule it.
  Measured on the quickstart nets (400 steps, held-out windows): without it LensNet ranked code entries *worse*
  than plain distance (Spearman 0.30 vs 0.35 on session-like WCs, 0.05 vs 0.22 on random-fill WCs) and its
  allocations lost to ``recency`` on code (eval ΔNLL 0.24 vs 0.04); with it (0.5) 0.35 / 0.20 and ΔNLL 0.08.
  Its coefficients train at the net's learning rate, so the init stays the dominant ranking in a short run.
* Output: one **unsquashed** signed score per entry (no tanh: the allocator only compares and thresholds, and
  a ranking loss does not need a bounded range). Padded entries score 0.
* Entry embedding convention (see :func:`entry_embedding`): a raw block is the mean of its K token
  embeddings (``raw_embedding="mean"``) or its own LOD1 gist (``"gist"``: the learned summary carries the order and
  identity of its tokens, which a mean loses); a gist is its own vector. Callers (the ``lensnet`` policy) build the
  inputs with it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mchar.core.gistnet import Block, _rms_normalise, load_module, read_export_config, save_module

_FEATURE_SCALE = math.log(2.0**20)


RAW_EMBEDDINGS = ("mean", "gist")


def entry_embedding(level: int, vectors: torch.Tensor) -> torch.Tensor:
    """LensNet's view of one entry: mean of the K token embeddings for a raw block, the gist itself otherwise
    (with ``raw_embedding="gist"`` the caller passes a raw block's LOD1 gist as a level-1 vector)."""
    return vectors.mean(dim=0) if level == 0 else vectors.reshape(-1)


class LensNet(nn.Module):
    """``scores = lensnet(entry_embeds, levels, widths, distances, tail_embeds, mask=None)`` -> ``[B, W]``."""

    def __init__(
        self,
        d_model: int,
        width: int = 64,
        n_layers: int = 2,
        n_heads: int = 4,
        max_level: int = 2,
        tail_tokens: int = 32,
        query_tokens: int = 0,
        recency_prior: float = 0.0,
        similarity_prior: float = 0.0,
        lexical_tokens: int = 0,
        lexical_prior: float = 0.0,
        lexical_lookback: int = 1,
        lexical_follow: int = 0,
        lexical_idf_power: float = 1.0,
        lexical_max_df: int | None = None,
        raw_embedding: str = "mean",
    ) -> None:
        super().__init__()
        if raw_embedding not in RAW_EMBEDDINGS:
            raise ValueError(f"lensnet.raw_embedding must be one of {RAW_EMBEDDINGS}, got {raw_embedding!r}")
        self.raw_embedding = raw_embedding
        if query_tokens < 0:
            raise ValueError(f"lensnet.query_tokens must be >= 0, got {query_tokens}")
        if recency_prior < 0:
            raise ValueError(f"lensnet.recency_prior must be >= 0, got {recency_prior}")
        if similarity_prior and not (query_tokens and recency_prior > 0):
            raise ValueError(
                "lensnet.similarity_prior needs lensnet.query_tokens > 0 and lensnet.recency_prior > 0"
            )
        if min(lexical_tokens, lexical_lookback, lexical_follow) < 0:
            raise ValueError("lensnet.lexical_tokens, lexical_lookback and lexical_follow must be >= 0")
        if lexical_idf_power <= 0 or (lexical_max_df is not None and lexical_max_df < 1):
            raise ValueError(
                "lensnet.lexical_idf_power must be > 0 and lensnet.lexical_max_df >= 1 (or null)"
            )
        if lexical_prior and not (lexical_tokens and recency_prior > 0):
            raise ValueError(
                "lensnet.lexical_prior needs lensnet.lexical_tokens > 0 and lensnet.recency_prior > 0"
            )
        self.d_model, self.width, self.n_layers, self.n_heads = d_model, width, n_layers, n_heads
        self.max_level, self.tail_tokens, self.query_tokens = max_level, tail_tokens, query_tokens
        self.recency_prior = float(recency_prior)
        self.similarity_prior = float(similarity_prior)
        self.lexical_tokens, self.lexical_lookback = int(lexical_tokens), int(lexical_lookback)
        self.lexical_follow = int(lexical_follow)
        self.lexical_idf_power = float(lexical_idf_power)
        self.lexical_max_df = None if lexical_max_df is None else int(lexical_max_df)
        self.lexical_prior = float(lexical_prior)
        self.entry_proj = nn.Linear(d_model, width)
        self.tail_proj = nn.Linear(d_model, width)
        self.level = nn.Embedding(max_level + 1, width)
        n_feats = 2 + bool(query_tokens) + bool(lexical_tokens)
        self.features = nn.Sequential(nn.Linear(n_feats, width), nn.GELU(), nn.Linear(width, width))
        self.tail_type = nn.Parameter(torch.randn(width) * 0.02)
        self.tail_pos = nn.Parameter(torch.randn(max(tail_tokens, 1), width) * 0.02)
        self.blocks = nn.ModuleList(Block(width, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(width)
        self.score = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, 1))
        nn.init.normal_(self.level.weight, std=0.02)
        self.prior: nn.Linear | None = None
        if self.recency_prior > 0:
            self.prior = nn.Linear(n_feats, 1)
            with torch.no_grad():
                self.prior.weight.zero_()
                self.prior.weight[0, 1] = -self.recency_prior  # column 1 = log1p(distance)
                if query_tokens:
                    self.prior.weight[0, 2] = self.similarity_prior  # column 2 = query similarity
                if lexical_tokens:
                    self.prior.weight[0, -1] = self.lexical_prior  # last column = lexical match
                self.prior.bias.zero_()

    def config_dict(self) -> dict[str, Any]:
        return {
            "kind": "lensnet",
            "d_model": self.d_model,
            "width": self.width,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "max_level": self.max_level,
            "tail_tokens": self.tail_tokens,
            "query_tokens": self.query_tokens,
            "recency_prior": self.recency_prior,
            "similarity_prior": self.similarity_prior,
            "lexical_tokens": self.lexical_tokens,
            "lexical_prior": self.lexical_prior,
            "lexical_lookback": self.lexical_lookback,
            "lexical_follow": self.lexical_follow,
            "lexical_idf_power": self.lexical_idf_power,
            "lexical_max_df": self.lexical_max_df,
            "raw_embedding": self.raw_embedding,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> LensNet:
        cfg = {k: v for k, v in config.items() if k != "kind"}
        return cls(**cfg)

    def save_pretrained(self, directory: str | Path) -> Path:
        return save_module(self, self.config_dict(), directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> LensNet:
        return load_module(directory, cls.from_config).to(map_location)

    def forward(
        self,
        entry_embeds: torch.Tensor,
        levels: torch.Tensor,
        widths: torch.Tensor,
        distances: torch.Tensor,
        tail_embeds: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        tail_mask: torch.Tensor | None = None,
        lexical: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Score entries.

        entry_embeds [B, W, d] (or [W, d]); levels [B, W] int; widths [B, W] tokens covered; distances [B, W]
        tokens from the entry's end to the cursor; tail_embeds [B, T, d] token embeddings of the recent tail
        (only the last ``tail_tokens`` are used; T may be 0 or None); mask [B, W] bool, True = real entry;
        tail_mask [B, T] bool, True = real tail token (pad tails on the left: the last column is the newest); lexical
        [B, W] lexical match scores (needed when ``lexical_tokens > 0``; z-scored here over each row's real entries).
        Returns [B, W] (or [W]).
        """
        if self.lexical_tokens and lexical is None:
            raise ValueError("this LensNet reads lexical match scores (lexical_tokens > 0): pass lexical=")
        squeeze = entry_embeds.dim() == 2
        if squeeze:
            entry_embeds, levels, widths, distances = (
                t.unsqueeze(0) for t in (entry_embeds, levels, widths, distances)
            )
            tail_embeds = None if tail_embeds is None else tail_embeds.unsqueeze(0)
            mask = None if mask is None else mask.unsqueeze(0)
            lexical = None if lexical is None else lexical.unsqueeze(0)
            tail_mask = None if tail_mask is None else tail_mask.unsqueeze(0)
        b, w, _ = entry_embeds.shape
        dtype = self.entry_proj.weight.dtype
        raw = torch.stack([widths.to(dtype).clamp_min(1).log(), distances.to(dtype).clamp_min(0).log1p()], -1)
        if self.query_tokens:
            sim = query_similarity(entry_embeds.to(dtype), tail_embeds, tail_mask, self.query_tokens)
            raw = torch.cat([raw, sim.unsqueeze(-1)], -1)
        if self.lexical_tokens and lexical is not None:
            raw = torch.cat([raw, standardise_rows(lexical.to(dtype), mask).unsqueeze(-1)], -1)
        scale = raw.new_tensor([_FEATURE_SCALE, _FEATURE_SCALE] + [1.0] * (raw.shape[-1] - 2))
        h = (
            self.entry_proj(_rms_normalise(entry_embeds.to(dtype)))
            + self.level(levels.long().clamp(0, self.max_level))
            + self.features(raw / scale)
        )
        key_mask = (
            torch.ones(b, w, dtype=torch.bool, device=h.device) if mask is None else mask.to(torch.bool)
        )
        if tail_embeds is not None and tail_embeds.shape[1] > 0 and self.tail_tokens > 0:
            tail = tail_embeds[:, -self.tail_tokens :].to(dtype)
            t = tail.shape[1]
            tail_h = self.tail_proj(_rms_normalise(tail)) + self.tail_type + self.tail_pos[-t:]
            h = torch.cat([h, tail_h], dim=1)
            tmask = (
                torch.ones(b, t, dtype=torch.bool, device=h.device)
                if tail_mask is None
                else tail_mask[:, -self.tail_tokens :].to(torch.bool)
            )
            key_mask = torch.cat([key_mask, tmask], dim=1)
        # A row with no valid key at all would give NaN attention; let it attend to itself instead.
        empty = ~key_mask.any(dim=1, keepdim=True)
        attn_mask = key_mask | empty
        for block in self.blocks:
            h = block(h, attn_mask)
        scores = self.score(self.ln_f(h[:, :w])).squeeze(-1)
        if self.prior is not None:
            scores = scores + self.prior(raw).squeeze(-1)
        if mask is not None:
            scores = scores.masked_fill(~key_mask[:, :w], 0.0)
        return scores[0] if squeeze else scores


# What a LensNet reads: every member of an ensemble must read the same (one set of inputs feeds them all).
INPUT_SETTINGS = (
    "d_model",
    "max_level",
    "tail_tokens",
    "query_tokens",
    "lexical_tokens",
    "lexical_lookback",
    "lexical_follow",
    "lexical_idf_power",
    "lexical_max_df",
    "raw_embedding",
)


class LensNetEnsemble(nn.Module):
    """Several LensNets (e.g. seed replicates) scoring as one: the mean of their per-WC z-scored scores.

    Why: LensNets trained alike under other seeds stream held-out documents 0.14-0.19 nats apart on code; an ensemble
    asks whether averaging their rankings removes one net's luck, at one more forward per member (measured on the
    quickstart's four seeds: it streams a little worse than its average member, docs/FINDINGS.md). A Bradley–Terry LensNet is defined up to shift and scale, so members are z-scored
    per WC before they are averaged. The members must read the same inputs (:data:`INPUT_SETTINGS`), which the
    ensemble exposes as its own, so a policy feeds it exactly as it feeds one LensNet."""

    kind = "lensnet_ensemble"

    def __init__(self, members: list[LensNet]) -> None:
        super().__init__()
        if not members:
            raise ValueError("lensnet ensemble: needs at least one member")
        for name in INPUT_SETTINGS:
            values = {repr(getattr(m, name)) for m in members}
            if len(values) > 1:
                raise ValueError(
                    f"lensnet ensemble: members read different inputs ({name}: {sorted(values)})"
                )
            setattr(self, name, getattr(members[0], name))
        self.members = nn.ModuleList(members)

    def config_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "members": [m.config_dict() for m in self.members]}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> LensNetEnsemble:
        return cls([LensNet.from_config(m) for m in config["members"]])

    def save_pretrained(self, directory: str | Path) -> Path:
        return save_module(self, self.config_dict(), directory)

    def forward(self, *args: Any, mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        """Same arguments and shape as :meth:`LensNet.forward`."""
        outs = [m(*args, mask=mask, **kwargs) for m in self.members]
        squeeze = outs[0].dim() == 1
        rows = None if mask is None else (mask.unsqueeze(0) if squeeze else mask)
        z = [standardise_rows(o.unsqueeze(0) if squeeze else o, rows) for o in outs]
        mean = torch.stack(z).mean(0)
        return mean[0] if squeeze else mean


def standardise_rows(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, W]`` z-scored per row over its real entries (``mask``); a constant row becomes 0, padding 0."""
    m = torch.ones_like(x, dtype=torch.bool) if mask is None else mask.to(torch.bool)
    w = m.to(x.dtype)
    n = w.sum(-1, keepdim=True)
    mean = (x * w).sum(-1, keepdim=True) / n.clamp_min(1.0)
    var = (((x - mean) * w) ** 2).sum(-1, keepdim=True) / (n - 1).clamp_min(1.0)
    std = var.sqrt()
    z = torch.where(std > 1e-6, (x - mean) / std.clamp_min(1e-6), torch.zeros_like(x))
    return z * w


def query_similarity(
    entry_embeds: torch.Tensor, tail_embeds: torch.Tensor | None, tail_mask: torch.Tensor | None, n: int
) -> torch.Tensor:
    """``[B, W]`` cosine between each entry and the mean of the newest ``n`` valid tail embeddings (0 without a
    tail). Tails are left-padded, so the newest tokens are the last columns."""
    b, w, _ = entry_embeds.shape
    if tail_embeds is None or tail_embeds.shape[1] == 0:
        return entry_embeds.new_zeros(b, w)
    tail = tail_embeds[:, -n:].to(entry_embeds.dtype)
    valid = (
        torch.ones(tail.shape[:2], dtype=tail.dtype, device=tail.device)
        if tail_mask is None
        else tail_mask[:, -n:].to(tail.dtype)
    )
    query = (tail * valid.unsqueeze(-1)).sum(1) / valid.sum(1, keepdim=True).clamp_min(1.0)
    return torch.nn.functional.cosine_similarity(entry_embeds, query.unsqueeze(1), dim=-1)


def from_pretrained(
    directory: str | Path, map_location: str | torch.device = "cpu"
) -> LensNet | LensNetEnsemble:
    """One exported LensNet or ensemble, by the ``kind`` its ``config.json`` names."""
    if read_export_config(directory).get("kind") == LensNetEnsemble.kind:
        return load_module(directory, LensNetEnsemble.from_config).to(map_location)
    return LensNet.from_pretrained(directory, map_location)


def from_config(config: dict[str, Any]) -> LensNet:
    return LensNet.from_config(config)
