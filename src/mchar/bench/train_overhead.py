"""Base-LM training throughput under a Lightning Trainer vs a plain PyTorch loop, same model and batches.

Both sides run the identical step (forward, backward, AdamW step, zero_grad) on the same pre-generated batches
from the same initial weights; repeats alternate the two sides and the medians are compared.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from mchar.bench.common import at_least, emit
from mchar.bench.loop_timing import alternate, lightning_stamps, paired_ratio, paired_ratios, steps_per_second
from mchar.lit.base_lm import BaseLMModule


def _throughput(stamps: list[float], warmup: int, tokens_per_step: int) -> float:
    return tokens_per_step * steps_per_second(stamps, warmup)


def _plain(model: torch.nn.Module, batches: list[torch.Tensor], lr: float) -> list[float]:
    module = BaseLMModule(model, lr=lr, warmup_steps=0, max_steps=len(batches))
    opt = module.configure_optimizers()["optimizer"]
    stamps = []
    module.train()
    for ids in batches:
        loss = module._loss(ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        stamps.append(time.perf_counter())
    return stamps


def _lightning(model: torch.nn.Module, batches: list[torch.Tensor], lr: float) -> list[float]:
    module = BaseLMModule(model, lr=lr, warmup_steps=0, max_steps=len(batches))
    # Same optimizer as the plain loop (no scheduler): the comparison is about the loop, not the LR schedule.
    module.configure_optimizers = lambda: torch.optim.AdamW(  # type: ignore[method-assign]
        module.configure_optimizers_plain(), lr=lr, betas=(0.9, 0.95)
    )
    return lightning_stamps(module, batches)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="mchar bench train-overhead", description=__doc__)
    p.add_argument("--hidden", type=at_least(1), default=256)
    p.add_argument("--layers", type=at_least(1), default=4)
    p.add_argument("--vocab", type=at_least(1), default=8192)
    p.add_argument("--batch", type=at_least(1), default=8)
    p.add_argument("--seq", type=at_least(1), default=256)
    # 24 steps x 9 alternating repeats: at 12 x 5 the paired ratios of one run spread 0.91-1.04 on 2 CPU cores
    p.add_argument("--steps", type=at_least(1), default=24)
    p.add_argument("--warmup", type=at_least(0), default=2)
    p.add_argument("--repeats", type=at_least(1), default=9)
    p.add_argument("--seed", type=at_least(0), default=0)
    args = p.parse_args(argv)
    from mchar.base.adapter import tiny_causal_lm

    torch.manual_seed(args.seed)
    init = tiny_causal_lm(
        "llama",
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        layers=args.layers,
        heads=max(1, args.hidden // 64),
        seed=args.seed,
    )
    batches = [torch.randint(0, args.vocab, (args.batch, args.seq)) for _ in range(args.steps)]
    tokens = args.batch * args.seq
    rates = alternate(
        {
            "plain": lambda: _throughput(
                _plain(copy.deepcopy(init).train(), batches, 1e-3), args.warmup, tokens
            ),
            "lightning": lambda: _throughput(
                _lightning(copy.deepcopy(init).train(), batches, 1e-3), args.warmup, tokens
            ),
        },
        args.repeats,
    )
    plain, light = rates["plain"], rates["lightning"]
    result = {
        "model": {
            "hidden": args.hidden,
            "layers": args.layers,
            "vocab": args.vocab,
            "params": sum(p.numel() for p in init.parameters()),
        },
        "batch": [args.batch, args.seq],
        "steps": args.steps,
        "repeats": args.repeats,
        "plain_tokens_per_s": statistics.median(plain),
        "lightning_tokens_per_s": statistics.median(light),
        "plain_runs": plain,
        "lightning_runs": light,
        "ratio_lightning_over_plain": paired_ratio(rates),
        "ratio_of_medians": statistics.median(light) / statistics.median(plain),
        "paired_ratios": paired_ratios(rates),
        "target": ">= 0.95",
    }
    return emit("train-overhead", args, result)
