"""A LLaMA-style Transformer used two ways: bidirectional (masked diffusion) and causal (autoregressive).

RMSNorm, rotary position embeddings (rotate-half convention of GPT-NeoX / lit-gpt / HF Llama), SwiGLU,
grouped-query attention through `F.scaled_dot_product_attention`; by default no biases and an untied output head.
By default the embedding has `vocab_size + 1` rows: id `vocab_size` is [MASK]; the head predicts only real tokens.
ModelConfig's knobs for imported architectures (mask id inside the vocabulary, q/k/v biases, tied head, shifted
predictions) change only what they name; with their defaults the model is exactly smdm's own.
A causal model can decode with a KV cache. Batches of different lengths are left-padded: `positions` gives each
row its own RoPE positions and `key_mask` hides the pad columns, so a padded row computes what it would alone.
A bidirectional model can reuse the keys/values of the columns outside a recomputed window (`WindowCache`).
Nothing here knows about devices, parallelism or training.
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


class WindowKV:
    """One layer's keys/values of the columns outside a recomputed window, for bidirectional reuse (Fast-dLLM).

    The first forward pass (over the whole sequence) records the keys/values before `start` and from `end` on;
    later passes over the window [start, end) attend to [recorded before | fresh window | recorded after], the
    column order of the whole sequence. Exact where the recorded keys cannot depend on the window: the first
    layer, whose keys are a function of the token and its position alone; in deeper layers it is Fast-dLLM's
    approximation, since every position of a bidirectional model attends to the window.
    """

    def __init__(self, start: int, end: int | None) -> None:
        self.start, self.end = start, end
        self.before: tuple[torch.Tensor, torch.Tensor] | None = None
        self.after: tuple[torch.Tensor, torch.Tensor] | None = None

    def keys_values(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Record (first pass) or surround the window's k, v (B, kv_heads, T, head_size) with the recorded ones."""
        if self.before is None or self.after is None:
            end = k.size(2) if self.end is None else self.end
            self.before = (k[:, :, : self.start], v[:, :, : self.start])
            self.after = (k[:, :, end:], v[:, :, end:])
            return k, v
        return (torch.cat([self.before[0], k, self.after[0]], dim=2),
                torch.cat([self.before[1], v, self.after[1]], dim=2))


class WindowCache:
    """A WindowKV per layer: pass it to every forward of one block of semi-autoregressive MDM decoding."""

    def __init__(self, n_layer: int, start: int, end: int | None = None) -> None:
        if start < 0 or (end is not None and end <= start):
            raise SmdmError(f"window [{start}, {end}) is empty or negative")
        self.start, self.end = start, end
        self.layers = [WindowKV(start, end) for _ in range(n_layer)]
        # A shifted model's logits at `start` come from the hidden state at start - 1, outside the window: recorded
        # by the whole-sequence pass like the keys/values (the same approximation).
        self.shift_carry: torch.Tensor | None = None

    @property
    def recorded(self) -> bool:
        """True once a whole-sequence pass has stored the keys/values outside the window."""
        return self.layers[0].before is not None


def attention_mask(q_len: int, k_len: int, causal: bool, key_mask: torch.Tensor | None,
                   input_pos: torch.Tensor | None) -> tuple[torch.Tensor | None, bool]:
    """The (mask, is_causal) pair for SDPA; None/flag when no padding and no cache, the fast path.

    A KV cache makes causality a comparison of slots (query at slot p sees slots <= p). With padding, a query may
    attend to itself even if it is a pad, so no row is fully masked (that would give NaN through 0 * NaN later).
    """
    if input_pos is None and key_mask is None:
        return None, causal
    allowed = None
    if input_pos is not None:
        key_slots = torch.arange(k_len, device=input_pos.device)
        allowed = input_pos[:, None] >= key_slots[None, :]
    elif causal:
        allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=key_mask.device).tril(k_len - q_len)
    if key_mask is not None:
        keys = key_mask[:, None, None, :k_len]
        allowed = keys if allowed is None else allowed & keys
        if input_pos is not None or causal:
            query_slots = input_pos if input_pos is not None else torch.arange(k_len - q_len, k_len,
                                                                                device=key_mask.device)
            allowed = allowed | (query_slots[:, None] == torch.arange(k_len, device=key_mask.device)[None, :])
    return allowed, False


