"""Induction probe: the synthetic batches are what they claim, and the control task is learnt (the probe can
tell a model that copies from one that cannot)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mchar.bench.induction import main, repeat_batch
from tests.evals import build_tiny_base


def test_masked_targets_are_copies_of_an_earlier_segment() -> None:
    ids, mask = repeat_batch(16, 64, 50, torch.Generator().manual_seed(0))
    for row, m in zip(ids, mask, strict=True):
        where = m.nonzero().flatten()
        assert len(where) >= 3 and bool((where.diff() == 1).all())  # one contiguous run
        # some shift d > 0 makes every masked token AND its predecessor a repeat: an induction head can copy it
        shifts = [
            d
            for d in range(1, int(where[0]))
            if all(row[p] == row[p - d] and row[p - 1] == row[p - 1 - d] for p in where.tolist())
        ]
        assert shifts
    ids, mask = repeat_batch(2, 32, 50, torch.Generator().manual_seed(0), offset=5)
    assert mask[:, :5].sum() == 0 and bool((mask[:, 5:] == 1).all())


def test_control_task_is_learnt_and_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = build_tiny_base(tmp_path / "base")
    main(f"--base {base} --steps 150 --length 32 --batch 16 --offset 3 --lr 3e-3 --every 50".split())
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["bench"] == "induction" and out["task"] == "fixed offset 3"
    assert out["curve"][0]["acc"] < 0.5 < 0.9 < out["final_acc"]  # measured: 0.14 at step 50, 1.0 at 150
    assert out["curve"][-1]["nll"] < out["chance_nll"] / 4


def test_bad_arguments_fail_with_one_line(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["--base", str(tmp_path), "--offset", "64", "--length", "32"])


def test_text_windows_mix_and_save(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import datasets
    from transformers import AutoModelForCausalLM

    base = build_tiny_base(tmp_path / "base")
    windows = tmp_path / "windows"
    datasets.Dataset.from_dict(
        {
            "input_ids": [[i % 200 for i in range(j, j + 48)] for j in range(6)],
            "answer_mask": [[0] * 40 + [1] * 8] * 6,
        }
    ).save_to_disk(str(windows))
    out_dir = tmp_path / "warm"
    main(
        f"--base {base} --steps 4 --length 32 --batch 4 --every 2 --text-windows {windows} --save {out_dir}".split()
    )
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["text_windows"] == str(windows) and len(out["curve"]) == 2
    warmed = AutoModelForCausalLM.from_pretrained(out_dir)
    before = AutoModelForCausalLM.from_pretrained(base)
    assert (out_dir / "tokenizer.json").exists()
    assert any(not torch.equal(a, b) for a, b in zip(warmed.parameters(), before.parameters(), strict=True))
