"""Log-likelihood of text under an MDM (Monte-Carlo ELBO) or an ARM (exact chain rule), through one API."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch

from smdm.diffusion import check_shifted_context, mask_probability, sample_times
from smdm.errors import SmdmError
from smdm.model import Transformer

if TYPE_CHECKING:
    from smdm.tokenizer import Tokenizer


def sequence_nll(model: Transformer, tokens: torch.Tensor, mc_samples: int = 64, seed: int = 0) -> tuple[float, float]:
    """NLL in nats of a whole sequence for either family; the second value is the standard error (0 for an ARM).

    MDM: the paper's Monte-Carlo bound (Bernoulli masks at low-discrepancy t, 1/p weights) over every token.
    ARM: exact, of tokens[1:] given tokens[0].
    """
    if tokens.dim() != 1 or tokens.numel() == 0:
        raise SmdmError("likelihood needs a non-empty 1-D sequence of token ids")
    ids = tokens.tolist()
    if getattr(model, "diffusion_block_size", None):  # block diffusion: the block ELBO over every token
        from smdm.block_diffusion import block_score

        result = block_score(model, [], ids, model.diffusion_block_size, mc_samples=mc_samples, seed=seed)
        return result.nll, result.stderr
    if model.causal:
        return arm_score(model, ids[:1], ids[1:]).nll, 0.0
    result = mc_score(model, [], ids, mc_samples=mc_samples, batch_size=16, estimator="bernoulli", seed=seed)
    return result.nll, result.stderr


# --- Conditional scoring: log p(target | prefix), the basis of multiple-choice and LAMBADA-style evaluation ---------

ESTIMATORS = ("count", "bernoulli")


class ScoreResult(NamedTuple):
    """NLL in nats of the target given the prefix (an upper bound for MDM Monte-Carlo), its standard error, cost."""

    nll: float
    stderr: float
    target_tokens: int
    forward_passes: int


def _check_pair(model: Transformer, prefix: list[int], target: list[int], suffix: Sequence[int] = ()) -> None:
    if not target:
        raise SmdmError("the target to score is empty")
    check_shifted_context(model, len(prefix), "a non-empty prefix")
    if len(prefix) + len(target) + len(suffix) > model.config.block_size:
        raise SmdmError(f"prefix ({len(prefix)}) + target ({len(target)}) + suffix ({len(suffix)}) tokens exceed "
                        f"the context length {model.config.block_size}")


def guided_logits(model: Transformer, x: torch.Tensor, prefix_len: int, cfg_scale: float | None,
                  suffix_len: int = 0) -> torch.Tensor:
    """Logits with unsupervised classifier-free guidance: cond + w·(cond − uncond) = uncond + (w+1)(cond − uncond).

    The unconditional pass is the same input with the prefix replaced by [MASK] (Nie et al. 2025): no separately
    trained unconditional model. Both passes run in one batch. When a span is scored between given text, the
    given text after it (`suffix_len` tokens) is masked too.
    """
    if not cfg_scale:
        return model(x)
    uncond = x.clone()
    uncond[:, :prefix_len] = model.mask_id
    if suffix_len:
        uncond[:, x.size(1) - suffix_len:] = model.mask_id
    cond_logits, uncond_logits = model(torch.cat([x, uncond])).float().chunk(2)
    return cond_logits + cfg_scale * (cond_logits - uncond_logits)


def _draw_masks(n: int, length: int, estimator: str, generator: torch.Generator,
                low_discrepancy: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks over the target (n, length) and each draw's weight per masked token.

    count: mask exactly k tokens, k = 1..L stratified over the draws, weight L/k (LLaDA's form of the bound; it
    never draws an empty mask, so a one-token target is scored exactly). bernoulli: the reference estimator of
    ML-GSAI/SMDM, each token masked with probability p(t), weight 1/p.
    """
    if estimator == "count":
        u = sample_times(n, generator, low_discrepancy)
        counts = (u * length).long().clamp_max(length - 1) + 1
        ranks = torch.rand(n, length, generator=generator).argsort(dim=1).argsort(dim=1)
        masked = ranks < counts[:, None]
        return masked, length / counts.double()
    mask_prob = mask_probability(sample_times(n, generator, low_discrepancy))
    masked = torch.rand(n, length, generator=generator) < mask_prob[:, None]
    return masked, 1.0 / mask_prob.double()


