"""SFT and a reward model trained from Python on the public API: no pipeline, stage spec or store (tiny models, CPU,
well under a minute).

    python examples/custom_sft_loop.py [--steps 12]

It tokenizes the demo task's rows (prompt, chosen, rejected) the way the data stage does, fine-tunes a tiny Llama on
the chosen answers with `sft.fit`, then trains a reward model from the fine-tuned weights with `reward.fit`, and
checks the reward model on a held-out pair. Swap in your own models and token ids; every field of `SFTConfig` /
`RewardConfig` applies (ZeRO stage, LoRA, precision, gradient checkpointing, ...) except checkpoints, which need a
store. The outputs are plain HF folders: feed them to `RLHFEngine.from_paths` (examples/custom_ppo_loop.py).
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from rlhf_tasks.config import TinyModelConfig  # noqa: E402
from rlhf_tasks.config.stages import RewardConfig, SFTConfig  # noqa: E402
from rlhf_tasks.data import demo  # noqa: E402
from rlhf_tasks.data.formatting import format_prompt, tokenize_prompts, tokenize_responses  # noqa: E402
from rlhf_tasks.models import ensure_tiny_model, load_causal_lm, load_score_model, load_tokenizer  # noqa: E402
from rlhf_tasks.training import reward, sft  # noqa: E402
from rlhf_tasks.training.batches import pad_batch  # noqa: E402
from rlhf_tasks.training.engine import plain_hf_model  # noqa: E402


def token_ids(tok, rows: list[dict]) -> dict[str, list[list[int]]]:
    """Prompt ids of the formatted prompts and response ids ending with EOS, as the data artifact stores them."""
    prompts = tokenize_prompts(tok, [format_prompt(tok, r["prompt"]) for r in rows])
    return {"prompt_ids": prompts,
            "chosen_ids": tokenize_responses(tok, [r["chosen"] for r in rows], 48),
            "rejected_ids": tokenize_responses(tok, [r["rejected"] for r in rows], 48)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--out", default="custom-sft-out")
    args = ap.parse_args()

    path = str(ensure_tiny_model("llama", TinyModelConfig()))
    tok = load_tokenizer(path, padding_side="right")
    rows = demo.generate(400, seed=3)
    train, evals = token_ids(tok, rows[:320]), token_ids(tok, rows[320:])
    out = Path(args.out)

    sft_cfg = SFTConfig(max_steps=args.steps, micro_batch_size=8, max_seq_len=64, log_every=4,
                        optim={"lr": 2e-3, "warmup_ratio": 0.1})
    result = sft.fit(load_causal_lm(path), tok, train, evals, sft_cfg, out_dir=out / "sft")
    losses = [r["loss"] for r in result.history if "loss" in r]
    s = result.summary
    print(f"sft: loss {losses[0]:.3f} -> {losses[-1]:.3f}, eval ppl {s['eval_ppl_before']:.2f} -> "
          f"{s['eval_ppl']:.2f}", flush=True)

    rm_cfg = RewardConfig(max_steps=args.steps, micro_batch_size=8, max_seq_len=64, log_every=4,
                          optim={"lr": 2e-3, "warmup_ratio": 0.1})
    rm = reward.fit(load_score_model(str(out / "sft")), tok, train, evals, rm_cfg, out_dir=out / "reward")
    s = rm.summary
    print(f"reward: eval loss {s['eval_loss_before']:.3f} -> {s['eval_loss']:.3f}, accuracy "
          f"{s['eval_accuracy_before']:.2f} -> {s['eval_accuracy']:.2f}", flush=True)

    # the trained engine is right here: score a held-out pair with it (its forward returns sequence scores)
    pair = [evals["prompt_ids"][0] + evals["chosen_ids"][0], evals["prompt_ids"][0] + evals["rejected_ids"][0]]
    batch = pad_batch(pair, tok.pad_token_id)
    with torch.no_grad():
        chosen, rejected = rm.engine(batch["input_ids"], batch["attention_mask"]).tolist()
    print(f"held-out pair: chosen {chosen:+.3f} vs rejected {rejected:+.3f} "
          f"({type(plain_hf_model(rm.engine)).__name__})")
    print(f"saved {out / 'sft'} and {out / 'reward'}")


if __name__ == "__main__":
    main()
