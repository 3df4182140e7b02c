"""Crash-safety benchmark: ``kill -9`` a writer at random instants and verify every committed block survives.

Parent mode (default) starts ``python -m mchar.bench.fault --child DIR`` repeatedly on the same tree; the child
reopens the tree (recovering from the previous kill), keeps ingesting deterministic tokens in random-size chunks
and prints ``committed <num_tokens>`` after each ``ingest()`` returns. The parent kills it at a random instant,
reopens the tree, and checks that (a) it holds at least every token the child reported committed and (b) every
token and every gist equals a from-scratch recomputation of the deterministic stream.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mchar.bench.common import at_least, emit
from mchar.core.tree import MegaContextTree

VOCAB = 50_000


def token_stream(start: int, end: int, seed: int = 0) -> torch.Tensor:
    """Deterministic token ids of positions [start, end): the ground truth a reopened tree must match."""
    pos = np.arange(start, end, dtype=np.int64)
    return torch.from_numpy(((pos * 2_654_435_761 + seed * 97 + 12_345) % 2_147_483_647) % VOCAB)


def make_fns(
    dim: int, seed: int = 0
) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[..., torch.Tensor]]:
    """Deterministic, batch-invariant embed/gist functions (row i depends on row i only, so chunking is moot)."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(VOCAB, dim, generator=g)

    def embed_fn(ids: torch.Tensor) -> torch.Tensor:
        return table[ids.to(torch.int64)]

    def gist_fn(children: torch.Tensor, level: int) -> torch.Tensor:
        return torch.tanh(children.float().mean(dim=1) * (1.0 + 0.25 * level))

    return embed_fn, gist_fn


def child(
    path: str,
    *,
    seed: int,
    dim: int,
    block_size: int,
    depth: int,
    dtype: str,
    chunk_max: int,
    max_tokens: int,
) -> None:
    """Writer loop: open-or-create, ingest forever (until max_tokens), report each committed count."""
    embed_fn, gist_fn = make_fns(dim, seed)
    # imports are done: tell the parent, then wait for "go" so the slow start-up overlaps the previous child
    print("loaded", flush=True)
    if sys.stdin.readline().strip() != "go":  # parent gone or gave up: never write unsupervised
        return
    p = Path(path)
    if (p / "metadata.json").exists():
        tree = MegaContextTree.open(
            p, embed_fn=embed_fn, gist_fn=gist_fn, block_size=block_size, depth=depth, dim=dim, dtype=dtype
        )
    else:
        tree = MegaContextTree.create(
            p, block_size=block_size, depth=depth, dim=dim, embed_fn=embed_fn, gist_fn=gist_fn, dtype=dtype
        )
    rng = np.random.default_rng(seed * 1_000_003 + tree.num_tokens)
    n = tree.num_tokens
    print(f"ready {n}", flush=True)
    while n < max_tokens:
        c = int(rng.integers(1, chunk_max + 1))
        n = tree.ingest(token_stream(n, n + c, seed))
        print(f"committed {n}", flush=True)
    tree.close()


def torn_tail_bytes(path: str | Path) -> int:
    """Bytes past the committed length in the level files (what a kill left half-written; open discards them)."""
    p = Path(path)
    try:
        levels = json.loads((p / "metadata.json").read_text())["levels"]
    except (OSError, ValueError, KeyError):
        return 0
    return sum(
        max(0, (p / lv["file"]).stat().st_size - lv["bytes"]) for lv in levels if (p / lv["file"]).exists()
    )