@torch.no_grad()
def mc_score(model: Transformer, prefix: list[int], target: list[int], mc_samples: int = 128, batch_size: int = 32,
             estimator: str = "count", low_discrepancy: bool = True, cfg_scale: float | None = None,
             seed: int = 0, suffix: Sequence[int] = ()) -> ScoreResult:
    """Monte-Carlo bound on -log p(target | prefix, suffix) for an MDM: only target tokens are masked, the text on
    both sides is given (an MDM conditions on either side alike, which is what makes infilling scorable).

    Each draw masks part of the target and sums the weighted cross-entropy of the masked tokens; the mean over draws
    is the bound, reported with its standard error. mc_samples need not divide by batch_size.
    """
    if model.causal:
        raise SmdmError("Monte-Carlo scoring needs an MDM; score an ARM with arm_score")
    if getattr(model, "diffusion_block_size", None):  # block diffusion: the block ELBO, blocks left to right
        from smdm.block_diffusion import block_score

        if cfg_scale:
            raise SmdmError("classifier-free guidance in scoring is an MDM option, not one of block diffusion")
        if suffix:
            raise SmdmError("block diffusion conditions on the blocks before a span, not on text after it; "
                            "scoring with a suffix needs an MDM")
        return block_score(model, prefix, target, model.diffusion_block_size, mc_samples, batch_size, seed)
    if estimator not in ESTIMATORS:
        raise SmdmError(f"unknown estimator {estimator!r}; use one of {', '.join(ESTIMATORS)}")
    if mc_samples < 2 or batch_size < 1:
        raise SmdmError("mc_samples must be at least 2 and batch_size at least 1")
    _check_pair(model, prefix, target, suffix)
    device = model.lm_head.weight.device
    tokens = torch.tensor(prefix + target + list(suffix), device=device)
    start, stop = len(prefix), len(prefix) + len(target)
    generator = torch.Generator().manual_seed(seed)
    draws: list[torch.Tensor] = []
    passes = 0
    while len(draws) < mc_samples:
        n = min(batch_size, mc_samples - len(draws))
        masked, weight = _draw_masks(n, len(target), estimator, generator, low_discrepancy)
        masked = masked.to(device)
        x = tokens[None].repeat(n, 1)
        x[:, start:stop] = torch.where(masked, torch.full_like(masked, model.mask_id, dtype=torch.long),
                                       x[:, start:stop])
        logits = guided_logits(model, x, start, cfg_scale, len(suffix))[:, start:stop]
        passes += 2 if cfg_scale else 1
        ce = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x.new_tensor(target).repeat(n),
                                               reduction="none").view(n, -1).double()
        draws.extend(((ce * masked).sum(1) * weight.to(device)).cpu().unbind())
    values = torch.stack(draws)
    return ScoreResult(values.mean().item(), (values.std() / math.sqrt(len(values))).item(), len(target), passes)


@torch.no_grad()
def chain_rule_score(model: Transformer, prefix: list[int], target: list[int], batch_size: int = 32,
                     cfg_scale: float | None = None, suffix: Sequence[int] = ()) -> ScoreResult:
    """Exact -log p(target | prefix, suffix) of an MDM for the left-to-right reveal order: one forward pass per
    token, batched.

    Row k sees the prefix, target[:k] and the suffix with the rest of the target masked, and scores target[k].
    """
    if model.causal:
        raise SmdmError("chain-rule scoring of an MDM needs an MDM; score an ARM with arm_score")
    if getattr(model, "diffusion_block_size", None):  # block diffusion: left to right inside each block
        from smdm.block_diffusion import block_chain_score

        if cfg_scale:
            raise SmdmError("classifier-free guidance in scoring is an MDM option, not one of block diffusion")
        if suffix:
            raise SmdmError("block diffusion conditions on the blocks before a span, not on text after it; "
                            "scoring with a suffix needs an MDM")
        return block_chain_score(model, prefix, target, model.diffusion_block_size, batch_size)
    _check_pair(model, prefix, target, suffix)
    device = model.lm_head.weight.device
    start, length = len(prefix), len(target)
    full = torch.tensor(prefix + target + list(suffix), device=device)
    total, passes = 0.0, 0
    for first in range(0, length, batch_size):
        ks = torch.arange(first, min(length, first + batch_size), device=device)
        x = full[None].repeat(len(ks), 1)
        columns = torch.arange(length, device=device)[None]
        span = slice(start, start + length)
        x[:, span] = torch.where(columns >= ks[:, None], torch.full_like(x[:, span], model.mask_id), x[:, span])
        logits = guided_logits(model, x, start, cfg_scale, len(suffix))
        passes += 2 if cfg_scale else 1
        rows = torch.arange(len(ks), device=device)
        log_probs = logits[rows, start + ks].float().log_softmax(-1)
        total -= log_probs[rows, full[start + ks]].sum().item()
    return ScoreResult(total, 0.0, length, passes)


