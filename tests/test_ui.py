"""The MLflow UI over a store holding a tiny real sweep, checked in headless Chromium (the UI is a React app,
so the DOM is dumped after its JavaScript ran)."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.test_sweep import write_spec

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dump_dom(url: str, profile: Path, screenshot: Path | None = None) -> str:
    assert CHROMIUM
    base = [
        CHROMIUM,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=20000",
        "--window-size=1600,1000",
    ]
    if screenshot is not None:
        subprocess.run([*base, f"--screenshot={screenshot}", url], capture_output=True, timeout=180)
    return subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=180).stdout


def text(dom: str) -> str:
    dom = re.sub(r"<(script|style)[^>]*>.*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))


@pytest.mark.slow
@pytest.mark.skipif(
    CHROMIUM is None, reason="chromium not installed (apt-get install -y --no-install-recommends chromium)"
)
def test_ui_shows_sweep_runs_and_params(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    import mchar.pipeline
    from mchar.sweep import run_sweep
    from mchar.ui import start_ui, stop_ui, wait_ready

    monkeypatch.setitem(mchar.pipeline.STAGE_MODULES, "eval", "tests.test_sweep:toy_stage")
    spec = write_spec(
        tmp_path,
        "uitoy",
        """
      allocator.budget: {type: int, values: [64, 128]}
      tree.depth: {type: int, values: [1, 3]}
    """,
    )
    spec.write_text(
        spec.read_text().replace("type: median, n_startup_trials: 1, n_warmup_steps: 0", "type: none")
    )
    run_sweep(spec)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("mchar").experiment_id
    study_run = client.search_runs([exp], "tags.`mchar.role` = 'study'")[0]
    trials = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{study_run.info.run_id}'")
    assert len(trials) == 4

    port = free_port()
    log = (tmp_path / "ui.log").open("wb")
    t0 = time.perf_counter()
    proc = start_ui("127.0.0.1", port, uri, stdout=log, stderr=subprocess.STDOUT)
    try:
        ready = wait_ready(f"http://127.0.0.1:{port}", proc, timeout=150)
        print(f"mlflow server ready after {ready:.1f}s")
        runs_page = text(
            dump_dom(
                f"http://127.0.0.1:{port}/#/experiments/{exp}/runs",
                tmp_path / "profile",
                screenshot=tmp_path / "runs.png",
            )
        )
        assert "study:uitoy" in runs_page, runs_page[:2000]
        for trial in trials[:2]:  # each trial run's page lists its params and its parent (the study run)
            page = text(
                dump_dom(
                    f"http://127.0.0.1:{port}/#/experiments/{exp}/runs/{trial.info.run_id}",
                    tmp_path / "profile",
                )
            )
            budget, depth = trial.data.params["allocator.budget"], trial.data.params["tree.depth"]
            assert f"allocator.budget {budget}" in page and f"tree.depth {depth}" in page, page[:3000]
            assert f"uitoy/trial-{trial.data.tags['mchar.trial']}" in page
            assert "study:uitoy" in page  # "Parent run"
        print(f"UI checks took {time.perf_counter() - t0:.1f}s")
    finally:
        code = stop_ui(proc)
        log.close()
    assert code == 0 or code == -15, (tmp_path / "ui.log").read_text()[-2000:]
    assert proc.poll() is not None
    with pytest.raises(OSError):  # nothing listens any more
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_bad_port_or_store_is_one_line_and_starts_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    import mchar.ui
    from mchar.errors import MCharError

    def no_server(*_a: object, **_k: object) -> None:
        raise AssertionError("the server must not start")

    monkeypatch.setattr(mchar.ui, "start_ui", no_server)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(store).search_experiments()  # a real, empty store
    with pytest.raises(MCharError, match=r"ui: --port must be in \[1, 65535\], got 70000"):
        mchar.ui.serve_ui(port=70000, tracking_uri=store)
    with pytest.raises(MCharError, match="ui: no tracking store at sqlite:///.*typo.db"):
        mchar.ui.serve_ui(port=free_port(), tracking_uri=f"sqlite:///{tmp_path / 'typo.db'}")
    assert not (tmp_path / "typo.db").exists()  # MLflow would have created an empty store there
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(MCharError, match=f"ui: cannot listen on 127.0.0.1:{port}: .*pass another --port"):
            mchar.ui.serve_ui(port=port, tracking_uri=store)


def test_mchar_ui_serves_a_store_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    import signal
    import sys

    from mlflow.tracking import MlflowClient

    from mchar.ui import wait_ready

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(store).create_experiment("mchar")
    port = free_port()
    cmd = [sys.executable, "-m", "mchar", "ui", "--port", str(port), "--tracking-uri", store]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc, timeout=120)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert f"mchar ui: http://127.0.0.1:{port}" in out
