"""What the chaos cases drive: the real `rlhf` CLI as a subprocess in its own process group, its console read line by
line (the stage it is in, the step it reached), signals to the group or to one process, and a census of every
process a run started (they all inherit a tag in their environment, so nothing reparented to pid 1 escapes it)."""
from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "chaos.yaml"
RLHF = [sys.executable, "-m", "rlhf_tasks.cli"]
TAG_VAR = "RLHF_CHAOS_TAG"
TRAINING_STAGES = ("sft", "reward", "ppo")
STEP_RE = re.compile(r"\[(sft|reward|ppo)\] step (\d+)/(\d+)")


def rlhf(*args: str, env: dict | None = None, cwd: str | Path | None = None, timeout: float = 300):
    """A short CLI command (plan, store ...) -> CompletedProcess."""
    return subprocess.run([*RLHF, *args], capture_output=True, text=True, env={**os.environ, **(env or {})},
                          cwd=cwd, timeout=timeout)


class Run:
    """`rlhf <args>` in a new session (its pid is the group id); stdout and stderr lines collected as they come."""

    def __init__(self, *args: str, env: dict | None = None, cwd: str | Path | None = None):
        self.tag = uuid.uuid4().hex
        # A run's own temporary Prefect API, as a user gets it (an API another test left in our environment is not)
        base = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
        self.env = {**base, **(env or {}), TAG_VAR: self.tag}
        self.proc = subprocess.Popen([*RLHF, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=self.env, cwd=cwd, start_new_session=True)
        self.out: list[str] = []
        self.err: list[str] = []
        self._lines: queue.Queue = queue.Queue()
        for stream, sink in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=self._read, args=(stream, sink), daemon=True).start()

    def _read(self, stream, sink: list[str]) -> None:
        for line in iter(stream.readline, ""):
            sink.append(line.rstrip("\n"))
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_for(self, pattern: str | re.Pattern, timeout: float = 600) -> re.Match:
        """Block until a console line matches `pattern` (fails if the run ends or `timeout` passes first)."""
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        ended = 0
        while time.monotonic() < deadline:
            try:
                line = self._lines.get(timeout=1.0)
            except queue.Empty:
                continue
            if line is None:
                ended += 1
                if ended == 2:
                    break
                continue
            m = rx.search(line)
            if m:
                return m
        raise AssertionError(f"no line matching {rx.pattern!r}; rc={self.proc.poll()}\n{self.text[-4000:]}")

    def signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass

    def wait(self, timeout: float = 900) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal_group(signal.SIGKILL)
            self.proc.wait()
            raise AssertionError(f"rlhf did not end within {timeout} s\n{self.text[-4000:]}") from None

    def finish(self, timeout: float = 900) -> int:
        rc = self.wait(timeout)
        time.sleep(0.2)  # let the reader threads take the last lines
        return rc

    @property
    def text(self) -> str:
        return "\n".join(self.out + ["--- stderr ---"] + self.err)

    def kill_all(self) -> None:
        """Cleanup: SIGKILL the group and every process that carries this run's tag."""
        self.signal_group(signal.SIGKILL)
        for pid in tagged_processes(self.tag):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass


def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def tagged_processes(tag: str) -> list[int]:
    """Live (non-zombie) processes whose environment carries `tag`: the run and everything it started."""
    needle = f"{TAG_VAR}={tag}".encode()
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = (d / "environ").read_bytes()
        except OSError:
            continue
        if needle in env.split(b"\0") and _state(int(d.name)) not in (None, "Z"):
            found.append(int(d.name))
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def leftovers(run: Run, within_s: float = 40.0) -> list[str]:
    """The processes of `run` still alive `within_s` after it ended (a job's supervisor gets a 10 s grace to take
    its ranks down). Empty is the goal."""
    deadline = time.monotonic() + within_s
    while True:
        left = [p for p in tagged_processes(run.tag) if p != run.pid or _state(p) not in (None, "Z")]
        if not left or time.monotonic() > deadline:
            return [f"{p}: {cmdline(p)[:200]}" for p in left]
        time.sleep(0.25)


def run_args(store: str | Path, runs_dir: Path, *extra: str) -> list[str]:
    return ["run", "--config", str(CONFIG), "--store", str(store), "--set", f"execution.runs_dir={runs_dir}", *extra]


def stage_uris(summary_path: Path) -> dict[str, str]:
    record = json.loads(Path(summary_path).read_text())
    return {stage: v["uri"] for stage, v in record["stages"].items()}


def history_steps(metrics_json: Path) -> list[int]:
    """The optimizer steps a training artifact's history holds (sorted, unique)."""
    hist = json.loads(Path(metrics_json).read_text()).get("history", [])
    return sorted({int(r["step"]) for r in hist if "step" in r and int(r["step"]) > 0})


def verify_all(store_url: str, env: dict | None = None) -> dict[str, tuple[str, int]]:
    """For every artifact folder of the store: (`rlhf store ls` status, exit code of `rlhf store verify`, which
    re-hashes every file). A complete artifact must say ("ok", 0); an unfinished upload ("INCOMPLETE", 2)."""
    r = rlhf("store", "ls", "--store", store_url, "--json", env=env)
    assert r.returncode == 0, r.stderr
    out = {}
    for row in json.loads(r.stdout):
        uri = f"{store_url.rstrip('/')}/{row['kind']}/{row['key']}"
        out[uri] = (row["status"], rlhf("store", "verify", uri, env=env).returncode)
    return out


def assert_store_sound(store_url: str, env: dict | None = None) -> dict[str, tuple[str, int]]:
    """Every complete artifact verifies and nothing unfinished verifies."""
    seen = verify_all(store_url, env)
    bad = {u: v for u, v in seen.items() if v not in (("ok", 0), ("INCOMPLETE", 2))}
    assert not bad, f"artifacts that lie about themselves: {bad}"
    return seen


def copy_artifact(src_root: Path, dst_root: Path, kind: str, key: str) -> None:
    shutil.copytree(src_root / kind / key, dst_root / kind / key)
