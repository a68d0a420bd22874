"""A short PPO run on tiny models through the public API: experience invariants, metrics, ZeRO-3, EMA, and an
in-process checkpoint/resume that continues exactly like the uninterrupted run."""
import math

import pytest
import torch

from _training_helpers import demo_prompt_batches
from rlhf_tasks.config import TinyModelConfig
from rlhf_tasks.config.stages import PPOConfig
from rlhf_tasks.models import ensure_tiny_model, lm_logits, load_tokenizer
from rlhf_tasks.ppo import PPOTrainer, RLHFEngine
from rlhf_tasks.ppo import ppo_math as pm
from rlhf_tasks.training.checkpoint import CheckpointManager
from rlhf_tasks.training.distributed import init_distributed, seed_everything

METRICS = ("reward/score_mean", "reward/score_std", "gold/mean", "kl/ref", "entropy", "response/length",
           "response/eos_rate", "value/explained_variance", "policy/clipfrac", "value/clipfrac", "policy/approx_kl",
           "gen/tokens_per_s", "gen/decode_tokens_per_s", "time/generation_s", "time/train_s", "time/step_s", "policy/loss", "value/loss")


@pytest.fixture(scope="module")
def tiny():
    init_distributed()
    path = str(ensure_tiny_model("llama", TinyModelConfig()))
    tok = load_tokenizer(path, "left")
    return path, tok, demo_prompt_batches(tok, 64, 8)


def small_cfg(**kw):
    base = dict(prompt_batch_size=8, mini_batch_size=4, ppo_epochs=2, max_new_tokens=10, actor_lr=1e-3,
                critic_lr=1e-3, seed=5)
    base.update(kw)
    return PPOConfig(**base)


def test_short_run_metrics_and_experience(tiny):
    path, tok, batches = tiny
    engine = RLHFEngine(path, path, tokenizer=tok, config=small_cfg(ema_decay=0.9), total_steps=3)
    trainer = PPOTrainer(engine)
    exp = trainer.generate_experience(batches[0])
    B, N = exp.responses.shape
    assert B == 8 and exp.sequences.shape[1] == exp.prompt_len + N
    # truncation after the first EOS, and the mask of the full sequence agrees with the response mask
    for i in range(B):
        real = exp.responses[i][exp.response_mask[i].bool()].tolist()
        assert tok.eos_token_id not in real[:-1]
        assert bool(exp.has_eos[i]) == (bool(real) and real[-1] == tok.eos_token_id)
    assert torch.equal(exp.attention_mask[:, exp.prompt_len:].float(), exp.response_mask)
    # ref == actor at the start: KL 0; old log-probs (eval mode) equal train-mode log-probs (dropout off)
    assert exp.kl.abs().max().item() < 1e-5
    with torch.no_grad():
        lp = pm.logprobs_from_logits(lm_logits(engine.actor, exp.sequences, exp.attention_mask)
                                     [:, exp.prompt_len - 1:-1], exp.responses) * exp.response_mask
    torch.testing.assert_close(lp, exp.old_logprobs, atol=1e-5, rtol=1e-5)
    # the score sits at the last response token on top of the KL term
    last = pm.last_index(exp.response_mask)
    torch.testing.assert_close(exp.rewards[torch.arange(B), last], exp.shaped_scores, atol=1e-5, rtol=1e-5)

    before = {n: p.detach().clone() for n, p in engine.actor.module.named_parameters()}
    stats = trainer.train_rlhf(exp)
    assert stats["ppo/updates"] == 4  # 2 epochs x 8/4 mini-batches
    assert any(not torch.equal(p, before[n]) for n, p in engine.actor.module.named_parameters())
    for step in range(2):
        stats = trainer.step(batches[1 + step])
    for k in METRICS:
        assert k in stats, k
        assert math.isfinite(stats[k]) or k == "value/explained_variance", (k, stats[k])
    assert stats["kl/ref"] != 0.0 and trainer.global_step == 2
    # every row is decoded until the last one ends: at least the answer tokens each row keeps (up to its EOS)
    assert stats["gen/decode_tokens_per_s"] >= stats["gen/tokens_per_s"] > 0
    ema_w = engine.ema.shadow["model.embed_tokens.weight"]
    assert not torch.equal(ema_w, engine.actor.module.model.embed_tokens.weight.detach().float())


def test_zero3_actor_and_critic_step(tiny):
    path, tok, batches = tiny
    cfg = small_cfg(ppo_epochs=1)
    cfg.actor.zero_stage = 3
    cfg.critic.zero_stage = 3
    engine = RLHFEngine(path, path, tokenizer=tok, config=cfg, total_steps=2)
    assert engine.ref.zero_optimization_stage() == 3  # the frozen reference follows the actor
    stats = PPOTrainer(engine).step(batches[0])
    assert math.isfinite(stats["policy/loss"]) and math.isfinite(stats["value/loss"])
    assert stats["response/length"] > 0


def _run(engine, trainer, batches):
    return [trainer.step(b) for b in batches]


def _comparable(stats):
    return {k: v for k, v in stats.items() if not k.startswith(("time/", "gen/", "samples"))}


