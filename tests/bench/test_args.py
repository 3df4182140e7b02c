"""Benchmark options: impossible sizes and counts stop in argparse's one line, before anything is built."""

from __future__ import annotations

import importlib

import pytest
import torch


@pytest.mark.parametrize(
    ("bench", "argv", "needle"),
    [
        ("decode", ["--budget", "0"], "argument --budget: must be >= 1, got 0"),
        ("decode", ["--budget", "8", "--block-size", "16"], "--budget 8 is smaller than one block"),
        ("decode", ["--mults", "1,x"], "--mults: need comma-separated integers"),
        ("decode", ["--mults", "0,4"], "--mults: every multiple must be >= 1"),
        ("train_step", ["--block-size", "1"], "argument --block-size: must be >= 2, got 1"),
        ("train_step", ["--device", "warp9"], "--device: unknown device 'warp9'"),
        ("decode", ["--device", "warp9"], "--device: unknown device 'warp9'"),
        ("train_overhead", ["--steps", "two"], "argument --steps: not an integer: 'two'"),
        ("tree_io", ["--tokens", "-5"], "argument --tokens: must be >= 1, got -5"),
        ("fault", ["--kills", "0"], "argument --kills: must be >= 1, got 0"),
        ("induction", ["--base", "x", "--length", "8"], "argument --length: must be >= 16, got 8"),
        ("induction", ["--base", "x", "--offset", "64"], "--offset 64 must be smaller than --length 64"),
    ],
)
def test_bad_option_is_one_line(
    bench: str, argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    main = importlib.import_module(f"mchar.bench.{bench}").main
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"mchar bench {bench.replace('_', '-')}: error: ") and needle in err[-1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("bench", ["train_step", "decode"])
def test_cuda_without_a_gpu_is_one_line(bench: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        importlib.import_module(f"mchar.bench.{bench}").main(["--device", "cuda"])
    assert "--device cuda: this machine has no CUDA GPU" in capsys.readouterr().err.strip().splitlines()[-1]
