"""`rlhf sweep` over two `ppo.kl_coef` values on the demo, end to end with the real stages (tiny models, CPU, some
minutes): data, SFT and the reward model run once, each variant's PPO and evaluation run, the comparison report
is in the store with both variants' numbers, and a second call is all cached. Prints the CLI's output and the wall
times (the README's measured sweep)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
GRID = "ppo.kl_coef=0.05,0.2"


def _sweep(tmp_path: Path, summary: Path) -> tuple[subprocess.CompletedProcess, float]:
    cmd = [sys.executable, "-m", "rlhf_tasks.cli", "sweep", "--store", str(tmp_path / "store"), "--set",
           f"execution.runs_dir={tmp_path / 'runs'}", "--grid", GRID, "--summary-json", str(summary)]
    t0 = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, cwd=tmp_path, env=dict(os.environ))
    return out, time.monotonic() - t0


def test_demo_sweep_shares_stages_reports_and_is_cached_the_second_time(tmp_path):
    load = os.getloadavg()
    out, first_s = _sweep(tmp_path, tmp_path / "first.json")
    print(f"\n$ rlhf sweep --grid {GRID}  ({first_s:.0f} s wall, load {load[0]:.1f})\n{out.stdout}")
    assert out.returncode == 0, out.stderr
    record = json.loads((tmp_path / "first.json").read_text())
    variants = {v["name"]: v for v in record["variants"]}
    assert set(variants) == {"kl_coef=0.05", "kl_coef=0.2"}
    a, b = variants["kl_coef=0.05"]["stages"], variants["kl_coef=0.2"]["stages"]
    for stage in ("data", "sft", "reward"):  # one artifact, made once
        assert a[stage]["uri"] == b[stage]["uri"] and a[stage]["status"] == b[stage]["status"] == "ran"
    for stage in ("ppo", "eval"):
        assert a[stage]["uri"] != b[stage]["uri"] and a[stage]["status"] == b[stage]["status"] == "ran"
    report = Path(record["report"]).read_text()
    assert "kl_coef=0.05" in report and "kl_coef=0.2" in report and "plots/sweep_kl.png" in report
    assert (Path(record["report"]).parent / "plots" / "sweep_kl.png").stat().st_size > 0
    for s in (a, b):
        assert {"gold_ppo", "rm_ppo", "kl_ppo_ref", "win_rate_rm", "len_ppo"} <= set(s["eval"]["metrics"])

    out, second_s = _sweep(tmp_path, tmp_path / "second.json")
    print(f"$ rlhf sweep --grid {GRID}  (again: {second_s:.0f} s wall, load {os.getloadavg()[0]:.1f})\n"
          f"{out.stdout}")
    assert out.returncode == 0, out.stderr
    again = json.loads((tmp_path / "second.json").read_text())
    assert {st["status"] for v in again["variants"] for st in v["stages"].values()} == {"cached"}
