"""The static-cache decode loop (rlhf_tasks/ppo/decode.py): each sampling primitive against hand-computed values,
greedy output equal to HF `generate` token for token on several architectures and attention implementations, and
sampled output from the same distribution as HF's sampler (chi-square tests, seeded, with a check that the test
rejects a sampler with the wrong temperature)."""
import dataclasses
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, MistralConfig

from rlhf_tasks.config import TinyModelConfig
from rlhf_tasks.models import ensure_tiny_model, load_causal_lm
from rlhf_tasks.ppo import decode
from rlhf_tasks.ppo.hybrid import hf_generate

INF = math.inf


# ---- primitives ------------------------------------------------------------------------------------------------
def test_temperature_and_top_k():
    halved = decode.scale_by_temperature(torch.tensor([[2.0, 4.0]]), 2.0)
    torch.testing.assert_close(halved, torch.tensor([[1.0, 2.0]]))
    x = torch.tensor([[1.0, 3.0, 2.0, 3.0]])
    assert torch.equal(decode.top_k_filter(x, 2), torch.tensor([[-INF, 3.0, -INF, 3.0]]))  # ties with the k-th stay
    assert torch.equal(decode.top_k_filter(x, 3), torch.tensor([[-INF, 3.0, 2.0, 3.0]]))
    assert torch.equal(decode.top_k_filter(x, 0), x) and torch.equal(decode.top_k_filter(x, 9), x)


def test_top_p_keeps_the_smallest_set_above_p():
    x = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = lambda p: torch.isfinite(decode.top_p_filter(x, p))[0].tolist()  # noqa: E731
    assert kept(0.75) == [True, True, False, False]  # 0.05 + 0.15 <= 0.25 dropped
    assert kept(0.9) == [True, True, True, False]
    assert kept(0.3) == [True, False, False, False]
    assert kept(0.01) == [True, False, False, False]  # the most likely token always stays
    assert kept(1.0) == [True, True, True, True]


def test_forbid_tokens_per_row():
    x = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    ids = torch.tensor([0, 2])
    assert torch.equal(decode.forbid_tokens(x, ids, True), torch.tensor([[-INF, 2.0, -INF]] * 2))
    assert torch.equal(decode.forbid_tokens(x, ids, torch.tensor(False)), x)
    assert torch.equal(decode.forbid_tokens(x, ids, torch.tensor([[True], [False]])),
                       torch.tensor([[-INF, 2.0, -INF], [1.0, 2.0, 3.0]]))


def test_exponential_race_and_finished_rows():
    logits = torch.tensor([[0.0, -0.6931472, -0.6931472], [0.0, -INF, 5.0]])  # p = [.5, .25, .25]; [e^-5, 0, ~1]
    noise = torch.tensor([[1.0, 0.1, 1.0], [1.0, torch.finfo(torch.float32).tiny, 1e3]])
    # row 0: p / noise = [.5, 2.5, .25] -> 1; row 1: the filtered token (p = 0) never wins, even with tiny noise
    assert decode.sample_from_logits(logits, noise).tolist() == [1, 0]
    noise = decode.exponential_noise(torch.Size([4, 5]), "cpu", torch.Generator().manual_seed(0))
    assert noise.shape == (4, 5) and bool((noise > 0).all())
    tokens, finished = decode.mark_finished(torch.tensor([5, 7, 9]), torch.tensor([False, True, False]),
                                            torch.tensor([9]), pad_id=0)
    assert tokens.tolist() == [5, 0, 9] and finished.tolist() == [False, True, True]


def test_choose_next_min_new_tokens_and_greedy():
    s = decode.SamplingSettings(max_new_tokens=4, eos_token_ids=(1,), pad_token_id=0, min_new_tokens=2)
    logits, eos = torch.tensor([[1.0, 5.0, 2.0]]), torch.tensor([1])
    assert decode.choose_next(logits, s, eos, torch.tensor(0), None).tolist() == [2]  # EOS forbidden before 2
    assert decode.choose_next(logits, s, eos, torch.tensor(2), None).tolist() == [1]


