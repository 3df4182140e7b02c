"""Induction probe: does a base-LM architecture learn to copy (induction heads), and after how many steps?

Every retrieval task mchar evaluates (passkey, needles, key-value) needs the base to copy tokens it saw far back.
This probe isolates that skill: windows of random tokens in which one random segment is repeated later, loss and
accuracy only on the repeated tokens that are predictable (all but the first), so nothing but copying lowers the
loss below ``log(pool)``. It trains a copy of the base (a saved HF directory, or a fresh model with that
directory's config) and prints one JSON object with the curve. A fixed-offset copy task (``--offset K``: predict
the token K positions before the next one) is the control: it needs attention and positions, no induction circuit.

``--text-windows`` (a cached window dataset of the base-LM stage, ``artifacts/cache/train-*/dataset``) adds one
answer-weighted text batch to every step, so the warm-up does not wreck the LM; ``--save DIR`` writes the warmed
base (with the tokenizer) for the task evaluations.
"""

from __future__ import annotations

import argparse
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mchar.bench.common import at_least, emit
from mchar.data.copy_batches import repeat_batch


def copy_loss(model: Any, ids: torch.Tensor, mask: torch.Tensor, offset: int) -> tuple[torch.Tensor, float]:
    """Mean NLL and accuracy on the masked targets."""
    logits = model(input_ids=ids).logits[:, :-1]
    target = torch.roll(ids, offset, 1)[:, 1:] if offset else ids[:, 1:]  # offset: ids[t + 1 - offset]
    m = mask[:, 1:].reshape(-1)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1), reduction="none")
    acc = ((logits.argmax(-1).reshape(-1) == target.reshape(-1)).float() * m).sum() / m.sum()
    return (nll * m).sum() / m.sum(), float(acc)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(args.seed)
    if args.fresh:
        cfg = AutoConfig.from_pretrained(args.base)
        if args.layers:
            cfg.num_hidden_layers = args.layers
        model = AutoModelForCausalLM.from_config(cfg)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.base)
    pool = min(args.pool, model.config.vocab_size)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    probe = repeat_batch(64, args.length, pool, torch.Generator().manual_seed(args.seed + 1), args.offset)
    text = None
    if args.text_windows:
        import datasets

        from mchar.lit.base_lm import next_token_loss

        text = datasets.load_from_disk(args.text_windows).with_format("torch")
    curve = []
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        loss, _ = copy_loss(
            model, *repeat_batch(args.batch, args.length, pool, gen, args.offset), args.offset
        )
        if text is not None:
            rows = torch.randint(0, len(text), (args.text_batch,), generator=gen)
            batch = text[rows]
            loss = loss + next_token_loss(
                model,
                batch["input_ids"].long(),
                answer=batch["answer_mask"],
                answer_weight=args.answer_weight,
            )
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % args.every == 0 or step == args.steps:
            with torch.no_grad():
                held, acc = copy_loss(model, *probe, args.offset)
            curve.append({"step": step, "nll": round(float(held), 4), "acc": round(acc, 4)})
    if args.save:
        model.save_pretrained(args.save)
        for f in Path(args.base).glob("*token*"):  # the tokenizer travels with the weights
            shutil.copy2(f, Path(args.save) / f.name)
    return {
        "base": args.base,
        "fresh_init": bool(args.fresh),
        "layers": int(model.config.num_hidden_layers),
        "task": f"fixed offset {args.offset}" if args.offset else "repeated random segment",
        "text_windows": args.text_windows or None,
        "length": args.length,
        "batch": args.batch,
        "lr": args.lr,
        "pool": pool,
        "chance_nll": round(math.log(pool), 4),
        "curve": curve,
        "final_acc": curve[-1]["acc"] if curve else None,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="mchar bench induction", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--base", required=True, help="a saved HF causal-LM directory (its weights, or its config)"
    )
    p.add_argument(
        "--fresh", action="store_true", help="train a freshly initialised model with the base's config"
    )
    p.add_argument(
        "--layers", type=at_least(0), default=0, help="with --fresh: override the number of layers"
    )
    p.add_argument("--steps", type=at_least(1), default=1000)
    p.add_argument("--length", type=at_least(16), default=64)
    p.add_argument("--batch", type=at_least(1), default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--pool", type=at_least(2), default=256, help="random tokens are drawn from ids [0, pool)")
    p.add_argument(
        "--offset", type=at_least(0), default=0, help="control task: predict ids[t + 1 - offset] (0 = off)"
    )
    p.add_argument("--every", type=at_least(1), default=100, help="probe every N steps")
    p.add_argument("--seed", type=at_least(0), default=0)
    p.add_argument(
        "--text-windows", default="", help="a cached base-LM window dataset to mix in (one batch/step)"
    )
    p.add_argument("--text-batch", type=at_least(0), default=8)
    p.add_argument("--answer-weight", type=float, default=10.0)
    p.add_argument("--save", default="", help="write the trained model (and the base's tokenizer files) here")
    args = p.parse_args(argv)
    if args.offset >= args.length:
        p.error(f"--offset {args.offset} must be smaller than --length {args.length}")
    return emit("induction", args, run(args))


if __name__ == "__main__":  # pragma: no cover
    main()
