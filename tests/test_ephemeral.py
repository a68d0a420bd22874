"""The CLI's temporary Prefect API: serves Prefect's real app, lives in its own session (the CLI's Ctrl-C and
group signals do not reach it) and never outlives a SIGKILLed CLI."""
import inspect
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from flows import ephemeral

CALLER = textwrap.dedent("""
    import os, sys, time, urllib.request
    from flows import ephemeral
    server = ephemeral.start(sys.argv[1])
    print(server.pid, server.api_url, flush=True)
    if os.environ.get("STOP_NORMALLY"):
        raise SystemExit(0)   # atexit stops the server
    try:
        time.sleep(300)
    except KeyboardInterrupt:  # the flow would now report its end to the API: is it still there?
        time.sleep(1)
        print("after interrupt: healthy" if ephemeral._healthy(server.api_url) else "after interrupt: gone",
              flush=True)
""")


def _gone(pid: int, within_s: float = 20.0) -> bool:
    deadline = time.time() + within_s
    while time.time() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


def _start_caller(tmp_path, **env):
    proc = subprocess.Popen([sys.executable, "-c", CALLER, str(tmp_path / "api.log")], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, **env}, start_new_session=True)
    pid, url = proc.stdout.readline().split()
    return proc, int(pid), url


def test_server_survives_the_clis_ctrl_c_until_the_cli_exits(tmp_path):
    proc, server_pid, url = _start_caller(tmp_path)
    try:
        assert ephemeral._healthy(url)
        assert os.getsid(server_pid) == server_pid != os.getsid(proc.pid)  # group signals of the CLI miss it
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does to the CLI's group: the server keeps serving
        assert proc.stdout.readline().strip() == "after interrupt: healthy"
        proc.wait(30)
    finally:
        proc.kill()
        proc.wait()
    assert _gone(server_pid), "the temporary Prefect API outlived its CLI"  # stopped at exit


def test_sigkilled_caller_takes_the_server_down(tmp_path):
    proc, server_pid, url = _start_caller(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _gone(server_pid), "the temporary Prefect API outlived a SIGKILLed CLI (reparented to pid 1)"


def test_normal_exit_stops_the_server(tmp_path):
    proc, server_pid, url = _start_caller(tmp_path, STOP_NORMALLY="1")
    assert proc.wait(60) == 0
    assert _gone(server_pid)


def test_prefect_still_has_the_ephemeral_switches_we_set():
    """We start Prefect's app ourselves; this fails when an upgrade renames its ephemeral-mode switches."""
    from prefect.server.api import server

    ours = inspect.getsource(server.SubprocessASGIServer._run_uvicorn_command)
    for name, value in ephemeral.SERVER_ENV.items():
        assert f'"{name}": "{value}"' in ours, name
    assert ephemeral.APP_FACTORY in ours
    factory = inspect.getsource(server.create_app)
    assert "PREFECT__SERVER_EPHEMERAL" in factory and "PREFECT__SERVER_FINAL" in factory