def test_positions_and_prefill_attention():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert decode.prompt_positions(mask).tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]
    allowed = decode.prefill_attention(torch.tensor([[0, 1, 1, 0]]), width=3)  # cache of 4, prompt width 3
    assert allowed.shape == (1, 1, 3, 4)
    assert allowed[0, 0].int().tolist() == [[1, 0, 0, 0],   # a padding query sees only itself
                                            [0, 1, 0, 0],
                                            [0, 1, 1, 0]]
    bias = decode.attention_bias(allowed, "eager", torch.float32)
    assert bias[0, 0, 0, 0] == 0 and bias[0, 0, 0, 1] == torch.finfo(torch.float32).min


def test_settings_follow_generate_defaults_and_refuse_what_they_do_not_cover():
    model = _lively(load_causal_lm(str(ensure_tiny_model("llama", TinyModelConfig()))))
    s, why = decode.settings_from_generate_kwargs(model, dict(max_new_tokens=5, eos_token_id=[3, 4]))
    assert why is None and s.eos_token_ids == (3, 4) and s.pad_token_id == model.generation_config.pad_token_id
    assert decode.settings_from_generate_kwargs(model, dict(max_new_tokens=5, num_beams=2))[1].startswith(
        "generate argument(s) num_beams")
    model.generation_config.repetition_penalty = 1.3
    assert "repetition_penalty" in decode.settings_from_generate_kwargs(model, dict(max_new_tokens=5))[1]


# ---- the loop against HF generate -------------------------------------------------------------------------------
def _lively(model):
    """Random weights large enough that greedy decoding does not repeat one token (tiny inits do)."""
    torch.manual_seed(0)
    for p in model.parameters():
        if p.dim() > 1:
            p.data.normal_(std=0.3)
    return model.eval()


def _ragged(vocab: int, pad: int):
    ids = torch.randint(3, vocab, (3, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :4], mask[1, :2] = 0, 0
    return ids.masked_fill(mask == 0, pad), mask


def _models():
    tiny = TinyModelConfig()
    yield "llama", load_causal_lm(str(ensure_tiny_model("llama", tiny)))
    yield "opt", load_causal_lm(str(ensure_tiny_model("opt", tiny)))
    yield "gpt2", AutoModelForCausalLM.from_config(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4,
                                                              bos_token_id=0, eos_token_id=1, pad_token_id=2))
    yield "mistral", AutoModelForCausalLM.from_config(MistralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=None, pad_token_id=2))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_greedy_equals_generate_across_architectures(attn):
    """Left padding with ragged prompts, the prompt bucketed (11 -> 16 and, with bucket 4, 12), EOS ids that end
    some rows early (pad after, trimmed where all rows ended), min_new_tokens."""
    for name, model in _models():
        model = _lively(model)
        model.config._attn_implementation = attn
        assert decode.unsupported_reason(model) is None, name
        ids, mask = _ragged(64, pad=2)
        kw = dict(do_sample=False, max_new_tokens=9, pad_token_id=2, eos_token_id=1)
        free = hf_generate(model, ids, mask, dict(kw))[:, 11:]
        eos = [int(free[0, 3]), int(free[1, 5])]  # two tokens greedy emits: rows 0 and 1 (at least) end early
        for extra in ({}, {"eos_token_id": eos}, {"eos_token_id": eos, "min_new_tokens": 5}):
            args = {**kw, **extra}
            ref = hf_generate(model, ids, mask, dict(args))
            s, why = decode.settings_from_generate_kwargs(model, args)
            assert why is None
            for bucket in (16, 4):
                out = decode.StaticDecoder(model, bucket=bucket).generate(ids, mask, s)
                assert out.shape == ref.shape and torch.equal(out, ref), (name, attn, extra, bucket)


def test_decoder_reuses_its_cache_and_width():
    model = _lively(load_causal_lm(str(ensure_tiny_model("llama", TinyModelConfig()))))
    dec = decode.StaticDecoder(model)
    s = decode.SamplingSettings(max_new_tokens=6, eos_token_ids=(1,), pad_token_id=2)
    ids, mask = _ragged(model.config.vocab_size, pad=2)
    first = dec.generate(ids, mask, s)
    cache = dec._cache
    short = dec.generate(ids[:, 5:], mask[:, 5:], s)  # narrower prompts: padded to the same width, same cache
    assert dec.width == 16 and dec._cache is cache
    assert torch.equal(short, hf_generate(model, ids[:, 5:], mask[:, 5:], dict(
        do_sample=False, max_new_tokens=6, pad_token_id=2, eos_token_id=1)))
    assert torch.equal(dec.generate(ids, mask, s), first)  # the reset cache holds nothing of the previous call


