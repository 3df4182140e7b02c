"""Report figures (matplotlib, Agg: no display on CI machines). Each function takes plain data and writes a PNG."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def dnll_vs_budget(rows: list[dict[str, Any]], path: Path) -> Path:
    """ΔNLL vs working-context budget, one line per policy (error bars = CI), one panel per tree depth."""
    plt = _plt()
    depths = sorted({r["depth"] for r in rows})
    fig, axes = plt.subplots(1, len(depths), figsize=(5.5 * len(depths), 4), squeeze=False)
    for ax, depth in zip(axes[0], depths, strict=True):
        lines: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in rows:
            if r["depth"] == depth:
                lines[r["policy"]].append(r)
        for policy, pts in sorted(lines.items()):
            pts.sort(key=lambda r: r["budget"])
            x = [p["budget"] for p in pts]
            y = [p["delta_nll"] for p in pts]
            lo = [p["delta_nll"] - p["ci_low"] if p.get("ci_low") is not None else 0.0 for p in pts]
            hi = [p["ci_high"] - p["delta_nll"] if p.get("ci_high") is not None else 0.0 for p in pts]
            ax.errorbar(x, y, yerr=[lo, hi], marker="o", capsize=3, label=policy)
        ax.axhline(0.0, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("budget W_max (entries' cost)")
        ax.set_ylabel("ΔNLL vs full context (nats/token)")
        ax.set_title(f"tree depth {depth}")
        ax.legend(fontsize=8)
    return _save(fig, path)


def dnll_by_experiment(
    bars: dict[str, dict[str, tuple[float, float | None, float | None]]], names: list[str], path: Path
) -> Path:
    """ΔNLL per policy, one bar per experiment (error bars = CI). ``bars[policy][experiment] = (Δ, low, high)``."""
    plt = _plt()
    policies = sorted(bars)
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(min(12.0, 2.0 + 1.2 * len(policies)), 4))
    for j, name in enumerate(names):
        xs, ys, err = [], [], [[], []]
        for i, policy in enumerate(policies):
            if name not in bars[policy]:
                continue
            y, lo, hi = bars[policy][name]
            xs.append(i + (j - (len(names) - 1) / 2) * width)
            ys.append(y)
            err[0].append(y - lo if lo is not None else 0.0)
            err[1].append(hi - y if hi is not None else 0.0)
        ax.bar(xs, ys, width=width, yerr=err, capsize=2, label=name)
    ax.axhline(0.0, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(policies)), policies, rotation=30, ha="right")
    ax.set_ylabel("ΔNLL vs full context (nats/token)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def task_accuracy(acc: dict[str, dict[str, dict[int, float]]], path: Path) -> Path:
    """Task accuracy vs context length, one panel per task, one line per policy. ``acc[policy][task][length]``."""
    plt = _plt()
    tasks = sorted({t for per in acc.values() for t in per})
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for policy in sorted(acc):
            pts = sorted(acc[policy].get(task, {}).items())
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=policy)
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("accuracy")
        ax.set_title(task)
        ax.legend(fontsize=8)
    return _save(fig, path)


def focus_map(lod: Any, path: Path, title: str) -> Path:
    """LOD of every position (x) at every refocus (y); -1 (not yet seen / dropped) is drawn white."""
    import numpy as np
    from matplotlib.colors import BoundaryNorm, ListedColormap

    plt = _plt()
    arr = np.asarray(lod)
    top = int(max(arr.max(initial=0), 1))
    colours = ["white"] + [plt.get_cmap("viridis")(i / max(top, 1)) for i in range(top + 1)]
    cmap = ListedColormap(colours)
    norm = BoundaryNorm(np.arange(-1.5, top + 1.5), cmap.N)
    fig, ax = plt.subplots(figsize=(8, 4))
    im = ax.imshow(arr, aspect="auto", interpolation="nearest", cmap=cmap, norm=norm, origin="upper")
    cbar = fig.colorbar(im, ax=ax, ticks=list(range(-1, top + 1)))
    cbar.ax.set_yticklabels(["unseen/dropped"] + [f"LOD{i}" for i in range(top + 1)])
    ax.set_xlabel("position (token or block index)")
    ax.set_ylabel("time (refocus step)")
    ax.set_title(title)
    return _save(fig, path)


def telemetry(rows: dict[str, dict[str, float]], path: Path) -> Path:
    """Swap rate, budget utilisation and raw tokens in view per policy (bars)."""
    plt = _plt()
    policies = sorted(rows)
    panels = [("swap_rate", "swap rate (edits / refocus)"), ("budget_util", "budget utilisation")]
    if any("raw_tokens" in v for v in rows.values()):  # runs logged before it existed have no raw_tokens
        panels.append(("raw_tokens", "raw tokens in the working context"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels, strict=True):
        vals = [rows[p].get(key, float("nan")) for p in policies]
        ax.bar(policies, vals, color="tab:blue")
        ax.set_ylabel(label)
        plt.setp(ax.get_xticklabels(), rotation=30, ha="right")  # long labels (a sweep's "policy [seed=1]")
    return _save(fig, path)


def trends(curves: dict[str, dict[int, float]], path: Path, title: str) -> Path:
    """Validation metrics vs training step, one line per metric (``curves[metric][step]``)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for metric, pts in curves.items():
        xs = sorted(pts)
        ax.plot(xs, [pts[x] for x in xs], marker="o", label=metric, ls="--" if "drop" in metric else "-")
    ax.set_xlabel("training step")
    ax.set_ylabel("value")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)
