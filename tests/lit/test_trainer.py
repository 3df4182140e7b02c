"""Trainer helpers: train metrics are built exactly on the steps Lightning ships to the loggers."""

from __future__ import annotations

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
