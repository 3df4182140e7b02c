"""kill -9 mid-fit, resume from last.ckpt, finish with exactly the metrics of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

DRIVER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    import lightning as L, torch
    sys.path.insert(0, {root!r})
    from mchar.config import TrainerConfig
    from mchar.lit.gistnet_module import GistNetModule
    from mchar.lit.trainer import build_trainer
    from mchar.lit.windows import StepDataModule
    from mchar.stages.gistnet import ckpt_path
    from tests.lit.helpers import DEPTH, H, K, tiny_base, tiny_gistnet, windows

    out, steps = Path(sys.argv[1]), 10
    torch.set_num_threads(1)

    class Pace(L.Callback):  # announce each step (after the previous step's checkpoint is on disk)
        def on_train_batch_start(self, trainer, *a):
            print("STEP", trainer.global_step, flush=True)
            time.sleep(0.2)

    class Ctx:  # the stage's resume rule: trainer.resume and <stage_dir>/checkpoints/last.ckpt
        class cfg:
            trainer = TrainerConfig(resume=True)

    L.seed_everything(0)
    m = GistNetModule(tiny_base(), tiny_gistnet(), block_size=K, depth=DEPTH, horizon=H, max_steps=steps,
                      warmup_steps=2)
    dm = StepDataModule(windows(16), windows(4, seed=9), batch_size=2, max_steps=steps, seed=0)
    tcfg = TrainerConfig(enable_progress_bar=False)
    trainer = build_trainer(tcfg, steps, out / "checkpoints", callbacks=[Pace()], every_n_train_steps=1)
    trainer.fit(m, datamodule=dm, ckpt_path=ckpt_path(Ctx, out))
    val = trainer.validate(m, datamodule=dm, verbose=False)[0]
    val["param_sum"] = float(sum(p.double().sum() for p in m.gistnet.parameters()))
    (out / "final.json").write_text(json.dumps(val))
    """
)


def _launch(script: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.Popen(
        [sys.executable, str(script), str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )


@pytest.mark.slow
def test_kill9_resume_matches_uninterrupted(tmp_path: Path) -> None:
    root = str(Path(__file__).resolve().parents[2] / "src")
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(root=root))
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    ref.mkdir(), killed.mkdir()
    assert _launch(script, ref).wait(timeout=600) == 0

    proc = _launch(script, killed)
    for line in proc.stdout:  # type: ignore[union-attr]
        if line.startswith("STEP") and int(line.split()[1]) >= 5:
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert (killed / "checkpoints" / "last.ckpt").exists() and not (killed / "final.json").exists()

    resumed = _launch(script, killed)
    first = next(line for line in resumed.stdout if line.startswith("STEP"))  # type: ignore[union-attr]
    assert int(first.split()[1]) >= 4, f"did not resume: {first}"
    assert resumed.wait(timeout=600) == 0
    a, b = json.loads((ref / "final.json").read_text()), json.loads((killed / "final.json").read_text())
    assert a.keys() == b.keys()
    for k in a:
        assert abs(a[k] - b[k]) < 1e-6, (k, a[k], b[k])
