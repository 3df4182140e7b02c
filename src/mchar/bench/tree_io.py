"""Disk-tree ingest throughput (pure I/O vs real gist compute) and on-disk bytes per token vs the payload minimum.

Payload minimum per token = 4 B (uint32 id) + sum over levels l of gist_bytes / K**l; anything above it is
format overhead (headers, metadata). Throughput is a median over repeats, each on a fresh tree directory.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mchar.bench.common import at_least, emit
from mchar.core.storage import GIST_DTYPES
from mchar.core.tree import MegaContextTree

Fn = Callable[..., torch.Tensor]


def _io_fns(dim: int) -> tuple[Fn, Fn, str]:
    """Near-zero-cost embed/gist so the timing is the storage path (reads, writes, commits) only."""
    vec = torch.ones(dim)

    def embed_fn(ids: torch.Tensor) -> torch.Tensor:
        return vec.expand(*ids.shape, dim)

    def gist_fn(x: torch.Tensor, level: int) -> torch.Tensor:
        return x[:, 0]

    return embed_fn, gist_fn, "zero-cost (first child)"


def _compute_fns(dim: int, block_size: int, depth: int, vocab: int) -> tuple[Fn, Fn, str]:
    """A real embedding lookup plus GistNet when the project has one (else a small MLP mean-pool stand-in)."""
    torch.manual_seed(0)
    table = nn.Embedding(vocab, dim)
    gist: nn.Module
    try:
        from mchar.core.gistnet import GistNet

        gist = GistNet(dim, block_size, max_level=depth)
        name = "mchar.core.gistnet.GistNet(n_layers=2, n_heads=4)"
    except (ImportError, TypeError, ValueError):  # pragma: no cover - fallback before GistNet exists
        mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

        class _Stand(nn.Module):
            def forward(self, x: torch.Tensor, level: int) -> torch.Tensor:
                return mlp(x).mean(dim=1)

        gist = _Stand()
        name = "MLP mean-pool stand-in"
    gist.eval()

    def embed_fn(ids: torch.Tensor) -> torch.Tensor:
        return table(ids % vocab)

    return embed_fn, gist, name


def _ingest_once(
    root: Path, tokens: torch.Tensor, args: argparse.Namespace, fns: tuple[Fn, Fn, str]
) -> tuple[float, int, dict[str, Any]]:
    path = root / f"tree-{time.monotonic_ns()}"
    embed_fn, gist_fn, _ = fns
    t0 = time.perf_counter()
    tree = MegaContextTree.create(
        path,
        block_size=args.block_size,
        depth=args.depth,
        dim=args.dim,
        embed_fn=embed_fn,
        gist_fn=gist_fn,
        dtype=args.dtype,
        base_model_id="bench/tree-io",
        fsync_data=args.fsync_data,
    )
    for s in range(0, tokens.numel(), args.chunk):
        tree.ingest(tokens[s : s + args.chunk])
    tree.close()
    dt = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in path.iterdir())
    counts = {
        f"lod{lv}": n for lv, n in enumerate(json.loads((path / "metadata.json").read_text())["levels"])
    }
    shutil.rmtree(path)
    return dt, size, {k: v["count"] for k, v in counts.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="mchar bench tree-io", description=__doc__.splitlines()[0])
    ap.add_argument(
        "--tokens", type=at_least(1), default=1_000_000, help="tokens for the pure-I/O run and overhead"
    )
    ap.add_argument("--compute-tokens", type=at_least(1), default=65_536, help="tokens for the GistNet run")
    ap.add_argument("--dim", type=at_least(1), default=256)
    ap.add_argument("--block-size", type=at_least(2), default=32)
    ap.add_argument("--depth", type=at_least(1), default=2)
    ap.add_argument("--dtype", default="float16", choices=sorted(GIST_DTYPES))
    ap.add_argument(
        "--chunk", type=at_least(1), default=65_536, help="tokens per ingest() call (one commit each)"
    )
    ap.add_argument("--repeats", type=at_least(1), default=3)
    ap.add_argument("--compute-repeats", type=at_least(1), default=1)
    ap.add_argument("--vocab", type=at_least(1), default=32_000)
    ap.add_argument("--fsync-data", action="store_true", help="fsync level files on every commit")
    ap.add_argument("--threads", type=at_least(0), default=0, help="torch threads (0: leave default)")
    ap.add_argument("--dir", default=None, help="where to write trees (default: a temp dir)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    root = Path(tempfile.mkdtemp(prefix="mchar-treeio-", dir=args.dir))
    g = torch.Generator().manual_seed(0)
    try:
        io_tokens = torch.randint(0, args.vocab, (args.tokens,), generator=g)
        io_fns = _io_fns(args.dim)
        io_runs = [_ingest_once(root, io_tokens, args, io_fns) for _ in range(args.repeats)]
        io_times = [r[0] for r in io_runs]
        size, counts = io_runs[-1][1], io_runs[-1][2]

        comp_tokens = torch.randint(0, args.vocab, (args.compute_tokens,), generator=g)
        comp_fns = _compute_fns(args.dim, args.block_size, args.depth, args.vocab)
        with torch.inference_mode():
            comp_runs = [_ingest_once(root, comp_tokens, args, comp_fns) for _ in range(args.compute_repeats)]
        comp_times = [r[0] for r in comp_runs]
    finally:
        shutil.rmtree(root, ignore_errors=True)

    itemsize = GIST_DTYPES[args.dtype][3]
    gist_bytes = args.dim * itemsize
    # exact payload of this tree (full blocks only), and the asymptotic per-token minimum
    payload = 4 * args.tokens + sum(counts[f"lod{lv}"] * gist_bytes for lv in range(1, args.depth + 1))
    min_per_token = 4 + sum(gist_bytes / args.block_size**lv for lv in range(1, args.depth + 1))
    io_med = statistics.median(io_times)
    comp_med = statistics.median(comp_times)
    res = {
        "io": {
            "gist_fn": io_fns[2],
            "tokens": args.tokens,
            "tokens_per_s": round(args.tokens / io_med),
            "median_s": round(io_med, 4),
            "runs_s": [round(t, 4) for t in io_times],
        },
        "compute": {
            "gist_fn": comp_fns[2],
            "tokens": args.compute_tokens,
            "tokens_per_s": round(args.compute_tokens / comp_med),
            "median_s": round(comp_med, 4),
            "runs_s": [round(t, 4) for t in comp_times],
        },
        "disk": {
            "counts": counts,
            "bytes": size,
            "payload_bytes": payload,
            "bytes_per_token": round(size / args.tokens, 4),
            "payload_min_bytes_per_token": round(min_per_token, 4),
            "overhead_pct_vs_payload": round(100 * (size - payload) / payload, 4),
            "overhead_pct_vs_min_per_token": round(
                100 * (size / args.tokens - min_per_token) / min_per_token, 4
            ),
            "target_overhead_pct": 5.0,
        },
    }
    res["disk"]["meets_target"] = res["disk"]["overhead_pct_vs_payload"] <= 5.0
    return emit("tree-io", {k: v for k, v in vars(args).items() if k != "dir"}, res)


if __name__ == "__main__":
    main()
