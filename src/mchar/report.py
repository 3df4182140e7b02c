"""``python -m mchar report --name NAME``: ``reports/<name>.md`` + PNGs in ``reports/<name>/``, from MLflow only.

Every number in the report is read from the tracking store (nothing hard-coded), and each section names the
runs (and the command lines) it came from, so a reader can trace any figure back to a run. Sections whose
runs do not exist say "not run".

Scope: with ``run_id`` (a pipeline parent run, a sweep's study run, or a stage run) the report covers that run
and all its descendants; without it, every FINISHED stage run whose config ``name`` is NAME (the latest per
stage / per (budget, depth, policy)), so a main run plus a budget sweep of the same experiment combine.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mchar import plots
from mchar.errors import MCharError, redact_url
from mchar.evals.gap import GAP_TERMS
from mchar.evals.telemetry import FOCUS_METRICS

if TYPE_CHECKING:
    from mchar.evals.paired_tasks import PairedOutcome

# Headline sections show every ``final/*`` metric of the stage's latest run (stages name them differently:
# e.g. base_lm ``final/val_ppl``, gistnet ``final/dnll``/``final/dnll_lod1``, lensnet ``final/spearman``).
HEADLINE = ("base_lm", "gistnet", "lensnet", "e2e")


def set_patterns(ppl: str = "ppl") -> tuple[re.Pattern[str], re.Pattern[str]]:
    """(ΔNLL, paired-difference) metric patterns of the perplexity set whose metrics start with ``ppl``."""
    return re.compile(rf"^{ppl}/([^/]+)/delta_nll$"), re.compile(rf"^{ppl}/([^/]+)/vs_([^/]+)/mean$")


# a second perplexity set (eval.retrieval_documents): the same metrics under ppl_retrieval/
RETRIEVAL_SET = "ppl_retrieval"
# what each perplexity set's headings add (the code documents are the main set, "ppl")
SET_HEADINGS = {"ppl": "", RETRIEVAL_SET: " on held-out retrieval documents"}


def set_file_suffix(ppl: str) -> str:
    """Figure-name suffix of a perplexity set: none for the main set, ``_retrieval`` for ``ppl_retrieval``."""
    return "" if ppl == "ppl" else "_" + ppl.removeprefix("ppl_")


TASK = re.compile(r"^task/([^/]+)/(.+)/(\d+)/acc$")
NOT_RUN = "_not run_"
# Validation curves shown per side-net stage (``<set>/<metric>`` histories; ``gistnet.val_every`` /
# ``lensnet.val_every`` log one point per validation, the first before training starts).
# GistNet's gists against dropping the same blocks (per LOD, and in a session's cover) and LensNet's rank agreement
# next to recency's and the utilities' own ceiling: the side-net numbers every view of a run shows.
GISTNET_VS_DROP = (
    "dnll_lod1",
    "drop_dnll_lod1",
    "dnll_lod2",
    "drop_dnll_lod2",
    "dnll_session",
    "drop_dnll_session",
)
LENSNET_RANKING = (
    "spearman",
    "spearman/recency",
    "utility_split_half",
    "spearman_expected",
    "spearman_expected/recency",
    "utility_split_half_expected",
)
TRENDS = {
    "gistnet": (*GISTNET_VS_DROP, "subst_rate"),
    "lensnet": (
        *LENSNET_RANKING,
        "alloc_nll/lensnet",
        "alloc_nll/recency",
        "alloc_nll/similarity",
    ),
}
VAL_SETS = {"val": "held-out code windows", "val_retrieval": "held-out retrieval windows"}


@dataclass
class RunInfo:
    """The parts of an MLflow run the report uses."""

    run_id: str
    status: str
    start: int
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]
    children: list[RunInfo] = field(default_factory=list)
    # the sweep setting this run was made under when it is not budget/depth/policy ("seed=1"); "" outside sweeps
    variant: str = ""

    @property
    def stage(self) -> str | None:
        return self.tags.get("mchar.stage")

    def series(self, policy: str) -> str:
        """The label of ``policy``'s numbers from this run: the policy, plus the sweep variant that made them."""
        return f"{policy} [{self.variant}]" if self.variant else policy

    def int_param(self, key: str) -> int | None:
        try:
            return int(float(self.params[key]))
        except (KeyError, ValueError):
            return None


def default_tracking_uri(name: str) -> str:
    """The store ``fit +experiment=NAME`` would use (config, then $MLFLOW_TRACKING_URI, then runs/mlflow.db)."""
    from mchar.compose import available_experiments, compose_config
    from mchar.tracking.mlflow_tracking import tracking_uri

    overrides = [f"+experiment={name}"] if name in available_experiments() else []
    return tracking_uri(compose_config(overrides))


def _info(run: Any) -> RunInfo:
    return RunInfo(
        run.info.run_id,
        run.info.status,
        int(run.info.start_time or 0),
        dict(run.data.params),
        dict(run.data.metrics),
        dict(run.data.tags),
    )


