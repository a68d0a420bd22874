"""Shared helpers of the training tests: a small demo data artifact, stage specs, in-process and launched runs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from rlhf_tasks.config import load_config
from rlhf_tasks.stages import StageSpec


def tiny_cfg(overrides: list[str] = ()):
    return load_config(None, list(overrides))


def make_data_artifact(store, cfg, n_rows: int = 600) -> str:
    """A `data` artifact of the demo task built by the real data stage (first `n_rows` demo rows)."""
    import tempfile

    from rlhf_tasks.data.stage import prepare

    key = f"test-demo-{n_rows}"
    if not store.exists("data", key):
        cfg = cfg.model_copy(deep=True)
        cfg.data.sources[0].max_rows = n_rows
        out = Path(tempfile.mkdtemp(prefix="data-")) / "artifact"
        prepare(cfg, out)
        store.put_dir(out, "data", key)
    return store.uri("data", key)


def make_spec(stage: str, cfg, store, data_uri: str, run_dir: Path, key: str) -> StageSpec:
    return StageSpec(stage=stage, key=key, config=cfg.model_dump(mode="json", by_alias=True),
                     inputs={"data": data_uri}, output_uri=store.uri(stage, key), store=store.settings(),
                     run_dir=str(run_dir))


def run_in_process(spec: StageSpec, monkeypatch) -> dict:
    """Run a stage job inside the test process (world size 1, a fresh rendezvous)."""
    from rlhf_tasks.launch import free_port
    from rlhf_tasks.stages import STAGE_DEFS
    import importlib

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.setenv(k, "0" if "RANK" in k else "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    return importlib.import_module(STAGE_DEFS[spec.stage].module).run(spec)


def metrics(store, uri: str) -> dict:
    return json.loads((store.get_uri(uri) / "metrics.json").read_text())


def step_losses(m: dict) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in m["history"] if "loss" in r}


def launch_and_kill(spec: StageSpec, execution, kill_after_step: int, timeout: float = 300) -> list[str]:
    """Start the stage job like the launcher does, wait until a checkpoint is committed and step
    `kill_after_step` is logged, then SIGKILL the whole process group. Returns the lines seen."""
    from rlhf_tasks.launch import build_command, free_port, job_env
    from rlhf_tasks.stages import STAGE_DEFS

    run_dir = Path(spec.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "spec.json").write_text(spec.to_json())
    port = free_port()
    cmd = build_command(run_dir / "spec.json", execution, distributed=STAGE_DEFS[spec.stage].distributed,
                        master_port=port)
    env = job_env(execution, num_procs=execution.num_procs, master_port=port)
    proc = subprocess.Popen(cmd, env=env, cwd=run_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines, committed = [], False
    deadline = time.time() + timeout
    try:
        for line in proc.stdout:
            lines.append(line.rstrip())
            if "checkpoint committed" in line:
                committed = True
            if committed and f"step {kill_after_step}/" in line:
                os.killpg(proc.pid, signal.SIGKILL)
                break
            if time.time() > deadline:
                break
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    assert committed and any(f"step {kill_after_step}/" in l for l in lines), "\n".join(lines[-40:])
    return lines
