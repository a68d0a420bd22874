"""The ptx term (DS-Chat's unsup_coef): a pretraining LM loss on the prompts' reference answers mixed into the actor
loss. With ptx_coef > 0 it is reported and it pulls the actor toward the targets; with 0 it is absent."""
import pytest
import torch

from rlhf_tasks.config import TinyModelConfig
from rlhf_tasks.config.stages import PPOConfig
from rlhf_tasks.data import demo
from rlhf_tasks.models import ensure_tiny_model, lm_logits, load_tokenizer
from rlhf_tasks.ppo import PPOTrainer, RLHFEngine
from rlhf_tasks.ppo import ppo_math as pm
from rlhf_tasks.training.batches import pad_batch
from rlhf_tasks.training.distributed import init_distributed


@pytest.fixture(scope="module")
def batch():
    init_distributed()
    path = str(ensure_tiny_model("llama", TinyModelConfig()))
    tok = load_tokenizer(path, "left")
    rows = demo.generate(8, seed=11)
    prompts = [tok(" Human: " + r["prompt"] + " Assistant:")["input_ids"] for r in rows]
    answers = [tok(" " + r["chosen"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for r in rows]
    return path, tok, {"prompt_ids": prompts, "chosen_ids": answers}


def target_loss(engine, tok, b) -> float:
    """LM loss of the actor on prompt + reference answer (the ptx target), right-padded."""
    seqs = [p + a for p, a in zip(b["prompt_ids"], b["chosen_ids"])]
    pb = pad_batch(seqs, tok.pad_token_id)
    with torch.no_grad():
        logits = lm_logits(engine.actor, pb["input_ids"], pb["attention_mask"])
    return pm.lm_loss(logits, pb["input_ids"], pb["attention_mask"]).item()


def run(path, tok, b, ptx_coef: float, steps: int = 4):
    cfg = PPOConfig(prompt_batch_size=8, mini_batch_size=8, ppo_epochs=1, max_new_tokens=8, actor_lr=3e-3,
                    critic_lr=1e-3, ptx_coef=ptx_coef, seed=7)
    engine = RLHFEngine(path, path, tokenizer=tok, config=cfg, total_steps=steps)
    trainer = PPOTrainer(engine)
    before = target_loss(engine, tok, b)
    stats = [trainer.step(b) for _ in range(steps)]
    return before, target_loss(engine, tok, b), stats


def test_ptx_loss_is_mixed_in_and_pulls_toward_the_targets(batch):
    path, tok, b = batch
    before, with_ptx, stats = run(path, tok, b, ptx_coef=5.0)
    assert all("ptx/loss" in s for s in stats)
    _, without_ptx, plain_stats = run(path, tok, b, ptx_coef=0.0)
    assert all("ptx/loss" not in s for s in plain_stats)
    assert with_ptx < before - 0.2
    print(f"target loss {before:.3f} -> ptx {with_ptx:.3f}, no ptx {without_ptx:.3f}")
    assert with_ptx < without_ptx - 0.2
