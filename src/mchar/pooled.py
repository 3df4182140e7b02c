"""``python -m mchar report --pool A B ... --name OUT``: one experiment's task outcomes pooled over seed replicates.

Why: 100 examples per task and length leave a few-example gap between two needle-finders untestable, and more
examples come cheapest from reruns under other seeds (the task data follow the seed). Pooling them is only sound when
the runs answer different examples under the same setting, so both are checked before anything is written. Each
run's outcomes are paired within the run (every policy answered the same prompts), and the discordant counts are
summed over runs before the exact McNemar test. Every number is read from the MLflow store.
"""

from __future__ import annotations

import datetime as _dt
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from mchar import plots
from mchar.errors import MCharError, redact_url
from mchar.evals.paired_tasks import mcnemar_exact
from mchar.report import (
    RunInfo,
    check_experiment_names,
    collect,
    fmt,
    fresh_figure_dir,
    newest_stage,
    open_store,
    run_samples,
    table,
    write_report,
)

# settings that must agree between pooled runs (the seed, which draws the examples, is what may differ)
SAME_SETTING = ("allocator.budget", "tree.depth", "tree.block_size", "eval.task_examples", "eval.split")
LOCAL_TASK = re.compile(r"^mchar_(.+)_(\d+)$")  # mchar's own task suite: mchar_<task>_<length>

Outcomes = dict[tuple[str, int], tuple[float, str]]  # (task, doc id) -> (0/1, the example's identity)


@dataclass
class Tally:
    """One policy on one task, summed over runs: right answers, examples, and the examples only the reference /
    only this policy answers (paired within each run)."""

    right: int = 0
    examples: int = 0
    reference_only: int = 0
    policy_only: int = 0
    per_run: dict[str, list[int]] = field(default_factory=dict)  # run -> [right, examples]

    @property
    def accuracy(self) -> float:
        return self.right / self.examples if self.examples else float("nan")

    def run_accuracy(self, run: str) -> float | None:
        right, n = self.per_run.get(run, (0, 0))
        return right / n if n else None


def _check_setting(evals: dict[str, RunInfo]) -> None:
    """The pooled runs must differ in their examples only: one line naming the first setting that differs."""
    first, *rest = evals
    for key in SAME_SETTING:
        want = evals[first].params.get(key)
        for name in rest:
            got = evals[name].params.get(key)
            if got != want:
                raise MCharError(
                    f"report --pool: {key} differs ({first}: {want}, {name}: {got}); pool only seed replicates of "
                    "one setting"
                )


def _check_disjoint(samples: dict[str, dict[str, Outcomes]]) -> None:
    """No example may be counted twice: two runs under the same seed answer the same examples. (Runs under different
    seeds can share a rare example whose short fields coincide, e.g. one passkey drawn twice, so only a run that
    shares most of its examples with another is refused.)"""
    keys = {
        name: {(task_doc[0], identity) for task_doc, (_, identity) in next(iter(by_policy.values())).items()}
        for name, by_policy in samples.items()
    }
    names = list(keys)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            shared = len(keys[a] & keys[b])
            if shared * 2 > min(len(keys[a]), len(keys[b])):
                raise MCharError(
                    f"report --pool: {a} and {b} answer the same examples ({shared} shared; the same seed?): "
                    "pooling would count them twice"
                )


def pool_outcomes(samples: dict[str, dict[str, Outcomes]], reference: str) -> dict[tuple[str, str], Tally]:
    """``{(task, policy): Tally}`` over the runs in ``samples`` (``{run: {policy: outcomes}}``), each policy paired
    with ``reference`` within its own run."""
    tally: dict[tuple[str, str], Tally] = defaultdict(Tally)
    for name, by_policy in samples.items():
        ref = by_policy[reference]
        for policy, got in by_policy.items():
            for key, (value, _) in got.items():
                t = tally[(key[0], policy)]
                hit = value >= 0.5
                t.right += hit
                t.examples += 1
                run = t.per_run.setdefault(name, [0, 0])
                run[0] += hit
                run[1] += 1
                if policy != reference and key in ref:
                    ref_hit = ref[key][0] >= 0.5
                    t.reference_only += ref_hit and not hit
                    t.policy_only += hit and not ref_hit
    return dict(tally)


