"""GistNet: compress one block of K embeddings into a single vector in the base model's input space.

Design choices (and why):

* **Bidirectional** attention inside the block (no causal mask). Upstream used causal attention, which made
  CLS pooling degenerate (CLS saw only itself). Here every pooling mode (mean / learned query / CLS) sees the
  whole block.
* **Learned in-block positions** (K slots): the block is tiny, so a learned table is cheaper and more flexible
  than RoPE.
* **Level conditioning**: one shared net plus a level embedding serves every LOD (``shared=True``), or one net
  per level as an ablation (``shared=False``).
* **Scale matching**: inputs are RMS-normalised (token embeddings and gists can have any scale) and outputs are
  RMS-normalised then multiplied by a learned ``out_scale`` initialised to the base embeddings' RMS, so a gist
  looks, to the frozen base, like something of the size of a token embedding.
* **Residual from the mean** (``residual_mean=True``): the output is the block mean plus the trunk's correction,
  whose last layer starts at zero, so an untrained GistNet *is* the mean summary. A base pre-trained with gist
  exposure (``mchar.lit.gist_exposure``) has learnt to read exactly that summary, so GistNet starts from what
  the base understands and only learns what to add.
* Weights export as ``model.safetensors`` + ``config.json`` and rebuild with :func:`from_pretrained`, with no
  Lightning in the loop.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def _rms_normalise(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)


class Block(nn.Module):
    """Pre-LN transformer block with bidirectional SDPA and an optional key padding mask."""

    def __init__(self, width: int, n_heads: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        if width % n_heads:
            raise ValueError(f"width {width} is not divisible by n_heads {n_heads}")
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width)
        )

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, S, w]; key_mask [B, S] bool, True = attend to this key (None = all)."""
        b, s, w = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, self.n_heads, w // self.n_heads).permute(2, 0, 3, 1, 4)
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=False)
        x = x + self.proj(y.transpose(1, 2).reshape(b, s, w))
        return x + self.mlp(self.ln2(x))


class _BlockEncoder(nn.Module):
    """One GistNet trunk: input projection, positions, transformer blocks, pooling and head."""

    def __init__(
        self,
        d_model: int,
        block_size: int,
        width: int,
        n_layers: int,
        n_heads: int,
        pooling: str,
        head: str,
        n_levels: int,
    ) -> None:
        super().__init__()
        self.pooling = pooling
        self.inp = nn.Identity() if width == d_model else nn.Linear(d_model, width)
        self.pos = nn.Parameter(torch.randn(block_size, width) * 0.02)
        self.level = nn.Embedding(n_levels, width)
        nn.init.normal_(self.level.weight, std=0.02)
        if pooling == "query":
            self.query = nn.Parameter(torch.randn(width) * 0.02)
        elif pooling == "cls":
            self.cls = nn.Parameter(torch.randn(width) * 0.02)
        self.blocks = nn.ModuleList(Block(width, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(width)
        if head == "linear":
            self.head: nn.Module = nn.Linear(width, d_model)
        else:
            self.head = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, d_model))

    def forward(self, x: torch.Tensor, level: int) -> torch.Tensor:
        n = x.shape[0]
        h = self.inp(_rms_normalise(x)) + self.pos + self.level.weight[level]
        if self.pooling == "cls":
            h = torch.cat([self.cls.expand(n, 1, -1), h], dim=1)
        for block in self.blocks:
            h = block(h)
        h = self.ln_f(h)
        if self.pooling == "mean":
            pooled = h.mean(dim=1)
        elif self.pooling == "query":
            weights = torch.softmax(h @ self.query / math.sqrt(h.shape[-1]), dim=1)
            pooled = (weights.unsqueeze(-1) * h).sum(dim=1)
        else:
            pooled = h[:, 0]
        return self.head(pooled)


