"""The public-API example (examples/custom_ppo_loop.py) runs end to end on tiny models."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_custom_ppo_loop_example_runs(tmp_path):
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "custom_ppo_loop.py"), "--steps", "3"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "step 3:" in proc.stdout
    assert (tmp_path / "custom-ppo-out" / "actor" / "config.json").exists()
    assert (tmp_path / "custom-ppo-out" / "ema" / "config.json").exists()
