"""Generation throughput of the hybrid engine and PPO step time (a benchmark, not a test).

On one random-init OPT model and the same random prompts, in one run:
  (a) portable hybrid engine under ZeRO-3 (parameters gathered once per generation),
  (b) naive generation under ZeRO-3 (parameters fetched layer by layer for every token: DS-Chat without HE),
  (c) plain `generate` on an unsharded copy,
  (d) DeepSpeed's Hybrid Engine (with --deepspeed-he; CUDA only),
then PPO steps end to end (generation + experience + actor/critic update) at ZeRO-0 and ZeRO-3: median seconds
per step and samples/s. Every generation produces exactly --new-tokens tokens (min = max), greedy.

    python benchmarks/ppo_throughput.py                        # DS-Chat's measured CPU shape (tiny OPT)
    python benchmarks/ppo_throughput.py --shape opt-1.3b --precision bf16 --deepspeed-he   # on a GPU
Prints a table and, with --json PATH, writes the numbers.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

SHAPES = {  # OPT shapes: hidden, layers, heads, ffn, vocab
    "dschat-tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, ffn_dim=512, vocab_size=1000),
    "opt-125m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, ffn_dim=3072, vocab_size=50272),
    "opt-1.3b": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, ffn_dim=8192, vocab_size=50272),
}


class StubTokenizer:
    """What PPOTrainer needs of a tokenizer when prompts are token ids already."""

    def __init__(self, vocab: int):
        self.pad_token_id, self.eos_token_id, self.vocab = 1, 2, vocab

    def decode(self, ids, skip_special_tokens=True):  # noqa: ARG002
        return " ".join(map(str, ids))

    def __len__(self):
        return self.vocab

    def save_pretrained(self, path):  # noqa: ARG002
        pass


def opt_config(shape: str, max_pos: int):
    from transformers import OPTConfig

    return OPTConfig(**SHAPES[shape], word_embed_proj_dim=SHAPES[shape]["hidden_size"], dropout=0.0,
                     attention_dropout=0.0, activation_dropout=0.0, max_position_embeddings=max_pos,
                     pad_token_id=1, bos_token_id=0, eos_token_id=2)


def timed(fn, repeats: int, warmup: int = 1) -> float:
    """Median wall seconds of fn() (synchronised on CUDA)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def gen_kwargs(n: int) -> dict:
    return dict(do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=1, eos_token_id=2,
                use_cache=True)


