"""Everything an evaluation needs, loaded once: frozen base, GistNet, LensNet, and a session factory per policy.

Why one object: the perplexity sweep and lm-eval both build many fresh sessions (one per document / request and
policy) at the *same* budget; loading the base and the nets once and building cheap trees/allocators/policies
per session keeps every method on exactly the same footing. When no trained GistNet exists, a mean-pool GistNet
(block mean rescaled to the base's embedding RMS, no training) stands in and ``gistnet_trained`` says so; a
missing LensNet makes the ``lensnet`` policy unavailable (:meth:`EvalComponents.unavailable` says why) rather
than silently scoring with random weights.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mchar.config import POLICIES, QUERY_REBUILDS, QUERY_SCORERS
from mchar.errors import MCharError, first_line

log = logging.getLogger(__name__)

POLICY_NAMES = POLICIES  # one list: what the config accepts is what the evaluation can build
_EXPORT_KEYS = (
    "export_dir",
    "artifact_dir",
    "weights_dir",
    "model_dir",
    "gistnet_dir",
    "lensnet_dir",
    "dir",
    "path",
)


class EvalError(MCharError, ValueError):
    """An evaluation request that cannot be served (one clear line, raised before heavy work)."""


@dataclass
class SessionSettings:
    """Shape of every session: tree, budget, allocator knobs (mirrors ``tree`` + ``allocator`` configs)."""

    budget: int = 256
    block_size: int = 32
    depth: int = 2
    refocus_every: int | None = None
    position_mode: str = "centre"
    gist_dtype: str = "float32"
    tau_expand: float = 0.1
    tau_collapse: float = 0.1
    fill_budget: bool = True
    group_score: str = "parent"
    max_edits: int = 4
    cooldown: int = 2
    protect_tokens: int = 64
    stochastic: bool = False
    top_k: int = 4
    temperature: float = 1.0
    seed: int = 0
    sink_blocks: int = 1
    oracle_horizon: int | None = None
    attention_queries: int | None = None
    attention_layer: int | None = None
    attention_per_slot: bool = False
    lookahead: bool = False
    query_lookahead: bool | None = None  # the settle's lookahead (None = ``lookahead``)
    query_rounds: int = 1
    query_cooldown: int | None = None
    query_similarity: float = 0.0
    query_scorer: str = "similarity"  # the blend's query scorer: ``similarity`` or ``lexical``
    query_follow: int = 0  # blocks after an entry's span a lexical settle scorer also reads
    query_idf_power: float = 1.0  # a lexical settle scorer's IDF exponent
    query_max_df: int | None = None  # a lexical settle scorer ignores query tokens more blocks than this hold
    query_rebuild: str = (
        "off"  # the settle starts from the stream's WC (off) or a fresh one (recent / coarsest)
    )
    query_tau_expand: float | None = None  # the settle's expand threshold (None = the allocator's)
    query_churn_guard: bool = True  # False: the settle fills the slots the allocator's churn guard keeps free
    # weight of the recency ramp's z-scores in the settle's blend (tree_recency and lexical aside)
    query_recency: float = 0.0
    # with an e2e adapter: score the readers of raw tokens only (full context, recency, sink_recent) on the base
    # without it, i.e. the frozen LM as it ships against MegaContext with its adapter (default: one adapted model)
    plain_baselines: bool = False

    def check(self) -> None:
        """Reject impossible shapes with one line before anything is loaded."""
        if self.block_size < 2:
            raise EvalError(f"block_size: must be >= 2, got {self.block_size}")
        if self.depth < 1:
            raise EvalError(f"depth: must be >= 1, got {self.depth}")
        if self.budget < self.block_size:
            raise EvalError(f"budget: {self.budget} is smaller than one block (block_size={self.block_size})")
        if self.query_rounds < 1:
            raise EvalError(f"query_rounds: must be >= 1, got {self.query_rounds}")
        if self.query_cooldown is not None and self.query_cooldown < 0:
            raise EvalError(f"query_cooldown: must be >= 0, got {self.query_cooldown}")
        if not self.query_similarity >= 0:
            raise EvalError(f"query_similarity: must be >= 0, got {self.query_similarity}")
        if not self.query_recency >= 0:
            raise EvalError(f"query_recency: must be >= 0, got {self.query_recency}")
        if self.query_follow < 0:
            raise EvalError(f"query_follow: must be >= 0, got {self.query_follow}")
        if self.query_max_df is not None and self.query_max_df < 1:
            raise EvalError(f"query_max_df: must be >= 1 or None, got {self.query_max_df}")
        if self.query_tau_expand is not None and not math.isfinite(self.query_tau_expand):
            raise EvalError(f"query_tau_expand: must be a finite number or None, got {self.query_tau_expand}")
        if self.query_rebuild not in QUERY_REBUILDS:
            raise EvalError(
                f"query_rebuild: must be one of {', '.join(QUERY_REBUILDS)}, got {self.query_rebuild!r}"
            )
        if not self.query_idf_power > 0:
            raise EvalError(f"query_idf_power: must be > 0, got {self.query_idf_power}")
        if self.query_scorer not in QUERY_SCORERS:
            raise EvalError(f"query_scorer: must be {' or '.join(QUERY_SCORERS)}, got {self.query_scorer!r}")


def settings_from_config(cfg: Any) -> SessionSettings:
    """Map a :class:`~mchar.config.RootConfig` onto :class:`SessionSettings`."""
    a, t, e = cfg.allocator, cfg.tree, cfg.eval
    return SessionSettings(
        budget=int(a.budget),
        block_size=int(t.block_size),
        depth=int(t.depth),
        refocus_every=e.refocus_every or a.refocus_every,
        position_mode=t.position_mode,
        gist_dtype=t.gist_dtype,
        tau_expand=a.tau_expand,
        tau_collapse=a.tau_collapse,
        fill_budget=a.fill_budget,
        group_score=a.group_score,
        max_edits=a.n_diff,
        cooldown=a.cooldown,
        protect_tokens=a.protect_recent,
        stochastic=a.stochastic,
        top_k=a.top_k,
        temperature=a.temperature,
        seed=int(cfg.seed),
        sink_blocks=int(e.sink_blocks),
        oracle_horizon=e.oracle_horizon,
        attention_queries=a.attention_queries,
        attention_layer=a.attention_layer,
        attention_per_slot=bool(a.attention_per_slot),
        lookahead=bool(a.lookahead),
        query_lookahead=None if a.query_lookahead is None else bool(a.query_lookahead),
        query_rounds=int(a.query_rounds),
        query_cooldown=None if a.query_cooldown is None else int(a.query_cooldown),
        query_similarity=float(a.query_similarity),
        query_scorer=str(a.query_scorer),
        query_follow=int(a.query_follow),
        query_idf_power=float(a.query_idf_power),
        query_max_df=None if a.query_max_df is None else int(a.query_max_df),
        query_rebuild=str(a.query_rebuild),
        query_tau_expand=None if a.query_tau_expand is None else float(a.query_tau_expand),
        query_churn_guard=bool(a.query_churn_guard),
        query_recency=float(a.query_recency),
        plain_baselines=bool(e.plain_baselines),
    )


FULL = "full"  # the plain base over the whole prompt (the reference), not a focus policy
RAW_READERS = (FULL, "recency", "sink_recent")  # feed the base raw tokens only, never a gist


def check_policy(name: str) -> None:
    if name not in POLICY_NAMES:
        raise EvalError(f"policy: unknown {name!r} (choose from {', '.join(POLICY_NAMES)})")


@dataclass
class EvalComponents:
    """Loaded base + nets and the settings every session is built with."""

    base: Any
    tokenizer: Any
    gistnet: torch.nn.Module
    settings: SessionSettings
    lensnet: torch.nn.Module | None = None
    gistnet_trained: bool = False
    sources: dict[str, str] = field(default_factory=dict)
    # the e2e adapter's wrappers on the base, when one is loaded (``reading`` switches them off per policy)
    lora_layers: list[Any] = field(default_factory=list)

    def reading(self, policy: str) -> Any:
        """A context in which the base reads as ``policy`` should: without the e2e adapter for a raw-token reader
        when ``settings.plain_baselines`` is on, else as loaded."""
        from contextlib import nullcontext

        from mchar.core.lora import lora_disabled

        if self.settings.plain_baselines and self.lora_layers and policy in RAW_READERS:
            return lora_disabled(self.lora_layers)
        return nullcontext()

    def unavailable(self, policy: str) -> str | None:
        """Why ``policy`` cannot run with these components (None = it can)."""
        if policy == FULL:
            return None
        check_policy(policy)
        if policy == "lensnet" and self.lensnet is None:
            return "no trained LensNet (run stage lensnet or pass lensnet=<dir>)"
        return None

    def gist_fn(self, x: torch.Tensor, level: int) -> torch.Tensor:
        with torch.no_grad():
            return self.gistnet(x, level)

    def make_tree(self) -> Any:
        from mchar.core.tree import MegaContextTree

        s = self.settings
        return MegaContextTree.in_memory(
            s.block_size, s.depth, self.base.hidden_size, self.base.embed, self.gist_fn, dtype=s.gist_dtype
        )

    def make_allocator(self, relative_scores: bool = False) -> Any:
        """The session allocator; a policy whose scores are only relative (``Policy.relative_scores``) fills the
        budget when ``fill_budget`` is on (``FocusAllocator(fill_budget=True)``)."""
        from mchar.core.allocator import FocusAllocator

        s = self.settings
        return FocusAllocator(
            tau_expand=s.tau_expand,
            tau_collapse=s.tau_collapse,
            fill_budget=s.fill_budget and relative_scores,
            group_score=s.group_score,
            max_edits=s.max_edits,
            cooldown=s.cooldown,
            protect_tokens=s.protect_tokens,
            stochastic=s.stochastic,
            top_k=s.top_k,
            temperature=s.temperature,
            seed=s.seed,
        )

    def make_policy(self, name: str, lookahead: bool | None = None, **overrides: Any) -> Any:
        """``name``'s score source; ``lookahead`` (default: the settings') applies to content scorers only;
        ``overrides`` replace the settings' keyword arguments for it."""
        from mchar.core.lookahead import CONTENT_POLICIES
        from mchar.core.policies import make_policy

        why = self.unavailable(name)
        if why:
            raise EvalError(f"policy {name!r} is unavailable: {why}")
        s = self.settings
        kwargs: dict[str, Any] = {
            "sink_recent": {"sink_blocks": s.sink_blocks},
            "random": {"seed": s.seed},
            "lensnet": {"lensnet": self.lensnet},
            "attention": {
                "base_lm": self.base,
                "query_tokens": s.attention_queries,
                "layer": s.attention_layer,
                "per_slot": s.attention_per_slot,
            },
            "oracle": {"base_lm": self.base, "horizon": s.oracle_horizon},
        }.get(name, {}) | overrides
        look = s.lookahead if lookahead is None else lookahead
        return make_policy(name, lookahead=look and name in CONTENT_POLICIES, **kwargs)

    def session(self, policy: str, budget: int | None = None) -> Any:
        """A fresh, empty session for ``policy`` at ``budget`` (default: the settings' budget)."""
        from mchar.core.session import MegaContextSession

        s = self.settings
        pol = self.make_policy(policy)
        return MegaContextSession(
            self.base,
            self.make_tree(),
            self.make_allocator(relative_scores=pol.relative_scores),
            pol,
            int(budget or s.budget),
            refocus_every=s.refocus_every or s.block_size,
            position_mode=s.position_mode,
            query_rounds=s.query_rounds,
            query_cooldown=s.query_cooldown,
            query_policy=self.query_policy(pol),
            query_rebuild=s.query_rebuild,
            query_tau_expand=s.query_tau_expand,
            query_churn_guard=s.query_churn_guard,
        )

    def query_policy(self, policy: Any) -> Any:
        """The settle's scores for ``policy`` (None = its streaming scores): blended with query similarity when
        ``query_similarity`` > 0 (scored by ``query_scorer``; when lexical, reading ``query_follow`` blocks ahead with IDF
        to the power ``query_idf_power``, and the ``lexical`` policy then settles on that scorer alone) and the policy
        ranks by relative scores (truncation and fixed-cover baselines settle as they stream), plus ``query_recency``
        x the recency ramp (not for ``tree_recency``, whose own scores are that ramp, nor ``lexical``, whose settle
        already fills newest first), and with ``query_lookahead`` when it differs from the streaming lookahead."""
        from mchar.core.lookahead import CONTENT_POLICIES
        from mchar.core.policies import QueryBlendPolicy

        s = self.settings
        look = s.lookahead if s.query_lookahead is None else s.query_lookahead
        relook = look != s.lookahead and policy.name in CONTENT_POLICIES
        settle = self.make_policy(policy.name, lookahead=look) if relook else policy
        w = s.query_similarity
        if not w or not QueryBlendPolicy.can_blend(settle):
            return settle if relook else None
        lexical = s.query_scorer == "lexical"
        sharp = (
            {"follow": s.query_follow, "idf_power": s.query_idf_power, "max_df": s.query_max_df}
            if lexical
            else {}
        )
        query = self.make_policy(s.query_scorer, lookahead=look, **sharp)
        # blending with itself: settle on the scorer's settle-time form, if that differs from its streaming one
        if settle.name == s.query_scorer:
            new = lexical and (s.query_follow != 0 or s.query_idf_power != 1.0 or s.query_max_df is not None)
            return query if relook or new else None
        recency = 0.0 if settle.name == "tree_recency" else s.query_recency
        return QueryBlendPolicy(settle, query, w, recency)

    def describe(self) -> dict[str, Any]:
        """What was loaded, for results JSON and tags."""
        return {
            "base": self.sources.get("base", ""),
            "gistnet": self.sources.get("gistnet", ""),
            "gistnet_trained": self.gistnet_trained,
            "lensnet": self.sources.get("lensnet", ""),
            "lensnet_trained": self.lensnet is not None,
            "lora": self.sources.get("lora", ""),
            "plain_baselines": bool(self.settings.plain_baselines and self.lora_layers),
            "device": str(self.base.device),
        }


