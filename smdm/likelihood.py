"""Log-likelihood of text under an MDM (Monte-Carlo ELBO) or an ARM (exact chain rule), through one API."""

from __future__ import annotations

import math

import torch

from smdm.diffusion import arm_loss, forward_process, mask_probability, mdm_loss, sample_times
from smdm.errors import SmdmError
from smdm.model import Transformer


@torch.no_grad()
def mdm_nll(model: Transformer, tokens: torch.Tensor, mc_samples: int = 64, batch_size: int = 16,
            seed: int = 0) -> tuple[float, float]:
    """Upper bound on the NLL (nats, whole sequence) by Monte Carlo over t and masks; returns (estimate, std. error).

    Times are low-discrepancy within each batch of draws, which lowers the variance of the mean.
    """
    if tokens.dim() != 1 or tokens.numel() == 0:
        raise SmdmError("likelihood needs a non-empty 1-D sequence of token ids")
    if mc_samples < 2:
        raise SmdmError("mc_samples must be at least 2 to estimate a standard error")
    device = model.lm_head.weight.device
    generator = torch.Generator().manual_seed(seed)
    draws: list[float] = []
    remaining = mc_samples
    while remaining > 0:
        n = min(batch_size, remaining)
        batch = tokens.to(device)[None].repeat(n, 1)
        mask_prob = mask_probability(sample_times(n, generator, low_discrepancy=True))
        noisy, masked = forward_process(batch, mask_prob, model.mask_id, generator)
        logits = model(noisy)
        for row in range(n):
            draws.append(mdm_loss(logits[row:row + 1], batch[row:row + 1], masked[row:row + 1],
                                  mask_prob[row:row + 1], normalizer=1.0).item())
        remaining -= n
    mean = sum(draws) / len(draws)
    variance = sum((d - mean) ** 2 for d in draws) / (len(draws) - 1)
    return mean, math.sqrt(variance / len(draws))


@torch.no_grad()
def arm_nll(model: Transformer, tokens: torch.Tensor) -> float:
    """Exact NLL (nats) of tokens[1:] given tokens[0] and what precedes, by the chain rule."""
    if tokens.dim() != 1 or tokens.numel() < 2:
        raise SmdmError("ARM likelihood needs at least two tokens")
    tokens = tokens.to(model.lm_head.weight.device)[None]
    return arm_loss(model(tokens[:, :-1]), tokens[:, 1:]).item() * (tokens.size(1) - 1)


def sequence_nll(model: Transformer, tokens: torch.Tensor, mc_samples: int = 64, seed: int = 0) -> tuple[float, float]:
    """NLL in nats of a sequence for either family; the second value is the standard error (0 for an ARM)."""
    if model.causal:
        return arm_nll(model, tokens), 0.0
    return mdm_nll(model, tokens, mc_samples=mc_samples, seed=seed)
