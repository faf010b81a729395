"""Weight conversion between our Transformer and other layouts, so released checkpoints load without their code.

Two foreign layouts are supported:

* ML-GSAI/SMDM (lit-gpt / TinyLlama names). Its fused QKV is in lit-gpt's *grouped* layout: the output rows
  view as (n_query_groups, q_per_kv + 2, head_size) — per group q_per_kv query heads, then one key head, then one
  value head (see lit-gpt's `CausalSelfAttention.forward`, `qkv.view(B, T, n_query_groups, total_qkv, head_size)`).
  Ours is [all q heads | all k heads | all v heads]; both use query head j -> kv head j // q_per_kv.
  Its SwiGLU (xformers) computes w3(silu(w1 x) * w2 x): w1 = gate, w2 = up, w3 = down. Its RoPE is rotate-half
  (flash-attn's non-interleaved rotary), like ours, so q/k rows need no permutation.
* HF transformers `LlamaForCausalLM`: separate q/k/v/o and gate/up/down projections, rotate-half RoPE as well.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from smdm.config import ModelConfig
from smdm.errors import SmdmError
from smdm.model import Transformer

if TYPE_CHECKING:  # transformers is optional
    from transformers import LlamaConfig

# Prefixes that wrappers (torch.compile, DDP) add to every key without changing the weights.
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def _unwrap(sd: Mapping[str, Any], what: str, config: ModelConfig) -> dict[str, Any]:
    """Take the weights out of a training checkpoint ({"model": ...} / {"state_dict": ...}) and drop wrapper prefixes."""
    if not isinstance(sd, Mapping):
        raise SmdmError(f"not {what} for config {config.name}: expected a dict of tensors, got {type(sd).__name__}")
    for wrapper in ("model", "state_dict"):
        inner = sd.get(wrapper)
        if isinstance(inner, Mapping):
            sd = inner
            break
    out: dict[str, Any] = {}
    for key, value in sd.items():
        key = str(key)
        stripped = True
        while stripped:
            stripped = False
            for prefix in _WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        out[key] = value
    return out


def _check_keys(sd: Mapping[str, Any], expected: Mapping[str, tuple[tuple[int, ...], ...]], what: str,
                config: ModelConfig) -> None:
    """Fail on the first missing/unknown key or wrong shape, naming it, so a wrong checkpoint is obvious."""
    missing = [key for key in expected if key not in sd]
    unexpected = [key for key in sd if key not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing key {missing[0]!r}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
        if unexpected:
            parts.append(f"unexpected key {unexpected[0]!r}"
                         + (f" (+{len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
        raise SmdmError(f"not {what} for config {config.name}: {'; '.join(parts)}")
    for key, value in sd.items():
        if not isinstance(value, Tensor):
            raise SmdmError(f"not {what} for config {config.name}: {key!r} is a {type(value).__name__}, not a tensor")
        shapes = expected[key]
        if tuple(value.shape) not in shapes:
            want = " or ".join(str(s) for s in shapes)
            raise SmdmError(
                f"not {what} for config {config.name}: {key!r} has shape {tuple(value.shape)}, expected {want}"
                " (wrong config name or vocab size?)"
            )


def _our_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of our parameters, to validate input before load_state_dict gives a less readable error."""
    d, hs, hidden = config.n_embd, config.head_size, config.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (config.vocab_size + 1, d)}
    for i in range(config.n_layer):
        p = f"blocks.{i}."
        shapes[p + "attn_norm.weight"] = (d,)
        shapes[p + "attn.qkv.weight"] = ((config.n_head + 2 * config.n_query_groups) * hs, d)
        shapes[p + "attn.proj.weight"] = (d, config.n_head * hs)
        shapes[p + "mlp_norm.weight"] = (d,)
        shapes[p + "mlp.gate_up.weight"] = (2 * hidden, d)
        shapes[p + "mlp.down.weight"] = (d, hidden)
    shapes["norm.weight"] = (d,)
    shapes["lm_head.weight"] = (config.vocab_size, d)
    return shapes


def _check_ours(sd: Mapping[str, Any], config: ModelConfig) -> None:
    """Validate a state dict of our Transformer (ignoring nothing: our state dict has no buffers)."""
    _check_keys(sd, {k: (s,) for k, s in _our_shapes(config).items()}, "an smdm model state dict", config)


