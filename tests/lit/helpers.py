"""Tiny models shared by the lit tests (llama, vocab 256, d 32, K=4, depth 2)."""

from __future__ import annotations

import torch

from mchar.base.adapter import FrozenBaseLM, tiny_causal_lm
from mchar.core.gistnet import GistNet
from mchar.core.lensnet import LensNet

K, DEPTH, H, T = 4, 2, 8, 72


def tiny_base() -> FrozenBaseLM:
    return FrozenBaseLM(tiny_causal_lm("llama", vocab_size=256, hidden_size=32))


def tiny_gistnet(shared: bool = True) -> GistNet:
    torch.manual_seed(1)
    return GistNet(32, K, n_layers=1, n_heads=4, width=32, max_level=DEPTH, shared=shared)


def tiny_lensnet() -> LensNet:
    torch.manual_seed(2)
    return LensNet(32, width=32, n_layers=1, n_heads=4, max_level=DEPTH, tail_tokens=8)


def featured_lensnet(seed: int = 2, **kw: object) -> LensNet:
    """A tiny LensNet with the default inputs: recency prior, and the lexical score (``lexical_tokens=K``, prior 1)
    unless ``kw`` says otherwise."""
    torch.manual_seed(seed)
    args = dict(width=32, n_layers=1, n_heads=4, max_level=DEPTH, tail_tokens=8, recency_prior=0.5)
    return LensNet(32, **(args | {"lexical_tokens": K, "lexical_prior": 1.0} | kw))


def windows(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, T), generator=torch.Generator().manual_seed(seed))


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def changed(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> tuple[set[str], set[str]]:
    """(trainable params that did NOT change, frozen params that DID change)."""
    stuck, moved = set(), set()
    for n, p in module.named_parameters():
        diff = not torch.equal(p.detach(), before[n])
        if p.requires_grad and not diff:
            stuck.add(n)
        if not p.requires_grad and diff:
            moved.add(n)
    return stuck, moved


def one_step(module, batch: torch.Tensor, step: int = 0) -> torch.Tensor:
    """What Lightning's automatic optimisation does for one batch (zero_grad(None), backward, step)."""
    opt = module.configure_optimizers()["optimizer"]
    opt.zero_grad(set_to_none=True)
    loss, _ = module.step_loss(batch, step)
    loss.backward()
    opt.step()
    return loss


def _in_gloo_group(rank: int, target, out: str, port: int) -> None:  # noqa: ANN001
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        target(rank, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn_gloo_pair(target, out: str) -> None:  # noqa: ANN001 - a module-level (rank, out) function
    """Run ``target(rank, out)`` on two processes inside one gloo group (on a free local port)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_in_gloo_group, args=(target, out, port), nprocs=2)
