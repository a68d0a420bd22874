"""End to end through real Prefect processes: `prefect server start` on loopback, `prefect deploy --all` from
deployments/prefect.yaml, process workers on the `cpu` and `gpu` pools, runs triggered with the
`prefect deployment run` CLI, the store on the moto S3 server. Stage jobs are the stand-ins of
tests/flow_fake_stages.py (this test is about orchestration; the stages have their own tests).

1. first run: every stage ran; sft/reward/ppo ran as their own `train-stage/gpu` flow runs (execution.work_pool);
2. second run, same parameters: every stage is a Prefect cache hit, nothing launched;
3. `rlhf run` with a fresh Prefect home (ephemeral API, empty database) on the same store: still every stage
   cached, from the records kept in the bucket;
4. the `rlhf-sweep/sweep` deployment over two kl_coef values with the grid as its typed parameter: the shared
   stages are cached, each variant's ppo and eval run, and the comparison report is in the bucket.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, free_port
from rlhf_tasks import stages

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
STAGES = list(stages.STAGES)


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError("prefect server did not become healthy")


@pytest.fixture
def env(tmp_path, moto_server):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import flow_fake_stages\nflow_fake_stages.install()\n")
    e = dict(os.environ)
    e.update(
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_WORKER_QUERY_SECONDS="1",
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{tmp_path / 'prefect.db'}",
        PYTHONPATH=os.pathsep.join([str(site), str(ROOT / "tests"), str(ROOT)]),
        RLHF_PROJECT_DIR=str(ROOT),
        RLHF_RUNS_DIR=str(tmp_path / "worker-runs"),
        FAKE_EVENTS=str(tmp_path / "events.txt"),
        AWS_ENDPOINT_URL=moto_server,
    )
    e.pop("PREFECT_API_URL", None)
    e.pop("PREFECT_LOCAL_STORAGE_PATH", None)
    return e


@pytest.fixture
def server(env, tmp_path):
    """A real Prefect server on a free loopback port, and two process workers (pools cpu and gpu)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    procs = []
    log = open(tmp_path / "server.log", "w")
    srv = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                           env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    procs.append(srv)
    try:
        _wait_healthy(url, srv)
        env["PREFECT_API_URL"] = url
        for pool in ("cpu", "gpu"):
            subprocess.run([str(BIN / "prefect"), "work-pool", "create", pool, "--type", "process"], env=env,
                           check=True, capture_output=True, timeout=120)
            wlog = open(tmp_path / f"worker-{pool}.log", "w")
            procs.append(subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", pool],
                                          env=env, cwd=tmp_path, stdout=wlog, stderr=subprocess.STDOUT,
                                          start_new_session=True))
        yield url
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                os.killpg(p.pid, 15)
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, 9)


