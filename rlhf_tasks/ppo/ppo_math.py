"""PPO-for-RLHF math as small pure functions.

Shapes: B = batch, T = response length (tokens after the prompt, right padded), V = vocabulary.
`mask` is always the response mask [B, T] (1 for real response tokens up to and including the first EOS, 0 after),
as float or bool. Nothing here reads token ids to find padding.

Every coefficient is an argument; the trainer takes them from `PPOConfig`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..models import last_token_index as last_index  # index of the last set entry per row [B, T] -> [B]


# ---- masked statistics ---------------------------------------------------------------------------------------
def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of `x` where `mask` is set. x, mask [..] -> scalar (dim None) or reduced over `dim`."""
    m = mask.to(x.dtype)
    return (x * m).sum() if dim is None else (x * m).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over the masked entries (0 where nothing is masked in). x, mask [..] -> scalar or reduced."""
    m = mask.to(x.dtype)
    if dim is None:
        return (x * m).sum() / m.sum().clamp(min=1.0)
    return (x * m).sum(dim) / m.sum(dim).clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked entries of `x` (over all of them). With `unbiased`, Bessel's correction n/(n-1).
    x, mask [..] -> scalar"""
    m = mask.to(x.dtype)
    n = m.sum()
    mean = (x * m).sum() / n.clamp(min=1.0)
    var = (((x - mean) ** 2) * m).sum() / n.clamp(min=1.0)
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) with mean/var over the masked entries; the mean is NOT added back, so the
    result has mean 0 and std ~1 over the mask. Entries outside the mask are set to 0. x, mask [..] -> [..]

    (Whitening that adds the mean back only rescales; for rewards it leaves the reward offset in place, which is
    what torchtune's `whiten(shift_mean=True)` does by mistake.)"""
    m = mask.to(x.dtype)
    mean = masked_mean(x, m)
    var = masked_var(x, m, unbiased=True)
    return (x - mean) * torch.rsqrt(var + eps) * m


# ---- log-probs, entropy ----------------------------------------------------------------------------------------
def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probability of each token under softmax(logits / temperature), the distribution it was sampled from.
    logits [B, T, V] (already aligned: logits[:, t] predicts tokens[:, t]), tokens [B, T] -> [B, T] (float32)"""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) at every position: logsumexp(z) - sum softmax(z) z.
    logits [B, T, V] -> [B, T] (float32)"""
    z = logits.float() / temperature
    p = F.softmax(z, dim=-1)
    return torch.logsumexp(z, dim=-1) - (p * z).sum(-1)


# ---- responses ---------------------------------------------------------------------------------------------------
def response_mask_after_eos(responses: torch.Tensor, eos_token_id: int | list[int],
                            gen_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncate after the first EOS: mask[b, t] = 1 for t <= index of the first EOS (EOS kept), 0 after it.
    `gen_mask` (optional [B, T]) marks positions the generator actually produced. Works when pad == EOS: the first
    EOS is the real one. responses [B, T] -> (mask [B, T] float, has_eos [B] bool)"""
    eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    is_eos = torch.zeros_like(responses, dtype=torch.bool)
    for e in eos_ids:
        is_eos |= responses == e
    if gen_mask is not None:
        is_eos &= gen_mask.bool()
    # number of EOS strictly before t; a token is kept while none came before it
    before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    mask = before == 0
    if gen_mask is not None:
        mask &= gen_mask.bool()
    return mask.float(), is_eos.any(dim=1)


# ---- rewards ---------------------------------------------------------------------------------------------------
def shape_scores(scores: torch.Tensor, has_eos: torch.Tensor, missing_eos_penalty: float | None,
                 whiten: bool, clip: float | None) -> torch.Tensor:
    """Reward-model scores -> the scalar reward added at the last response token, in this order:
    subtract `missing_eos_penalty` from answers without EOS; whiten over the batch (optional, mean not added back);
    clip to [-clip, clip]. scores [B], has_eos [B] -> [B]"""
    s = scores.float()
    if missing_eos_penalty is not None:
        s = s - missing_eos_penalty * (~has_eos.bool()).float()
    if whiten and s.numel() > 1:
        s = masked_whiten(s, torch.ones_like(s))
    if clip is not None:
        s = s.clamp(-clip, clip)
    return s


def kl_penalty_rewards(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, scores: torch.Tensor,
                       mask: torch.Tensor, kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token reward: r_t = -kl_coef * (logp_t - logp_ref_t) (the k1 estimator of KL) on response tokens, plus
    the (already shaped) sequence score at the last response token.
    logprobs, ref_logprobs, mask [B, T], scores [B] -> (rewards [B, T], kl [B, T]), both 0 outside the mask."""
    m = mask.to(logprobs.dtype)
    kl = (logprobs - ref_logprobs) * m
    rewards = -kl_coef * kl
    last = last_index(m)
    has_any = m.sum(1) > 0
    add = torch.zeros_like(rewards)
    add[torch.arange(rewards.shape[0], device=rewards.device), last] = scores.to(rewards.dtype) * has_any.to(
        rewards.dtype)
    return rewards + add, kl


# ---- KL controllers -------------------------------------------------------------------------------------------
class FixedKLController:
    """beta stays at its initial value."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:  # noqa: ARG002 - same interface as adaptive
        return None

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Ziegler et al. (2019): beta <- beta * (1 + e * n_steps / horizon), e = clip(KL / target - 1, -0.2, 0.2).
    `current_kl` is the mean per-sequence KL (sum over tokens), `n_steps` the samples seen since the last update."""

    def __init__(self, kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = float(kl_coef), float(target), int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


# ---- advantages ------------------------------------------------------------------------------------------------
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over right-padded responses; the value after the last real token is 0.
    delta_t = r_t + gamma * m_{t+1} V_{t+1} - V_t;  A_t = delta_t + gamma * lam * m_{t+1} A_{t+1};  G_t = A_t + V_t.
    rewards, values, mask [B, T] -> (advantages [B, T], returns [B, T]), 0 outside the mask."""
    m = mask.to(values.dtype)
    T = rewards.shape[1]
    adv = torch.zeros_like(values)
    next_adv = torch.zeros_like(values[:, 0])
    next_val = torch.zeros_like(values[:, 0])
    next_m = torch.zeros_like(values[:, 0])
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_m * next_val - values[:, t]
        a = delta + gamma * lam * next_m * next_adv
        adv[:, t] = a
        next_adv, next_val, next_m = a, values[:, t], m[:, t]
    adv = adv * m
    returns = (adv + values) * m
    return adv, returns


# ---- critic-free (group) baselines -----------------------------------------------------------------------------
# B rows hold G consecutive samples of each prompt (the trainer repeats every prompt G times in the generation
# batch), so a prompt's group is a row of scores.view(-1, G). The sequence advantage these return goes in where a
# sequence score goes in PPO (at the last response token, via `kl_penalty_rewards`); `gae` with values 0 and
# lam 1 then spreads it over the tokens as returns-to-go.
def _groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    if group_size < 2 or scores.numel() % group_size:
        raise ValueError(f"{scores.numel()} scores do not split into groups of {group_size} (>= 2) samples")
    return scores.float().reshape(-1, group_size)


def group_advantages(scores: torch.Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-6
                     ) -> torch.Tensor:
    """GRPO: A_i = (r_i - mean_g) / (std_g + eps) over the `group_size` samples of the same prompt, the std with
    Bessel's correction (n - 1); `scale_by_std=False` keeps only the centring (r_i - mean_g: Dr. GRPO, no bias
    toward groups whose answers all score alike). A group whose scores are all equal gets 0. scores [B] -> [B]"""
    g = _groups(scores, group_size)
    centred = g - g.mean(1, keepdim=True)
    if scale_by_std:
        centred = centred / (g.std(1, keepdim=True) + eps)
    return centred.reshape(-1)


def leave_one_out_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO: A_i = r_i - mean_{j != i} r_j, the baseline of each sample the mean of the other samples of its
    prompt (equal to n / (n - 1) * (r_i - mean_g)). scores [B] -> [B]"""
    g = _groups(scores, group_size)
    baseline = (g.sum(1, keepdim=True) - g) / (group_size - 1)
    return (g - baseline).reshape(-1)


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref) on tokens sampled from pi: exp(d) - d - 1 with
    d = logp_ref - logp. Unbiased, >= 0 for every token (k1 = -d can be negative), differentiable in logp: the
    KL term of GRPO's loss. logprobs, ref_logprobs, mask [B, T] -> [B, T], 0 outside the mask."""
    d = (ref_logprobs - logprobs) * mask.to(logprobs.dtype)
    return (torch.exp(d) - d - 1.0) * mask.to(logprobs.dtype)


# ---- losses ----------------------------------------------------------------------------------------------------
@dataclass
class PolicyLossOut:
    loss: torch.Tensor
    clipfrac: torch.Tensor
    approx_kl: torch.Tensor
    ratio_mean: torch.Tensor


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, cliprange: float) -> PolicyLossOut:
    """Clipped surrogate: masked mean of max(-A rho, -A clip(rho, 1-eps, 1+eps)), rho = exp(logp - logp_old).
    clipfrac: share of tokens where the clipped term is the larger (gradient cut); approx_kl: masked mean of
    (rho - 1) - log rho (k3, >= 0). all inputs [B, T] -> scalars."""
    log_ratio = (logprobs - old_logprobs) * mask.to(logprobs.dtype)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean((ratio - 1.0) - log_ratio, mask)
        ratio_mean = masked_mean(ratio, mask)
    return PolicyLossOut(loss, clipfrac, approx_kl, ratio_mean)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float, vf_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss: vf_coef * 0.5 * masked mean of max((V - G)^2, (clip(V, V_old +- eps) - G)^2).
    all inputs [B, T] -> (loss scalar, clipfrac scalar: share of tokens where the clipped error is the larger)."""
    v_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    err = (values - returns) ** 2
    err_clipped = (v_clipped - returns) ** 2
    loss = vf_coef * 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((err_clipped > err).float(), mask)
    return loss, clipfrac


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var[G - V] / Var[G] over the masked entries (1: perfect critic, 0: no better than a constant, <0 worse).
    values, returns, mask [B, T] -> float (nan when the returns have no variance)."""
    var_g = masked_var(returns, mask, unbiased=False)
    if float(var_g) <= 0:
        return float("nan")
    return float(1.0 - masked_var(returns - values, mask, unbiased=False) / var_g)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy (the ptx / pretraining loss), aligned inside: logits[:, t] predicts labels[:, t+1].
    logits [B, L, V], labels [B, L], mask [B, L] (1 on tokens that count as targets) -> scalar."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, labels[:, 1:].long().unsqueeze(-1)).squeeze(-1)
    return masked_mean(nll, mask[:, 1:])


def ema_update(ema_params, params, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * param, in place, for matching iterables of tensors."""
    with torch.no_grad():
        for e, p in zip(ema_params, params):
            e.mul_(decay).add_(p.detach().to(e.dtype), alpha=1.0 - decay)


__all__ = [n for n in dir() if not n.startswith("_") and n not in ("annotations", "math", "torch", "F", "dataclass")]
