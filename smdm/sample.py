"""Generation: MDM low-confidence remasking (Nie et al. 2025; LLaDA) and ARM decoding with a KV cache.

The full sampler suite (random remasking, semi-autoregressive blocks, CFG, caching) builds on these pieces.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from smdm.errors import SmdmError
from smdm.model import Transformer


def add_gumbel_noise(logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gumbel-max sampling scores in float64: argmax(logits/T + Gumbel) ~ softmax(logits/T).

    Low-precision Gumbel noise measurably hurts sample quality, hence float64.
    """
    if temperature == 0:
        return logits
    uniform = torch.rand(logits.shape, generator=generator, dtype=torch.float64).to(logits.device)
    gumbel = -torch.log(-torch.log(uniform.clamp_min(1e-300)))
    return logits.double() / temperature + gumbel


def num_transfer_tokens(num_masked: torch.Tensor, steps: int) -> torch.Tensor:
    """Tokens to reveal at each step (B, steps): an even split, the remainder going to the first steps."""
    base = num_masked // steps
    remainder = num_masked % steps
    schedule = base[:, None].repeat(1, steps)
    schedule += (torch.arange(steps, device=num_masked.device)[None, :] < remainder[:, None]).long()
    return schedule


def _check_prompt(model: Transformer, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    if prompt.dim() == 1:
        prompt = prompt[None]
    if new_tokens < 1:
        raise SmdmError("the generation length must be at least 1")
    if prompt.size(1) + new_tokens > model.config.block_size:
        raise SmdmError(f"prompt ({prompt.size(1)}) + generation ({new_tokens}) tokens exceed the block size "
                        f"{model.config.block_size}")
    return prompt


@torch.no_grad()
def mdm_generate(model: Transformer, prompt: torch.Tensor, gen_length: int, steps: int, temperature: float = 0.0,
                 generator: torch.Generator | None = None,
                 on_step: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Fill gen_length [MASK] tokens after the prompt by low-confidence remasking in `steps` steps.

    At each step the model predicts every masked token; the k most confident predictions are kept and the rest
    stay masked, with k from an even schedule so that no [MASK] remains after the last step.
    """
    if model.causal:
        raise SmdmError("diffusion sampling needs an MDM (bidirectional) model, not an ARM")
    if steps < 1:
        raise SmdmError("steps must be at least 1")
    if temperature < 0:
        raise SmdmError("temperature must be >= 0")
    prompt = _check_prompt(model, prompt, gen_length)
    device = model.lm_head.weight.device
    batch = prompt.size(0)
    x = torch.cat([prompt.to(device), torch.full((batch, gen_length), model.mask_id, device=device)], dim=1)
    steps = min(steps, gen_length)
    schedule = num_transfer_tokens((x == model.mask_id).sum(1), steps)
    for step in range(steps):
        masked = x == model.mask_id
        logits = model(x)
        predicted = add_gumbel_noise(logits, temperature, generator).argmax(-1)
        confidence = F.softmax(logits.float(), dim=-1).gather(-1, predicted[..., None]).squeeze(-1)
        confidence = torch.where(masked, confidence, torch.full_like(confidence, -float("inf")))
        reveal = torch.zeros_like(masked)
        for row in range(batch):
            k = int(schedule[row, step])
            if k:
                reveal[row, confidence[row].topk(k).indices] = True
        x = torch.where(reveal, predicted, x)
        if on_step is not None:
            on_step(step, x)
    return x


@torch.no_grad()
def arm_generate(model: Transformer, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Autoregressive decoding with a KV cache: one forward pass over the prompt, then one per new token."""
    if not model.causal:
        raise SmdmError("autoregressive decoding needs an ARM (causal) model")
    if temperature < 0:
        raise SmdmError("temperature must be >= 0")
    prompt = _check_prompt(model, prompt, max_new_tokens)
    if prompt.size(1) < 1:
        raise SmdmError("an ARM needs a prompt of at least one token")
    device = model.lm_head.weight.device
    prompt = prompt.to(device)
    model.setup_kv_cache(prompt.size(0), prompt.size(1) + max_new_tokens)
    try:
        logits = model(prompt, torch.arange(prompt.size(1), device=device))[:, -1]
        out = [prompt]
        for position in range(prompt.size(1), prompt.size(1) + max_new_tokens):
            next_token = add_gumbel_noise(logits, temperature, generator).argmax(-1, keepdim=True)
            out.append(next_token)
            if position + 1 < prompt.size(1) + max_new_tokens:
                logits = model(next_token, torch.tensor([position], device=device))[:, -1]
    finally:
        model.clear_kv_cache()
    return torch.cat(out, dim=1)


def generate(model: Transformer, prompt: torch.Tensor, length: int, steps: int | None = None,
             temperature: float = 0.0, generator: torch.Generator | None = None,
             on_step: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """One entry for both families: diffusion sampling for an MDM, KV-cache decoding for an ARM."""
    if model.causal:
        return arm_generate(model, prompt, length, temperature, generator)
    return mdm_generate(model, prompt, length, steps or length, temperature, generator, on_step)


def truncate_at_eos(ids: list[int], eos_id: int) -> list[int]:
    """Drop everything from the first EOS on: text after a document's end is noise."""
    return ids[: ids.index(eos_id)] if eos_id in ids else ids
