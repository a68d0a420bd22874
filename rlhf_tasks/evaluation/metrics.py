"""Pure evaluation functions: no I/O, no models. Tensor shapes are in each docstring.

Conventions: a response is the token run after the prompt, cut after its first EOS (the EOS is part of it);
padding is given by masks, never by comparing token ids with pad (pad may equal EOS).
"""
from __future__ import annotations

import math
import random
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


# ---- answer diversity: collapse and reward hacking show here ------------------------------------------------
def answer_words(text: str) -> list[str]:
    """The lowercase whitespace-separated words of an answer (what distinct-n and repetition count)."""
    return text.lower().split()


def ngrams(ws: Sequence[str], n: int) -> list[tuple[str, ...]]:
    """The n-grams of a word list, in order. ["a", "b", "c"], 2 -> [("a", "b"), ("b", "c")]"""
    return [tuple(ws[i: i + n]) for i in range(len(ws) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Corpus-level distinct-n (Li et al. 2016): distinct word n-grams over all n-grams of all answers. 1.0 when no
    n-gram repeats anywhere; low when the answers repeat themselves or each other (mode collapse). nan when the
    answers have no n-grams at all."""
    grams = [g for t in texts for g in ngrams(answer_words(t), n)]
    return len(set(grams)) / len(grams) if grams else math.nan


def repetition_rate(texts: Sequence[str], n: int = 2) -> float:
    """Mean over answers of the share of an answer's word n-grams that repeat an earlier n-gram of the same answer
    (a degeneration loop such as "and and and" scores high, a plain sentence 0). Answers with no n-gram count as
    0. nan for no answers."""
    if not texts:
        return math.nan
    rates = []
    for t in texts:
        grams = ngrams(answer_words(t), n)
        rates.append((len(grams) - len(set(grams))) / len(grams) if grams else 0.0)
    return sum(rates) / len(rates)


# Above this repetition rate a policy's answers are loops rather than sentences (a fluent sentence repeats no
# word pair; one "and and" in a 10-word answer is 0.11).
REPETITION_COLLAPSE = 0.2
# PPO answers whose distinct-2 falls below this share of SFT's have collapsed onto a few answers (issue 12's bound).
DISTINCT_DROP = 0.8


def repetitive(repetition: float) -> bool:
    """Whether answers with this `repetition_rate` are degeneration loops."""
    return math.isfinite(repetition) and repetition > REPETITION_COLLAPSE


def less_diverse(distinct2: float, reference_distinct2: float) -> bool:
    """Whether a policy's distinct-2 has dropped below `DISTINCT_DROP` times its reference's."""
    return math.isfinite(distinct2) and math.isfinite(reference_distinct2) and \
        distinct2 < DISTINCT_DROP * reference_distinct2


# ---- is a difference beyond noise? (paired over the same prompts) -------------------------------------------
def paired_bootstrap_ci(a: Sequence[float], b: Sequence[float], *, level: float = 0.95, resamples: int = 2000,
                        seed: int = 0) -> tuple[float, float, float]:
    """Mean of the paired differences a_i - b_i and its percentile bootstrap confidence interval: `resamples`
    times, draw len(a) prompts with replacement (seeded, so deterministic) and take the mean difference; the
    interval is the (1-level)/2 and (1+level)/2 quantiles of those means (nearest rank). (mean, low, high);
    nans for no pairs."""
    if len(a) != len(b):
        raise ValueError(f"paired_bootstrap_ci needs paired scores, got {len(a)} and {len(b)}")
    d = [float(x) - float(y) for x, y in zip(a, b)]
    if not d:
        return math.nan, math.nan, math.nan
    rng = random.Random(seed)
    n = len(d)
    means = sorted(sum(d[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    lo = means[max(0, math.ceil((1 - level) / 2 * resamples) - 1)]
    hi = means[min(resamples - 1, math.ceil((1 + level) / 2 * resamples) - 1)]
    return sum(d) / n, lo, hi


def sign_test_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided exact sign test of paired scores: ties are dropped, and p = P(|wins - losses| at least as large
    as observed) under Binomial(wins + losses, 1/2). 1.0 when every pair ties; nan for no pairs."""
    if len(a) != len(b):
        raise ValueError(f"sign_test_p needs paired scores, got {len(a)} and {len(b)}")
    if not a:
        return math.nan
    wins = sum(1 for x, y in zip(a, b) if x > y)
    losses = sum(1 for x, y in zip(a, b) if x < y)
    n, k = wins + losses, min(wins, losses)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)
