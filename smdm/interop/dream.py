"""Dream (`DreamModel`, Dream-org/Dream-v0-*-7B) directories <-> smdm shifted MDMs.

Dream is Qwen2 made bidirectional (names `model.layers.N.self_attn.{q,k,v,o}_proj` with q/k/v biases,
`model.embed_tokens`, `model.norm`, `lm_head`; Dream's `modeling_dream.py` hard-codes `is_causal=False`). Adapted
from an autoregressive Qwen2.5, its output at position i predicts token i+1: Dream's sampler shifts the logits
(`generation_utils.py`: `torch.cat([logits[:, :1], logits[:, :-1]], dim=1)`). smdm marks it `shifted`, and the
Transformer applies that same shift, so every sampler, likelihood estimator and loss sees logits at i for token i.
Its [MASK] is `mask_token_id` (151666) inside the vocabulary.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from smdm.config import ModelConfig
from smdm.errors import SmdmError
from smdm.interop.hf import hf_model_config, hf_names, hf_record
from smdm.interop.shards import NameMap


def dream_import(record: dict[str, Any], where: str) -> tuple[ModelConfig, NameMap]:
    """ModelConfig (shifted, mask id inside the vocabulary) and names of a Dream config.json."""
    mask = record.get("mask_token_id")
    if mask is None:
        raise SmdmError(f"{where}: Dream config.json has no mask_token_id")
    config = replace(hf_model_config(record, where, "dream"), name=str(record.get("_name_or_path") or "dream"),
                     mask_token_id=int(mask), shifted=True)
    return config, hf_names(config)


def dream_record(config: ModelConfig, **extra: Any) -> dict[str, Any]:
    """config.json of a shifted MDM in Dream's layout (DreamConfig's keys)."""
    record = hf_record(config, **extra)
    record.update(architectures=["DreamModel"], model_type="Dream", mask_token_id=config.mask_id, use_cache=False,
                  use_sliding_window=False, sliding_window=None, max_window_layers=config.n_layer)
    return record
