"""The store-free SFT / reward-model API example (examples/custom_sft_loop.py) runs end to end on tiny models and
both models learn: the SFT loss and eval perplexity fall, the reward model's eval loss falls."""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_custom_sft_loop_example_runs_and_learns(tmp_path):
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "custom_sft_loop.py"), "--steps", "12"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    num = r"([-+]?[0-9.]+)"
    sft = re.search(rf"sft: loss {num} -> {num}, eval ppl {num} -> {num}", proc.stdout)
    rm = re.search(rf"reward: eval loss {num} -> {num}, accuracy {num} -> {num}", proc.stdout)
    assert sft and rm, proc.stdout[-3000:]
    loss0, loss1, ppl0, ppl1 = map(float, sft.groups())
    assert loss1 < loss0 and ppl1 < ppl0
    rm_loss0, rm_loss1, _, acc1 = map(float, rm.groups())
    assert rm_loss1 < rm_loss0 and acc1 > 0.6
    for stage in ("sft", "reward"):
        folder = tmp_path / "custom-sft-out" / stage
        assert (folder / "config.json").exists() and (folder / "model.safetensors").exists()
        assert (folder / "metrics.json").exists()
    assert "held-out pair: chosen" in proc.stdout