class Attention(nn.Module):
    """Grouped-query self-attention; one fused QKV projection laid out as [all q heads | k heads | v heads]."""

    def __init__(self, config: ModelConfig, causal: bool) -> None:
        super().__init__()
        self.causal = causal
        self.n_head = config.n_head
        self.n_kv = config.n_query_groups
        self.head_size = config.head_size
        self.qkv = nn.Linear(config.n_embd, (self.n_head + 2 * self.n_kv) * self.head_size, bias=config.qkv_bias)
        self.proj = nn.Linear(self.n_head * self.head_size, config.n_embd, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                input_pos: torch.Tensor | None = None, key_mask: torch.Tensor | None = None,
                window: WindowKV | None = None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        # Split the fused weight, not the fused output: the output's strided views cost a gradient concat in backward.
        sizes = [self.n_head * self.head_size, self.n_kv * self.head_size, self.n_kv * self.head_size]
        if type(self.qkv) is not nn.Linear:  # wrapped (a LoRA layer, smdm.lora): its own forward adds the update
            q, k, v = self.qkv(x).split(sizes, dim=-1)
        else:
            wq, wk, wv = self.qkv.weight.split(sizes, dim=0)
            bq, bk, bv = (None,) * 3 if self.qkv.bias is None else self.qkv.bias.split(sizes, dim=0)  # Qwen2, Dream
            q, k, v = F.linear(x, wq, bq), F.linear(x, wk, bk), F.linear(x, wv, bv)
        q = q.view(batch, seq_len, self.n_head, self.head_size).transpose(1, 2)
        k = k.view(batch, seq_len, self.n_kv, self.head_size).transpose(1, 2)
        v = v.view(batch, seq_len, self.n_kv, self.head_size).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        cache_slots = None
        if self.kv_cache is not None and input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
            cache_slots = input_pos  # each query at slot p sees cached slots <= p (later slots are unwritten)
        elif window is not None:
            k, v = window.keys_values(k, v)
        if attn_mask is not None and not isinstance(attn_mask, torch.Tensor):  # a FlexAttention BlockMask
            y = flex_attention(q, k, v, attn_mask, grouped=self.n_kv != self.n_head)
        else:
            is_causal = False
            if attn_mask is None:
                attn_mask, is_causal = attention_mask(seq_len, k.size(2), self.causal, key_mask, cache_slots)
            if self.n_kv != self.n_head:
                k = k.repeat_interleave(self.n_head // self.n_kv, dim=1)
                v = v.repeat_interleave(self.n_head // self.n_kv, dim=1)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal and seq_len > 1)
        return self.proj(y.transpose(1, 2).reshape(batch, seq_len, self.n_head * self.head_size))


_compiled_flex = None


def flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask, grouped: bool) -> torch.Tensor:
    """FlexAttention under a BlockMask: compiled (one fused kernel that skips hidden blocks) on CUDA, eager
    elsewhere (correct, but it materialises the scores: CPU training uses the boolean SDPA mask instead)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention as flex

    if q.device.type == "cuda":
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex, dynamic=False)
        return _compiled_flex(q, k, v, block_mask=block_mask, enable_gqa=grouped)
    import warnings

    with warnings.catch_warnings():  # "called without torch.compile()": deliberate off CUDA (tests, CPU checks)
        warnings.simplefilter("ignore", UserWarning)
        return flex(q, k, v, block_mask=block_mask, enable_gqa=grouped)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); gate and up share one matmul. SMDM names: w1 = gate, w2 = up, w3 = down."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.hidden = config.intermediate_size
        self.gate_up = nn.Linear(config.n_embd, 2 * self.hidden, bias=False)
        self.down = nn.Linear(self.hidden, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if type(self.gate_up) is not nn.Linear:  # wrapped (a LoRA layer): its own forward adds the update
            gate, up = self.gate_up(x).split(self.hidden, dim=-1)
            return self.down(F.silu(gate) * up)
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
        self.dropout = 0.0  # on both branch outputs in training only; set by `set_dropout`, never saved

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                input_pos: torch.Tensor | None = None, key_mask: torch.Tensor | None = None,
                window: WindowKV | None = None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self._drop(self.attn(self.attn_norm(x), cos, sin, input_pos, key_mask, window, attn_mask))
        return x + self._drop(self.mlp(self.mlp_norm(x)))

    def _drop(self, branch: torch.Tensor) -> torch.Tensor:
        if self.dropout and self.training:
            return F.dropout(branch, self.dropout, training=True)
        return branch


class TiedHead(nn.Module):
    """Output head that reuses the first `rows` rows of the token embedding (tied weights): no parameter of its own,
    so the matrix is stored, trained and saved once, under `embed.weight`."""

    def __init__(self, embed: nn.Embedding, rows: int) -> None:
        super().__init__()
        object.__setattr__(self, "_embed", embed)  # a plain reference, not a submodule: no second state-dict key
        self.rows = rows

    @property
    def weight(self) -> torch.Tensor:
        return self._embed.weight[: self.rows]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class Transformer(nn.Module):
    """The whole network. `causal=False` gives the MDM's bidirectional mask predictor, `causal=True` an ARM."""

    def __init__(self, config: ModelConfig, causal: bool = False, diffusion_block_size: int | None = None) -> None:
        super().__init__()
        if causal and config.shifted:
            raise SmdmError("a shifted model (logit i predicts token i+1) is an MDM adapted from an ARM; "
                            "load it bidirectional")
        self.config = config
        self.causal = causal
        # Block diffusion (BD3-LM): the block size its samplers and scorers work in; None for an MDM or an ARM.
        self.diffusion_block_size = diffusion_block_size
        self.embed = nn.Embedding(config.embedding_rows, config.n_embd)  # + [MASK] unless it is inside the vocab
        self.blocks = nn.ModuleList(Block(config, causal) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head: nn.Module = (TiedHead(self.embed, config.vocab_size) if config.tie_embeddings
                                   else nn.Linear(config.n_embd, config.vocab_size, bias=False))
        cos, sin = build_rope_cache(config.block_size, config.head_size, config.rope_base)
        if config.rope_cache_dtype == "bf16":  # SMDM's tables, kept in bf16 so bf16 activations multiply them in bf16
            cos, sin = cos.bfloat16(), sin.bfloat16()
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
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def mask_id(self) -> int:
        return self.config.mask_id

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor | None = None,
                select: torch.Tensor | None = None, *, positions: torch.Tensor | None = None,
                key_mask: torch.Tensor | None = None, window: WindowCache | None = None,
                attn_mask: torch.Tensor | None = None, unshift_index: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab_size) for token ids (B, T). With a KV cache, `input_pos` gives the slots of idx.

        `select` (bool, B x T) returns logits only at those positions, flattened to (n, vocab_size): the MDM loss
        needs the output head only at masked positions, which saves most of its cost at low mask rates.
        `positions` (B, T) are per-row RoPE positions (default: `input_pos`, else 0..T-1); `key_mask` (bool, B x K)
        marks the key columns that may be attended (K: the cache length, or the whole sequence with `window`);
        `window` reuses the keys/values of the columns outside idx (see WindowCache; bidirectional models only).
        A `shifted` model's network predicts token i+1 at position i; its hidden states are moved one position right
        here (position 0 keeps its own, as Dream's sampler does: `cat([logits[:, :1], logits[:, :-1]])`), so for
        every caller (samplers, likelihood, losses) the logits at i predict token i, and position 0 has no real
        prediction (callers never ask for it: a shifted model needs a non-empty prompt and never masks position 0).
        `unshift_index` (T,) replaces that move for inputs that are not one left-to-right stream: position i takes the
        hidden state at unshift_index[i] (block diffusion's [noisy | clean] pass, smdm.block_diffusion).
        `attn_mask` (bool, broadcastable to B x heads x T x K, True = may attend) replaces the causal / cache /
        `key_mask` rule with an explicit one: block diffusion's structured masks (smdm.block_diffusion); a
        FlexAttention `BlockMask` instead of the tensor runs attention through `flex_attention`.
        """
        if window is not None and (self.causal or input_pos is not None):
            raise SmdmError("a window cache is for bidirectional (MDM) models without a KV cache")
        if attn_mask is not None and (key_mask is not None or window is not None):
            raise SmdmError("an explicit attn_mask already says which keys are visible; drop key_mask / window")
        cos, sin = self._rope(idx.size(1), input_pos, positions)
        recording = window is not None and not window.recorded
        x = self.embed(idx)
        for index, block in enumerate(self.blocks):
            x = block(x, cos, sin, input_pos, key_mask, None if window is None else window.layers[index], attn_mask)
        if self.config.shifted:
            x = self._unshift(x, window, recording) if unshift_index is None else x.index_select(1, unshift_index)
        if select is not None:
            x = x[select]
        return self.lm_head(self.norm(x))

    @staticmethod
    def _unshift(x: torch.Tensor, window: WindowCache | None, recording: bool) -> torch.Tensor:
        """Hidden states (B, T, d) moved one position right, so position i holds the state that predicts token i."""
        if window is None or recording:
            if window is not None:
                start = max(window.start - 1, 0)
                window.shift_carry = x[:, start:start + 1]
            return torch.cat([x[:, :1], x[:, :-1]], dim=1)
        return torch.cat([window.shift_carry, x[:, :-1]], dim=1)

    def _rope(self, seq_len: int, input_pos: torch.Tensor | None,
              positions: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for the given positions, broadcastable to (B, heads, T, head_size); refuses positions past the block."""
        if positions is None and input_pos is None:
            if seq_len > self.config.block_size:
                raise SmdmError(f"sequence of {seq_len} tokens is longer than the context length {self.config.block_size}")
            return self.rope_cos[:seq_len], self.rope_sin[:seq_len]
        where = positions if positions is not None else input_pos
        if int(where.max()) >= self.config.block_size:
            raise SmdmError(f"position {int(where.max())} is past the context length {self.config.block_size}")
        if positions is None:
            return self.rope_cos[input_pos], self.rope_sin[input_pos]
        return self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]

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


def set_dropout(model: nn.Module, p: float) -> None:
    """Residual dropout on every block's attention and MLP outputs while training (GPT-2's resid_pdrop). A
    regulariser for repeated data: Gao et al. 2025 (*What Makes Diffusion Language Models Super Data Learners?*,
    arXiv 2510.04071) find dropout in the attention and MLP layers buys multi-epoch ARMs much of the MDM's data
    efficiency. A training setting, not part of the architecture: evaluation and sampling (`model.eval()`) never drop."""
    if not 0 <= p < 1:
        raise SmdmError(f"dropout must lie in [0, 1), got {p}")
    for block in model.modules():
        if isinstance(block, Block):
            block.dropout = p


INITS = ("gpt2", "smdm")  # `Transformer` itself draws the GPT-2 one; `smdm_init_` redraws the paper code's


@torch.no_grad()
def smdm_init_(model: Transformer) -> None:
    """Redraw `model`'s weights as ML-GSAI/SMDM does (lit_gpt/diffmodel.py `_init_weights`, applied by
    pretrain/train_mdm.py): every embedding and linear weight ~ N(0, 2/(5d)) (GPT-NeoX's "small init"), then the
    residual branches' output projections (attention `proj`, SwiGLU `down` = SMDM's `w3`) ~ N(0, (1/(sqrt(d)·L))^2).
    Norm gains stay 1. The head is a plain linear layer there too, so it gets the small init."""
    d, layers = model.config.n_embd, model.config.n_layer
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=math.sqrt(2.0 / (5 * d)))
    for block in model.blocks:
        for layer in (block.attn.proj, block.mlp.down):
            nn.init.normal_(layer.weight, mean=0.0, std=1.0 / math.sqrt(d) / layers)
