"""``report --bench``: reports/bench.md from the committed benchmark JSON files, every figure traced to them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mchar.bench.summary import BENCHES, build_bench_report
from mchar.cli import main
from mchar.errors import MCharError

COMMITTED = Path(__file__).resolve().parents[2] / "reports" / "bench"


def _copy(tmp_path: Path, names: tuple[str, ...] = BENCHES) -> Path:
    bench = tmp_path / "reports" / "bench"
    bench.mkdir(parents=True)
    for name in names:
        shutil.copy(COMMITTED / f"{name}.json", bench / f"{name}.json")
    return bench


def test_every_number_comes_from_the_json(tmp_path: Path) -> None:
    bench = _copy(tmp_path)
    md = build_bench_report(bench, tmp_path / "reports" / "bench.md").read_text()
    data = {n: json.loads((bench / f"{n}.json").read_text()) for n in BENCHES}
    lens = data["train-step"]["lensnet"]
    assert (
        f"= {100 * lens['construction_share_median']:.1f} % | ≤ 10 % | {'yes' if lens['meets_target'] else 'no'} |"
        in md
    )
    gist = data["train-step"]["gistnet"]
    pairs = gist["paired_ratios"]
    assert (
        f": {gist['ratio']:.3f}x (per repeat {min(pairs):.2f}-{max(pairs):.2f}; "
        f"ratio of medians {gist['ratio_of_medians']:.3f}) |" in md
    )
    over = data["train-overhead"]
    pairs = over["paired_ratios"]
    assert (
        f": {over['ratio_lightning_over_plain']:.3f}x (per repeat {min(pairs):.2f}-{max(pairs):.2f}; "
        f"ratio of medians {over['ratio_of_medians']:.3f}) | ≥ 0.95x |" in md
    )
    for row in data["decode"]["rows"]:
        assert f"| {row['history']:,} | {row['mc']['median_ms']:.2f} | {row['full']['median_ms']:.2f} |" in md
    assert f"{data['decode']['latency_ratio']:.3f} (target ≤ 1.15)" in md
    assert f"{data['tree-io']['disk']['bytes_per_token']} bytes/token" in md
    assert (
        f"{data['fault']['kills']} `kill -9`s" in md
        and f"{data['fault']['verified_blocks']:,} verified" in md
    )
    assert f"Measured on: {data['decode']['env']['cpu']}" in md
    assert "not run" not in md


def test_missing_and_broken_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bench = _copy(tmp_path, ("decode",))
    out = tmp_path / "reports" / "bench.md"
    md = build_bench_report(bench, out).read_text()
    assert "_not run_ (`python -m mchar bench --out reports/bench/train-step.json train-step`)" in md
    assert "_not run_ (`python -m mchar bench --out reports/bench/fault.json fault`)" in md
    out.write_text("kept\n")
    (bench / "fault.json").write_text("{ not json")
    with pytest.raises(MCharError, match=r"fault\.json is not JSON"):
        build_bench_report(bench, out)
    shutil.copy(COMMITTED / "tree-io.json", bench / "fault.json")
    with pytest.raises(MCharError, match="is not a 'fault' benchmark result"):
        build_bench_report(bench, out)
    assert out.read_text() == "kept\n"  # a bad file never replaces the report
    assert main(["report", "--bench", "--out-dir", str(tmp_path / "absent")]) == 2
    assert "no benchmark folder" in capsys.readouterr().err


def test_a_subfolder_is_a_section_of_its_own(tmp_path: Path) -> None:
    """Results from another machine (``reports/bench/h200/``) get their own section, named after the folder and
    the machine in their files, with their numbers, next to the main machine's."""
    bench = _copy(tmp_path)
    shutil.copytree(COMMITTED / "h200", bench / "h200")
    md = build_bench_report(bench, tmp_path / "reports" / "bench.md").read_text()
    step = json.loads((bench / "h200" / "train-step.json").read_text())
    decode = json.loads((bench / "h200" / "decode.json").read_text())
    assert f"## `h200/`: {step['env']['cpu']}" in md and f"accelerator {step['env']['accelerator']}" in md
    assert f"= {100 * step['lensnet']['construction_share_median']:.1f} % |" in md
    assert "device=cuda" in md
    for row in decode["rows"]:
        assert f"| {row['history']:,} | {row['mc']['median_ms']:.2f} | {row['full']['median_ms']:.2f} |" in md
