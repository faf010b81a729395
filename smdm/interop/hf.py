"""HF transformers `LlamaForCausalLM` / `Qwen2ForCausalLM` directories <-> smdm ARMs.

Both are pre-norm RMSNorm / rotate-half RoPE / SwiGLU / GQA decoders with separate q, k, v, o, gate, up, down
projections (transformers `models/llama/modeling_llama.py`, `models/qwen2/modeling_qwen2.py`); Qwen2 adds biases on
q, k and v, and small Qwen2 models tie the head to the embedding. An imported ARM keeps smdm's extra [MASK] embedding
row (zeros: never trained, never read by an ARM), so the same model can later start an MDM.
Export writes a plain `LlamaForCausalLM` (or `Qwen2ForCausalLM` when the model has q/k/v biases, which Llama's
`attention_bias` cannot express: it also biases o_proj), loadable with no remote code.
"""

from __future__ import annotations

from typing import Any

from smdm.config import ModelConfig
from smdm.errors import SmdmError
from smdm.interop.shards import NameMap, Slot, layer_slots

_HF_LAYER = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
             "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
             "attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}


def hf_names(config: ModelConfig) -> dict[str, Slot]:
    """Qwen2/Llama tensor names (shared by Dream) -> slots of our fused state dict."""
    names = {"model.embed_tokens.weight": Slot("embed.weight", 0, config.vocab_size)}
    for i in range(config.n_layer):
        names.update(layer_slots(config, i, f"model.layers.{i}.", _HF_LAYER))
    names["model.norm.weight"] = Slot("norm.weight")
    if not config.tie_embeddings:
        names["lm_head.weight"] = Slot("lm_head.weight")
    return names


def rope_base(record: dict[str, Any], where: str) -> float:
    """RoPE base from `rope_theta` (transformers 4) or `rope_parameters` (5); refuses scaled RoPE we do not implement."""
    params = record.get("rope_parameters") or {}
    scaling = record.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise SmdmError(f"{where}: RoPE scaling {kind!r} is not supported (only plain RoPE with any base)")
    return float(params.get("rope_theta", record.get("rope_theta", 10000.0)))


def _require(record: dict[str, Any], where: str, **expected: Any) -> None:
    """Refuse architecture options our Transformer does not implement, naming the first one."""
    for key, value in expected.items():
        if key in record and record[key] not in (value, None) and not (value is False and record[key] == 0):
            raise SmdmError(f"{where}: {key}={record[key]!r} is not supported (smdm implements {key}={value!r})")


def hf_model_config(record: dict[str, Any], where: str, family: str) -> ModelConfig:
    """ModelConfig of a Llama / Qwen2 (or Dream, which uses Qwen2's names) config.json."""
    _require(record, where, hidden_act="silu", mlp_bias=False)
    if family == "llama":
        _require(record, where, attention_bias=False)
    if record.get("use_sliding_window"):
        raise SmdmError(f"{where}: sliding-window attention is not supported")
    try:
        hidden, heads = int(record["hidden_size"]), int(record["num_attention_heads"])
        head_dim = record.get("head_dim")
        if head_dim is not None and int(head_dim) * heads != hidden:
            raise SmdmError(f"{where}: head_dim {head_dim} x {heads} heads != hidden_size {hidden} (not supported)")
        return ModelConfig(
            name=str(record.get("_name_or_path") or family),
            block_size=int(record.get("max_position_embeddings", 2048)),
            vocab_size=int(record["vocab_size"]),
            n_layer=int(record["num_hidden_layers"]),
            n_head=heads,
            n_embd=hidden,
            n_query_groups=int(record.get("num_key_value_heads") or heads),
            intermediate_size=int(record["intermediate_size"]),
            norm_eps=float(record.get("rms_norm_eps", 1e-6)),
            rope_base=rope_base(record, where),
            qkv_bias=family in ("qwen2", "dream"),
            tie_embeddings=bool(record.get("tie_word_embeddings", False)),
        )
    except KeyError as missing:
        raise SmdmError(f"{where}: config.json lacks {missing.args[0]!r}") from None
    except (TypeError, ValueError) as error:
        raise SmdmError(f"{where}: config.json has an invalid value ({error})") from None


def arm_import(record: dict[str, Any], where: str, family: str) -> tuple[ModelConfig, NameMap]:
    """Llama / Qwen2 as an ARM: smdm's default [MASK] row past the vocabulary is added (zeros)."""
    config = hf_model_config(record, where, family)
    return config, hf_names(config)


def hf_record(config: ModelConfig, **extra: Any) -> dict[str, Any]:
    """config.json of the HF export of an ARM: Llama, or Qwen2 when it has q/k/v biases."""
    qwen2 = config.qkv_bias
    record: dict[str, Any] = {
        "architectures": ["Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM"],
        "model_type": "qwen2" if qwen2 else "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_query_groups,
        "head_dim": config.head_size,
        "hidden_act": "silu",
        "max_position_embeddings": config.block_size,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_base,
        "rope_parameters": {"rope_theta": config.rope_base, "rope_type": "default"},
        "tie_word_embeddings": config.tie_embeddings,
        "attention_dropout": 0.0,
        "use_cache": True,
        **extra,
    }
    if qwen2:
        record.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.n_layer)
    else:
        record.update(attention_bias=False, mlp_bias=False)
    return record
