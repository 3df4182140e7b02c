"""Trainer helpers: train metrics are built exactly on the steps Lightning ships to the loggers."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import lightning as L

from mchar.lit.trainer import is_logging_step


def test_logging_steps_follow_log_every_n_steps() -> None:
    module = L.LightningModule()
    assert is_logging_step(module)  # no Trainer: plain loops always get their logs
    fake = SimpleNamespace(global_step=0, log_every_n_steps=5)
    module._trainer = fake  # type: ignore[assignment]
    steps = []
    for s in range(16):
        fake.global_step = s
        if is_logging_step(module):
            steps.append(s)
    assert steps == [0, 4, 9, 14]


def test_ddp_strategies_get_their_find_unused_parameters_variant_only_when_asked() -> None:
    from mchar.lit.trainer import ddp_variant

    assert ddp_variant("ddp", True) == "ddp_find_unused_parameters_true"
    assert ddp_variant("ddp_spawn", True) == "ddp_spawn_find_unused_parameters_true"
    assert ddp_variant("ddp", False) == "ddp"
    for other in ("auto", "fsdp", "ddp_find_unused_parameters_true"):
        assert ddp_variant(other, True) == other


def _export_under_fsdp(rank: int, out: str) -> None:
    """One of two gloo ranks: a GistNet wrapped in torch FSDP (as Lightning's FSDPStrategy wraps the module), one
    step, then rank zero exports it once plainly and once inside ``full_weights``."""
    import torch
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from mchar.core.gistnet import GistNet
    from mchar.lit.trainer import full_weights

    torch.manual_seed(0)
    net = GistNet(16, 4, max_level=2, n_layers=1, n_heads=2, width=16)
    if rank == 0:
        torch.save(net.state_dict(), f"{out}/reference.pt")
    wrapped = FSDP(net, use_orig_params=True, device_id=torch.device("cpu"))
    trainer = SimpleNamespace(strategy=SimpleNamespace(model=wrapped))
    if rank == 0:
        net.save_pretrained(f"{out}/plain")  # outside forward: this rank's flat shard only
    with full_weights(trainer):
        if rank == 0:
            net.save_pretrained(f"{out}/gathered")


def test_full_weights_makes_rank_zero_export_whole_fsdp_weights(tmp_path: Path) -> None:
    import pytest
    import torch

    from mchar.core.gistnet import from_pretrained
    from tests.lit.helpers import spawn_gloo_pair

    spawn_gloo_pair(_export_under_fsdp, str(tmp_path))
    reference = torch.load(tmp_path / "reference.pt")
    gathered = from_pretrained(tmp_path / "gathered").state_dict()
    assert gathered.keys() == reference.keys()
    for key, value in reference.items():
        torch.testing.assert_close(gathered[key], value, msg=key)
    with pytest.raises(Exception):  # noqa: B017 - what a plain rank-zero export under FSDP gives: not loadable
        from_pretrained(tmp_path / "plain")
