"""Generation throughput of the hybrid engine and PPO step time (a benchmark, not a test).

On one random-init OPT model and the same random prompts, in one run:
  (a) portable hybrid engine under ZeRO-3 (parameters gathered once per generation), HF `generate`,
  (a') the same engine with our static-cache decode loop, its step torch.compile'd (ppo.generation=compiled; CUDA
       graphs on a GPU); its compile/warm-up seconds are reported apart, not in the rates,
  (a'') the same loop with an eager step (what ppo.generation=auto runs on CPU),
  (b) naive generation under ZeRO-3 (parameters fetched layer by layer for every token: DS-Chat without HE),
  (c) plain `generate` on an unsharded copy,
  (d) DeepSpeed's Hybrid Engine (with --deepspeed-he; CUDA only),
then PPO steps end to end (generation + experience + actor/critic update) at ZeRO-0 and ZeRO-3 (ppo.generation:
--generation, default auto): median seconds per step and samples/s. Every generation produces exactly
--new-tokens tokens (min = max), greedy. With --real-model, also the PPO stage's actor shape on a real model: SmolLM2-135M with LoRA
(the converted checkpoint when it is installed, else random weights of its shape), sampled as the stage samples:
(e) the stage's generation path (hybrid engine, ZeRO-0, LoRA merged) and (f) plain `generate` on the same weights
(LoRA merged into a plain copy), on prompts shaped like the stage's chat prompts (a shared system prompt, then each
row's own tokens).

    python benchmarks/ppo_throughput.py                        # DS-Chat's measured CPU shape (tiny OPT)
    python benchmarks/ppo_throughput.py --real-model           # + the SmolLM2 LoRA rows
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
    portable = PortableHybridEngine(engine, generation="hf")
    naive = PortableHybridEngine(engine, gather_zero3=False, generation="hf")
    compiled = PortableHybridEngine(engine, generation="compiled")
    static = PortableHybridEngine(engine, generation="auto")
    static.decoder.compile_step = False  # the eager step on every device
    res["static_eager_equal_to_plain"] = bool(torch.equal(static.generate(ids, mask, **kw), ref))
    res["a_equal_to_plain"] = bool(torch.equal(portable.generate(ids, mask, **kw), ref))
    t0 = time.perf_counter()
    res["compiled_equal_to_plain"] = bool(torch.equal(compiled.generate(ids, mask, **kw), ref))
    compiled.generate(ids, mask, **kw)  # CUDA graphs: the second call captures
    res["a_prime_first_calls_s"] = time.perf_counter() - t0
    res["a_prime_compile_s"] = compiled.decoder.compile_s
    variants["a_portable_z3"] = lambda: portable.generate(ids, mask, **kw)
    variants["a_prime_compiled_z3"] = lambda: compiled.generate(ids, mask, **kw)
    variants["a_static_eager_z3"] = lambda: static.generate(ids, mask, **kw)
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
    return {**res, **interleaved_rates(variants, args.repeats, tokens)}


def interleaved_rates(variants: dict, repeats: int, tokens: int) -> dict:
    """Each variant once as warm-up, then `repeats` interleaved rounds (every variant sees the same machine load):
    best and median seconds, tokens/s of the best."""
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():
        fn()  # warm-up
    for _ in range(repeats):
        for k, fn in variants.items():
            times[k].append(timed(fn, 1, warmup=0))
    res = {}
    for k, ts in times.items():
        res[k + "_s"] = min(ts)
        res[k + "_median_s"] = statistics.median(ts)
        res[k + "_tokens_per_s"] = tokens / min(ts)
    return res


SMOLLM2_SHAPE = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                     intermediate_size=1536, vocab_size=49152, head_dim=64, tie_word_embeddings=True,
                     max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5, bos_token_id=1,
                     eos_token_id=2, pad_token_id=2)


def bench_real_model(args, dev, dtype) -> dict:
    """(e) the PPO stage's generation path vs (f) plain `generate`, SmolLM2-135M with the smollm2 preset's LoRA."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from rlhf_tasks.config.training import LoraConfig, TrainingConfig
    from rlhf_tasks.models import cache_root
    from rlhf_tasks.ppo.hybrid import PortableHybridEngine
    from rlhf_tasks.training.engine import apply_lora, build_engine

    folder = cache_root() / "models" / "smollm2-135m-instruct"
    torch.manual_seed(0)
    if (folder / "config.json").exists():
        model, source = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype), str(folder)
    else:
        with torch.device(dev):
            model = AutoModelForCausalLM.from_config(LlamaConfig(**SMOLLM2_SHAPE)).to(dtype)
        source = "random weights of the SmolLM2-135M shape"
    model = apply_lora(model.to(dev), LoraConfig(r=16, alpha=32, only_optimize_lora=True))  # the preset's actor
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(std=0.02)  # a trained adapter is not zero
    plain = copy.deepcopy(model).merge_and_unload().eval()
    tcfg = TrainingConfig(zero_stage=0, precision=args.precision, micro_batch_size=args.real_batch)
    engine = build_engine(model, tcfg, lr=1e-5, total_steps=10)
    hf_path = PortableHybridEngine(engine, generation="hf")
    stage_path = PortableHybridEngine(engine, generation=args.generation)
    # prompts shaped like the stage's chat prompts: the chat template's system prompt (the same leading tokens in
    # every row: 24 in SmolLM2's) before each prompt's own --prompt-len tokens
    g = torch.Generator().manual_seed(3)
    system = torch.randint(3, SMOLLM2_SHAPE["vocab_size"], (1, args.shared_prefix), generator=g)
    own = torch.randint(3, SMOLLM2_SHAPE["vocab_size"], (args.real_batch, args.prompt_len), generator=g)
    ids = torch.cat([system.expand(args.real_batch, -1), own], 1).to(dev)
    mask = torch.ones_like(ids)
    n = args.new_tokens
    greedy = gen_kwargs(n)
    sampled = dict(greedy, do_sample=True, temperature=1.0, top_k=0, top_p=1.0)  # the stage's sampling
    with torch.no_grad():
        ref = plain.generate(input_ids=ids, attention_mask=mask, **greedy)
    res = {"source": source, "batch": args.real_batch, "lora_r": 16, "prompt_width": ids.shape[1],
           "stage_equal_to_plain": bool(torch.equal(stage_path.generate(ids, mask, **greedy), ref)),
           "shared_prefix_computed_once": stage_path.decoder.last_shared_prefix, "choice": stage_path.choice}

    def run_plain():
        with torch.no_grad():
            return plain.generate(input_ids=ids, attention_mask=mask, **sampled)

    res.update(interleaved_rates({"e_stage_path": lambda: stage_path.generate(ids, mask, **sampled),
                                  "e0_stage_path_hf": lambda: hf_path.generate(ids, mask, **sampled),
                                  "f_plain": run_plain}, args.repeats, args.real_batch * n))
    res["ratio_stage_over_plain"] = res["e_stage_path_tokens_per_s"] / res["f_plain_tokens_per_s"]
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
                     max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, top_k=0,
                     generation=args.generation)
    for t in (pcfg.actor, pcfg.critic):
        t.zero_stage, t.precision, t.micro_batch_size = stage, args.precision, args.batch
    engine = RLHFEngine(actor, reward, tokenizer=StubTokenizer(cfg.vocab_size), config=pcfg, total_steps=1000)
    trainer = PPOTrainer(engine)
    g = torch.Generator().manual_seed(2)
    batch = torch.randint(3, cfg.vocab_size, (args.batch, args.prompt_len), generator=g).tolist()
    rows = [trainer.step(batch) for _ in range(args.ppo_steps + 2)][2:]

    def med(k):
        return statistics.median(r[k] for r in rows)

    return {"generation_path": engine.hybrid.choice, "step_s": med("time/step_s"), "step_min_s": min(r["time/step_s"] for r in rows), "generation_s": med("time/generation_s"),
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
    ap.add_argument("--generation", choices=["auto", "compiled", "hf"], default="auto",
                    help="ppo.generation of the PPO steps and of (e)")
    ap.add_argument("--real-model", action="store_true", help="also (e)/(f): SmolLM2-135M with LoRA")
    ap.add_argument("--real-batch", type=int, default=8, help="batch of (e)/(f) (the smollm2 preset's)")
    ap.add_argument("--shared-prefix", type=int, default=24,
                    help="(e)/(f): leading prompt tokens every row shares (SmolLM2's chat system prompt: 24)")
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
    if args.real_model:
        res["real_model"] = bench_real_model(args, dev, dtype)
    res["ppo"] = {}
    for s in [int(x) for x in args.ppo_stages.split(",") if x.strip()]:
        res["ppo"][f"zero{s}"] = bench_ppo(args, s, dev)

    print(f"\nmodel {args.shape} ({gen['params'] / 1e6:.2f}M params, {args.precision}) on {res.get('gpu', dev)}; "
          f"batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy")
    print(f"{'generation (best of --repeats, interleaved)':44s} {'tokens/s':>10s} {'s/gen':>8s} {'median':>8s}")
    rows = [("(a) portable hybrid engine, ZeRO-3", "a_portable_z3"),
            ("(a') + static-cache loop, compiled step", "a_prime_compiled_z3"),
            ("(a'') + static-cache loop, eager step", "a_static_eager_z3"), ("(b) naive ZeRO-3 (gather per token)",
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
    res["ratio_compiled_over_plain"] = gen["a_prime_compiled_z3_tokens_per_s"] / gen["c_plain_tokens_per_s"]
    res["compiled_equal_to_plain"] = gen["compiled_equal_to_plain"]
    res["ratio_static_eager_over_plain"] = gen["a_static_eager_z3_tokens_per_s"] / gen["c_plain_tokens_per_s"]
    print(f"ratio (a')/(c) = {res['ratio_compiled_over_plain']:.2f}x  (target >= 2x on CPU); (a') output == (c): "
          f"{res['compiled_equal_to_plain']}; compile/warm-up "
          f"{gen['a_prime_compile_s']:.1f} s (first two calls {gen['a_prime_first_calls_s']:.1f} s, not in the "
          "rates)")
    print(f"ratio (a'')/(c) = {res['ratio_static_eager_over_plain']:.2f}x; (a'') output == (c): "
          f"{gen['static_eager_equal_to_plain']}")
    if "real_model" in res:
        r = res["real_model"]
        print(f"real model ({r['source']}, LoRA r={r['lora_r']}, batch {r['batch']}, prompt width "
              f"{r['prompt_width']} ({args.shared_prefix} shared), {args.new_tokens} sampled tokens; best of "
              f"--repeats, interleaved):")
        for title, k in (("(e) stage's generation path", "e_stage_path"), ("(e0) stage path with generation=hf",
                         "e0_stage_path_hf"), ("(f) plain generate, same weights", "f_plain")):
            print(f"  {title:42s} {r[k + '_tokens_per_s']:10.1f} {r[k + '_s']:8.4f} {r[k + '_median_s']:8.4f}")
        print(f"  ratio (e)/(f) = {r['ratio_stage_over_plain']:.2f}x  (target >= 1.5x); greedy (e) == (f): "
              f"{r['stage_equal_to_plain']}")
    for k, v in res["ppo"].items():
        print(f"PPO step {k} ({v['generation_path'].split(':')[0]}): {v['step_s']:.4f} s median, {v['step_min_s']:.4f} best (generation {v['generation_s']:.4f}, experience "
              f"{v['experience_s']:.4f}, train {v['train_s']:.4f}), {v['samples_per_s']:.1f} samples/s")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    destroy_distributed()
    return res


if __name__ == "__main__":
    main()