def export_dir(result: Any) -> Path | None:
    """The exported weights directory inside a stage result (a dict, a path, or None)."""
    if result is None:
        return None
    if isinstance(result, str | Path):
        p = Path(result)
        return p if (p / "config.json").is_file() else None
    if isinstance(result, dict):
        for key in _EXPORT_KEYS:
            value = result.get(key)
            if value and (Path(value) / "config.json").is_file():
                return Path(value)
    return None


def e2e_export(result: Any, part: str) -> Path | None:
    """The ``part`` ("gistnet" / "lensnet") of an e2e export: a directory holding ``<part>/``, or a stage summary
    whose export directory does. Without this a ``stages=[e2e, eval]`` run silently evaluated the nets from
    *before* the e2e fine-tuning."""
    roots = [result[k] for k in _EXPORT_KEYS if result.get(k)] if isinstance(result, dict) else [result]
    return next((found for r in roots if r and (found := export_dir(Path(r) / part))), None)


def check_export(path: str | Path, net: str, key: str | None = None) -> Path:
    """``path`` as an exported ``net`` ("GistNet"/"LensNet") directory; ``key`` names the setting it came from."""
    from safetensors import safe_open

    from mchar.core.gistnet import WEIGHTS_NAME, read_export_config

    p = Path(path)
    what = key or net.lower()
    if not (p / "config.json").is_file():
        raise EvalError(f"{what}: {str(p)!r} is not an exported {net} directory (no config.json)")
    try:  # the config parses and the weights' header reads: a broken export stops before any work
        read_export_config(p)
        with safe_open(str(p / WEIGHTS_NAME), framework="pt"):
            pass
    except ValueError as err:
        raise EvalError(f"{what}: {err}") from None
    except Exception as err:  # safetensors' own error type for a missing or corrupt file
        raise EvalError(f"{what}: {p / WEIGHTS_NAME}: unreadable ({first_line(err)})") from None
    return p


