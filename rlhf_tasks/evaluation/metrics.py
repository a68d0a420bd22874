"""Pure evaluation functions: no I/O, no models. Tensor shapes are in each docstring.

Conventions: a response is the token run after the prompt, cut after its first EOS (the EOS is part of it);
padding is given by masks, never by comparing token ids with pad (pad may equal EOS).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ..ppo import ppo_math as pm


def response_mask(response_ids: torch.Tensor, eos_id: int | None, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mask of the real response tokens: everything up to and including the first EOS (all of it when there is
    no EOS). `valid` optionally masks positions the generator never produced. [B, R] -> [B, R] (long)"""
    valid = torch.ones_like(response_ids, dtype=torch.long) if valid is None else valid.long()
    if eos_id is None:
        return valid
    mask, _ = pm.response_mask_after_eos(response_ids, eos_id, valid)  # the one truncation rule PPO trains with
    return mask.long()


def ends_with_eos(response_ids: torch.Tensor, mask: torch.Tensor, eos_id: int | None) -> torch.Tensor:
    """Whether each masked response ends with EOS. [B, R], [B, R] -> [B] (bool)"""
    if eos_id is None:
        return torch.zeros(response_ids.shape[0], dtype=torch.bool)
    lengths = mask.long().sum(-1)
    last = (lengths - 1).clamp(min=0)
    last_tok = response_ids.gather(1, last[:, None]).squeeze(1)
    return (lengths > 0) & (last_tok == eos_id)


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probability of each next token under `logits / temperature`: position t scores token t+1.
    [B, T, V], [B, T] -> [B, T-1]"""
    return pm.logprobs_from_logits(logits[:, :-1], input_ids[:, 1:], temperature)


def sequence_kl(logp: torch.Tensor, logp_ref: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sequence-level KL estimate of a policy to its reference on the policy's own samples: the sum over the
    masked tokens of logp - logp_ref (the k1 estimator; its expectation is KL(policy || ref)).
    [B, T], [B, T], [B, T] -> [B]"""
    return ((logp - logp_ref) * mask.to(logp.dtype)).sum(-1)


def token_kl(logits: torch.Tensor, ref_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Exact KL(policy || ref) of the next-token distributions at each position, sum_v p_v (log p_v - log q_v),
    aligned with `token_logprobs` (position t predicts token t+1). Summed over a response (with
    `sequence_kl`-style masking) it is the KL along the policy's own trajectory: never negative, and meaningful
    for greedy answers too, where the sampled-token estimate is not. [B, T, V], [B, T, V] -> [B, T-1]"""
    lp = torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
    lq = torch.log_softmax(ref_logits[:, :-1].float() / temperature, dim=-1)
    return (lp.exp() * (lp - lq)).sum(-1)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population standard deviation (ddof=0); (nan, nan) for no values."""
    vals = [float(v) for v in values]
    if not vals:
        return math.nan, math.nan
    m = sum(vals) / len(vals)
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / len(vals))


def win_rate(a: Sequence[float], b: Sequence[float]) -> float:
    """Share of paired items where `a` beats `b`; a tie counts as half a win. nan for no pairs."""
    if len(a) != len(b):
        raise ValueError(f"win_rate needs paired scores, got {len(a)} and {len(b)}")
    if not a:
        return math.nan
    wins = sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b))
    return wins / len(a)


def pairwise_accuracy(chosen: Sequence[float], rejected: Sequence[float]) -> float:
    """Share of preference pairs where the reward model scores `chosen` strictly above `rejected`."""
    if len(chosen) != len(rejected):
        raise ValueError(f"pairwise_accuracy needs pairs, got {len(chosen)} and {len(rejected)}")
    if not chosen:
        return math.nan
    return sum(1.0 for c, r in zip(chosen, rejected) if c > r) / len(chosen)


def rate(flags: Sequence[bool]) -> float:
    """Share of true flags (e.g. the EOS rate); nan for none."""
    return sum(1.0 for f in flags if f) / len(flags) if len(flags) else math.nan
