"""Synthetic long-context tasks: determinism, needle depth, token lengths, export, training mix."""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import pytest

from mchar.data.corpus import DataError
from mchar.data.tasks import (
    TASKS,
    Haystack,
    export_jsonl,
    generate_examples,
    insert_at_depths,
    load_jsonl,
    make_training_window,
    write_task_suite,
)
from mchar.data.tokenizer import make_token_counter, train_tokenizer


def _texts() -> list[str]:
    rng = random.Random(0)
    docs = []
    for d in range(6):
        lines = []
        for i in range(150):
            indent = " " * 4 * rng.randint(0, 2)
            lines.append(
                f"{indent}value_{d}_{i} = compute(x={rng.randint(0, 999)}, name='{'ab' * rng.randint(1, 30)}')"
            )
        docs.append("\n".join(lines) + "\n")
    return docs


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return train_tokenizer(tmp_path_factory.mktemp("tok"), texts=_texts(), vocab_size=512)


@pytest.fixture(scope="module")
def hay() -> Haystack:
    return Haystack(_texts())


def test_insert_at_depths_snaps_to_nearest_line() -> None:
    lines = [("x" * (5 + 7 * (i % 5))) + "\n" for i in range(100)]
    total = sum(map(len, lines))
    depths = [0.0, 0.13, 0.5, 0.77, 1.0]
    inserts = [(d, f"# needle {k}\n") for k, d in enumerate(depths)]
    text, offsets = insert_at_depths(lines, inserts)
    for k, (d, needle) in enumerate(inserts):
        assert text[offsets[k] :].startswith(needle)
        hay_before = offsets[k] - sum(len(n) for dd, n in inserts if dd < d)
        assert abs(hay_before - d * total) <= max(map(len, lines))
    stripped = text
    for _, n in inserts:
        stripped = stripped.replace(n, "")
    assert stripped == "".join(lines)


@pytest.mark.parametrize("task", TASKS)
def test_needle_at_requested_depth_and_length(task: str, tok: Any, hay: Haystack) -> None:
    counter = make_token_counter(tok)
    depths = [0.0, 0.3, 0.6, 1.0]
    exs = generate_examples(task, 4, 400, tok, seed=5, depths=depths, haystack=hay)
    for ex, depth in zip(exs, depths, strict=True):
        assert ex["task"] == task and ex["needle_depth"] == depth
        assert 0.85 * 400 <= ex["length_tokens"] <= 400
        assert ex["length_tokens"] == counter(ex["context"] + ex["query"])
        assert (
            ex["answer"].startswith(" ")
            and ex["answer"].strip() == " ".join(ex["answers"])
            or task == "kv_retrieval"
        )
        for a in ex["answers"]:
            assert a in ex["context"]
        ctx, off = ex["context"], ex["needle_char_offset"]
        needle_line = ctx[off:].split("\n", 1)[0]
        assert ex["answers"][0] in needle_line
        # depth check on haystack characters only (other inserted needle lines removed)
        before = ctx[:off]
        needle_re = r"(?m)^(# The pass key is|# The special magic number|KV\[|v_[a-z]{5} = ).*\n"
        hay_before = len(re.sub(needle_re, "", before))
        hay_total = len(re.sub(needle_re, "", ctx))
        assert abs(hay_before - depth * hay_total) <= hay.max_line_chars


def test_determinism_and_seed(tok: Any, hay: Haystack, tmp_path: Path) -> None:
    a = [e for t in TASKS for e in generate_examples(t, 3, 700, tok, seed=1, haystack=hay)]
    b = [e for t in TASKS for e in generate_examples(t, 3, 700, tok, seed=1, haystack=Haystack(_texts()))]
    assert a == b
    export_jsonl(a, tmp_path / "a.jsonl")
    export_jsonl(b, tmp_path / "b.jsonl")
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert load_jsonl(tmp_path / "a.jsonl") == a
    c = generate_examples("passkey", 3, 700, tok, seed=2, haystack=hay)
    assert [e["answer"] for e in c] != [e["answer"] for e in a[:3]]
    assert len({e["id"] for e in a}) == len(a)