def _accuracy_plot(tally: dict[tuple[str, str], Tally], path: Path) -> Path | None:
    acc: dict[str, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for (task, policy), t in tally.items():
        if m := LOCAL_TASK.match(task):
            acc[policy][m.group(1)][int(m.group(2))] = t.accuracy
    return plots.task_accuracy(acc, path) if acc else None


def build_pooled(
    names: list[str],
    out_name: str,
    reference: str = "lensnet",
    experiment: str = "mchar",
    tracking_uri: str | None = None,
    out_dir: str | Path = "reports",
) -> Path:
    """Write ``<out_dir>/<out_name>.md``: the task outcomes of experiments ``names`` (seed replicates of one setting)
    pooled, each policy paired with ``reference``; returns its path. Everything is checked before anything is
    written, so a mistyped name or a mismatched run never replaces an existing report."""
    check_experiment_names("--pool", names, out_name, "pooled")
    client, exp_id, uri = open_store(names[0], experiment, tracking_uri)
    evals: dict[str, RunInfo] = {}
    for name in names:
        run = newest_stage(collect(client, exp_id, name, None)[0], "eval")
        if run is None:
            raise MCharError(f"report --pool: experiment {name!r} has no finished eval run")
        evals[name] = run
    _check_setting(evals)
    samples = {name: run_samples(client, run.run_id) for name, run in evals.items()}
    for name, by_policy in samples.items():
        if not by_policy:
            raise MCharError(
                f"report --pool: {name!r} logged no per-example task outcomes (eval.log_samples)"
            )
        if reference not in by_policy:
            raise MCharError(
                f"report --pool: {name!r} has no {reference!r} outcomes (policies: {', '.join(sorted(by_policy))})"
            )
    _check_disjoint(samples)
    tally = pool_outcomes(samples, reference)

    figure = _accuracy_plot(tally, fresh_figure_dir(out_dir, out_name) / "task_accuracy.png")
    command = f"python -m mchar report --pool {' '.join(names)} --name {out_name}"
    if reference != "lensnet":
        command += f" --reference {reference}"

    def order(key: tuple[str, str]) -> tuple[str, bool, float, str]:
        return (key[0], key[1] != reference, -tally[key].accuracy, key[1])

    rows = []
    for key in sorted(tally, key=order):
        t = tally[key]
        paired = (
            ["", "", ""]
            if key[1] == reference
            else [
                str(t.reference_only),
                str(t.policy_only),
                fmt(mcnemar_exact(t.reference_only, t.policy_only)),
            ]
        )
        rows.append(
            [
                key[0],
                key[1],
                *[fmt(t.run_accuracy(n)) for n in names],
                fmt(t.accuracy),
                str(t.examples),
                *paired,
            ]
        )
    lines = [
        f"# mchar pooled tasks: {out_name}",
        "",
        f"Generated {_dt.datetime.now().isoformat(timespec='seconds')} by `{command}` from `{redact_url(uri)}`, "
        f"experiment `{experiment}`: the newest finished eval run of each experiment, its per-example outcomes "
        "(`eval.log_samples`). Every number below is read from that store.",
        "",
        "## Pooled task accuracy",
        "",
        f"Each experiment's accuracy, the pooled accuracy over all of them, and every policy paired with `{reference}` "
        f"on the same examples within each run: *only {reference}* / *only the policy* count the examples one of the "
        "two answers, summed over runs; p: the exact two-sided McNemar test on those sums.",
        "",
        *table(
            [
                "task",
                "policy",
                *names,
                "pooled",
                "examples",
                f"only {reference}",
                "only the policy",
                "McNemar p",
            ],
            rows,
        ),
        "",
    ]
    if figure:
        lines += [f"![pooled task accuracy]({out_name}/{figure.name})", ""]
    lines += [
        "## Runs",
        "",
        *table(
            ["experiment", "eval run", "seed", *SAME_SETTING],
            [
                [n, f"`{r.run_id}`", r.params.get("seed", "—"), *[r.params.get(k, "—") for k in SAME_SETTING]]
                for n, r in evals.items()
            ],
        ),
        "",
    ]
    run_ids = {n: r.run_id for n, r in evals.items()}
    figures = [figure.name] if figure else []
    return write_report(
        Path(out_dir),
        out_name,
        lines,
        uri,
        experiment,
        pooled=names,
        reference=reference,
        runs=run_ids,
        figures=figures,
    )