def test_checkpoint_resume_continues_identically(tiny, local_store):
    """2 steps, checkpoint, 2 more  ==  2 steps, checkpoint, a NEW engine loads it, 2 more (adaptive KL + EMA)."""
    path, tok, batches = tiny
    cfg = small_cfg(adaptive_kl=True, kl_target=0.01, kl_horizon=100, ema_decay=0.8, ppo_epochs=1)
    ckpt = CheckpointManager(local_store, "ppo", "k1", keep=1)

    engine = RLHFEngine(path, path, tokenizer=tok, config=cfg, total_steps=4)
    trainer = PPOTrainer(engine)
    seed_everything(11)
    _run(engine, trainer, batches[:2])
    ckpt.save(2, engine.trainable_engines(), {"trainer": trainer.state_dict()})
    straight = _run(engine, trainer, batches[2:4])
    kl_straight = trainer.kl_ctl.value
    ema_straight = {k: v.clone() for k, v in engine.ema.shadow.items()}

    engine2 = RLHFEngine(path, path, tokenizer=tok, config=cfg, total_steps=4)
    trainer2 = PPOTrainer(engine2)
    step, folder = ckpt.latest()
    state = ckpt.load(folder, engine2.trainable_engines())
    trainer2.load_state_dict(state["trainer"])
    assert step == 2 and trainer2.global_step == 2 and trainer2.kl_ctl.value != cfg.kl_coef
    resumed = _run(engine2, trainer2, batches[2:4])
    for a, b in zip(straight, resumed):
        a, b = _comparable(a), _comparable(b)
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6, nan_ok=True), k
    assert trainer2.kl_ctl.value == pytest.approx(kl_straight)
    for k, v in ema_straight.items():
        torch.testing.assert_close(engine2.ema.shadow[k], v)


def test_ppo_learning_rates_and_optimizer_blocks_reach_the_engines(tiny):
    """`ppo.actor_lr` / `ppo.critic_lr` are the one place for the peak learning rates, `ppo.<model>.optim` the one
    place for the rest of each optimizer: the live DeepSpeed engines' optimizers and schedules carry them."""
    path, tok, _ = tiny
    cfg = small_cfg(actor_lr=3e-4, critic_lr=7e-5, actor={"optim": {"weight_decay": 0.1, "adam_betas": (0.8, 0.9),
                                                                    "lr_scheduler": "constant"}},
                    critic={"optim": {"lr_scheduler": "constant"}})
    engine = RLHFEngine(path, path, tokenizer=tok, config=cfg, total_steps=2)
    for eng, lr, decay, betas in ((engine.actor, 3e-4, 0.1, (0.8, 0.9)), (engine.critic, 7e-5, 0.0, (0.9, 0.95))):
        groups = eng.optimizer.param_groups
        assert {g["lr"] for g in groups} == {lr} and set(eng.get_lr()) == {lr}
        assert max(g["weight_decay"] for g in groups) == decay and {tuple(g["betas"]) for g in groups} == {betas}
    trainer = PPOTrainer(engine)
    trainer.train_rlhf(trainer.generate_experience(tiny[2][0]))
    assert set(engine.actor.get_lr()) == {3e-4} and set(engine.critic.get_lr()) == {7e-5}  # constant schedule


REDUCE_WORKER = """
import json, torch
torch.distributed.init_process_group("gloo")
from rlhf_tasks.ppo.trainer import reduce_stats
nan, inf = float("nan"), float("inf")
mine = [{"reward/score_mean": 1.0, "gold/mean": 0.5, "value/explained_variance": nan, "kl/ref": 0.1,
         "policy/approx_kl": nan},
        {"reward/score_mean": 3.0, "value/explained_variance": 0.25, "ptx/loss": 2.0, "kl/ref": inf}]
print("RESULT", json.dumps(reduce_stats(mine[torch.distributed.get_rank()])), flush=True)
torch.distributed.destroy_process_group()
"""


def test_reduce_stats_over_two_processes_with_different_keys(tmp_path):
    """Ranks with different keys (gold only on rank 0, ptx only on rank 1) and non-finite values agree on one
    vector: each key's mean counts only the ranks with a finite value; no rank has one for policy/approx_kl: NaN."""
    import json
    import os
    import subprocess
    import sys

    from rlhf_tasks.launch import free_port

    script = tmp_path / "worker.py"
    script.write_text(REDUCE_WORKER)
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "DS_ACCELERATOR": "cpu"}
    procs = [subprocess.Popen([sys.executable, str(script)], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    results = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=180)
        finally:
            p.kill()
        assert p.returncode == 0, err[-2000:]
        results.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT"))[7:]))
    for got in results:
        assert sorted(got) == ["gold/mean", "kl/ref", "policy/approx_kl", "ptx/loss", "reward/score_mean",
                               "value/explained_variance"]
        assert got["reward/score_mean"] == 2.0 and got["gold/mean"] == 0.5 and got["ptx/loss"] == 2.0
        assert got["value/explained_variance"] == 0.25 and got["kl/ref"] == 0.1
        assert math.isnan(got["policy/approx_kl"])
