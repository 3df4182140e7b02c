"""Training-step costs of the MegaContext side nets, side by side in one run (prints ONE JSON object).

1. LensNet: how much of a training step is *loss construction* (sampling the WC and candidates, building the
   stacked variant rows, the pairwise loss) vs model compute (gists, the one batched base forward, LensNet
   forward/backward, optimizer). Upstream spent seconds per step here; target <= 10 %.
2. GistNet: steps/s under a Lightning Trainer vs a plain PyTorch loop, same module weights, same batches, same
   step function (``step_loss``); repeats alternate the two sides; medians compared. Target >= 0.95x.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Any

import lightning as L
import torch

from mchar.base.adapter import FrozenBaseLM, tiny_causal_lm
from mchar.bench.common import at_least, device_option, emit, sync
from mchar.bench.loop_timing import alternate, lightning_stamps, paired_ratio, paired_ratios, steps_per_second
from mchar.config import LENSNET_UTILITIES
from mchar.core.gistnet import GistNet
from mchar.core.lensnet import LensNet
from mchar.lit.gistnet_module import GistNetModule
from mchar.lit.lensnet_module import LensNetModule

# LensNetModule's phase timings that are loss construction: "sample_wc" is the step's whole plan (WC, candidates,
# variant rows, one copy to the device: mchar.lit.lens_plan), "build_variants" the gather of the rows' embeddings,
# "loss" the candidates' scores picked and the pairwise loss
CONSTRUCTION = ("sample_wc", "build_variants", "loss")


def _plain(module: L.LightningModule, batches: list[torch.Tensor], device: torch.device) -> list[float]:
    module.to(device)
    opt = module.configure_optimizers()["optimizer"]
    module.train()
    stamps = []
    for step, ids in enumerate(batches):
        loss, _ = module.step_loss(ids.to(device), step)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        stamps.append(time.perf_counter())
    return stamps


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="mchar bench train-step", description=__doc__)
    ap.add_argument("--hidden", type=at_least(1), default=64)
    ap.add_argument("--vocab", type=at_least(1), default=512)
    ap.add_argument("--layers", type=at_least(1), default=2)
    ap.add_argument("--block-size", type=at_least(2), default=8)
    ap.add_argument("--depth", type=at_least(1), default=2)
    ap.add_argument("--window", type=at_least(1), default=256)
    ap.add_argument("--horizon", type=at_least(1), default=16)
    ap.add_argument("--batch", type=at_least(1), default=4)
    ap.add_argument("--budget", type=at_least(1), default=64)
    ap.add_argument("--candidates", type=at_least(1), default=16)
    # 48 steps x 9 alternating repeats: at 12 x 5 one drifting repeat of this ~25-ms step moved the median ratio by
    # 0.05 (0.93-1.00 over runs of one commit); the longer default costs ~30 s more on 2 CPU cores
    ap.add_argument("--steps", type=at_least(1), default=48)
    ap.add_argument("--warmup", type=at_least(0), default=2)
    ap.add_argument("--repeats", type=at_least(1), default=9)
    ap.add_argument("--threads", type=at_least(0), default=2)
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (both sides, fp32)")
    ap.add_argument(
        "--utility",
        choices=LENSNET_UTILITIES,
        default="sampled",
        help="LensNet's training target (expected / mixed add the full-context teacher forward)",
    )
    args = ap.parse_args(argv)
    device = device_option(ap, args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = FrozenBaseLM(tiny_causal_lm("llama", args.vocab, args.hidden, layers=args.layers).to(device))
    k, depth, d = args.block_size, args.depth, args.hidden
    gen = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(0, args.vocab, (args.batch, args.window), generator=gen) for _ in range(args.steps)
    ]

    def gistnet() -> GistNet:
        torch.manual_seed(1)
        return GistNet(d, k, n_layers=2, n_heads=4, width=d, max_level=depth)

    # ---------------------------------------------------------------- LensNet loss-construction share
    torch.manual_seed(2)
    lens = LensNetModule(
        base,
        gistnet(),
        LensNet(  # with the default LensNet's inputs (query similarity, recency prior, lexical score)
            d,
            width=32,
            n_layers=2,
            n_heads=4,
            max_level=depth,
            query_tokens=k,
            recency_prior=0.5,
            lexical_tokens=k,
            lexical_prior=1.0,
        ),
        block_size=k,
        depth=depth,
        budget=args.budget,
        horizon=args.horizon,
        candidates=args.candidates,
        max_steps=args.steps,
        utility=args.utility,
    ).to(device)
    opt = lens.configure_optimizers()["optimizer"]
    lens.profile = True
    totals = []
    for step, ids in enumerate(batches):
        ids = ids.to(device)
        sync(device)
        t0 = time.perf_counter()
        loss, _ = lens.step_loss(ids, step)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        totals.append(time.perf_counter() - t0)
    w = args.warmup
    phase_ms = {n: 1e3 * statistics.median(v[w:]) for n, v in lens.timings.items()}
    construction = [sum(lens.timings[n][i] for n in CONSTRUCTION) for i in range(len(totals))][w:]
    shares = [c / t for c, t in zip(construction, totals[w:], strict=True)]
    lens_out = {
        "step_ms_median": 1e3 * statistics.median(totals[w:]),
        "construction_ms_median": 1e3 * statistics.median(construction),
        "construction_share_median": statistics.median(shares),
        "target_share_max": 0.10,
        "phase_ms_median": phase_ms,
        "variant_rows_per_step": args.batch * (1 + args.candidates),
        "base_forwards_per_step": 1,
    }
    lens_out["meets_target"] = lens_out["construction_share_median"] <= 0.10

    # ---------------------------------------------------------------- GistNet: Lightning vs plain loop
    proto = GistNetModule(
        base, gistnet(), block_size=k, depth=depth, horizon=args.horizon, warmup_steps=0, max_steps=args.steps
    )
    rates = alternate(
        {
            "plain": lambda: steps_per_second(_plain(copy.deepcopy(proto), batches, device), w),
            "lightning": lambda: steps_per_second(lightning_stamps(copy.deepcopy(proto), batches, device), w),
        },
        args.repeats,
    )
    plain, light = statistics.median(rates["plain"]), statistics.median(rates["lightning"])
    ratio = paired_ratio(rates)
    out = {
        "lensnet": lens_out,
        "gistnet": {
            "plain_steps_per_s": plain,
            "lightning_steps_per_s": light,
            "ratio": ratio,
            "ratio_of_medians": light / plain,
            "target_ratio_min": 0.95,
            "meets_target": ratio >= 0.95,
            "rates": rates,
            "paired_ratios": paired_ratios(rates),
        },
    }
    return emit("train-step", args, out)


if __name__ == "__main__":
    main()