def _search(client: Any, exp_id: str, filter_string: str) -> list[RunInfo]:
    out: list[RunInfo] = []
    token = None
    while True:
        page = client.search_runs(
            [exp_id],
            filter_string,
            max_results=1000,
            order_by=["attributes.start_time DESC"],
            page_token=token,
        )
        out += [_info(r) for r in page]
        token = page.token
        if not token:
            return out


def outside_sweeps(client: Any, stages: list[RunInfo]) -> list[RunInfo]:
    """The stage runs of ``fit``/``eval`` commands: a sweep's trials run under the experiment's name too (a budget
    sweep over the quickstart is ``name=quickstart``), and its trials must not stand in for the experiment (the
    sweep has its own report: ``report --name <study>``)."""
    parents = {r.tags.get("mlflow.parentRunId") for r in stages} - {None}
    in_sweep = {p for p in parents if "mchar.study" in client.get_run(p).data.tags}
    return [r for r in stages if r.tags.get("mlflow.parentRunId") not in in_sweep]


def collect(client: Any, exp_id: str, name: str, run_id: str | None) -> tuple[list[RunInfo], RunInfo | None]:
    """Stage runs in scope (newest first) and the root run: ``run_id``'s; without one, the finished stage runs of
    experiment ``name`` (those of its own commands when sweep trials used the name too), else the newest study run
    of sweep ``name``. Finding nothing is an error, so a mistyped name never overwrites a report with an empty one."""
    if run_id is None:
        runs = _search(client, exp_id, f"params.name = '{name}' and attributes.status = 'FINISHED'")
        staged = [r for r in runs if r.stage]
        if staged:  # a name only sweep trials used (``name=gh_t{trial}``) is theirs to report
            return outside_sweeps(client, staged) or staged, None
        studies = _search(client, exp_id, f"tags.`mchar.study` = '{name}' and tags.`mchar.role` = 'study'")
        if not studies:
            raise MCharError(
                f"report: no finished runs of experiment {name!r} and no sweep study {name!r} in the tracking store"
            )
        run_id = studies[0].run_id
    try:
        root = _info(client.get_run(run_id))
    except Exception as err:
        raise MCharError(
            f"report: run {run_id!r} not found in the tracking store: {str(err).splitlines()[0]}"
        ) from None
    frontier, stages = [root], []
    while frontier:
        run = frontier.pop()
        if run.stage and run.status == "FINISHED":
            stages.append(run)
        run.children = _search(client, exp_id, f"tags.`mlflow.parentRunId` = '{run.run_id}'")
        frontier += run.children
    stages.sort(key=lambda r: -r.start)
    return stages, root


def fmt(v: float | None) -> str:
    return "—" if v is None or v != v else f"{v:.4g}"


def _param(v: str) -> str:
    """A logged parameter as shown: sampled floats (``0.00042246380742484593``) to 4 significant digits."""
    try:
        x = float(v)
    except ValueError:
        return v
    return f"{x:.4g}" if "." in v and len(v) > 8 else v


def _of_variant(run: RunInfo) -> str:
    return f", the newest trial's: {run.variant}" if run.variant else ""


def _ids(runs: list[RunInfo]) -> str:
    return ", ".join(f"`{r.run_id}`" for r in runs)


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *["| " + " | ".join(r) + " |" for r in rows],
    ]


def _counted(label: str, count: str | None) -> str:
    """A validation set's column header with how many windows it read (runs tagged since stop 49)."""
    return f"{label} ({count})" if count else label


def _headline(stages: list[RunInfo]) -> list[str]:
    lines = ["## Headline metrics", ""]
    for stage in HEADLINE:
        run = next((r for r in stages if r.stage == stage), None)
        if run is None:
            lines += [f"**{stage}**: {NOT_RUN}", ""]
            continue
        plain = {k[6:]: v for k, v in run.metrics.items() if k.startswith("final/")}
        retr = {k[16:]: v for k, v in run.metrics.items() if k.startswith("final_retrieval/")}
        lines += [f"**{stage}** (run `{run.run_id}`{_of_variant(run)})", ""]
        if retr:  # side nets validated twice: held-out code windows and held-out retrieval windows
            header = [
                "metric",
                _counted("held-out code windows", run.tags.get("mchar.val_windows")),
                _counted("held-out retrieval windows", run.tags.get("mchar.val_retrieval_windows")),
            ]
            rows = [
                [f"final/{k}", fmt(plain.get(k)), fmt(retr.get(k))] for k in sorted(set(plain) | set(retr))
            ]
        else:
            header, rows = ["metric", "value"], [[f"final/{k}", fmt(v)] for k, v in sorted(plain.items())]
        lines += table(header, rows) if rows else [f"{NOT_RUN} (no final metrics logged)"]
        lines.append("")
    return lines


