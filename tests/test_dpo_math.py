"""DPO primitives against numbers worked out by hand (in the comments), not by re-running the same formula."""
import math

import pytest
import torch

from rlhf_tasks.training import dpo_math as dm

LN3 = math.log(3.0)


def test_sequence_logprobs_sums_the_response_tokens_only():
    # vocabulary of 2; logits [ln 3, 0] give probs (3/4, 1/4), logits [0, 0] give (1/2, 1/2)
    # row 0: ids [1, 0, 1], response = tokens 1 and 2:
    #   logits[0] predicts token 1 (id 0): log 3/4 = -0.287682; logits[1] predicts token 2 (id 1): log 1/2 = -0.693147
    #   sum = -0.980829
    # row 1: the same logits and ids, response = token 1 only (token 2 is padding): -0.287682
    logits = torch.tensor([[[LN3, 0.0], [0.0, 0.0], [5.0, -5.0]]] * 2)
    ids = torch.tensor([[1, 0, 1], [1, 0, 1]])
    mask = torch.tensor([[0, 1, 1], [0, 1, 0]])
    got = dm.sequence_logprobs(logits, ids, mask)
    assert got.shape == (2,)
    assert got.tolist() == pytest.approx([-0.980829, -0.287682], abs=1e-6)
    # position 0 has no prediction: a mask set there changes nothing
    assert dm.sequence_logprobs(logits, ids, torch.tensor([[1, 1, 1], [1, 1, 0]])).tolist() == pytest.approx(
        got.tolist())


def test_preference_logratio():
    # (logp_c - ref_c) - (logp_r - ref_r) = (-3 + 5) - (-4 + 3) = 2 - (-1) = 3
    h = dm.preference_logratio(torch.tensor([-3.0]), torch.tensor([-4.0]), torch.tensor([-5.0]), torch.tensor([-3.0]))
    assert h.tolist() == pytest.approx([3.0])


def test_sigmoid_loss_with_and_without_label_smoothing():
    # h = 2, beta = 0.5: z = 1; -log sigmoid(1) = log(1 + e^-1) = log 1.367879 = 0.313262
    # h = 0: -log sigmoid(0) = log 2 = 0.693147
    h = torch.tensor([2.0, 0.0])
    assert dm.sigmoid_loss(h, 0.5).tolist() == pytest.approx([0.313262, 0.693147], abs=1e-6)
    # smoothing 0.1: 0.9 * 0.313262 + 0.1 * (-log sigmoid(-1)); -log sigmoid(-1) = 1 + 0.313262 = 1.313262
    #   = 0.281936 + 0.131326 = 0.413262; at h = 0 both terms are log 2: 0.693147
    assert dm.sigmoid_loss(h, 0.5, 0.1).tolist() == pytest.approx([0.413262, 0.693147], abs=1e-6)


def test_sigmoid_loss_is_finite_far_out():
    # beta h = +1000: loss ~ e^-1000 = 0; beta h = -1000: loss ~ 1000 (no inf/nan from exp overflow)
    got = dm.sigmoid_loss(torch.tensor([1000.0, -1000.0]), 1.0)
    assert got.tolist() == pytest.approx([0.0, 1000.0], abs=1e-4)


def test_ipo_loss_regresses_onto_one_over_two_beta():
    # beta 0.5: target 1/(2 * 0.5) = 1; h = 2 -> (2 - 1)^2 = 1, h = 1 -> 0
    # beta 0.1: target 5; h = 0 -> 25, h = 7 -> 4
    assert dm.ipo_loss(torch.tensor([2.0, 1.0]), 0.5).tolist() == pytest.approx([1.0, 0.0])
    assert dm.ipo_loss(torch.tensor([0.0, 7.0]), 0.1).tolist() == pytest.approx([25.0, 4.0])


def test_implicit_rewards_accuracy_and_margin():
    # beta (logp - ref): 0.1 * (-3 + 5) = 0.2; 0.1 * (-4 + 3) = -0.1
    r = dm.implicit_rewards(torch.tensor([-3.0, -4.0]), torch.tensor([-5.0, -3.0]), 0.1)
    assert r.tolist() == pytest.approx([0.2, -0.1])
    chosen, rejected = torch.tensor([1.0, 0.0, -1.0]), torch.tensor([0.0, 0.0, 0.0])
    # higher: 1; tie (a policy equal to its reference): 0.5; lower: 0
    assert dm.reward_accuracy(chosen, rejected).tolist() == [1.0, 0.5, 0.0]
    assert dm.reward_margin(chosen, rejected).tolist() == [1.0, 0.0, -1.0]
