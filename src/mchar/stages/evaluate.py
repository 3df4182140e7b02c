"""Stage ``eval``: perplexity at budget for every policy, focus telemetry, and lm-eval long-context tasks.

Everything that can be wrong with the request (unknown task/policy, missing task YAMLs, a budget below one block,
documents longer than a learned-position base can index) fails with one line *before* the base is loaded or
data generated. Results: MLflow metrics (``ppl/…``, ``focus/…``, ``task/…``, ``eval/…``; ``ppl_retrieval/…`` and
``focus_retrieval/…`` for the held-out retrieval documents, ``eval.retrieval_documents``), artifacts
``eval/results.json`` and ``eval/focus_map.npy`` (+ lm-eval result JSONs), and the same files in the stage dir.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mchar.evals.components import EvalError
from mchar.evals.paired_tasks import samples_filename, write_samples

if TYPE_CHECKING:
    from mchar.pipeline import RunContext

log = logging.getLogger(__name__)


def _task_dir(cfg: Any) -> Path:
    from mchar.evals.make_tasks import task_dir

    return Path(cfg.eval.task_dir) if cfg.eval.task_dir else task_dir()


def preflight(cfg: Any) -> None:
    """Cheap checks of the eval request (no model, no data); the pipeline runs them before any stage starts."""
    from mchar.config import POLICIES
    from mchar.evals.components import check_export
    from mchar.evals.make_tasks import TASKS, available_lengths

    e, k = cfg.eval, cfg.tree.block_size
    if e.gistnet_dir:
        check_export(e.gistnet_dir, "GistNet", "eval.gistnet_dir")
    if e.lensnet_dir:
        check_export(e.lensnet_dir, "LensNet", "eval.lensnet_dir")
    for key, names, allowed in (
        ("eval.policies", e.policies, POLICIES),
        ("eval.task_policies", e.task_policies, (*POLICIES, "full")),
    ):
        for p in names:
            if p not in allowed:
                raise EvalError(f"{key}: unknown policy {p!r} (choose from {', '.join(allowed)})")
    if cfg.allocator.budget < k:
        raise EvalError(
            f"allocator.budget: {cfg.allocator.budget} is smaller than one block (tree.block_size={k})"
        )
    _check_cover(cfg)
    if e.tasks:
        have = available_lengths(_task_dir(cfg))
        for t in e.tasks:
            if t not in TASKS:
                raise EvalError(f"eval.tasks: unknown task {t!r} (choose from {', '.join(TASKS)})")
            missing = sorted(set(e.task_lengths) - have[t])
            if missing:
                raise EvalError(
                    f"eval.task_lengths: no {t} task YAML for length(s) {missing} in {_task_dir(cfg)} (have "
                    f"{sorted(have[t])}; write more with `python -m mchar.evals.make_tasks --yamls <dir> --lengths …`)"
                )
    if cfg.model.kind == "hf" and not Path(cfg.model.name_or_path).exists():
        return  # hub ids: the length check happens after loading


TASK_ANSWER_TOKENS = 64  # at most this many answer tokens are generated per task example (max_gen_toks)
DROPPING = ("recency", "sink_recent")  # policies that drop history instead of keeping a gist cover of it


def _check_cover(cfg: Any) -> None:
    """Every non-dropping policy keeps the whole history at some LOD: its coarsest cover must fit the budget at every
    point of the stream (a document arrives in whole blocks; a task's prompt too, then its answer token by token)."""
    from mchar.core.working_context import stream_min_cost

    e, k, depth, budget = cfg.eval, cfg.tree.block_size, cfg.tree.depth, cfg.allocator.budget
    needs: list[tuple[str, int, int]] = []
    if any(p not in DROPPING for p in e.policies):
        needs.append(("eval document", history_length(e, budget) + e.final_tokens, 0))
    if e.tasks and any(p not in (*DROPPING, "full") for p in e.task_policies):
        needs += [("eval.task_lengths", n, TASK_ANSWER_TOKENS) for n in e.task_lengths]
    for what, n, answer in needs:
        cost = stream_min_cost(k, depth, n, answer)
        if cost > budget:
            raise EvalError(
                f"allocator.budget: {budget} cannot hold a {n}-token {what} at tree.depth={depth} (its coarsest "
                f"cover costs up to {cost} while it streams in); raise allocator.budget or tree.depth, or shorten "
                "the history"
            )


def _documents(ctx: RunContext, tokenizer: Any, length: int, count: int) -> list[Any]:
    from mchar.data.corpus import read_text
    from mchar.evals.perplexity import make_documents
    from mchar.stages.base_lm import corpus_splits

    split = ctx.cfg.eval.split
    files = corpus_splits(ctx)[split]
    if not files:
        raise EvalError(f"eval: the corpus has no {split}-split files to build held-out documents from")

    def streams() -> Any:
        for f in sorted(files):
            text = read_text(f)
            if text:
                yield tokenizer.encode(text, add_special_tokens=False)

    within = bool(ctx.cfg.eval.documents_within_files)
    docs = make_documents(
        streams(), length, count, getattr(tokenizer, "eos_token_id", None), within_files=within
    )
    if not docs:
        where = "no held-out file has" if within else "the test split has fewer than"
        raise EvalError(
            f"eval: {where} {length} tokens; lower eval.history_multiple (or eval.history_tokens)"
            + (" or set eval.documents_within_files=false" if within else "")
        )
    if len(docs) < count:
        log.warning("eval: only %d of %d held-out documents of %d tokens available", len(docs), count, length)
    return docs


def history_length(e: Any, budget: int) -> int:
    """Tokens of history before the scored ones: ``eval.history_tokens`` when set, else ``history_multiple x budget``."""
    return int(e.history_tokens) if e.history_tokens else e.history_multiple * budget


def _document_length(ctx: RunContext, base: Any) -> int:
    """History plus scored tokens; refused when a learned-position base cannot index that many."""
    e = ctx.cfg.eval
    length = history_length(e, ctx.cfg.allocator.budget) + e.final_tokens
    limit = getattr(base, "max_positions", None)
    if getattr(base, "learned_positions", False) and limit is not None and length > limit:
        raise EvalError(
            f"eval: documents of {length} tokens exceed the base's {limit} learned positions (MegaContext keeps "
            f"true positions); lower eval.history_multiple / eval.history_tokens or allocator.budget"
        )
    return length


def _retrieval_documents(ctx: RunContext, tokenizer: Any, length: int, count: int) -> list[Any]:
    """``count`` held-out retrieval documents: ``eval.split`` files with episodes spliced in like the training mix."""
    from mchar.stages.gistnet import retrieval_windows

    split = ctx.cfg.eval.split
    docs = list(retrieval_windows(ctx, tokenizer, count, split=split, length=length))
    if not docs:
        raise EvalError(
            f"eval.retrieval_documents: the {split} split has no file to build retrieval documents from"
        )
    return docs  # fewer than ``count``: retrieval_windows warns


def _perplexity(
    ctx: RunContext, comp: Any, docs: list[Any], focus_map: bool = True
) -> tuple[dict[str, Any], np.ndarray, dict[str, Any]]:
    """Every policy (and full context) on ``docs`` at the budget: the summary, one policy's focus map, and what was
    scored."""
    from mchar.evals.components import FULL
    from mchar.evals.perplexity import PolicyResult, evaluate_policy, full_context_nll, summarise

    cfg, e = ctx.cfg, ctx.cfg.eval
    budget = cfg.allocator.budget
    runnable = [p for p in e.policies if not comp.unavailable(p)] or list(e.policies)
    map_policy = e.focus_map_policy or ("lensnet" if "lensnet" in runnable else runnable[0])
    results = {}
    for p in e.policies:
        why = comp.unavailable(p)
        if why:
            results[p] = PolicyResult(skipped=why)
            continue
        with comp.reading(p):
            results[p] = evaluate_policy(
                lambda p=p: comp.session(p),
                docs[: e.oracle_documents] if p == "oracle" else docs,
                e.final_tokens,
                budget,
                map_document=0 if focus_map and p == map_policy else None,
            )
        log.info("eval %s: nll %.4f (%.1fs)", p, float(np.mean(results[p].nll)), results[p].seconds)
    with comp.reading(FULL):
        full = full_context_nll(comp.base, docs, e.final_tokens) if e.full_context else None
    summary = summarise(results, full, ci=e.ci, seed=cfg.seed)
    fmap = results.get(map_policy) if focus_map else None
    focus = fmap.focus_map if fmap is not None and fmap.focus_map is not None else np.zeros((0, 0), np.int8)
    length = int(docs[0].numel())
    info = {
        "documents": len(docs),
        "document_tokens": length,
        "history_tokens": length - e.final_tokens,
        "focus_map_policy": map_policy if focus_map else None,
        "focus_map_times": fmap.focus_map_times.tolist()
        if fmap is not None and fmap.focus_map_times is not None
        else [],
        "full_context_fits": full is not None,
    }
    return summary, focus, info


def _task_results(
    ctx: RunContext, comp: Any, stage_dir: Path
) -> tuple[dict[str, Any], dict[str, float], list[Path]]:
    """Run the local tasks (and RULER) through lm-eval for every task policy."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from mchar.evals.lm_eval_model import MegaContextLM
    from mchar.evals.make_tasks import ensure_data, lm_eval_task_name
    from mchar.stages.base_lm import corpus_splits

    cfg, e = ctx.cfg, ctx.cfg.eval
    policies = e.task_policies or e.policies
    out: dict[str, Any] = {}
    metrics: dict[str, float] = {}
    files: list[Path] = []
    primary = cfg.allocator.policy if cfg.allocator.policy in policies else policies[0]
    names: dict[str, tuple[str, int]] = {}
    tm = None
    if e.tasks:
        data_dir = stage_dir / "task_data"
        ensure_data(
            data_dir,
            comp.tokenizer,
            e.tasks,
            e.task_lengths,
            n=e.task_examples,
            seed=cfg.seed + 1,
            files=corpus_splits(ctx)[e.split],
        )
        names = {lm_eval_task_name(t, n, e.task_output): (t, n) for t in e.tasks for n in e.task_lengths}
        tm = TaskManager(
            include_path=str(_task_dir(cfg)), include_defaults=False, metadata={"data_dir": str(data_dir)}
        )
    ruler_tm = None
    if e.ruler_tasks:
        ruler_tm = TaskManager(
            include_defaults=True,
            metadata={
                "tokenizer": str(comp.sources.get("base", "")),
                "max_seq_lengths": list(e.ruler_lengths),
            },
        )
    key = "exact_match,none" if e.task_output == "generate" else "acc,none"
    for p in policies:
        why = comp.unavailable(p)
        if why:
            out[p] = {"skipped": why}
            continue
        model = MegaContextLM(components=comp, policy=p, max_gen_toks=TASK_ANSWER_TOKENS, seed=cfg.seed)
        out[p] = {}
        runs = [(tm, list(names))] if tm is not None else []
        if ruler_tm is not None:
            runs.append((ruler_tm, list(e.ruler_tasks)))
        for manager, tasks in runs:
            t0 = time.perf_counter()
            with comp.reading(p):
                res = lm_eval.simple_evaluate(
                    model=model,
                    tasks=tasks,
                    task_manager=manager,
                    limit=e.task_examples,
                    num_fewshot=0,
                    random_seed=cfg.seed,
                    numpy_random_seed=cfg.seed,
                    torch_random_seed=cfg.seed,
                    fewshot_random_seed=cfg.seed,
                    bootstrap_iters=0,
                    log_samples=bool(e.log_samples),
                )
            if res is None:  # lm-eval returns None off rank zero
                continue
            log.info("eval tasks %s for %s: %.1fs", tasks, p, time.perf_counter() - t0)
            suite = "ruler" if manager is ruler_tm else "local"
            path = stage_dir / f"lm_eval_{p}_{suite}.json"
            path.write_text(
                json.dumps(
                    {k: res.get(k) for k in ("results", "configs", "versions", "n-samples")},
                    indent=2,
                    default=str,
                )
            )
            files.append(path)
            if e.log_samples:
                files.append(write_samples(res.get("samples") or {}, stage_dir / samples_filename(p, suite)))
            for task, vals in res["results"].items():
                for mkey, v in vals.items():
                    if not isinstance(v, int | float) or "stderr" in mkey:
                        continue
                    metric = mkey.split(",")[0]
                    metrics[f"eval/{p}/{task}/{metric}"] = float(v)
                    if p == primary:
                        metrics[f"eval/{task}/{metric}"] = float(v)
                if task in names and key in vals:
                    t, n = names[task]
                    out[p].setdefault(t, {})[str(n)] = float(vals[key])
                    metrics[f"task/{p}/{t}/{n}/acc"] = float(vals[key])
                elif manager is ruler_tm:
                    for mkey, v in vals.items():
                        if mkey.split(",")[0].isdigit() and isinstance(v, int | float):
                            out[p].setdefault(task, {})[mkey.split(",")[0]] = float(v)
                            metrics[f"task/{p}/{task}/{mkey.split(',')[0]}/acc"] = float(v)
    return out, metrics, files


def run(ctx: RunContext, run_id: str | None) -> dict[str, Any]:
    from dataclasses import asdict

    from mchar.config import eval_device
    from mchar.evals.components import components_from_run
    from mchar.evals.perplexity import metrics_from_summary
    from mchar.stages.base_lm import ensure_base_lm

    cfg = ctx.cfg
    stage_dir = ctx.stage_dir("eval")
    base_dir = ensure_base_lm(ctx)
    comp = components_from_run(
        cfg, ctx.results, base_dir, artifacts_dir=ctx.artifacts_dir, device=eval_device(cfg)
    )
    t0 = time.perf_counter()
    e = cfg.eval
    length = _document_length(ctx, comp.base)
    summary, focus, info = _perplexity(ctx, comp, _documents(ctx, comp.tokenizer, length, e.documents))
    metrics = metrics_from_summary(summary)
    retrieval: dict[str, Any] = {}
    if e.retrieval_documents:
        docs = _retrieval_documents(ctx, comp.tokenizer, length, e.retrieval_documents)
        summary_r, _, info_r = _perplexity(ctx, comp, docs, focus_map=False)
        retrieval = {**summary_r, "documents": info_r}
        metrics.update(metrics_from_summary(summary_r, ppl="ppl_retrieval", focus="focus_retrieval"))
    tasks, task_metrics, task_files = _task_results(ctx, comp, stage_dir)
    metrics.update(task_metrics)
    results = {
        **summary,
        "tasks": tasks,
        "components": comp.describe(),
        "documents": info,
        "retrieval": retrieval,
        "config": {
            "eval": asdict(cfg.eval),
            "budget": cfg.allocator.budget,
            "block_size": cfg.tree.block_size,
            "depth": cfg.tree.depth,
            "refocus_every": comp.settings.refocus_every or cfg.tree.block_size,
            "allocator": asdict(cfg.allocator),
        },
        "seconds": time.perf_counter() - t0,
    }
    results_path = stage_dir / "results.json"
    results_path.write_text(json.dumps(results, indent=2, default=str))
    map_path = stage_dir / "focus_map.npy"
    np.save(map_path, focus)
    ctx.tracker.log_metrics(run_id, metrics)
    ctx.tracker.log_artifact(run_id, results_path, "eval")
    ctx.tracker.log_artifact(run_id, map_path, "eval")
    for f in task_files:
        ctx.tracker.log_artifact(run_id, f, "eval/lm_eval")
    ctx.tracker.set_tags(
        run_id,
        {
            "mchar.gistnet_trained": str(comp.gistnet_trained).lower(),
            "mchar.lensnet_trained": str(comp.lensnet is not None).lower(),
            "mchar.lora": comp.sources.get("lora", "none"),
        },
    )
    return {"metrics": metrics, "results_path": str(results_path), "focus_map_path": str(map_path)}
