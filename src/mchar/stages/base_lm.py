"""Stage ``base_lm``: train mchar's tokenizer and small Llama base LM on the local corpus, save in HF format.

The result lands in ``artifacts/base_lm/<model.name>`` atomically (built in a temp dir, marker written last,
then renamed), so a killed build never leaves a half-written model that later stages would load.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mchar.base.local_lm import READY_MARKER, build_local_lm, is_built
from mchar.processes import process_alive

if TYPE_CHECKING:
    from mchar.pipeline import RunContext

log = logging.getLogger(__name__)

BUILD_SUFFIX = ".tmp-"
TASK_NAMES = ("passkey", "niah_multikey", "kv_retrieval", "variable_tracking")


def model_dir(ctx: RunContext) -> Path:
    return configured_model_dir(ctx.cfg.model, ctx.artifacts_dir)


def is_external(model: Any) -> bool:
    """``model.*`` names an HF model directory (used as it is) rather than mchar's own local base."""
    return model.kind == "hf" or bool(model.name_or_path)


def configured_model_dir(model: Any, artifacts_dir: str | Path) -> Path:
    """Where the base of ``model.*`` lives: an HF directory as given, else ``<artifacts_dir>/base_lm/<model.name>``."""
    if is_external(model):
        return Path(model.name_or_path)
    return Path(artifacts_dir).resolve() / "base_lm" / model.name


def corpus_splits(ctx: RunContext) -> Any:
    from mchar.data.corpus import discover_corpus

    d = ctx.cfg.data
    globs = [g for g in d.globs if g != "stdlib"]
    kwargs: dict[str, Any] = {"fractions": tuple(d.split), "seed": d.split_seed, "max_files": d.max_files}
    if globs:
        kwargs["globs"] = globs
    return discover_corpus(**kwargs)


def window_module(
    ctx: RunContext, tokenizer: Any, files_by_split: Any = None, window: int | None = None, **overrides: Any
) -> Any:
    """``LongDocDataModule`` over ``data.*``; a shorter ``window`` (a curriculum phase) keeps the tokens per batch
    and the episodes per token of the full window. ``overrides`` replace any constructor argument."""
    from mchar.data.datamodules import LongDocDataModule

    d = ctx.cfg.data
    w = window or d.window
    scale = d.window / w
    kwargs: dict[str, Any] = dict(
        files_by_split=corpus_splits(ctx) if files_by_split is None else files_by_split,
        tokenizer=tokenizer,
        window=w,
        stride=d.stride if w == d.window else None,
        batch_size=max(1, round(d.batch_size * scale)),
        num_workers=d.num_workers,
        seed=ctx.cfg.seed,
        task_mix_fraction=d.task_mix_fraction,
        mix_episodes=max(1, round(d.mix_episodes / scale)),
        mix_answer_tail=d.mix_answer_tail if w == d.window else 0,
        mix_tasks=d.mix_tasks,
        cache_dir=d.cache_dir or str(ctx.artifacts_dir / "cache"),
    )
    return LongDocDataModule(**(kwargs | overrides))


def relpaths(splits: Any, names: tuple[str, ...]) -> list[str]:
    """The files of splits ``names``, relative to the corpus root (what a base records and is checked against)."""
    root = Path(splits.root)
    return sorted(Path(p).relative_to(root).as_posix() for s in names for p in splits.as_dict()[s])


def split_fingerprint(splits: Any) -> str:
    """sha256 of which files (relative to the corpus root) are in which split: a base records the split it was
    trained on; one recorded before ``train_relpaths`` existed is reused only under the same split."""
    names = {s: relpaths(splits, (s,)) for s in splits.as_dict()}
    return hashlib.sha256(json.dumps(names, sort_keys=True).encode("utf-8")).hexdigest()


