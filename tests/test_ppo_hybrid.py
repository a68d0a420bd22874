"""Hybrid engine: greedy generation through it, by HF `generate` (ppo.generation=hf) and by the static-cache decode
loop (auto), equals plain `generate` on the same weights (ZeRO-0, ZeRO-3, LoRA) with ragged prompts and EOS; the
loop falls back to `generate` (with the reason logged) for what it does not cover; PPO experience is the same
through both; left padding and scoring positions agree with generation, and DeepSpeed's HE fails clearly where
unsupported."""
import copy
import logging

import pytest
import torch

from rlhf_tasks.config import TinyModelConfig
from rlhf_tasks.config.training import LoraConfig, TrainingConfig
from rlhf_tasks.errors import ConfigError
from rlhf_tasks.models import ensure_tiny_model, lm_logits, load_causal_lm, load_tokenizer
from rlhf_tasks.ppo import ppo_math as pm
from rlhf_tasks.ppo.hybrid import DeepSpeedHybridEngine, PortableHybridEngine, left_pad, make_hybrid_engine
from rlhf_tasks.training.distributed import init_distributed
from rlhf_tasks.training.engine import apply_lora, build_engine

PROMPTS = [" Human: Describe the cat. Assistant:", " Human: How is the sea? Assistant:",
           " Human: Tell me about the old city by the river. Assistant:"]


@pytest.fixture(scope="module")
def tiny():
    init_distributed()
    path = str(ensure_tiny_model("llama", TinyModelConfig()))
    tok = load_tokenizer(path, "left")
    ids, mask = left_pad([tok(p)["input_ids"] for p in PROMPTS], tok.pad_token_id)
    return path, tok, ids, mask


def _greedy(model, ids, mask, tok, n=12, eos=None):
    return model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                          pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id if eos is None else eos)


def _lively(model, names=None):
    """Weights large enough that greedy decoding varies (the tiny init repeats one token), so equality means
    something; `names`: only parameters whose name contains it."""
    torch.manual_seed(0)
    for n, p in model.named_parameters():
        if p.dim() > 1 and (names is None or names in n):
            p.data.normal_(std=0.3)
    return model


def _eos_ids(model, ids, mask, tok):
    """Two tokens greedy decoding emits (rows 0 and 1), as EOS ids: some rows end early, the rest pad after."""
    free = _greedy(model, ids, mask, tok)[:, ids.shape[1]:]
    return [int(free[0, 3]), int(free[1, 6])]


@pytest.mark.parametrize("generation", ["hf", "auto"])
@pytest.mark.parametrize("stage", [0, 3])
def test_hybrid_greedy_equals_plain_generate(tiny, stage, generation):
    path, tok, ids, mask = tiny
    model = _lively(load_causal_lm(path, dropout=0.1))
    plain = copy.deepcopy(model).eval()
    eos = _eos_ids(plain, ids, mask, tok)
    engine = build_engine(model, TrainingConfig(zero_stage=stage, micro_batch_size=3), lr=1e-3, total_steps=2)
    he = PortableHybridEngine(engine, generation=generation)
    assert he.path == ("hf" if generation == "hf" else "static")
    for eos_ids in (tok.eos_token_id, eos):
        kw = dict(do_sample=False, max_new_tokens=12, pad_token_id=tok.pad_token_id, eos_token_id=eos_ids)
        out = he.generate(ids, mask, **kw)
        ref = _greedy(plain, ids, mask, tok, eos=eos_ids)
        assert torch.equal(out, ref)
        assert engine.module.training, "generation mode must restore train mode"
        if stage == 3:  # released: partitions are back (empty local tensors in a lone process are size-0 views)
            assert all(p.ds_status.name == "NOT_AVAILABLE" for p in engine.module.parameters())
            naive = PortableHybridEngine(engine, gather_zero3=False, generation=generation).generate(ids, mask, **kw)
            assert torch.equal(naive, ref)


