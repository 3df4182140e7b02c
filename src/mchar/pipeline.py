"""Runs an experiment's stages in order under one MLflow parent run, a nested run per stage."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mchar.config import ConfigError, RootConfig
from mchar.tracking.mlflow_tracking import Tracker, is_global_zero

STAGE_MODULES = {
    "base_lm": "mchar.stages.base_lm:run",
    "gistnet": "mchar.stages.gistnet:run",
    "lensnet": "mchar.stages.lensnet:run",
    "e2e": "mchar.stages.e2e:run",
    "eval": "mchar.stages.evaluate:run",
    "report": "mchar.stages.report:run",
}


# Stages without a Lightning fit: under DDP every rank re-runs the pipeline (the training stages need all of them),
# but these would only repeat rank 0's work and write its files again, so only rank 0 runs them.
RANK_ZERO_STAGES = ("eval", "report")


@dataclass
class RunContext:
    """What every stage needs: the config, the tracker, where to write, and results of earlier stages."""

    cfg: RootConfig
    tracker: Tracker
    run_dir: Path
    artifacts_dir: Path
    results: dict[str, Any] = field(default_factory=dict)
    callbacks: list[Any] = field(default_factory=list)  # extra Lightning callbacks (e.g. Optuna pruning)
    # sub-folder of <run_dir>/<name> holding the stage folders: "" for a fit, "sweeps/<study>/trial-<n>" for a sweep
    # trial, so trials under one name (concurrent workers included) never write each other's checkpoints or results
    scope: str = ""

    def stage_dir(self, stage: str) -> Path:
        path = self.run_dir / self.cfg.name / self.scope / stage
        path.mkdir(parents=True, exist_ok=True)
        return path


def _stage_module(stage: str) -> Any:
    return importlib.import_module(STAGE_MODULES[stage].partition(":")[0])


def _stage_fn(stage: str) -> Callable[[RunContext, str | None], Any]:
    return getattr(_stage_module(stage), STAGE_MODULES[stage].partition(":")[2])


def check_trainer_names(accelerator: str, strategy: str) -> None:
    """An accelerator or strategy name Lightning does not know: one line naming what it does know, before any work
    (Lightning raised it in the first fit, after the corpus and tokenizer were built)."""
    from lightning.pytorch.accelerators import AcceleratorRegistry
    from lightning.pytorch.strategies import StrategyRegistry

    accelerators = ["auto", "gpu", *sorted(AcceleratorRegistry.available_accelerators())]
    if str(accelerator).lower() not in accelerators:
        raise ConfigError(f"trainer.accelerator: {accelerator!r} is not one of {', '.join(accelerators)}")
    strategies = ["auto", *sorted(StrategyRegistry.available_strategies())]
    if str(strategy).lower() not in strategies:
        raise ConfigError(f"trainer.strategy: {strategy!r} is not one of {', '.join(strategies)}")


def check_accelerator(cfg: RootConfig) -> None:
    """``trainer=gpu`` (or ddp/fsdp) or a CUDA ``eval.device`` on a machine without CUDA, or more GPUs than it has:
    one line, not Lightning's traceback after the data is built."""
    import torch

    from mchar.config import eval_device

    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    t = cfg.trainer
    check_trainer_names(t.accelerator, t.strategy)
    if str(t.accelerator).lower() in ("gpu", "cuda"):
        if have == 0:
            raise ConfigError(
                f"trainer.accelerator={t.accelerator}: no CUDA device on this machine (torch {torch.__version__}); "
                "use trainer=cpu or trainer=ddp_cpu"
            )
        want = t.devices if isinstance(t.devices, int) and not isinstance(t.devices, bool) else None
        if want is not None and want > have:
            raise ConfigError(f"trainer.devices={want}: this machine has {have} CUDA device(s)")
    device = eval_device(cfg)
    if "eval" in cfg.stages and device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        if index >= have:
            raise ConfigError(
                f"eval.device={cfg.eval.device}: {device} is not on this machine ({have} CUDA devices)"
            )


def preflight(cfg: RootConfig) -> None:
    """Every stage's cheap input checks (paths it is told to load, tasks, budgets), before any stage starts: a bad
    ``eval.lensnet_dir`` stops in one line, not after the base LM has trained for minutes, and opens no run."""
    check_accelerator(cfg)
    for stage in cfg.stages:
        check = getattr(_stage_module(stage), "preflight", None)
        if check is not None:
            check(cfg)


def run_pipeline(
    cfg: RootConfig,
    command: str = "fit",
    callbacks: list[Any] | None = None,
    tracker: Tracker | None = None,
    scope: str = "",
) -> RunContext:
    """Seed, open the parent run, run each stage in its nested run; returns the context with results."""
    import lightning as L

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    preflight(cfg)
    tracker = tracker or Tracker(cfg, command)
    ctx = RunContext(
        cfg=cfg,
        tracker=tracker,
        run_dir=Path(cfg.run_dir).resolve(),
        artifacts_dir=Path(cfg.artifacts_dir).resolve(),
        callbacks=list(callbacks or []),
        scope=scope,
    )
    fns = [(s, _stage_fn(s)) for s in cfg.stages]
    # mlflow.set_tracking_uri (called inside Lightning's MLFlowLogger) writes $MLFLOW_TRACKING_URI; restore it
    # so the next run in this process (a sweep trial, a test) resolves its own store.
    user_uri = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        with tracker.parent() as parent_id:
            for stage, fn in fns:
                # Every stage starts from the seed, not from whatever RNG state the stages before it left: a net
                # built before its fit (GistNet, LensNet init) is then the same whether the base was trained in this
                # process, reused from disk, or run by another command (a sweep trial, `stages=[gistnet,...]`).
                L.seed_everything(cfg.seed, workers=True, verbose=False)
                if stage in RANK_ZERO_STAGES and not is_global_zero():
                    ctx.results[stage] = {"skipped": "not global rank 0"}
                    continue
                with tracker.stage(stage) as run_id:
                    ctx.results[stage] = fn(ctx, run_id)
            ctx.results["parent_run_id"] = parent_id
    finally:
        if user_uri is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = user_uri
    return ctx
