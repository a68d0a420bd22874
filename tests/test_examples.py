"""The public-API examples run end to end on tiny models: a custom PPO loop (examples/custom_ppo_loop.py), a GRPO
loop with a programmatic reward (examples/custom_grpo_loop.py) and
store-free SFT / reward-model training (examples/custom_sft_loop.py), whose models both learn."""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str, args: list[str], cwd: Path) -> str:
    """Run examples/<name> as a user would (no inherited rendezvous variables); its stdout."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_custom_ppo_loop_example_runs(tmp_path):
    out = run_example("custom_ppo_loop.py", ["--steps", "3"], tmp_path)
    assert "step 3:" in out
    assert (tmp_path / "custom-ppo-out" / "actor" / "config.json").exists()
    assert (tmp_path / "custom-ppo-out" / "ema" / "config.json").exists()


def test_custom_sft_loop_example_runs_and_learns(tmp_path):
    out = run_example("custom_sft_loop.py", ["--steps", "12"], tmp_path)
    num = r"([-+]?[0-9.]+)"
    sft = re.search(rf"sft: loss {num} -> {num}, eval ppl {num} -> {num}", out)
    rm = re.search(rf"reward: eval loss {num} -> {num}, accuracy {num} -> {num}", out)
    assert sft and rm, out[-3000:]
    loss0, loss1, ppl0, ppl1 = map(float, sft.groups())
    assert loss1 < loss0 and ppl1 < ppl0
    rm_loss0, rm_loss1, _, acc1 = map(float, rm.groups())
    assert rm_loss1 < rm_loss0 and acc1 > 0.6
    for stage in ("sft", "reward"):
        folder = tmp_path / "custom-sft-out" / stage
        assert (folder / "config.json").exists() and (folder / "model.safetensors").exists()
        assert (folder / "metrics.json").exists()
    assert "held-out pair: chosen" in out


def test_custom_grpo_loop_example_runs(tmp_path):
    """GRPO with the demo's gold function as the reward, no critic, no reward model."""
    out = run_example("custom_grpo_loop.py", ["--steps", "3"], tmp_path)
    assert "step 3:" in out and "kl loss" in out
    assert out.count("advantage ") == 4  # one group of 4 answers shown
    assert (tmp_path / "custom-grpo-out" / "actor" / "config.json").exists()
    assert (tmp_path / "custom-grpo-out" / "ema" / "config.json").exists()
