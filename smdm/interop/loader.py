"""Importing a Hugging Face model directory: detect the family from config.json, map it, stream the shards.

`load_model_dir` is what `smdm.checkpoint.load_checkpoint` / `load_for_inference` call for a directory that is not an
smdm checkpoint, so every `--checkpoint` accepts either.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from smdm.config import ModelConfig
from smdm.errors import SmdmError
from smdm.interop.shards import NameMap, empty_model, stream_into

# model_type (lower case) or architecture -> family
MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "llada": "llada", "dream": "dream"}
ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "LLaDAModelLM": "llada",
                 "DreamModel": "dream"}
OBJECTIVES = {"llama": "arm", "qwen2": "arm", "llada": "mdm", "dream": "mdm"}
EXTRA_FILE = "smdm_extra.safetensors"  # rows of ours a foreign layout has no place for (an ARM's [MASK] row)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def read_record(directory: Path) -> dict[str, Any]:
    """config.json of a model directory, with a one-line error when absent or not JSON."""
    path = directory / "config.json"
    if not directory.is_dir():
        raise SmdmError(f"{directory}: not a directory (expected a Hugging Face model directory or an smdm checkpoint)")
    if not path.is_file():
        raise SmdmError(f"{directory}: no config.json (expected a Hugging Face model directory or an smdm checkpoint)")
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SmdmError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(record, dict):
        raise SmdmError(f"{path}: expected a JSON object")
    return record


def is_model_dir(path: str | Path) -> bool:
    """True for a directory with a config.json that is not an smdm checkpoint's (a foreign model to import)."""
    from smdm.checkpoint import FORMAT

    directory = Path(path)
    if not (directory / "config.json").is_file():
        return False
    try:
        record = json.loads((directory / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return False
    return isinstance(record, dict) and record.get("format") != FORMAT


def detect_family(record: dict[str, Any], where: str) -> str:
    """llama / qwen2 / llada / dream from `model_type`, else from `architectures`; anything else is refused."""
    model_type = str(record.get("model_type", "")).lower()
    if model_type in MODEL_TYPES:
        return MODEL_TYPES[model_type]
    for architecture in record.get("architectures") or []:
        if architecture in ARCHITECTURES:
            return ARCHITECTURES[architecture]
    shown = record.get("model_type") or (record.get("architectures") or ["none"])[0]
    raise SmdmError(f"{where}: model type {shown!r} is not supported; smdm imports Llama, Qwen2, LLaDA and Dream")


def import_spec(record: dict[str, Any], where: str) -> tuple[str, ModelConfig, NameMap, str]:
    """(family, config, names, objective) of a config.json; an smdm export's own config travels under "smdm"."""
    from smdm.interop.dream import dream_import
    from smdm.interop.hf import arm_import, hf_names
    from smdm.interop.llada import llada_export_names, llada_import

    family = detect_family(record, where)
    hint = record.get("smdm")
    if isinstance(hint, dict) and isinstance(hint.get("model"), dict):
        config = ModelConfig.from_dict(hint["model"])
        names = llada_export_names(config) if family == "llada" else hf_names(config)
        return family, config, names, str(hint.get("objective", OBJECTIVES[family]))
    if family == "llada":
        config, names = llada_import(record, where)
    elif family == "dream":
        config, names = dream_import(record, where)
    else:
        config, names = arm_import(record, where, family)
    return family, config, names, OBJECTIVES[family]


def model_dir_config(path: str | Path) -> ModelConfig:
    """The ModelConfig a model directory imports as, from its config.json alone (no weights read)."""
    directory = Path(path)
    return import_spec(read_record(directory), str(directory))[1]


def resolve_dtype(dtype: str | torch.dtype | None, record: dict[str, Any],
                  device: str | torch.device = "cpu") -> torch.dtype:
    """"auto" keeps the dtype config.json declares (bf16 stays bf16). None: float32 on CPU (where bf16 matmuls are
    slow and the oracle tests compare fp32 logits), "auto" on an accelerator (an 8B model in fp32 needs 32 GB)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        dtype = "auto" if torch.device(device).type != "cpu" else "fp32"
    if dtype == "auto":
        declared = str(record.get("torch_dtype") or record.get("dtype") or "float32")
        return DTYPES.get(declared, torch.float32)
    if dtype not in DTYPES:
        raise SmdmError(f"unknown dtype {dtype!r}; use auto, fp32, bf16 or fp16")
    return DTYPES[dtype]


def load_model_dir(path: str | Path, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu"):
    """A Hugging Face model directory (Llama, Qwen2, LLaDA, Dream) as an smdm Checkpoint, streamed shard by shard.

    meta["objective"] is "arm" for Llama/Qwen2 and "mdm" for LLaDA/Dream; meta["source"] names the family.
    """
    from smdm.checkpoint import Checkpoint

    directory = Path(path)
    record = read_record(directory)
    family, config, names, objective = import_spec(record, str(directory))
    model = empty_model(config, causal=objective == "arm", dtype=resolve_dtype(dtype, record, device), device=device)
    stream_into(model, directory, names, family)
    if (directory / EXTRA_FILE).is_file() and "smdm" in record:
        _load_extra(model, directory / EXTRA_FILE)
    model.eval()
    meta: dict[str, Any] = {"objective": objective, "source": {"format": family, "path": str(directory)}}
    tokenizer = next((name for name in TOKENIZER_FILES if (directory / name).is_file()), None)
    if tokenizer is not None:
        meta["tokenizer"] = {"file": tokenizer}
    return Checkpoint(model=model, config=config, meta=meta, path=directory)


def _load_extra(model: torch.nn.Module, path: Path) -> None:
    """Rows an export kept beside the HF weights (an ARM's [MASK] embedding row), for a bit-exact round trip."""
    from safetensors.torch import load_file

    extra = load_file(str(path))
    rows = extra.get("embed.weight.extra_rows")
    if rows is not None:
        vocab = model.config.vocab_size
        if tuple(rows.shape) != (model.embed.weight.shape[0] - vocab, model.embed.weight.shape[1]):
            raise SmdmError(f"{path}: extra rows of shape {tuple(rows.shape)} do not fit the model")
        with torch.no_grad():
            model.embed.weight[vocab:].copy_(rows)
