"""Training-step costs of the MegaContext side nets, side by side in one run (prints ONE JSON object).

1. LensNet: how much of a training step is *loss construction* (sampling the WC and candidates, building the
   stacked variant rows, the pairwise loss) vs model compute (gists, the one batched base forward, LensNet
   forward/backward, optimizer). Upstream spent seconds per step here; target <= 10 %. Measured twice: with the
   plan (WC, candidates, variant rows) built inside the step, and prepared by ``--plan-workers`` DataLoader workers
   while the previous step runs (``lensnet.plan_workers``); then steps/s of the two, alternating repeats. A step's
   time includes waiting for its batch, so a worker that cannot keep up shows.
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
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch.utils.data import DataLoader

from mchar.base.adapter import FrozenBaseLM, tiny_causal_lm
from mchar.bench.common import at_least, device_option, emit, sync
from mchar.bench.loop_timing import alternate, lightning_stamps, paired_ratio, paired_ratios, steps_per_second
from mchar.core.gistnet import GistNet
from mchar.core.lensnet import LensNet
from mchar.lit.gistnet_module import GistNetModule
from mchar.lit.lensnet_module import LensNetModule
from mchar.lit.windows import StepBatches

CONSTRUCTION = ("sample_wc", "build_variants", "loss")


def _lens_steps(
    proto: LensNetModule, loader: DataLoader, device: torch.device, profile: bool
) -> tuple[list[float], dict[str, list[float]]]:
    """Per-step wall times (from the previous step's end, so waiting for the batch counts) and phase timings."""
    lens = copy.deepcopy(proto).to(device)
    lens.profile = profile
    opt = lens.configure_optimizers()["optimizer"]
    lens.train()
    times = []
    sync(device)
    last = time.perf_counter()
    for step, batch in enumerate(loader):
        batch = move_data_to_device(batch, device)
        loss, _ = lens.step_loss(batch, step)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        now = time.perf_counter()
        times.append(now - last)
        last = now
    return times, lens.timings


def _construction(times: list[float], timings: dict[str, list[float]], warmup: int) -> dict[str, Any]:
    phase_ms = {n: 1e3 * statistics.median(v[warmup:]) for n, v in timings.items()}
    construction = [sum(timings[n][i] for n in CONSTRUCTION) for i in range(len(times))][warmup:]
    shares = [c / t for c, t in zip(construction, times[warmup:], strict=True)]
    share = statistics.median(shares)
    return {
        "step_ms_median": 1e3 * statistics.median(times[warmup:]),
        "construction_ms_median": 1e3 * statistics.median(construction),
        "construction_share_median": share,
        "target_share_max": 0.10,
        "phase_ms_median": phase_ms,
        "meets_target": share <= 0.10,
    }


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
    ap.add_argument("--steps", type=at_least(1), default=12)
    ap.add_argument("--warmup", type=at_least(0), default=2)
    ap.add_argument("--repeats", type=at_least(1), default=5)
    ap.add_argument("--threads", type=at_least(0), default=2)
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (both sides, fp32)")
    ap.add_argument("--plan-workers", type=at_least(1), default=1, help="DataLoader workers preparing plans")
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
        LensNet(d, width=32, n_layers=2, n_heads=4, max_level=depth),
        block_size=k,
        depth=depth,
        budget=args.budget,
        horizon=args.horizon,
        candidates=args.candidates,
        max_steps=args.steps,
    ).to(device)
    windows = torch.cat(batches)  # StepBatches draws each step's batch from these: same data in both modes

    def loader(workers: int) -> DataLoader:
        plan = lens.planner if workers else None
        ds = StepBatches(windows, args.batch, seed=0, start=0, stop=args.steps, plan=plan)
        return DataLoader(
            ds, batch_size=None, num_workers=workers, pin_memory=bool(workers) and device.type == "cuda"
        )

    w, workers = args.warmup, args.plan_workers
    lens_out = _construction(*_lens_steps(lens, loader(0), device, profile=True), w)
    lens_out |= {"variant_rows_per_step": args.batch * (1 + args.candidates), "base_forwards_per_step": 1}
    prepared = _construction(*_lens_steps(lens, loader(workers), device, profile=True), w)
    plan_s = []
    for step, ids in enumerate(batches):
        t0 = time.perf_counter()
        lens.planner(step, ids)
        plan_s.append(time.perf_counter() - t0)

    def steps_per_s(workers: int) -> float:
        return 1.0 / statistics.median(_lens_steps(lens, loader(workers), device, profile=False)[0][w:])

    rates = alternate(
        {"in_step": lambda: steps_per_s(0), "prepared": lambda: steps_per_s(workers)}, args.repeats
    )
    prepared |= {
        "plan_workers": workers,
        "plan_ms_median": 1e3 * statistics.median(plan_s),  # host time per plan, in the worker: off the step
        "in_step_steps_per_s": rates["in_step"],
        "prepared_steps_per_s": rates["prepared"],
        "steps_per_s_ratio": paired_ratio(rates, "prepared", "in_step"),
    }

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
        "lensnet_prepared": prepared,
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
