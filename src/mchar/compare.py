"""``python -m mchar report --compare A B ... --name OUT``: several experiments side by side, from MLflow only.

Why: an ablation runs as its own experiment (``name=X``), and reading it means putting its numbers next to the
reference's. The per-experiment report says what one run measured; this one says what a change changed: one
column per experiment, every cell read from the store (the newest finished stage runs of that ``name`` outside sweeps), and a
table naming the runs and commands each column came from. Budgets may differ between columns (each column states
its own), so a budget ablation compares too.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any

from mchar import plots
from mchar.errors import redact_url
from mchar.evals.gap import GAP_TERMS
from mchar.report import (
    GISTNET_VS_DROP,
    LENSNET_RANKING,
    RETRIEVAL_SET,
    SET_HEADINGS,
    TASK,
    RunInfo,
    check_experiment_names,
    collect,
    command_cell,
    fmt,
    fresh_figure_dir,
    newest_stage,
    open_store,
    paired_cells,
    run_samples,
    set_file_suffix,
    set_patterns,
    table,
    write_report,
)

# The side nets' held-out numbers, and what an e2e fine-tune leaves on its validation windows.
SIDE_NET_METRICS = {
    "gistnet": GISTNET_VS_DROP,
    "lensnet": LENSNET_RANKING,
    "e2e": (*LENSNET_RANKING, "alloc_nll/lensnet", "alloc_nll/recency"),
}
VAL_PREFIXES = {"final": "code", "final_retrieval": "retrieval"}


def _interval(metrics: dict[str, float], stem: str, value_key: str) -> str:
    """``value [low, high]`` from ``<stem>/<value_key>`` and the stem's ``ci_low``/``ci_high`` (or its
    ``delta_nll_ci_*``), ``—`` when the run did not log it."""
    value = metrics.get(f"{stem}/{value_key}")
    if value is None:
        return "—"
    prefix = "delta_nll_" if value_key == "delta_nll" else ""
    lo, hi = metrics.get(f"{stem}/{prefix}ci_low"), metrics.get(f"{stem}/{prefix}ci_high")
    return fmt(value) if lo is None or hi is None else f"{fmt(value)} [{fmt(lo)}, {fmt(hi)}]"


def _experiments_table(runs: dict[str, list[RunInfo]]) -> list[str]:
    rows = []
    for name, stages in runs.items():
        ev, base = newest_stage(stages, "eval"), newest_stage(stages, "base_lm")
        rows.append(
            [
                name,
                ev.params.get("allocator.budget", "—") if ev else "—",
                ev.params.get("tree.depth", "—") if ev else "—",
                ev.params.get("tree.block_size", "—") if ev else "—",
                fmt(base.metrics.get("final/val_ppl")) if base else "—",
                fmt(ev.metrics.get("ppl/full/nll")) if ev else "—",
                f"`{ev.run_id[:12]}`" if ev else "_not run_",
            ]
        )
    header = ["experiment", "budget", "depth", "K", "base perplexity", "full-context NLL", "eval run"]
    return ["## Experiments", "", *table(header, rows), ""]


def _policies(evals: dict[str, RunInfo], ppl: str = "ppl") -> list[str]:
    pattern = set_patterns(ppl)[0]
    found = {m.group(1) for ev in evals.values() for k in ev.metrics if (m := pattern.match(k))}
    return sorted(found)


def _dnll_section(
    evals: dict[str, RunInfo], names: list[str], out: Path, rel: str, ppl: str = "ppl"
) -> tuple[list[str], Path | None]:
    lines = [
        f"## ΔNLL vs full context at each column's budget{SET_HEADINGS[ppl]}",
        "",
        "Mean over the evaluation's documents, 95 % interval over documents; lower is better.",
        "",
    ]
    policies = _policies(evals, ppl)
    if not policies:
        return ([*lines, "_not run_", ""] if ppl == "ppl" else []), None
    rows = [
        [p, *[_interval(evals[n].metrics, f"{ppl}/{p}", "delta_nll") if n in evals else "—" for n in names]]
        for p in policies
    ]
    lines += table(["policy", *names], rows)
    bars = {
        p: {
            n: (
                ev.metrics[f"{ppl}/{p}/delta_nll"],
                ev.metrics.get(f"{ppl}/{p}/delta_nll_ci_low"),
                ev.metrics.get(f"{ppl}/{p}/delta_nll_ci_high"),
            )
            for n, ev in evals.items()
            if f"{ppl}/{p}/delta_nll" in ev.metrics
        }
        for p in policies
    }
    png = f"dnll_by_experiment{set_file_suffix(ppl)}.png"
    figure = plots.dnll_by_experiment(bars, names, out / png)
    return [*lines, "", f"![ΔNLL by experiment]({rel}/{png})", ""], figure


def _paired_section(evals: dict[str, RunInfo], names: list[str], ppl: str = "ppl") -> list[str]:
    paired = set_patterns(ppl)[1]
    pairs = sorted(
        {(m.group(1), m.group(2)) for ev in evals.values() for k in ev.metrics if (m := paired.match(k))}
    )
    stems = [(f"{p} − {ref}", f"{ppl}/{p}/vs_{ref}") for p, ref in pairs]
    # lensnet − recency's two parts (mchar.evals.gap), where any column logged them
    stems += [
        (f"{p} − {ref} ({term})", f"{ppl}/gap/{term}")
        for term, (p, ref) in GAP_TERMS.items()
        if any(f"{ppl}/gap/{term}/mean" in ev.metrics for ev in evals.values())
    ]
    if not stems:
        return []
    rows = [
        [label, *[_interval(evals[n].metrics, stem, "mean") if n in evals else "—" for n in names]]
        for label, stem in stems
    ]
    return [
        f"## Paired differences per document{SET_HEADINGS[ppl]}",
        "",
        "NLL(policy) − NLL(reference) on the same documents; positive = the reference is better.",
        "",
        *table(["policy − reference", *names], rows),
        "",
    ]


def _tasks_section(evals: dict[str, RunInfo], names: list[str]) -> list[str]:
    keys = sorted(
        {
            (m.group(1), m.group(2), int(m.group(3)))
            for ev in evals.values()
            for k in ev.metrics
            if (m := TASK.match(k))
        }
    )
    if not keys:
        return []
    rows = [
        [
            p,
            t,
            str(n),
            *[fmt(evals[c].metrics.get(f"task/{p}/{t}/{n}/acc")) if c in evals else "—" for c in names],
        ]
        for p, t, n in keys
    ]
    return ["## Task accuracy", "", *table(["policy", "task", "length", *names], rows), ""]


def _paired_tasks_section(client: Any, evals: dict[str, RunInfo], names: list[str]) -> list[str]:
    """Each experiment's task outcomes against the first's, policy by policy, on the examples that are the same in
    both runs (``eval.log_samples``): whether an ablation's accuracy change is more than a few lucky examples."""
    from mchar.evals.paired_tasks import paired_runs

    ref_name = names[0]
    if ref_name not in evals:
        return []
    reference = run_samples(client, evals[ref_name].run_id)
    body, notes = [], []
    for name in names[1:]:
        other = run_samples(client, evals[name].run_id) if name in evals else {}
        for policy in sorted(set(reference) & set(other)):
            rows, differ = paired_runs(reference[policy], other[policy], policy)
            if differ:
                notes.append(f"{name} / {policy}: {differ} examples with the same doc id differ, left out")
            body += [[name, *paired_cells(r)] for r in rows]
    if not body and not notes:
        return []
    lines = [
        f"## Paired task outcomes against {ref_name}",
        "",
        f"Each policy's per-example outcomes in an experiment against the same policy's in {ref_name}, on the examples "
        "that are the same in both runs (same doc id, target and doc fields: the task data follow the seed and "
        f"tokenizer). *{ref_name} only* / *experiment only*: examples one run answers and the other misses; p: exact "
        "two-sided McNemar test on those.",
        "",
    ]
    header = [
        "experiment",
        "policy",
        "task",
        "examples",
        f"{ref_name} acc",
        "experiment acc",
        f"{ref_name} only",
    ]
    lines += table([*header, "experiment only", "McNemar p"], body) if body else ["No example is shared."]
    return [*lines, *(f"- {n}" for n in notes), ""]


