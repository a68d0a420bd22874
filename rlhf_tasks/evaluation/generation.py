"""Batched generation, reward scoring and log-probs for evaluation (torch + transformers, no I/O).

Left padding for generation, right padding for the reward model and for log-probs; positions always come from the
attention mask (models.lm_logits / models.sequence_scores), so padding never changes a score.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch

from .. import models
from . import metrics


def batches(n: int, size: int) -> Iterator[range]:
    for start in range(0, n, size):
        yield range(start, min(n, start + size))


def generation_config(tokenizer, *, max_new_tokens: int, do_sample: bool, temperature: float = 1.0,
                      top_p: float = 1.0, top_k: int = 0, min_new_tokens: int = 0,
                      stop_strings: list[str] | None = None):
    """An explicit GenerationConfig (greedy unless `do_sample`), with the tokenizer's EOS and pad. With
    `stop_strings`, generate() must also get `tokenizer=`."""
    from transformers import GenerationConfig

    kw = dict(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=do_sample,
              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
              bos_token_id=tokenizer.bos_token_id)
    if stop_strings:
        kw["stop_strings"] = list(stop_strings)
    if do_sample:
        kw.update(temperature=temperature, top_p=top_p, top_k=top_k)
    else:
        kw.update(num_beams=1)
    return GenerationConfig(**kw)


@torch.no_grad()
def generate(model, tokenizer, prompt_ids: Sequence[Sequence[int]], *, batch_size: int, device: torch.device,
             gen_cfg, seed: int | None = None) -> list[list[int]]:
    """Answer every prompt (token lists, no padding). Returns each response's tokens cut after its first EOS
    (EOS included when produced). With a seed, the RNG is reset first so two policies see the same stream."""
    if seed is not None:
        torch.manual_seed(seed)
    model.eval()
    eos = tokenizer.eos_token_id
    out: list[list[int]] = []
    for idx in batches(len(prompt_ids), batch_size):
        ids, mask = models.pad_token_lists([prompt_ids[i] for i in idx], tokenizer.pad_token_id, "left")
        ids, mask = ids.to(device), mask.to(device)
        extra = {"tokenizer": tokenizer} if getattr(gen_cfg, "stop_strings", None) else {}
        seq = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg, **extra)
        resp = seq[:, ids.shape[1]:].cpu()
        rmask = metrics.response_mask(resp, eos)
        out.extend(resp[i, : int(rmask[i].sum())].tolist() for i in range(resp.shape[0]))
    return out


@torch.no_grad()
def score(score_model, sequences: Sequence[Sequence[int]], *, pad_id: int, batch_size: int,
          device: torch.device) -> list[float]:
    """Reward-model score of each full sequence (prompt + response), read at its last token."""
    score_model.eval()
    out: list[float] = []
    for idx in batches(len(sequences), batch_size):
        ids, mask = models.pad_token_lists([sequences[i] for i in idx], pad_id, "right")
        out.extend(models.sequence_scores(score_model, ids.to(device), mask.to(device)).float().cpu().tolist())
    return out


@torch.no_grad()
def kl_to_reference(policy, reference, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
                    *, pad_id: int, batch_size: int, device: torch.device,
                    temperature: float = 1.0) -> tuple[list[float], list[float]]:
    """KL of a policy to its reference over the response tokens the policy produced, per sequence:
    (k1: sum_t logp_policy - logp_ref of the chosen tokens, exact: sum_t KL of the next-token distributions)."""
    policy.eval()
    reference.eval()
    k1: list[float] = []
    exact: list[float] = []
    for idx in batches(len(prompt_ids), batch_size):
        seqs = [list(prompt_ids[i]) + list(response_ids[i]) for i in idx]
        ids, mask = models.pad_token_lists(seqs, pad_id, "right")
        # response tokens sit at prompt_len <= t < prompt_len + response_len; they are predicted from t - 1
        resp = torch.zeros_like(mask)
        for row, i in enumerate(idx):
            p, r = len(prompt_ids[i]), len(response_ids[i])
            resp[row, p: p + r] = 1
        ids, mask, resp = ids.to(device), mask.to(device), resp[:, 1:].to(device)
        logits = models.lm_logits(policy, ids, mask)
        ref_logits = models.lm_logits(reference, ids, mask)
        lp = metrics.token_logprobs(logits, ids, temperature)
        lr = metrics.token_logprobs(ref_logits, ids, temperature)
        k1.extend(metrics.sequence_kl(lp, lr, resp).float().cpu().tolist())
        per_token = metrics.token_kl(logits, ref_logits, temperature) * resp
        exact.extend(per_token.sum(-1).float().cpu().tolist())
    return k1, exact
