"""Stage ``lensnet``: train LensNet on counterfactual utilities with the exported GistNet fixed."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from mchar.config import ConfigError
from mchar.stages.gistnet import (
    export_dirs,
    fit,
    load_base,
    load_windows,
    publish,
    retrieval_windows,
    val_sets,
)

if TYPE_CHECKING:
    import torch

    from mchar.pipeline import RunContext


def _explicit_gistnet_dir(cfg: Any) -> Path | None:
    path = Path(cfg.lensnet.gistnet_dir) if cfg.lensnet.gistnet_dir else None
    if path is not None and not (path / "model.safetensors").is_file():
        raise ConfigError(f"lensnet.gistnet_dir: no exported GistNet at {path} (no model.safetensors)")
    if path is not None:
        from mchar.evals.components import check_export

        check_export(path, "GistNet", "lensnet.gistnet_dir")  # and readable
    return path


def preflight(cfg: Any) -> None:
    """Before any stage runs: an explicit ``lensnet.gistnet_dir`` must hold a GistNet."""
    _explicit_gistnet_dir(cfg)


def gistnet_dir(ctx: RunContext) -> Path:
    """``lensnet.gistnet_dir``, else the GistNet export of this run (``ctx.results``) or of an earlier run of the same
    experiment."""
    if explicit := _explicit_gistnet_dir(ctx.cfg):
        return explicit
    found = ctx.results.get("gistnet", {}).get("artifact_dir")
    path = Path(found) if found else export_dirs(ctx, "gistnet")[1]
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"lensnet: no GistNet export at {path}; run the gistnet stage first")
    return path


def build_lensnet(ctx: RunContext, base: Any) -> Any:
    from mchar.core.lensnet import LensNet

    lc = ctx.cfg.lensnet
    return LensNet(
        base.hidden_size,
        width=lc.width,
        n_layers=lc.layers,
        n_heads=lc.heads,
        max_level=ctx.cfg.tree.depth,
        tail_tokens=lc.tail_tokens,
        query_tokens=lc.query_tokens,
        recency_prior=lc.recency_prior,
        similarity_prior=lc.similarity_prior,
        lexical_tokens=lc.lexical_tokens,
        lexical_prior=lc.lexical_prior,
        lexical_lookback=lc.lexical_lookback,
        lexical_follow=lc.lexical_follow,
        lexical_idf_power=lc.lexical_idf_power,
        lexical_max_df=lc.lexical_max_df,
        raw_embedding=lc.raw_embedding,
    )


def lens_training_kwargs(cfg: Any, steps: int) -> dict[str, Any]:
    """LensNet-training settings shared by the ``lensnet`` and ``e2e`` modules (tree shape, budget, targets)."""
    lc = cfg.lensnet
    return dict(
        block_size=cfg.tree.block_size,
        depth=cfg.tree.depth,
        budget=cfg.allocator.budget,
        horizon=lc.horizon,
        candidates=lc.candidates,
        loss=lc.loss,
        utility=lc.utility,
        pair_norm=lc.pair_norm,
        pair_weight=lc.pair_weight,
        val_wc_draws=lc.val_wc_draws,
        teacher_temperature=lc.teacher_temperature,
        teacher_gate=lc.teacher_gate,
        lr=lc.lr,
        weight_decay=lc.weight_decay,
        prior_lr_scale=lc.prior_lr_scale,
        max_steps=steps,
        warmup_steps=lc.warmup_steps,
        random_edits=lc.random_edits,
        random_fill=lc.random_fill,
        on_policy=lc.on_policy,
        settle_states=lc.settle_states,
        settle_weight=cfg.allocator.query_similarity,
        settle_rounds=cfg.allocator.query_rounds,
        settle_follow=cfg.allocator.query_follow,
        settle_idf_power=cfg.allocator.query_idf_power,
        settle_max_df=cfg.allocator.query_max_df,
        lookahead=cfg.allocator.lookahead,
        position_mode=cfg.tree.position_mode,
        alloc_rounds=lc.alloc_rounds,
        alloc_start=lc.alloc_start,
        alloc_edits=cfg.allocator.n_diff,
        protect_tokens=cfg.allocator.protect_recent,
        seed=cfg.seed,
        val_seed=cfg.data.val_seed,
    )


def lensnet_windows(ctx: RunContext, base: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train, held-out code, held-out retrieval) windows for LensNet, with its own answer tail (the question then
    sits in its query tail, as when a task is asked) and its own training mix when ``lensnet`` sets them."""
    lc = ctx.cfg.lensnet
    data = {} if lc.mix_answer_tail is None else {"mix_answer_tail": lc.mix_answer_tail}
    mix = {} if lc.task_mix_fraction is None else {"task_mix_fraction": lc.task_mix_fraction}
    train, val = load_windows(ctx, base, lc.val_windows, **data, **mix)
    return (
        train,
        val,
        retrieval_windows(ctx, base.tokenizer, lc.val_retrieval_windows, seed=ctx.cfg.data.val_seed, **data),
    )  # a fixed held-out mix


def run(ctx: RunContext, run_id: str | None) -> dict[str, Any]:
    from mchar.core.gistnet import from_pretrained
    from mchar.lit.lensnet_module import LensNetModule
    from mchar.lit.trainer import rank_zero_export

    cfg, lc = ctx.cfg, ctx.cfg.lensnet
    base = load_base(ctx)
    gist_path = gistnet_dir(ctx)
    gistnet = from_pretrained(gist_path)
    train, val, rv = lensnet_windows(ctx, base)
    steps = cfg.trainer.max_steps or lc.max_steps
    module = LensNetModule(
        base,
        gistnet,
        build_lensnet(ctx, base),
        **lens_training_kwargs(cfg, steps),
        val_sets=val_sets(rv),
    )
    trainer, metrics = fit(
        ctx, run_id, "lensnet", module, train, val, steps, rv, val_every=lc.val_every, ema_decay=lc.ema_decay
    )
    result: dict[str, Any] = {"metrics": metrics, "steps": steps}
    with rank_zero_export(trainer, "lensnet-export") as writer:
        if writer:
            result = publish(ctx, run_id, "lensnet", module, metrics, steps)
            result["gistnet_dir"] = str(gist_path)
            ctx.tracker.set_tags(run_id, {"mchar.gistnet_dir": str(gist_path)})
    return result