def load_gistnet(
    path: str | Path | None, base: Any, settings: SessionSettings
) -> tuple[torch.nn.Module, bool, str]:
    """(net, trained, source): the exported GistNet at ``path``, or an untrained mean-pool one."""
    from mchar.core.gistnet import MeanPoolGistNet, from_pretrained

    if path:
        p = check_export(path, "GistNet")
        try:
            net = from_pretrained(p, map_location=base.device)
        except ValueError as err:
            raise EvalError(f"gistnet: {err}") from None
        if net.d_model != base.hidden_size or net.block_size != settings.block_size:
            raise EvalError(
                f"gistnet: {p} was built for d_model={net.d_model}, block_size={net.block_size}; the base has "
                f"hidden_size={base.hidden_size} and tree.block_size={settings.block_size}"
            )
        if net.max_level < settings.depth:
            raise EvalError(f"gistnet: {p} serves levels <= {net.max_level}, tree.depth={settings.depth}")
        return net.eval(), True, str(p)
    net = MeanPoolGistNet(
        base.hidden_size, settings.block_size, max_level=settings.depth, out_scale=base.embedding_rms
    )
    return net.to(base.device).eval(), False, "untrained mean-pool GistNet (no trained GistNet given)"


def load_lensnet(
    path: str | Path | None, base: Any, settings: SessionSettings
) -> tuple[torch.nn.Module | None, str]:
    """(net or None, source)."""
    from mchar.core.lensnet import from_pretrained as load_export

    if not path:
        return None, "none"
    p = check_export(path, "LensNet")
    try:
        net = load_export(p, map_location=base.device)
    except ValueError as err:
        raise EvalError(f"lensnet: {err}") from None
    if net.d_model != base.hidden_size:
        raise EvalError(
            f"lensnet: {p} expects d_model={net.d_model}, the base has hidden_size={base.hidden_size}"
        )
    return net.eval(), str(p)


