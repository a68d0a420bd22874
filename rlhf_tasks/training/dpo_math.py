"""Direct preference optimisation (DPO) math as small pure functions.

Shapes: B = pairs, T = sequence length (prompt + response, right padded), V = vocabulary. A sequence's log-prob is
the sum of its response tokens' log-probs; `response_mask` [B, T] marks the response tokens (1) against the prompt
and padding (0), as float or bool. Nothing here reads token ids to find padding.

The log-ratio of a pair, h = (logp_c - ref_logp_c) - (logp_r - ref_logp_r), is what every loss here is a function of
(Rafailov et al. 2023: the policy's implicit reward of an answer is beta * (logp - ref_logp)). Every coefficient is
an argument; the stage takes them from `DPOConfig`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ppo.ppo_math import logprobs_from_logits, masked_sum


def sequence_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Log-probability of each sequence's response under the model: the sum over response tokens t of
    log softmax(logits[:, t - 1])[input_ids[:, t]] (a causal LM's logits at t - 1 predict token t; position 0 has
    no prediction, so a mask set there is ignored).
    logits [B, T, V], input_ids [B, T], response_mask [B, T] -> [B] (float32)"""
    token_logp = logprobs_from_logits(logits[:, :-1], input_ids[:, 1:])
    return masked_sum(token_logp, response_mask[:, 1:], dim=1)


def preference_logratio(logp_chosen: torch.Tensor, logp_rejected: torch.Tensor, ref_logp_chosen: torch.Tensor,
                        ref_logp_rejected: torch.Tensor) -> torch.Tensor:
    """h = (logp_c - ref_logp_c) - (logp_r - ref_logp_r): how much more the policy than its reference prefers the
    chosen answer. All [B] -> [B]"""
    return (logp_chosen - ref_logp_chosen) - (logp_rejected - ref_logp_rejected)


def sigmoid_loss(logratio: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO's loss per pair, -log sigmoid(beta h); with `label_smoothing` e (conservative DPO, the labels flipped
    with probability e) -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h). Numerically stable.
    logratio [B] -> [B]"""
    z = beta * logratio
    return -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def ipo_loss(logratio: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO's loss per pair (Azar et al. 2023), (h - 1 / (2 beta))^2: regresses the log-ratio onto a finite target
    instead of pushing it to infinity as the sigmoid loss does on separable pairs (beta is IPO's tau).
    logratio [B] -> [B]"""
    return (logratio - 1.0 / (2.0 * beta)) ** 2


def implicit_rewards(logp: torch.Tensor, ref_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """The policy's implicit reward of each answer, beta * (logp - ref_logp). [B], [B] -> [B]"""
    return beta * (logp - ref_logp)


def reward_accuracy(reward_chosen: torch.Tensor, reward_rejected: torch.Tensor) -> torch.Tensor:
    """Per pair 1 where the chosen answer's implicit reward is higher, 0 where lower, 0.5 on a tie: a policy equal
    to its reference (every reward 0) is at chance, 0.5, not at 0. [B], [B] -> [B] (float32)"""
    return ((reward_chosen > reward_rejected).float() + (reward_chosen == reward_rejected).float() * 0.5)


def reward_margin(reward_chosen: torch.Tensor, reward_rejected: torch.Tensor) -> torch.Tensor:
    """Implicit-reward margin per pair, r_chosen - r_rejected (= beta h). [B], [B] -> [B]"""
    return reward_chosen - reward_rejected
