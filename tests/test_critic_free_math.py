"""Critic-free RL primitives (GRPO, RLOO, the k3 KL) against values worked out by hand."""
import math

import pytest
import torch

from rlhf_tasks.ppo import ppo_math as pm


def t(x):
    return torch.tensor(x, dtype=torch.float32)


def close(a, b, tol=1e-5):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32),
                               atol=tol, rtol=tol)


# two prompts, three samples each: group A scores 1, 2, 6 (mean 3), group B 0, 0, 0
SCORES = t([1.0, 2.0, 6.0, 0.0, 0.0, 0.0])


def test_grpo_group_normalised_advantages():
    # group A: deviations -2, -1, 3; unbiased var (4 + 1 + 9) / 2 = 7 -> std sqrt(7)
    s = math.sqrt(7)
    close(pm.group_advantages(SCORES, 3, eps=0.0 + 1e-12), [-2 / s, -1 / s, 3 / s, 0, 0, 0])
    # eps keeps the all-equal group at 0 (0 / (0 + eps)) instead of NaN
    close(pm.group_advantages(SCORES, 3, eps=1e-6), [-2 / (s + 1e-6), -1 / (s + 1e-6), 3 / (s + 1e-6), 0, 0, 0])
    # without the std: centring only (Dr. GRPO)
    close(pm.group_advantages(SCORES, 3, scale_by_std=False), [-2, -1, 3, 0, 0, 0])
    # groups are consecutive rows: grouping by 2 gives (1, 2), (6, 0), (0, 0): std of (1, 2) is 1/sqrt(2)
    close(pm.group_advantages(SCORES, 2), [-0.5 / (2 ** -0.5 + 1e-6), 0.5 / (2 ** -0.5 + 1e-6),
                                           3 / (18 ** 0.5 + 1e-6), -3 / (18 ** 0.5 + 1e-6), 0, 0])


def test_rloo_leave_one_out_baseline():
    # group A: baselines mean(2, 6) = 4, mean(1, 6) = 3.5, mean(1, 2) = 1.5
    close(pm.leave_one_out_advantages(SCORES, 3), [1 - 4, 2 - 3.5, 6 - 1.5, 0, 0, 0])
    # = n / (n - 1) * (r - mean): 1.5 * (-2, -1, 3)
    close(pm.leave_one_out_advantages(SCORES, 3)[:3], [-3.0, -1.5, 4.5])
    # two samples: each one's baseline is the other
    close(pm.leave_one_out_advantages(t([5.0, 1.0]), 2), [4.0, -4.0])


def test_groups_must_divide_the_batch():
    with pytest.raises(ValueError, match="groups of 4"):
        pm.group_advantages(SCORES, 4)
    with pytest.raises(ValueError, match="groups of 1"):
        pm.leave_one_out_advantages(SCORES, 1)


def test_k3_kl_by_hand():
    lp = t([[-1.0, -2.0, -0.5], [-1.0, -1.0, -1.0]])
    ref = t([[-1.0, -1.0, -1.5], [-3.0, -1.0, 9.0]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    k3 = pm.kl_k3(lp, ref, mask)
    # d = ref - lp: 0 -> 0; +1 -> e - 2; -1 -> 1/e; -2 -> e^-2 + 1; masked (d = 10) -> 0
    close(k3, [[0.0, math.e - 2, 1 / math.e], [math.exp(-2) + 1, 0.0, 0.0]])
    assert (k3 >= 0).all()
    # its gradient in logp: 1 - exp(ref - logp), which pushes logp toward ref
    lp2 = lp.clone().requires_grad_(True)
    pm.kl_k3(lp2, ref, mask).sum().backward()
    close(lp2.grad, (1 - torch.exp(ref - lp)) * mask)


def test_k3_mean_estimates_the_true_kl():
    """Sampled from p, the mean k3 of log p(x) - log q(x) approaches KL(p || q) (k3 is unbiased)."""
    p, q = t([0.7, 0.2, 0.1]), t([0.4, 0.4, 0.2])
    exact = float((p * (p / q).log()).sum())
    x = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    est = pm.kl_k3(p.log()[x][None], q.log()[x][None], torch.ones(1, len(x))).mean()
    assert float(est) == pytest.approx(exact, rel=0.02)


def test_sequence_advantage_spreads_over_tokens_with_kl_in_the_reward():
    """What the critic-free trainer does with a sequence advantage A: put it at the last token with the k1 KL
    penalty on every token (`kl_penalty_rewards`), then returns-to-go (`gae` with values 0 and lambda 1)."""
    lp, ref = t([[-1.0, -2.0, -1.0]]), t([[-1.5, -1.0, -1.0]])
    mask = t([[1, 1, 0]])
    rewards, _ = pm.kl_penalty_rewards(lp, ref, t([2.0]), mask, kl_coef=0.1)  # kl 0.5, -1 -> r -0.05, 0.1 + 2
    adv, _ = pm.gae(rewards, torch.zeros_like(rewards), mask, gamma=1.0, lam=1.0)
    close(adv, [[-0.05 + 2.1, 2.1, 0.0]])
    # with the KL in the loss instead (coefficient 0 in the reward): A on every response token
    rewards, _ = pm.kl_penalty_rewards(lp, ref, t([2.0]), mask, kl_coef=0.0)
    close(pm.gae(rewards, torch.zeros_like(rewards), mask, gamma=1.0, lam=1.0)[0], [[2.0, 2.0, 0.0]])
