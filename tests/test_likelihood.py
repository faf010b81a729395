"""Conditional scoring: Monte-Carlo bounds against brute force, chain rule, CFG, one API for MDM and ARM."""

from __future__ import annotations

import itertools
import statistics

import pytest
import torch

from smdm.config import ModelConfig
from smdm.errors import SmdmError
from smdm.likelihood import (
    arm_score,
    chain_rule_score,
    guided_logits,
    is_greedy_continuation,
    mc_score,
    score,
)
from smdm.model import Transformer

VOCAB = 23


@pytest.fixture(scope="module")
def mdm() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_name("tiny-test", vocab_size=VOCAB)).eval()


@pytest.fixture(scope="module")
def arm() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_name("tiny-test", vocab_size=VOCAB), causal=True).eval()


PREFIX, TARGET = [3, 1, 4, 1, 5], [9, 2, 6]


@torch.no_grad()
def brute_force_count_bound(model: Transformer, prefix: list[int], target: list[int]) -> float:
    """E_k E_{|S|=k} [(L/k) Σ_{i in S} CE_i], k ~ U{1..L}, enumerating every mask set."""
    length, start = len(target), len(prefix)
    total = 0.0
    for k in range(1, length + 1):
        subsets = list(itertools.combinations(range(length), k))
        for subset in subsets:
            x = torch.tensor(prefix + target)
            for i in subset:
                x[start + i] = model.mask_id
            log_probs = model(x[None])[0].log_softmax(-1)
            ce = sum(-log_probs[start + i, target[i]].item() for i in subset)
            total += (length / k) * ce / len(subsets) / length
    return total


@pytest.mark.parametrize("low_discrepancy", [True, False])
def test_mc_mean_over_seeds_agrees_with_brute_force_expectation(mdm, low_discrepancy):
    exact = brute_force_count_bound(mdm, PREFIX, TARGET)
    estimates = [mc_score(mdm, PREFIX, TARGET, mc_samples=64, batch_size=64, seed=s,
                          low_discrepancy=low_discrepancy).nll for s in range(40)]
    # Stratified draws are not independent, so the standard error comes from independent repeats (seeds).
    stderr = statistics.stdev(estimates) / len(estimates) ** 0.5
    assert abs(statistics.mean(estimates) - exact) < 3 * stderr
    assert mc_score(mdm, PREFIX, TARGET, mc_samples=8).stderr > 0


def test_one_token_target_mc_equals_chain_rule_for_any_draw(mdm):
    chain = chain_rule_score(mdm, PREFIX, [7])
    for seed in range(3):
        mc = mc_score(mdm, PREFIX, [7], mc_samples=5, batch_size=2, seed=seed)  # 5 is not a multiple of 2
        assert mc.nll == pytest.approx(chain.nll, abs=1e-5) and mc.stderr == pytest.approx(0, abs=1e-6)


@torch.no_grad()
def test_chain_rule_is_the_left_to_right_factorisation(mdm):
    expected = 0.0
    for k in range(len(TARGET)):
        x = torch.tensor(PREFIX + TARGET[:k] + [mdm.mask_id] * (len(TARGET) - k))
        expected -= mdm(x[None])[0, len(PREFIX) + k].log_softmax(-1)[TARGET[k]].item()
    assert chain_rule_score(mdm, PREFIX, TARGET, batch_size=2).nll == pytest.approx(expected, abs=1e-4)


def test_exact_count_estimator_has_far_lower_variance_than_bernoulli_masks(mdm):
    # The reference estimator (Bernoulli masks at rate p(t), weight 1/p) has a heavy tail from small t;
    # masking exactly k ~ U{1..L} tokens with weight L/k removes it.
    def variance(estimator: str) -> float:
        return statistics.variance([mc_score(mdm, PREFIX, TARGET, mc_samples=16, batch_size=16, estimator=estimator,
                                             seed=s).nll for s in range(40)])

    assert variance("count") < 0.1 * variance("bernoulli")


