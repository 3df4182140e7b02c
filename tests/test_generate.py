"""``mchar generate``: one continuation per policy from one load, full context exactly the plain base's; bad input
stops in one line before any model loads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from mchar.cli import main
from tests.evals import TEXT, build_tiny_base

BLOCK, BUDGET = 8, 32


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_base(tmp_path_factory.mktemp("generate_base"))


def _run(base: Path, tmp: Path, *args: str) -> int:
    overrides = [
        "model.kind=hf",
        f"model.name_or_path={base}",
        f"tree.block_size={BLOCK}",
        f"allocator.budget={BUDGET}",
        f"allocator.protect_recent={BLOCK}",
        f"artifacts_dir={tmp / 'artifacts'}",
    ]
    return main(["generate", *overrides, *args])


def test_each_policy_continues_the_text_and_full_context_is_the_plain_base(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    doc = tmp_path / "doc.txt"
    doc.write_text(TEXT * 3)
    code = _run(
        base, tmp_path, "--file", str(doc), "--prompt", "value =", "--policies", "full,recency,tree_recency"
    )
    assert code == 0
    out = capsys.readouterr().out
    heads = re.findall(r"^--- (\w+) \((\d+) tokens of context; ([^;]+)", out, flags=re.M)
    assert [h[0] for h in heads] == ["full", "recency", "tree_recency"]
    tok = AutoTokenizer.from_pretrained(base)
    ids = tok(TEXT * 3 + "value =")["input_ids"]
    assert {int(h[1]) for h in heads} == {len(ids)} and len(ids) > 4 * BUDGET
    assert heads[0][2] == "full context"
    assert heads[1][2].startswith(f"budget {BUDGET}: ") and "no gists" in heads[1][2]  # truncation
    assert re.search(r"\d+ LOD\d", heads[2][2])  # a cover of the history: gists behind the raw window
    texts = re.split(r"^--- .*$\n", out, flags=re.M)[1:]
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    with torch.no_grad():
        plain = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, pad_token_id=0)
    assert texts[0].rstrip("\n") == tok.decode(plain[0, len(ids) :].tolist())


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--file", "nowhere.txt"], r"^mchar: error: generate: --file 'nowhere.txt' is not a file$"),
        (["--prompt", "   "], r"^mchar: error: generate: nothing to continue"),
        (["--prompt", "x", "--policies", "recency,best"], r"^mchar: error: generate: unknown policy 'best'"),
        (
            ["--prompt", "x", "--policies", "lensnet"],
            r"^mchar: error: generate: policy 'lensnet' needs a trained",
        ),
    ],
)
def test_bad_input_is_one_line(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], needle: str
) -> None:
    assert _run(base, tmp_path, *args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(needle, err), err


def test_a_local_base_that_was_never_trained_is_named_not_trained(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["generate", "+experiment=smoke", f"artifacts_dir={tmp_path}", "--prompt", "x"])
    assert code == 2
    err = capsys.readouterr().err
    assert "generate: no trained base at" in err and "python -m mchar fit +experiment" in err
    assert not (tmp_path / "base_lm").exists()


def test_a_budget_that_cannot_hold_the_cover_is_refused_before_generating(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A cover policy at depth 1 over a long text needs a slot per block; truncation needs only its window."""
    doc = tmp_path / "doc.txt"
    doc.write_text(TEXT * 3)
    args = ["tree.depth=1", "--file", str(doc), "--max-new-tokens", "4"]
    assert _run(base, tmp_path, *args, "--policies", "recency,tree_recency") == 2
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(
        rf"mchar: error: generate: allocator.budget={BUDGET} cannot hold a cover of this \d+-token text plus 4 new "
        r"tokens at tree.depth=1 \(it needs \d+\); raise the budget or tree.depth",
        err.splitlines()[-1],
    ), err
    assert (
        _run(base, tmp_path, *args, "--policies", "recency") == 0
    )  # truncation holds its window at any length
