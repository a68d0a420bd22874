"""PPO primitives against values worked out by hand (see the comments for the arithmetic)."""
import math

import pytest
import torch

from rlhf_tasks.ppo import ppo_math as pm


def t(x):
    return torch.tensor(x, dtype=torch.float32)


def close(a, b, tol=1e-5):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32),
                               atol=tol, rtol=tol)


X = t([[1, 2, 3], [4, 5, 6]])
M = t([[1, 1, 0], [1, 0, 0]])  # selects 1, 2, 4


def test_masked_mean_var():
    close(pm.masked_mean(X, M), 7 / 3)
    close(pm.masked_mean(X, M, dim=1), [1.5, 4.0])
    # deviations -4/3, -1/3, 5/3 -> squares sum 42/9; /3 = 14/9 (biased), /2 = 7/3 (unbiased)
    close(pm.masked_var(X, M, unbiased=False), 14 / 9)
    close(pm.masked_var(X, M), 7 / 3)
    close(pm.masked_mean(X, torch.zeros_like(M)), 0.0)


def test_masked_whiten_does_not_add_mean_back():
    w = pm.masked_whiten(X, M)
    s = math.sqrt(7 / 3)
    close(w, [[(1 - 7 / 3) / s, (2 - 7 / 3) / s, 0], [(4 - 7 / 3) / s, 0, 0]])
    close(pm.masked_mean(w, M), 0.0)
    # two values 10, 12: mean 11, unbiased var 2 -> +-1/sqrt(2); a mean-preserving whiten would give 11 +- 0.707
    close(pm.masked_whiten(t([10, 12]), t([1, 1])), [-1 / math.sqrt(2), 1 / math.sqrt(2)])


def test_logprobs_temperature_and_entropy():
    logits = t([[[0.0, 0.0, math.log(2)]]])  # p = 1/4, 1/4, 1/2
    close(pm.logprobs_from_logits(logits, torch.tensor([[2]])), [[math.log(0.5)]])
    # T=2: exp(z) = 1, 1, sqrt(2); p(2) = sqrt2 / (2 + sqrt2), p(0) = 1 / (2 + sqrt2)
    z = 2 + math.sqrt(2)
    close(pm.logprobs_from_logits(logits, torch.tensor([[2]]), 2.0), [[math.log(math.sqrt(2) / z)]])
    close(pm.logprobs_from_logits(logits, torch.tensor([[0]]), 2.0), [[math.log(1 / z)]])
    close(pm.entropy_from_logits(logits), [[1.5 * math.log(2)]])  # -(2 * 1/4 ln 1/4 + 1/2 ln 1/2)
    close(pm.entropy_from_logits(t([[[0.0, 0.0]]])), [[math.log(2)]])


def test_response_mask_after_first_eos():
    r = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 0, 0, 0], [5, 2, 2, 2]])  # eos = 2; last row: pad == eos
    mask, has_eos = pm.response_mask_after_eos(r, 2)
    close(mask, [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]])
    assert has_eos.tolist() == [True, False, True, True]
    mask, has_eos = pm.response_mask_after_eos(r, [2, 8])
    assert mask[1].tolist() == [1, 1, 1, 1] and has_eos.tolist() == [True] * 4


def test_shape_scores_penalty_whiten_clip():
    scores, has_eos = t([1.0, 7.0, -2.0]), torch.tensor([True, False, True])
    close(pm.shape_scores(scores, has_eos, 1.0, whiten=False, clip=5.0), [1.0, 5.0, -2.0])  # 7-1=6 -> clip 5
    close(pm.shape_scores(scores, has_eos, None, whiten=False, clip=None), [1.0, 7.0, -2.0])
    # after penalty [1, 6, -2]: mean 5/3, unbiased var 147/9 -> std 4.04145; then clip 1
    std = math.sqrt(147 / 9)
    close(pm.shape_scores(scores, has_eos, 1.0, whiten=True, clip=1.0),
          [(1 - 5 / 3) / std, 1.0, (-2 - 5 / 3) / std])


