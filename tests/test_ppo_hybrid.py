"""Hybrid engine: greedy generation through it equals plain `generate` on the same weights (ZeRO-0, ZeRO-3, LoRA),
left padding and scoring positions agree with generation, and DeepSpeed's HE fails clearly where unsupported."""
import copy

import pytest
import torch

from rlhf_tasks.config import TinyModelConfig
from rlhf_tasks.config.training import LoraConfig, TrainingConfig
from rlhf_tasks.errors import ConfigError
from rlhf_tasks.models import ensure_tiny_model, lm_logits, load_causal_lm, load_tokenizer
from rlhf_tasks.ppo import ppo_math as pm
from rlhf_tasks.ppo.hybrid import DeepSpeedHybridEngine, PortableHybridEngine, left_pad
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


def _greedy(model, ids, mask, tok, n=12):
    return model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                          pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)


@pytest.mark.parametrize("stage", [0, 3])
def test_hybrid_greedy_equals_plain_generate(tiny, stage):
    path, tok, ids, mask = tiny
    model = load_causal_lm(path, dropout=0.1)
    plain = copy.deepcopy(model).eval()
    engine = build_engine(model, TrainingConfig(zero_stage=stage, micro_batch_size=3), lr=1e-3, total_steps=2)
    he = PortableHybridEngine(engine)
    out = he.generate(ids, mask, do_sample=False, max_new_tokens=12, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id)
    ref = _greedy(plain, ids, mask, tok)
    assert torch.equal(out, ref)
    assert engine.module.training, "generation mode must restore train mode"
    if stage == 3:  # released: partitions are back (empty local tensors in a lone process are size-0 views)
        assert all(p.ds_status.name == "NOT_AVAILABLE" for p in engine.module.parameters())
        naive = PortableHybridEngine(engine, gather_zero3=False).generate(
            ids, mask, do_sample=False, max_new_tokens=12, pad_token_id=tok.pad_token_id)
        assert torch.equal(naive, ref)


def test_lora_merged_for_generation_and_restored_exactly(tiny):
    path, tok, ids, mask = tiny
    model = apply_lora(load_causal_lm(path), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(std=0.5)  # a non-trivial adapter
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref = _greedy(copy.deepcopy(model).eval(), ids, mask, tok)
    engine = build_engine(model, TrainingConfig(zero_stage=0, micro_batch_size=3), lr=1e-3, total_steps=2)
    he = PortableHybridEngine(engine)
    with he.generation_mode() as m:
        merged = [x for x in m.modules() if hasattr(x, "merged") and x.merged]
        assert merged, "LoRA layers must be merged while generating"
        out = _greedy(m, ids, mask, tok)
    assert torch.equal(out, ref)
    for n, p in engine.module.named_parameters():
        assert torch.equal(p.detach(), before[n]), f"{n} changed by merge/unmerge"


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
