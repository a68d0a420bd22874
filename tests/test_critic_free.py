"""Critic-free RL (GRPO, RLOO) on tiny models through the public API: no critic is built, each prompt is answered
`samples_per_prompt` times in consecutive rows, the advantages are the group estimators' of the shaped scores,
the KL to the reference goes in the loss (k3) or the reward (k1) as configured, and a programmatic reward can
score instead of, or on top of, the reward model."""
import math

import pytest
import torch

from _training_helpers import demo_prompt_batches
from rlhf_tasks.config import TinyModelConfig
from rlhf_tasks.config.stages import PPOConfig
from rlhf_tasks.data import demo
from rlhf_tasks.errors import ConfigError
from rlhf_tasks.models import ensure_tiny_model, load_tokenizer
from rlhf_tasks.ppo import CriticFreeTrainer, PPOTrainer, RLHFEngine
from rlhf_tasks.ppo import ppo_math as pm
from rlhf_tasks.ppo.engine import updates_per_batch
from rlhf_tasks.training.distributed import init_distributed

GOLD_FN = "rlhf_tasks.data.demo:gold_score"


@pytest.fixture(scope="module")
def tiny():
    init_distributed()
    path = str(ensure_tiny_model("llama", TinyModelConfig()))
    tok = load_tokenizer(path, "left")
    return path, tok, demo_prompt_batches(tok, 16, 4, with_chosen=True)


def cfg(**kw):
    base = dict(prompt_batch_size=4, samples_per_prompt=4, mini_batch_size=8, ppo_epochs=1, max_new_tokens=8,
                actor_lr=1e-3, seed=5)
    base.update(kw)
    return PPOConfig(**base)


