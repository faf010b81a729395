"""The MDM objective's mathematical facts and the ARM loss."""

from __future__ import annotations

import math

import torch

from smdm.diffusion import (
    MASK_EPS,
    arm_loss,
    forward_process,
    mask_probability,
    masked_weighted_ce,
    random_length,
    sample_times,
)


def mdm_loss(logits, targets, masked, mask_prob):
    """The MDM loss from full logits: sum over masked positions of CE / p(t), over batch x length."""
    return masked_weighted_ce(logits[masked], targets, masked, mask_prob) / targets.numel()

VOCAB = 50


def test_uniform_logits_give_log_v_in_expectation():
    # With uniform predictions each masked term is log V / p; E[#masked] = p·L, so E[loss] = log V exactly.
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (4096, 64), generator=generator)
    mask_prob = mask_probability(sample_times(tokens.size(0), generator, low_discrepancy=True))
    _, masked = forward_process(tokens, mask_prob, VOCAB, generator)
    loss = mdm_loss(torch.zeros(*tokens.shape, VOCAB), tokens, masked, mask_prob)
    assert abs(loss.item() - math.log(VOCAB)) < 0.03 * math.log(VOCAB)


def test_loss_terms_only_at_masked_positions():
    tokens = torch.randint(0, VOCAB, (3, 20))
    mask_prob = torch.tensor([0.3, 0.5, 0.9])
    noisy, masked = forward_process(tokens, mask_prob, VOCAB, torch.Generator().manual_seed(1))
    assert torch.equal(noisy == VOCAB, masked)
    assert torch.equal(noisy[~masked], tokens[~masked])
    logits = torch.randn(3, 20, VOCAB, requires_grad=True)
    mdm_loss(logits, tokens, masked, mask_prob).backward()
    grad_per_position = logits.grad.abs().sum(-1)
    assert torch.all(grad_per_position[~masked] == 0)
    assert torch.all(grad_per_position[masked] > 0)


def test_unmasked_sequence_has_zero_loss():
    tokens = torch.randint(0, VOCAB, (2, 10))
    masked = torch.zeros(2, 10, dtype=torch.bool)
    assert mdm_loss(torch.randn(2, 10, VOCAB), tokens, masked, torch.tensor([0.5, 0.5])).item() == 0.0


def test_loss_weights_are_inverse_mask_probability_over_batch_times_length():
    tokens = torch.tensor([[1, 2, 3, 4]])
    masked = torch.tensor([[True, False, True, False]])
    logits = torch.randn(1, 4, VOCAB)
    ce = torch.nn.functional.cross_entropy(logits[0], tokens[0], reduction="none")
    expected = (ce[0] + ce[2]) / 0.25 / 4
    assert torch.isclose(mdm_loss(logits, tokens, masked, torch.tensor([0.25])), expected)


def test_mask_probability_range_and_empirical_rate():
    t = torch.tensor([0.0, 0.5, 1.0])
    torch.testing.assert_close(mask_probability(t), torch.tensor([MASK_EPS, 0.5 * (1 - MASK_EPS) + MASK_EPS, 1.0]))
    tokens = torch.zeros(1, 200_000, dtype=torch.long)
    _, masked = forward_process(tokens, torch.tensor([0.3]), VOCAB, torch.Generator().manual_seed(0))
    assert abs(masked.float().mean().item() - 0.3) < 0.005


def test_low_discrepancy_times_cover_every_stratum():
    t = sample_times(8, torch.Generator().manual_seed(3), low_discrepancy=True)
    assert sorted((t * 8).floor().long().tolist()) == list(range(8))
    assert torch.all((t >= 0) & (t < 1))


def test_maskable_restricts_masking():
    tokens = torch.randint(0, VOCAB, (2, 10))
    maskable = torch.zeros(2, 10, dtype=torch.bool)
    maskable[:, 5:] = True
    _, masked = forward_process(tokens, torch.tensor([1.0, 1.0]), VOCAB, maskable=maskable)
    assert torch.equal(masked, maskable)


def test_arm_loss_is_mean_next_token_cross_entropy():
    logits = torch.zeros(2, 5, VOCAB)
    targets = torch.randint(0, VOCAB, (2, 5))
    assert math.isclose(arm_loss(logits, targets).item(), math.log(VOCAB), rel_tol=1e-6)


def test_random_length_cuts_a_fraction_of_batches():
    generator = torch.Generator().manual_seed(0)
    tokens = torch.zeros(2, 32, dtype=torch.long)
    lengths = [random_length(tokens, 0.25, generator).size(1) for _ in range(2000)]
    cut = [n for n in lengths if n < 32]
    assert 0.2 < len(cut) / 2000 < 0.3  # (a cut to exactly 32 is possible but rare)
    assert min(lengths) >= 1 and max(lengths) == 32
    assert all(random_length(tokens, 1.0, generator, min_length=2).size(1) >= 2 for _ in range(200))
    assert random_length(tokens, 0.0, generator).size(1) == 32


def test_selective_head_gives_the_same_loss_and_gradients_as_full_logits():
    from smdm.config import ModelConfig
    from smdm.diffusion import mdm_step_loss
    from smdm.model import Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny-test", vocab_size=VOCAB))
    tokens = torch.randint(0, VOCAB, (4, 24))
    fast = mdm_step_loss(model, tokens, torch.Generator().manual_seed(7))
    fast.backward()
    fast_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    generator = torch.Generator().manual_seed(7)  # replay the same t and masks through the full-logits path
    mask_prob = mask_probability(sample_times(4, generator))
    noisy, masked = forward_process(tokens, mask_prob, VOCAB, generator)
    full = mdm_loss(model(noisy), tokens, masked, mask_prob)
    full.backward()
    torch.testing.assert_close(fast, full)
    for a, p in zip(fast_grads, model.parameters()):
        torch.testing.assert_close(a, p.grad, atol=1e-6, rtol=1e-5)