def _eval_rows(evals: list[RunInfo], ppl: str = "ppl") -> list[dict[str, Any]]:
    """Latest value per (budget, depth, policy and sweep variant) across eval runs."""
    pattern = set_patterns(ppl)[0]
    seen: dict[tuple[Any, ...], dict[str, Any]] = {}
    for run in evals:  # newest first
        for key, value in run.metrics.items():
            m = pattern.match(key)
            if not m:
                continue
            policy = m.group(1)
            ident = (run.int_param("allocator.budget"), run.int_param("tree.depth"), run.series(policy))
            if ident in seen or ident[0] is None:
                continue
            seen[ident] = {
                "budget": ident[0],
                "depth": ident[1],
                "policy": ident[2],
                "delta_nll": value,
                "nll": run.metrics.get(f"{ppl}/{policy}/nll"),
                "ci_low": run.metrics.get(f"{ppl}/{policy}/delta_nll_ci_low"),
                "ci_high": run.metrics.get(f"{ppl}/{policy}/delta_nll_ci_high"),
                "full": run.metrics.get(f"{ppl}/{policy}/full_nll", run.metrics.get(f"{ppl}/full/nll")),
                "documents": run.metrics.get(f"{ppl}/{policy}/documents"),
                "run": run,
                "block": run.int_param("tree.block_size"),
            }
    return sorted(seen.values(), key=lambda r: (r["depth"] or 0, r["policy"], r["budget"]))


def _perplexity(
    evals: list[RunInfo], out: Path, rel: str, figures: list[Path], ppl: str = "ppl"
) -> list[str]:
    lines = [f"## Perplexity at budget{SET_HEADINGS[ppl]} (ΔNLL vs full context)", ""]
    if ppl == RETRIEVAL_SET:
        lines += [
            "Held-out files with retrieval episodes spliced in like the training mix, the last answer among the "
            "scored tokens (`eval.retrieval_documents`): where the next tokens depend on far context.",
            "",
        ]
    rows = _eval_rows(evals, ppl)
    if not rows:
        return [*lines, NOT_RUN, ""] if ppl == "ppl" else []
    body = [
        [
            str(r["budget"]),
            str(r["depth"]),
            str(r["block"]),
            r["policy"],
            fmt(r["nll"]),
            fmt(r["delta_nll"]),
            f"[{fmt(r['ci_low'])}, {fmt(r['ci_high'])}]",
            fmt(r["full"]),
            "" if r["documents"] is None else str(int(r["documents"])),
            f"`{r['run'].run_id[:12]}`",
        ]
        for r in rows
    ]
    header = ["budget", "depth", "K", "policy", "NLL", "ΔNLL", "95% CI", "full NLL", "documents", "run"]
    lines += table(header, body)
    png = f"dnll_vs_budget{set_file_suffix(ppl)}.png"
    figures.append(plots.dnll_vs_budget(rows, out / png))
    lines += ["", f"![ΔNLL vs budget]({rel}/{png})", ""]
    return lines


def _paired(evals: list[RunInfo], ppl: str = "ppl") -> list[str]:
    """Per-document paired differences to the reference policy, from the newest eval run that has them (in a sweep
    over another setting, the newest of each variant: each row compares within its own trial)."""
    paired = set_patterns(ppl)[1]
    groups = _by_point(evals, lambda r: any(paired.match(k) for k in r.metrics))
    runs = groups[0] if groups else []  # the newest run's (budget, depth)
    variants: dict[str, RunInfo] = {}
    for r in runs:
        variants.setdefault(r.variant, r)
    runs = sorted(variants.values(), key=lambda r: r.variant)
    if not runs:
        return []
    rows, ref = [], ""
    for run in runs:
        for key in sorted(run.metrics):
            m = paired.match(key)
            if not m:
                continue
            policy, ref = run.series(m.group(1)), m.group(2)
            rows.append([policy, *_paired_cells(run.metrics, key.rsplit("/", 1)[0])])
    lines = [
        f"### Paired: NLL(policy) − NLL({ref}) per document",
        "",
        f"Budget {runs[0].int_param('allocator.budget')}, depth {runs[0].int_param('tree.depth')}; "
        f"{'runs' if len(runs) > 1 else 'run'} {_ids(runs)}. Positive = {ref} better; the interval is over "
        "documents of the same paired difference, so it is much tighter than the ΔNLL intervals above.",
        "",
    ]
    return [*lines, *table(["policy", "mean difference", "95% CI", f"documents where {ref} wins"], rows), ""]


