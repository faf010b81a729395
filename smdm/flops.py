"""The one FLOPs account: training budgets (`smdm train --flops`, IsoFLOP sweeps), MFU, and device peaks.

Three named counts, because three questions are asked:
- "attention" (default for budgets): 6·N + 6·L·T·d, Kaplan et al. 2020 — N non-embedding parameters, plus the
  score and value products over the context; one convention for both families, so equal C means the same model and
  tokens for an MDM and an ARM.
- "6n": 6·N, what the paper's code (ML-GSAI/SMDM) counts; it undercounts small models (by 50% at 6M, 17% at 170M).
- "hardware" (MFU only): 6 × every matmul parameter, the output head included, + 12·L·T·d (PaLM, Chowdhery et al.
  2022, App. B): the work the device really does, for model-FLOPs utilisation.
"""

from __future__ import annotations

from typing import Literal

import torch

from smdm.config import ModelConfig, non_embedding_params
from smdm.errors import SmdmError

FlopsCount = Literal["attention", "6n"]
FLOPS_COUNTS: tuple[str, ...] = ("attention", "6n")  # the counts a budget may use

# Dense bf16 peak FLOP/s of common accelerators, for MFU. Extend or override with --peak-flops.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}


def flops_per_token(config: ModelConfig, seq_len: int, count: str = "attention") -> float:
    """Training FLOPs per token under a budget count: "attention" (6·N + 6·L·T·d) or "6n" (6·N)."""
    n = non_embedding_params(config)
    if count == "6n":
        return 6.0 * n
    if count == "attention":
        return 6.0 * n + 6.0 * config.n_layer * seq_len * config.n_embd
    raise SmdmError(f"unknown FLOPs count {count!r}; use one of {', '.join(FLOPS_COUNTS)}")


def hardware_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """FLOPs the device executes per trained token (MFU): 6 x matmul parameters incl. the head + 12·L·d·T (PaLM)."""
    matmul_params = non_embedding_params(config) + config.vocab_size * config.n_embd
    return 6.0 * matmul_params + 12.0 * config.n_layer * config.n_embd * seq_len


def steps_for_budget(flops: float, per_token: float, tokens_per_step: int) -> int:
    """Whole optimizer steps that fit in a budget (the last partial step is dropped, so no run exceeds it)."""
    return int(flops // (per_token * tokens_per_step))


def device_peak_flops(device: torch.device) -> float | None:
    """Peak bf16 FLOP/s of a known GPU (per device), else None: MFU is then not reported."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in name:
            return flops
    return None