def _grouped_to_split(w: Tensor, config: ModelConfig) -> Tensor:
    """lit-gpt grouped QKV rows (groups, q_per_kv + 2, hs) -> our [q heads | k heads | v heads] rows."""
    groups, hs = config.n_query_groups, config.head_size
    q_per_kv = config.n_head // groups
    w = w.reshape(groups, q_per_kv + 2, hs, -1)
    q = w[:, :q_per_kv].reshape(groups * q_per_kv * hs, -1)  # query head g * q_per_kv + j, head-major
    k = w[:, q_per_kv].reshape(groups * hs, -1)
    v = w[:, q_per_kv + 1].reshape(groups * hs, -1)
    return torch.cat((q, k, v), dim=0).contiguous()


def _split_to_grouped(w: Tensor, config: ModelConfig) -> Tensor:
    """Our [q heads | k heads | v heads] rows -> lit-gpt grouped rows (groups, q_per_kv + 2, hs)."""
    groups, hs = config.n_query_groups, config.head_size
    q_per_kv = config.n_head // groups
    q, k, v = w.split((config.n_head * hs, groups * hs, groups * hs), dim=0)
    grouped = torch.cat(
        (q.reshape(groups, q_per_kv, hs, -1), k.reshape(groups, 1, hs, -1), v.reshape(groups, 1, hs, -1)), dim=1
    )
    return grouped.reshape(-1, w.size(-1)).contiguous()


def _with_mask_row(embed: Tensor, config: ModelConfig) -> Tensor:
    """Give a vocab-row embedding (an ARM's) the [MASK] row our model expects; zeros, since it was never trained."""
    if embed.size(0) == config.vocab_size + 1:
        return embed.contiguous()
    return torch.cat((embed, embed.new_zeros(1, embed.size(1))), dim=0)


def _smdm_shapes(config: ModelConfig) -> dict[str, tuple[tuple[int, ...], ...]]:
    """Accepted shapes of every SMDM (lit-gpt) key; the embedding may lack the [MASK] row (an ARM checkpoint)."""
    d, hs, hidden, vocab = config.n_embd, config.head_size, config.intermediate_size, config.vocab_size
    shapes: dict[str, tuple[tuple[int, ...], ...]] = {"transformer.wte.weight": ((vocab + 1, d), (vocab, d))}
    for i in range(config.n_layer):
        p = f"transformer.h.{i}."
        shapes[p + "norm_1.weight"] = ((d,),)
        shapes[p + "attn.attn.weight"] = (((config.n_head + 2 * config.n_query_groups) * hs, d),)
        shapes[p + "attn.proj.weight"] = ((d, config.n_head * hs),)
        shapes[p + "norm_2.weight"] = ((d,),)
        shapes[p + "mlp.swiglu.w1.weight"] = ((hidden, d),)
        shapes[p + "mlp.swiglu.w2.weight"] = ((hidden, d),)
        shapes[p + "mlp.swiglu.w3.weight"] = ((d, hidden),)
    shapes["transformer.ln_f.weight"] = ((d,),)
    shapes["lm_head.weight"] = ((vocab, d),)
    return shapes


# Tensors that only change name: (ours, ML-GSAI/SMDM, HF Llama); "{i}" is the layer index. The rest (embedding,
# fused QKV, fused gate/up) need a re-layout and are handled by each converter.
_RENAMES: tuple[tuple[str, str, str], ...] = (
    ("blocks.{i}.attn_norm.weight", "transformer.h.{i}.norm_1.weight", "model.layers.{i}.input_layernorm.weight"),
    ("blocks.{i}.attn.proj.weight", "transformer.h.{i}.attn.proj.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("blocks.{i}.mlp_norm.weight", "transformer.h.{i}.norm_2.weight",
     "model.layers.{i}.post_attention_layernorm.weight"),
    ("blocks.{i}.mlp.down.weight", "transformer.h.{i}.mlp.swiglu.w3.weight", "model.layers.{i}.mlp.down_proj.weight"),
    ("norm.weight", "transformer.ln_f.weight", "model.norm.weight"),
    ("lm_head.weight", "lm_head.weight", "lm_head.weight"),
)
_OURS, _SMDM, _HF = 0, 1, 2


def _renamed(sd: Mapping[str, Tensor], config: ModelConfig, source: int, target: int) -> dict[str, Tensor]:
    """Copy the rename-only tensors from one layout's names to another's."""
    out: dict[str, Tensor] = {}
    for names in _RENAMES:
        layers = range(config.n_layer) if "{i}" in names[source] else (None,)
        for i in layers:
            out[names[target].format(i=i)] = sd[names[source].format(i=i)]
    return out


