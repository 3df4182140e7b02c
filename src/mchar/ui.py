"""``python -m mchar ui``: the MLflow UI over mchar's tracking store.

Runs ``mlflow server`` as a child process with the store as backend (so sweeps' nested runs, params and
metrics show up) and serves artifacts (reports, PNGs, focus maps). Binds 127.0.0.1 unless told otherwise: the
UI has no authentication, so reach it from elsewhere through an SSH tunnel. SIGTERM/SIGINT are forwarded to
the server, which stops its workers itself.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from mchar.errors import MCharError


def server_command(host: str, port: int, tracking_uri: str) -> list[str]:
    """The ``mlflow server`` command line for ``tracking_uri`` (artifacts served from beside an SQLite store)."""
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        tracking_uri,
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    if tracking_uri.startswith("sqlite:///"):
        artifacts = Path(tracking_uri[len("sqlite:///") :]).parent / "mlartifacts"
        cmd += ["--artifacts-destination", str(artifacts)]
    return cmd


def start_ui(host: str, port: int, tracking_uri: str, **popen: Any) -> subprocess.Popen[bytes]:
    """Start the server and return at once (see :func:`wait_ready`)."""
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri[len("sqlite:///") :]).exists():
        raise MCharError(
            f"ui: no tracking store at {tracking_uri} (run a command first, or pass --tracking-uri)"
        )
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"mchar ui: warning: binding {host}: the MLflow UI has no authentication", file=sys.stderr)
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    return subprocess.Popen(server_command(host, port, tracking_uri), env=env, **popen)


def wait_ready(url: str, proc: subprocess.Popen[bytes] | None = None, timeout: float = 90.0) -> float:
    """Poll ``<url>/health`` until it answers; returns the seconds it took."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise MCharError(f"ui: mlflow server exited with code {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return time.monotonic() - t0
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.3)
    raise MCharError(f"ui: {url} not ready after {timeout:.0f}s")


def stop_ui(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> int:
    """SIGTERM (the server stops its workers), SIGKILL only if it does not exit in time."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def check_listen(host: str, port: int) -> None:
    """A bad or busy port stops in one line before the server starts (its own error is a gunicorn traceback)."""
    if not 1 <= port <= 65535:
        raise MCharError(f"ui: --port must be in [1, 65535], got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            raise MCharError(
                f"ui: cannot listen on {host}:{port}: {err.strerror or err} (pass another --port)"
            ) from None


def serve_ui(host: str = "127.0.0.1", port: int = 5000, tracking_uri: str | None = None) -> int:
    """Serve until interrupted; returns the server's exit code (0 after a forwarded SIGTERM/SIGINT)."""
    if tracking_uri is None:
        from mchar.report import default_tracking_uri

        tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri("default")
    check_listen(host, port)
    from mchar.report import require_store

    require_store(tracking_uri, "ui")
    proc = start_ui(host, port, tracking_uri)
    stopping = False

    def forward(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        if proc.poll() is None:
            proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
        try:
            took = wait_ready(url, proc)
            print(
                f"mchar ui: {url} (store {tracking_uri}; ready in {took:.1f}s; Ctrl-C stops)", file=sys.stderr
            )
        except MCharError:
            if not stopping:
                stop_ui(proc)
                raise
        code = proc.wait()
        return 0 if stopping else code
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if proc.poll() is None:
            stop_ui(proc)
