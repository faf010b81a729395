"""LoRA fine-tuning through PEFT (Hu et al. 2021, "LoRA", arXiv 2106.09685; huggingface/peft): freeze the base
weights, train a rank-r update B·A (scaled by alpha / r) on chosen linear layers, keep only the adapter.

PEFT wraps smdm's Transformer as a custom model (`get_peft_model` with `LoraConfig(target_modules=...)`): the target
names are smdm's own modules (`qkv`, `proj`, `gate_up`, `down`, `lm_head`). `qkv` and `gate_up` are fused in smdm,
so their adapter is one rank-r update of the fused matrix (not one per q/k/v as on a Hugging Face Llama). The model
calls a wrapped layer's own forward (smdm.model), so the update is applied wherever the layer is used.

A run keeps its adapter in OUT/adapter in PEFT's format (`save_pretrained`: adapter_config.json +
adapter_model.safetensors, loadable with `PeftModel.from_pretrained(base, OUT/adapter)`), beside `state.pt` (step,
optimizer over the adapter only, data position, RNG) so `--resume` continues bit-exactly. `--merge` writes the merged
weights (`merge_and_unload`) as an ordinary smdm checkpoint in OUT/checkpoint, which every command loads.
`quantize` ("4bit": NF4 as in QLoRA, Dettmers et al. 2023, arXiv 2305.14314; or "8bit") stores the blocks' frozen
linear layers through bitsandbytes (which also runs on CPU); the embedding, norms and head stay as loaded, and
`--merge` adds the adapter to the original full-precision base, re-read from --init-from.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from smdm.checkpoint import atomic_replace_dir
from smdm.errors import SmdmError
from smdm.lora_cli import DEFAULT_TARGETS, LORA_TARGETS, QUANTIZE

ADAPTER_DIR = "adapter"
STATE_FILE = "state.pt"
RECORD_FILE = "smdm_lora.json"  # what the adapter was trained on: base, objective, model config, LoRA settings


def check_lora_options(rank: int | None, alpha: float | None, dropout: float | None,
                       targets: Sequence[str] | None, merge: bool, init_from: str | None, parallel: str,
                       quantize: str | None = None) -> None:
    """Refuse LoRA options without --lora-rank (a full fine-tune) and impossible values, before anything is written."""
    if rank is None:
        given = [flag for flag, value in (("--lora-alpha", alpha), ("--lora-dropout", dropout),
                                          ("--lora-targets", targets), ("--merge", merge or None),
                                          ("--lora-quantize", quantize)) if value is not None]
        if given:
            raise SmdmError(f"{', '.join(given)} without --lora-rank: this is a full fine-tune; pass --lora-rank R "
                            "to train a LoRA adapter")
        return
    if rank < 1:
        raise SmdmError(f"--lora-rank must be at least 1, got {rank}")
    if alpha is not None and not alpha > 0:
        raise SmdmError(f"--lora-alpha must be positive, got {alpha}")
    if dropout is not None and not 0 <= dropout < 1:
        raise SmdmError(f"--lora-dropout must lie in [0, 1), got {dropout}")
    unknown = sorted(set(targets or ()) - set(LORA_TARGETS))
    if unknown:
        raise SmdmError(f"--lora-targets: unknown module {unknown[0]!r}; smdm's are {', '.join(LORA_TARGETS)}")
    if targets is not None and not targets:
        raise SmdmError("--lora-targets needs at least one module")
    if quantize is not None and quantize not in QUANTIZE:
        raise SmdmError(f"--lora-quantize must be one of {', '.join(QUANTIZE)}, got {quantize!r}")
    if not init_from:
        raise SmdmError("LoRA adapts a trained model: pass --init-from a checkpoint or Hugging Face directory")
    if parallel == "fsdp":
        raise SmdmError("LoRA runs use one process or DDP (--parallel ddp); FSDP sharding is not supported")


def _peft():
    try:
        import peft
    except ImportError:
        raise SmdmError("LoRA needs the peft package: pip install 'smdm[lora]' (or pip install peft)") from None
    return peft


def lora_config(rank: int, alpha: float | None, dropout: float | None, targets: Sequence[str] | None,
                base: str) -> Any:
    """PEFT's LoraConfig for smdm's module names; alpha defaults to 2·rank (scale 2), dropout to 0."""
    return _peft().LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank,
                              lora_dropout=dropout or 0.0, target_modules=list(targets or DEFAULT_TARGETS),
                              bias="none", base_model_name_or_path=base)


def attach_lora(model: torch.nn.Module, config: Any, base: str) -> torch.nn.Module:
    """The PEFT model around `model` (its base weights frozen, the adapter trainable)."""
    peft = _peft()
    if getattr(model.config, "tie_embeddings", False) and "lm_head" in config.target_modules:
        raise SmdmError("--lora-targets lm_head: this model's head is tied to its embedding; leave lm_head out")
    model.name_or_path = base  # PEFT records it as base_model_name_or_path
    return peft.get_peft_model(model, config)


def load_adapter(model: torch.nn.Module, directory: Path, base: str) -> torch.nn.Module:
    """The PEFT model around `model` with the trainable adapter saved in `directory` (a resumed run)."""
    peft = _peft()
    model.name_or_path = base
    try:
        return peft.PeftModel.from_pretrained(model, str(directory), is_trainable=True)
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        raise SmdmError(f"{directory}: unreadable LoRA adapter ({str(error).splitlines()[0]})") from None


def has_adapter_state(run_dir: str | Path) -> bool:
    """True when OUT/adapter holds an adapter and its training state (something to resume)."""
    directory = Path(run_dir) / ADAPTER_DIR
    return (directory / STATE_FILE).is_file() and (directory / "adapter_config.json").is_file()


def read_adapter_state(run_dir: str | Path, record: dict[str, Any]) -> dict[str, Any]:
    """The training state of OUT/adapter, refused when the adapter was trained on another base or settings."""
    directory = Path(run_dir) / ADAPTER_DIR
    try:
        saved = json.loads((directory / RECORD_FILE).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise SmdmError(f"{directory / RECORD_FILE}: unreadable adapter record ({error})") from None
    if saved != record:
        changed = sorted(k for k in set(saved) | set(record) if saved.get(k) != record.get(k))
        raise SmdmError(f"{directory}: the adapter was trained with another {', '.join(changed)}; "
                        "use a new --out or the same settings")
    try:
        return torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a damaged pickle
        raise SmdmError(f"{directory / STATE_FILE}: corrupted training state ({error})") from error


def save_adapter(model: torch.nn.Module, run_dir: str | Path, record: dict[str, Any],
                 train_state: dict[str, Any]) -> Path:
    """Write OUT/adapter atomically: PEFT's save_pretrained files, the record, and the training state."""
    final = Path(run_dir) / ADAPTER_DIR
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), save_embedding_layers=False)  # smdm never adapts the embedding
    (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2))
    torch.save(train_state, tmp / STATE_FILE)
    atomic_replace_dir(tmp, final)
    return final