@pytest.mark.parametrize("generation", ["hf", "auto"])
@pytest.mark.parametrize("stage", [0, 3])
def test_lora_merged_for_generation_and_restored_exactly(tiny, stage, generation):
    path, tok, ids, mask = tiny
    model = apply_lora(_lively(load_causal_lm(path)), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    _lively(model, names="lora_B")  # a non-trivial adapter
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lora_layers = [x for x in model.modules() if hasattr(x, "lora_A")]
    plain = copy.deepcopy(model).eval()
    eos = _eos_ids(plain, ids, mask, tok)
    ref = _greedy(plain, ids, mask, tok, eos=eos)
    engine = build_engine(model, TrainingConfig(zero_stage=stage, micro_batch_size=3), lr=1e-3, total_steps=2)
    he = PortableHybridEngine(engine, generation=generation)
    with he.generation_mode() as m:
        merged = [x for x in m.modules() if hasattr(x, "merged") and x.merged]
        assert merged, "LoRA layers must be merged while generating"
    wrapper_calls = []
    hook = lora_layers[0].register_forward_hook(lambda *_: wrapper_calls.append(1))
    out = he.generate(ids, mask, do_sample=False, max_new_tokens=12, pad_token_id=tok.pad_token_id, eos_token_id=eos)
    hook.remove()
    assert torch.equal(out, ref)
    # the static loop calls the merged layers' base layers directly; generate goes through peft's wrapper
    assert bool(wrapper_calls) == (generation == "hf")
    assert all(x.merged is False for x in engine.module.modules() if hasattr(x, "merged")), "unmerged after"
    assert [x for x in engine.module.modules() if hasattr(x, "lora_A")] == lora_layers, "LoRA layers put back"
    if stage == 0:
        for n, p in engine.module.named_parameters():
            assert torch.equal(p.detach(), before[n]), f"{n} changed by merge/unmerge"


def test_static_loop_falls_back_to_generate_with_a_logged_reason(tiny, caplog):
    """An argument the loop does not cover (repetition_penalty) and an architecture it does not cover (sliding
    window attention): HF generate's output, and the reason in the log."""
    path, tok, ids, mask = tiny
    model = _lively(load_causal_lm(path))
    plain = copy.deepcopy(model).eval()
    he = PortableHybridEngine(build_engine(model, TrainingConfig(micro_batch_size=3), lr=1e-3, total_steps=2))
    kw = dict(do_sample=False, max_new_tokens=8, pad_token_id=tok.pad_token_id, repetition_penalty=1.5)
    with caplog.at_level(logging.WARNING, logger="rlhf_tasks.ppo.hybrid"):
        out = he.generate(ids, mask, **kw)
    assert torch.equal(out, plain.generate(input_ids=ids, attention_mask=mask, **kw))
    assert "repetition_penalty not covered" in caplog.text
    from transformers import AutoModelForCausalLM, MistralConfig

    sliding = _lively(AutoModelForCausalLM.from_config(MistralConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=4)))
    plain = copy.deepcopy(sliding).eval()
    he = PortableHybridEngine(build_engine(sliding, TrainingConfig(micro_batch_size=3), lr=1e-3, total_steps=2))
    kw = dict(do_sample=False, max_new_tokens=8, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rlhf_tasks.ppo.hybrid"):
        out = he.generate(ids, mask, **kw)
    assert torch.equal(out, plain.generate(input_ids=ids, attention_mask=mask, **kw))
    assert "StaticSlidingWindowLayer" in caplog.text


def test_experience_is_the_same_through_generate_and_the_static_loop(tiny):
    """Sampling with top_k=1 is deterministic, so PPO experience (sequences, masks after EOS, log-probs, rewards)
    must be identical whichever path generates it."""
    from rlhf_tasks.config.stages import PPOConfig
    from rlhf_tasks.ppo import PPOTrainer, RLHFEngine

    path, tok, *_ = tiny
    engine = RLHFEngine(_lively(load_causal_lm(path)), path, tokenizer=tok, total_steps=2,
                        config=PPOConfig(prompt_batch_size=3, mini_batch_size=3, max_new_tokens=10, top_k=1,
                                         generation="hf"))
    trainer = PPOTrainer(engine)
    batch = [tok(p)["input_ids"] for p in PROMPTS]
    via_hf = trainer.generate_experience(batch)
    engine.hybrid = make_hybrid_engine("portable", engine.actor, "auto")
    via_loop = trainer.generate_experience(batch)
    for name in ("sequences", "attention_mask", "responses", "response_mask", "old_logprobs", "ref_logprobs",
                 "old_values", "scores", "rewards", "has_eos"):
        assert torch.equal(getattr(via_hf, name), getattr(via_loop, name)), name
    assert via_loop.stats["time/gen_compile_s"] == 0.0  # the eager step compiles nothing


def test_left_padding_and_scoring_positions_match_generation(tiny):
    """Each left-padded row generates what it generates alone, and log-probs recomputed by `lm_logits` on the
    generated sequences equal the sampling distribution generate used (same positions)."""
    path, tok, ids, mask = tiny
    model = load_causal_lm(path).eval()
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=8,
                         pad_token_id=tok.pad_token_id, output_scores=True, return_dict_in_generate=True)
    P = ids.shape[1]
    for i, p in enumerate(PROMPTS):
        alone = torch.tensor([tok(p)["input_ids"]])
        single = _greedy(model, alone, torch.ones_like(alone), tok, n=8)[0, alone.shape[1]:]
        assert torch.equal(single, out.sequences[i, P:P + len(single)])
    resp = out.sequences[:, P:]
    rmask, _ = pm.response_mask_after_eos(resp, tok.eos_token_id)
    full_mask = torch.cat([mask, rmask.long()], 1)
    with torch.no_grad():
        lp = pm.logprobs_from_logits(lm_logits(model, out.sequences, full_mask)[:, P - 1:-1], resp)
    gen_lp = pm.logprobs_from_logits(torch.stack(out.scores, 1), resp)
    torch.testing.assert_close(lp * rmask, gen_lp * rmask, atol=1e-4, rtol=1e-4)


