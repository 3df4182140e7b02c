"""mchar's own small Llama-architecture base LM: config, construction, save/load in HF format."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mchar.config import LocalLMConfig

READY_MARKER = "mchar_base_lm.json"


def build_local_lm(
    cfg: LocalLMConfig,
    vocab_size: int,
    bos_id: int | None,
    eos_id: int | None,
    pad_id: int | None,
    seed: int = 0,
) -> nn.Module:
    """A fresh (random) LlamaForCausalLM sized by ``cfg``; seeded so two builds are identical."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_positions,
        rope_theta=cfg.rope_theta,
        head_dim=cfg.resolved_head_dim,
        attention_bias=cfg.induction_prior,  # the prior's previous-token heads are positional (q/k biases)
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    if cfg.induction_prior:
        from mchar.base.induction_prior import install_induction_prior

        install_induction_prior(model, span=cfg.max_positions, seed=seed)
    return model


def is_built(path: str | Path) -> bool:
    """A base LM directory counts as built only once its completion marker is written (last)."""
    return (Path(path) / READY_MARKER).is_file()
