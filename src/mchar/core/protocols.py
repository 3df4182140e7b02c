"""What the core needs from the outside world, stated as protocols so core stays framework-free."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch

GistFn = Callable[[torch.Tensor, int], torch.Tensor]
"""(children [N, K, d], target level >= 1) -> gists [N, d]."""

EmbedFn = Callable[[torch.Tensor], torch.Tensor]
"""token ids [..., T] -> input embeddings [..., T, d], at the base model's own scale."""


@runtime_checkable
class BaseLM(Protocol):
    """A frozen causal LM fed with input embeddings and explicit position ids."""

    hidden_size: int
    vocab_size: int
    max_positions: int | None
    embed_scale: float

    def embed(self, ids: torch.Tensor) -> torch.Tensor: ...

    def forward_embeds(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        past_key_values: Any = None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
    ) -> tuple[torch.Tensor, Any]:
        """Return (logits [B, T, V], cache or None); ``logits_to_keep`` > 0 = only the last that many positions."""
        ...