def load_components(
    base: str | Path | Any,
    settings: SessionSettings,
    gistnet: str | Path | None = None,
    lensnet: str | Path | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    tokenizer: Any = None,
    lora: str | Path | None = None,
) -> EvalComponents:
    """Load (or wrap) the base and the nets; ``base`` is a directory / hub id or a ready ``FrozenBaseLM``.

    ``lora``: a directory holding an e2e export's ``lora.safetensors`` + ``lora.json``; the adapter is applied to the
    base for *every* policy and the full-context reference (one model, so the comparison stays at equal footing)."""
    from mchar.base.adapter import FrozenBaseLM

    settings.check()
    if isinstance(base, str | Path):
        frozen = FrozenBaseLM.from_pretrained(base, dtype=dtype, device=device)
        source = str(base)
    else:
        frozen, source = base, getattr(base, "name_or_path", type(base).__name__)
    tok = tokenizer if tokenizer is not None else getattr(frozen, "tokenizer", None)
    if tok is None:
        raise EvalError(f"base: {source!r} has no tokenizer (save one next to the model)")
    sources = {"base": source}
    lora_layers: list[Any] = []
    if lora:
        from mchar.core.lora import load_lora

        try:
            lora_layers = load_lora(frozen.model, lora)
        except ValueError as err:
            raise EvalError(str(err)) from None
        sources["lora"] = str(lora)
    g, trained, g_src = load_gistnet(gistnet, frozen, settings)
    ln, l_src = load_lensnet(lensnet, frozen, settings)
    if not trained:
        log.warning("evaluation uses an untrained mean-pool GistNet: gists are block means, not learned")
    return EvalComponents(
        base=frozen,
        tokenizer=tok,
        gistnet=g,
        settings=settings,
        lensnet=ln,
        gistnet_trained=trained,
        sources=sources | {"gistnet": g_src, "lensnet": l_src},
        lora_layers=lora_layers,
    )