def _paired_cells(metrics: dict[str, float], stem: str) -> list[str]:
    """A logged paired difference (``<stem>/mean``, ``/ci_low``, ``/ci_high``, ``/wins``, ``/documents``) as cells:
    mean, interval, wins of the documents."""
    lo, hi = metrics.get(f"{stem}/ci_low"), metrics.get(f"{stem}/ci_high")
    wins, docs = metrics.get(f"{stem}/wins"), metrics.get(f"{stem}/documents")
    return [
        fmt(metrics[f"{stem}/mean"]),
        f"[{fmt(lo)}, {fmt(hi)}]",
        f"{int(wins)}/{int(docs)}" if wins is not None and docs else fmt(wins),
    ]


def _gap(evals: list[RunInfo], ppl: str = "ppl") -> list[str]:
    """The parts of ``lensnet − recency`` (:mod:`mchar.evals.gap`) at every (budget, depth) that has them."""
    policies = {p for pair in GAP_TERMS.values() for p in pair}

    def has_gap(r: RunInfo) -> bool:
        return any(
            f"{ppl}/gap/{t}/mean" in r.metrics or f"{ppl}/{p}/delta_nll" in r.metrics
            for t in GAP_TERMS
            for p in policies
        )

    rows = [
        row
        for runs in _by_point(evals, has_gap)
        for term, (policy, reference) in GAP_TERMS.items()
        for row in _gap_rows(runs, ppl, term, policy, reference)
    ]
    if not rows:
        return []
    lines = [
        "### Where lensnet's gap to recency comes from",
        "",
        "The two parts add up to NLL(lensnet) − NLL(recency) per document: *cover*, what keeping a gist cover costs "
        "against truncation at the same budget (a cover can never hold truncation's last raw block); *focus*, what "
        "the learned focus adds to that cover. Positive = the second policy better. A row without an interval comes "
        "from two runs that each scored one of the policies on the same documents (a sweep's trials): the difference "
        "of their ΔNLLs, which is the paired mean.",
        "",
    ]
    header = [
        "budget",
        "depth",
        "part",
        "difference",
        "mean",
        "95% CI",
        "documents where the second wins",
        "runs",
    ]
    return [*lines, *table(header, rows), ""]


def _gap_rows(runs: list[RunInfo], ppl: str, term: str, policy: str, reference: str) -> list[list[str]]:
    """One part at one (budget, depth): from the newest run of each sweep variant that logged it paired, else from the
    newest runs (outside sweep variants) that scored each of the two policies on the same documents."""
    stem = f"{ppl}/gap/{term}"
    pair = f"NLL({policy}) − NLL({reference})"
    variants: dict[str, RunInfo] = {}
    for run in runs:
        if f"{stem}/mean" in run.metrics:
            variants.setdefault(run.variant, run)
    rows = []
    for run in sorted(variants.values(), key=lambda r: r.variant):
        label = f"{term} [{run.variant}]" if run.variant else term
        rows.append([*_point(runs), label, pair, *_paired_cells(run.metrics, stem), f"`{run.run_id[:12]}`"])
    if rows:
        return rows
    newest: dict[str, RunInfo] = {}
    for run in runs:
        for p in (policy, reference):
            if not run.variant and f"{ppl}/{p}/delta_nll" in run.metrics:
                newest.setdefault(p, run)
    if len(newest) < 2:
        return []
    a, b = newest[policy].metrics, newest[reference].metrics
    docs, full = a.get(f"{ppl}/{policy}/documents"), a.get(f"{ppl}/full/nll")
    if (
        docs is None
        or full is None
        or (docs, full) != (b.get(f"{ppl}/{reference}/documents"), b.get(f"{ppl}/full/nll"))
    ):
        return []  # not provably the same documents
    diff = a[f"{ppl}/{policy}/delta_nll"] - b[f"{ppl}/{reference}/delta_nll"]
    ids = ", ".join(dict.fromkeys(f"`{newest[p].run_id[:12]}`" for p in (policy, reference)))
    return [[*_point(runs), term, pair, fmt(diff), "—", "—", ids]]


def _by_point(evals: list[RunInfo], predicate: Any) -> list[list[RunInfo]]:
    """Eval runs with the wanted metrics grouped by (budget, depth), each group newest first; the newest run's
    group leads (its plot is the one drawn), the others follow in (budget, depth) order."""
    groups: dict[tuple[int | None, int | None], list[RunInfo]] = {}
    for r in evals:
        if predicate(r):
            groups.setdefault((r.int_param("allocator.budget"), r.int_param("tree.depth")), []).append(r)
    if not groups:
        return []
    lead = next(iter(groups))
    rest = sorted((k for k in groups if k != lead), key=lambda k: tuple(-1 if v is None else v for v in k))
    return [groups[k] for k in (lead, *rest)]


def _point(runs: list[RunInfo]) -> list[str]:
    return [str(runs[0].params.get("allocator.budget")), str(runs[0].params.get("tree.depth"))]


