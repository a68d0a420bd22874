"""The temporary Prefect API server of `rlhf run` (used when PREFECT_API_URL is unset), owned by the CLI process.

Prefect's own temporary server (`prefect.server.api.server.SubprocessASGIServer`, started lazily by the first API
client) runs uvicorn in the caller's process group and is stopped only by an atexit hook. So Ctrl-C or a SIGTERM
to the group stops it at once, while the flow still has to report its end (every API call then retries against a
dead port for minutes), and a SIGKILLed CLI leaves it running under pid 1. This one serves the same app (Prefect's
`create_app` factory in ephemeral mode: no UI, no background services) in its own session, so signals meant for
the CLI never reach it; it dies with the CLI (PR_SET_PDEATHSIG plus a parent check) and is stopped at exit after
Prefect's log and event workers have drained (atexit runs in reverse order of registration).

Keep the top-level imports light: `python -m flows.ephemeral --serve` is the server process itself.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

STARTUP_TIMEOUT_S = 120.0  # migrations on a busy machine take a while
STOP_GRACE_S = 5.0
# Prefect's switches for an ephemeral server (read by prefect.server.api.server.create_app); checked by
# tests/test_ephemeral.py so that a Prefect upgrade that renames them fails there.
SERVER_ENV = {"PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1", "PREFECT_UI_ENABLED": "0"}
APP_FACTORY = "prefect.server.api.server:create_app"


class TemporaryAPI:
    """A running server: `api_url` for PREFECT_API_URL, `pid`, and `stop()` (idempotent)."""

    def __init__(self, proc: subprocess.Popen, port: int):
        self.proc, self.port = proc, port
        self.api_url = f"http://127.0.0.1:{port}/api"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        except ProcessLookupError:
            pass


@contextlib.contextmanager
def use(server: TemporaryAPI) -> Iterator[TemporaryAPI]:
    """Point Prefect at `server` until the process ends (its log and event workers drain at exit, after the
    body). Prefect reads PREFECT_API_URL when it is imported; a process that imported it already also gets the
    setting for the body."""
    os.environ["PREFECT_API_URL"] = server.api_url
    if "prefect" not in sys.modules:
        yield server
        return
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        yield server


def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def start(log_path: str | Path, attempts: int = 3) -> TemporaryAPI:
    """Start the server (its output appended to `log_path`, not the console), wait until it answers, register its
    stop at exit. Must run in the main thread (the death signal fires when the thread that started it ends)."""
    from rlhf_tasks.launch import free_port

    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(attempts):  # the free port can be taken before the server binds it
        port = free_port()
        with open(log_path, "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "flows.ephemeral", "--serve", str(port), str(os.getpid())],
                                    env={**os.environ, **SERVER_ENV}, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        server = TemporaryAPI(proc, port)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline and proc.poll() is None:
            if _healthy(server.api_url):
                atexit.register(server.stop)
                return server
            time.sleep(0.2)
        server.stop()
    last = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
    raise RuntimeError(f"the temporary Prefect API did not start ({log_path}): {last[0]}")


def serve(port: int, parent_pid: int) -> None:
    """The server process: die with the parent, then run uvicorn on Prefect's app factory."""
    from rlhf_tasks.procs import set_pdeathsig

    set_pdeathsig(signal.SIGTERM)
    if os.getppid() != parent_pid:  # the parent died before the death signal was armed
        return

    def watch_parent() -> None:  # PR_SET_PDEATHSIG is Linux-only; this covers the rest
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch_parent, daemon=True, name="parent-watch").start()
    import uvicorn

    uvicorn.run(APP_FACTORY, factory=True, host="127.0.0.1", port=port, log_level="error", lifespan="on")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--serve":
        serve(int(sys.argv[2]), int(sys.argv[3]))
        sys.exit(0)
    sys.exit("usage: python -m flows.ephemeral --serve PORT PARENT_PID")
