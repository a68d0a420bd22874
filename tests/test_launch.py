"""Launcher: process groups, streaming, timeouts, caller death, env stripping, command building."""
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from rlhf_tasks.config import ExecutionConfig
from rlhf_tasks.errors import StageFailed
from rlhf_tasks.launch import build_command, choose_launcher, job_env, run_job, run_stage

PY = sys.executable


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); treat it as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _wait_gone(pids, timeout=10.0) -> list[int]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        left = [p for p in pids if _alive(p)]
        if not left:
            return []
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


# A job that starts a grandchild in the same group, prints both pids, then sleeps.
SLEEPER = textwrap.dedent("""
    import os, subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    print("PIDS", os.getpid(), child.pid, flush=True)
    time.sleep(300)
""")


def test_streams_lines_as_they_arrive_and_writes_log(tmp_path):
    seen = []
    stamps = []
    code = "import time\nfor i in range(3):\n    print('line', i, flush=True)\n    time.sleep(0.3)\n"
    res = run_job([PY, "-c", code], dict(os.environ), log=lambda l: (seen.append(l), stamps.append(time.time())),
                  timeout_s=30, log_path=tmp_path / "job.log")
    assert res.returncode == 0 and not res.timed_out
    assert seen == ["line 0", "line 1", "line 2"]
    assert stamps[2] - stamps[0] > 0.4  # streamed, not delivered at the end
    assert (tmp_path / "job.log").read_text().splitlines() == seen


def test_timeout_kills_the_whole_group(tmp_path):
    seen = []
    t0 = time.time()
    res = run_job([PY, "-c", SLEEPER], dict(os.environ), log=seen.append, timeout_s=3, grace_s=2)
    assert res.timed_out and res.returncode is None
    assert time.time() - t0 < 15
    pids = [int(x) for x in next(l for l in seen if l.startswith("PIDS")).split()[1:]]
    assert _wait_gone(pids) == [], "processes left behind after the timeout"
    assert "timeout" in res.tail_text


def test_keyboard_interrupt_in_caller_kills_the_group():
    pids = []

    def log(line):
        if line.startswith("PIDS"):
            pids.extend(int(x) for x in line.split()[1:])
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_job([PY, "-c", SLEEPER], dict(os.environ), log=log, timeout_s=60, grace_s=2)
    assert len(pids) == 2 and _wait_gone(pids) == []


def test_a_stopped_run_takes_down_jobs_running_in_other_threads():
    """A scheduler running jobs in worker threads (flows/stage_loop.run_graph) sets its STOP_JOBS event on Ctrl-C:
    each job it started, in any thread, is killed with its group and raises KeyboardInterrupt; a job started after
    that does not start at all."""
    import contextvars
    import threading

    from rlhf_tasks.launch import STOP_JOBS

    stop, pids, outcome = threading.Event(), [], []
    STOP_JOBS.set(stop)  # this test's own context; the thread gets a copy, as the scheduler's threads do
    context = contextvars.copy_context()
    STOP_JOBS.set(None)

    def log(line):
        if line.startswith("PIDS"):
            pids.extend(int(x) for x in line.split()[1:])
            stop.set()  # "Ctrl-C in the main thread" once the job is up

    def job():
        try:
            run_job([PY, "-c", SLEEPER], dict(os.environ), log=log, timeout_s=120, grace_s=2)
        except KeyboardInterrupt as e:
            outcome.append(e)

    t = threading.Thread(target=context.run, args=(job,))
    t.start()
    t.join(60)
    assert len(outcome) == 1 and len(pids) == 2 and _wait_gone(pids) == []
    with pytest.raises(KeyboardInterrupt, match="before the job started"):
        context.run(run_job, [PY, "-c", "print('never')"], dict(os.environ), log=log)