# ---- sampling: same distribution as HF's sampler ----------------------------------------------------------------
def _chi2_critical(df: int, p: float) -> float:
    """Upper p-quantile of chi-square(df), Wilson-Hilferty approximation (good to ~1% for df >= 3)."""
    z = float(torch.special.ndtri(torch.tensor(1 - p, dtype=torch.float64)))
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _homogeneity(a: torch.Tensor, b: torch.Tensor) -> tuple[float, int]:
    """Two-sample chi-square statistic of token counts (categories with fewer than 10 expected pooled into one).
    a, b [n] token ids -> (statistic, degrees of freedom)"""
    V = int(max(a.max(), b.max())) + 1
    ca, cb = torch.bincount(a, minlength=V).double(), torch.bincount(b, minlength=V).double()
    total = ca + cb
    rare = total < 20
    ca = torch.cat([ca[~rare], ca[rare].sum(0, keepdim=True)])
    cb = torch.cat([cb[~rare], cb[rare].sum(0, keepdim=True)])
    keep = (ca + cb) > 0
    ca, cb = ca[keep], cb[keep]
    na, nb = ca.sum(), cb.sum()
    pooled = (ca + cb) / (na + nb)
    stat = (((ca - na * pooled) ** 2) / (na * pooled) + ((cb - nb * pooled) ** 2) / (nb * pooled)).sum()
    return float(stat), int(keep.sum()) - 1


def test_sampled_tokens_follow_generates_distribution():
    """4000 rows of one prompt (temperature 0.7, top-k 12, top-p 0.9, min_new_tokens 2): at each of 4 positions
    the token counts of our sampler and of `generate`'s pass a chi-square homogeneity test at p = 1e-4 each
    (Bonferroni over positions: 4e-4 overall for a correct sampler), and position 0 passes a goodness-of-fit
    test against the exact filtered distribution. The same test rejects a sampler at temperature 1.0, so it has
    the power to see a wrong distribution."""
    model = _lively(load_causal_lm(str(ensure_tiny_model("llama", TinyModelConfig()))))
    n, pad = 4000, model.generation_config.pad_token_id
    prompt = torch.randint(3, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(2))
    ids, mask = prompt.expand(n, -1).contiguous(), torch.ones(n, 6, dtype=torch.long)
    kw = dict(do_sample=True, temperature=0.7, top_k=12, top_p=0.9, max_new_tokens=4, min_new_tokens=2,
              pad_token_id=pad, eos_token_id=1)
    torch.manual_seed(10)
    ref = hf_generate(model, ids, mask, dict(kw))[:, 6:]
    torch.manual_seed(11)
    s, _ = decode.settings_from_generate_kwargs(model, kw)
    ours = decode.StaticDecoder(model).generate(ids, mask, s)[:, 6:]
    torch.manual_seed(12)
    hot = decode.StaticDecoder(model).generate(ids, mask, dataclasses.replace(s, temperature=1.0))[:, 6:]
    assert ref.shape == ours.shape == (n, 4)
    for t in range(4):
        stat, df = _homogeneity(ours[:, t], ref[:, t])
        assert df >= 3 and stat < _chi2_critical(df, 1e-4), (t, stat, df)
    stat, df = _homogeneity(hot[:, 0], ref[:, 0])
    assert stat > _chi2_critical(df, 1e-4), "the test cannot tell temperature 1.0 from 0.7"
    # goodness of fit at position 0 against the exact filtered softmax of the model's logits
    with torch.no_grad():
        logits = model(input_ids=prompt).logits[:, -1].float()
    logits = decode.forbid_tokens(logits, torch.tensor([1]), True)
    p = decode.top_p_filter(decode.top_k_filter(logits / 0.7, 12), 0.9).softmax(-1)[0].double()
    counts = torch.bincount(ours[:, 0], minlength=p.numel()).double()
    support = p > 0
    assert counts[~support].sum() == 0, "a filtered token was sampled"
    expected = n * p[support]
    stat = float((((counts[support] - expected) ** 2) / expected).sum())
    assert stat < _chi2_critical(int(support.sum()) - 1, 1e-4)


