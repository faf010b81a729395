"""ARM -> MDM adaptation: continue pre-training an autoregressive model as a masked diffusion model.

Two recipes meet here. DiffuLLaMA (Gong et al. 2024, "Scaling Diffusion Language Models via Adaptation from
Autoregressive Models", arXiv 2410.17891, github.com/HKUNLP/DiffuLLaMA) keeps the AR head's *shift* (the hidden
state at i predicts token i+1, so the pre-trained head is reused as it is) and *anneals the attention mask* from
causal to bidirectional: at step s it allows the causal triangle plus each future (query, key) pair with probability
min(1, (s + 1) / K) (`get_anneal_attn_mask` in their trainer: `causal OR bernoulli(ratio)`, one mask per batch).
Dream 7B (Ye et al. 2025, "Dream 7B", arXiv 2508.15487, initialised from Qwen2.5) keeps the same shift and goes
bidirectional at once. smdm therefore shifts by default (both papers) and anneals only when asked (K > 0).

In smdm the shift is the `shifted` knob of ModelConfig: the adapted model is an ordinary shifted MDM, whose
Transformer un-shifts its outputs, so every sampler, likelihood estimator, loss and the Dream export handle it.
The annealing mask is passed to the model during training only (`Transformer.forward(attn_mask=...)`); after K steps
(and at inference) the model runs its plain bidirectional path. The [MASK] token is the ARM's extra embedding row
(id vocab_size): smdm's ARMs carry it (never trained by the AR loss) and a Hugging Face Llama/Qwen2 import adds it as
a zero row, so adaptation needs no change to the vocabulary.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from smdm.config import ModelConfig
from smdm.errors import SmdmError


def adapted_config(arm_config: ModelConfig, shift: bool) -> ModelConfig:
    """The MDM config of an adapted ARM: the same weights and shapes, bidirectional, `shifted` when asked."""
    if arm_config.mask_token_id is not None:  # never produced by smdm's ARMs or imports; refuse rather than guess
        raise SmdmError(f"{arm_config.name}: an ARM whose [MASK] id lies inside its vocabulary cannot be adapted")
    return replace(arm_config, shifted=shift)


def adaptation_record(source: str, shift: bool, anneal_steps: int) -> dict[str, Any]:
    """What a checkpoint's meta records about the adaptation it came from (meta["adapted_from"])."""
    return {"objective": "arm", "checkpoint": str(source), "shift": shift, "attention_anneal_steps": anneal_steps}


def anneal_ratio(step: int, anneal_steps: int) -> float:
    """Fraction of future (query, key) pairs visible at optimizer step `step` (0-based): DiffuLLaMA's
    min(1, (step + 1) / K); 1 (fully bidirectional) without annealing."""
    if anneal_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / anneal_steps)


def annealed_attention_mask(seq_len: int, step: int, anneal_steps: int, seed: int,
                            device: torch.device | str = "cpu") -> torch.Tensor | None:
    """The (seq_len, seq_len) bool mask of step `step` (True = may attend): the causal triangle OR a random subset of
    the future with probability `anneal_ratio`. None once the ratio is 1: the plain bidirectional path, unchanged.

    The draw is a pure function of (seed, step), shared by every micro-batch and rank of the step, so a resumed run
    replays it exactly; a shorter sequence (a random-length batch) sees the top-left corner of the same mask.
    """
    ratio = anneal_ratio(step, anneal_steps)
    if ratio >= 1.0:
        return None
    generator = torch.Generator().manual_seed((seed * 1_000_003 + step) * 7_919 + 104_729)
    future = torch.rand(seq_len, seq_len, generator=generator) < ratio
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    return (causal | future).to(device)


class WithAttentionMask(nn.Module):
    """Calls `module` with a fixed `attn_mask`, so the objectives' losses run unchanged under annealing.

    Named `module` like DDP's wrapper, so `smdm.diffusion.predicted_positions` finds the model's config through it.
    """

    def __init__(self, module: nn.Module, attn_mask: torch.Tensor) -> None:
        super().__init__()
        self.module = module
        self.attn_mask = attn_mask

    def forward(self, idx: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        length = idx.size(1)
        return self.module(idx, *args, attn_mask=self.attn_mask[:length, :length], **kwargs)