def run_exports(
    cfg: Any,
    results: dict[str, Any],
    gistnet: str | Path | None = None,
    lensnet: str | Path | None = None,
    artifacts_dir: str | Path | None = None,
) -> dict[str, Path | None]:
    """Which GistNet / LensNet / LoRA exports a pipeline run evaluates (None = none found): ``eval.gistnet_dir`` /
    ``eval.lensnet_dir``, this run's results, or an earlier run's exports in ``<artifacts_dir>/{e2e,gistnet,lensnet}/
    <name>`` (so ``mchar eval`` alone finds them). Reads no weights, so a caller can refuse a request before loading.
    """
    if artifacts_dir is not None:  # this run's results first, else the exports an earlier run left
        results = {s: Path(artifacts_dir) / s / cfg.name for s in ("gistnet", "lensnet", "e2e")} | results
    e2e = results.get("e2e")
    e2e_gist = e2e_export(e2e, "gistnet")
    chosen_lens = lensnet or cfg.eval.lensnet_dir or e2e_export(e2e, "lensnet")
    ln = chosen_lens or export_dir(results.get("lensnet"))
    # a LensNet this run trained over another run's GistNet (lensnet.gistnet_dir) is scored over that GistNet: it
    # learned that GistNet's gists, and this run has no GistNet of its own (it used to get the mean-pool stand-in)
    lens_result = results.get("lensnet")
    lens_gist = lens_result.get("gistnet_dir") if isinstance(lens_result, dict) and not chosen_lens else None
    g = gistnet or cfg.eval.gistnet_dir or e2e_gist or lens_gist or export_dir(results.get("gistnet"))
    # an e2e LoRA adapter belongs to the GistNet it was trained with: it comes along exactly when that GistNet does
    from mchar.core.lora import has_lora

    lora = e2e_gist.parent if e2e_gist and Path(g) == e2e_gist and has_lora(e2e_gist.parent) else None
    return {
        "gistnet": Path(g) if g else None,
        "lensnet": Path(ln) if ln else None,
        "lora": lora,
    }


def components_from_run(
    cfg: Any,
    results: dict[str, Any],
    base_dir: str | Path,
    gistnet: str | Path | None = None,
    lensnet: str | Path | None = None,
    artifacts_dir: str | Path | None = None,
    device: str = "cpu",
) -> EvalComponents:
    """Components for a pipeline run, from the exports :func:`run_exports` finds."""
    found = run_exports(cfg, results, gistnet, lensnet, artifacts_dir)
    return load_components(
        base_dir,
        settings_from_config(cfg),
        gistnet=found["gistnet"],
        lensnet=found["lensnet"],
        dtype=cfg.model.dtype,
        device=device,
        lora=found["lora"],
    )
