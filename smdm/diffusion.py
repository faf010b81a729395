"""The masked-diffusion math (Nie et al. 2025, Eq. 3-4) and the autoregressive loss beside it.

Forward process: each token is replaced by [MASK] independently with probability p(t) = (1 - eps)·t + eps, t ~ U(0, 1).
Loss: sum over masked positions of -log p_theta(x_i | x_t) / p(t), divided by batch × length. Its expectation over
t and the masks upper-bounds the negative log-likelihood per token (the ELBO), so it is comparable to an ARM's NLL.

Pure functions of tensors. Random draws come from a CPU `torch.Generator` and are then moved to the
tokens' device, so a seed gives the same masks on every device and a resumed run can replay them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from smdm.errors import SmdmError

MASK_EPS = 1e-3
# Training-loss weightings of the masked tokens' cross-entropy. "elbo": 1/p(t), the bound itself (Nie et al. 2025,
# Eq. 3). "ce": no weight, Sahoo et al. 2026 (arXiv 2602.15014, "a simple cross-entropy objective", ~12% more
# FLOPs-efficient): their code (s-sahoo/scaling-dllms, `loss_type=low_var`, MDLM.nll_per_token) drops the
# -alpha'_t/(1-alpha_t) = 1/t factor in training only and still validates with the ELBO.
LOSS_WEIGHTINGS = ("elbo", "ce")


def sample_times(batch_size: int, generator: torch.Generator | None = None, low_discrepancy: bool = False) -> torch.Tensor:
    """t in [0, 1) per example; low-discrepancy draws t_i = (u + i/B) mod 1, one per stratum, which lowers variance."""
    if low_discrepancy:
        u = torch.rand(1, generator=generator)
        return (u + torch.arange(batch_size) / batch_size) % 1.0
    return torch.rand(batch_size, generator=generator)


def mask_probability(t: torch.Tensor, eps: float = MASK_EPS) -> torch.Tensor:
    """p(t) = (1 - eps)·t + eps: never zero, so the 1/p weight stays finite."""
    return (1.0 - eps) * t + eps


def training_mask_rates(batch_size: int, generator: torch.Generator | None, low_discrepancy: bool, eps: float,
                        rate_range: tuple[float, float] | None = None) -> torch.Tensor:
    """Each row's masking rate for a training draw: p(t) with t ~ U[0, 1), or, with `rate_range` (lo, hi), a rate
    drawn uniformly from [lo, hi] (BD3-LM's clipped schedule, Arriola et al. 2025 Sec. 4: fewer nearly clean and
    nearly all-masked rows, a lower-variance but biased estimate; for training only)."""
    t = sample_times(batch_size, generator, low_discrepancy)
    if rate_range is None:
        return mask_probability(t, eps)
    low, high = rate_range
    return low + (high - low) * t


def forward_process(tokens: torch.Tensor, mask_prob: torch.Tensor, mask_id: int,
                    generator: torch.Generator | None = None,
                    maskable: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask each token with its row's probability; returns (noisy tokens, boolean mask of masked positions).

    `maskable` (same shape as tokens) restricts masking to some positions, e.g. the response in SFT.
    """
    draws = torch.rand(tokens.shape, generator=generator).to(tokens.device)
    masked = draws < mask_prob.to(tokens.device)[:, None]
    if maskable is not None:
        masked &= maskable
    noisy = torch.where(masked, torch.full_like(tokens, mask_id), tokens)
    return noisy, masked


def masked_weighted_ce(masked_logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor,
                       mask_prob: torch.Tensor) -> torch.Tensor:
    """sum over masked positions of CE / p, from logits computed at the masked positions only, (n_masked, V)."""
    rows = masked.nonzero()[:, 0]
    token_ce = F.cross_entropy(masked_logits.float(), targets[masked], reduction="none")
    return (token_ce / mask_prob.to(masked_logits.device)[rows]).sum()