def smdm_state_dict_to_ours(sd: Mapping[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """Rename and re-layout an ML-GSAI/SMDM (lit-gpt) state dict so the paper's released weights load into ours."""
    what = "an SMDM checkpoint"
    sd = _unwrap(sd, what, config)
    _check_keys(sd, _smdm_shapes(config), what, config)
    out = {"embed.weight": _with_mask_row(sd["transformer.wte.weight"], config)}
    out.update(_renamed(sd, config, _SMDM, _OURS))
    for i in range(config.n_layer):
        src, dst = f"transformer.h.{i}.", f"blocks.{i}."
        out[dst + "attn.qkv.weight"] = _grouped_to_split(sd[src + "attn.attn.weight"], config)
        out[dst + "mlp.gate_up.weight"] = torch.cat(
            (sd[src + "mlp.swiglu.w1.weight"], sd[src + "mlp.swiglu.w2.weight"]), dim=0
        )
    return out


def ours_to_smdm_state_dict(sd: Mapping[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """Inverse of `smdm_state_dict_to_ours`, to export our weights for the reference SMDM code (diffusion layout)."""
    sd = _unwrap(sd, "an smdm model state dict", config)
    _check_ours(sd, config)
    out = {"transformer.wte.weight": sd["embed.weight"]}
    out.update(_renamed(sd, config, _OURS, _SMDM))
    for i in range(config.n_layer):
        src, dst = f"blocks.{i}.", f"transformer.h.{i}."
        gate, up = sd[src + "mlp.gate_up.weight"].split(config.intermediate_size, dim=0)
        out[dst + "attn.attn.weight"] = _split_to_grouped(sd[src + "attn.qkv.weight"], config)
        out[dst + "mlp.swiglu.w1.weight"] = gate.contiguous()
        out[dst + "mlp.swiglu.w2.weight"] = up.contiguous()
    return out


def _hf_shapes(config: ModelConfig) -> dict[str, tuple[tuple[int, ...], ...]]:
    """Accepted shapes of every HF Llama key; HF has no [MASK] row, but a row-appended export is accepted too."""
    d, hs, hidden, vocab = config.n_embd, config.head_size, config.intermediate_size, config.vocab_size
    shapes: dict[str, tuple[tuple[int, ...], ...]] = {"model.embed_tokens.weight": ((vocab, d), (vocab + 1, d))}
    for i in range(config.n_layer):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = ((d,),)
        shapes[p + "self_attn.q_proj.weight"] = ((config.n_head * hs, d),)
        shapes[p + "self_attn.k_proj.weight"] = ((config.n_query_groups * hs, d),)
        shapes[p + "self_attn.v_proj.weight"] = ((config.n_query_groups * hs, d),)
        shapes[p + "self_attn.o_proj.weight"] = ((d, config.n_head * hs),)
        shapes[p + "post_attention_layernorm.weight"] = ((d,),)
        shapes[p + "mlp.gate_proj.weight"] = ((hidden, d),)
        shapes[p + "mlp.up_proj.weight"] = ((hidden, d),)
        shapes[p + "mlp.down_proj.weight"] = ((d, hidden),)
    shapes["model.norm.weight"] = ((d,),)
    shapes["lm_head.weight"] = ((vocab, d),)
    return shapes


def hf_llama_state_dict_to_ours(sd: Mapping[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """Convert a HF `LlamaForCausalLM` state dict to ours, so LLaMA-format weights can start an ARM or an MDM."""
    what = "a HF Llama checkpoint"
    sd = _unwrap(sd, what, config)
    # Old transformers versions saved the RoPE frequencies; they are recomputed from the config here.
    sd = {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}
    if "lm_head.weight" not in sd and "model.embed_tokens.weight" in sd:  # tied embeddings are saved once
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"][: config.vocab_size]
    _check_keys(sd, _hf_shapes(config), what, config)
    out = {"embed.weight": _with_mask_row(sd["model.embed_tokens.weight"], config)}
    out.update(_renamed(sd, config, _HF, _OURS))
    for i in range(config.n_layer):
        src, dst = f"model.layers.{i}.", f"blocks.{i}."
        out[dst + "attn.qkv.weight"] = torch.cat(
            [sd[src + f"self_attn.{n}_proj.weight"] for n in ("q", "k", "v")], dim=0
        )
        out[dst + "mlp.gate_up.weight"] = torch.cat(
            (sd[src + "mlp.gate_proj.weight"], sd[src + "mlp.up_proj.weight"]), dim=0
        )
    return out


def ours_to_hf_llama_state_dict(sd: Mapping[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """Export our weights as a HF `LlamaForCausalLM` state dict (the [MASK] row is dropped: HF has no such token)."""
    sd = _unwrap(sd, "an smdm model state dict", config)
    _check_ours(sd, config)
    hs = config.head_size
    out = {"model.embed_tokens.weight": sd["embed.weight"][: config.vocab_size].contiguous()}
    out.update(_renamed(sd, config, _OURS, _HF))
    for i in range(config.n_layer):
        src, dst = f"blocks.{i}.", f"model.layers.{i}."
        q, k, v = sd[src + "attn.qkv.weight"].split(
            (config.n_head * hs, config.n_query_groups * hs, config.n_query_groups * hs), dim=0
        )
        gate, up = sd[src + "mlp.gate_up.weight"].split(config.intermediate_size, dim=0)
        for name, tensor in (("self_attn.q_proj", q), ("self_attn.k_proj", k), ("self_attn.v_proj", v),
                             ("mlp.gate_proj", gate), ("mlp.up_proj", up)):
            out[dst + name + ".weight"] = tensor.contiguous()
    return out


def hf_llama_config(config: ModelConfig, **overrides: Any) -> LlamaConfig:
    """A `transformers.LlamaConfig` of the same shape, so exported weights run in HF tooling unchanged."""
    try:
        from transformers import LlamaConfig
    except ImportError as exc:
        raise SmdmError("HF export needs the optional dependency transformers: pip install transformers") from exc
    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.n_embd,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        num_key_value_heads=config.n_query_groups,
        head_dim=config.head_size,
        hidden_act="silu",
        max_position_embeddings=config.block_size,
        rms_norm_eps=config.norm_eps,
        rope_theta=config.rope_base,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        **overrides,
    )


def _read_state_dict(path: Path) -> Mapping[str, Any]:
    """Read a .safetensors or .pth/.pt file, turning every read failure into one actionable line."""
    if not path.is_file():
        raise SmdmError(f"checkpoint {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own error types for corrupt/truncated headers
            raise SmdmError(f"cannot read {path}: corrupt or truncated safetensors file ({exc})") from exc
    if suffix in (".pth", ".pt", ".bin", ".ckpt"):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle/zip errors for corrupt files, UnpicklingError for non-tensor objects
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SmdmError(f"cannot read {path}: corrupt, truncated or not a weights-only torch file ({first_line})") from exc
    raise SmdmError(f"checkpoint {path} has an unknown extension {path.suffix!r}; expected .safetensors, .pth or .pt")


def load_smdm_checkpoint(path: str | Path, config_name: str | ModelConfig,
                         **overrides: Any) -> tuple[Transformer, ModelConfig]:
    """Load an ML-GSAI/SMDM checkpoint file into our bidirectional model, to evaluate or fine-tune released weights.

    `config_name` names a config ("smdm-170m") or is a ModelConfig; `overrides` (e.g. vocab_size) apply to a name.
    """
    if isinstance(config_name, ModelConfig):
        config = replace(config_name, **overrides)
    else:
        config = ModelConfig.from_name(config_name, **overrides)
    path = Path(path)
    ours = smdm_state_dict_to_ours(_read_state_dict(path), config)
    model = Transformer(config, causal=False)
    try:
        model.load_state_dict(ours, strict=True)
    except RuntimeError as exc:  # should not happen after the shape checks; kept for a one-line message
        raise SmdmError(f"{path} does not fit config {config.name}: {str(exc).splitlines()[0]}") from exc
    model.eval()
    return model, config


def import_smdm_checkpoint(weights: str | Path, config_name: str, tokenizer_path: str | Path, objective: str,
                           out: str | Path) -> Path:
    """`smdm import-smdm`: an ML-GSAI/SMDM weights file as an smdm checkpoint, its tokenizer stored beside it."""
    from smdm.checkpoint import save_checkpoint
    from smdm.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_file(tokenizer_path)
    model, config = load_smdm_checkpoint(weights, config_name)
    if tokenizer.vocab_size != config.vocab_size:
        raise SmdmError(f"tokenizer {tokenizer_path} has {tokenizer.vocab_size} tokens, {config_name} expects "
                        f"{config.vocab_size}")
    meta = {"objective": objective, "imported_from": str(weights),
            "tokenizer": {"fingerprint": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size,
                          "eos_id": tokenizer.eos_id}}
    return save_checkpoint(out, model, config, meta, tokenizer_file=tokenizer.path)
