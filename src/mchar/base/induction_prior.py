"""A hand-wired induction circuit for mchar's small local base LM (``model.local.induction_prior``).

Every retrieval task mchar evaluates needs the frozen base to copy what followed an earlier occurrence of the
current context (an induction head). Pretrained LMs have such heads; a 2-layer d128 model trained on a CPU budget
never formed one (``bench induction``: copy loss stays near chance for thousands of steps, with or without copy
batches, copy-only warm-ups or a previous-token head given). So the local base starts with the circuit built in,
and text training refines it like any other weights:

* layer 0, heads 0 and 1: previous-token heads (offsets 1 and 2), purely positional (q/k biases only, using the
  fast RoPE pairs); each writes a random code of the token it attends to into its own subspace (S1, S2);
* layer 1, heads 0 and 1: induction heads that match (current token, previous token) against (S1, S2) of every
  earlier position, using only the slow RoPE pairs (rotation over ``span`` positions < ``max_angle``), so the
  match does not depend on distance; their values copy the attended token's embedding (outside S1, S2) into
  the residual stream (at most 2 x head_dim of it), where the tied unembedding reads it.

A 2-token match ("pass key is" -> the key, not every "is" of the haystack) needs enough slow pairs: a large
``rope_theta`` (1e10) and ``head_dim`` 64 give 19 at 4,096 positions. Heads 2+ of both layers and the MLPs are
ordinary, randomly initialised and learnt.
"""

from __future__ import annotations

import math
from typing import Any

MAX_ANGLE = 0.35  # radians a "slow" RoPE pair may rotate over the span (cos >= 0.94)
FAST_PAIRS = 6  # RoPE pairs the positional previous-token heads use
PREV_SHARPNESS = 6.0  # q/k bias magnitude per fast pair of the previous-token heads
MATCH_SCALE = 2.0  # induction-head q/k weight scale (attention ~1.0 on the match at 1,024 tokens)
PREV_WRITE = 0.1  # norm scale of the previous-token codes written to the residual stream
COPY_GAIN = 1.0  # gain of the copied embedding


def rope_frequencies(head_dim: int, theta: float) -> list[float]:
    """HF Llama's per-pair RoPE angular frequencies (pair j rotates dims j and j + head_dim/2)."""
    return [theta ** (-2 * j / head_dim) for j in range(head_dim // 2)]


def slow_pairs(head_dim: int, theta: float, span: int) -> list[int]:
    """RoPE pairs that rotate less than ``MAX_ANGLE`` over ``span`` positions (distance-invariant matching)."""
    freqs = rope_frequencies(head_dim, theta)
    return [j for j, f in enumerate(freqs) if f * span < MAX_ANGLE]


def code_size(head_dim: int, theta: float, span: int) -> int:
    """Dimensions of each token code: half the slow pairs each for the two matched tokens, two reals a pair."""
    return 2 * (len(slow_pairs(head_dim, theta, span)) // 2)


def check_prior(hidden: int, heads: int, layers: int, head_dim: int, theta: float, span: int) -> str | None:
    """Why the circuit cannot be built with this architecture (None when it can)."""
    if layers < 2 or heads < 2:
        return f"needs >= 2 layers and >= 2 heads (got {layers} layers, {heads} heads)"
    code = code_size(head_dim, theta, span)
    if code < 8:
        return (
            f"only {code // 2} slow RoPE pairs per matched token at head_dim={head_dim}, rope_theta={theta:g} over "
            f"{span} positions (need >= 4): raise rope_theta (e.g. 1e10) or head_dim (e.g. 64)"
        )
    if 3 * code >= hidden:
        return f"hidden_size={hidden} does not fit three {code}-dim codes"
    return None


def install_induction_prior(model: Any, span: int, seed: int = 0) -> None:
    """Overwrite heads 0-1 of layers 0-1 of a fresh HF Llama (built with ``attention_bias=True``) with the circuit."""
    import torch

    with torch.no_grad():
        _install(model, span, seed)


def _install(model: Any, span: int, seed: int) -> None:
    import torch

    cfg = model.config
    d, hd = cfg.hidden_size, cfg.head_dim
    theta = float(
        (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", getattr(cfg, "rope_theta", 1e4))
    )
    problem = check_prior(d, cfg.num_attention_heads, cfg.num_hidden_layers, hd, theta, span)
    if problem:
        raise ValueError(f"induction prior: {problem}")
    half = hd // 2
    freqs = torch.tensor(rope_frequencies(hd, theta))
    slow = slow_pairs(hd, theta, span)
    code = code_size(hd, theta, span)
    basis = torch.linalg.qr(
        torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    )[0]
    basis = basis.float()
    write = [basis[:, :code], basis[:, code : 2 * code]]  # S1, S2: where the previous-token codes land
    read = basis[:, 2 * code : 3 * code]  # the token's own code is its projection on this subspace
    # what the induction heads copy: the embedding outside S1, S2 (at most 2 x head_dim of it, a random projection)
    rest = basis[:, 2 * code : min(d, 2 * code + 2 * hd)]

    prev, match = model.model.layers[0].self_attn, model.model.layers[1].self_attn
    fast = torch.arange(FAST_PAIRS)
    for h, offset in enumerate((1, 2)):
        rows = slice(h * hd, (h + 1) * hd)
        for proj in (prev.q_proj, prev.k_proj, prev.v_proj):
            proj.weight[rows] = 0.0
            proj.bias[rows] = 0.0
        # q.k = c^2 * sum_j cos((delta - offset) * f_j): peaks at delta = offset, whatever the tokens
        prev.q_proj.bias[h * hd + fast] = PREV_SHARPNESS * torch.cos(-offset * freqs[fast])
        prev.q_proj.bias[h * hd + half + fast] = PREV_SHARPNESS * torch.sin(-offset * freqs[fast])
        prev.k_proj.bias[h * hd + fast] = PREV_SHARPNESS
        prev.v_proj.weight[h * hd : h * hd + code] = read.T
        prev.o_proj.weight[:, rows] = 0.0
        prev.o_proj.weight[:, h * hd : h * hd + code] = PREV_WRITE * write[h]

    m = code // 2
    first = [*slow[:m], *(half + j for j in slow[:m])]  # current token  vs  token before the key position
    second = [*slow[m : 2 * m], *(half + j for j in slow[m : 2 * m])]  # previous token  vs  two before
    split = math.ceil(rest.shape[1] / 2)
    for h, cols in enumerate((rest[:, :split], rest[:, split:])):
        rows = slice(h * hd, (h + 1) * hd)
        for proj in (match.q_proj, match.k_proj, match.v_proj):
            proj.weight[rows] = 0.0
            proj.bias[rows] = 0.0
        match.q_proj.weight[[h * hd + i for i in first]] = MATCH_SCALE * read.T
        match.q_proj.weight[[h * hd + i for i in second]] = MATCH_SCALE * write[0].T
        match.k_proj.weight[[h * hd + i for i in first]] = MATCH_SCALE * write[0].T
        match.k_proj.weight[[h * hd + i for i in second]] = MATCH_SCALE * write[1].T
        match.v_proj.weight[h * hd : h * hd + cols.shape[1]] = cols.T
        match.o_proj.weight[:, rows] = 0.0
        match.o_proj.weight[:, h * hd : h * hd + cols.shape[1]] = COPY_GAIN * cols
