"""Project rules that are cheap to check: core stays framework-free, the tree stays ruff-clean, the docs name files
that exist."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE_MODULES = sorted(p.stem for p in (ROOT / "src" / "mchar" / "core").glob("*.py") if p.stem != "__init__")


def test_core_imports_no_harness_framework() -> None:
    code = (
        "import sys\n"
        + "".join(f"import mchar.core.{m}\n" for m in CORE_MODULES)
        + "bad = [m for m in ('lightning', 'pytorch_lightning', 'hydra', 'omegaconf', 'mlflow', 'optuna', 'lm_eval')"
        " if m in sys.modules]\nprint(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"mchar.core pulled in: {out.stdout.strip()}"


@pytest.mark.skipif(
    shutil.which("ruff") is None and not (Path(sys.executable).parent / "ruff").exists(),
    reason="ruff not installed",
)
def test_ruff_clean() -> None:
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    for args in (["check"], ["format", "--check"]):
        out = subprocess.run(
            [ruff, *args, "src", "tests", "scripts"], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, f"ruff {' '.join(args)}: {out.stdout[-3000:]}"


DOCS = [
    "README.md",
    "docs/FINDINGS.md",
    "docs/ARCHITECTURE.md",
    "docs/HISTORY.md",
    "docs/BENCHMARKS.md",
    "evals/README.md",
    "sweeps/README.md",
]
REPO_PATH = re.compile(r"`((?:src|scripts|sweeps|reports|conf|evals|docs|tests)/[\w./-]+)`")


@pytest.mark.parametrize("doc", DOCS)
def test_docs_name_only_files_that_exist(doc: str) -> None:
    """A moved or renamed file must not leave the README or a findings section pointing at nothing."""
    missing = sorted({m for m in REPO_PATH.findall((ROOT / doc).read_text()) if not (ROOT / m).exists()})
    assert not missing, f"{doc} names files that do not exist: {missing}"


def test_findings_contents_link_to_its_sections() -> None:
    text = (ROOT / "docs" / "FINDINGS.md").read_text()
    slugs = {
        re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in re.findall(r"^## (.+)$", text, re.M)
    }
    links = re.findall(r"^- \[[^]]+\]\(#([^)]+)\)$", text, re.M)
    assert links and set(links) <= slugs, sorted(set(links) - slugs)
