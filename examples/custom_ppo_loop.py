"""A custom RLHF loop on the public PPO API (tiny models, CPU, well under a minute).

    python examples/custom_ppo_loop.py [--steps 8]

It builds a tiny Llama (actor) and uses the same weights with a fresh value head as the reward model, then runs
PPO by hand: generate experience, change the rewards (here: add the demo task's programmatic gold score at the last
token, recomputing the advantages with the library's GAE), train, update the EMA and the KL controller, log.
Swap in your own models with `RLHFEngine.from_paths(sft_folder, reward_folder, config)`.
"""
import argparse
import os
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from rlhf_tasks.config import TinyModelConfig  # noqa: E402
from rlhf_tasks.config.stages import PPOConfig  # noqa: E402
from rlhf_tasks.data import demo  # noqa: E402
from rlhf_tasks.models import ensure_tiny_model, load_tokenizer  # noqa: E402
from rlhf_tasks.ppo import PPOTrainer, RLHFEngine  # noqa: E402
from rlhf_tasks.ppo import ppo_math as pm  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--gold-weight", type=float, default=1.0, help="weight of the gold score added to the reward")
    args = ap.parse_args()

    path = str(ensure_tiny_model("llama", TinyModelConfig()))
    tok = load_tokenizer(path, padding_side="left")
    config = PPOConfig(prompt_batch_size=8, mini_batch_size=4, ppo_epochs=2, max_new_tokens=12, actor_lr=1e-3,
                       critic_lr=1e-3, kl_coef=0.05, adaptive_kl=True, kl_target=1.0, ema_decay=0.9)
    engine = RLHFEngine(actor=path, reward=path, tokenizer=tok, config=config, total_steps=args.steps)
    trainer = PPOTrainer(engine, config)

    rows = demo.generate(200, seed=7)
    rng = random.Random(0)
    for step in range(1, args.steps + 1):
        chunk = rng.sample(rows, config.prompt_batch_size)
        batch = {"prompt_ids": [tok(" Human: " + r["prompt"] + " Assistant:")["input_ids"] for r in chunk],
                 "prompt": [r["prompt"] for r in chunk], "gold": ["demo"] * len(chunk)}

        exp = trainer.generate_experience(batch)  # eval-mode log-probs, ref log-probs, values, rewards, GAE

        # custom reward shaping: add a programmatic score at the last response token, then redo GAE
        answers = [tok.decode(exp.responses[i][exp.response_mask[i].bool()].tolist(), skip_special_tokens=True)
                   for i in range(len(exp))]
        gold = torch.tensor([demo.gold_score(r["prompt"], a) for r, a in zip(chunk, answers)])
        last = pm.last_index(exp.response_mask)
        exp.rewards[torch.arange(len(exp)), last] += args.gold_weight * gold
        exp.advantages, exp.returns = pm.gae(exp.rewards, exp.old_values, exp.response_mask, config.gamma,
                                             config.lam)

        stats = trainer.train_rlhf(exp)  # ppo_epochs x mini-batches, clipped policy + value losses
        engine.ema.update()
        trainer.kl_ctl.update(exp.stats["kl/ref"], len(exp))
        trainer.global_step += 1
        print(f"step {step}: gold {gold.mean():+.3f}  rm {exp.stats['reward/score_mean']:+.3f}  "
              f"kl {exp.stats['kl/ref']:.4f} (beta {trainer.kl_ctl.value:.4f})  len {exp.stats['response/length']:.1f}"
              f"  policy loss {stats['policy/loss']:+.4f}  clipfrac {stats['policy/clipfrac']:.3f}  "
              f"value loss {stats['value/loss']:.4f}", flush=True)
    out = Path("custom-ppo-out")
    engine.save_actor(out / "actor")
    engine.ema.save_hf(tok, out / "ema")
    print(f"saved {out / 'actor'} and {out / 'ema'}")


if __name__ == "__main__":
    main()