def test_grpo_with_the_gold_function_and_kl_in_the_loss(tiny):
    path, tok, batches = tiny
    c = cfg(reward="fn", reward_fn=GOLD_FN, kl_in="loss", kl_loss_coef=0.1, missing_eos_penalty=None)
    engine = RLHFEngine(path, None, tokenizer=tok, config=c, total_steps=2, with_critic=False)
    assert engine.critic is None and engine.reward is None
    assert list(engine.trainable_engines()) == ["actor"]
    trainer = CriticFreeTrainer(engine, c, estimator="grpo")
    exp = trainer.generate_experience(batches[0])
    assert len(exp) == 16  # 4 prompts x 4 answers, each prompt's answers in consecutive rows
    prompts = exp.sequences[:, :exp.prompt_len]
    for g in range(4):
        assert all(torch.equal(prompts[4 * g], prompts[4 * g + j]) for j in range(4))
    # the score is the gold function of the decoded answer to the raw prompt
    texts = [tok.decode(exp.responses[i][exp.response_mask[i].bool()].tolist(), skip_special_tokens=True)
             for i in range(16)]
    gold = [demo.gold_score(batches[0]["prompt"][i // 4], t) for i, t in enumerate(texts)]
    torch.testing.assert_close(exp.scores, torch.tensor(gold))
    assert exp.stats["reward/fn_mean"] == pytest.approx(sum(gold) / 16, abs=1e-5)
    assert exp.stats["gold/mean"] == pytest.approx(sum(gold) / 16, abs=1e-5)
    # kl in the loss: no KL in the reward, every token of an answer carries its group-normalised score
    assert exp.stats["kl/coef"] == 0.0
    seq_adv = pm.group_advantages(exp.shaped_scores, 4)
    torch.testing.assert_close(exp.advantages, seq_adv[:, None] * exp.response_mask)
    assert not any(k.startswith("value/") for k in exp.stats)
    before = {n: p.detach().clone() for n, p in engine.actor.module.named_parameters()}
    stats = trainer.step(batches[1])
    assert stats["ppo/updates"] == 2 and "policy/kl_loss" in stats and "lr/critic" not in stats
    assert any(not torch.equal(p, before[n]) for n, p in engine.actor.module.named_parameters())
    assert math.isfinite(stats["policy/loss"]) and 0.0 <= stats["reward/flat_groups"] <= 1.0
    after = trainer.generate_experience(batches[2])
    assert after.kl.abs().sum() > 0 and after.stats["kl/coef"] == 0.0  # it moved from the reference


def test_rloo_with_reward_model_plus_function_and_kl_in_the_reward(tiny):
    path, tok, batches = tiny
    c = cfg(reward="rm+fn", reward_fn=GOLD_FN, reward_fn_weight=0.5, kl_coef=0.2, gamma=0.9, reward_clip=100.0,
            missing_eos_penalty=None)
    engine = RLHFEngine(path, path, tokenizer=tok, config=c, total_steps=2, with_critic=False)
    trainer = CriticFreeTrainer(engine, c, estimator="rloo")
    trainer.step(batches[0])  # the actor moves away from the reference, so the KL is not 0
    exp = trainer.generate_experience(batches[1])
    rm = exp.stats["reward/rm_mean"]
    assert exp.stats["reward/score_mean"] == pytest.approx(rm + 0.5 * exp.stats["reward/fn_mean"], abs=1e-4)
    # advantages: the leave-one-out score at the last token, -0.2 * k1 KL on every token, returns-to-go at 0.9
    seq_adv = pm.leave_one_out_advantages(exp.shaped_scores, 4)
    r, _ = pm.kl_penalty_rewards(exp.old_logprobs, exp.ref_logprobs, seq_adv, exp.response_mask, 0.2)
    want, _ = pm.gae(r, torch.zeros_like(r), exp.response_mask, 0.9, 1.0)
    torch.testing.assert_close(exp.advantages, want)
    assert exp.kl.abs().sum() > 0 and exp.stats["kl/coef"] == 0.2
    # the Experience's rewards are PPO's (shaped score at the last token, KL penalty per token)
    last = pm.last_index(exp.response_mask)
    kl_last = -0.2 * exp.kl[torch.arange(16), last]
    torch.testing.assert_close(exp.rewards[torch.arange(16), last], exp.shaped_scores + kl_last)


def test_critic_free_trainer_refuses_what_it_cannot_do(tiny):
    path, tok, _ = tiny
    with pytest.raises(ConfigError, match="samples_per_prompt >= 2"):
        CriticFreeTrainer(RLHFEngine(path, path, tokenizer=tok, config=cfg(samples_per_prompt=1, mini_batch_size=4),
                                     total_steps=1, with_critic=False), estimator="grpo")
    engine = RLHFEngine(path, path, tokenizer=tok, config=cfg(), total_steps=1)
    with pytest.raises(ConfigError, match="without a critic"):
        CriticFreeTrainer(engine, estimator="rloo")
    with pytest.raises(ConfigError, match="estimator 'gae'"):
        CriticFreeTrainer(engine, estimator="gae")
    c = cfg(reward="fn", reward_fn=GOLD_FN)
    with pytest.raises(ConfigError, match="critic_from_reward needs a reward model"):
        RLHFEngine(path, None, tokenizer=tok, config=c, total_steps=1)
    with pytest.raises(ConfigError, match="scores with the reward model, but the engine has none"):
        PPOTrainer(RLHFEngine(path, None, tokenizer=tok, config=cfg(critic_from_reward=False), total_steps=1))


def test_ppo_with_several_samples_per_prompt_and_a_function_reward(tiny):
    """PPO takes samples_per_prompt too (GAE per answer), and scores with a function alone when its critic does
    not start from the reward model."""
    path, tok, batches = tiny
    c = cfg(reward="fn", reward_fn=GOLD_FN, critic_from_reward=False, samples_per_prompt=2, critic_lr=1e-3)
    engine = RLHFEngine(path, None, tokenizer=tok, config=c, total_steps=1)
    stats = PPOTrainer(engine, c).step(batches[2])
    assert "value/loss" in stats and "reward/fn_mean" in stats and stats["ppo/updates"] == 1


def test_the_lr_schedule_spans_every_answer_s_updates(tiny):
    """The actor's cosine schedule is sized by the updates the trainer makes, which count every answer
    (prompt_batch_size x samples_per_prompt rows per buffer): it reaches 0 at the last step of the run. Sized by the
    prompts alone, it ended after half the run and climbed back to the peak LR by the end."""
    path, tok, batches = tiny
    c = cfg(reward="fn", reward_fn=GOLD_FN, ppo_epochs=2)  # 4 prompts x 4 answers = 2 mini-batches x 2 epochs
    engine = RLHFEngine(path, None, tokenizer=tok, config=c, total_steps=2, with_critic=False)
    trainer = CriticFreeTrainer(engine, c, estimator="grpo")
    first, last = trainer.step(batches[0]), trainer.step(batches[1])
    assert first["ppo/updates"] == last["ppo/updates"] == updates_per_batch(c) == 4
    assert first["lr/actor"] == pytest.approx(0.5 * c.actor_lr)  # halfway through the cosine: 4 of 8 updates
    assert last["lr/actor"] == pytest.approx(0.0, abs=1e-12)