def _side_nets_section(runs: dict[str, list[RunInfo]], names: list[str]) -> list[str]:
    rows = []
    for stage, metrics in SIDE_NET_METRICS.items():
        newest = {n: newest_stage(runs[n], stage) for n in names}
        for prefix, vset in VAL_PREFIXES.items():
            for m in metrics:
                key = f"{prefix}/{m}"
                cells = [fmt(r.metrics.get(key)) if r else "—" for r in newest.values()]
                if any(c != "—" for c in cells):
                    rows.append([stage, vset, m, *cells])
    if not rows:
        return []
    return [
        "## Side nets on held-out windows",
        "",
        "GistNet: ΔNLL of the horizon with blocks gisted (`dnll_*`) against the same blocks dropped (`drop_dnll_*`); "
        "LensNet: Spearman of its scores against measured utilities, recency's on the same candidates, and the "
        "utilities' own split-half agreement.",
        "",
        *table(["stage", "windows", "metric", *names], rows),
        "",
    ]


def _sources_section(runs: dict[str, list[RunInfo]]) -> list[str]:
    rows = [
        [
            name,
            r.stage or "",
            f"`{r.run_id}`",
            _dt.datetime.fromtimestamp(r.start / 1000).isoformat(timespec="seconds"),
            command_cell(r),
        ]
        for name, stages in runs.items()
        for r in _newest_per_stage(stages)
    ]
    return [
        "## Runs and commands",
        "",
        *table(["experiment", "stage", "run", "started", "command"], rows),
        "",
    ]


