"""Estimators checked against exact expectations: the Bernoulli ELBO, the training loss's row weights, temperature."""

from __future__ import annotations

import itertools
import math
import statistics

import pytest
import torch

from smdm.config import ModelConfig
from smdm.diffusion import MASK_EPS, mask_probability, mdm_step_loss, sample_times
from smdm.likelihood import sequence_nll
from smdm.model import Transformer
from smdm.sample import sample_tokens

VOCAB = 11


@pytest.fixture(scope="module")
def mdm() -> Transformer:
    torch.manual_seed(3)
    return Transformer(ModelConfig.from_name("tiny-test", vocab_size=VOCAB)).eval()


def bernoulli_mask_weight(k: int, length: int, eps: float = MASK_EPS) -> float:
    """E_t[p^(k-1) (1-p)^(L-k)] for t ~ U[0, 1), p = (1-eps)t + eps: the chance of one mask set of size k times the
    estimator's 1/p weight, integrated exactly (binomial expansion of (1-p)^(L-k), termwise over p in [eps, 1])."""
    total = sum((-1) ** j * math.comb(length - k, j) * (1 - eps ** (k + j)) / (k + j) for j in range(length - k + 1))
    return total / (1 - eps)


@torch.no_grad()
def brute_force_bernoulli_bound(model: Transformer, tokens: list[int]) -> float:
    """E_t E_{M ~ Bernoulli(p(t))^L} [(1/p) sum_{i in M} CE_i(M)], enumerating all 2^L mask sets."""
    length, total = len(tokens), 0.0
    for k in range(1, length + 1):
        for subset in itertools.combinations(range(length), k):
            x = torch.tensor(tokens)
            x[list(subset)] = model.mask_id
            log_probs = model(x[None])[0].double().log_softmax(-1)
            total += bernoulli_mask_weight(k, length) * sum(-log_probs[i, tokens[i]].item() for i in subset)
    return total


def test_weights_integrate_to_the_mask_rate():
    # Sanity of the closed form: sum_k C(L,k) k w(k) = E_t[sum_k C(L,k) k p^(k-1) (1-p)^(L-k)] = E_t[L] = L
    # (the expected number of masked tokens, each weighted 1/p).
    for length in (1, 3, 5):
        assert sum(math.comb(length, k) * k * bernoulli_mask_weight(k, length)
                   for k in range(1, length + 1)) == pytest.approx(length, rel=1e-12)


def test_sequence_nll_agrees_with_the_brute_force_bernoulli_expectation(mdm):
    tokens = [4, 9, 1, 7]
    exact = brute_force_bernoulli_bound(mdm, tokens)
    estimates = [sequence_nll(mdm, torch.tensor(tokens), mc_samples=128, seed=s)[0] for s in range(40)]
    # Stratified draws are not independent, so the standard error comes from independent repeats (seeds).
    stderr = statistics.stdev(estimates) / math.sqrt(len(estimates))
    assert abs(statistics.mean(estimates) - exact) < 4 * stderr
    # The check can tell the right weight from the wrong ones: 2/p doubles the bound, no weight roughly halves it.
    assert 4 * stderr < 0.2 * exact


class FixedLogits(torch.nn.Module):
    """A denoiser whose logits depend only on the position: CE of every token is known by hand. Records its input."""

    def __init__(self, length: int, vocab: int, mask_id: int) -> None:
        super().__init__()
        self.mask_id = mask_id
        self.table = torch.nn.Parameter(torch.randn(length, vocab, generator=torch.Generator().manual_seed(1)) * 2)
        self.seen: list[torch.Tensor] = []

    def forward(self, idx: torch.Tensor, select: torch.Tensor | None = None) -> torch.Tensor:
        self.seen.append(idx.clone())
        logits = self.table[None].expand(idx.size(0), -1, -1)
        return logits[select] if select is not None else logits


def test_training_loss_weights_each_row_by_its_own_mask_rate():
    batch, length, vocab = 6, 16, 13
    tokens = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(2))
    model = FixedLogits(length, vocab, mask_id=vocab)
    seed = 7
    loss = mdm_step_loss(model, tokens, torch.Generator().manual_seed(seed), low_discrepancy=True).item()
    # t is the generator's first draw (one stratum per row); which tokens were masked, the model saw.
    p = mask_probability(sample_times(batch, torch.Generator().manual_seed(seed), low_discrepancy=True)).tolist()
    assert max(p) - min(p) > 0.5  # rows with very different t, so a shared weight would change the sum
    masked = model.seen[0] == model.mask_id
    ce = -torch.log_softmax(model.table.detach().double(), -1)  # (length, vocab)
    expected = sum(ce[i, tokens[r, i]].item() / p[r] for r in range(batch) for i in range(length) if masked[r, i])
    assert masked.sum() > batch
    assert loss == pytest.approx(expected / (batch * length), rel=1e-5)
    mean_weight = sum(ce[i, tokens[r, i]].item() for r in range(batch) for i in range(length) if masked[r, i]) / (
        statistics.mean(p) * batch * length)
    assert loss != pytest.approx(mean_weight, rel=1e-3)  # the wrong weighting is told apart


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_sampled_token_frequencies_follow_softmax_of_logits_over_temperature(temperature):
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5])
    draws = 40_000
    tokens = sample_tokens(logits.expand(draws, -1), temperature, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens, minlength=logits.numel()).double() / draws
    expected = torch.softmax(logits.double() / temperature, -1)
    sigma = (expected * (1 - expected) / draws).sqrt()
    assert ((freq - expected).abs() < 5 * sigma).all(), (freq, expected)
    wrong = torch.softmax(logits.double() * temperature, -1)  # the bug this guards against is far outside 5 sigma
    assert ((wrong - expected).abs() > 10 * sigma).any()
