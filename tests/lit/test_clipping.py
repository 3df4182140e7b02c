"""Clipping by norm under FSDP (what Lightning's FSDP precision plugin refuses): checked with torch's FSDP on two
gloo processes, against the same clip on one process."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace


def _clip_under_fsdp(rank: int, out: str) -> None:
    """One of two gloo ranks: the same batch on both, a backward through the FSDP-wrapped net, ``ShardedNormClipping``
    at a norm well below the gradients'; rank zero saves the gathered clipped gradients and a one-process
    reference."""
    import copy

    import torch
    from torch import nn
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from mchar.lit.clipping import ShardedNormClipping

    class Clipped(ShardedNormClipping):
        def __init__(self, model: nn.Module) -> None:
            self.trainer = SimpleNamespace(model=model)

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    reference = copy.deepcopy(net)
    x = torch.randn(5, 8)
    wrapped = FSDP(net, use_orig_params=True, device_id=torch.device("cpu"))
    wrapped(x).pow(2).sum().backward()
    Clipped(wrapped).configure_gradient_clipping(torch.optim.SGD(wrapped.parameters()), 0.05, "norm")
    reference(x).pow(2).sum().backward()
    before = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05)
    with FSDP.summon_full_params(wrapped, with_grads=True):
        grads = {name: p.grad.clone() for name, p in wrapped.module.named_parameters()}
    if rank == 0:
        ref = {name: p.grad for name, p in reference.named_parameters()}
        torch.save({"fsdp": grads, "reference": ref, "norm_before": before}, f"{out}/grads.pt")


def test_clipping_by_norm_under_fsdp_equals_one_process(tmp_path: Path) -> None:
    import torch

    from tests.lit.helpers import spawn_gloo_pair

    spawn_gloo_pair(_clip_under_fsdp, str(tmp_path))
    saved = torch.load(tmp_path / "grads.pt")
    assert saved["norm_before"] > 0.05  # the clip did bite
    assert saved["fsdp"].keys() == saved["reference"].keys()
    for name, grad in saved["reference"].items():
        torch.testing.assert_close(saved["fsdp"][name], grad, msg=name)
    total = torch.linalg.vector_norm(torch.stack([g.norm() for g in saved["fsdp"].values()]))
    assert abs(float(total) - 0.05) < 1e-4


def test_without_fsdp_lightning_clips_as_configured() -> None:
    """Any other strategy: the hook is Lightning's own (clip by norm or value as the trainer asks)."""
    import lightning as L
    import torch

    from mchar.lit.clipping import ShardedNormClipping

    class Module(ShardedNormClipping, L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(4, 2)

    m = Module()
    calls = []
    m.clip_gradients = lambda opt, gradient_clip_val, gradient_clip_algorithm: calls.append(  # type: ignore[method-assign]
        (gradient_clip_val, gradient_clip_algorithm)
    )
    m._trainer = SimpleNamespace(model=m)  # type: ignore[assignment]
    m.configure_gradient_clipping(torch.optim.SGD(m.parameters()), 0.5, "value")
    m.configure_gradient_clipping(torch.optim.SGD(m.parameters()), 1.0, "norm")
    assert calls == [(0.5, "value"), (1.0, "norm")]
