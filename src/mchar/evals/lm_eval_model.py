"""lm-eval model ``mchar``: every request runs through a fresh MegaContext session for one policy at one budget.

``lm_eval --model mchar --model_args base=<dir>,gistnet=<dir>,lensnet=<dir>,policy=recency,budget=256,
block_size=32,depth=2 --tasks mchar_passkey_512 --include_path evals/tasks`` (an e2e export's LoRA adapter, if any:
``lora=<the export dir>``, next to ``gistnet=<the export dir>/gistnet``)

* ``loglikelihood``: the context is streamed into the session (refocus every ``refocus_every`` tokens), then the
  continuation is fed token by token through the session (so ``is_greedy`` is exact and the WC keeps
  refocusing if the continuation is long).
* ``loglikelihood_rolling``: the whole document is streamed through one session, never chopped into windows;
  each chunk is scored before it is ingested. The first token is predicted from the EOT token, as lm-eval does.
* ``generate_until``: greedy (or sampled) decoding through the session's KV cache until a stop string,
  the EOT token or ``max_gen_toks``.

Both ``loglikelihood`` and ``generate_until`` refocus once at the end of the context (``refocus_pending``), so
the policy has seen the whole question before the first answer token.

Positions are the true token positions, so a base with a learned position table (GPT-2) cannot go past its
``n_positions`` at any budget; ``budget=0`` (or ``policy=full``) means plain full context, which is bounded by
the base's maximum positions. Both limits fail with one clear line before any forward runs.
"""

from __future__ import annotations

from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from mchar.evals.components import (
    FULL,
    POLICY_NAMES,
    EvalComponents,
    EvalError,
    SessionSettings,
    check_policy,
    load_components,
)
from mchar.evals.perplexity import stream_ingest, stream_score


def _as_int(value: Any, default: int | None = None) -> int | None:
    if value is None or value == "" or value == "None":
        return default
    return int(value)


def _coerce(default: Any, value: Any) -> Any:
    """CLI ``model_args`` values arrive as strings/numbers: cast them to the setting's type."""
    if isinstance(default, bool):
        return str(value).lower() in {"1", "true", "yes"}
    if default is None:
        return _as_int(value)
    return type(default)(value)


def _pick(logits: torch.Tensor, greedy: bool, temperature: float, gen: torch.Generator) -> int:
    if greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / max(temperature, 1e-6), -1)
    return int(torch.multinomial(probs, 1, generator=gen))


