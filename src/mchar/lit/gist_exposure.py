"""Gist exposure: while the local base pre-trains, teach it to read one-slot block summaries.

Why: a base that has only ever seen token embeddings at consecutive positions cannot use a summary slot. On the
retrieval base (held-out windows, 55 of 56 prefix blocks replaced) *any* one-slot stand-in cost more NLL than
dropping the blocks outright: a zero vector +0.99, the block's last token +0.86, the mean embedding +0.96, a
trained GistNet +0.98, dropping +0.74. GistNet trains against a frozen base, so it cannot fix that by itself.

The exposure loss replaces a random aligned mix of the window's blocks by parameter-free summaries (mean of the
K children, RMS-rescaled to the embedding scale; level 2 = the same over level-1 summaries) at their span's
position, exactly as a working context lays them out, and trains next-token NLL on every raw slot. The base
learns to read summaries; GistNet later only has to match or beat the mean. Only the project's own local base
is trained this way: an external HF base stays as it is (adapt it with the e2e stage's LoRA instead).

``summary``: the summariser (any :data:`~mchar.lit.windows.GistFn`, default the mean above). A GistNet passed here
is trained with the base (``base_lm.gist_exposure_summary=gistnet``): the base learns to read what a learnt
compressor writes instead of what the mean keeps, and that GistNet is where the GistNet stage can start from.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mchar.lit import windows as W


def mean_summary(scale: torch.Tensor) -> W.GistFn:
    """Block mean, RMS-normalised and multiplied by ``scale`` (the embeddings' RMS): a gist-sized input."""

    def fn(x: torch.Tensor, level: int) -> torch.Tensor:
        m = x.mean(dim=1)
        return m * torch.rsqrt(m.pow(2).mean(dim=-1, keepdim=True) + 1e-12) * scale

    return fn


def gisted_inputs(
    emb: torch.Tensor,
    block_size: int,
    depth: int,
    gen: np.random.Generator,
    raw_prob: float = 0.5,
    keep_raw_blocks: int = 1,
    position_mode: str = "centre",
    session_share: float = 0.0,
    session_budget: int | None = None,
    summary: W.GistFn | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(inputs_embeds [B, S, d], position_ids [B, S], token_pos [S])`` for one random layout shared by the batch.

    ``token_pos`` is the true position of each raw slot and -1 for a summary slot. The last partial block and the
    newest ``keep_raw_blocks`` blocks stay raw. With probability ``session_share`` the layout is a session's WC at
    ``session_budget`` instead (:func:`mchar.lit.windows.session_layout`: raw present, summaries behind it), where
    the evaluation reads gists.
    """
    b, t, _ = emb.shape
    k = block_size
    prefix = t // k * k
    entries = W.training_layout(
        prefix, k, depth, gen, keep_raw_blocks, raw_prob, session_share, session_budget
    )
    if summary is None:
        summary = mean_summary(emb.detach().pow(2).mean().sqrt())
    gists = W.build_gists(summary, emb[:, :prefix], k, depth)
    bank = W.source_bank(emb, gists)
    idx, pos = W.prefix_slots(entries, k, W.bank_offsets(t, prefix, k, depth), position_mode)
    tail = np.arange(prefix, t, dtype=np.int64)
    idx, pos = np.concatenate([idx, tail]), np.concatenate([pos, tail])
    token_pos = torch.from_numpy(np.where(idx < t, idx, -1)).to(emb.device)
    positions = torch.from_numpy(pos).to(emb.device).unsqueeze(0).expand(b, -1)
    return bank[:, torch.from_numpy(idx).to(emb.device)], positions, token_pos


def gist_exposure_loss(
    model: nn.Module,
    ids: torch.Tensor,
    block_size: int,
    depth: int,
    gen: np.random.Generator,
    **layout: Any,
) -> torch.Tensor:
    """Next-token NLL of every raw slot whose next true token exists, with a random mix of blocks summarised.

    A raw token predicts the token that followed it in the text even when that token now sits inside a summary
    (the model saw only what came before it, so this is an honest next-token target). ``layout``: the
    :func:`gisted_inputs` options (``raw_prob``, ``keep_raw_blocks``, ``position_mode``, ``summary``).
    """
    emb = model.get_input_embeddings()(ids)
    x, positions, token_pos = gisted_inputs(emb, block_size, depth, gen, **layout)
    mask = torch.ones(positions.shape, dtype=torch.long, device=ids.device)
    logits = model(inputs_embeds=x, position_ids=positions, attention_mask=mask, use_cache=False).logits
    t = ids.shape[1]
    keep = (token_pos >= 0) & (token_pos + 1 < t)
    targets = ids[:, (token_pos[keep] + 1)]
    lg = logits[:, keep]
    return F.cross_entropy(lg.reshape(-1, lg.shape[-1]).float(), targets.reshape(-1))