def test_kl_penalty_rewards():
    lp = t([[-1, -2, -3], [-1, -1, -1]])
    ref = t([[-1.5, -1, -3], [-2, -1, -1]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    rewards, kl = pm.kl_penalty_rewards(lp, ref, t([2.0, -1.0]), mask, kl_coef=0.1)
    close(kl, [[0.5, -1, 0], [1, 0, 0]])
    # -0.1 * kl, score at the last response token (index 2 and 1)
    close(rewards, [[-0.05, 0.1, 2.0], [-0.1, -1.0, 0.0]])


def test_kl_controllers():
    fixed = pm.FixedKLController(0.1)
    fixed.update(100.0, 1000)
    assert fixed.value == 0.1
    c = pm.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    c.update(9.0, 1000)  # error 0.5 -> clipped 0.2; x (1 + 0.2 * 0.1)
    close(c.value, 0.102)
    c.update(3.0, 1000)  # error -0.5 -> -0.2; x 0.98
    close(c.value, 0.102 * 0.98)
    c.update(6.6, 500)  # error 0.1; x (1 + 0.1 * 0.05)
    close(c.value, 0.102 * 0.98 * 1.005)
    c2 = pm.AdaptiveKLController(0.5, 6.0, 10000)
    c2.load_state_dict(c.state_dict())
    assert c2.value == c.value


def test_gae_by_hand():
    # gamma 1, lambda 0.5: deltas 0.1, 0.1, 0.3; A2 = 0.3, A1 = 0.1 + 0.5*0.3, A0 = 0.1 + 0.5*0.25
    adv, ret = pm.gae(t([[0, 0, 1]]), t([[0.5, 0.6, 0.7]]), t([[1, 1, 1]]), gamma=1.0, lam=0.5)
    close(adv, [[0.225, 0.25, 0.3]])
    close(ret, [[0.725, 0.85, 1.0]])
    # padding after the last token must not leak in: value there is garbage (9) and its reward too (5)
    adv, ret = pm.gae(t([[0, 1, 5]]), t([[0.5, 0.6, 9.0]]), t([[1, 1, 0]]), gamma=0.9, lam=1.0)
    close(adv, [[0.4, 0.4, 0.0]])  # A1 = 1 - 0.6; A0 = 0.9*0.6 - 0.5 + 0.9*0.4
    close(ret, [[0.9, 1.0, 0.0]])  # = discounted return 0 + 0.9 * 1


def test_policy_loss_clip_and_gradient_sign():
    ratios = t([[1.5, 0.5, 1.0, 1.1]])
    logp = torch.log(ratios).requires_grad_(True)
    adv, mask = t([[1, 1, -1, -2]]), t([[1, 1, 1, 0]])
    out = pm.policy_loss(logp, torch.zeros_like(logp), adv, mask, cliprange=0.2)
    # token0: max(-1.5, -1.2) = -1.2 (clipped); token1: max(-0.5, -0.8) = -0.5; token2: 1.0; token3 masked
    close(out.loss, (-1.2 - 0.5 + 1.0) / 3)
    close(out.clipfrac, 1 / 3)
    k3 = [0.5 - math.log(1.5), -0.5 + math.log(2), 0.0]
    close(out.approx_kl, sum(k3) / 3)
    out.loss.backward()
    # d/dlogp of -A*rho/3 = -A*rho/3 where unclipped; 0 where clipped or masked
    close(logp.grad, [[0.0, -0.5 / 3, 1.0 / 3, 0.0]])


def test_value_loss_clip():
    loss, clipfrac = pm.value_loss(t([[1.0, 0.0, 0.5]]), t([[0.5, 0.5, 0.5]]), t([[2.0, 0.0, 0.0]]),
                                   t([[1, 1, 1]]), cliprange_value=0.2, vf_coef=0.1)
    # errors (1, 1.69*), (0, 0.09*), (0.25, 0.25) -> mean of max = 2.03/3; x 0.5 x 0.1
    close(loss, 0.1 * 0.5 * 2.03 / 3)
    close(clipfrac, 2 / 3)


def test_explained_variance():
    # Var[G] = 2/3, Var[G - V] = Var[0, 0, 1] = 2/9 -> 1 - 1/3
    close(pm.explained_variance(t([[1, 2, 2, 7]]), t([[1, 2, 3, 0]]), t([[1, 1, 1, 0]])), 2 / 3)
    assert math.isnan(pm.explained_variance(t([[1.0, 2.0]]), t([[1.0, 1.0]]), t([[1, 1]])))


def test_lm_loss_and_ema():
    logits = t([[[0.0, 0.0], [math.log(3), 0.0], [5.0, 5.0]]])
    loss = pm.lm_loss(logits, torch.tensor([[0, 1, 0]]), t([[0, 1, 1]]))
    close(loss, (math.log(2) - math.log(0.75)) / 2)  # -log 1/2 for label 1 at t=1, -log 3/4 for label 0 at t=2
    e, p = [t([1.0])], [t([3.0])]
    pm.ema_update(e, p, 0.75)
    close(e[0], [1.5])


@pytest.mark.parametrize("flip", [False, True])
def test_policy_gradient_moves_toward_advantage(flip):
    """One gradient step on a 2-armed bandit raises the log-prob of the arm with positive advantage."""
    logits = torch.zeros(1, 1, 2, requires_grad=True)
    action = torch.tensor([[0]])
    old = pm.logprobs_from_logits(logits, action).detach()
    adv = t([[-1.0 if flip else 1.0]])
    pm.policy_loss(pm.logprobs_from_logits(logits, action), old, adv, t([[1]]), 0.2).loss.backward()
    with torch.no_grad():
        new = pm.logprobs_from_logits(logits - 0.5 * logits.grad, action)
    assert (new > old).item() != flip
