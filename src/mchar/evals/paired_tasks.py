"""Per-example task outcomes: the eval stage writes them (one file per policy and suite), the report pairs them.

Two policies answer the same prompts, so their accuracy difference is a paired one. Counting the examples only one of
them gets right (the discordant pairs) and testing them with the exact McNemar test says whether an accuracy gap of a
few examples out of 30 is more than chance."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SAMPLES_PREFIX = "task_samples_"  # the eval stage's per-example files: task_samples_<policy>_<suite>.jsonl
OUTCOME_METRICS = ("exact_match", "acc")  # generate / loglikelihood tasks
# a doc's string fields up to this length are kept with its outcome (the long context is not)
SAMPLE_FIELD_CHARS = 200


@dataclass(frozen=True)
class PairedOutcome:
    """One policy against the reference on one task, over the examples both answered."""

    policy: str
    task: str
    examples: int
    reference_acc: float
    policy_acc: float
    reference_only: int  # examples the reference gets right and the policy wrong
    policy_only: int
    p_value: float  # exact two-sided McNemar (binomial over the discordant pairs)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for ``b`` and ``c`` discordant pairs (1.0 when there are none)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def samples_filename(policy: str, suite: str) -> str:
    """The file the eval stage writes ``policy``'s outcomes on ``suite`` ("local" / "ruler") to."""
    return f"{SAMPLES_PREFIX}{policy}_{suite}.jsonl"


def write_samples(samples: Mapping[str, list[dict[str, Any]]], path: Path) -> Path:
    """lm-eval's ``samples`` as one JSON line per example: task, doc id, target, the (filtered) answer, its metrics and
    the doc's short fields (e.g. ``needle_depth``), so misses can be read and paired without the long prompt."""
    with path.open("w") as f:
        for task, rows in samples.items():
            for row in rows:
                doc = row.get("doc") or {}
                resp = row.get("filtered_resps") or [None]
                out = {
                    "task": task,
                    "doc_id": row.get("doc_id"),
                    "target": row.get("target"),
                    "response": resp[0] if len(resp) == 1 else resp,
                    **{m: row[m] for m in row.get("metrics", []) if m in row},
                    "doc": {
                        k: v
                        for k, v in doc.items()
                        if isinstance(v, int | float | bool)
                        or (isinstance(v, str) and len(v) <= SAMPLE_FIELD_CHARS)
                    },
                }
                f.write(json.dumps(out, default=str) + "\n")
    return path


def policy_of(filename: str) -> str | None:
    """``task_samples_<policy>_<suite>.jsonl`` -> policy (policy names may hold underscores)."""
    stem = Path(filename).name
    if not (stem.startswith(SAMPLES_PREFIX) and stem.endswith(".jsonl")):
        return None
    return stem[len(SAMPLES_PREFIX) : -len(".jsonl")].rsplit("_", 1)[0] or None


def identified_outcomes(lines: Iterable[str]) -> dict[tuple[str, int], tuple[float, str]]:
    """``{(task, doc id): (outcome, identity)}`` from a samples file's lines: the first outcome metric each row has, and
    the example's target and short doc fields as one string. Two runs share a doc id for different examples when
    their task data differ (another seed or tokenizer), so pairs across runs must also match on the identity."""
    out = {}
    for line in lines:
        if not line.strip():
            continue
        row = json.loads(line)
        value = next((row[m] for m in OUTCOME_METRICS if m in row), None)
        if value is not None:
            ident = json.dumps([row.get("target"), row.get("doc", {})], sort_keys=True, default=str)
            out[(str(row["task"]), int(row["doc_id"]))] = (float(value), ident)
    return out


def without_identity(identified: Mapping[tuple[str, int], tuple[float, str]]) -> dict[tuple[str, int], float]:
    """The outcomes of :func:`identified_outcomes`, for pairing within one run (where a doc id is one example)."""
    return {k: v for k, (v, _) in identified.items()}


def outcomes(lines: Iterable[str]) -> dict[tuple[str, int], float]:
    """``{(task, doc id): outcome}`` from a samples file's lines (the first outcome metric each row has)."""
    return without_identity(identified_outcomes(lines))


def pair(
    reference: Mapping[tuple[str, int], float], other: Mapping[tuple[str, int], float], label: str
) -> list[PairedOutcome]:
    """``other`` (named ``label``) against ``reference``, per task, on the examples both have (outcomes 0/1)."""
    rows = []
    for task in sorted({t for t, _ in reference}):
        keys = sorted(k for k in reference if k[0] == task and k in other)
        if not keys:
            continue
        r = [reference[k] >= 0.5 for k in keys]
        o = [other[k] >= 0.5 for k in keys]
        b = sum(x and not y for x, y in zip(r, o, strict=True))
        c = sum(y and not x for x, y in zip(r, o, strict=True))
        rows.append(
            PairedOutcome(
                label, task, len(keys), sum(r) / len(keys), sum(o) / len(keys), b, c, mcnemar_exact(b, c)
            )
        )
    return rows


def paired_outcomes(
    by_policy: Mapping[str, Mapping[tuple[str, int], float]], reference: str
) -> list[PairedOutcome]:
    """Every other policy against ``reference``, per task, on the examples both have (outcomes 0/1)."""
    ref = by_policy.get(reference)
    if not ref:
        return []
    return [
        row
        for policy in sorted(p for p in by_policy if p != reference)
        for row in pair(ref, by_policy[policy], policy)
    ]


def paired_runs(
    reference: Mapping[tuple[str, int], tuple[float, str]],
    other: Mapping[tuple[str, int], tuple[float, str]],
    label: str,
) -> tuple[list[PairedOutcome], int]:
    """One policy's outcomes in another run against the reference run's, on the examples that are the same in both
    (doc id *and* identity); also returns how many shared doc ids were left out because their examples differ."""
    same = [k for k in reference if k in other and reference[k][1] == other[k][1]]
    differ = sum(1 for k in reference if k in other) - len(same)
    rows = pair({k: reference[k][0] for k in same}, {k: other[k][0] for k in same}, label)
    return rows, differ