def masked_ce(masked_logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """sum over masked positions of the plain CE (Sahoo et al.'s "simple cross-entropy"): no 1/p weight."""
    return F.cross_entropy(masked_logits.float(), targets[masked], reduction="sum")


def arm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; logits[:, i] predicts targets[:, i]."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def is_shifted(model: torch.nn.Module) -> bool:
    """Whether the model (or the one inside a DDP / torch.compile wrapper) is `shifted`: logit i from state i-1."""
    inner = model
    while hasattr(inner, "module"):  # DDP and similar wrappers hide the model's attributes
        inner = inner.module
    inner = getattr(inner, "_orig_mod", inner)  # torch.compile
    return bool(getattr(getattr(inner, "config", None), "shifted", False))


def check_shifted_context(model: torch.nn.Module, shortest: int, what: str) -> None:
    """Refuse an empty context for a shifted model (Dream, or an ARM adapted into an MDM or a BDM): it predicts token
    i from position i-1, so nothing predicts position 0. `what` says what to give, e.g. "a non-empty prefix"."""
    if shortest < 1 and is_shifted(model):
        raise SmdmError("a shifted model (Dream-style, or adapted from an ARM) predicts token i from position i-1: "
                        f"give {what}")


def sft_maskable(model: torch.nn.Module, tokens: torch.Tensor, prompt_lengths: torch.Tensor) -> torch.Tensor:
    """Where SFT may mask: the response (`response_positions`), never position 0 of a shifted model."""
    response = response_positions(prompt_lengths.to(tokens.device), tokens.size(1))
    predicted = predicted_positions(model, tokens)
    return response if predicted is None else response & predicted


def predicted_positions(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor | None:
    """Where masking may happen: everywhere (None), except position 0 of a shifted MDM (Dream), whose network has no
    output predicting token 0 (its logit i predicts token i+1; Dream's training never masks the first token)."""
    if not is_shifted(model):
        return None
    return (torch.arange(tokens.size(1), device=tokens.device) >= 1)[None, :].expand_as(tokens)


def mdm_step_loss(model: torch.nn.Module, tokens: torch.Tensor, generator: torch.Generator | None = None,
                  low_discrepancy: bool = False, eps: float = MASK_EPS, mask_id: int | None = None,
                  weighting: str = "elbo", rate_range: tuple[float, float] | None = None) -> torch.Tensor:
    """One Monte-Carlo draw of the MDM loss for a batch of clean token blocks.

    `mask_id` defaults to `model.mask_id`; pass it when `model` is a wrapper (DDP) that hides the attribute.
    `weighting` "ce" drops the 1/p(t) weight (Sahoo et al. 2026): same masks, same normaliser B·L, no bound.
    `rate_range` clips the masking rates (`training_mask_rates`).
    """
    mask_prob = training_mask_rates(tokens.size(0), generator, low_discrepancy, eps, rate_range)
    noisy, masked = forward_process(tokens, mask_prob, model.mask_id if mask_id is None else mask_id, generator,
                                    maskable=predicted_positions(model, tokens))
    # Only masked positions carry loss, so the output head runs only there (same value and gradients).
    if weighting == "ce":
        return masked_ce(model(noisy, select=masked), tokens, masked) / tokens.numel()
    return masked_weighted_ce(model(noisy, select=masked), tokens, masked, mask_prob) / tokens.numel()


def arm_step_loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token loss on a block: predict tokens[1:] from tokens[:-1]."""
    return arm_loss(model(tokens[:, :-1]), tokens[:, 1:])


def random_length(tokens: torch.Tensor, probability: float, generator: torch.Generator | None = None,
                  min_length: int = 1) -> torch.Tensor:
    """With the given probability cut the whole batch to a random length in [min_length, L] (the paper: 1%, [1, L]).

    Training only on full blocks leaves the model unused to short inputs; an occasional short batch fixes that.
    """
    if probability <= 0:
        return tokens
    if torch.rand(1, generator=generator).item() >= probability:
        return tokens
    length = int(torch.randint(min_length, tokens.size(1) + 1, (1,), generator=generator))
    return tokens[:, :length]


# --- Supervised fine-tuning: the prompt stays clean and out of the loss -----------------------------------------------

def response_positions(prompt_lengths: torch.Tensor, length: int) -> torch.Tensor:
    """(B, L) boolean: True at response positions (index >= the row's prompt length)."""
    return torch.arange(length, device=prompt_lengths.device)[None, :] >= prompt_lengths[:, None]


def mdm_sft_step_loss(model: torch.nn.Module, tokens: torch.Tensor, prompt_lengths: torch.Tensor,
                      generator: torch.Generator | None = None, prompt_dropout: float = 0.0,
                      low_discrepancy: bool = False, eps: float = MASK_EPS,
                      mask_id: int | None = None, weighting: str = "elbo",
                      rate_range: tuple[float, float] | None = None) -> torch.Tensor:
    """One draw of the SFT loss: only response tokens are masked; each row's sum of CE/p is divided by its response
    length (so long answers do not dominate), then averaged over rows.

    prompt_dropout: each row's whole prompt is replaced by [MASK] independently with this probability — standard
    classifier-free-guidance training (the unconditional model is the same network with the prompt hidden). The
    dropped prompt is still never a target. 0 keeps the paper's *unsupervised* CFG setting.
    weighting "ce": no 1/p(t) weight (Sahoo et al. 2026), the per-row 1/response-length normaliser stays.
    """
    mask_id = model.mask_id if mask_id is None else mask_id
    batch, length = tokens.shape
    prompt_lengths = prompt_lengths.to(tokens.device)
    response = sft_maskable(model, tokens, prompt_lengths)
    mask_prob = training_mask_rates(batch, generator, low_discrepancy, eps, rate_range)
    noisy, masked = forward_process(tokens, mask_prob, mask_id, generator, maskable=response)
    if prompt_dropout > 0:
        dropped = (torch.rand(batch, generator=generator) < prompt_dropout).to(tokens.device)
        noisy = torch.where(dropped[:, None] & ~response, torch.full_like(noisy, mask_id), noisy)
    response_length = (length - prompt_lengths).clamp_min(1).double()
    rows = masked.nonzero()[:, 0]
    token_ce = F.cross_entropy(model(noisy, select=masked).float(), tokens[masked], reduction="none")
    if weighting == "ce":
        weights = 1.0 / response_length[rows]
    else:
        weights = 1.0 / (mask_prob.to(tokens.device).double()[rows] * response_length[rows])
    return (token_ce * weights.float()).sum() / batch


def arm_sft_step_loss(model: torch.nn.Module, tokens: torch.Tensor, prompt_lengths: torch.Tensor) -> torch.Tensor:
    """Next-token loss on response targets only, per row divided by its number of response targets, then averaged."""
    length = tokens.size(1)
    logits = model(tokens[:, :-1])
    token_ce = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
    token_ce = token_ce.view(tokens.size(0), length - 1)
    targets = response_positions(prompt_lengths.to(tokens.device), length)[:, 1:]
    per_row = (token_ce * targets).sum(1) / targets.sum(1).clamp_min(1)
    return per_row.mean()
