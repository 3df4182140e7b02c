"""Stage ``gistnet``: train GistNet for substitutability on the frozen base, export it (safetensors + JSON).

Also home of the helpers the ``lensnet`` and ``e2e`` stages share: base loading, held-out-safe windows (train split
for training, val split for the final metrics), the fit with resumption, and rank-zero-only side effects.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import lightning as L
    import torch

    from mchar.pipeline import RunContext

log = logging.getLogger(__name__)


def load_base(ctx: RunContext) -> Any:
    """The frozen base (trained first by ``base_lm`` when it is a missing local model)."""
    from mchar.base.adapter import FrozenBaseLM
    from mchar.stages.base_lm import ensure_base_lm

    path = ensure_base_lm(ctx)
    return FrozenBaseLM.from_pretrained(path, dtype=ctx.cfg.model.dtype)


def load_windows(
    ctx: RunContext, base: Any, n_val: int, **overrides: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """(train windows, val windows) as ``[N, window]`` id tensors; partial (padded) windows are left out.
    ``overrides`` replace data-module arguments (e.g. a side net's own ``mix_answer_tail``)."""
    import torch

    from mchar.stages.base_lm import window_module

    d = ctx.cfg.data
    dm = window_module(ctx, base.tokenizer, num_workers=0, **overrides)
    dm.setup("fit")

    def full(split: str) -> torch.Tensor:
        ds = dm.datasets[split]
        if len(ds) == 0:
            return torch.zeros(0, d.window, dtype=torch.long)
        rows = [torch.as_tensor(r["input_ids"]) for r in ds if int(r["n_valid"]) == d.window]
        rows = [r for r in rows if r.numel() == d.window]
        return torch.stack(rows).long() if rows else torch.zeros(0, d.window, dtype=torch.long)

    train, val = full("train"), full("val")
    if train.shape[0] == 0:
        raise ValueError(f"data: no complete {d.window}-token training windows (lower data.window)")
    if val.shape[0] == 0:  # tiny corpora: fall back to the test split, never to train
        val = full("test")
    if val.shape[0] < n_val:
        log.warning(
            "held-out code windows: %d requested, the held-out files hold %d complete %d-token windows",
            n_val,
            val.shape[0],
            d.window,
        )
    return train, val[:n_val]


def retrieval_windows(
    ctx: RunContext,
    tokenizer: Any,
    n: int,
    split: str | None = None,
    length: int | None = None,
    seed: int | None = None,
    **overrides: Any,
) -> torch.Tensor:
    """``n`` held-out synthetic retrieval windows of ``length`` tokens (default ``data.window``): haystack and needles
    from the ``split`` files (default: val, else test; never trained on).

    Built like the training mix (``data.mix_episodes``, ``data.mix_answer_tail``: the last answer that many tokens
    before the end), so metrics can be read where distant context decides the loss, not only on plain code. Drawn
    from ``seed`` (default the run's): the side nets' validation passes ``data.val_seed``.
    """
    import torch

    from mchar.stages.base_lm import corpus_splits, window_module

    d = ctx.cfg.data
    length = length or d.window
    splits = corpus_splits(ctx)
    split = split or ("val" if splits["val"] else "test")
    files = splits[split]
    if n <= 0 or not files:
        return torch.zeros(0, length, dtype=torch.long)
    kwargs: dict[str, Any] = dict(
        stride=None,
        num_workers=0,
        seed=(ctx.cfg.seed if seed is None else seed) + 7919,
        task_mix_fraction=0.5,
    )
    kwargs |= dict(window=length, mix_answer_tail=d.mix_answer_tail) | overrides
    dm = window_module(ctx, tokenizer, {"train": files}, **kwargs)
    dm.setup("fit")
    ds = dm.datasets["train"]
    first = dm.stats["train"]["windows"]  # synthetic windows follow the natural ones
    rows = [torch.as_tensor(ds[i]["input_ids"]) for i in range(first, min(len(ds), first + n))]
    if len(rows) < n:  # one synthetic window per natural one at most (task_mix_fraction 0.5)
        log.warning(
            "held-out retrieval windows: %d requested, the %s files give %d of %d tokens",
            n,
            split,
            len(rows),
            length,
        )
    return torch.stack(rows).long() if rows else torch.zeros(0, length, dtype=torch.long)


def ckpt_path(ctx: RunContext, stage_dir: Path) -> str | None:
    """``last.ckpt`` when ``trainer.resume`` is set and one exists (killed runs continue where they stopped)."""
    last = stage_dir / "checkpoints" / "last.ckpt"
    return str(last) if ctx.cfg.trainer.resume and last.exists() else None


def final_metrics(trainer: L.Trainer, prefix: str, renamed: str) -> dict[str, float]:
    """``<prefix>/<name>`` callback metrics as ``<renamed>/<name>`` floats."""
    return {
        f"{renamed}/{k.split('/', 1)[-1]}": float(v)
        for k, v in trainer.callback_metrics.items()
        if k.startswith(f"{prefix}/")
    }


def val_sets(retrieval_val: torch.Tensor | None) -> tuple[str, ...]:
    """The module's validation sets: held-out code windows, plus held-out retrieval windows when there are any."""
    return ("val", "val_retrieval") if retrieval_val is not None and retrieval_val.shape[0] else ("val",)


def fit(
    ctx: RunContext,
    run_id: str | None,
    stage: str,
    module: L.LightningModule,
    train: torch.Tensor,
    val: torch.Tensor,
    steps: int,
    retrieval_val: torch.Tensor | None = None,
    val_every: int | None = None,
    ema_decay: float | None = None,
) -> tuple[L.Trainer, dict[str, float]]:
    """Fit with step-indexed batches (exact resume) and return the last validation's metrics as ``final/*``.

    Validation runs once at the end, or with ``val_every`` also before the first step and every ``val_every``
    steps (the training trend, logged per step). ``retrieval_val`` is a second validation set, run by Lightning
    next to the first (``val_retrieval/*``, returned as ``final_retrieval/*``); the module must have been built
    with ``val_sets=val_sets(retrieval_val)``. ``ema_decay``: validate and export the moving average of the module's
    ``<stage>`` net (:mod:`mchar.lit.ema`).
    """
    import lightning as L

    from mchar.lit.ema import ema_callbacks
    from mchar.lit.trainer import build_trainer
    from mchar.lit.windows import StepDataModule

    cfg = ctx.cfg
    stage_dir = ctx.stage_dir(stage)
    steps = cfg.trainer.max_steps or steps
    sets = val_sets(retrieval_val)
    if run_id is not None:  # what validation read, which the config's request may exceed
        counts = {"mchar.val_windows": str(val.shape[0])}
        if retrieval_val is not None:
            counts["mchar.val_retrieval_windows"] = str(retrieval_val.shape[0])
        ctx.tracker.set_tags(run_id, counts)
    if tuple(module.val_sets) != sets:
        raise ValueError(f"{stage}: module validates {module.val_sets}, the data gives {sets}")
    extra = [retrieval_val] if len(sets) > 1 else None
    dm = StepDataModule(
        train, val, batch_size=cfg.data.batch_size, max_steps=steps, seed=cfg.seed, extra_val=extra
    )
    interval = min(val_every or steps, steps)
    trainer = build_trainer(
        cfg.trainer,
        steps,
        stage_dir / "checkpoints",
        logger=ctx.tracker.lightning_logger(run_id),
        callbacks=[*ctx.callbacks, *ema_callbacks(stage, ema_decay, cfg.trainer.strategy, steps)],
        every_n_train_steps=cfg.trainer.checkpoint_every,
        val_check_interval=interval,
        find_unused_parameters=getattr(module, "ddp_find_unused_parameters", False),
    )
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    resume = ckpt_path(ctx, stage_dir)
    if val_every and resume is None:  # the starting point of the trend (e.g. GistNet's mean-summary init)
        trainer.validate(module, datamodule=dm, verbose=False)
    trainer.fit(module, datamodule=dm, ckpt_path=resume)
    if steps % interval:  # the last interval did not end on the final step
        trainer.validate(module, datamodule=dm, verbose=False)
    metrics = final_metrics(trainer, "val", "final")
    if len(sets) > 1:
        metrics |= final_metrics(trainer, "val_retrieval", "final_retrieval")
    return trainer, metrics


def export_dirs(ctx: RunContext, stage: str) -> tuple[Path, Path]:
    """(stage-dir copy, ``artifacts/<stage>/<experiment name>``) export locations."""
    return ctx.stage_dir(stage) / "export", ctx.artifacts_dir / stage / ctx.cfg.name


def publish(
    ctx: RunContext, run_id: str | None, stage: str, module: Any, metrics: dict[str, float], steps: int
) -> dict[str, Any]:
    """Rank zero only: export into the stage dir and ``artifacts/``, log metrics, tags and a summary."""
    local, shared = export_dirs(ctx, stage)
    for target in (local, shared):
        shutil.rmtree(target, ignore_errors=True)
        module.export(target)
    ctx.tracker.log_metrics(run_id, metrics, step=steps)
    ctx.tracker.set_tags(run_id, {f"mchar.{stage}_dir": str(shared), "mchar.checkpoints": str(local.parent)})
    summary = {"export_dir": str(local), "artifact_dir": str(shared), "metrics": metrics, "steps": steps}
    ctx.tracker.log_json(run_id, summary, f"{stage}/summary.json")
    return summary


# where a local base trained with ``base_lm.gist_exposure_summary=gistnet`` keeps the GistNet it learnt to read
EXPOSURE_GISTNET = "exposure_gistnet"


def exposure_gistnet_dir(model_dir: str | Path) -> Path:
    return Path(model_dir) / EXPOSURE_GISTNET


def preflight(cfg: Any) -> None:
    """``gistnet.init_from_base`` needs a base that has (or will have, once ``base_lm`` builds it) its GistNet."""
    if not cfg.gistnet.init_from_base:
        return
    from mchar.base.local_lm import is_built
    from mchar.config import ConfigError
    from mchar.evals.components import check_export
    from mchar.stages.base_lm import configured_model_dir, is_external

    m = cfg.model
    if is_external(m):
        raise ConfigError("gistnet.init_from_base: only mchar's own local base trains a GistNet beside it")
    base = configured_model_dir(m, cfg.artifacts_dir)
    if is_built(base) and not cfg.base_lm.force:
        if not exposure_gistnet_dir(base).is_dir():
            raise ConfigError(
                f"gistnet.init_from_base: the base at {base} was trained without one "
                "(base_lm.gist_exposure_summary=mean); train a base with =gistnet under another model.name"
            )
        check_export(exposure_gistnet_dir(base), "GistNet", "gistnet.init_from_base")
    elif cfg.base_lm.gist_exposure_summary != "gistnet":
        raise ConfigError(
            f"gistnet.init_from_base: the base {m.name} is not built yet and base_lm.gist_exposure_summary="
            f"{cfg.base_lm.gist_exposure_summary} would train none (set it to gistnet)"
        )


def configured_gistnet(cfg: Any, d_model: int, out_scale: float) -> Any:
    """An untrained GistNet shaped by ``gistnet.*`` / ``tree.*`` for a base of width ``d_model``."""
    from mchar.core.gistnet import make_gistnet

    g, t = cfg.gistnet, cfg.tree
    return make_gistnet(
        g.kind,
        d_model=d_model,
        block_size=t.block_size,
        n_layers=g.layers,
        n_heads=g.heads,
        width=g.width,
        pooling=g.pooling,
        head=g.head,
        max_level=t.depth,
        shared=g.shared,
        out_scale=out_scale,
        residual_mean=g.residual_mean,
    )


def build_gistnet(ctx: RunContext, base: Any) -> Any:
    """The GistNet the stage trains: untrained, or (``gistnet.init_from_base``) the base's exposure GistNet."""
    net = configured_gistnet(ctx.cfg, base.hidden_size, base.embedding_rms)
    if not ctx.cfg.gistnet.init_from_base:
        return net
    from mchar.config import ConfigError
    from mchar.core.gistnet import from_pretrained

    where = exposure_gistnet_dir(base.name_or_path)
    try:
        trained = from_pretrained(where)
    except ValueError as err:
        raise ConfigError(f"gistnet.init_from_base: {err}") from None
    want, have = net.config_dict(), trained.config_dict()
    differ = sorted(k for k in want if k != "out_scale" and want[k] != have.get(k))
    if differ:
        raise ConfigError(
            f"gistnet.init_from_base: the base's GistNet at {where} differs in "
            + ", ".join(f"{k} ({have.get(k)} vs gistnet.* {want[k]})" for k in differ)
        )
    return trained


def run(ctx: RunContext, run_id: str | None) -> dict[str, Any]:
    from mchar.lit.gistnet_module import GistNetModule
    from mchar.lit.trainer import rank_zero_export

    cfg, g = ctx.cfg, ctx.cfg.gistnet
    base = load_base(ctx)
    train, val = load_windows(ctx, base, g.val_windows)
    rv = retrieval_windows(ctx, base.tokenizer, g.val_retrieval_windows, seed=cfg.data.val_seed)
    steps = cfg.trainer.max_steps or g.max_steps
    module = GistNetModule(
        base,
        build_gistnet(ctx, base),
        block_size=cfg.tree.block_size,
        depth=cfg.tree.depth,
        horizon=g.horizon,
        loss=g.loss,
        lr=g.lr,
        weight_decay=g.weight_decay,
        max_steps=steps,
        warmup_steps=g.warmup_steps,
        contrastive_weight=g.contrastive_weight,
        contrastive_margin=g.contrastive_margin,
        substitutable_threshold=g.substitutable_threshold,
        position_mode=cfg.tree.position_mode,
        raw_prob=g.raw_prob,
        val_raw_prob=g.val_raw_prob,
        keep_raw_blocks=g.keep_raw_blocks,
        keep_raw_max=g.keep_raw_max,
        val_keep_raw_blocks=g.val_keep_raw_blocks,
        upper_weight=g.upper_weight,
        upper_keep_raw_blocks=g.upper_keep_raw_blocks,
        budget=cfg.allocator.budget,
        session_share=g.session_share,
        session_edits=g.session_edits,
        seed=cfg.seed,
        val_seed=cfg.data.val_seed,
        val_sets=val_sets(rv),
    )
    trainer, metrics = fit(
        ctx, run_id, "gistnet", module, train, val, steps, rv, val_every=g.val_every, ema_decay=g.ema_decay
    )
    result: dict[str, Any] = {"metrics": metrics, "steps": steps}
    with rank_zero_export(trainer, "gistnet-export") as writer:
        if writer:
            result = publish(ctx, run_id, "gistnet", module, metrics, steps)
    return result
