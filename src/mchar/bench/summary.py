"""``python -m mchar report --bench``: ``reports/bench.md`` written from the benchmark JSON files, nothing typed in.

Why: a hand-copied benchmark table drifts from the JSON it quotes (and from the machine it names) the first time
one benchmark is rerun. Here every figure is read from ``reports/bench/<name>.json`` (what ``python -m mchar bench
--out`` wrote), each section names the machine its file was measured on, and a missing file says "not run".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mchar.errors import MCharError
from mchar.report import table

BENCHES = ("train-step", "train-overhead", "decode", "tree-io", "fault")
NOT_RUN = "_not run_ (`python -m mchar bench --out reports/bench/{name}.json {name}`)"


def _load(bench_dir: Path, name: str) -> dict[str, Any] | None:
    path = bench_dir / f"{name}.json"
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise MCharError(f"report --bench: {path} is not JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(data, dict) or data.get("bench") != name:
        raise MCharError(
            f"report --bench: {path} is not a {name!r} benchmark result (its 'bench' field differs)"
        )
    return data


def _machine(data: dict[str, Any]) -> str:
    env = data.get("env", {})
    kernels = f" ({env['cpu_kernels']} kernels)" if "cpu_kernels" in env else ""  # results before it had none
    return (
        f"{env.get('cpu', '?')}{kernels}, {env.get('cpu_count', '?')} cores, accelerator "
        f"{env.get('accelerator', '?')}, torch {env.get('torch', '?')}"
    )


def _yes(flag: Any) -> str:
    return "yes" if flag else "no"


def _spread(side: dict[str, Any]) -> str:
    """The per-repeat Lightning/plain ratios' range and the ratio of the two medians, when the result has them
    (files from before had not)."""
    pairs, of_medians = side.get("paired_ratios"), side.get("ratio_of_medians")
    parts = [f"per repeat {min(pairs):.2f}-{max(pairs):.2f}"] if pairs else []
    if of_medians is not None:
        parts.append(f"ratio of medians {of_medians:.3f}")
    return f" ({'; '.join(parts)})" if parts else ""


def _train_steps(
    step: dict[str, Any] | None, overhead: dict[str, Any] | None, heading: str = "## Training steps (issue 4)"
) -> list[str]:
    lines = [heading, ""]
    rows = []
    if step:
        lens, gist = step["lensnet"], step["gistnet"]
        measured_steps = step["config"]["steps"] - step["config"]["warmup"]
        rows.append(
            [
                f"`train-step`: LensNet loss construction / LensNet step (median of {measured_steps} steps)",
                f"{lens['construction_ms_median']:.2f} ms / {lens['step_ms_median']:.1f} ms = "
                f"{100 * lens['construction_share_median']:.1f} %",
                f"≤ {100 * lens['target_share_max']:.0f} %",
                _yes(lens["meets_target"]),
            ]
        )
        rows.append(
            [
                f"`train-step`: GistNet steps/s, Lightning vs plain loop (median of {step['config']['repeats']} "
                "alternating repeats' ratios)",
                f"{gist['lightning_steps_per_s']:.1f} vs {gist['plain_steps_per_s']:.1f} steps/s: "
                f"{gist['ratio']:.3f}x{_spread(gist)}",
                f"≥ {gist['target_ratio_min']}x",
                _yes(gist["meets_target"]),
            ]
        )
    if overhead:
        ratio = overhead["ratio_lightning_over_plain"]
        target = float(str(overhead["target"]).lstrip(">= "))
        rows.append(
            [
                f"`train-overhead`: base-LM tokens/s, Lightning vs plain loop (median of {overhead['repeats']} "
                "alternating repeats' ratios)",
                f"{overhead['lightning_tokens_per_s']:.0f} vs {overhead['plain_tokens_per_s']:.0f} tokens/s: "
                f"{ratio:.3f}x{_spread(overhead)}",
                f"≥ {target}x",
                _yes(ratio >= target),
            ]
        )
    if not rows:
        return [*lines, NOT_RUN.format(name="train-step"), ""]
    machines = {_machine(d) for d in (step, overhead) if d}
    sizes = (
        ["`train-step` options: " + ", ".join(f"{k}={v}" for k, v in step["config"].items()) + "."]
        if step
        else []
    )
    return [
        *lines,
        *table(["benchmark", "measured", "target", "met"], rows),
        "",
        *sizes,
        f"Measured on: {'; '.join(sorted(machines))}.",
        "",
    ]


def _decode(
    data: dict[str, Any] | None, heading: str = "## Decoding at constant per-token cost (`decode`)"
) -> list[str]:
    lines = [heading, ""]
    if not data:
        return [*lines, NOT_RUN.format(name="decode"), ""]
    c = data["config"]
    threads = f"{c['threads']} CPU thread(s)" if c["threads"] else "torch's default CPU threads"
    lines += [
        f"A {c['layers']}-layer d{c['hidden']} Llama, budget {c['budget']}, K = {c['block_size']}, depth "
        f"{c['depth']}, LensNet refocus every block, {threads}; median ms per generated token, both "
        f"sides interleaved in rounds. Measured on: {_machine(data)}.",
        "",
    ]
    rows = []
    for row in data["rows"]:
        mc, full = row["mc"], row.get("full")  # no full side with --no-full
        rows.append(
            [
                f"{row['history']:,}",
                f"{mc['median_ms']:.2f}",
                f"{full['median_ms']:.2f}" if full else "—",
                f"{mc['kv_cache_mb']:.1f}",
                f"{full['kv_cache_mb']:.1f}" if full else "—",
            ]
        )
    header = [
        "history (tokens)",
        "MegaContext ms/token",
        "full context ms/token",
        "MegaContext KV cache (MB)",
    ]
    lines += table([*header, "full KV cache (MB)"], rows)
    lo, hi = data["latency_ratio_mults"]
    lines += [
        "",
        f"Latency ratio {hi}x vs {lo}x the budget: {data['latency_ratio']:.3f} (target ≤ {data['latency_ratio_target']}); "
        "GistNet + LensNet + allocator time / base forward time at the budget: "
        f"{data['overhead_share_at_budget']:.3f} (target ≤ {data['overhead_target']}).",
        "",
    ]
    return lines


def _storage(io: dict[str, Any] | None, fault: dict[str, Any] | None) -> list[str]:
    lines = ["## Tree storage (`tree-io`, `fault`)", ""]
    if io:
        disk = io["disk"]
        lines += [
            f"- ingest of {io['io']['tokens']:,} tokens with a zero-cost gist function (pure I/O): "
            f"{io['io']['tokens_per_s']:,} tokens/s; with a real GistNet ({io['compute']['tokens']:,} tokens): "
            f"{io['compute']['tokens_per_s']:,} tokens/s;",
            f"- on disk {disk['bytes_per_token']} bytes/token, {disk['overhead_pct_vs_payload']} % over the payload "
            f"(target ≤ {disk['target_overhead_pct']} %, met: {_yes(disk['meets_target'])}). Measured on: "
            f"{_machine(io)}.",
        ]
    else:
        lines.append("- " + NOT_RUN.format(name="tree-io"))
    if fault:
        lines.append(
            f"- {fault['kills']} `kill -9`s of a writer mid-ingest: {fault['lost_committed_blocks']} committed blocks "
            f"lost, {fault['bad_blocks']} corrupt blocks ({fault['verified_blocks']:,} verified; "
            f"{fault['kills_with_torn_tail']} kills left a torn tail, recovered on open)."
        )
    else:
        lines.append("- " + NOT_RUN.format(name="fault"))
    return [*lines, ""]


def _elsewhere(bench_dir: Path) -> list[str]:
    """One section per subfolder of ``bench_dir`` (another machine, or other sizes: ``reports/bench/h200/``),
    holding any of the training-step and decode results under their usual names."""
    lines: list[str] = []
    for sub in sorted(p for p in bench_dir.iterdir() if p.is_dir()):
        found = {name: _load(sub, name) for name in ("train-step", "train-overhead", "decode")}
        if not any(found.values()):
            continue
        machine = next(_machine(d) for d in found.values() if d)
        lines += [f"## `{sub.name}/`: {machine}", ""]
        if found["train-step"] or found["train-overhead"]:
            lines += _train_steps(found["train-step"], found["train-overhead"], "### Training steps")
        if found["decode"]:
            lines += _decode(found["decode"], "### Decoding")
    return lines


def build_bench_report(bench_dir: str | Path = "reports/bench", out: str | Path = "reports/bench.md") -> Path:
    """Write ``out`` from the benchmark files in ``bench_dir``; returns its path. All files are read (and
    checked) before anything is written."""
    bench_dir, out = Path(bench_dir), Path(out)
    if not bench_dir.is_dir():
        raise MCharError(
            f"report --bench: no benchmark folder {bench_dir} (run `python -m mchar bench --out ...`)"
        )
    found = {name: _load(bench_dir, name) for name in BENCHES}
    if not any(found.values()):
        raise MCharError(
            f"report --bench: {bench_dir} holds none of {', '.join(f'{b}.json' for b in BENCHES)}"
        )
    lines = [
        "# mchar benchmarks",
        "",
        f"Written by `python -m mchar report --bench` from the JSON objects in `{bench_dir}/` (`bench`, `config`: "
        "every option it ran with, the results, `env`: the machine); no number here is typed in. Reproduce one with",
        "",
        "```bash",
        ".venv/bin/python -m mchar bench --out reports/bench/NAME.json NAME     # NAME: "
        + ", ".join(BENCHES),
        ".venv/bin/python -m mchar report --bench                                # then this file",
        "```",
        "",
        "at the defaults, on an otherwise idle machine. Every benchmark measures its sides in one run, alternating "
        "them, and reports medians; `tests/bench/test_benchmarks.py` runs each at a tiny size and checks that its "
        "derived numbers (ratios, shares, targets met) follow from its raw ones. The Lightning/plain ratios sit "
        "within a few per cent of 1 either way from run to run; compare medians of repeated runs before calling a "
        "regression. A subfolder (`h200/`) holds another machine's `train-step` / `train-overhead` / `decode` "
        "results and gets a section of its own (`bash scripts/gpu_check.sh OUT_DIR` writes them on a GPU).",
        "",
    ]
    lines += _train_steps(found["train-step"], found["train-overhead"])
    lines += _decode(found["decode"])
    lines += _storage(found["tree-io"], found["fault"])
    lines += _elsewhere(bench_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines).rstrip("\n") + "\n")
    return out