class _Exportable:
    """``save_pretrained``/``from_pretrained`` on the class, so checkpoints rebuild without Lightning."""

    def config_dict(self) -> dict[str, Any]:  # pragma: no cover - overridden
        raise NotImplementedError

    def save_pretrained(self, directory: str | Path) -> Path:
        return save_module(self, self.config_dict(), directory)  # type: ignore[arg-type]

    def _check_blocks(self, x: torch.Tensor) -> None:
        """Inputs must be whole blocks [N, K, d]: GistNet never sees padding or partial blocks."""
        block_size, d_model = self.block_size, self.d_model  # type: ignore[attr-defined]
        if x.dim() != 3 or x.shape[1] != block_size or x.shape[2] != d_model:
            raise ValueError(
                f"{type(self).__name__} expects [N, {block_size}, {d_model}], got {list(x.shape)}"
            )

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> Any:
        return from_pretrained(directory, map_location)

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        key = prefix + "out_scale"
        if key in state_dict and state_dict[key].dim() == 0:  # exports and checkpoints from before it was 1-D
            state_dict[key] = state_dict[key].reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[misc]


class GistNet(_Exportable, nn.Module):
    """Transformer GistNet: ``forward(x [N, K, d], level) -> [N, d]``; a :data:`~mchar.core.protocols.GistFn`."""

    kind = "transformer"

    def __init__(
        self,
        d_model: int,
        block_size: int,
        n_layers: int = 2,
        n_heads: int = 4,
        width: int | None = None,
        pooling: str = "mean",
        head: str = "linear",
        max_level: int = 2,
        shared: bool = True,
        out_scale: float = 1.0,
        residual_mean: bool = False,
    ) -> None:
        super().__init__()
        if pooling not in {"mean", "query", "cls"}:
            raise ValueError(f"gistnet.pooling: unknown {pooling!r} (choose mean, query, cls)")
        if head not in {"linear", "mlp"}:
            raise ValueError(f"gistnet.head: unknown {head!r} (choose linear, mlp)")
        if max_level < 1:
            raise ValueError(f"gistnet.max_level must be >= 1, got {max_level}")
        self.d_model, self.block_size, self.n_layers, self.n_heads = d_model, block_size, n_layers, n_heads
        self.width = width or d_model
        self.pooling, self.head, self.max_level, self.shared = pooling, head, max_level, shared
        n_nets = 1 if shared else max_level
        self.nets = nn.ModuleList(
            _BlockEncoder(d_model, block_size, self.width, n_layers, n_heads, pooling, head, max_level + 1)
            for _ in range(n_nets)
        )
        # 1-D, not a scalar: FSDP refuses to wrap a module with scalar parameters
        self.out_scale = nn.Parameter(torch.full((1,), float(out_scale)))
        self.residual_mean = residual_mean
        if residual_mean:
            for net in self.nets:
                last = net.head if isinstance(net.head, nn.Linear) else net.head[-1]
                nn.init.zeros_(last.weight)
                nn.init.zeros_(last.bias)

    def config_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "d_model": self.d_model,
            "block_size": self.block_size,
            "residual_mean": self.residual_mean,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "width": self.width,
            "pooling": self.pooling,
            "head": self.head,
            "max_level": self.max_level,
            "shared": self.shared,
            "out_scale": float(self.out_scale.detach()),
        }

    def forward(self, x: torch.Tensor, level: int) -> torch.Tensor:
        self._check_blocks(x)
        if not 1 <= level <= self.max_level:
            raise ValueError(f"GistNet level {level} outside [1, {self.max_level}]")
        net = self.nets[0 if self.shared else level - 1]
        param = self.out_scale
        y = net(x.to(param.dtype), level)
        if self.residual_mean:
            y = y + _rms_normalise(x.to(param.dtype).mean(dim=1))
        return (_rms_normalise(y) * param).to(x.dtype)