def _point_note(groups: list[list[RunInfo]]) -> list[str]:
    """One (budget, depth): say which and the runs; several (a sweep): the tables get budget and depth columns."""
    if len(groups) == 1:
        runs = groups[0]
        return [
            f"Budget {runs[0].params.get('allocator.budget')}, depth {runs[0].params.get('tree.depth')}; "
            f"runs {_ids(runs)}.",
            "",
        ]
    lead = groups[0][0]
    return [
        f"Every (budget, depth) of {sum(map(len, groups))} eval runs; the plot shows budget "
        f"{lead.params.get('allocator.budget')}, depth {lead.params.get('tree.depth')} (the newest run's).",
        "",
    ]


def _tasks(evals: list[RunInfo], out: Path, rel: str, figures: list[Path]) -> list[str]:
    lines = ["## Task accuracy vs context length", ""]
    groups = _by_point(evals, lambda r: any(TASK.match(k) for k in r.metrics))
    if not groups:
        return [*lines, NOT_RUN, ""]
    per_point = []
    for runs in groups:
        acc: dict[str, dict[str, dict[int, float]]] = {}
        for run in reversed(runs):  # newest wins
            for key, value in run.metrics.items():
                m = TASK.match(key)
                if m:
                    acc.setdefault(run.series(m.group(1)), {}).setdefault(m.group(2), {})[int(m.group(3))] = (
                        value
                    )
        per_point.append((_point(runs), acc))
    lengths = sorted({n for _, acc in per_point for per in acc.values() for t in per.values() for n in t})
    point_cols = ["budget", "depth"] if len(groups) > 1 else []
    rows = [
        [*(point if point_cols else []), p, t, *[fmt(acc[p].get(t, {}).get(n)) for n in lengths]]
        for point, acc in per_point
        for p in sorted(acc)
        for t in sorted({t for per in acc.values() for t in per})
    ]
    lines += _point_note(groups)
    lines += table([*point_cols, "policy", "task", *[str(n) for n in lengths]], rows)
    figures.append(plots.task_accuracy(per_point[0][1], out / "task_accuracy.png"))
    lines += ["", f"![task accuracy]({rel}/task_accuracy.png)", ""]
    return lines


