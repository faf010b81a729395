"""A LLaMA-style Transformer used two ways: bidirectional (masked diffusion) and causal (autoregressive).

RMSNorm, rotary position embeddings (rotate-half convention of GPT-NeoX / lit-gpt / HF Llama), SwiGLU,
grouped-query attention through `F.scaled_dot_product_attention`, no biases, untied output head.
The embedding has `vocab_size + 1` rows: id `vocab_size` is [MASK]; the head predicts only real tokens.
A causal model can decode with a KV cache. Nothing here knows about devices, parallelism or training.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from smdm.config import ModelConfig
from smdm.errors import SmdmError


class RMSNorm(nn.Module):
    """x / rms(x) · weight, computed in float32 for stability under bf16 autocast."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_float = x.float()
        normed = x_float * torch.rsqrt(x_float.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


def build_rope_cache(seq_len: int, head_size: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (seq_len, head_size); frequencies repeated for the two halves (rotate-half)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq).repeat(1, 2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+d/2}) by position-dependent angles; x is (B, heads, T, head_size)."""
    half = x.size(-1) // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class KVCache(nn.Module):
    """Keys and values of past positions for causal decoding: written at `input_pos`, read whole."""

    def __init__(self, batch_size: int, n_kv_heads: int, max_len: int, head_size: int,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        shape = (batch_size, n_kv_heads, max_len, head_size)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k = self.k.to(k.dtype)
        self.v = self.v.to(v.dtype)
        self.k.index_copy_(2, input_pos, k)
        self.v.index_copy_(2, input_pos, v)
        return self.k, self.v


class Attention(nn.Module):
    """Grouped-query self-attention; one fused QKV projection laid out as [all q heads | k heads | v heads]."""

    def __init__(self, config: ModelConfig, causal: bool) -> None:
        super().__init__()
        self.causal = causal
        self.n_head = config.n_head
        self.n_kv = config.n_query_groups
        self.head_size = config.head_size
        self.qkv = nn.Linear(config.n_embd, (self.n_head + 2 * self.n_kv) * self.head_size, bias=False)
        self.proj = nn.Linear(self.n_head * self.head_size, config.n_embd, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                input_pos: torch.Tensor | None = None) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        # Split the fused weight, not the fused output: the output's strided views cost a gradient concat in backward.
        wq, wk, wv = self.qkv.weight.split(
            [self.n_head * self.head_size, self.n_kv * self.head_size, self.n_kv * self.head_size], dim=0
        )
        q, k, v = F.linear(x, wq), F.linear(x, wk), F.linear(x, wv)
        q = q.view(batch, seq_len, self.n_head, self.head_size).transpose(1, 2)
        k = k.view(batch, seq_len, self.n_kv, self.head_size).transpose(1, 2)
        v = v.view(batch, seq_len, self.n_kv, self.head_size).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        attn_mask = None
        is_causal = self.causal
        if self.kv_cache is not None and input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
            # Each query at position p sees cached keys at positions <= p (later slots are unwritten).
            key_pos = torch.arange(k.size(2), device=x.device)
            attn_mask = input_pos[:, None] >= key_pos[None, :]
            is_causal = False
        if self.n_kv != self.n_head:
            k = k.repeat_interleave(self.n_head // self.n_kv, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal and seq_len > 1)
        return self.proj(y.transpose(1, 2).reshape(batch, seq_len, self.n_head * self.head_size))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); gate and up share one matmul. SMDM names: w1 = gate, w2 = up, w3 = down."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.hidden = config.intermediate_size
        self.gate_up = nn.Linear(config.n_embd, 2 * self.hidden, bias=False)
        self.down = nn.Linear(self.hidden, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w_gate, w_up = self.gate_up.weight.split(self.hidden, dim=0)  # see Attention.forward: split weights
        return self.down(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, causal: bool) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = Attention(config, causal)
        self.mlp_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                input_pos: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, input_pos)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """The whole network. `causal=False` gives the MDM's bidirectional mask predictor, `causal=True` an ARM."""

    def __init__(self, config: ModelConfig, causal: bool = False) -> None:
        super().__init__()
        self.config = config
        self.causal = causal
        self.embed = nn.Embedding(config.vocab_size + 1, config.n_embd)  # + [MASK]
        self.blocks = nn.ModuleList(Block(config, causal) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        cos, sin = build_rope_cache(config.block_size, config.head_size, config.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2 style: shrink the residual-branch outputs so the residual stream's variance does not grow with depth.
        for block in self.blocks:
            for layer in (block.attn.proj, block.mlp.down):
                nn.init.normal_(layer.weight, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def mask_id(self) -> int:
        return self.config.vocab_size

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor | None = None,
                select: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab_size) for token ids (B, T). With a KV cache, `input_pos` gives the positions of idx.

        `select` (bool, B x T) returns logits only at those positions, flattened to (n, vocab_size): the MDM loss
        needs the output head only at masked positions, which saves most of its cost at low mask rates.
        """
        seq_len = idx.size(1)
        if input_pos is None:
            if seq_len > self.config.block_size:
                raise SmdmError(f"sequence of {seq_len} tokens is longer than the block size {self.config.block_size}")
            cos, sin = self.rope_cos[:seq_len], self.rope_sin[:seq_len]
        else:
            if int(input_pos.max()) >= self.config.block_size:
                raise SmdmError(f"position {int(input_pos.max())} is past the block size {self.config.block_size}")
            cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x, cos, sin, input_pos)
        if select is not None:
            x = x[select]
        return self.lm_head(self.norm(x))

    def setup_kv_cache(self, batch_size: int, max_len: int | None = None) -> None:
        """Allocate per-layer caches for causal decoding of up to max_len positions."""
        if not self.causal:
            raise SmdmError("a KV cache needs a causal (ARM) model")
        max_len = max_len or self.config.block_size
        param = self.lm_head.weight
        for block in self.blocks:
            block.attn.kv_cache = KVCache(batch_size, self.config.n_query_groups, max_len, self.config.head_size,
                                          device=param.device, dtype=param.dtype)

    def clear_kv_cache(self) -> None:
        for block in self.blocks:
            block.attn.kv_cache = None