def test_deepspeed_hybrid_engine_clear_error_without_cuda(tiny):
    path, *_ = tiny
    engine = build_engine(load_causal_lm(path), TrainingConfig(micro_batch_size=2), lr=1e-3, total_steps=1)
    with pytest.raises(ConfigError, match="hybrid_engine"):
        DeepSpeedHybridEngine(engine)


@pytest.mark.parametrize("generation", ["hf", "auto"])
def test_stage_generation_runs_cached_merged_and_in_eval_mode(tiny, generation):
    """The PPO stage's generation call (`generate_experience` on an RLHFEngine built as the stage builds it: LoRA
    on the actor, gradient checkpointing on for training), inspected at every forward of the model while it
    generates: eval mode (dropout and checkpointing off), a KV cache passed and used (after the prefill one token
    per row per forward, never the whole sequence again), and LoRA merged (with the static loop, peft's wrappers not
    called at all). A regression to per-token peft forwards, an unused cache or training mode fails here."""
    from rlhf_tasks.config.stages import PPOConfig
    from rlhf_tasks.ppo import PPOTrainer, RLHFEngine
    from rlhf_tasks.training.engine import plain_hf_model

    path, tok, *_ = tiny
    cfg = PPOConfig(prompt_batch_size=3, mini_batch_size=3, max_new_tokens=8, min_new_tokens=8, generation=generation,
                    actor={"gradient_checkpointing": True, "lora": {"r": 4}})
    engine = RLHFEngine(_lively(load_causal_lm(path)), path, tokenizer=tok, total_steps=2, config=cfg)
    hf_model = plain_hf_model(engine.actor)
    lora_layers = [m for m in engine.actor.module.modules() if hasattr(m, "lora_A")]
    assert lora_layers and hf_model.is_gradient_checkpointing
    calls, wrapper_calls = [], []

    def look(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        calls.append(dict(width=ids.shape[1], training=module.training, cache=kwargs.get("cache"),
                          use_cache=kwargs.get("use_cache"),
                          merged=all(m.merged for m in lora_layers)))

    hooks = [hf_model.register_forward_pre_hook(look, with_kwargs=True),
             lora_layers[0].register_forward_hook(lambda *_: wrapper_calls.append(len(calls)))]
    trainer = PPOTrainer(engine)
    P = max(len(tok(p)["input_ids"]) for p in PROMPTS)
    try:
        exp = trainer.generate_experience([tok(p)["input_ids"] for p in PROMPTS])
    finally:
        for h in hooks:
            h.remove()
    generation_calls = calls[:8]  # then the experience pass: one forward over the whole sequences
    assert exp.responses.shape[1] == 8 and calls[8]["width"] == P + 8
    assert generation_calls[0]["width"] >= P and [c["width"] for c in generation_calls[1:]] == [1] * 7
    assert all(c["cache"] is not None and c["use_cache"] is not False for c in generation_calls)
    assert all(not c["training"] and c["merged"] for c in generation_calls)
    in_generation = [n for n in wrapper_calls if n <= 8]  # the experience pass (unmerged, training weights) after
    assert bool(in_generation) == (generation == "hf")  # hf: merged wrappers called; the loop: base layers only
    assert engine.actor.module.training and not any(m.merged for m in lora_layers), "train mode, unmerged after"


def test_shared_prompt_prefix_under_zero3_and_lora(tiny):
    """Prompts behind one long system text (its tokens computed once by the static loop) through the hybrid engine
    at ZeRO-3 with LoRA: greedy output equal to plain `generate` on the merged weights."""
    path, tok, *_ = tiny
    system = " Human: You are a helpful assistant, you answer every question about the old city by the river."
    ids, mask = left_pad([tok(system + p.removeprefix(" Human:"))["input_ids"] for p in PROMPTS], tok.pad_token_id)
    model = apply_lora(_lively(load_causal_lm(path)), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    _lively(model, names="lora_B")
    plain = copy.deepcopy(model).merge_and_unload().eval()
    eos = _eos_ids(plain, ids, mask, tok)
    engine = build_engine(model, TrainingConfig(zero_stage=3, micro_batch_size=3), lr=1e-3, total_steps=2)
    he = PortableHybridEngine(engine, generation="auto")
    out = he.generate(ids, mask, do_sample=False, max_new_tokens=12, pad_token_id=tok.pad_token_id, eos_token_id=eos)
    assert he.decoder.last_shared_prefix >= 8
    assert torch.equal(out, _greedy(plain, ids, mask, tok, eos=eos))
