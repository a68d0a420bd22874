"""Evaluation metric functions against values worked out by hand."""
import math

import pytest
import torch

from rlhf_tasks.evaluation import metrics
from rlhf_tasks.evaluation.stage import PolicyResult, select_rows, summarize


def test_win_rate_counts_ties_as_half():
    # wins: 1>0 yes, 2=2 tie, 3<4 no  -> (1 + 0.5 + 0) / 3
    assert metrics.win_rate([1, 2, 3], [0, 2, 4]) == pytest.approx(0.5)
    assert metrics.win_rate([5, 5], [1, 1]) == 1.0
    assert math.isnan(metrics.win_rate([], []))
    with pytest.raises(ValueError):
        metrics.win_rate([1], [1, 2])


def test_pairwise_accuracy_is_strict():
    assert metrics.pairwise_accuracy([1, 2, 3], [0, 3, 1]) == pytest.approx(2 / 3)
    assert metrics.pairwise_accuracy([1.0], [1.0]) == 0.0  # a tie is not a correct preference


def test_mean_std_population():
    m, s = metrics.mean_std([1, 2, 3, 4])
    assert m == 2.5 and s == pytest.approx(math.sqrt(1.25))
    assert metrics.mean_std([7]) == (7.0, 0.0)


def test_response_mask_cuts_after_first_eos_even_when_pad_is_eos():
    eos = 2
    ids = torch.tensor([[5, 2, 7, 2],   # EOS at 1: keep 5, EOS
                        [5, 6, 7, 8],   # no EOS: keep all
                        [5, 2, 2, 2],   # generate() padded with pad == EOS
                        [2, 9, 9, 9]])  # immediate EOS
    mask = metrics.response_mask(ids, eos)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]]
    assert metrics.ends_with_eos(ids, mask, eos).tolist() == [True, False, True, True]


def test_eos_rate():
    assert metrics.rate([True, False, True, True]) == 0.75
    assert math.isnan(metrics.rate([]))


def test_token_logprobs_with_temperature():
    # vocab 2, logits for position 0: [0, ln 3] -> p = [1/4, 3/4]; next token is 1
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0]]])
    ids = torch.tensor([[0, 1]])
    assert metrics.token_logprobs(logits, ids).item() == pytest.approx(math.log(0.75))
    # temperature 2 halves the logits: p1 = sqrt3 / (1 + sqrt3)
    r3 = math.sqrt(3.0)
    assert metrics.token_logprobs(logits, ids, 2.0).item() == pytest.approx(math.log(r3 / (1 + r3)))


def test_sequence_kl_sums_masked_log_ratio():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -0.5]])
    ref = torch.tensor([[-1.5, -1.0, -9.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    # row 0: (−1 + 1.5) + (−2 + 1) = −0.5 (the third token is masked); row 1: 3 × 0.5 = 1.5
    assert metrics.sequence_kl(logp, ref, mask).tolist() == pytest.approx([-0.5, 1.5])


def test_token_kl_exact_by_hand():
    # p = [1/4, 3/4] (logits [0, ln 3]); q = [1/2, 1/2]: KL = 1/4 ln(1/2) + 3/4 ln(3/2)
    p = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0]]])
    q = torch.zeros(1, 2, 2)
    want = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert metrics.token_kl(p, q).shape == (1, 1)
    assert metrics.token_kl(p, q).item() == pytest.approx(want)
    assert metrics.token_kl(p, p).item() == 0.0


def test_select_rows_is_seeded_and_sorted():
    a, b = select_rows(100, 10, 3), select_rows(100, 10, 3)
    assert a == b == sorted(a) and len(set(a)) == 10
    assert select_rows(100, 10, 4) != a
    assert select_rows(5, 10, 3) == [0, 1, 2, 3, 4]


def test_summarize_by_hand():
    sft = PolicyResult("sft", [[1, 2], [1, 2, 3, 4]], ["a", "b"], rm=[0.0, 1.0], gold=[1.0, None], eos=[True, False])
    ppo = PolicyResult("ppo", [[1, 2, 3], [1]], ["c", "d"], rm=[1.0, 1.0], gold=[0.5, None], eos=[True, True],
                       kl=[0.2, 0.4])
    s = summarize({"sft": sft, "ppo": ppo})
    assert s["rm_sft"] == 0.5 and s["rm_sft_std"] == 0.5
    assert s["rm_ppo"] == 1.0 and s["rm_ppo_std"] == 0.0
    assert s["win_rate_rm"] == pytest.approx(0.75)  # win on prompt 0, tie on prompt 1
    assert s["gold_sft"] == 1.0 and s["gold_ppo"] == 0.5  # only rows with a gold score count
    assert s["win_rate_gold"] == 0.0
    assert s["kl_ppo_ref"] == pytest.approx(0.3)
    assert s["len_sft"] == 3.0 and s["len_ppo"] == 2.0
    assert s["eos_rate_sft"] == 0.5 and s["eos_rate_ppo"] == 1.0
    assert "kl_sft_ref" not in s
    assert s["gold_gain"] == -0.5 and s["gold_gain_ci_low"] == s["gold_gain_ci_high"] == -0.5  # one gold pair
    assert s["gold_sign_p"] == 1.0  # one loss: p = 2 * 1/2
    assert s["distinct1_sft"] == 1.0 and "distinct2_sft" not in s  # one-word answers have no word pairs
    assert s["repetition_ppo"] == 0.0
    assert all(isinstance(v, float) for v in s.values())


