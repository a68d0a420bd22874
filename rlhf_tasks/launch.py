"""Launch a stage job (`python -m rlhf_tasks.stage_main SPEC.json`) and babysit it.

One process group per job: the job runs under a small supervisor (`python -m rlhf_tasks.launch --supervise ...`)
that leads a new session, so the group holds the supervisor, the launcher (torchrun / deepspeed) and every rank.
  - every output line is passed to `log` as it arrives and appended to `<run_dir>/<stage>.log`;
  - the launcher enforces `execution.timeout_s` itself and, on timeout, on an exception in the caller
    (KeyboardInterrupt, cancellation) and after the job ends, terminates the whole group (SIGTERM, then SIGKILL);
  - when the caller dies (SIGKILL, crash, a cancelled flow process), the supervisor notices (PR_SET_PDEATHSIG on
    Linux, plus a parent-pid check) and terminates the group: no orphaned ranks;
  - inherited rendezvous variables (RANK, WORLD_SIZE, MASTER_*, ...) are dropped and a free master port is chosen
    per job; one process runs without a launcher (rendezvous variables set), several on one node under torchrun
    (starts faster than the deepspeed launcher and forwards SIGTERM to ranks), several nodes under the deepspeed
    launcher with the hostfile and the chosen multinode runner (pdsh / openmpi / mvapich / slurm).
A failed job raises StageFailed with the exit code and the tail of its log.

Keep the top-level imports light: the supervisor imports this module too.
"""
from __future__ import annotations

import collections
import contextlib
import contextvars
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from .procs import set_pdeathsig

# Variables a parent launcher or job may have left behind; a job inheriting them would join the wrong group.
RENDEZVOUS_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                   "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
                   "CROSS_RANK", "CROSS_SIZE", "LOCAL_SIZE")
RENDEZVOUS_PREFIXES = ("TORCHELASTIC_", "OMPI_COMM_WORLD_", "PMI_", "PMIX_RANK", "MV2_COMM_WORLD_", "SLURM_PROCID")
TAIL_LINES = 60
KILL_GRACE_S = 10.0
PKG_PARENT = Path(__file__).resolve().parent.parent
# Set by a scheduler running stage jobs in threads (flows/stage_loop.py): once the event is set (Ctrl-C in the main
# thread), every job started in that context is taken down and raises KeyboardInterrupt. A context variable, so it
# reaches the threads the scheduler starts (with a copy of its context), and nothing else.
STOP_JOBS: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar("rlhf_stop_jobs", default=None)


def stop_requested() -> bool:
    stop = STOP_JOBS.get()
    return stop is not None and stop.is_set()


def free_port() -> int:
    """A TCP port free on this host right now (the job binds it moments later)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _gpu_present() -> bool:
    return shutil.which("nvidia-smi") is not None or os.path.exists("/dev/nvidia0")


def job_accelerator(execution, env: dict | None = None) -> str:
    """The accelerator a stage job gets under `execution`: "cpu", or DS_ACCELERATOR's value ("cuda", ...).
    `device: auto` takes DS_ACCELERATOR when it is set, else a GPU when one is present."""
    env = os.environ if env is None else env
    if execution.device != "auto":
        return execution.device
    return env.get("DS_ACCELERATOR") or ("cuda" if _gpu_present() else "cpu")


def job_env(execution, *, num_procs: int, master_port: int, base: dict | None = None) -> dict[str, str]:
    """The environment of a job: the caller's minus rendezvous variables, plus accelerator, threading and
    streaming settings. A lone process gets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT itself."""
    env = dict(os.environ if base is None else base)
    for k in list(env):
        if k in RENDEZVOUS_VARS or k.startswith(RENDEZVOUS_PREFIXES):
            del env[k]
    if job_accelerator(execution, env) == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    elif execution.device == "cuda":
        env["DS_ACCELERATOR"] = "cuda"
    if env.get("DS_ACCELERATOR") == "cpu":
        # ranks share the cores: split them. OMP_WAIT_POLICY is left at OpenMP's default (idle workers spin a few
        # ms, then sleep): the threads never outnumber the cores here, and PASSIVE (sleep at once) makes every
        # parallel region of every small op pay a futex wake-up, which doubled the PPO step time on 2 cores.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, num_procs))))
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("TQDM_DISABLE", "1")
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    env.setdefault("TRANSFORMERS_VERBOSITY", "warning")
    env["PYTHONPATH"] = os.pathsep.join([str(PKG_PARENT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                                              if p and p != str(PKG_PARENT)])
    if num_procs == 1:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(master_port))
    return env


def choose_launcher(execution, distributed: bool) -> str:
    """none | torchrun | deepspeed for a stage job under `execution`."""
    total = execution.num_procs * execution.num_nodes
    if not distributed or total == 1:
        return "none"
    if execution.launcher != "auto":
        if execution.launcher == "none":
            from .errors import ConfigError

            raise ConfigError(f"execution.launcher: none cannot start {total} processes")
        if execution.launcher == "torchrun" and execution.num_nodes > 1:
            from .errors import ConfigError

            raise ConfigError("execution.launcher: torchrun here runs one node; multi-node uses deepspeed")
        return execution.launcher
    return "deepspeed" if execution.num_nodes > 1 else "torchrun"


def build_command(spec_path: str | Path, execution, *, distributed: bool, master_port: int) -> list[str]:
    """The job's command line (without the supervisor)."""
    entry = ["-m", "rlhf_tasks.stage_main", str(spec_path)]
    launcher = choose_launcher(execution, distributed)
    py = sys.executable
    if launcher == "none":
        return [py, *entry]
    if launcher == "torchrun":
        return [py, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(execution.num_procs),
                "--master_addr", "127.0.0.1", "--master_port", str(master_port), "--max_restarts", "0", *entry]
    cmd = [py, "-m", "deepspeed.launcher.runner", "--num_accelerators", str(execution.num_procs),
           "--master_port", str(master_port)]
    if execution.num_nodes > 1:
        if not execution.hostfile:
            from .errors import ConfigError

            raise ConfigError("execution.hostfile: required for num_nodes > 1")
        cmd += ["--hostfile", str(Path(execution.hostfile).expanduser()), "--num_nodes", str(execution.num_nodes),
                "--launcher", execution.multinode_runner]
    return [*cmd, "--module", *entry[1:]]