def verify(path: str | Path, *, seed: int, dim: int, reported_tokens: int) -> dict[str, Any]:
    """Reopen (recovering) and compare every block against a from-scratch in-memory recomputation."""
    embed_fn, gist_fn = make_fns(dim, seed)
    tree = MegaContextTree.open(path, embed_fn=embed_fn, gist_fn=gist_fn)
    try:
        K, depth, n = tree.block_size, tree.depth, tree.num_tokens
        ref = MegaContextTree.in_memory(K, depth, dim, embed_fn, gist_fn, dtype=tree.storage.spec.dtype)
        truth = token_stream(0, n, seed)
        ref.ingest(truth)
        bad_blocks: set[int] = set()
        tok_ok = tree.tokens() == truth
        full = (n // K) * K
        bad_blocks.update(np.nonzero(~tok_ok[:full].view(-1, K).all(dim=1).numpy())[0].tolist())
        tail_ok = bool(tok_ok[full:].all())
        for level in range(1, depth + 1):
            if tree.num_nodes(level) != ref.num_nodes(level):
                raise AssertionError(
                    f"level {level}: {tree.num_nodes(level)} nodes, expected {ref.num_nodes(level)}"
                )
            a, b = tree.gists(level), ref.gists(level)
            if a.numel():
                row_bad = ~(a == b).all(dim=1)
                for node in np.nonzero(row_bad.numpy())[0].tolist():
                    w = K ** (level - 1)  # LOD1 blocks under this node
                    bad_blocks.update(range(node * w, (node + 1) * w))
        reported_blocks = reported_tokens // K
        missing = max(0, reported_blocks - n // K)
        return {
            "num_tokens": n,
            "reported_tokens": reported_tokens,
            "blocks": n // K,
            "verified_blocks": n // K - len(bad_blocks),
            "bad_blocks": len(bad_blocks),
            "lost_committed_blocks": missing + len([b for b in bad_blocks if b < reported_blocks]),
            "lost_committed_tokens": max(0, reported_tokens - n),
            "tail_ok": tail_ok,
        }
    finally:
        tree.close()


def run_kills(
    path: str | Path,
    kills: int,
    *,
    seed: int = 0,
    dim: int = 16,
    block_size: int = 4,
    depth: int = 3,
    dtype: str = "float16",
    chunk_max: int = 64,
    max_delay: float = 0.3,
    max_tokens: int = 10_000_000,
    rng_seed: int | None = None,
) -> dict[str, Any]:
    """Kill a writer ``kills`` times at random instants; verify after each reopen."""
    rng = random.Random(rng_seed)
    per_kill: list[dict[str, Any]] = []
    reported = 0
    cmd = [
        sys.executable,
        "-m",
        "mchar.bench.fault",
        "--child",
        str(path),
        "--seed",
        str(seed),
        "--dim",
        str(dim),
        "--block-size",
        str(block_size),
        "--depth",
        str(depth),
        "--dtype",
        dtype,
        "--chunk-max",
        str(chunk_max),
        "--max-tokens",
        str(max_tokens),
    ]

    def spawn() -> tuple[subprocess.Popen[str], list[str], threading.Event, threading.Thread]:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        lines: list[str] = []
        ready = threading.Event()

        def drain() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:  # only newline-terminated lines count as reports
                if line.endswith("\n"):
                    lines.append(line)
                    if line.startswith("ready"):
                        ready.set()
            ready.set()

        t = threading.Thread(target=drain, daemon=True)
        t.start()
        return proc, lines, ready, t

    live: list[subprocess.Popen[str]] = []
    try:
        nxt = spawn() if kills > 0 else None
        for k in range(kills):
            assert nxt is not None
            proc, lines, ready, t = nxt
            live.append(proc)
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
            if not ready.wait(timeout=120):
                raise RuntimeError("fault child never became ready")
            nxt = spawn() if k + 1 < kills else None  # pre-import the next writer while this one runs
            if nxt is not None:
                live.append(nxt[0])
            delay = rng.uniform(0.0, max_delay)
            time.sleep(delay)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait()
            t.join(timeout=10)
            err = proc.stderr.read() if proc.stderr else ""
            if proc.returncode not in (0, -signal.SIGKILL):
                raise RuntimeError(f"fault child failed (rc={proc.returncode}): {err.strip()[-2000:]}")
            for line in lines:
                if line.startswith("committed "):
                    reported = max(reported, int(line.split()[1]))
            torn = torn_tail_bytes(path)
            res = verify(path, seed=seed, dim=dim, reported_tokens=reported)
            res["delay_s"] = round(delay, 4)
            res["torn_tail_bytes"] = torn
            per_kill.append(res)
    finally:
        for p in live:  # only the children this call started
            if p.poll() is None:
                p.kill()
                p.wait()
    return {
        "kills": kills,
        "verified_blocks": sum(r["verified_blocks"] for r in per_kill),
        "final_blocks": per_kill[-1]["blocks"] if per_kill else 0,
        "final_tokens": per_kill[-1]["num_tokens"] if per_kill else 0,
        "lost_committed_blocks": sum(r["lost_committed_blocks"] for r in per_kill),
        "lost_committed_tokens": sum(r["lost_committed_tokens"] for r in per_kill),
        "bad_blocks": sum(r["bad_blocks"] for r in per_kill),
        "kills_with_torn_tail": sum(r["torn_tail_bytes"] > 0 for r in per_kill),
        "per_kill": per_kill,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="mchar bench fault", description=__doc__.splitlines()[0])
    ap.add_argument("--child", metavar="DIR", help="internal: run the writer loop on DIR")
    ap.add_argument("--kills", type=at_least(1), default=20)
    ap.add_argument("--seed", type=at_least(0), default=0)
    ap.add_argument("--dim", type=at_least(1), default=16)
    ap.add_argument("--block-size", type=at_least(2), default=4)
    ap.add_argument("--depth", type=at_least(1), default=3)
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--chunk-max", type=at_least(1), default=64)
    ap.add_argument(
        "--max-delay", type=float, default=0.3, help="kill within this many seconds of child ready"
    )
    ap.add_argument("--max-tokens", type=at_least(1), default=10_000_000)
    ap.add_argument("--dir", default=None, help="tree directory (default: a fresh temp dir, removed after)")
    args = ap.parse_args(argv)
    if args.child:
        child(
            args.child,
            seed=args.seed,
            dim=args.dim,
            block_size=args.block_size,
            depth=args.depth,
            dtype=args.dtype,
            chunk_max=args.chunk_max,
            max_tokens=args.max_tokens,
        )
        return {}
    tmp = None if args.dir else tempfile.mkdtemp(prefix="mchar-fault-")
    path = Path(args.dir or tmp) / "tree"
    t0 = time.perf_counter()
    try:
        res = run_kills(
            path,
            args.kills,
            seed=args.seed,
            dim=args.dim,
            block_size=args.block_size,
            depth=args.depth,
            dtype=args.dtype,
            chunk_max=args.chunk_max,
            max_delay=args.max_delay,
            max_tokens=args.max_tokens,
        )
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    res["wall_s"] = round(time.perf_counter() - t0, 2)
    res.pop("per_kill")
    return emit("fault", {k: v for k, v in vars(args).items() if k != "child"}, res)


if __name__ == "__main__":
    main()
