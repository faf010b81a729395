"""LLaDA (`LLaDAModelLM`, GSAI-ML/LLaDA-8B-Base/Instruct) directories <-> smdm MDMs.

LLaDA is OLMo's code with a bidirectional Llama block (`block_type: "llama"`): names
`model.transformer.{wte, blocks.N.{attn_norm, q_proj, k_proj, v_proj, attn_out, ff_norm, ff_proj, up_proj, ff_out},
ln_f, ff_out}`, where a block's ff_proj is SwiGLU's gate and up_proj its up projection (`x = act(ff_proj(x)) *
up_proj(x)`), RMSNorm, rotate-half RoPE. Its [MASK] is `mask_token_id` (126336) inside the
`embedding_size`-row (126464) embedding, and its head has as many rows, so the mask id is a config value here.
An smdm MDM (its [MASK] the extra row `vocab_size`) is exported with `vocab_size + 1` rows and a zero head row for
[MASK] (LLaDA's head needs as many rows as the embedding); the original config travels in config.json under
"smdm", so it loads back bit-exactly.
"""

from __future__ import annotations

from typing import Any

from smdm.config import ModelConfig
from smdm.errors import SmdmError
from smdm.interop.shards import NameMap, Slot, layer_slots

# LLaDA options smdm's Transformer does not implement, with the value it does.
_FIXED = {"block_type": "llama", "activation_type": "silu", "layer_norm_type": "rms", "rope": True, "alibi": False,
          "input_emb_norm": False, "scale_logits": False, "include_bias": False, "attention_layer_norm": False,
          "layer_norm_with_affine": True, "multi_query_attention": None}


_LLADA_LAYER = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "attn_out", "gate": "ff_proj", "up": "up_proj",
                "down": "ff_out", "attn_norm": "attn_norm", "mlp_norm": "ff_norm"}


def llada_names(config: ModelConfig, head_padding: int = 0) -> dict[str, Slot]:
    """LLaDA tensor names -> slots of our state dict."""
    names = {"model.transformer.wte.weight": Slot("embed.weight")}
    for i in range(config.n_layer):
        names.update(layer_slots(config, i, f"model.transformer.blocks.{i}.", _LLADA_LAYER))
    names["model.transformer.ln_f.weight"] = Slot("norm.weight")
    if not config.tie_embeddings:
        names["model.transformer.ff_out.weight"] = Slot("lm_head.weight", padding=head_padding)
    return names


def llada_import(record: dict[str, Any], where: str) -> tuple[ModelConfig, NameMap]:
    """ModelConfig and names of a LLaDA config.json; its [MASK] id becomes `mask_token_id`."""
    for key, value in _FIXED.items():
        if key in record and record[key] != value and not (key == "multi_query_attention" and not record[key]):
            raise SmdmError(f"{where}: LLaDA option {key}={record[key]!r} is not supported (smdm implements {value!r})")
    try:
        d_model, heads = int(record["d_model"]), int(record["n_heads"])
        rows = int(record.get("embedding_size") or record["vocab_size"])
        mask = record.get("mask_token_id")
        if mask is None:
            raise SmdmError(f"{where}: LLaDA config.json has no mask_token_id")
        config = ModelConfig(
            name=str(record.get("_name_or_path") or "llada"),
            block_size=int(record.get("max_sequence_length", 4096)),
            vocab_size=rows,
            n_layer=int(record["n_layers"]),
            n_head=heads,
            n_embd=d_model,
            n_query_groups=int(record.get("n_kv_heads") or heads),
            intermediate_size=int(record.get("mlp_hidden_size") or int(record.get("mlp_ratio", 4)) * d_model),
            norm_eps=float(record.get("rms_norm_eps", 1e-5)),
            rope_base=float(record.get("rope_theta", 10000.0)),
            mask_token_id=int(mask),
            qkv_bias=bool(record.get("include_qkv_bias", False)),
            tie_embeddings=bool(record.get("weight_tying", False)),
        )
    except KeyError as missing:
        raise SmdmError(f"{where}: config.json lacks {missing.args[0]!r}") from None
    except (TypeError, ValueError) as error:
        raise SmdmError(f"{where}: config.json has an invalid value ({error})") from None
    return config, llada_names(config)


def llada_record(config: ModelConfig, **extra: Any) -> dict[str, Any]:
    """config.json of an MDM in LLaDA's layout (the keys of LLaDA-8B's own config.json)."""
    rows = config.embedding_rows
    return {
        "architectures": ["LLaDAModelLM"],
        "model_type": "llada",
        "d_model": config.n_embd,
        "n_heads": config.n_head,
        "n_kv_heads": config.n_query_groups,
        "n_layers": config.n_layer,
        "mlp_hidden_size": config.intermediate_size,
        "mlp_ratio": max(1, config.intermediate_size // config.n_embd),
        "max_sequence_length": config.block_size,
        "vocab_size": rows,
        "embedding_size": rows,
        "mask_token_id": config.mask_id,
        "rope_theta": config.rope_base,
        "rms_norm_eps": config.norm_eps,
        "include_qkv_bias": config.qkv_bias,
        "weight_tying": config.tie_embeddings,
        "rope_full_precision": True,
        "attention_dropout": 0.0,
        "residual_dropout": 0.0,
        "embedding_dropout": 0.0,
        "flash_attention": False,
        "use_cache": False,
        **{k: v for k, v in _FIXED.items() if k != "multi_query_attention"},
        **extra,
    }


def llada_export_names(config: ModelConfig) -> NameMap:
    """Names for export: smdm's own [MASK] row needs one zero head row (LLaDA's head has as many rows as wte)."""
    return llada_names(config, head_padding=config.embedding_rows - config.vocab_size)