class MeanPoolGistNet(_Exportable, nn.Module):
    """No-attention baseline: block mean, optional linear map (identity init), rescaled to the base RMS."""

    kind = "mean"

    def __init__(
        self,
        d_model: int,
        block_size: int,
        max_level: int = 2,
        linear: bool = True,
        rescale: bool = True,
        out_scale: float = 1.0,
        **_: Any,
    ) -> None:
        super().__init__()
        self.d_model, self.block_size, self.max_level = d_model, block_size, max_level
        self.linear, self.rescale = linear, rescale
        self.proj: nn.Module = nn.Linear(d_model, d_model) if linear else nn.Identity()
        if linear:
            with torch.no_grad():
                self.proj.weight.copy_(torch.eye(d_model))
                self.proj.bias.zero_()
        # 1-D, not a scalar: FSDP refuses to wrap a module with scalar parameters
        self.out_scale = nn.Parameter(torch.full((1,), float(out_scale)))

    def config_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "d_model": self.d_model,
            "block_size": self.block_size,
            "max_level": self.max_level,
            "linear": self.linear,
            "rescale": self.rescale,
            "out_scale": float(self.out_scale.detach()),
        }

    def forward(self, x: torch.Tensor, level: int) -> torch.Tensor:
        self._check_blocks(x)
        y = self.proj(x.to(self.out_scale.dtype).mean(dim=1))
        if self.rescale:
            y = _rms_normalise(y) * self.out_scale
        return y.to(x.dtype)


_KINDS: dict[str, type[nn.Module]] = {"transformer": GistNet, "mean": MeanPoolGistNet}


def make_gistnet(kind: str = "transformer", **kwargs: Any) -> GistNet | MeanPoolGistNet:
    """Build a GistNet by kind ('transformer' or 'mean'); unknown kwargs for 'mean' are ignored."""
    try:
        cls = _KINDS[kind]
    except KeyError:
        raise ValueError(f"gistnet.kind: unknown {kind!r} (choose {', '.join(_KINDS)})") from None
    return cls(**kwargs)  # type: ignore[return-value]


def from_config(config: dict[str, Any]) -> GistNet | MeanPoolGistNet:
    cfg = dict(config)
    return make_gistnet(cfg.pop("kind", "transformer"), **cfg)


# ---------------------------------------------------------------- export helpers (shared with LensNet)


def save_module(module: nn.Module, config: dict[str, Any], directory: str | Path) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (the whole state dict) into ``directory``."""
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(state, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
    return out


def _first_line(err: BaseException) -> str:
    # core imports nothing from the harness, so it keeps its own copy of mchar.errors.first_line
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def read_export_config(directory: str | Path) -> dict[str, Any]:
    """The ``config.json`` of an export, checked to be a JSON object; any problem is a one-line ``ValueError``."""
    path = Path(directory) / CONFIG_NAME
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: unreadable ({_first_line(err)})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def load_config_and_state(directory: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read what :func:`save_module` wrote (safetensors only, never pickle); a missing, truncated or corrupt file
    is a one-line ``ValueError`` naming it."""
    from safetensors.torch import load_file

    config = read_export_config(directory)
    weights = Path(directory) / WEIGHTS_NAME
    try:
        return config, load_file(str(weights))
    except Exception as err:  # safetensors raises its own SafetensorError (an Exception) for a broken file
        raise ValueError(f"{weights}: unreadable ({_first_line(err)})") from None


def load_module(directory: str | Path, build: Any) -> Any:
    """``build(config)`` with the export's weights loaded: a config the net does not accept or weights of another
    shape are one ``ValueError`` line too."""
    config, state = load_config_and_state(directory)
    try:
        net = build(config)
        net.load_state_dict(state)
    except (TypeError, KeyError, ValueError, RuntimeError) as err:
        raise ValueError(f"{directory}: does not load ({_first_line(err)})") from None
    return net


def save_pretrained(net: GistNet | MeanPoolGistNet, directory: str | Path) -> Path:
    return save_module(net, net.config_dict(), directory)


def from_pretrained(
    directory: str | Path, map_location: str | torch.device = "cpu"
) -> GistNet | MeanPoolGistNet:
    return load_module(directory, from_config).to(map_location)