@pytest.mark.slow
def test_compiled_step_equals_generate_and_compiles_once():
    """The torch.compile'd decode step (ppo.generation=compiled; on CPU its compilation takes minutes): greedy output
    equal to `generate`, compile time counted on the first call only, none on the next calls of the same shapes."""
    model = _lively(load_causal_lm(str(ensure_tiny_model("llama", TinyModelConfig()))))
    ids, mask = _ragged(model.config.vocab_size, pad=2)
    kw = dict(do_sample=False, max_new_tokens=9, pad_token_id=2, eos_token_id=1, min_new_tokens=3)
    ref = hf_generate(model, ids, mask, dict(kw))
    s, _ = decode.settings_from_generate_kwargs(model, kw)
    dec = decode.StaticDecoder(model, compile_step=True)
    assert torch.equal(dec.generate(ids, mask, s), ref)
    first = dec.compile_s
    assert first > 0
    narrower = hf_generate(model, ids[:, 2:], mask[:, 2:], dict(kw))
    assert torch.equal(dec.generate(ids[:, 2:], mask[:, 2:], s), narrower)
    assert dec.compile_s == first, "a narrower prompt reuses the bucketed shapes: no second compilation"


# ---- a prefix shared by every prompt: computed once ---------------------------------------------------------------
def test_shared_prefix_length_and_layout():
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [5, 6, 7, 9, 4, 3], [0, 5, 6, 7, 8, 1]])
    mask = (ids != 0).long()
    assert decode.shared_prefix_length(ids, mask) == 3  # 5 6 7 in every row (row 0 has 4 real tokens)
    assert decode.shared_prefix_length(ids[:, :4], mask[:, :4]) == 1  # at most the shortest prompt minus one
    assert decode.shared_prefix_length(ids[:1], mask[:1]) == 0  # one row: nothing to share
    new_ids, new_mask = decode.shared_prefix_layout(ids, mask, 3, width=8, pad_id=0)
    assert new_ids.tolist() == [[5, 6, 7, 0, 0, 0, 0, 8], [5, 6, 7, 0, 0, 9, 4, 3], [5, 6, 7, 0, 0, 0, 8, 1]]
    assert new_mask.tolist() == [[1, 1, 1, 0, 0, 0, 0, 1], [1, 1, 1, 0, 0, 1, 1, 1], [1, 1, 1, 0, 0, 0, 1, 1]]
    # positions over real tokens are those of the left-padded layout
    old_pos = decode.prompt_positions(mask)[mask.bool()]
    assert torch.equal(decode.prompt_positions(new_mask)[new_mask.bool()], old_pos)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_greedy_with_a_shared_prefix_equals_generate(attn):
    """Ragged prompts that begin with the same 9 tokens: the prefix is computed once (one forward of one row before
    the batch's prefill), and the output is `generate`'s token for token."""
    for name, model in _models():
        model = _lively(model)
        model.config._attn_implementation = attn
        ids, mask = _ragged(64, pad=2)
        prefix = torch.randint(3, 64, (9,), generator=torch.Generator().manual_seed(4))
        ids = torch.cat([torch.full((3, 9), 2), ids], 1)
        mask = torch.cat([torch.zeros(3, 9, dtype=torch.long), mask], 1)
        for i in range(3):  # the prefix right before each row's own tokens (left padding stays in front)
            start = int((mask[i] == 0).sum()) - 9
            ids[i, start:start + 9], mask[i, start:start + 9] = prefix, 1
        kw = dict(do_sample=False, max_new_tokens=7, pad_token_id=2, eos_token_id=1, min_new_tokens=2)
        ref = hf_generate(model, ids, mask, dict(kw))
        s, _ = decode.settings_from_generate_kwargs(model, kw)
        widths = []
        hook = model.register_forward_pre_hook(lambda m, a, k: widths.append(tuple(k["input_ids"].shape)),
                                               with_kwargs=True)
        dec = decode.StaticDecoder(model, bucket=4)
        out = dec.generate(ids, mask, s)
        hook.remove()
        assert dec.last_shared_prefix >= 9, name
        assert widths[0] == (1, dec.last_shared_prefix) and widths[1][0] == 3, (name, widths[:2])
        assert torch.equal(out, ref), (name, attn)
