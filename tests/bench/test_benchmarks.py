"""Every benchmark runs end to end at a tiny size through ``mchar bench``, prints one JSON object in the common
envelope, and its derived numbers (ratios, shares, targets met) agree with the raw numbers it reports.

Timings here are meaningless (tiny models, a busy CI machine); what is checked is that the benchmark still runs and
that its arithmetic is right, so a refactor cannot silently break the numbers a README quotes.
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import pytest
import torch

from mchar.cli import main as cli_main

TINY = {
    "decode": "--hidden 32 --layers 1 --heads 2 --vocab 64 --budget 32 --block-size 4 --depth 2 --mults 1,4 "
    "--new-tokens 16 --full-tokens 4 --round 8 --gist-width 16 --lens-width 16 --prefill-chunk 64",
    "tree-io": "--tokens 4096 --compute-tokens 512 --dim 16 --block-size 4 --depth 2 --chunk 1000 --repeats 2 "
    "--vocab 100",
    "train-step": "--hidden 32 --vocab 64 --window 64 --horizon 8 --batch 2 --budget 32 --candidates 4 --steps 4 "
    "--warmup 1 --repeats 1 --threads 1",
    "train-overhead": "--hidden 32 --layers 1 --vocab 64 --batch 2 --seq 32 --steps 4 --warmup 1 --repeats 1",
    "fault": "--kills 2 --max-delay 0.05 --dim 8",
}


def _run(name: str, out: Path, capsys: pytest.CaptureFixture[str]) -> dict:
    threads = torch.get_num_threads()
    try:
        assert cli_main(["bench", "--out", str(out), name, *TINY[name].split()]) == 0
    finally:
        torch.set_num_threads(threads)  # some benchmarks pin threads while timing
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    written = json.loads(out.read_text())
    assert printed == written
    assert list(written)[:2] == ["bench", "config"] and list(written)[-1] == "env"
    assert written["bench"] == name and written["env"]["torch"] == torch.__version__
    assert (
        written["env"]["cpu_count"] == str(os.cpu_count()) and written["env"]["cpu"]
    )  # the host, as runs tag it
    return written


@pytest.mark.parametrize("name", sorted(TINY))
def test_every_benchmark_runs_and_its_derived_numbers_add_up(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    res = _run(name, tmp_path / "results" / f"{name}.json", capsys)
    if name == "decode":
        rows = res["rows"]
        assert [r["history"] for r in rows] == [32, 128]
        assert res["latency_ratio"] == pytest.approx(rows[-1]["mc"]["median_ms"] / rows[0]["mc"]["median_ms"])
        sec = rows[0]["mc"]["seconds"]  # the session's own work, relative to the base's forward passes
        own = sec["gistnet"] + sec["lensnet_policy"] + sec["allocator"]
        assert res["overhead_share_at_budget"] == pytest.approx(own / sec["base_forward"])
        assert all(r["mc"]["wc_slots"] <= 32 and r["full"]["median_ms"] > 0 for r in rows)
    elif name == "tree-io":
        counts = res["disk"]["counts"]
        assert counts == {"lod0": 4096, "lod1": 1024, "lod2": 256}
        gist_bytes = 16 * 2  # float16
        assert res["disk"]["payload_bytes"] == 4 * 4096 + (1024 + 256) * gist_bytes
        assert res["disk"]["meets_target"] == (res["disk"]["overhead_pct_vs_payload"] <= 5.0)
        runs = res["io"]["runs_s"]
        assert len(runs) == 2 and res["io"]["median_s"] == pytest.approx(sum(runs) / 2, abs=2e-4)
    elif name == "train-step":
        lens, gist = res["lensnet"], res["gistnet"]
        assert 0 < lens["construction_share_median"] < 1
        assert lens["meets_target"] == (lens["construction_share_median"] <= 0.10)
        of_medians = gist["lightning_steps_per_s"] / gist["plain_steps_per_s"]
        assert gist["ratio_of_medians"] == pytest.approx(of_medians)
        pairs = zip(gist["rates"]["lightning"], gist["rates"]["plain"], strict=True)
        assert gist["paired_ratios"] == pytest.approx([light / plain for light, plain in pairs])
        assert gist["ratio"] == pytest.approx(statistics.median(gist["paired_ratios"]))
        assert gist["meets_target"] == (gist["ratio"] >= 0.95)
    elif name == "train-overhead":
        of_medians = res["lightning_tokens_per_s"] / res["plain_tokens_per_s"]
        assert res["ratio_of_medians"] == pytest.approx(of_medians)
        pairs = zip(res["lightning_runs"], res["plain_runs"], strict=True)
        assert res["paired_ratios"] == pytest.approx([light / plain for light, plain in pairs])
        assert res["ratio_lightning_over_plain"] == pytest.approx(statistics.median(res["paired_ratios"]))
        assert res["model"]["params"] > 0
    elif name == "fault":
        assert res["kills"] == 2 and res["config"]["kills"] == 2
        assert "child" not in res["config"]


def test_bench_out_is_checked_before_the_benchmark_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A directory as --out stops with one line at once (the default decode benchmark would take minutes)."""
    assert cli_main(["bench", "--out", str(tmp_path), "decode"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--out" in err and "directory" in err


def test_a_failing_benchmark_leaves_an_earlier_result_whole(tmp_path: Path) -> None:
    out = tmp_path / "decode.json"
    out.write_text('{"bench": "decode"}\n')
    with pytest.raises(SystemExit):  # argparse rejects the option before anything runs
        cli_main(["bench", "--out", str(out), "decode", "--no-such-option"])
    assert out.read_text() == '{"bench": "decode"}\n'
    assert not out.with_name("decode.json.tmp").exists()


def test_repeats_alternate_the_order_of_the_sides() -> None:
    """ABBA: a side that always ran first would meet a systematically colder (or warmer) machine."""
    from mchar.bench.loop_timing import alternate

    calls: list[str] = []
    rates = alternate(
        {"plain": lambda: calls.append("p") or 1.0, "lightning": lambda: calls.append("l") or 2.0}, 4
    )
    assert "".join(calls) == "pllppllp"
    assert rates == {"plain": [1.0] * 4, "lightning": [2.0] * 4}


def test_decode_times_an_ensemble_of_lensnets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--lens-members N`` streams through a :class:`~mchar.core.lensnet.LensNetEnsemble` of N LensNets (what an
    exported ensemble costs per refocus), recorded in the config."""
    from mchar.bench import decode
    from mchar.core.lensnet import LensNetEnsemble

    sizes: list[int] = []

    def forward(self: LensNetEnsemble, *a: object, **kw: object) -> torch.Tensor:
        sizes.append(len(self.members))
        return LensNetEnsemble.forward(self, *a, **kw)

    monkeypatch.setattr(decode, "LensNetEnsemble", type("Counted", (LensNetEnsemble,), {"forward": forward}))
    args = TINY["decode"].replace("--mults 1,4", "--mults 1").split() + ["--no-full", "--lens-members", "3"]
    out = tmp_path / "decode.json"
    assert cli_main(["bench", "--out", str(out), "decode", *args]) == 0
    res = json.loads(out.read_text())
    assert res["config"]["lens_members"] == 3
    assert res["rows"][0]["mc"]["seconds"]["lensnet_forward"] > 0 and res["rows"][0]["full"] is None
    assert sizes and set(sizes) == {3}  # every refocus scored by the three members