def run_samples(client: Any, run_id: str) -> dict[str, dict[tuple[str, int], tuple[float, str]]]:
    """Per policy, the per-example task outcomes an eval run logged (``eval.log_samples``), with each example's
    identity (:func:`mchar.evals.paired_tasks.identified_outcomes`); empty when it logged none."""
    from mchar.evals.paired_tasks import identified_outcomes, policy_of

    try:
        files = [f.path for f in client.list_artifacts(run_id, "eval/lm_eval") if policy_of(f.path)]
    except Exception:
        files = []
    by_policy: dict[str, dict[tuple[str, int], tuple[float, str]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for artifact in sorted(files):
            local = Path(client.download_artifacts(run_id, artifact, tmp))
            by_policy.setdefault(str(policy_of(artifact)), {}).update(
                identified_outcomes(local.read_text().splitlines())
            )
    return by_policy


def _paired_tasks(client: Any, evals: list[RunInfo], reference: str = "lensnet") -> list[str]:
    """Task outcomes of every policy against ``reference`` on the same examples, from the newest eval run that logged
    them (``eval.log_samples``): discordant counts and the exact McNemar p-value."""
    from mchar.evals.paired_tasks import paired_outcomes, without_identity

    for run in evals:
        samples = run_samples(client, run.run_id)
        if not samples:
            continue
        by_policy = {p: without_identity(rows) for p, rows in samples.items()}
        rows = paired_outcomes(by_policy, reference)
        if not rows:
            return []
        lines = [
            f"### Paired task outcomes: {reference} vs each policy on the same examples",
            "",
            f"Run `{run.run_id}`. *{reference} only* / *policy only*: examples one of the two answers and the other "
            "misses; p: exact two-sided McNemar test on those, so a gap of a few examples reads as what it is.",
            "",
        ]
        header = ["policy", "task", "examples", f"{reference} acc", "policy acc", f"{reference} only"]
        return [*lines, *table([*header, "policy only", "McNemar p"], [paired_cells(r) for r in rows]), ""]
    return []


def paired_cells(r: PairedOutcome) -> list[str]:
    """A :class:`~mchar.evals.paired_tasks.PairedOutcome` as table cells: policy, task, examples, both accuracies,
    the discordant counts, McNemar p."""
    return [
        r.policy,
        r.task,
        str(r.examples),
        fmt(r.reference_acc),
        fmt(r.policy_acc),
        str(r.reference_only),
        str(r.policy_only),
        fmt(r.p_value),
    ]


def _telemetry(evals: list[RunInfo], out: Path, rel: str, figures: list[Path]) -> list[str]:
    lines = ["## Focus telemetry (swap rate, budget use, residency)", ""]
    groups = _by_point(evals, lambda r: any(k.startswith("focus/") for k in r.metrics))
    if not groups:
        return [*lines, NOT_RUN, ""]
    per_point = []
    for runs in groups:
        rows: dict[str, dict[str, float]] = {}
        for run in reversed(runs):
            for key, value in run.metrics.items():
                parts = key.split("/", 2)
                if len(parts) == 3 and parts[0] == "focus":
                    rows.setdefault(run.series(parts[1]), {})[parts[2]] = value
        per_point.append((_point(runs), rows))
    lines += _point_note(groups)
    lods = sorted(
        {
            k.split("/", 1)[1]
            for _, rows in per_point
            for v in rows.values()
            for k in v
            if k.startswith("lod_share/")
        },
        key=lambda lod: (not lod.isdigit(), int(lod) if lod.isdigit() else 0),
    )
    lines += [
        "Raw tokens and gist slots: the mean raw tokens and gist entries in the working context per refocus (their "
        "sum is budget util x budget), over the whole stream, and (scored) over the contexts the scored final "
        "tokens are predicted from, which is what ΔNLL compares; LOD shares: the mean share of the history seen so "
        "far held at each LOD.",
        "",
    ]
    keys = [*FOCUS_METRICS, *[f"lod_share/{x}" for x in lods]]
    point_cols = ["budget", "depth"] if len(groups) > 1 else []
    lines += table(
        [*point_cols, "policy", *FOCUS_METRICS.values()] + [f"LOD{x}" if x.isdigit() else x for x in lods],
        [
            [*(point if point_cols else []), p, *[fmt(v.get(k)) for k in keys]]
            for point, rows in per_point
            for p, v in sorted(rows.items())
        ],
    )
    figures.append(plots.telemetry(per_point[0][1], out / "telemetry.png"))
    lines += ["", f"![telemetry]({rel}/telemetry.png)", ""]
    return lines


def _focus_maps(client: Any, evals: list[RunInfo], out: Path, rel: str, figures: list[Path]) -> list[str]:
    import numpy as np

    lines = ["## Focus map", ""]
    for run in evals:
        try:
            files = [
                f.path
                for f in client.list_artifacts(run.run_id, "eval")
                if f.path.endswith(".npy") and "focus_map" in f.path
            ]
        except Exception:
            files = []
        if not files:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            for artifact in sorted(files):
                local = client.download_artifacts(run.run_id, artifact, tmp)
                arr = np.load(local)
                stem = Path(artifact).stem
                title = (
                    f"{stem}: policy {run.params.get('allocator.policy') or run.params.get('eval.policies', '?')}, budget "
                    f"{run.params.get('allocator.budget', '?')}, depth {run.params.get('tree.depth', '?')}"
                )
                figures.append(plots.focus_map(arr, out / f"{stem}.png", title))
                levels = {int(v): int(c) for v, c in zip(*np.unique(arr, return_counts=True), strict=True)}
                lines += [
                    f"`{artifact}` of run `{run.run_id}`: {arr.shape[0]} refocus steps × {arr.shape[1]} "
                    f"positions; cells per LOD (−2 = not yet seen, −1 = dropped): {levels}.",
                    "",
                    f"![focus map]({rel}/{stem}.png)",
                    "",
                ]
        return lines
    return [*lines, NOT_RUN, ""]


def _trends(client: Any, stages: list[RunInfo], out: Path, rel: str, figures: list[Path]) -> list[str]:
    """Validation metrics over training steps for the latest GistNet / LensNet run (when validated > once)."""
    lines = ["## Training trends (validation over steps)", ""]
    found = False
    for stage, metrics in TRENDS.items():
        run = next((r for r in stages if r.stage == stage), None)
        if run is None:
            continue
        for vset, label in VAL_SETS.items():
            curves: dict[str, dict[int, float]] = {}
            for m in metrics:
                if f"{vset}/{m}" in run.metrics:
                    hist = client.get_metric_history(run.run_id, f"{vset}/{m}")
                    curves[m] = {int(h.step): float(h.value) for h in hist}
            steps = sorted({st for c in curves.values() for st in c})
            if len(steps) < 2:
                continue
            found = True
            name = f"trend_{stage}_{vset}"
            lines += [
                f"**{stage}**, {label} (run `{run.run_id}`{_of_variant(run)}; step 0 = before training):",
                "",
            ]
            lines += table(
                ["step", *curves], [[str(st), *[fmt(c.get(st)) for c in curves.values()]] for st in steps]
            )
            figures.append(plots.trends(curves, out / f"{name}.png", f"{stage}: {label}"))
            lines += ["", f"![{stage} trend]({rel}/{name}.png)", ""]
    return lines if found else [*lines, f"{NOT_RUN} (validated once; set gistnet/lensnet.val_every)", ""]


def _sweep(root: RunInfo | None) -> list[str]:
    if root is None or root.tags.get("mchar.role") != "study":
        return []
    keys = [k for k in root.params.get("search_space", "").split(",") if k]
    lines = [
        f"## Sweep `{root.tags.get('mchar.study', '?')}` (study run `{root.run_id}`)",
        "",
        f"Metric `{root.params.get('metric', '?')}` ({root.params.get('direction', '?')}), sampler "
        f"{root.params.get('sampler', '?')}, pruner {root.params.get('pruner', '?')}.",
        "",
    ]
    trials = sorted(root.children, key=lambda r: int(r.tags.get("mchar.trial", "0")))
    # the trials' task accuracies next to the objective: the perplexity and task sections below key on budget, depth
    # and policy, so a sweep over anything else (a seed, a LensNet setting) shows only one trial there
    found = [_subtree_metrics(r) for r in trials]
    tasks = sorted(
        {k for m in found for k in m if k.startswith("task/") and k.endswith("/acc")},
        key=lambda k: [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in k.split("/")],
    )
    tasks = tasks if len(tasks) <= MAX_SWEEP_TASK_COLUMNS else []
    side = [k for k in SWEEP_SIDE_METRICS if any(k in m for m in found)]
    rows = [
        [
            r.tags.get("mchar.trial", "?"),
            r.tags.get("optuna.state", r.status),
            *[_param(r.params.get(k, "—")) for k in keys],
            fmt(float(r.tags["optuna.value"])) if "optuna.value" in r.tags else "—",
            *[fmt(m.get(k)) for k in side],
            *[fmt(m.get(t)) for t in tasks],
            f"`{r.run_id[:12]}`",
        ]
        for r, m in zip(trials, found, strict=True)
    ]
    task_names = [t[len("task/") : -len("/acc")] for t in tasks]
    header = ["trial", "state", *keys, "value", *[side_label(k) for k in side], *task_names, "run"]
    return [*lines, *table(header, rows), ""]


MAX_SWEEP_TASK_COLUMNS = 8
# side-net held-out numbers shown per trial when a trial's stages logged them (GistNet's gists against dropping the
# same blocks, and in a session's cover; LensNet's rank agreement), whatever the objective is
SWEEP_SIDE_METRICS = (
    "final/dnll_lod1",
    "final/drop_dnll_lod1",
    "final/dnll_session",
    "final/drop_dnll_session",
    "final/spearman",
    "final/spearman_expected",
    "final_retrieval/spearman",
    "final_retrieval/spearman_expected",
)


def side_label(key: str) -> str:
    """``final/spearman`` -> ``spearman``; another validation set's ``final_<set>/spearman`` -> ``spearman (<set>)``."""
    prefix, metric = key.split("/", 1)
    held_out = prefix.removeprefix("final").lstrip("_")
    return f"{metric} ({held_out})" if held_out else metric


# what the perplexity, task and telemetry sections already tell apart
SECTION_KEYS = ("allocator.budget", "tree.depth", "allocator.policy")


def label_sweep_variants(root: RunInfo | None) -> None:
    """Mark every run under a study's trial with the trial's values of the searched settings that the per-policy
    sections do not key on (a seed, a LensNet setting), so trials show as separate rows instead of the newest
    hiding the others."""
    if root is None or root.tags.get("mchar.role") != "study":
        return
    keys = [k for k in root.params.get("search_space", "").split(",") if k and k not in SECTION_KEYS]
    if not keys:
        return
    for trial in root.children:
        label = ", ".join(f"{k}={trial.params.get(k, '—')}" for k in keys)
        frontier = [trial]
        while frontier:
            run = frontier.pop()
            run.variant = label
            frontier += run.children


def _subtree_metrics(run: RunInfo) -> dict[str, float]:
    """A run's metrics merged with every descendant's (a trial's eval stage is a child of the trial run)."""
    out: dict[str, float] = {}
    for child in run.children:
        out |= _subtree_metrics(child)
    return out | run.metrics


def check_report_name(name: str) -> None:
    """A report name becomes ``<out_dir>/<name>.md`` and a figure folder: a path in it would write elsewhere."""
    from mchar.config import PLAIN_NAME

    if not PLAIN_NAME.match(name):
        raise MCharError(
            f"report: --name {name!r} must be a plain name (letters, digits, '_', '.', '-'), not a path"
        )


def command_cell(run: RunInfo) -> str:
    """The command line a run was started with, as a Markdown table cell."""
    return "`" + run.tags.get("argv", run.tags.get("command", "?")).replace("|", "\\|") + "`"


def newest_stage(runs: list[RunInfo], stage: str) -> RunInfo | None:
    """The newest run of ``stage`` among ``runs`` (newest first, as :func:`collect` returns them)."""
    return next((r for r in runs if r.stage == stage), None)


def fresh_figure_dir(out_dir: str | Path, name: str) -> Path:
    """``<out_dir>/<name>/``, created, without the PNGs an earlier build of the report left (a figure the new build
    does not draw must not linger beside it)."""
    fig_dir = Path(out_dir) / name
    fig_dir.mkdir(parents=True, exist_ok=True)
    for old in fig_dir.glob("*.png"):
        old.unlink()
    return fig_dir


def check_experiment_names(flag: str, names: list[str], out_name: str, role: str) -> None:
    """The experiments a multi-experiment report (``--compare``, ``--pool``) reads: at least two, each once, and
    none whose own report ``--name`` would overwrite."""
    check_report_name(out_name)
    if len(names) < 2:
        raise MCharError(f"report {flag}: give at least two experiment names (got {len(names)})")
    if len(set(names)) != len(names):
        raise MCharError(f"report {flag}: an experiment is named twice in {names}")
    if out_name in names:
        raise MCharError(
            f"report {flag}: --name {out_name!r} is one of the {role} experiments; its own report would be "
            "overwritten (choose another --name)"
        )


def write_report(
    out_dir: Path, name: str, lines: list[str], uri: str, experiment: str, **sources: Any
) -> Path:
    """``<out_dir>/<name>.md`` and, beside its figures, ``sources.json`` naming the store (its URI without
    credentials), the experiment and ``sources`` (the runs it was read from, its figures)."""
    path = out_dir / f"{name}.md"
    path.write_text("\n".join(lines) + "\n")
    record = {"tracking_uri": redact_url(uri), "experiment": experiment, **sources}
    (out_dir / name / "sources.json").write_text(json.dumps(record, indent=2))
    return path


def require_store(uri: str, command: str) -> None:
    """A SQLite store that is not there stops in one line: MLflow would create an empty one at a mistyped path."""
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).exists():
        raise MCharError(
            f"{command}: no tracking store at {uri} (run `python -m mchar fit` first, or --tracking-uri)"
        )


def open_store(name: str, experiment: str, tracking_uri: str | None) -> tuple[Any, str, str]:
    """``(client, experiment id, uri)`` of the store a report reads; an absent store or experiment is one line."""
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(name)
    require_store(uri, "report")
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise MCharError(f"report: no MLflow experiment {experiment!r} in {uri}")
    return client, exp.experiment_id, uri


def build_report(
    name: str = "quickstart",
    experiment: str = "mchar",
    tracking_uri: str | None = None,
    run_id: str | None = None,
    out_dir: str | Path = "reports",
) -> Path:
    """Write ``<out_dir>/<name>.md`` and its figures; returns the Markdown path."""
    check_report_name(name)
    client, exp_id, uri = open_store(name, experiment, tracking_uri)
    stages, root = collect(client, exp_id, name, run_id)
    scope_id = root.run_id if root else None
    label_sweep_variants(root)
    out_root = Path(out_dir)
    fig_dir = fresh_figure_dir(out_root, name)
    evals = [r for r in stages if r.stage == "eval"]
    figures: list[Path] = []
    scope = (
        f"run `{scope_id}` and its descendants"
        if scope_id
        else f"all FINISHED stage runs with `name={name}` (latest per stage / per budget, depth, policy)"
    )
    lines = [
        f"# mchar report: {name}",
        "",
        f"Generated {_dt.datetime.now().isoformat(timespec='seconds')} by `python -m mchar report --name {name}"
        f"{' --run-id ' + run_id if run_id else ''}` from `{redact_url(uri)}`, experiment `{experiment}`; "
        f"scope: {scope}. Every number below is read from that store.",
        "",
    ]
    lines += _headline(stages)
    lines += _trends(client, stages, fig_dir, name, figures)
    lines += _sweep(root)
    lines += _perplexity(evals, fig_dir, name, figures)
    lines += _paired(evals)
    lines += _gap(evals)
    lines += _perplexity(evals, fig_dir, name, figures, RETRIEVAL_SET)
    lines += _paired(evals, RETRIEVAL_SET)
    lines += _gap(evals, RETRIEVAL_SET)
    lines += _tasks(evals, fig_dir, name, figures)
    lines += _paired_tasks(client, evals)
    lines += _telemetry(evals, fig_dir, name, figures)
    lines += _focus_maps(client, evals, fig_dir, name, figures)
    lines += ["## Runs and commands", ""]
    if stages:
        lines += table(
            ["run", "stage", "budget", "depth", "started", "command"],
            [
                [
                    f"`{r.run_id}`",
                    r.stage or "",
                    r.params.get("allocator.budget", "—"),
                    r.params.get("tree.depth", "—"),
                    _dt.datetime.fromtimestamp(r.start / 1000).isoformat(timespec="seconds"),
                    command_cell(r),
                ]
                for r in stages
            ],
        )
    else:
        lines.append(NOT_RUN)
    runs = [r.run_id for r in stages]
    figure_names = [f.name for f in figures]
    return write_report(
        out_root, name, lines, uri, experiment, run_id=scope_id, runs=runs, figures=figure_names
    )