def quantize_base(model: torch.nn.Module, bits: str, device: torch.device | str = "cpu") -> None:
    """Replace the blocks' linear layers (qkv, proj, gate_up, down) by frozen bitsandbytes 4-bit NF4 / 8-bit ones,
    quantized on `device` (QLoRA's recipe: the base in 4 bits, the adapter and the compute in full precision)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise SmdmError("--lora-quantize needs the bitsandbytes package: pip install 'smdm[qlora]'") from None
    compute = model.embed.weight.dtype
    for block in model.blocks:
        for parent, name in ((block.attn, "qkv"), (block.attn, "proj"), (block.mlp, "gate_up"), (block.mlp, "down")):
            linear = getattr(parent, name)
            bias = linear.bias is not None
            if bits == "4bit":
                layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=compute,
                                          quant_type="nf4")
                layer.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4")
            else:
                layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias,
                                            has_fp16_weights=False)
                layer.weight = bnb.nn.Int8Params(linear.weight.data, requires_grad=False, has_fp16_weights=False)
            if bias:
                layer.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
            setattr(parent, name, layer.to(device))  # bitsandbytes quantizes when the weight reaches the device


def merged_state(model: torch.nn.Module, base_state: dict[str, torch.Tensor] | None = None
                 ) -> dict[str, torch.Tensor]:
    """The base weights with the adapter merged in (W + alpha/r · B·A), under smdm's plain names.

    Merges a copy of each adapted layer's weight, so the live PEFT model is left as it was. `base_state` (the
    full-precision base, for a quantized run) replaces the weights held by the model.
    """
    peft = _peft()
    base = model.get_base_model()
    merged = {name: tensor.detach().clone() for name, tensor in base.state_dict().items()
              if ".lora_" not in name and "base_layer." not in name}
    if base_state is not None:
        merged = {name: tensor.detach().clone() for name, tensor in base_state.items()}
    for name, module in base.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            if base_state is not None:
                weight = merged[f"{name}.weight"]
            else:
                weight = module.get_base_layer().weight.detach().clone()
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    weight += module.get_delta_weight(adapter).to(weight.dtype)
            merged[f"{name}.weight"] = weight
            bias = module.get_base_layer().bias
            if bias is not None and base_state is None:
                merged[f"{name}.bias"] = bias.detach().clone()
    return merged

