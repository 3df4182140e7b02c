"""Adapter that turns any HF ``AutoModelForCausalLM`` into the frozen :class:`~mchar.core.protocols.BaseLM`.

The base model is never modified: MegaContext feeds it ``inputs_embeds`` (tokens and gists mixed) plus explicit
``position_ids``, which every HF causal LM accepts.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mchar.errors import MCharError, first_line

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


class BaseModelError(MCharError, ValueError):
    """A base model could not be loaded or cannot serve the request (one clear line)."""


@contextmanager
def no_weight_loading_bar() -> Iterator[None]:
    """transformers 5 draws a "Loading weights" bar on every load: a sweep's log held one per trial and stage. Off
    for the load only (downloads and the caller's own bars keep the setting they had)."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def resolve_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return None
    try:
        return _DTYPES[name]
    except KeyError:
        raise BaseModelError(f"model.dtype: unknown dtype {name!r} (choose from {sorted(_DTYPES)})") from None


class FrozenBaseLM(nn.Module):
    """A frozen, eval-mode causal LM that embeds ids and runs on ``inputs_embeds`` + ``position_ids``."""

    def __init__(self, model: nn.Module, tokenizer: Any = None, name_or_path: str = "") -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.name_or_path = name_or_path or getattr(model.config, "_name_or_path", "") or type(model).__name__
        self.model.requires_grad_(False)
        self.model.eval()
        cfg = model.config
        self.hidden_size: int = int(cfg.hidden_size if hasattr(cfg, "hidden_size") else cfg.n_embd)
        self.vocab_size: int = int(model.get_input_embeddings().num_embeddings)
        self.max_positions: int | None = getattr(cfg, "max_position_embeddings", None) or getattr(
            cfg, "n_positions", None
        )
        # Gemma-style models multiply inputs_embeds by sqrt(d) inside forward; everyone else by 1.
        self.embed_scale: float = float(self.hidden_size**0.5) if "gemma" in str(cfg.model_type) else 1.0
        with torch.no_grad():
            weight = model.get_input_embeddings().weight
            self.embedding_rms: float = float(weight.float().pow(2).mean().sqrt())
        self.learned_positions = str(cfg.model_type) in {"gpt2", "gpt_neo", "gptj", "opt", "bloom"}
        # transformers 5 renamed ``past_key_values`` to ``cache``; accept either generation of the API.
        import inspect

        self._cache_kw = (
            "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        )

    def train(self, mode: bool = True) -> FrozenBaseLM:  # the base stays in eval mode, always
        super().train(False)
        return self

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        dtype: str | None = "float32",
        trust_remote_code: bool = False,
        device: str | torch.device = "cpu",
    ) -> FrozenBaseLM:
        """Load by hub id or local directory with safe defaults (safetensors, no remote code)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = str(name_or_path)
        local = Path(path).expanduser()
        if (local.is_absolute() or path.startswith((".", "~"))) and not local.is_dir():
            # a path-shaped name would otherwise reach the hub client, whose complaint is about repo-id syntax
            raise BaseModelError(
                f"model.name_or_path: no directory {path!r} (a local model is a from_pretrained directory)"
            )
        try:
            with no_weight_loading_bar():
                model = AutoModelForCausalLM.from_pretrained(
                    path,
                    dtype=resolve_dtype(dtype),
                    trust_remote_code=trust_remote_code,
                    use_safetensors=True,
                )
        except (OSError, ValueError) as err:
            raise BaseModelError(f"model.name_or_path: cannot load {path!r}: {first_line(err)}") from None
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError):
            tokenizer = None
        return cls(model.to(device), tokenizer, name_or_path=path)

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(ids.to(self.device))

    def check_positions(self, position_ids: torch.Tensor) -> None:
        """Refuse positions the base cannot represent (learned absolute tables would IndexError)."""
        if self.learned_positions and self.max_positions is not None and position_ids.numel():
            top = int(position_ids.max())
            if top >= self.max_positions:
                raise BaseModelError(
                    f"position id {top} exceeds the base model's {self.max_positions} learned positions"
                )

    def forward_embeds(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        past_key_values: Any = None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
    ) -> tuple[torch.Tensor, Any]:
        """(logits, cache): ``logits_to_keep`` > 0 computes the LM head for the last that many positions only
        (scoring a horizon needs a few rows of a vocabulary-wide matrix, which otherwise dominates a small base)."""
        self.check_positions(position_ids)
        # An explicit all-ones mask: without one, transformers may infer packed-sequence boundaries from
        # non-contiguous position ids (gists jump), silently cutting attention at every gist.
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        mask = torch.ones(
            inputs_embeds.shape[0],
            past + inputs_embeds.shape[1],
            dtype=torch.long,
            device=inputs_embeds.device,
        )
        out = self.model(
            inputs_embeds=inputs_embeds,
            position_ids=position_ids,
            attention_mask=mask,
            use_cache=use_cache,
            **({"logits_to_keep": logits_to_keep} if logits_to_keep else {}),
            **{self._cache_kw: past_key_values},
        )
        if not use_cache:
            return out.logits, None
        cache = getattr(out, "cache", None)
        return out.logits, cache if cache is not None else out.past_key_values

    @torch.no_grad()
    def attention_received(
        self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, queries: int, layer: int | None = None
    ) -> torch.Tensor:
        """Attention mass each position receives from the last ``queries`` positions [B, T], averaged over heads,
        those queries and the layers (or only ``layer``, negative counts from the top): what the ``attention``
        focus policy ranks entries by.

        Attention weights exist only under eager attention, so the model switches to it for this one forward and
        back afterwards; a base that cannot return them raises ``BaseModelError``."""
        self.check_positions(position_ids)
        n_layers = int(getattr(self.model.config, "num_hidden_layers", 0) or 0)
        if layer is not None and n_layers and not -n_layers <= layer < n_layers:
            raise BaseModelError(f"attention layer {layer} is out of range for a {n_layers}-layer base")
        before = getattr(self.model.config, "_attn_implementation", None)
        # transformers < 4.48 has no switch, and its SDPA layers fall back to eager when asked for the weights
        switch = before not in (None, "eager") and hasattr(self.model, "set_attn_implementation")
        if switch:
            self.model.set_attn_implementation("eager")
        try:
            mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
            out = self.model(
                inputs_embeds=inputs_embeds,
                position_ids=position_ids,
                attention_mask=mask,
                output_attentions=True,
                logits_to_keep=1,
            )
        finally:
            if switch:
                self.model.set_attn_implementation(before)
        if not out.attentions or any(a is None for a in out.attentions):
            raise BaseModelError(f"{self.name_or_path}: the base returns no attention weights")
        q = max(1, min(int(queries), inputs_embeds.shape[1]))
        # [layers, B, heads, q, T] -> [B, T]
        layers = out.attentions if layer is None else (out.attentions[layer],)
        return torch.stack([a[:, :, -q:, :].float() for a in layers]).mean(dim=(0, 2, 3))

    def forward_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Plain causal LM logits on token ids with default positions (the reference the core must match)."""
        return self.model(input_ids=ids.to(self.device)).logits


def tiny_causal_lm(
    family: str = "llama",
    vocab_size: int = 256,
    hidden_size: int = 32,
    layers: int = 2,
    heads: int = 4,
    max_positions: int = 4096,
    seed: int = 0,
) -> nn.Module:
    """A tiny random HF causal LM of the given family, for tests and benchmarks (no download)."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

    torch.manual_seed(seed)
    if family == "llama":
        cfg = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=hidden_size * 2,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=max_positions,
            tie_word_embeddings=False,
        )
    elif family == "qwen2":
        cfg = Qwen2Config(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=hidden_size * 2,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2),
            max_position_embeddings=max_positions,
        )
    elif family == "gpt2":
        cfg = GPT2Config(
            vocab_size=vocab_size, n_embd=hidden_size, n_layer=layers, n_head=heads, n_positions=max_positions
        )
    else:
        raise BaseModelError(f"unknown tiny model family {family!r} (choose llama, qwen2, gpt2)")
    model = AutoModelForCausalLM.from_config(cfg)
    return model.float().eval()
