"""Critic-free RL (GRPO) with a programmatic reward on the public API (tiny model, CPU, about a minute).

    python examples/custom_grpo_loop.py [--steps 6] [--estimator grpo|rloo]

No reward model and no critic: every prompt is answered `samples_per_prompt` times, the demo task's gold scorer
(`rlhf_tasks.data.demo:gold_score`, named in the config like any `package.module:callable`) scores each answer,
and each answer's advantage is its score against the other answers to the same prompt. The KL to the reference
is a k3 term in the loss. The loop is written out (experience, a look at one group, training, EMA, log) where
`trainer.step(batch)` would do the same in one call. Swap in your own policy with `RLHFEngine(sft_folder, None,
config=..., with_critic=False)` and your own reward with `ppo.reward_fn: mypkg.rewards:score`.
"""
import argparse
import os
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rlhf_tasks.config import TinyModelConfig  # noqa: E402
from rlhf_tasks.config.stages import PPOConfig  # noqa: E402
from rlhf_tasks.data import demo  # noqa: E402
from rlhf_tasks.models import ensure_tiny_model, load_tokenizer  # noqa: E402
from rlhf_tasks.ppo import CriticFreeTrainer, RLHFEngine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--estimator", choices=("grpo", "rloo"), default="grpo")
    args = ap.parse_args()

    path = str(ensure_tiny_model("llama", TinyModelConfig()))
    tok = load_tokenizer(path, padding_side="left")
    config = PPOConfig(prompt_batch_size=4, samples_per_prompt=4, mini_batch_size=8, ppo_epochs=2, max_new_tokens=12,
                       actor_lr=1e-3, reward="fn", reward_fn="rlhf_tasks.data.demo:gold_score", kl_in="loss",
                       kl_loss_coef=0.05, ema_decay=0.9)
    engine = RLHFEngine(actor=path, reward=None, tokenizer=tok, config=config, total_steps=args.steps,
                        with_critic=False)  # no critic and no reward model: nothing built, nothing in memory
    trainer = CriticFreeTrainer(engine, config, estimator=args.estimator)

    rows = demo.generate(200, seed=7)
    rng = random.Random(0)
    for step in range(1, args.steps + 1):
        chunk = rng.sample(rows, config.prompt_batch_size)
        batch = {"prompt_ids": [tok(" Human: " + r["prompt"] + " Assistant:")["input_ids"] for r in chunk],
                 "prompt": [r["prompt"] for r in chunk], "gold": ["demo"] * len(chunk)}

        exp = trainer.generate_experience(batch)  # 4 prompts x 4 answers, scored by the function, grouped
        if step == 1:  # one group: the answers to the first prompt, their scores and advantages
            for i in range(config.samples_per_prompt):
                text = tok.decode(exp.responses[i][exp.response_mask[i].bool()], skip_special_tokens=True)
                print(f"  {chunk[0]['prompt']!r} -> {text!r}: score {exp.scores[i]:+.2f}, "
                      f"advantage {exp.advantages[i, 0]:+.2f}")

        stats = trainer.train_rlhf(exp)  # ppo_epochs x mini-batches of the clipped objective + k3 KL, actor only
        engine.ema.update()
        trainer.global_step += 1
        print(f"step {step}: gold {exp.stats['gold/mean']:+.3f}  group std {exp.stats['reward/group_std']:.3f}  "
              f"kl {exp.stats['kl/ref']:.4f}  len {exp.stats['response/length']:.1f}  "
              f"policy loss {stats['policy/loss']:+.4f}  kl loss {stats['policy/kl_loss']:.4f}  "
              f"clipfrac {stats['policy/clipfrac']:.3f}", flush=True)
    out = Path("custom-grpo-out")
    engine.save_actor(out / "actor")
    engine.ema.save_hf(tok, out / "ema")
    print(f"saved {out / 'actor'} and {out / 'ema'}")


if __name__ == "__main__":
    main()