@torch.no_grad()
def arm_score(model: Transformer, prefix: list[int], target: list[int]) -> ScoreResult:
    """Exact -log p(target | prefix) of an ARM in one forward pass; the prefix must hold at least one token."""
    if not model.causal:
        raise SmdmError("arm_score needs an ARM; score an MDM with mc_score or chain_rule_score")
    if not prefix:
        raise SmdmError("an ARM needs a non-empty prefix (e.g. BOS or EOS) to score a target")
    _check_pair(model, prefix, target)
    device = model.lm_head.weight.device
    tokens = torch.tensor(prefix + target, device=device)[None]
    log_probs = model(tokens[:, :-1]).float().log_softmax(-1)[0, len(prefix) - 1:]
    nll = -log_probs.gather(-1, tokens[0, len(prefix):, None]).sum().item()
    return ScoreResult(nll, 0.0, len(target), 1)


def score(model: Transformer, prefix: list[int], target: list[int], method: str = "mc", **options) -> ScoreResult:
    """One entry for every family: an ARM is scored exactly; an MDM or a block-diffusion model by Monte Carlo ("mc")
    or chain rule ("chain")."""
    if model.causal:
        if options.get("suffix"):
            raise SmdmError("scoring a span given the text after it needs an MDM; an ARM only conditions on the "
                            "text before")
        if options.get("cfg_scale"):
            raise SmdmError("classifier-free guidance needs an MDM, not an ARM")
        return arm_score(model, prefix, target)
    if method == "mc":
        return mc_score(model, prefix, target, **options)
    if method == "chain":
        allowed = {k: v for k, v in options.items() if k in ("batch_size", "cfg_scale", "suffix")}
        return chain_rule_score(model, prefix, target, **allowed)
    raise SmdmError(f"unknown likelihood method {method!r}; use mc or chain")


class _WrongReveal(Exception):
    """Raised inside greedy decoding as soon as a revealed token differs from the target."""


def is_greedy_continuation(model: Transformer, prefix: list[int], target: list[int]) -> bool:
    """Would greedy decoding produce exactly the target after the prefix? (LAMBADA-style accuracy.)

    MDM: low-confidence remasking with one token revealed per step; ARM: greedy decoding with the KV cache.
    Revealed tokens are final, so decoding stops at the first wrong one: for a wrong multiple-choice answer that
    is usually one model pass instead of one per target token.
    """
    from smdm.sample import generate

    _check_pair(model, prefix, target)
    expected = torch.tensor(target)
    mask_id = getattr(model, "mask_id", None)

    def check(step: int, tokens: torch.Tensor) -> None:
        generated = tokens[0, len(prefix): len(prefix) + len(target)].cpu()
        shown = generated != mask_id if not model.causal else torch.ones_like(generated, dtype=torch.bool)
        if (generated[shown] != expected[: generated.numel()][shown]).any():
            raise _WrongReveal

    block_diffusion = getattr(model, "diffusion_block_size", None)
    steps = None if model.causal or block_diffusion else len(target)
    try:
        result = generate(model, [prefix], len(target), steps=steps, temperature=0.0, on_step=check)
    except _WrongReveal:
        return False
    return result.completions[0] == target


def score_text(model: Transformer, tokenizer: Tokenizer, text: str, prefix: str | None = None, method: str = "mc",
               cfg_scale: float | None = None, mc_samples: int = 128, seed: int = 0,
               suffix: str | None = None) -> dict[str, float | int]:
    """`smdm likelihood`: the NLL of `text` (alone, after `prefix`, and/or before `suffix`: a span between two
    given sides, MDM only) as a JSON-ready record."""
    ids = tokenizer.encode(text)
    if not ids:
        raise SmdmError("the text is empty")
    if prefix is None and suffix is None:
        nll, stderr = sequence_nll(model, torch.tensor(ids), mc_samples=mc_samples, seed=seed)
        return {"tokens": len(ids), "nll_nats": nll, "stderr": stderr, "nats_per_token": nll / len(ids)}
    prefix_ids = tokenizer.encode(prefix or "")
    options: dict[str, object] = {"cfg_scale": cfg_scale} if cfg_scale else {}
    suffix_ids = tokenizer.encode(suffix) if suffix else []
    if suffix_ids:
        options["suffix"] = suffix_ids
    if method == "mc" and not model.causal:
        options.update(mc_samples=mc_samples, seed=seed)
    result = score(model, prefix_ids, ids, method=method, **options)
    return {"prefix_tokens": len(prefix_ids), "suffix_tokens": len(suffix_ids), "tokens": len(ids),
            "nll_nats": result.nll, "stderr": result.stderr, "nats_per_token": result.nll / len(ids),
            "forward_passes": result.forward_passes}
