"""``scripts/probes/paired_runs.py``: one run against another, and seed replicates averaged per document."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "probes" / "paired_runs.py"


def write_run(runs: Path, name: str, lensnet: list[float], full: list[float]) -> None:
    def one(nll: list[float]) -> dict:
        delta = sum(a - b for a, b in zip(nll, full, strict=True)) / len(full)
        return {
            "full": {"per_document": full},
            "policies": {"lensnet": {"delta_nll": delta, "per_document": nll}},
        }

    (runs / name / "eval").mkdir(parents=True)
    (runs / name / "eval" / "results.json").write_text(json.dumps(one(lensnet) | {"retrieval": one(lensnet)}))


def paired(runs: Path, *names: str) -> str:
    cmd = [sys.executable, str(SCRIPT), *names, "--runs", str(runs)]
    return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout + "|" + " ".join(names)


def test_seed_replicates_are_averaged_per_document(tmp_path: Path) -> None:
    full = [1.0, 2.0, 3.0]
    write_run(tmp_path, "a0", [1.1, 2.1, 3.1], full)
    write_run(tmp_path, "a1", [1.3, 2.3, 3.3], full)
    write_run(tmp_path, "b0", [1.0, 2.2, 3.0], full)
    write_run(tmp_path, "b1", [1.2, 2.0, 3.4], full)
    out = paired(tmp_path, "a0,a1", "b0,b1")
    # per document: means a 1.2 / 2.2 / 3.2, b 1.1 / 2.1 / 3.2 -> differences -0.1, -0.1, 0.0
    assert "lensnet ΔNLL 0.1333" in out and "lensnet: 0.2000" in out and "paired -0.0667" in out, out
    assert out.count("over 3 documents") == 2, out  # code and retrieval
    write_run(tmp_path, "other_docs", [1.0, 2.0, 3.0], [1.0, 2.0, 2.5])
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "a0,other_docs", "b0", "--runs", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode != 0 and "scored different code documents" in proc.stderr


def test_one_run_against_another(tmp_path: Path) -> None:
    full = [1.0, 2.0]
    write_run(tmp_path, "a0", [1.5, 2.5], full)
    write_run(tmp_path, "b0", [1.0, 2.5], full)
    assert "paired -0.2500" in paired(tmp_path, "a0", "b0")