def bench_generation(args, dev, dtype) -> dict:
    from transformers import AutoModelForCausalLM

    from rlhf_tasks.config.training import TrainingConfig
    from rlhf_tasks.ppo.hybrid import DeepSpeedHybridEngine, PortableHybridEngine, deepspeed_he_config
    from rlhf_tasks.training.engine import build_engine

    cfg = opt_config(args.shape, args.prompt_len + args.new_tokens + 8)
    torch.manual_seed(0)
    with torch.device(dev):  # random init directly on the accelerator (fast for 1B+ models)
        model = AutoModelForCausalLM.from_config(cfg)
    nparams = sum(p.numel() for p in model.parameters())
    plain = copy.deepcopy(model).to(dev, dtype).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, cfg.vocab_size, (args.batch, args.prompt_len), generator=g).to(dev)
    mask = torch.ones_like(ids)
    kw = gen_kwargs(args.new_tokens)
    tokens = args.batch * args.new_tokens
    res: dict = {"params": nparams}

    def run_plain():
        with torch.no_grad():
            return plain.generate(input_ids=ids, attention_mask=mask, **kw)

    ref = run_plain()
    variants = {"c_plain": run_plain}
    tcfg = TrainingConfig(zero_stage=3, precision=args.precision, micro_batch_size=args.batch)
    engine = build_engine(model, tcfg, lr=1e-5, total_steps=10)
    portable, naive = PortableHybridEngine(engine), PortableHybridEngine(engine, gather_zero3=False)
    res["a_equal_to_plain"] = bool(torch.equal(portable.generate(ids, mask, **kw), ref))
    variants["a_portable_z3"] = lambda: portable.generate(ids, mask, **kw)
    if not args.skip_naive:
        variants["b_naive_z3"] = lambda: naive.generate(ids, mask, **kw)
    if args.deepspeed_he:
        for stage in (0, 3):
            name = f"d_deepspeed_he_z{stage}"
            try:
                torch.manual_seed(0)
                with torch.device(dev):
                    m = AutoModelForCausalLM.from_config(cfg)
                e = build_engine(m, tcfg.model_copy(update={"zero_stage": stage}), lr=1e-5, total_steps=10,
                                 extra_config=deepspeed_he_config(args.prompt_len + args.new_tokens + 8))
                he = DeepSpeedHybridEngine(e)
                res[name + "_injected"] = he.injected
                res[name + "_equal_to_plain"] = bool(torch.equal(he.generate(ids, mask, **kw), ref))
                variants[name] = (lambda h: lambda: h.generate(ids, mask, **kw))(he)
            except Exception as exc:  # report, keep going
                res[name + "_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    # interleaved rounds, so every variant sees the same machine load; best-of-N and median reported
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():
        fn()  # warm-up
    for _ in range(args.repeats):
        for k, fn in variants.items():
            times[k].append(timed(fn, 1, warmup=0))
    for k, ts in times.items():
        res[k + "_s"] = min(ts)
        res[k + "_median_s"] = statistics.median(ts)
    for k in list(res):
        if k.endswith("_s") and not k.endswith("median_s"):
            res[k[:-2] + "_tokens_per_s"] = tokens / res[k]
    return res


def bench_ppo(args, stage: int, dev) -> dict:
    from transformers import AutoModelForCausalLM, OPTForSequenceClassification

    from rlhf_tasks.config.stages import PPOConfig
    from rlhf_tasks.ppo import PPOTrainer, RLHFEngine

    cfg = opt_config(args.shape, args.prompt_len + args.new_tokens + 8)
    torch.manual_seed(0)
    rcfg = copy.deepcopy(cfg)
    rcfg.num_labels = 1
    with torch.device(dev):
        actor = AutoModelForCausalLM.from_config(cfg)
        reward = OPTForSequenceClassification(rcfg)
    pcfg = PPOConfig(prompt_batch_size=args.batch, mini_batch_size=args.batch, ppo_epochs=1,
                     max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, top_k=0)
    for t in (pcfg.actor, pcfg.critic):
        t.zero_stage, t.precision, t.micro_batch_size = stage, args.precision, args.batch
    engine = RLHFEngine(actor, reward, tokenizer=StubTokenizer(cfg.vocab_size), config=pcfg, total_steps=1000)
    trainer = PPOTrainer(engine)
    g = torch.Generator().manual_seed(2)
    batch = torch.randint(3, cfg.vocab_size, (args.batch, args.prompt_len), generator=g).tolist()
    rows = [trainer.step(batch) for _ in range(args.ppo_steps + 2)][2:]

    def med(k):
        return statistics.median(r[k] for r in rows)

    return {"step_s": med("time/step_s"), "step_min_s": min(r["time/step_s"] for r in rows), "generation_s": med("time/generation_s"),
            "experience_s": med("time/experience_s"), "train_s": med("time/train_s"),
            "samples_per_s": args.batch / med("time/step_s")}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="dschat-tiny")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--ppo-steps", type=int, default=10, help="timed PPO steps per ZeRO stage (after 2 warm-up)")
    ap.add_argument("--ppo-stages", default="0,3", help="ZeRO stages for the PPO step timing ('' skips)")
    ap.add_argument("--deepspeed-he", action="store_true", help="also DeepSpeed's Hybrid Engine (CUDA)")
    ap.add_argument("--skip-naive", action="store_true", help="skip (b) (very slow for big models)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)

    from rlhf_tasks.training.distributed import destroy_distributed, device, init_distributed, torch_dtype

    init_distributed()
    dev = device()
    dtype = torch_dtype(args.precision)
    res = {"shape": args.shape, "precision": args.precision, "device": str(dev), "batch": args.batch,
           "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "threads": torch.get_num_threads()}
    if dev.type == "cuda":
        res["gpu"] = torch.cuda.get_device_name()
    res["generation"] = gen = bench_generation(args, dev, dtype)
    res["ppo"] = {}
    for s in [int(x) for x in args.ppo_stages.split(",") if x.strip()]:
        res["ppo"][f"zero{s}"] = bench_ppo(args, s, dev)

    print(f"\nmodel {args.shape} ({gen['params'] / 1e6:.2f}M params, {args.precision}) on {res.get('gpu', dev)}; "
          f"batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy")
    print(f"{'generation (best of --repeats, interleaved)':44s} {'tokens/s':>10s} {'s/gen':>8s} {'median':>8s}")
    rows = [("(a) portable hybrid engine, ZeRO-3", "a_portable_z3"), ("(b) naive ZeRO-3 (gather per token)",
            "b_naive_z3"), ("(c) plain generate, unsharded copy", "c_plain"),
            ("(d) DeepSpeed HE, ZeRO-0", "d_deepspeed_he_z0"), ("(d) DeepSpeed HE, ZeRO-3", "d_deepspeed_he_z3")]
    for title, k in rows:
        if f"{k}_s" in gen:
            print(f"{title:44s} {gen[k + '_tokens_per_s']:10.1f} {gen[k + '_s']:8.4f} {gen[k + '_median_s']:8.4f}")
        elif f"{k}_error" in gen:
            print(f"{title:44s} failed: {gen[k + '_error']}")
    a = gen["a_portable_z3_tokens_per_s"]
    if "b_naive_z3_tokens_per_s" in gen:
        res["ratio_a_over_b"] = a / gen["b_naive_z3_tokens_per_s"]
        print(f"ratio (a)/(b) = {res['ratio_a_over_b']:.2f}x   (target >= 3x)")
    res["ratio_a_over_c"] = a / gen["c_plain_tokens_per_s"]
    print(f"ratio (a)/(c) = {res['ratio_a_over_c']:.3f}   (target >= 0.90); (a) output == (c): "
          f"{gen['a_equal_to_plain']}")
    for k, v in res["ppo"].items():
        print(f"PPO step {k}: {v['step_s']:.4f} s median, {v['step_min_s']:.4f} best (generation {v['generation_s']:.4f}, experience "
              f"{v['experience_s']:.4f}, train {v['train_s']:.4f}), {v['samples_per_s']:.1f} samples/s")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    destroy_distributed()
    return res


if __name__ == "__main__":
    main()