@register_model("mchar")
class MegaContextLM(LM):
    """A frozen base LM with MegaContext memory, as an lm-eval ``LM`` (see the module docstring)."""

    def __init__(
        self,
        base: Any = "",
        gistnet: str = "",
        lensnet: str = "",
        lora: str = "",
        policy: str = "recency",
        budget: int | str | None = 256,
        block_size: int | str = 32,
        depth: int | str = 2,
        refocus_every: int | str | None = None,
        position_mode: str = "centre",
        gist_dtype: str = "float32",
        dtype: str = "float32",
        device: str = "cpu",
        max_gen_toks: int | str = 64,
        seed: int | str = 0,
        protect_tokens: int | str | None = None,
        components: EvalComponents | None = None,
        **allocator: Any,
    ) -> None:
        super().__init__()
        policy = str(policy)
        full = policy == FULL or not _as_int(budget, 0)
        if not full:
            check_policy(policy)
        if components is None:
            if not base:
                raise EvalError("mchar model: base=<model dir or hub id> is required")
            bs = int(block_size)
            settings = SessionSettings(
                budget=_as_int(budget, 0) or bs,
                block_size=bs,
                depth=int(depth),
                refocus_every=_as_int(refocus_every),
                position_mode=str(position_mode),
                gist_dtype=str(gist_dtype),
                protect_tokens=_as_int(protect_tokens, 2 * bs) or 0,
                seed=int(seed),
                **{
                    k: _coerce(getattr(SessionSettings, k), v)
                    for k, v in allocator.items()
                    if hasattr(SessionSettings, k)
                },
            )
            unknown = [k for k in allocator if not hasattr(SessionSettings, k)]
            if unknown:
                raise EvalError(f"mchar model: unknown model_args {', '.join(sorted(unknown))}")
            settings.check()
            components = load_components(
                base,
                settings,
                gistnet=gistnet or None,
                lensnet=lensnet or None,
                dtype=str(dtype),
                device=str(device),
                lora=lora or None,
            )
        self.components = components
        self.policy = "recency" if full else policy
        self.full = full
        why = None if full else components.unavailable(policy)
        if why:
            raise EvalError(f"mchar model: policy {policy!r} is unavailable: {why}")
        base_lm = components.base
        self.max_positions: int | None = getattr(base_lm, "max_positions", None)
        self.budget = int(self.max_positions or 0) if full else components.settings.budget
        if full and not self.budget:
            raise EvalError(
                "mchar model: budget=0 (full context) needs a base with a known maximum of positions"
            )
        self.max_gen_toks = int(max_gen_toks)
        self.seed = int(seed)
        self.tok = components.tokenizer
        eot = getattr(self.tok, "eos_token_id", None)
        self.eot_token_id: int = int(eot if eot is not None else 0)

    # ------------------------------------------------------------------ helpers

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tok, "name_or_path", "mchar")).replace("/", "__")

    def tok_encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def tok_decode(self, ids: list[int]) -> str:
        return str(self.tok.decode(ids, skip_special_tokens=False))

    def check_length(self, n_tokens: int, what: str) -> None:
        """Refuse requests whose positions the base cannot represent (before any forward)."""
        limit = self.max_positions
        if limit is None:
            return
        learned = bool(getattr(self.components.base, "learned_positions", False))
        if (self.full or learned) and n_tokens > limit:
            mode = "full context" if self.full else f"budget {self.budget} (true positions are kept)"
            raise EvalError(
                f"{what}: {n_tokens} tokens exceed the base's {limit} positions; the base cannot score it with {mode}"
            )

    def new_session(self) -> Any:
        return self.components.session(self.policy, budget=self.budget)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation ids; boundary whitespace moves into the continuation (lm-eval convention)."""
        n_space = len(context) - len(context.rstrip())
        if n_space:
            continuation, context = context[-n_space:] + continuation, context[:-n_space]
        whole = self.tok_encode(context + continuation)
        ctx = self.tok_encode(context)
        if whole[: len(ctx)] == ctx:
            return ctx, whole[len(ctx) :]
        return ctx, self.tok_encode(continuation)

    # ------------------------------------------------------------------ lm-eval API

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self._encode_pair(*req.args) for req in requests]
        for ctx, cont in pairs:
            self.check_length(max(1, len(ctx)) + len(cont), "loglikelihood request")
        out = []
        for (ctx, cont), req in zip(pairs, requests, strict=True):
            ctx = ctx or [self.eot_token_id]
            res = self._loglikelihood_tokens(ctx, cont)
            out.append(res)
            self.cache_hook.add_partial("loglikelihood", req.args, res)
        return out

    @torch.no_grad()
    def _loglikelihood_tokens(self, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
        session = self.new_session()
        cont_t = torch.tensor(cont, dtype=torch.long)
        stream_ingest(session, torch.tensor(ctx, dtype=torch.long), future=cont_t)
        session.refocus_pending()
        total, greedy = 0.0, True
        h = session.refocus_every
        for i, tok in enumerate(cont):
            logits = session.next_token_logits().float()
            total += float(torch.log_softmax(logits, -1)[tok])
            greedy = greedy and int(logits.argmax()) == tok
            if i + 1 < len(cont):
                session.future_tokens = cont_t[i + 1 : i + 1 + h]
                session.ingest([tok])
        return total, greedy

    @torch.no_grad()
    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        docs = [self.tok_encode(req.args[0]) for req in requests]
        for ids in docs:
            self.check_length(len(ids) + 1, "loglikelihood_rolling request")
        out = []
        for ids, req in zip(docs, requests, strict=True):
            if not ids:
                out.append(0.0)
                continue
            session = self.new_session()
            ids_t = torch.tensor(ids, dtype=torch.long)
            stream_ingest(session, torch.tensor([self.eot_token_id]), future=ids_t)
            total = float(stream_score(session, ids_t).sum())
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return out

    @torch.no_grad()
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        prepared = []
        for req in requests:
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_gen = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            ctx = self.tok_encode(context) or [self.eot_token_id]
            self.check_length(len(ctx) + max_gen, "generate_until request")
            prepared.append((ctx, until, max_gen, kwargs))
        out = []
        for (ctx, until, max_gen, kwargs), req in zip(prepared, requests, strict=True):
            text = self._generate(ctx, until, max_gen, kwargs)
            out.append(text)
            self.cache_hook.add_partial("generate_until", req.args, text)
        return out

    def _generate(self, ctx: list[int], until: list[str], max_gen: int, kwargs: dict[str, Any]) -> str:
        return self.generate_ids(ctx, until, max_gen, kwargs)[0]

    def generate_ids(
        self, ctx: list[int], until: list[str], max_gen: int, kwargs: dict[str, Any]
    ) -> tuple[str, Any]:
        """The continuation of ``ctx`` (cut at the first ``until`` string) and the session it was generated in,
        whose working context shows where the focus ended (``mchar generate`` prints it)."""
        session = self.new_session()
        stream_ingest(session, torch.tensor(ctx, dtype=torch.long))
        session.future_tokens = torch.zeros(0, dtype=torch.long)  # the future is unknown while generating
        session.refocus_pending()  # look at the question before answering it
        temperature = float(kwargs.get("temperature", 0.0) or 0.0)
        greedy = not kwargs.get("do_sample", False) or temperature <= 0
        gen = torch.Generator().manual_seed(self.seed)
        new: list[int] = []
        text = ""
        for _ in range(max_gen):
            tok = _pick(session.next_token_logits().float().cpu(), greedy, temperature, gen)
            if tok == self.eot_token_id:
                break
            new.append(tok)
            text = self.tok_decode(new)
            hits = [text.find(u) for u in until if u and u in text]
            if hits:
                return text[: min(hits)], session
            session.ingest([tok])
        return text, session


__all__ = ["FULL", "POLICY_NAMES", "MegaContextLM"]
