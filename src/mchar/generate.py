"""``mchar generate``: stream a long text through MegaContext sessions and continue it, one policy after another.

Why: the quickest way to see the memory work on one's own text. Bury a fact early in a long file, ask about it at
the end, and compare what ``lensnet`` answers with what truncation (``recency``) or full context (``full``) answers
at the same budget, with the working context each session ended on. It loads the experiment's trained base and
nets (``mchar fit +experiment=NAME`` first) exactly as ``mchar eval`` does; it trains and tracks nothing.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mchar.errors import MCharError


class GenerateError(MCharError):
    """Bad input to ``mchar generate`` (file, prompt, policy, missing base)."""


@dataclass(frozen=True)
class Continuation:
    """One policy's continuation of the text, and the working context it was generated from."""

    policy: str
    text: str
    context_tokens: int
    seconds: float
    raw_tokens: int  # raw tokens in the final working context
    gists: dict[int, int]  # gist entries in it, per LOD

    def focus(self) -> str:
        gists = ", ".join(f"{n} LOD{lvl}" for lvl, n in sorted(self.gists.items())) or "no gists"
        return f"{self.raw_tokens} raw tokens + {gists}"


def read_text(file: str | None, prompt: str | None) -> str:
    """The file's text followed by the prompt: refused when neither gives any text or the file is not UTF-8 text."""
    text = ""
    if file:
        path = Path(file)
        if not path.is_file():
            raise GenerateError(f"generate: --file {file!r} is not a file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise GenerateError(f"generate: --file {file!r} is not UTF-8 text") from None
    text += prompt or ""
    if not text.strip():
        raise GenerateError("generate: nothing to continue (give --file and/or --prompt with some text)")
    return text


def check_policies(policies: list[str]) -> list[str]:
    from mchar.evals.components import FULL, POLICY_NAMES

    known = (FULL, *POLICY_NAMES)
    unknown = [p for p in policies if p not in known]
    if unknown or not policies:
        raise GenerateError(
            f"generate: unknown policy {', '.join(map(repr, unknown)) or '(none given)'} "
            f"(choose from {', '.join(known)})"
        )
    return policies


def built_base(cfg: Any) -> Path:
    """The experiment's base, which ``generate`` never trains: a missing one is an error naming the fit to run."""
    from mchar.base.local_lm import is_built
    from mchar.stages.base_lm import configured_model_dir, is_external

    path = configured_model_dir(cfg.model, cfg.artifacts_dir)
    if not is_external(cfg.model) and not is_built(path):
        raise GenerateError(
            f"generate: no trained base at {path}; run `python -m mchar fit +experiment=<this experiment>` first"
        )
    return path


def check_cover(cfg: Any, policies: list[str], n_tokens: int, max_new_tokens: int) -> None:
    """A policy that keeps a cover of the whole history needs the budget to hold it while the text streams in and
    the answer is generated; truncation (and full context) do not."""
    from mchar.core.working_context import stream_min_cost
    from mchar.evals.components import FULL
    from mchar.stages.evaluate import DROPPING

    if all(p in (*DROPPING, FULL) for p in policies):
        return
    k, depth, budget = cfg.tree.block_size, cfg.tree.depth, cfg.allocator.budget
    need = stream_min_cost(k, depth, n_tokens, max_new_tokens)
    if need > budget:
        raise GenerateError(
            f"generate: allocator.budget={budget} cannot hold a cover of this {n_tokens}-token text plus "
            f"{max_new_tokens} new tokens at tree.depth={depth} (it needs {need}); raise the budget or tree.depth"
        )


def continue_text(
    cfg: Any, text: str, policies: list[str], max_new_tokens: int, stop: list[str]
) -> list[Continuation]:
    """Each policy's greedy continuation of ``text`` at ``allocator.budget``, from one load of the components."""
    from mchar.config import eval_device
    from mchar.evals.components import components_from_run, run_exports
    from mchar.evals.lm_eval_model import MegaContextLM

    check_policies(policies)
    base, artifacts = built_base(cfg), Path(cfg.artifacts_dir).resolve()
    if "lensnet" in policies and run_exports(cfg, {}, artifacts_dir=artifacts)["lensnet"] is None:
        raise GenerateError(
            f"generate: policy 'lensnet' needs a trained LensNet and experiment {cfg.name!r} has none "
            "(run its fit, or set eval.lensnet_dir)"
        )
    comp = components_from_run(cfg, {}, base, artifacts_dir=artifacts, device=eval_device(cfg))
    models = [MegaContextLM(components=comp, policy=p, seed=cfg.seed) for p in policies]
    ids = models[0].tok_encode(text)
    # every refusal (a length the base or the budget cannot hold) before the first token is generated
    for model in models:
        model.check_length(len(ids) + max_new_tokens, "generate")
    check_cover(cfg, policies, len(ids), max_new_tokens)
    out = []
    for policy, model in zip(policies, models, strict=True):
        t0 = time.perf_counter()
        continuation, session = model.generate_ids(ids, stop, max_new_tokens, {})
        levels = Counter(session.wc.slot_map().levels.tolist())  # what the base read: one count per slot
        out.append(
            Continuation(
                policy=policy,
                text=continuation,
                context_tokens=len(ids),
                seconds=time.perf_counter() - t0,
                raw_tokens=levels.pop(0, 0),
                gists=dict(levels),
            )
        )
    return out


def print_continuations(results: list[Continuation], budget: int) -> None:
    from mchar.evals.components import FULL

    for r in results:
        where = "full context" if r.policy == FULL else f"budget {budget}: {r.focus()}"
        print(f"--- {r.policy} ({r.context_tokens} tokens of context; {where}; {r.seconds:.1f} s)")
        print(r.text)