def test_caller_death_kills_the_group(tmp_path):
    """The caller is SIGKILLed (no cleanup runs in it): the supervisor takes the job down."""
    caller = textwrap.dedent(f"""
        import os, sys
        from rlhf_tasks.launch import run_job
        run_job([sys.executable, "-c", {SLEEPER!r}], dict(os.environ), log=lambda l: print(l, flush=True),
                timeout_s=120, grace_s=2)
    """)
    proc = subprocess.Popen([PY, "-c", caller], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    line = ""
    deadline = time.time() + 30
    while not line.startswith("PIDS") and time.time() < deadline:
        line = proc.stdout.readline()
    pids = [int(x) for x in line.split()[1:]]
    assert len(pids) == 2
    proc.kill()
    proc.wait()
    assert _wait_gone(pids, timeout=15) == [], "job survived its caller"


def test_failure_exit_code_and_tail(tmp_path):
    code = "import sys\nfor i in range(100): print('noise', i)\nprint('the real error: boom', flush=True)\nsys.exit(3)"
    res = run_job([PY, "-c", code], dict(os.environ), log=lambda l: None, timeout_s=30)
    assert res.returncode == 3
    assert res.tail[-1] == "the real error: boom" and len(res.tail) <= 60


def test_env_strips_rendezvous_and_sets_single_process_vars():
    base = {"RANK": "3", "WORLD_SIZE": "8", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1", "LOCAL_RANK": "3",
            "TORCHELASTIC_RUN_ID": "x", "OMPI_COMM_WORLD_RANK": "2", "KEEP_ME": "yes", "PATH": os.environ["PATH"]}
    ex = ExecutionConfig(device="cpu")
    env = job_env(ex, num_procs=1, master_port=12345, base=base)
    assert env["RANK"] == "0" and env["WORLD_SIZE"] == "1" and env["LOCAL_RANK"] == "0"
    assert env["MASTER_ADDR"] == "127.0.0.1" and env["MASTER_PORT"] == "12345"
    assert "TORCHELASTIC_RUN_ID" not in env and "OMPI_COMM_WORLD_RANK" not in env
    assert env["KEEP_ME"] == "yes" and env["DS_ACCELERATOR"] == "cpu" and "OMP_WAIT_POLICY" not in env
    env2 = job_env(ex, num_procs=2, master_port=1, base=base)
    assert not any(k in env2 for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"))
    assert int(env2["OMP_NUM_THREADS"]) == max(1, (os.cpu_count() or 1) // 2)
    # and the job really sees it
    res_lines = []
    run_job([PY, "-c", "import os, json; print(json.dumps({k: os.environ.get(k) for k in ('RANK', 'KEEP_ME')}))"],
            env, log=res_lines.append, timeout_s=30)
    assert json.loads(res_lines[-1]) == {"RANK": "0", "KEEP_ME": "yes"}


def test_command_choice():
    one = ExecutionConfig()
    assert choose_launcher(one, True) == "none"
    two = ExecutionConfig(num_procs=2)
    assert choose_launcher(two, True) == "torchrun" and choose_launcher(two, False) == "none"
    cmd = build_command("s.json", two, distributed=True, master_port=2222)
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and "--nproc_per_node" in cmd and "2222" in cmd
    assert cmd[-3:] == ["-m", "rlhf_tasks.stage_main", "s.json"]
    ds = ExecutionConfig(num_procs=2, launcher="deepspeed")
    cmd = build_command("s.json", ds, distributed=True, master_port=2222)
    assert "deepspeed.launcher.runner" in cmd and cmd[-3:] == ["--module", "rlhf_tasks.stage_main", "s.json"]
    multi = ExecutionConfig(num_procs=8, num_nodes=2, hostfile="/etc/hosts.ds", multinode_runner="slurm")
    cmd = build_command("s.json", multi, distributed=True, master_port=2222)
    assert choose_launcher(multi, True) == "deepspeed"
    assert cmd[cmd.index("--hostfile") + 1] == "/etc/hosts.ds" and cmd[cmd.index("--launcher") + 1] == "slurm"
    assert cmd[cmd.index("--num_nodes") + 1] == "2"


def test_run_stage_failure_surfaces_log_tail(tmp_path, local_store):
    """A stage job that fails (here: its data input does not exist) raises StageFailed with the log tail."""
    from rlhf_tasks.config import load_config
    from rlhf_tasks.stages import StageSpec

    cfg = load_config()
    spec = StageSpec(stage="sft", key="k" * 24, config=cfg.model_dump(mode="json", by_alias=True),
                     inputs={"data": local_store.uri("data", "missing")}, output_uri=local_store.uri("sft", "k" * 24),
                     store=local_store.settings(), run_dir=str(tmp_path / "run"))
    lines = []
    with pytest.raises(StageFailed) as ei:
        run_stage(spec, ExecutionConfig(device="cpu", timeout_s=120), log=lines.append)
    err = ei.value
    assert err.returncode not in (0, None)
    assert "Traceback" in err.log_tail and "no manifest" in err.log_tail
    assert "no manifest" in str(err) and "sft.log" in str(err)
    assert (tmp_path / "run" / "sft.log").exists() and (tmp_path / "run" / "spec.json").exists()


@pytest.mark.slow
def test_timeout_of_a_torchrun_job_leaves_no_rank_behind(tmp_path, local_store):
    """A real 2-process stage job under torchrun, stopped by the launcher's timeout mid-training."""
    from _training_helpers import make_data_artifact, make_spec, tiny_cfg

    cfg = tiny_cfg(["sft.max_steps=100000", "sft.epochs=1000", "sft.micro_batch_size=2"])
    data = make_data_artifact(local_store, tiny_cfg(), n_rows=200)
    spec = make_spec("sft", cfg, local_store, data, tmp_path / "run", "t" * 24)
    seen = []
    with pytest.raises(StageFailed) as ei:
        run_stage(spec, ExecutionConfig(device="cpu", num_procs=2, timeout_s=25), log=seen.append)
    assert "timed out" in str(ei.value)
    assert any("step" in line for line in seen), "the job should have been training when it was stopped"
    marker = str(tmp_path / "run" / "spec.json")

    def job_pids():
        out = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    if marker in (d / "cmdline").read_bytes().decode(errors="replace") and _alive(int(d.name)):
                        out.append(int(d.name))
                except OSError:
                    pass
        return out

    deadline = time.time() + 10
    while job_pids() and time.time() < deadline:
        time.sleep(0.2)
    assert job_pids() == []