def test_char_approximation_and_callables(hay: Haystack) -> None:
    ex = generate_examples("passkey", 1, 500, None, haystack=hay, chars_per_token=4)[0]
    assert 0.85 * 500 <= ex["length_tokens"] <= 500
    assert abs(len(ex["context"] + ex["query"]) / 4 - ex["length_tokens"]) <= 1
    ex2 = generate_examples("kv_retrieval", 1, 300, lambda s: s.split(), texts=_texts())[0]
    assert len((ex2["context"] + ex2["query"]).split()) == ex2["length_tokens"] <= 300


def test_errors(tok: Any, hay: Haystack) -> None:
    with pytest.raises(DataError):
        generate_examples("nope", 1, 100, tok, haystack=hay)
    with pytest.raises(DataError):
        generate_examples("passkey", 1, 100, tok, haystack=hay, depths=[1.5])
    with pytest.raises(DataError, match="too short"):
        generate_examples("variable_tracking", 1, 5, tok, haystack=hay)
    with pytest.raises(DataError):
        Haystack(["", "   \n"])


def test_training_text_has_far_episodes(tok: Any, hay: Haystack) -> None:
    counter = make_token_counter(tok)
    text, spans = make_training_window(hay, 600, seed=3, tokenizer=tok, num_episodes=3)
    assert (text, spans) == make_training_window(hay, 600, seed=3, tokenizer=tok, num_episodes=3)
    assert text != make_training_window(hay, 600, seed=4, tokenizer=tok, num_episodes=3)[0]
    assert len(spans) == 3 and all(text[a] == " " and text[b] == "\n" and text[a:b].strip() for a, b in spans)
    assert 0.8 * 600 <= counter(text) <= 600
    queries = [m for m in re.finditer(r"(?m)^# (What is|Which variables|Look up).*$", text)]
    assert len(queries) == 3
    # every answered query's answer was stated earlier in the text
    for m in queries:
        line = m.group(0)
        ans = (
            line.split(" is:")[-1]
            if "is:" in line
            else line.split("==")[-1]
            if "==" in line
            else line.split(" is ")[-1]
        )
        first = ans.strip().split()[0].strip('"')
        assert first in text[: m.start()]


def test_copy_episodes_repeat_an_earlier_sequence_verbatim(tok: Any, hay: Haystack) -> None:
    text, spans = make_training_window(hay, 400, seed=1, tokenizer=tok, num_episodes=3, tasks=["copy"])
    assert len(spans) == 3
    for a, b in spans:
        answer = text[a:b]
        assert len(answer.split()) == 6
        tag = text[:a].rsplit("# Recall sequence ", 1)[1].rstrip(":")
        assert f"# Sequence {tag}:{answer}\n" in text[:a]  # stated before it is recalled
    with pytest.raises(DataError, match="copy"):
        make_training_window(hay, 400, seed=1, tokenizer=tok, tasks=["cpy"])


def test_write_task_suite_loads_in_lm_eval(tok: Any, hay: Haystack, tmp_path: Path) -> None:
    written = write_task_suite(tmp_path / "suite", tok, lengths=[500, 700], n_per=2, seed=0, haystack=hay)
    assert len(written) == len(TASKS) * 2 * 2
    data = sorted((tmp_path / "suite" / "data").glob("*.jsonl"))
    assert len(data) == len(TASKS) * 2 and all(len(load_jsonl(p)) == 2 for p in data)
    lm_eval_tasks = pytest.importorskip("lm_eval.tasks")
    tm = lm_eval_tasks.TaskManager(include_path=str(tmp_path / "suite"), include_defaults=False)
    tasks = lm_eval_tasks.get_task_dict(["mchar_passkey_500", "mchar_kv_retrieval_700_gen"], tm)
    ll = tasks["mchar_passkey_500"]
    docs = list(ll.test_docs())
    assert len(docs) == 2
    assert ll.doc_to_text(docs[0]) == docs[0]["context"] + docs[0]["query"]
    assert ll.doc_to_target(docs[0]) == docs[0]["answer"]