def _prefect(env, *args, timeout=300) -> str:
    out = subprocess.run([str(BIN / "prefect"), "--no-prompt", *args], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, f"prefect {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout + out.stderr


def _trigger(env, overrides: list[str], deployment: str = "rlhf-pipeline/on-demand", *params: str) -> str:
    out = _prefect(env, "deployment", "run", deployment, "--param", f"overrides={json.dumps(overrides)}", *params,
                   "--watch", "--watch-interval", "2", "--watch-timeout", "600", timeout=700)
    m = re.search(r"UUID:\s*([0-9a-f-]{36})", out)
    assert m, out
    assert "Completed" in out, out
    return m.group(1)


def _record(fs, url: str, run_id: str) -> dict:
    with fs.open(f"{url}/runs/{run_id}.json") as f:
        return json.load(f)


def _events(env) -> list[list[str]]:
    p = Path(env["FAKE_EVENTS"])
    lines = [ln.split() for ln in p.read_text().splitlines() if ln.strip()] if p.exists() else []
    p.unlink(missing_ok=True)
    return lines


def test_server_worker_deploy_trigger_and_cache(env, server, s3_bucket, moto_server, tmp_path):
    import s3fs

    out = _prefect(env, "deploy", "--all", "--prefect-file", "deployments/prefect.yaml")
    for name in ("on-demand", "scheduled-retrain", "gpu"):
        assert name in out
    # The stored pull step names the worker's variable, not this machine's RLHF_PROJECT_DIR (ROOT).
    inspected = _prefect(env, "deployment", "inspect", "rlhf-pipeline/on-demand")
    pull = re.search(r"'pull_steps': \[(.*?)\]", inspected, re.S)
    assert pull and "set_project_dir" in pull.group(1) and str(ROOT) not in pull.group(1), inspected
    url = f"{s3_bucket}/exp"
    overrides = [f"store.url={url}", f"store.endpoint_url={moto_server}", "execution.work_pool=gpu",
                 f"execution.runs_dir={tmp_path / 'runs'}", "execution.retry_delay_s=0"]
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": moto_server})

    t0 = time.time()
    first = _record(fs, url, _trigger(env, overrides))
    first_s = time.time() - t0
    assert {s: v["status"] for s, v in first["stages"].items()} == dict.fromkeys(STAGES, "ran")
    events = _events(env)
    order = [e[0] for e in events]  # sft and reward run at the same time (4 slots with a work pool): either first
    assert order[0] == "data" and sorted(order[1:3]) == ["reward", "sft"] and order[3:] == ["ppo", "eval"]
    # The training stages ran in their own train-stage flow runs on the gpu pool; data and eval in the pipeline's.
    run_of = {e[0]: e[2] for e in events}
    assert run_of["data"] == run_of["eval"] == first["run_id"]
    assert len({run_of["sft"], run_of["reward"], run_of["ppo"], first["run_id"]}) == 4

    t0 = time.time()
    second = _record(fs, url, _trigger(env, overrides))
    second_s = time.time() - t0
    assert {s: v["status"] for s, v in second["stages"].items()} == dict.fromkeys(STAGES, "cached")
    assert {v["prefect_state"] for v in second["stages"].values()} == {"Cached"}
    assert _events(env) == []
    print(f"\nserver+worker run: first {first_s:.1f} s, cached {second_s:.1f} s")

    # Another "machine": a fresh Prefect home and database (ephemeral API), the same store.
    fresh = dict(env, PREFECT_HOME=str(tmp_path / "other-home"))
    fresh.pop("PREFECT_API_URL")
    fresh.pop("PREFECT_API_DATABASE_CONNECTION_URL")
    summary = tmp_path / "summary.json"
    cli = [str(BIN / "rlhf"), "run", "--summary-json", str(summary)]
    for o in overrides:
        if not o.startswith("execution.work_pool"):
            cli += ["--set", o]
    out = subprocess.run(cli, env=fresh, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    third = json.loads(summary.read_text())
    assert {v["prefect_state"] for v in third["stages"].values()} == {"Cached"}
    assert {s: v["uri"] for s, v in third["stages"].items()} == {s: v["uri"] for s, v in first["stages"].items()}
    assert _events(env) == []

    # A sweep from its deployment, the grid as the typed parameter: data/sft/reward are the first run's.
    grid = [{"key": "ppo.kl_coef", "values": [0.05, 0.2]}]
    run_id = _trigger(env, overrides, "rlhf-sweep/sweep", "--param", f"grid={json.dumps(grid)}")
    variants = [_record(fs, url, f"{run_id}-{i}") for i in range(2)]
    for v in variants:
        assert {s: x["status"] for s, x in v["stages"].items()} == {"data": "cached", "sft": "cached",
                                                                     "reward": "cached", "ppo": "ran", "eval": "ran"}
    assert sorted(e[0] for e in _events(env)) == ["eval", "eval", "ppo", "ppo"]
    [report] = fs.glob(f"{url}/sweeps/*/sweep-report.md")
    text = fs.cat(report).decode()
    assert "kl_coef=0.05" in text and "kl_coef=0.2" in text
