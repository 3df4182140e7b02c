"""Paired task outcomes: discordant counts and the exact McNemar test."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mchar.evals.paired_tasks import mcnemar_exact, outcomes, pair, paired_outcomes, paired_runs, policy_of


@given(st.integers(0, 60), st.integers(0, 60))
def test_mcnemar_is_symmetric_and_a_probability(b: int, c: int) -> None:
    p = mcnemar_exact(b, c)
    assert 0.0 < p <= 1.0 and p == mcnemar_exact(c, b)
    if b == c:
        assert p == 1.0
    if b + c > 0 and c == 0:
        assert p == pytest.approx(min(1.0, 2 * 0.5**b))


def test_mcnemar_known_values() -> None:
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(6, 0) == pytest.approx(0.03125)  # 2 / 2**6
    assert mcnemar_exact(8, 2) == pytest.approx(0.109375)  # 2 * (1 + 10 + 45) / 1024


def test_policy_names_keep_their_underscores() -> None:
    assert policy_of("task_samples_sink_recent_local.jsonl") == "sink_recent"
    assert policy_of("eval/lm_eval/task_samples_lensnet_ruler.jsonl") == "lensnet"
    assert policy_of("lm_eval_lensnet_local.json") is None


@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=40))
def test_paired_counts_add_up(pairs: list[tuple[bool, bool]]) -> None:
    ref = {("t", i): float(a) for i, (a, _) in enumerate(pairs)}
    other = {("t", i): float(b) for i, (_, b) in enumerate(pairs)}
    other[("t", 10_000)] = 1.0  # an example the reference lacks is not paired
    [row] = paired_outcomes({"lensnet": ref, "recency": other}, "lensnet")
    n = len(pairs)
    assert row.examples == n and row.policy == "recency" and row.task == "t"
    assert row.reference_acc == pytest.approx(sum(a for a, _ in pairs) / n)
    assert row.policy_acc == pytest.approx(sum(b for _, b in pairs) / n)
    assert row.reference_only - row.policy_only == sum(a for a, _ in pairs) - sum(b for _, b in pairs)


def test_outcomes_read_the_eval_stage_lines() -> None:
    lines = [
        json.dumps({"task": "mchar_passkey_512", "doc_id": 0, "exact_match": 1.0, "response": "1"}),
        json.dumps({"task": "mchar_passkey_512", "doc_id": 1, "exact_match": 0.0, "response": "2"}),
        json.dumps({"task": "mchar_passkey_512_ll", "doc_id": 0, "acc": 1.0}),
        "",
    ]
    assert outcomes(lines) == {
        ("mchar_passkey_512", 0): 1.0,
        ("mchar_passkey_512", 1): 0.0,
        ("mchar_passkey_512_ll", 0): 1.0,
    }
    assert paired_outcomes({"recency": outcomes(lines)}, "lensnet") == []  # no reference: no table


@given(st.lists(st.tuples(st.booleans(), st.booleans(), st.booleans()), min_size=1, max_size=40))
def test_runs_pair_only_on_examples_that_are_the_same(rows: list[tuple[bool, bool, bool]]) -> None:
    """Across runs an example pairs only when its identity matches too; the rest are counted, not paired."""
    ref = {("t", i): (float(a), "x") for i, (a, _, _) in enumerate(rows)}
    other = {("t", i): (float(b), "x" if same else "y") for i, (_, b, same) in enumerate(rows)}
    got, differ = paired_runs(ref, other, "p")
    same = [("t", i) for i, (*_, s) in enumerate(rows) if s]
    assert differ == len(rows) - len(same)
    assert got == pair({k: ref[k][0] for k in same}, {k: other[k][0] for k in same}, "p")
    assert sum(r.examples for r in got) == len(same)
