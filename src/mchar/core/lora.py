"""LoRA adapters on a frozen base: ``y = W x + (alpha/r) B A x``, and their save/load without Lightning.

A minimal in-house wrapper (peft is not a dependency). ``B`` is zero-initialised so an untrained adapter is exactly
the frozen base. The e2e stage trains one alongside GistNet; evaluation must load it with that GistNet (gists trained
for an adapted base are read by the adapted base), so the adapter is saved as ``lora.safetensors`` plus
``lora.json`` (rank, alpha, targets) and re-applied by :func:`load_lora`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
WEIGHTS, CONFIG = "lora.safetensors", "lora.json"


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int = 4, alpha: float = 8.0) -> None:
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        device = (
            base.weight.device
        )  # beside the frozen weight (a base already on the GPU keeps its adapter there)
        a = torch.randn(rank, base.in_features, device=device) / math.sqrt(base.in_features)
        self.lora_a = nn.Parameter(a)
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=device))
        self.scale = alpha / rank
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.enabled:
            return y
        return y + (x @ self.lora_a.t().to(x.dtype)) @ self.lora_b.t().to(x.dtype) * self.scale


def add_lora(
    model: nn.Module, targets: Sequence[str] = LORA_TARGETS, rank: int = 4, alpha: float = 8.0
) -> list[LoRALinear]:
    """Wrap every ``nn.Linear`` whose attribute name is in ``targets``; returns the wrappers."""
    added = []
    for _, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                wrapped = LoRALinear(child, rank, alpha).to(child.weight.device)
                setattr(parent, name, wrapped)
                added.append(wrapped)
    if not added:
        raise ValueError(f"lora: no nn.Linear named {list(targets)} in the base model")
    return added


@contextmanager
def lora_disabled(layers: Sequence[LoRALinear]) -> Iterator[None]:
    prev = [layer.enabled for layer in layers]
    for layer in layers:
        layer.enabled = False
    try:
        yield
    finally:
        for layer, p in zip(layers, prev, strict=True):
            layer.enabled = p


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if "lora_" in n}


def save_lora(
    model: nn.Module, directory: str | Path, rank: int, alpha: float, targets: Sequence[str] = LORA_TARGETS
) -> Path:
    """``lora.safetensors`` (the adapter tensors, named as in ``model``) and ``lora.json`` in ``directory``."""
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_file(lora_state(model), str(out / WEIGHTS))
    (out / CONFIG).write_text(json.dumps({"rank": rank, "alpha": alpha, "targets": list(targets)}, indent=2))
    return out


def has_lora(directory: str | Path) -> bool:
    return (Path(directory) / WEIGHTS).is_file()


def load_lora(model: nn.Module, directory: str | Path) -> list[LoRALinear]:
    """Wrap ``model``'s target projections and load the saved adapter; one-line ``ValueError`` if it does not fit."""
    from safetensors.torch import load_file

    d = Path(directory)
    if not has_lora(d):
        raise ValueError(f"lora: no {WEIGHTS} in {d}")
    if not (d / CONFIG).is_file():
        raise ValueError(f"lora: {d / WEIGHTS} has no {CONFIG} next to it (rank, alpha, targets unknown)")
    cfg = json.loads((d / CONFIG).read_text())
    layers = add_lora(model, cfg["targets"], int(cfg["rank"]), float(cfg["alpha"]))
    state = load_file(str(d / WEIGHTS))
    params = dict(model.named_parameters())
    expected = {n for n in params if "lora_" in n}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state))[:2], sorted(set(state) - expected)[:2]
        raise ValueError(
            f"lora: {d / WEIGHTS} does not fit this base (missing {missing}, unexpected {extra})"
        )
    with torch.no_grad():
        for name, tensor in state.items():
            if params[name].shape != tensor.shape:
                raise ValueError(
                    f"lora: {name} is {tuple(tensor.shape)} in {d}, {tuple(params[name].shape)} here"
                )
            params[name].copy_(tensor.to(params[name].dtype))
    for layer in layers:
        layer.requires_grad_(False)
    return layers