def test_distinct_n_and_repetition_by_hand():
    assert metrics.ngrams(["a", "b", "c"], 2) == [("a", "b"), ("b", "c")]
    assert metrics.ngrams(["a"], 2) == []
    # words a b a b | a b: bigrams ab ba ab | ab -> 2 distinct of 4; words: 2 distinct of 6
    assert metrics.distinct_n(["a b a b", "A  b"], 2) == 0.5
    assert metrics.distinct_n(["a b a b", "a b"], 1) == pytest.approx(2 / 6)
    assert metrics.distinct_n(["the cat is warm", "a dog is calm"], 2) == 1.0
    assert math.isnan(metrics.distinct_n(["x", ""], 2))
    # "and and and": bigrams (and and) x2, one repeat of 2 -> 0.5; a plain sentence 0; mean 0.25
    assert metrics.repetition_rate(["and and and", "the cat is warm"]) == 0.25
    assert metrics.repetition_rate(["x"]) == 0.0 and math.isnan(metrics.repetition_rate([]))
    assert metrics.repetitive(0.25) and not metrics.repetitive(0.2) and not metrics.repetitive(math.nan)
    assert metrics.less_diverse(0.5, 0.7) and not metrics.less_diverse(0.6, 0.7)  # 0.8 x 0.7 = 0.56


def test_sign_test_exact_binomial_by_hand():
    # 8 wins, 2 losses, 1 tie (dropped): p = 2 * (C(10,0) + C(10,1) + C(10,2)) / 2^10 = 2 * 56 / 1024
    a, b = [1] * 8 + [0] * 2 + [3], [0] * 8 + [1] * 2 + [3]
    assert metrics.sign_test_p(a, b) == 0.109375
    assert metrics.sign_test_p(b, a) == 0.109375  # two-sided
    assert metrics.sign_test_p([1] * 6, [0] * 6) == 2 / 64
    assert metrics.sign_test_p([1] * 5 + [0] * 5, [0] * 5 + [1] * 5) == 1.0  # capped at 1
    assert metrics.sign_test_p([2, 2], [2, 2]) == 1.0 and math.isnan(metrics.sign_test_p([], []))
    with pytest.raises(ValueError):
        metrics.sign_test_p([1], [])


def test_paired_bootstrap_ci_by_hand():
    assert metrics.paired_bootstrap_ci([1.5] * 5, [1.0] * 5) == (0.5, 0.5, 0.5)  # no spread
    # differences 0 and 1: a resample's mean is 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4, so with 2000
    # resamples far more than the 50 outermost ones are 0 and 1: the 95% interval is [0, 1]
    assert metrics.paired_bootstrap_ci([0.0, 1.0], [0.0, 0.0]) == (0.5, 0.0, 1.0)
    # one resample: low and high are that resample's mean
    m, lo, hi = metrics.paired_bootstrap_ci([0.0, 1.0, 2.0], [0.0] * 3, resamples=1, seed=3)
    assert m == 1.0 and lo == hi and lo in {i / 3 for i in range(7)}
    # seeded and antisymmetric: swapping the sides draws the same resamples and negates every mean
    a, b = [0.3, 0.9, 0.1, 0.7, 0.8, 0.2], [0.1, 0.2, 0.4, 0.1, 0.5, 0.3]
    m, lo, hi = metrics.paired_bootstrap_ci(a, b, seed=5)
    assert metrics.paired_bootstrap_ci(a, b, seed=5) == (m, lo, hi)
    m2, lo2, hi2 = metrics.paired_bootstrap_ci(b, a, seed=5)
    assert (m2, lo2, hi2) == pytest.approx((-m, -hi, -lo))
    assert lo < m < hi and m == pytest.approx(1.4 / 6)  # differences .2 .7 -.3 .6 .3 -.1
    assert all(math.isnan(x) for x in metrics.paired_bootstrap_ci([], []))