def _newest_per_stage(stages: list[RunInfo]) -> list[RunInfo]:
    seen: dict[str, RunInfo] = {}
    for r in stages:  # newest first
        seen.setdefault(r.stage or "", r)
    return list(seen.values())


def build_comparison(
    names: list[str],
    out_name: str,
    experiment: str = "mchar",
    tracking_uri: str | None = None,
    out_dir: str | Path = "reports",
) -> Path:
    """Write ``<out_dir>/<out_name>.md`` comparing experiments ``names``; returns its path. Every name is looked
    up before anything is written, so a typo never replaces an existing report."""
    check_experiment_names("--compare", names, out_name, "compared")
    client, exp_id, uri = open_store(names[0], experiment, tracking_uri)
    runs = {n: collect(client, exp_id, n, None)[0] for n in names}
    evals = {n: ev for n in names if (ev := newest_stage(runs[n], "eval")) is not None}
    fig_dir = fresh_figure_dir(out_dir, out_name)
    command = f"python -m mchar report --compare {' '.join(names)} --name {out_name}"
    lines = [
        f"# mchar comparison: {out_name}",
        "",
        f"Generated {_dt.datetime.now().isoformat(timespec='seconds')} by `{command}` from `{redact_url(uri)}`, "
        f"experiment `{experiment}`: for each experiment its newest FINISHED stage runs. Every number below is read "
        "from that store.",
        "",
    ]
    lines += _experiments_table(runs)
    dnll_lines, figure = _dnll_section(evals, names, fig_dir, out_name)
    lines += dnll_lines
    lines += _paired_section(evals, names)
    retrieval_lines, retrieval_figure = _dnll_section(evals, names, fig_dir, out_name, RETRIEVAL_SET)
    lines += retrieval_lines + _paired_section(evals, names, RETRIEVAL_SET)
    lines += _tasks_section(evals, names)
    lines += _paired_tasks_section(client, evals, names)
    lines += _side_nets_section(runs, names)
    lines += _sources_section(runs)
    run_ids = {n: [r.run_id for r in _newest_per_stage(s)] for n, s in runs.items()}
    figures = [f.name for f in (figure, retrieval_figure) if f]
    return write_report(
        Path(out_dir), out_name, lines, uri, experiment, compared=names, runs=run_ids, figures=figures
    )
