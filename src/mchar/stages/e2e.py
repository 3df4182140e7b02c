"""Stage ``e2e``: fine-tune GistNet + LensNet (+ optional LoRA) together on allocator-built WCs.

Starts from the ``gistnet`` export and, when present, the ``lensnet`` export (else a fresh LensNet): this run's, or
with ``e2e.init_from=NAME`` those of experiment ``NAME`` (an ablation under its own name, nothing overwritten).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from mchar.config import ConfigError
from mchar.stages.gistnet import export_dirs, fit, load_base, load_windows, publish
from mchar.stages.lensnet import build_lensnet, gistnet_dir, lens_training_kwargs

if TYPE_CHECKING:
    from mchar.pipeline import RunContext


def _init_gistnet(cfg: Any, artifacts_dir: Path) -> Path | None:
    """The GistNet export ``e2e.init_from`` names (None without one); a missing one stops in one line."""
    init = cfg.e2e.init_from
    if not init:
        return None
    gist = artifacts_dir / "gistnet" / init
    if not (gist / "model.safetensors").is_file():
        raise ConfigError(
            f"e2e.init_from: no GistNet export at {gist} (run experiment {init!r}'s gistnet stage)"
        )
    from mchar.evals.components import check_export

    return check_export(gist, "GistNet", "e2e.init_from")  # and readable


def preflight(cfg: Any) -> None:
    """Before any stage runs: ``e2e.init_from`` must name an experiment with a GistNet export."""
    _init_gistnet(cfg, Path(cfg.artifacts_dir).resolve())


def start_dirs(ctx: RunContext) -> tuple[Path, Path]:
    """(GistNet export, LensNet export) e2e starts from: ``e2e.init_from``'s, else this experiment's."""
    gist = _init_gistnet(ctx.cfg, ctx.artifacts_dir)
    if gist is None:
        return gistnet_dir(ctx), export_dirs(ctx, "lensnet")[1]
    return gist, ctx.artifacts_dir / "lensnet" / ctx.cfg.e2e.init_from


def run(ctx: RunContext, run_id: str | None) -> dict[str, Any]:
    from mchar.core.gistnet import from_pretrained
    from mchar.core.lensnet import LensNet
    from mchar.lit.e2e_module import E2EModule
    from mchar.lit.trainer import rank_zero_export

    cfg, e, lc = ctx.cfg, ctx.cfg.e2e, ctx.cfg.lensnet
    gist_dir, lens_dir = start_dirs(ctx)
    base = load_base(ctx)
    gistnet = from_pretrained(gist_dir)
    lens_found = (lens_dir / "model.safetensors").exists()
    lensnet = LensNet.from_pretrained(lens_dir) if lens_found else build_lensnet(ctx, base)
    train, val = load_windows(ctx, base, lc.val_windows)
    steps = cfg.trainer.max_steps or e.max_steps
    module = E2EModule(
        base,
        gistnet,
        lensnet,
        schedule=e.schedule,
        train_gistnet=e.train_gistnet,
        train_lensnet=e.train_lensnet,
        lora=e.lora,
        lora_rank=e.lora_rank,
        lora_alpha=e.lora_alpha,
        gist_loss=cfg.gistnet.loss,
        **{**lens_training_kwargs(cfg, steps), "lr": e.lr},
    )
    trainer, metrics = fit(ctx, run_id, "e2e", module, train, val, steps)
    result: dict[str, Any] = {"metrics": metrics, "steps": steps}
    with rank_zero_export(trainer, "e2e-export") as writer:
        if writer:
            result = publish(ctx, run_id, "e2e", module, metrics, steps)
            started = {"gistnet": str(gist_dir), "lensnet": str(lens_dir) if lens_found else "fresh"}
            result["started_from"] = started
            ctx.tracker.set_tags(run_id, {f"mchar.e2e_start_{k}": v for k, v in started.items()})
    return result