def check_reusable(ctx: RunContext, path: Path) -> None:
    """Refuse to reuse a built local base whose architecture differs from ``model.local``, or that has trained on
    any file this config holds out (one line).

    Bases are reused by ``model.name``; without this, a base built under the same name with, e.g., a different
    ``induction_prior`` or ``hidden_size`` would silently stand in for the one the config asks for. A base that
    records its training files may serve a config with more (or fewer) files, e.g. side nets trained on the whole
    corpus (``data.max_files``): a file's split depends only on ``data.split_seed``/``data.split``, so the base's
    held-out files stay held out; a base from before that record needs the very same split.
    """
    from mchar.config import ConfigError

    if ctx.cfg.model.kind != "local" or ctx.cfg.base_lm.force or not is_built(path):
        return
    marker = json.loads((path / READY_MARKER).read_text())
    if "train_relpaths" in marker:
        splits = corpus_splits(ctx)
        seen = set(relpaths(splits, ("val", "test"))) & set(marker["train_relpaths"])
        if seen:
            raise ConfigError(
                f"data.split_seed: {path} was trained on {len(seen)} of this config's held-out files (e.g. "
                f"{min(seen)}): data.split_seed, data.split or data.globs differ from its split; keep its split, "
                "choose another model.name, or set base_lm.force=true to rebuild it"
            )
    elif "split_fingerprint" in marker and marker["split_fingerprint"] != split_fingerprint(
        corpus_splits(ctx)
    ):
        raise ConfigError(
            f"data.split_seed: {path} was trained on another train/val/test split of the corpus (data.split_seed, "
            f"data.split, data.max_files or data.globs differ), so this config's held-out files may be its training "
            f"files; keep its split, choose another model.name, or set base_lm.force=true to rebuild it"
        )
    saved = marker.get("config", {})
    wanted = {k: v for k, v in vars(ctx.cfg.model.local).items() if k != "vocab_size"}
    diff = [k for k, v in wanted.items() if k in saved and saved[k] != v]
    if diff:
        got = ", ".join(f"{k}={saved[k]!r}" for k in diff)
        asked = ", ".join(f"{k}={wanted[k]!r}" for k in diff)
        raise ConfigError(
            f"model.name: {path} was built with {got} but this config asks for {asked}; choose another "
            f"model.name or set base_lm.force=true to rebuild it"
        )


def ensure_base_lm(ctx: RunContext, run_id: str | None = None) -> Path:
    """The base model directory, training it first when it is a local model that is missing."""
    path = model_dir(ctx)
    check_reusable(ctx, path)
    if ctx.cfg.model.kind == "local" and not is_built(path):
        if run_id is None:
            with ctx.tracker.stage("base_lm") as rid:
                ctx.results["base_lm"] = run(ctx, rid)
        else:
            run(ctx, run_id)
    return path


def run(ctx: RunContext, run_id: str | None) -> dict[str, Any]:
    cfg = ctx.cfg
    target = model_dir(ctx)
    if cfg.model.kind == "hf":
        return {"model_dir": str(target), "trained": False}
    check_reusable(ctx, target)
    if is_built(target) and not cfg.base_lm.force:
        info = json.loads((target / READY_MARKER).read_text())
        ctx.tracker.set_tags(run_id, {"mchar.base_lm": "reused", "mchar.model_dir": str(target)})
        ctx.tracker.log_metrics(run_id, {k: v for k, v in info.get("metrics", {}).items()})
        return {"model_dir": str(target), "trained": False, **info}
    return _train(ctx, run_id, target)


