"""Real ``kill -9`` of a writer process at random instants: every block it reported committed must survive."""

from __future__ import annotations

from pathlib import Path

import pytest

from mchar.bench.fault import run_kills


def _check(res: dict) -> None:
    assert res["lost_committed_blocks"] == 0, res
    assert res["lost_committed_tokens"] == 0, res
    assert res["bad_blocks"] == 0, res
    assert all(r["tail_ok"] for r in res["per_kill"]), res
    # the writer made progress across restarts (each restart resumes from the recovered tree)
    assert res["final_tokens"] >= max(r["reported_tokens"] for r in res["per_kill"])


def test_kill9_three_times(tmp_path: Path) -> None:
    _check(run_kills(tmp_path / "tree", 3, rng_seed=1234, max_delay=0.25))


@pytest.mark.slow
def test_kill9_twenty_times(tmp_path: Path) -> None:
    res = run_kills(tmp_path / "tree", 20, rng_seed=99, max_delay=0.4, dtype="bfloat16")
    _check(res)
    assert res["final_blocks"] > 0