def test_cfg_zero_equals_plain_scoring(mdm):
    x = torch.tensor([PREFIX + [mdm.mask_id] * 3])
    torch.testing.assert_close(guided_logits(mdm, x, len(PREFIX), 0.0), mdm(x))
    plain = mc_score(mdm, PREFIX, TARGET, mc_samples=8, seed=3)
    assert mc_score(mdm, PREFIX, TARGET, mc_samples=8, seed=3, cfg_scale=0.0).nll == pytest.approx(plain.nll)
    guided = mc_score(mdm, PREFIX, TARGET, mc_samples=8, seed=3, cfg_scale=2.0)
    assert guided.nll != pytest.approx(plain.nll) and guided.forward_passes == 2 * plain.forward_passes


@torch.no_grad()
def test_mdm_and_arm_scores_come_from_the_same_api(mdm, arm):
    via_api = score(arm, PREFIX, TARGET)
    tokens = torch.tensor(PREFIX + TARGET)
    log_probs = arm(tokens[None, :-1])[0].log_softmax(-1)
    expected = -sum(log_probs[len(PREFIX) - 1 + i, t].item() for i, t in enumerate(TARGET))
    assert via_api.nll == pytest.approx(expected, abs=1e-4) == arm_score(arm, PREFIX, TARGET).nll
    assert score(mdm, PREFIX, TARGET, method="chain").nll == chain_rule_score(mdm, PREFIX, TARGET).nll
    assert score(mdm, PREFIX, TARGET, method="mc", mc_samples=4, seed=0).nll == \
        mc_score(mdm, PREFIX, TARGET, mc_samples=4, seed=0).nll


@torch.no_grad()
def test_greedy_continuation_check(mdm, arm):
    x = list(PREFIX)
    for _ in range(3):
        x.append(int(arm(torch.tensor([x]))[0, -1].argmax()))
    assert is_greedy_continuation(arm, PREFIX, x[len(PREFIX):])
    assert not is_greedy_continuation(arm, PREFIX, [(t + 1) % VOCAB for t in x[len(PREFIX):]])
    one = int(mdm(torch.tensor([PREFIX + [mdm.mask_id]]))[0, -1].argmax())
    assert is_greedy_continuation(mdm, PREFIX, [one])
    assert not is_greedy_continuation(mdm, PREFIX, [(one + 1) % VOCAB])


@torch.no_grad()
def test_greedy_check_stops_at_the_first_wrong_reveal(mdm, arm):
    """Same verdict as comparing a full greedy decoding, for the greedy target and each one-token change of it;
    a target whose first revealed token is wrong costs one model pass, not one per token."""
    from smdm.sample import generate

    for model in (mdm, arm):
        full = generate(model, [PREFIX], 4, steps=None if model.causal else 4).completions[0]
        calls: list[int] = []
        hook = model.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        try:
            assert is_greedy_continuation(model, PREFIX, full)
            assert len(calls) == 4  # one pass per token
            for position in range(4):
                changed = list(full)
                changed[position] = (changed[position] + 1) % VOCAB
                calls.clear()
                assert not is_greedy_continuation(model, PREFIX, changed)
                assert len(calls) <= (4 if not model.causal else position + 1)
            wrong_everywhere = [(t + 1) % VOCAB for t in full]
            calls.clear()
            assert not is_greedy_continuation(model, PREFIX, wrong_everywhere)
            assert len(calls) == 1
        finally:
            hook.remove()


def test_bad_input(mdm, arm):
    with pytest.raises(SmdmError, match="empty"):
        mc_score(mdm, PREFIX, [])
    with pytest.raises(SmdmError, match="exceed the context length"):
        chain_rule_score(mdm, [1] * 120, [2] * 10)
    with pytest.raises(SmdmError, match="unknown likelihood method"):
        score(mdm, PREFIX, TARGET, method="exact")
    with pytest.raises(SmdmError, match="unknown estimator"):
        mc_score(mdm, PREFIX, TARGET, estimator="antithetic")
    with pytest.raises(SmdmError, match="guidance needs an MDM"):
        score(arm, PREFIX, TARGET, cfg_scale=1.0)
    with pytest.raises(SmdmError, match="non-empty prefix"):
        arm_score(arm, [], TARGET)