def _train(ctx: RunContext, run_id: str | None, target: Path) -> dict[str, Any]:
    # one build directory per process: a second process building the same base (a sweep worker, a DDP rank
    # re-running the pipeline) must not delete or overwrite the files this one is writing
    tmp = build_dir(target)
    remove_dead_builds(target)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        return _build(ctx, run_id, target, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed or interrupted build leaves nothing behind
        raise


def _build(ctx: RunContext, run_id: str | None, target: Path, tmp: Path) -> dict[str, Any]:
    import lightning as L
    import torch

    from mchar.data.datamodules import CurriculumDataModule
    from mchar.data.tasks import generate_examples
    from mchar.data.tokenizer import train_tokenizer
    from mchar.evals.task_accuracy import answer_accuracy, full_context_greedy
    from mchar.lit.base_lm import BaseLMModule
    from mchar.lit.trainer import build_trainer, wait_for_rank_zero

    cfg, tcfg = ctx.cfg, ctx.cfg.base_lm
    stage_dir = ctx.stage_dir("base_lm")

    splits = corpus_splits(ctx)
    report = {s: vars(r) for s, r in splits.report.items()}
    ctx.tracker.log_json(run_id, report, "data/corpus_report.json")
    tokenizer = train_tokenizer(
        tmp,
        files=splits["train"],
        vocab_size=cfg.model.local.vocab_size,
        max_chars=cfg.data.tokenizer_max_chars,
    )
    model = build_local_lm(
        cfg.model.local,
        vocab_size=len(tokenizer),
        bos_id=None,
        eos_id=tokenizer.eos_token_id,
        pad_id=tokenizer.pad_token_id,
        seed=cfg.seed,
    )

    summarizer = None
    if tcfg.gist_exposure_summary == "gistnet":
        from mchar.stages.gistnet import configured_gistnet

        rms = float(model.get_input_embeddings().weight.detach().float().pow(2).mean().sqrt())
        summarizer = configured_gistnet(cfg, cfg.model.local.hidden_size, rms)

    final_steps = cfg.trainer.max_steps or tcfg.max_steps
    dm = CurriculumDataModule(
        [window_module(ctx, tokenizer, splits, w) for w in [*tcfg.curriculum_windows, cfg.data.window]],
        list(tcfg.curriculum_steps) + [final_steps],
    )
    steps = sum(dm.steps)
    module = BaseLMModule(
        model,
        lr=tcfg.lr,
        weight_decay=tcfg.weight_decay,
        warmup_steps=tcfg.warmup_steps,
        max_steps=steps,
        answer_weight=tcfg.answer_weight,
        copy_batch=tcfg.copy_batch,
        copy_length=tcfg.copy_length,
        copy_pool=min(tcfg.copy_pool, len(tokenizer)),
        copy_from_step=tcfg.copy_from_step,
        copy_only_steps=tcfg.copy_only_steps,
        gist_exposure=tcfg.gist_exposure,
        gist_exposure_raw_prob=tcfg.gist_exposure_raw_prob,
        gist_exposure_session_share=tcfg.gist_exposure_session_share,
        budget=cfg.allocator.budget,
        block_size=cfg.tree.block_size,
        depth=cfg.tree.depth,
        position_mode=cfg.tree.position_mode,
        seed=cfg.seed,
        summarizer=summarizer,
    )
    trainer = build_trainer(
        cfg.trainer,
        steps,
        stage_dir / "checkpoints",
        logger=ctx.tracker.lightning_logger(run_id),
        val_check_interval=max(1, steps // 4),
        limit_val_batches=tcfg.val_batches,
        callbacks=ctx.callbacks,
    )
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    trainer.fit(module, datamodule=dm)
    val = trainer.validate(module, datamodule=dm, verbose=False)[0]
    metrics: dict[str, float] = {
        "final/val_nll": float(val["val/nll"]),
        "final/val_ppl": float(val["val/ppl"]),
    }

    if trainer.is_global_zero:
        model = module.model.cpu().eval()
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if summarizer is not None:
            from mchar.stages.gistnet import exposure_gistnet_dir

            module.summarizer.cpu().save_pretrained(exposure_gistnet_dir(tmp))
        from mchar.base.adapter import FrozenBaseLM

        base = FrozenBaseLM(model, tokenizer, name_or_path=str(target))
        examples = []
        for task in TASK_NAMES:
            examples += generate_examples(
                task,
                tcfg.task_eval_examples,
                tcfg.task_eval_length,
                tokenizer=tokenizer,
                seed=cfg.seed + 1,
                files=splits["test"],
            )
        with torch.no_grad():
            acc = answer_accuracy(full_context_greedy(base), tokenizer, examples)
        metrics.update({f"final/task_acc/{k}": v for k, v in acc.items()})
        info = {
            "metrics": metrics,
            "steps": steps,
            "gist_exposure_summary": tcfg.gist_exposure_summary if tcfg.gist_exposure > 0 else None,
            "config": vars(cfg.model.local) | {"vocab_size": len(tokenizer)},
            "corpus": report,
            "split_fingerprint": split_fingerprint(splits),
            "train_relpaths": relpaths(splits, ("train",)),
            "train_files": len(splits["train"]),
            "test_files": len(splits["test"]),
        }
        (tmp / READY_MARKER).write_text(json.dumps(info, indent=2, default=str))
        publish_build(tmp, target)
        ctx.tracker.log_metrics(run_id, metrics, step=steps)
        ctx.tracker.set_tags(run_id, {"mchar.model_dir": str(target), "mchar.checkpoints": str(stage_dir)})
        ctx.tracker.log_json(run_id, info, "base_lm/summary.json")
    wait_for_rank_zero(trainer, "base_lm-export")
    shutil.rmtree(tmp, ignore_errors=True)  # the other ranks' build directories (rank zero's was renamed)
    return {"model_dir": str(target), "trained": True, "metrics": metrics}


def build_dir(target: Path) -> Path:
    """This process's build directory next to ``target``, named by host and pid so leftovers can be traced."""
    return target.with_name(f"{target.name}{BUILD_SUFFIX}{socket.gethostname()}-{os.getpid()}")


def remove_dead_builds(target: Path) -> list[Path]:
    """Delete build directories that a killed process (kill -9, OOM) left next to ``target`` on this host.

    Only directories whose process no longer exists here are removed: a live build, or one from another host on a
    shared filesystem, is never touched.
    """
    host = socket.gethostname()
    removed = []
    for path in target.parent.glob(f"{glob.escape(target.name)}{BUILD_SUFFIX}*"):
        owner, _, pid = path.name[len(target.name) + len(BUILD_SUFFIX) :].rpartition("-")
        if owner == host and pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if removed:
        log.info("base_lm: removed %d build directories left by dead processes", len(removed))
    return removed


def publish_build(tmp: Path, target: Path) -> bool:
    """Move a finished build into place; False (and ``tmp`` discarded) when another process finished the same base
    first: its complete directory is kept, never deleted under a reader."""
    if is_built(target):
        log.warning("base_lm: %s was built by another process meanwhile; keeping that one", target)
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    if target.exists():  # an unfinished leftover (no ready marker)
        shutil.rmtree(target)
    tmp.rename(target)
    return True
