"""Block diffusion (BD3-LM; Arriola et al., ICLR 2025, kuleshov-group/bd3lms): the math, the sampler, the likelihood.

A sequence is cut into blocks of `block_size` tokens. Blocks are generated left to right; inside a block the
tokens are produced by masked diffusion conditioned on the clean previous blocks. Block size 1 is an
autoregressive model (whose input at the predicted position is [MASK]); block size = context is an MDM.

Training (BD3-LM Sec. 3.2, "vectorised training"): the noisy sequence x_t and the clean sequence x_0 go through the
model together, 2L tokens, under one structured mask (bd3lms `models/dit.py`, `block_diff_mask`): noisy block b sees
its own noisy block (M_BD) and the clean blocks < b (M_OBC); clean tokens are block-causal (M_BC). The clean copy
gets the same RoPE positions as the noisy copy (bd3lms applies one rotary table to both halves). Each block has its
own masking rate t ~ U[t_min, t_max] (bd3lms `_sample_t`); the loss sums -log p(x_i | ...) / t over masked
tokens (the linear schedule's 1/t weight, BD3-LM Eq. 8) and divides by the number of tokens. With the default
range [1e-3, 1] it is an unbiased estimate of the negative ELBO; a narrower "clipped" range (BD3-LM Sec. 4,
lower-variance training) is a biased estimate and is meant for training only.

Sampling: the prompt and every finished block live in an exact KV cache (the keys of a clean block depend only on
clean blocks up to it, so nothing cached ever changes); each new block is denoised in `steps` passes that attend to
the cache plus the block itself. The finished block is written into the cache by the first pass of the next block
(its clean tokens ride along in front of the next noisy block, under the same block-causal rule), so a block costs
exactly `steps` forward passes.

A `shifted` model (an ARM adapted into a BDM, as Fast-dLLM v2 does: Wu et al. 2025, arXiv 2509.26328, "token
shift") predicts token i from the hidden state at i-1, as the ARM did. In one left-to-right stream (sampling,
the chain score) that is the model's own un-shift; in the [noisy | clean] training pass a noisy block's first token
is predicted from the *clean* copy of the token before it (`shifted_sources`), the last token of the clean block
the noisy block sees. Position 0 has no prediction: it is never masked, and prompts and prefixes must be non-empty.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from smdm.diffusion import MASK_EPS, check_shifted_context, is_shifted, predicted_positions, sft_maskable
from smdm.errors import ContextLengthError, SmdmError
from smdm.model import KVCache, Transformer
from smdm.sampler_settings import REMASKINGS

if TYPE_CHECKING:  # smdm.sample and smdm.likelihood import this module lazily; no import cycle at run time
    from smdm.likelihood import ScoreResult
    from smdm.sample import Generation, PromptIds

# --- Attention masks -----------------------------------------------------------------------------------------------


def training_mask(length: int, block_size: int, device: torch.device | None = None) -> torch.Tensor:
    """(2L, 2L) boolean mask, True = may attend, over [noisy x_t | clean x_0] (BD3-LM's M_BD | M_OBC | M_BC)."""
    index = torch.arange(2 * length, device=device)
    return _visible(index[:, None], index[None, :], length, block_size)


def _visible(q: torch.Tensor, k: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    """Whether query slot q may attend to key slot k in the 2L-token training pass (index tensors, broadcast):
    the one rule behind both the dense mask and the FlexAttention BlockMask."""
    q_clean, k_clean = q >= length, k >= length
    q_block, k_block = (q % length) // block_size, (k % length) // block_size
    block_diagonal = (q_block == k_block) & (q_clean == k_clean)
    offset_block_causal = (q_block > k_block) & k_clean & ~q_clean
    block_causal = (q_block >= k_block) & k_clean & q_clean
    return block_diagonal | offset_block_causal | block_causal


ATTENTION_KERNELS = ("auto", "sdpa", "flex")


def training_attention(length: int, block_size: int, device: torch.device, kernel: str = "auto"):
    """The training mask in the form the attention kernel wants.

    "sdpa": `training_mask` as a dense boolean tensor for `F.scaled_dot_product_attention` (CPU, and any device).
    "flex": a `BlockMask` for `torch.nn.attention.flex_attention`, which skips the 62-75% of key blocks the mask
    hides instead of computing and discarding them (BD3-LM trains with FlexAttention, bd3lms `models/dit.py`).
    "auto": flex on CUDA where torch has it (compiled, fused), sdpa elsewhere (eager flex materialises the scores).
    """
    if kernel not in ATTENTION_KERNELS:
        raise SmdmError(f"unknown attention kernel {kernel!r}; use one of {', '.join(ATTENTION_KERNELS)}")
    if kernel == "auto":
        kernel = "flex" if device.type == "cuda" and _flex_available() else "sdpa"
    if kernel == "sdpa":
        return training_mask(length, block_size, device)
    return _flex_training_mask(length, block_size, str(device))


def _flex_available() -> bool:
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=16)
def _flex_training_mask(length: int, block_size: int, device: str):
    """`training_mask` as a FlexAttention BlockMask (built once per shape: it costs a pass over the mask)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def allowed(batch, head, q, k):
        return _visible(q, k, length, block_size)

    tile = 128 if device.startswith("cuda") else 16  # the kernel's tile; small on CPU so tiny tests stay sparse
    return create_block_mask(allowed, None, None, 2 * length, 2 * length, device=device, BLOCK_SIZE=tile)


def block_causal_mask(query_slots: torch.Tensor, num_keys: int, block_size: int,
                      key_real: torch.Tensor | None = None) -> torch.Tensor:
    """(B or 1, 1, T, K) inference mask: a query in block j sees every key slot in blocks <= j.

    This one rule covers the prompt prefill (clean blocks, block-causal), a noisy block (clean blocks before it and
    itself) and a finished block written together with the next noisy one. `key_real` (B, K) hides pad columns;
    each query still sees its own slot, so a pad query's row is never empty (SDPA would give NaN).
    """
    key_slots = torch.arange(num_keys, device=query_slots.device)
    allowed = (key_slots[None, :] // block_size) <= (query_slots[:, None] // block_size)
    if key_real is None:
        return allowed[None, None]
    own = query_slots[:, None] == key_slots[None, :]
    return (allowed[None] & key_real[:, None, :] | own[None])[:, None]


# --- Training ------------------------------------------------------------------------------------------------------


def check_block_size(block_size: int, length: int) -> None:
    """A block size must be positive and divide the training length, so every block is whole."""
    if block_size < 1 or length % block_size:
        raise SmdmError(f"diffusion block size {block_size} must divide the context length {length}")


def sample_block_times(batch: int, num_blocks: int, generator: torch.Generator | None = None,
                       t_min: float = MASK_EPS, t_max: float = 1.0, low_discrepancy: bool = False) -> torch.Tensor:
    """(batch, num_blocks) masking rates t ~ U[t_min, t_max], one per block (bd3lms `_sample_t`).

    low_discrepancy: one draw per stratum of [0, 1) over all batch x blocks (bd3lms' antithetic sampling), in a
    random order so the strata are not tied to block positions.
    """
    n = batch * num_blocks
    u = torch.rand(n, generator=generator)
    if low_discrepancy:
        u = ((u + torch.arange(n)) / n)[torch.randperm(n, generator=generator)]
    return (t_min + (t_max - t_min) * u).view(batch, num_blocks)


def check_time_range(t_min: float, t_max: float) -> None:
    """The clipped schedule's range [t_min, t_max] must lie in (0, 1] and be non-empty."""
    if not 0 < t_min <= t_max <= 1:
        raise SmdmError(f"the masking-rate range must satisfy 0 < t_min <= t_max <= 1, got [{t_min}, {t_max}]")


def shifted_sources(length: int, block_size: int, device: torch.device | None = None) -> torch.Tensor:
    """(2L,) the hidden state that predicts each position of a shifted model's [noisy | clean] pass.

    Noisy token i comes from noisy position i-1 inside its block and, at a block's first position, from the clean
    copy of token i-1 (slot L + i - 1: the last token of the clean block before it, visible to the noisy block);
    clean token i from clean position i-1. Position 0 of each half keeps its own state (no prediction is asked).
    """
    i = torch.arange(length, device=device)
    noisy = torch.where(i % block_size == 0, length + i - 1, i - 1)
    sources = torch.cat([noisy, length + i - 1])
    sources[0], sources[length] = 0, length
    return sources


def vectorised_logits(model: torch.nn.Module, noisy: torch.Tensor, clean: torch.Tensor, block_size: int,
                      select: torch.Tensor | None = None, kernel: str = "auto") -> torch.Tensor:
    """Logits of the noisy half from one pass over [noisy | clean] (2L tokens) under the block-diffusion mask.

    `select` (bool, B x L) keeps only those noisy positions, flattened (n, V), as `Transformer.forward` does.
    `kernel` picks the attention implementation (`training_attention`); every kernel computes the same function.
    """
    _batch, length = noisy.shape
    positions = torch.arange(length, device=noisy.device).repeat(2)[None]  # clean copy: same RoPE positions
    mask = training_attention(length, block_size, noisy.device, kernel)
    x = torch.cat([noisy, clean], dim=1)
    shift = {"unshift_index": shifted_sources(length, block_size, noisy.device)} if is_shifted(model) else {}
    if select is None:
        return model(x, positions=positions, attn_mask=mask, **shift)[:, :length]
    wide_select = torch.cat([select, torch.zeros_like(select)], dim=1)
    return model(x, select=wide_select, positions=positions, attn_mask=mask, **shift)


def block_diffusion_ce(model: torch.nn.Module, tokens: torch.Tensor, noisy: torch.Tensor, masked: torch.Tensor,
                       mask_prob: torch.Tensor, block_size: int, clean: torch.Tensor | None = None,
                       weighting: str = "elbo") -> torch.Tensor:
    """(n_masked,) cross-entropy / t of each masked token, in `masked.nonzero()` order; mask_prob is (B, L).

    `clean` is the clean stream fed to the model (default `tokens`; classifier-free-guidance training hides the
    prompt there too); `tokens` are the targets. `weighting` "ce" leaves out the 1/t (Sahoo et al. 2026).
    """
    logits = vectorised_logits(model, noisy, tokens if clean is None else clean, block_size, select=masked)
    token_ce = F.cross_entropy(logits.float(), tokens[masked], reduction="none")
    if weighting == "ce":
        return token_ce
    return token_ce / mask_prob.to(logits.device)[masked].float()


def mask_blocks(tokens: torch.Tensor, block_times: torch.Tensor, block_size: int, mask_id: int,
                generator: torch.Generator | None = None,
                maskable: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward process per block: (noisy tokens, masked positions, per-token masking rate (B, L))."""
    mask_prob = block_times.repeat_interleave(block_size, dim=1)[:, : tokens.size(1)].to(tokens.device)
    masked = torch.rand(tokens.shape, generator=generator).to(tokens.device) < mask_prob
    if maskable is not None:
        masked &= maskable
    return tokens.masked_fill(masked, mask_id), masked, mask_prob


def bdm_step_loss(model: torch.nn.Module, tokens: torch.Tensor, block_size: int,
                  generator: torch.Generator | None = None, t_min: float = MASK_EPS, t_max: float = 1.0,
                  low_discrepancy: bool = False, mask_id: int | None = None, weighting: str = "elbo") -> torch.Tensor:
    """One Monte-Carlo draw of the block-diffusion loss, sum of CE / t over masked tokens / (batch x length)
    (weighting "ce": the plain CE over masked tokens / (batch x length)).

    A length that is not a multiple of the block size (a random-length batch) ends in a shorter last block.
    """
    mask_id = model.mask_id if mask_id is None else mask_id
    times = sample_block_times(tokens.size(0), -(-tokens.size(1) // block_size), generator, t_min, t_max,
                               low_discrepancy)
    noisy, masked, mask_prob = mask_blocks(tokens, times, block_size, mask_id, generator,
                                           maskable=predicted_positions(model, tokens))
    return block_diffusion_ce(model, tokens, noisy, masked, mask_prob, block_size,
                              weighting=weighting).sum() / tokens.numel()


def bdm_sft_step_loss(model: torch.nn.Module, tokens: torch.Tensor, prompt_lengths: torch.Tensor, block_size: int,
                      generator: torch.Generator | None = None, prompt_dropout: float = 0.0,
                      t_min: float = MASK_EPS, t_max: float = 1.0, low_discrepancy: bool = False,
                      mask_id: int | None = None, weighting: str = "elbo") -> torch.Tensor:
    """SFT: only response tokens are masked and scored; each row's sum of CE / t is divided by its response length,
    then rows are averaged (as `smdm.diffusion.mdm_sft_step_loss`).

    prompt_dropout hides a row's prompt behind [MASK] in both streams (the unconditional model of classifier-free
    guidance, which the sampler reproduces by caching the [MASK]ed prompt).
    """
    mask_id = model.mask_id if mask_id is None else mask_id
    batch, length = tokens.shape
    prompt_lengths = prompt_lengths.to(tokens.device)
    response = sft_maskable(model, tokens, prompt_lengths)
    times = sample_block_times(batch, -(-length // block_size), generator, t_min, t_max, low_discrepancy)
    noisy, masked, mask_prob = mask_blocks(tokens, times, block_size, mask_id, generator, maskable=response)
    clean = tokens
    if prompt_dropout > 0:
        dropped = (torch.rand(batch, generator=generator) < prompt_dropout).to(tokens.device)[:, None] & ~response
        noisy, clean = noisy.masked_fill(dropped, mask_id), tokens.masked_fill(dropped, mask_id)
    weighted = block_diffusion_ce(model, tokens, noisy, masked, mask_prob, block_size, clean, weighting)
    rows = masked.nonzero()[:, 0]
    per_row = torch.zeros(batch, device=tokens.device).index_add_(0, rows, weighted)
    return (per_row / (length - prompt_lengths).clamp_min(1)).mean()


# --- Sampling ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockSampler:
    """Validated settings of block-diffusion sampling (one object, checked before any model call)."""

    block_size: int
    steps: int
    remasking: str = "low_confidence"
    temperature: float = 0.0
    top_p: float = 1.0
    threshold: float | None = None
    cfg_scale: float | None = None
    cache: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise SmdmError(f"the diffusion block size must be at least 1, got {self.block_size}")
        if not 1 <= self.steps <= self.block_size:
            raise SmdmError(f"steps per block must lie in [1, {self.block_size}] (the block size), got {self.steps}")
        if self.remasking not in REMASKINGS:
            raise SmdmError(f"unknown remasking {self.remasking!r}; use one of {', '.join(REMASKINGS)}")
        if self.threshold is not None and not (0 < self.threshold <= 1 and self.remasking == "low_confidence"):
            raise SmdmError("the confidence threshold must lie in (0, 1] and needs remasking low_confidence")
        if self.temperature < 0 or not math.isfinite(self.temperature):
            raise SmdmError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise SmdmError(f"top_p must lie in (0, 1], got {self.top_p}")
        if self.cfg_scale is not None and not math.isfinite(self.cfg_scale):
            raise SmdmError(f"cfg_scale must be a finite number, got {self.cfg_scale}")


@dataclass(frozen=True)
class BlockLayout:
    """Prompts left-padded by whole blocks, so block boundaries are the same columns in every row.

    Row r holds its P_r // B full prompt blocks just before column `start`; the P_r % B tail tokens open the first
    generated block (they stay fixed while its masked rest is denoised, as an unmasked token of a noisy block in
    training). Positions count from each row's first real token, so block boundaries are multiples of B in position
    too, as in training.
    """

    tokens: torch.Tensor  # (B, total): pads, prompts, [MASK] everywhere after
    pad: torch.Tensor  # (B,) pad columns of each row, a multiple of the block size
    starts: torch.Tensor  # (B,) first generated column of each row
    start: int  # first column of the first generated block
    block_size: int

    @staticmethod
    def columns(prompt_lengths: list[int], length: int, block_size: int) -> tuple[list[int], int, int]:
        """(pad columns of each row, total columns, positions the longest row needs) of a batch's layout."""
        full = [n // block_size for n in prompt_lengths]
        first = max(full)
        num_blocks = -(-(max(n % block_size for n in prompt_lengths) + length) // block_size)
        total = (first + num_blocks) * block_size
        pad = [(first - n) * block_size for n in full]
        return pad, total, total - min(pad)

    @classmethod
    def check_fits(cls, prompt_lengths: list[int], length: int, block_size: int,
                   context: int) -> tuple[list[int], int, int]:
        """`columns`, refusing a layout that needs more positions than the context."""
        pad, total, needed = cls.columns(prompt_lengths, length, block_size)
        if needed > context:
            raise ContextLengthError(f"prompt ({max(prompt_lengths)}) + generation ({length}) tokens in whole "
                                     f"blocks of {block_size} need {needed} positions: they exceed the context "
                                     f"length {context}")
        return pad, total, needed

    @classmethod
    def build(cls, prompts: list[list[int]], length: int, block_size: int, pad_id: int, mask_id: int,
              context: int, device: torch.device) -> BlockLayout:
        pad, total, _ = cls.check_fits([len(p) for p in prompts], length, block_size, context)
        first = max(len(p) // block_size for p in prompts)
        tokens = torch.full((len(prompts), total), mask_id, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            tokens[row, : pad[row]] = pad_id
            tokens[row, pad[row]: pad[row] + len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        pad_t = torch.tensor(pad, device=device)
        starts = pad_t + torch.tensor([len(p) for p in prompts], device=device)
        return cls(tokens.to(device), pad_t, starts, first * block_size, block_size)

    @property
    def total(self) -> int:
        return self.tokens.size(1)

    def positions(self) -> torch.Tensor:
        columns = torch.arange(self.total, device=self.tokens.device)[None]
        return (columns - self.pad[:, None]).clamp_min(0)

    def key_real(self) -> torch.Tensor | None:
        """(B, total) True off the pad columns; None without padding."""
        if not bool(self.pad.any()):
            return None
        return torch.arange(self.total, device=self.tokens.device)[None] >= self.pad[:, None]

    def prompt_mask(self) -> torch.Tensor:
        columns = torch.arange(self.total, device=self.tokens.device)[None]
        return (columns >= self.pad[:, None]) & (columns < self.starts[:, None])

    def generated(self) -> torch.Tensor:
        """(B, total) True at the columns the sampler may write."""
        return torch.arange(self.total, device=self.tokens.device)[None] >= self.starts[:, None]


def _denoise_block(logits: torch.Tensor, block: torch.Tensor, writable: torch.Tensor, mask_id: int,
                   settings: BlockSampler, step: int, generator: torch.Generator | None) -> torch.Tensor:
    """The block after one denoising step (LLaDA-style low-confidence or the reverse process's random reveal)."""
    from smdm.sample import reveal_low_confidence, reveal_random, sample_tokens, tokens_to_reveal

    masked = (block == mask_id) & writable
    if settings.remasking == "random":
        reveal = reveal_random(masked, step, settings.steps, generator)
        return block.masked_scatter(reveal, sample_tokens(logits[reveal], settings.temperature, settings.top_p,
                                                          generator))
    candidates = logits[masked]
    predicted = sample_tokens(candidates, settings.temperature, settings.top_p, generator)
    chosen = candidates.float().gather(-1, predicted[:, None]).squeeze(-1)
    confidence = torch.full(block.shape, -float("inf"), device=block.device)
    confidence[masked] = (chosen - candidates.float().logsumexp(-1)).exp()
    count = tokens_to_reveal(masked.sum(-1), settings.steps - step)
    reveal = reveal_low_confidence(confidence, masked, count, settings.threshold)
    return torch.where(reveal, block.masked_scatter(masked, predicted), block)


class _Rows:
    """The model batch: the rows, and under CFG also their copies with the prompt replaced by [MASK]."""

    def __init__(self, layout: BlockLayout, mask_id: int, guided: bool) -> None:
        copies = 2 if guided else 1
        self.guided, self.mask_id = guided, mask_id
        self.prompt_mask = layout.prompt_mask()
        self.positions = layout.positions().repeat(copies, 1)
        key_real = layout.key_real()
        self.key_real = None if key_real is None else key_real.repeat(copies, 1)

    def of(self, x: torch.Tensor, columns: slice) -> torch.Tensor:
        if not self.guided:
            return x[:, columns]
        return torch.cat([x, x.masked_fill(self.prompt_mask, self.mask_id)])[:, columns]

    def guide(self, logits: torch.Tensor, cfg_scale: float | None) -> torch.Tensor:
        if not self.guided:
            return logits
        cond, uncond = logits.chunk(2)
        return cond + cfg_scale * (cond - uncond)


def _setup_cache(model: Transformer, batch: int, max_len: int) -> None:
    """Per-layer KV caches on a bidirectional model (`setup_kv_cache` is for causal ones; the mask does the rest)."""
    param = model.lm_head.weight
    for block in model.blocks:
        block.attn.kv_cache = KVCache(batch, model.config.n_query_groups, max_len, model.config.head_size,
                                      device=param.device, dtype=param.dtype)


def block_logits(model: Transformer, x: torch.Tensor, rows: _Rows, settings: BlockSampler,
                  fresh: int, end: int) -> torch.Tensor:
    """Logits (B, block, V) of the block ending at column `end`.

    Cached: the pass covers columns [fresh, end): the finished block(s) not yet cached, then the noisy block.
    Uncached: everything up to `end` is recomputed under the same block-causal rule. A shifted model predicts the
    block's first token from the column before it, so its cached passes start there (that clean column is recomputed
    under the same rule, which writes the same keys into its slot again).
    """
    begin = fresh if settings.cache else 0
    start = end - settings.block_size
    if begin == start > 0 and model.config.shifted:
        begin -= 1
    query = torch.arange(begin, end, device=x.device)
    key_real = rows.key_real
    if settings.cache:
        keys = model.blocks[0].attn.kv_cache.k.size(2)
        mask = block_causal_mask(query, keys, settings.block_size, key_real)
        logits = model(rows.of(x, slice(begin, end)), input_pos=query, positions=rows.positions[:, begin:end],
                       attn_mask=mask)
    else:
        mask = block_causal_mask(query, end, settings.block_size, None if key_real is None else key_real[:, :end])
        logits = model(rows.of(x, slice(0, end)), positions=rows.positions[:, :end], attn_mask=mask)
    return rows.guide(logits[:, -settings.block_size:], settings.cfg_scale)


@torch.no_grad()
def block_sample(model: Transformer, prompts: list[list[int]], length: int, settings: BlockSampler,
                 generator: torch.Generator | None = None, eos_id: int | None = None,
                 stop_at_eos: bool = False,
                 on_step: Callable[[int, torch.Tensor], None] | None = None) -> tuple[BlockLayout, torch.Tensor, int]:
    """Generate `length` tokens after each prompt, block by block; returns (layout, tokens, forward passes).

    With `stop_at_eos`, generation ends after the first block in which every row has produced an EOS.
    on_step(step, tokens) sees the token grid after every denoising step.
    """
    mask_id = model.mask_id
    layout = BlockLayout.build(prompts, length, settings.block_size, eos_id if eos_id is not None else 0, mask_id,
                               model.config.block_size, model.lm_head.weight.device)
    rows = _Rows(layout, mask_id, settings.cfg_scale is not None)
    x = layout.tokens.clone()
    writable = layout.generated()
    size, passes = settings.block_size, 0
    if settings.cache:
        _setup_cache(model, x.size(0) * (2 if rows.guided else 1), layout.total)
    try:
        fresh = 0  # first column whose clean keys are not cached yet
        for start in range(layout.start, layout.total, size):
            end = start + size
            for step in range(settings.steps):
                if not ((x[:, start:end] == mask_id) & writable[:, start:end]).any():
                    break  # threshold decoding (or a prompt tail) finished the block early
                logits = block_logits(model, x, rows, settings, fresh, end)
                passes += 1
                fresh = start
                x[:, start:end] = _denoise_block(logits, x[:, start:end], writable[:, start:end], mask_id, settings,
                                                 step, generator)
                if on_step is not None:
                    on_step(passes - 1, x)
            if stop_at_eos and eos_id is not None and bool(((x[:, :end] == eos_id) & writable[:, :end]).any(1).all()):
                break
    finally:
        if settings.cache:
            model.clear_kv_cache()
    return layout, x, passes


def block_settings(model: Transformer, length: int, steps: int | None = None, temperature: float = 0.0, *,
                   remasking: str = "low_confidence", block_length: int | None = None, cfg_scale: float | None = None,
                   threshold: float | None = None, cache: str | None = None, top_p: float = 1.0,
                   eos_id: int | None = None, stop_at_eos: bool = False) -> BlockSampler:
    """Validate `generate`'s options for a block-diffusion model (its block size is the model's, not an option)."""
    block_size = model.diffusion_block_size
    if block_length is not None and block_length != block_size:
        raise SmdmError(f"this block-diffusion model was trained with block size {block_size}; "
                        f"block length {block_length} does not match it")
    if cache not in (None, "kv", "none"):
        raise SmdmError(f"unknown block-diffusion cache {cache!r}; use kv or none")
    if length < 1:
        raise SmdmError(f"the generation length must be at least 1, got {length}")
    if stop_at_eos and eos_id is None:
        raise SmdmError("stop_at_eos needs the EOS id")
    return BlockSampler(block_size, block_size if steps is None else steps, remasking, temperature, top_p,
                        threshold, cfg_scale, cache != "none")


def generate_blocks(model: Transformer, prompt_ids: PromptIds, length: int, steps: int | None = None,
                    temperature: float = 0.0, generator: torch.Generator | None = None,
                    on_step: Callable[[int, torch.Tensor], None] | None = None, *, remasking: str = "low_confidence",
                    block_length: int | None = None,
                    cfg_scale: float | None = None, threshold: float | None = None, cache: str | None = None,
                    top_p: float = 1.0, eos_id: int | None = None, stop_at_eos: bool = False) -> Generation:
    """`smdm.sample.generate` for a block-diffusion model (`model.diffusion_block_size` set by the loader).

    steps: denoising passes per block (default: the block size, one token per pass); cache: "kv" (default, exact)
    or "none" (recompute the prefix every pass; the same tokens). Returns a `smdm.sample.Generation` whose
    `width` is the first generated block's column (a row's prompt tail may sit right after it).
    """
    from smdm.sample import Generation, _as_prompt_lists, truncate_at_eos

    settings = block_settings(model, length, steps, temperature, remasking=remasking, block_length=block_length,
                              cfg_scale=cfg_scale, threshold=threshold, cache=cache, top_p=top_p, eos_id=eos_id,
                              stop_at_eos=stop_at_eos)
    prompts = _as_prompt_lists(prompt_ids)
    vocab = model.config.vocab_size
    if any(not 0 <= i < vocab for prompt in prompts for i in prompt):
        raise SmdmError(f"prompt ids must lie in [0, {vocab}) (the vocabulary, [MASK] excluded)")
    check_shifted_context(model, min(len(p) for p in prompts), "a prompt of at least one token (e.g. EOS)")
    layout, tokens, passes = block_sample(model, prompts, length, settings, generator, eos_id, stop_at_eos, on_step)
    completions = [row[begin: begin + length]
                   for row, begin in zip(tokens.tolist(), layout.starts.tolist(), strict=True)]
    completions = [[i for i in ids if i != model.mask_id] for ids in completions]  # blocks skipped after all EOS
    if eos_id is not None:
        completions = [truncate_at_eos(ids, eos_id) for ids in completions]
    return Generation(tokens, [len(p) for p in prompts], completions, passes, layout.start)


# --- Likelihood ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def block_score(model: Transformer, prefix: list[int], target: list[int], block_size: int, mc_samples: int = 64,
                batch_size: int = 16, seed: int = 0, t_min: float = MASK_EPS) -> ScoreResult:
    """Monte-Carlo block ELBO of -log p(target | prefix), with its standard error (a `ScoreResult`).

    Blocks are aligned at position 0 of prefix + target; only target tokens are masked, each block at its own rate
    t ~ U[t_min, 1], stratified over the draws. Each draw is one vectorised pass. Block size 1 is scored exactly
    (every target token masked, weight 1: the chain rule), with standard error 0.
    """
    from smdm.likelihood import ScoreResult

    if not target:
        raise SmdmError("the target to score is empty")
    if block_size < 1:
        raise SmdmError(f"the diffusion block size must be at least 1, got {block_size}")
    if len(prefix) + len(target) > model.config.block_size:
        raise SmdmError(f"prefix ({len(prefix)}) + target ({len(target)}) tokens exceed the context "
                        f"{model.config.block_size}")
    check_shifted_context(model, len(prefix), "a non-empty prefix")
    if block_size > 1 and (mc_samples < 2 or batch_size < 1):
        raise SmdmError("mc_samples must be at least 2 and batch_size at least 1")
    device = model.lm_head.weight.device
    tokens = torch.tensor(prefix + target, device=device)[None]
    length = tokens.size(1)
    num_blocks = -(-length // block_size)
    maskable = torch.arange(length, device=device)[None] >= len(prefix)
    generator = torch.Generator().manual_seed(seed)
    draws: list[torch.Tensor] = []
    passes = 0
    needed = 1 if block_size == 1 else mc_samples
    while len(draws) < needed:
        n = min(batch_size, needed - len(draws))
        if block_size == 1:
            times = torch.ones(n, num_blocks)
        else:
            times = sample_block_times(n, num_blocks, generator, t_min, 1.0, low_discrepancy=True)
        batch = tokens.repeat(n, 1)
        noisy, masked, mask_prob = mask_blocks(batch, times, block_size, model.mask_id, generator,
                                               maskable=maskable.expand(n, -1))
        weighted = block_diffusion_ce(model, batch, noisy, masked, mask_prob, block_size).double()
        per_draw = torch.zeros(n, dtype=torch.float64, device=device).index_add_(0, masked.nonzero()[:, 0], weighted)
        draws.extend(per_draw.cpu().unbind())
        passes += 1
    values = torch.stack(draws)
    stderr = 0.0 if len(values) < 2 else (values.std() / math.sqrt(len(values))).item()
    return ScoreResult(values.mean().item(), stderr, len(target), passes)


@torch.no_grad()
def block_chain_score(model: Transformer, prefix: list[int], target: list[int], block_size: int,
                      batch_size: int = 32) -> ScoreResult:
    """Exact -log p(target | prefix) of a block-diffusion model for the left-to-right reveal order in each block.

    Row k sees the clean blocks before its block and the tokens of its block up to target[k] revealed, the rest
    masked (later blocks are masked too, and invisible under the block-causal mask); it scores target[k]. Block size
    1 is the autoregressive chain rule; one block is the MDM's `chain_rule_score`.
    """
    from smdm.likelihood import ScoreResult

    if not target:
        raise SmdmError("the target to score is empty")
    if len(prefix) + len(target) > model.config.block_size:
        raise SmdmError(f"prefix ({len(prefix)}) + target ({len(target)}) tokens exceed the context "
                        f"{model.config.block_size}")
    check_shifted_context(model, len(prefix), "a non-empty prefix")
    device = model.lm_head.weight.device
    full = torch.tensor(prefix + target, device=device)
    start, length = len(prefix), len(prefix) + len(target)
    mask = block_causal_mask(torch.arange(length, device=device), length, block_size)
    columns = torch.arange(length, device=device)[None]
    total, passes = 0.0, 0
    for first in range(0, len(target), batch_size):
        where = start + torch.arange(first, min(len(target), first + batch_size), device=device)
        x = full[None].repeat(len(where), 1).masked_fill(columns >= where[:, None], model.mask_id)
        rows = torch.arange(len(where), device=device)
        log_probs = model(x, attn_mask=mask)[rows, where].float().log_softmax(-1)
        total -= log_probs[rows, full[where]].sum().item()
        passes += 1
    return ScoreResult(total, 0.0, len(target), passes)
