"""Probe (diagnostic, not a test): pool the task outcomes of several evaluation runs and pair every policy with one.

Runs of one experiment under different seeds answer different examples (the task data follow the seed), so pooling
them multiplies the examples behind each accuracy. Each run's per-example files (``runs/<name>/eval/
task_samples_<policy>_local.jsonl``) are paired within the run (same prompts), and the discordant counts are summed
over runs before the exact McNemar test. Prints one markdown table: per task and length, each policy's pooled accuracy,
the examples only the reference / only the policy answers, and p.

Usage: .venv/bin/python scripts/probes/pooled_tasks.py [--reference lensnet] RUN [RUN ...]
       (e.g. tasks_large tasks_large_s1: ``python -m mchar fit +experiment=tasks_large name=tasks_large_s1 seed=1``)
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

from mchar.evals.paired_tasks import SAMPLES_PREFIX, mcnemar_exact, outcomes

RUNS = Path("runs")


def run_outcomes(name: str) -> dict[str, dict[tuple[str, int], float]]:
    """``{policy: {(task, doc id): 0/1}}`` of one run's local task suite."""
    files = sorted((RUNS / name / "eval").glob(f"{SAMPLES_PREFIX}*_local.jsonl"))
    if not files:
        raise SystemExit(f"pooled_tasks: no {SAMPLES_PREFIX}*_local.jsonl under {RUNS / name / 'eval'}")
    return {
        f.name[len(SAMPLES_PREFIX) : -len("_local.jsonl")]: outcomes(f.read_text().splitlines())
        for f in files
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--reference", default="lensnet")
    args = ap.parse_args()
    # (task, policy) -> [right, total, reference only, policy only]
    tally: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for name in args.runs:
        by_policy = run_outcomes(name)
        ref = by_policy.get(args.reference)
        if ref is None:
            raise SystemExit(f"pooled_tasks: run {name!r} has no {args.reference!r} outcomes")
        for policy, got in by_policy.items():
            for key, value in got.items():
                t = tally[(key[0], policy)]
                t[0] += value >= 0.5
                t[1] += 1
                if policy != args.reference and key in ref:
                    t[2] += ref[key] >= 0.5 and value < 0.5
                    t[3] += value >= 0.5 and ref[key] < 0.5
    print(f"| task | policy | accuracy | examples | only `{args.reference}` | only the policy | McNemar p |")
    print("|---|---|---|---|---|---|---|")
    for task, policy in sorted(tally, key=lambda tp: (tp[0], tp[1] != args.reference, -tally[tp][0], tp[1])):
        right, total, b, c = tally[(task, policy)]
        paired = ("", "", "") if policy == args.reference else (b, c, f"{mcnemar_exact(b, c):.3g}")
        print(
            f"| {task} | {policy} | {right / total:.3f} | {total} | {paired[0]} | {paired[1]} | {paired[2]} |"
        )


if __name__ == "__main__":
    main()
