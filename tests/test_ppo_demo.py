"""The demo task end to end on tiny models (CPU, a few minutes): PPO raises the mean gold score of the policy over
the SFT policy on held-out prompts with the KL to the reference bounded, by a margin that a broken PPO (advantages
with the sign flipped) does not reach.

The SFT policy and the reward model are built here with a few plain-torch steps on the demo data (cached across
sessions under RLHF_CACHE_DIR), so the test exercises PPO alone."""
import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch

from rlhf_tasks.config import TinyModelConfig
from rlhf_tasks.config.stages import PPOConfig
from rlhf_tasks.data import demo
from rlhf_tasks.models import (cache_root, ensure_tiny_model, load_causal_lm, load_score_model, load_tokenizer,
                               sequence_scores)
from rlhf_tasks.ppo import RLHFEngine
from rlhf_tasks.training.batches import pad_batch
from rlhf_tasks.training.distributed import init_distributed

from _training_helpers import held_out_gold

pytestmark = pytest.mark.slow
BUILDER = 1
MARGIN = 0.1  # gold improvement (mean of greedy and sampled) PPO must exceed; the sign-flipped run must not
PPO = dict(max_new_tokens=16, prompt_batch_size=16, mini_batch_size=8, ppo_epochs=2, actor_lr=1e-4, critic_lr=1e-4,
           kl_coef=0.1, whiten_rewards=True, seed=1)
STEPS = 50


def fmt(p: str) -> str:
    return " Human: " + p + " Assistant:"


def _rows():
    rows = demo.generate(3000, seed=0)
    return rows[:2500], rows[2500:2564]


def build_demo_models(out: Path, steps: int = 150, bs: int = 16) -> None:
    """SFT on chosen answers and a pairwise RM, plain torch, deterministic."""
    path = str(ensure_tiny_model("llama", TinyModelConfig()))
    tok = load_tokenizer(path, "right")
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    train, _ = _rows()
    rng = random.Random(0)
    torch.manual_seed(0)
    model = load_causal_lm(path, dropout=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        seqs, labels = [], []
        for r in rng.sample(train, bs):
            p, c = enc(fmt(r["prompt"])), enc(" " + r["chosen"]) + [tok.eos_token_id]
            seqs.append(p + c)
            labels.append([-100] * len(p) + c)
        b = pad_batch(seqs, tok.pad_token_id, labels=labels)
        loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(out / "sft")
    tok.save_pretrained(out / "sft")
    rm = load_score_model(path, dropout=0.0)
    opt = torch.optim.AdamW(rm.parameters(), lr=1e-3)
    for _ in range(steps):
        b = rng.sample(train, bs)
        seqs = [enc(fmt(r["prompt"])) + enc(" " + r[k]) + [tok.eos_token_id] for k in ("chosen", "rejected")
                for r in b]
        pb = pad_batch(seqs, tok.pad_token_id)
        s = sequence_scores(rm, pb["input_ids"], pb["attention_mask"])
        loss = -torch.nn.functional.logsigmoid(s[:bs] - s[bs:]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    rm.save_pretrained(out / "rm")
    tok.save_pretrained(out / "rm")


@pytest.fixture(scope="module")
def demo_models():
    init_distributed()
    key = hashlib.sha256(json.dumps([BUILDER, _rows()[0][:50], str(ensure_tiny_model("llama", TinyModelConfig()))])
                         .encode()).hexdigest()[:12]
    target = cache_root() / "test-ppo-demo" / key
    if not (target / "rm" / "config.json").exists():
        tmp = target.with_name(key + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        build_demo_models(tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    return target


def mean_gold(engine, tok, held, samples: int = 2) -> float:
    """Mean gold over held-out prompts: (greedy + mean of `samples` sampled answers) / 2."""
    greedy, sampled = held_out_gold(engine, tok, [tok(fmt(r["prompt"]), add_special_tokens=False)["input_ids"]
                                                  for r in held], [r["prompt"] for r in held], demo.gold_score,
                                    max_new_tokens=16, samples=samples)
    return (greedy + sampled) / 2


def run_ppo(models: Path, sign: float, config: dict = PPO, method: str = "ppo") -> tuple[float, float, float]:
    """Step 3 (`method` ppo, grpo or rloo) from the demo's SFT policy for STEPS steps of random training prompts;
    -> (held-out gold before, after, max KL of the last 5 steps). grpo/rloo build no critic, and no reward model
    when `config` scores with a function alone."""
    from rlhf_tasks.config.rules import needs_reward_model
    from rlhf_tasks.ppo.stage import make_trainer

    tok = load_tokenizer(str(models / "sft"), "left")
    train, held = _rows()
    cfg = PPOConfig(**config)
    reward = str(models / "rm") if needs_reward_model(method, cfg) else None
    engine = RLHFEngine(str(models / "sft"), reward, tokenizer=tok, config=cfg, total_steps=STEPS,
                        with_critic=method == "ppo")
    trainer = make_trainer(method, engine, cfg, advantage_sign=sign)
    before = mean_gold(engine, tok, held)
    rng = random.Random(0)
    kls = []
    for _ in range(STEPS):
        b = rng.sample(train, cfg.prompt_batch_size)
        stats = trainer.step({"prompt_ids": [tok(fmt(r["prompt"]), add_special_tokens=False)["input_ids"] for r in b],
                              "prompt": [r["prompt"] for r in b]})
        kls.append(stats["kl/ref"])
    return before, mean_gold(engine, tok, held), max(kls[-5:])


def test_ppo_improves_gold_and_sign_flip_does_not(demo_models):
    before, after, kl = run_ppo(demo_models, +1.0)
    print(f"PPO: gold {before:.3f} -> {after:.3f}, KL {kl:.3f}")
    assert after - before > MARGIN
    assert 0.0 <= kl < 5.0
    f_before, f_after, _ = run_ppo(demo_models, -1.0)
    print(f"sign-flipped PPO: gold {f_before:.3f} -> {f_after:.3f}")
    assert f_before == pytest.approx(before)
    assert f_after - f_before < MARGIN
