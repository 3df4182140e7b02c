"""Per-token decode latency and memory vs history length: MegaContext session vs the full-context base.

For each history length (multiples of the budget) both sides decode the same number of greedy tokens after the
same random prompt, one run each, side by side:

* ``mc``: :class:`~mchar.core.session.MegaContextSession` (GistNet tree, LensNet policy, greedy allocator, KV
  reuse up to the first edited slot);
* ``full``: the plain HF model with its own KV cache over the whole history (prefill in chunks, not timed).

Reported per length: median and mean per-token latency (the mean includes the periodic refocus recomputes),
KV-cache size, peak memory (CUDA: ``max_memory_allocated`` during decode; CPU: process max RSS, which only
grows). Plus the overhead share of GistNet + LensNet + allocator vs the base forward at 1x the budget (target
<= 10 %) and ``latency(64x) / latency(1x)`` for the session (target <= 1.15).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from dataclasses import astuple
from typing import Any

import torch
from torch import nn

from mchar.base.adapter import FrozenBaseLM, tiny_causal_lm
from mchar.bench.common import at_least, device_option, emit, sync
from mchar.core.allocator import FocusAllocator
from mchar.core.gistnet import make_gistnet
from mchar.core.lensnet import LensNet, LensNetEnsemble
from mchar.core.lexical import LexicalInput
from mchar.core.policies import LensNetPolicy
from mchar.core.session import MegaContextSession
from mchar.core.tree import MegaContextTree


class _Timed(nn.Module):
    """Wraps a module and accumulates its forward wall time (synchronised on CUDA)."""

    def __init__(self, inner: nn.Module, device: torch.device) -> None:
        super().__init__()
        self.inner, self.device, self.seconds = inner, device, 0.0
        self.tail_tokens = getattr(inner, "tail_tokens", None)
        lex = LexicalInput.of(inner)  # LensNetPolicy serves what the net reads
        for attr, value in zip(LexicalInput.ATTRS, astuple(lex), strict=True):
            setattr(self, attr, value)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        sync(self.device)
        t0 = time.perf_counter()
        out = self.inner(*args, **kwargs)
        sync(self.device)
        self.seconds += time.perf_counter() - t0
        return out


class _TimedPolicy:
    """Times ``policy.scores`` (features + LensNet) so allocator time can be separated from it."""

    def __init__(self, policy: Any) -> None:
        self.policy, self.seconds = policy, 0.0
        self.allows_drop = getattr(policy, "allows_drop", False)

    def scores(self, *args: Any) -> torch.Tensor:
        t0 = time.perf_counter()
        out = self.policy.scores(*args)
        self.seconds += time.perf_counter() - t0
        return out


def _kv_bytes(cache: Any) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


class _McSide:
    """One prefilled MegaContext session whose decode steps can be timed in rounds."""

    def __init__(
        self, base: FrozenBaseLM, prompt: torch.Tensor, args: argparse.Namespace, device: torch.device
    ) -> None:
        self.device = device
        torch.manual_seed(args.seed)
        self.gist = _Timed(
            make_gistnet(
                args.gistnet,
                d_model=base.hidden_size,
                block_size=args.block_size,
                max_level=args.depth,
                width=args.gist_width,
                out_scale=base.embedding_rms,
            )
            .to(device)
            .eval(),
            device,
        )
        members = [
            LensNet(  # the default LensNet's inputs: query similarity, the recency prior, the lexical score
                base.hidden_size,
                width=args.lens_width,
                max_level=args.depth,
                tail_tokens=args.block_size,
                query_tokens=args.block_size,
                recency_prior=0.5,
                lexical_tokens=args.block_size,
                lexical_prior=1.0,
            )
            for _ in range(args.lens_members)
        ]
        lens = members[0] if len(members) == 1 else LensNetEnsemble(members)
        self.lens = _Timed(lens.to(device).eval(), device)
        self.policy = _TimedPolicy(LensNetPolicy(self.lens))
        gist = self.gist
        tree = MegaContextTree.in_memory(
            args.block_size, args.depth, base.hidden_size, base.embed, lambda x, level: gist(x, level)
        )
        # filling: the harness's budget-filling mode (never collapse to leave slots empty), so every history length
        # decodes over a budget-sized WC; without it an untrained LensNet's negative scores shrink the 1x WC
        alloc = FocusAllocator(
            tau_expand=0.0,
            tau_collapse=0.0,
            fill_budget=args.fill_budget,
            max_edits=args.max_edits,
            cooldown=2,
            protect_tokens=args.block_size,
        )
        self.session = MegaContextSession(
            base,
            tree,
            alloc,
            self.policy,
            args.budget,
            refocus_every=args.block_size,
            profile=device.type == "cuda",
        )
        _reset_peak(device)
        with torch.no_grad():
            self.session.ingest(prompt)
            self.session.generate(args.block_size)  # prefill + one refocus period of warm-up (not timed)
        self.prefill_peak_mb = _peak_mb(device)
        self.session.stats.reset()
        self.gist.seconds = self.lens.seconds = self.policy.seconds = 0.0
        self.lat: list[float] = []

    def step(self, n: int) -> None:
        with torch.no_grad():
            for _ in range(n):
                sync(self.device)
                t0 = time.perf_counter()
                self.session.generate(1)
                sync(self.device)
                self.lat.append(time.perf_counter() - t0)

    def report(self) -> dict[str, Any]:
        s = self.session
        times = s.stats.times
        allocator_s = times.get("allocator", 0.0) + times.get("refocus", 0.0) - self.policy.seconds
        overhead = self.gist.seconds + self.policy.seconds + allocator_s
        return {
            "median_ms": 1e3 * statistics.median(self.lat),
            "mean_ms": 1e3 * statistics.mean(self.lat),
            "kv_cache_mb": _kv_bytes(s._cache) / 2**20,
            "peak_mem_mb": self.prefill_peak_mb,
            "wc_slots": int(s.wc.cost),
            "wc_entries": len(s.wc),
            "fed_slots_median": statistics.median(s.stats.fed_slots) if s.stats.fed_slots else 0,
            "fed_slots_mean": statistics.mean(s.stats.fed_slots) if s.stats.fed_slots else 0.0,
            "refocuses": s.stats.refocuses,
            "edits": s.stats.edits,
            "seconds": {
                "gistnet": self.gist.seconds,
                "lensnet_policy": self.policy.seconds,
                "lensnet_forward": self.lens.seconds,
                "allocator": allocator_s,
                "tree_ingest": times.get("tree", 0.0),
                "assemble": times.get("assemble", 0.0),
                "base_forward": times.get("base", 0.0),
                "decode_total": sum(self.lat),
            },
            "overhead_share": overhead / max(times.get("base", 0.0), 1e-12),
        }


class _FullSide:
    """The plain HF model with its own KV cache over the whole history (prefill in chunks, not timed)."""

    def __init__(
        self, model: nn.Module, prompt: torch.Tensor, args: argparse.Namespace, device: torch.device
    ) -> None:
        from transformers import DynamicCache

        self.model, self.device = model, device
        self.cache = DynamicCache()
        ids = prompt.to(device).unsqueeze(0)
        _reset_peak(device)
        with torch.no_grad():
            for s in range(0, ids.shape[1], args.prefill_chunk):
                out = model(
                    input_ids=ids[:, s : s + args.prefill_chunk], past_key_values=self.cache, use_cache=True
                )
        self.nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        self.step(4, record=False)
        self.prefill_peak_mb = _peak_mb(device)
        self.lat: list[float] = []

    def step(self, n: int, record: bool = True) -> None:
        with torch.no_grad():
            for _ in range(n):
                sync(self.device)
                t0 = time.perf_counter()
                out = self.model(input_ids=self.nxt, past_key_values=self.cache, use_cache=True)
                self.nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                sync(self.device)
                if record:
                    self.lat.append(time.perf_counter() - t0)

    def report(self) -> dict[str, Any]:
        return {
            "median_ms": 1e3 * statistics.median(self.lat),
            "mean_ms": 1e3 * statistics.mean(self.lat),
            "kv_cache_mb": _kv_bytes(self.cache) / 2**20,
            "peak_mem_mb": self.prefill_peak_mb,
        }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="mchar bench decode", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--hidden", type=at_least(1), default=256)
    p.add_argument("--layers", type=at_least(1), default=4)
    p.add_argument("--heads", type=at_least(1), default=4)
    p.add_argument("--vocab", type=at_least(1), default=8192)
    p.add_argument("--budget", type=at_least(1), default=512)
    p.add_argument("--block-size", type=at_least(2), default=32)
    p.add_argument("--depth", type=at_least(1), default=3)
    p.add_argument("--mults", default="1,4,16,64", help="history lengths as multiples of the budget")
    p.add_argument(
        "--new-tokens",
        type=at_least(1),
        default=64,
        help="timed decode tokens per length (2 refocus periods)",
    )
    p.add_argument(
        "--full-tokens",
        type=at_least(1),
        default=16,
        help="timed decode tokens per length for the full-context side (uniform cost, so fewer suffice)",
    )
    p.add_argument("--round", type=at_least(1), default=8, help="tokens per length per interleaved round")
    p.add_argument("--max-edits", type=at_least(0), default=4)
    p.add_argument(
        "--fill-budget",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="budget-filling allocator (the evaluation's mode for relative scores): a budget-sized WC at every length",
    )
    p.add_argument("--gistnet", default="transformer", choices=["transformer", "mean"])
    p.add_argument("--gist-width", type=at_least(1), default=64)
    p.add_argument("--lens-width", type=at_least(1), default=64)
    p.add_argument(
        "--lens-members",
        type=at_least(1),
        default=1,
        help="LensNets scoring as one ensemble (scripts/lensnet_ensemble.py's export); 1 = a single LensNet",
    )
    p.add_argument("--prefill-chunk", type=at_least(1), default=1024)
    p.add_argument("--no-full", action="store_true", help="skip the full-context side")
    p.add_argument("--seed", type=at_least(0), default=0)
    p.add_argument(
        "--threads",
        type=at_least(0),
        default=1,
        help="torch CPU threads while timing (1 avoids OpenMP spin-wait stalls on a shared CPU; 0 = leave as is)",
    )
    args = p.parse_args(argv)
    try:
        mults = [int(m) for m in args.mults.split(",")]
    except ValueError:
        p.error(f"--mults: need comma-separated integers, got {args.mults!r}")
    if min(mults) < 1:
        p.error(f"--mults: every multiple must be >= 1, got {args.mults!r}")
    if args.budget < args.block_size:
        p.error(f"--budget {args.budget} is smaller than one block (--block-size {args.block_size})")
    setup_threads = torch.get_num_threads()
    device = device_option(p, args.device)
    max_pos = max(mults) * args.budget + args.new_tokens + 2 * args.block_size + 64
    model = tiny_causal_lm(
        "llama",
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        layers=args.layers,
        heads=args.heads,
        max_positions=max_pos,
        seed=args.seed,
    ).to(device)
    base = FrozenBaseLM(model)
    gen = torch.Generator().manual_seed(args.seed)
    sides: list[tuple[int, _McSide, _FullSide | None]] = []
    for m in mults:
        prompt = torch.randint(0, args.vocab, (m * args.budget,), generator=gen)
        full = None if args.no_full else _FullSide(model, prompt, args, device)
        sides.append((m, _McSide(base, prompt, args, device), full))
    # Rounds interleave every length and both sides, so machine noise hits all of them alike.
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    rounds = max(1, args.new_tokens // args.round)
    full_round = max(1, -(-args.full_tokens // rounds))
    for r in range(rounds):
        for _, mc, full in sides:
            mc.step(args.round)
            if full is not None and r * full_round < args.full_tokens:
                full.step(min(full_round, args.full_tokens - r * full_round))
    rows = [
        {
            "mult": m,
            "history": m * args.budget,
            "mc": mc.report(),
            "full": None if full is None else full.report(),
        }
        for m, mc, full in sides
    ]
    torch.set_num_threads(setup_threads)
    first, last = rows[0]["mc"], rows[-1]["mc"]
    result = {
        "rows": rows,
        "overhead_share_at_budget": first["overhead_share"],
        "overhead_target": 0.10,
        "latency_ratio": last["median_ms"] / first["median_ms"],
        "latency_ratio_mean": last["mean_ms"] / first["mean_ms"],
        "latency_ratio_target": 1.15,
        "latency_ratio_mults": [mults[0], mults[-1]],
    }
    return emit("decode", args, result)


if __name__ == "__main__":
    main()
