"""The demo task with critic-free RL (tiny models, CPU, minutes): GRPO raises the held-out gold score of the SFT
policy, once trained on the reward model and once on the programmatic gold reward itself (no reward model, no
critic), each by a margin that the same run with its advantages sign-flipped does not reach. The SFT policy and
the reward model are test_ppo_demo's (built once, cached); so is the held-out gold measure."""
import pytest

from test_ppo_demo import MARGIN, demo_models, run_ppo  # noqa: F401  (demo_models is a fixture)

pytestmark = pytest.mark.slow
# 8 prompts x 4 answers per step; the KL to the SFT policy as a k3 term in the loss (GRPO's recipe)
GRPO = dict(max_new_tokens=16, prompt_batch_size=8, samples_per_prompt=4, mini_batch_size=16, ppo_epochs=2,
            actor_lr=1e-4, kl_in="loss", kl_loss_coef=0.04, seed=1)
REWARDS = {"rm": {}, "gold-fn": {"reward": "fn", "reward_fn": "rlhf_tasks.data.demo:gold_score"}}


@pytest.mark.parametrize("reward", sorted(REWARDS))
def test_grpo_improves_gold_and_sign_flip_does_not(demo_models, reward):  # noqa: F811
    config = {**GRPO, **REWARDS[reward]}
    before, after, kl = run_ppo(demo_models, +1.0, config, "grpo")
    print(f"GRPO ({reward}): gold {before:.3f} -> {after:.3f}, KL {kl:.3f}")
    assert after - before > MARGIN
    assert 0.0 <= kl < 5.0
    f_before, f_after, _ = run_ppo(demo_models, -1.0, config, "grpo")
    print(f"sign-flipped GRPO ({reward}): gold {f_before:.3f} -> {f_after:.3f}")
    assert f_before == pytest.approx(before)
    assert f_after - f_before < MARGIN