def _write_deepspeed_env(env: dict[str, str], path: Path) -> None:
    """Variables the deepspeed runner exports to remote nodes (it reads the file named by DS_ENV_FILE). Only the
    settings we chose; credentials stay in each node's own environment."""
    keys = ("DS_ACCELERATOR", "OMP_NUM_THREADS", "OMP_WAIT_POLICY", "TOKENIZERS_PARALLELISM", "TQDM_DISABLE",
            "HF_HUB_DISABLE_PROGRESS_BARS", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE",
            "RLHF_CACHE_DIR", "TORCH_EXTENSIONS_DIR", "AWS_ENDPOINT_URL", "PYTHONPATH", "PYTHONUNBUFFERED")
    path.write_text("".join(f"{k}={env[k]}\n" for k in keys if k in env))


# ---------------------------------------------------------------------------------------------------------
# running a command in its own process group
# ---------------------------------------------------------------------------------------------------------
def kill_group(pgid: int, grace_s: float = KILL_GRACE_S, proc: subprocess.Popen | None = None) -> None:
    """SIGTERM the group, wait up to `grace_s` for its leader, then SIGKILL whatever is left."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None and not _group_alive(pgid):
            return
        if proc is None and not _group_alive(pgid):
            return
        time.sleep(0.05)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover
        return True


class JobResult:
    def __init__(self, returncode: int | None, tail: list[str], timed_out: bool):
        self.returncode, self.tail, self.timed_out = returncode, tail, timed_out

    @property
    def tail_text(self) -> str:
        return "\n".join(self.tail)


def run_job(cmd: list[str], env: dict[str, str], *, log: Callable[[str], None] = print, timeout_s: float | None = None,
            log_path: str | Path | None = None, cwd: str | Path | None = None,
            grace_s: float = KILL_GRACE_S) -> JobResult:
    """Run `cmd` in a new session under the supervisor; stream lines to `log` (and `log_path`); enforce
    `timeout_s`; kill the group on timeout, on any exception raised while waiting (KeyboardInterrupt,
    cancellation) and at the end. Returns the exit code (None after a timeout) and the last lines."""
    if stop_requested():
        raise KeyboardInterrupt("run stopped before the job started")
    sup = [sys.executable, "-m", "rlhf_tasks.launch", "--supervise", str(os.getpid()), str(grace_s), "--", *cmd]
    sup_env = dict(env)
    sup_env["PYTHONPATH"] = os.pathsep.join([str(PKG_PARENT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.Popen(sup, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=sup_env,
                            cwd=cwd, start_new_session=True)
    pgid = proc.pid  # session leader: its pid is the group id
    lines: queue.Queue = queue.Queue()

    def reader():
        for raw in iter(proc.stdout.readline, b""):
            lines.put(raw.decode("utf-8", "replace").rstrip("\r\n"))
        lines.put(None)

    threading.Thread(target=reader, daemon=True, name=f"job-{pgid}-reader").start()
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    logf = open(log_path, "a", encoding="utf-8", buffering=1) if log_path else None
    deadline = time.monotonic() + timeout_s if timeout_s else None
    timed_out = False
    exited_at = 0.0
    try:
        while True:
            if stop_requested():  # the finally below takes the group down
                raise KeyboardInterrupt("run stopped")
            wait = 0.5 if deadline is None else max(0.0, min(0.5, deadline - time.monotonic()))
            try:
                line = lines.get(timeout=wait)
            except queue.Empty:
                if proc.poll() is not None:  # the job is over; a stray process may still hold the pipe open
                    exited_at = exited_at or time.monotonic()
                    if time.monotonic() - exited_at > 2.0:
                        break
                if deadline is not None and time.monotonic() >= deadline:
                    timed_out = True
                    msg = f"[launch] timeout after {timeout_s:g} s: killing the job's process group {pgid}"
                    tail.append(msg)
                    if logf:
                        logf.write(msg + "\n")
                    log(msg)
                    break
                continue
            if line is None:
                break
            tail.append(line)
            if logf:
                logf.write(line + "\n")
            log(line)
        if not timed_out:
            proc.wait()
    finally:  # normal end, timeout, KeyboardInterrupt, cancellation: nothing of the job survives
        kill_group(pgid, grace_s, proc)
        try:
            proc.wait(timeout=grace_s + 5)
        except subprocess.TimeoutExpired:  # pragma: no cover
            proc.kill()
        if logf:
            logf.close()
        if proc.stdout:
            proc.stdout.close()
    return JobResult(None if timed_out else proc.returncode, list(tail), timed_out)


# ---------------------------------------------------------------------------------------------------------
# the public entry point used by the flows
# ---------------------------------------------------------------------------------------------------------
def run_stage(spec, execution, log: Callable[[str], None] = print) -> str:
    """Run one stage job for `spec` under `execution` and return `spec.output_uri` once its artifact exists.

    Holds the stage key's lock in the store while the job runs (rlhf_tasks/locks.py): a run that finds another
    run making the same artifact waits for it and returns its URI. Writes `<run_dir>/spec.json` and
    `<run_dir>/<stage>.log`; after a commit the rest of `run_dir` (the job's scratch) is removed. Raises
    JobInputError (the job's one line) when the job exits 2 (bad input), StageFailed (exit code, log tail) when it
    fails otherwise, times out, or ends without committing its artifact."""
    from .locks import stage_lock

    store = spec.open_store()
    kind, key = store.parse_uri(spec.output_uri)
    with stage_lock(store, kind, key, done=lambda: store.exists(kind, key), log=lambda line: log(f"[lock] {line}"),
                    run=Path(spec.run_dir).parent.name if spec.run_dir else "") as mine:
        if not mine or store.exists(kind, key):
            log(f"[lock] {spec.stage}: {spec.output_uri} was committed by another run; using it")
            return spec.output_uri
        return _run_stage_locked(spec, execution, store, log)


def _run_stage_locked(spec, execution, store, log: Callable[[str], None]) -> str:
    from .errors import JobInputError, StageFailed, UserError
    from .stage_main import INPUT_ERROR_FILE
    from .stages import STAGE_DEFS

    run_dir = Path(spec.run_dir or Path.cwd() / "rlhf-runs" / f"{spec.stage}-{spec.key}").resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    spec.run_dir = str(run_dir)
    spec_path = run_dir / "spec.json"
    spec_path.write_text(spec.to_json())
    distributed = STAGE_DEFS[spec.stage].distributed
    port = free_port()
    cmd = build_command(spec_path, execution, distributed=distributed, master_port=port)
    procs = execution.num_procs if distributed else 1
    env = job_env(execution, num_procs=procs, master_port=port)
    if distributed and execution.num_nodes > 1:
        _write_deepspeed_env(env, run_dir / "deepspeed_env")
        env["DS_ENV_FILE"] = str(run_dir / "deepspeed_env")
    log_path = run_dir / f"{spec.stage}.log"
    input_error = run_dir / INPUT_ERROR_FILE
    input_error.unlink(missing_ok=True)  # an earlier try's, in a reused run folder
    with _device_lease(execution, env, procs, STAGE_DEFS[spec.stage].accelerated, log) as leased:
        if leased is not None:
            env["CUDA_VISIBLE_DEVICES"] = leased.cuda_visible_devices
            log(f"[devices] {spec.stage}: GPUs {leased.cuda_visible_devices} leased to this job")
        log(f"[launch] {spec.stage}: {' '.join(cmd)} (log: {log_path})")
        t0 = time.time()
        res = run_job(cmd, env, log=log, timeout_s=execution.timeout_s, log_path=log_path, cwd=run_dir)
    if input_error.exists():  # bad input found inside the job by any rank, whatever the launcher's exit code
        said = input_error.read_text().strip() or "bad input (no message)"
        raise JobInputError(f"{spec.stage}: {said} (log: {log_path})")
    if res.timed_out:
        raise StageFailed(spec.stage, f"timed out after {execution.timeout_s:g} s (log: {log_path})", None,
                          res.tail_text)
    if res.returncode == UserError.exit_code:  # a job of one process that could not write the file
        said = next((l for l in reversed(res.tail) if l.startswith("error: ")), "error: bad input (no message)")
        raise JobInputError(f"{spec.stage}: {said.removeprefix('error: ').strip()} (log: {log_path})")
    if res.returncode != 0:
        last = next((l for l in reversed(res.tail) if l.strip()), "")
        raise StageFailed(spec.stage, f"exit code {res.returncode} (log: {log_path}): {last.strip()}",
                          res.returncode, res.tail_text)
    kind, key = store.parse_uri(spec.output_uri)
    if not store.exists(kind, key):
        raise StageFailed(spec.stage, f"job ended without committing {spec.output_uri} (log: {log_path})", 0,
                          res.tail_text)
    remove_scratch(run_dir, keep=(spec_path.name, log_path.name))
    log(f"[launch] {spec.stage}: done in {time.time() - t0:.1f} s -> {spec.output_uri}")
    return spec.output_uri


def _device_lease(execution, env: dict[str, str], procs: int, accelerated: bool, log: Callable[[str], None]):
    """The job's own GPUs while it runs (rlhf_tasks/devices.py), on one node with enough GPUs visible; else no
    lease (a CPU job, multi-node, or fewer GPUs than processes: the job then sees what it would see anyway)."""
    from . import devices

    visible = devices.visible_devices(env)
    if (not accelerated or execution.num_nodes > 1 or job_accelerator(execution, env) == "cpu"
            or procs > len(visible)):
        return contextlib.nullcontext()
    return devices.lease(procs, visible, devices.lease_dir(env), log=log, should_stop=stop_requested)


def remove_scratch(run_dir: Path, keep: tuple[str, ...]) -> None:
    """Delete a committed job's scratch (staged output, checkpoint staging, TensorBoard events): the artifact is
    in the store now. The spec and the log stay for the user."""
    for entry in run_dir.iterdir():
        if entry.name in keep:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------
# the supervisor: leads the job's process group and takes it down when the caller goes away
# ---------------------------------------------------------------------------------------------------------
def _supervise(parent_pid: int, grace_s: float, cmd: list[str]) -> int:
    pgid = os.getpgrp()
    stopping = threading.Event()

    def take_down(reason: str) -> None:
        if stopping.is_set():
            return
        stopping.set()
        try:  # the caller's pipe may be gone: never let reporting stop the cleanup
            print(f"[launch] {reason}: terminating the job", flush=True)
        except OSError:
            pass
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.05)
        os.killpg(pgid, signal.SIGKILL)  # includes this supervisor

    set_pdeathsig(signal.SIGTERM)
    child = subprocess.Popen(cmd)  # same group; inherits stdout/stderr (the caller's pipe)
    signal.signal(signal.SIGTERM, lambda *_: take_down("SIGTERM"))
    signal.signal(signal.SIGINT, lambda *_: take_down("SIGINT"))
    signal.signal(signal.SIGHUP, lambda *_: take_down("SIGHUP"))
    if os.getppid() != parent_pid:  # the caller died before PR_SET_PDEATHSIG took effect
        take_down("caller gone")
    while True:
        try:
            rc = child.wait(timeout=0.5)
            return rc if rc >= 0 else 128 - rc
        except subprocess.TimeoutExpired:
            if os.getppid() != parent_pid:
                take_down("caller gone")


if __name__ == "__main__":
    if len(sys.argv) >= 5 and sys.argv[1] == "--supervise" and sys.argv[4] == "--":
        sys.exit(_supervise(int(sys.argv[2]), float(sys.argv[3]), sys.argv[5:]))
    sys.exit("usage: python -m rlhf_tasks.launch --supervise PARENT_PID GRACE_S -- CMD...")
