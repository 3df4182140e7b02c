"""Paired per-document comparison of one policy between two evaluations of the same documents.

An eval run's paired table compares policies within that run; an allocator or LensNet setting evaluated as its own
run (``name=X ... 'eval.policies=[lensnet]'``) needs its per-document NLLs paired with the reference run's. Reads
both ``runs/<name>/eval/results.json``; refuses runs whose full-context NLLs differ (not the same documents).

    python scripts/probes/paired_runs.py REFERENCE_NAME OTHER_NAME [OTHER_NAME ...] [--policy lensnet]
        [--against recency lexical ...]

Prints, per document set (code, retrieval), the other run's ΔNLL and NLL(other) − NLL(reference) with its 95 % t
interval (positive = the reference run better); ``--against`` pairs the other run's policy with those policies of the
reference run instead (a retrained LensNet against the baselines it must beat, on the same documents).

A comma-separated list in place of a name (``REF_S0,REF_S1,REF_S2 OTHER_S0,OTHER_S1,OTHER_S2``: seed replicates
evaluated on the same documents) stands for the mean over those runs of every document's NLL: the seed-averaged
comparison, its interval over documents (it holds the seeds fixed; each pair of runs alone shows the spread over
seeds).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from mchar.evals.perplexity import paired_difference

SETS = {"code": lambda r: r, "retrieval": lambda r: r.get("retrieval")}


def load_one(name: str, runs: Path) -> dict[str, Any]:
    path = runs / name / "eval" / "results.json"
    if not path.is_file():
        raise SystemExit(f"paired_runs: no {path} (run the evaluation under name={name} first)")
    return json.loads(path.read_text())


def load(names: str, runs: Path) -> dict[str, Any]:
    """One run's results, or (``A,B,...``) every policy's per-document NLL and ΔNLL averaged over those runs."""
    parts = [load_one(n, runs) for n in names.split(",")]
    if len(parts) == 1:
        return parts[0]
    merged = mean_of(parts, names, "code") or {}
    merged["retrieval"] = mean_of([r.get("retrieval") for r in parts], names, "retrieval")
    return merged


def mean_of(results: list[dict[str, Any] | None], names: str, label: str) -> dict[str, Any] | None:
    if any(not r for r in results):
        return None
    full = results[0]["full"]
    if any(r["full"]["per_document"] != full["per_document"] for r in results):
        raise SystemExit(f"paired_runs: the runs {names} scored different {label} documents")
    shared = set.intersection(*(set(r["policies"]) for r in results))
    policies = {
        p: {
            "delta_nll": sum(r["policies"][p]["delta_nll"] for r in results) / len(results),
            "per_document": [
                sum(v) / len(v)
                for v in zip(*(r["policies"][p]["per_document"] for r in results), strict=True)
            ],
        }
        for p in shared
    }
    return {"full": full, "policies": policies}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("reference")
    ap.add_argument("others", nargs="+")
    ap.add_argument("--policy", default="lensnet")
    ap.add_argument("--against", nargs="+", default=None, help="the reference run's policies to pair with")
    ap.add_argument("--runs", type=Path, default=Path("runs"))
    args = ap.parse_args()
    ref = load(args.reference, args.runs)
    for name in args.others:
        other = load(name, args.runs)
        for label, pick in SETS.items():
            a, b = pick(other), pick(ref)
            if not a or not b or args.policy not in a["policies"] or args.policy not in b["policies"]:
                continue
            if a["full"]["per_document"] != b["full"]["per_document"]:
                raise SystemExit(
                    f"paired_runs: {name} and {args.reference} scored different {label} documents"
                )
            x = a["policies"][args.policy]
            for rival in args.against or [args.policy]:
                if rival not in b["policies"]:
                    raise SystemExit(
                        f"paired_runs: {args.reference} has no {label} results for policy {rival!r}"
                    )
                y = b["policies"][rival]
                pair = paired_difference(x["per_document"], y["per_document"], "t", 0)
                lo, hi = pair["ci"]
                print(
                    f"{name} {label}: {args.policy} ΔNLL {x['delta_nll']:.4f} ({args.reference} {rival}: "
                    f"{y['delta_nll']:.4f}); paired {pair['mean']:+.4f} [{lo:+.4f}, {hi:+.4f}] over "
                    f"{pair['documents']} documents"
                )


if __name__ == "__main__":
    main()
