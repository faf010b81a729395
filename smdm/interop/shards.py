"""Streaming safetensors shards tensor by tensor into a model built on the meta device.

A 7-8B checkpoint must load without a second full copy in memory: the model is first built on the meta device
(no storage), given uninitialised storage once (`to_empty`) in the requested dtype, and every tensor of every shard
is read alone (`safe_open(...).get_tensor`) and copied into its slice of our parameters (q/k/v into the fused qkv,
gate/up into the fused gate_up). Peak memory is the model plus its largest single tensor (the embedding).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from smdm.config import ModelConfig
from smdm.errors import SmdmError
from smdm.model import Transformer, build_rope_cache

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Tensors some exporters save that carry nothing our model needs (RoPE frequencies are recomputed from the config).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class Slot:
    """Where a foreign tensor lives in our state dict: rows [start, stop) of `name` (stop None: to the end).

    `padding` extra rows in the foreign tensor are not ours (an export appended them, e.g. a zero [MASK] logit row
    LLaDA's layout needs): import drops them, export appends zeros.
    """

    name: str
    start: int = 0
    stop: int | None = None
    padding: int = 0


NameMap = Mapping[str, Slot]


def shard_files(directory: Path) -> list[Path]:
    """The safetensors files holding the weights: the index's shards, model.safetensors, or every *.safetensors."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise SmdmError(f"{index}: not a safetensors index ({error})") from None
        files = [directory / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.is_file():
                raise SmdmError(f"{directory}: shard {file.name} listed in {INDEX_FILE} is missing")
        return files
    if (directory / SINGLE_FILE).is_file():
        return [directory / SINGLE_FILE]
    files = sorted(p for p in directory.glob("*.safetensors") if not p.name.startswith("smdm_"))
    if files:
        return files
    if any(directory.glob("*.bin")) or any(directory.glob("*.pt")):
        raise SmdmError(f"{directory}: only safetensors weights are supported; convert the .bin/.pt files "
                        "(transformers: model.save_pretrained(dir, safe_serialization=True))")
    raise SmdmError(f"{directory}: no weights (expected {SINGLE_FILE} or {INDEX_FILE} with its shards)")


def empty_model(config: ModelConfig, causal: bool, dtype: torch.dtype, device: str | torch.device) -> Transformer:
    """A Transformer with uninitialised storage allocated once, in `dtype` on `device`; RoPE tables computed."""
    with torch.device("meta"):
        model = Transformer(config, causal=causal)
    model = model.to(dtype=dtype).to_empty(device=device)
    cos, sin = build_rope_cache(config.block_size, config.head_size, config.rope_base)
    model.rope_cos = cos.to(device=device, dtype=dtype)
    model.rope_sin = sin.to(device=device, dtype=dtype)
    return model


def stream_into(model: Transformer, directory: Path, names: NameMap, family: str) -> None:
    """Copy every shard tensor into its slot, checking names and shapes; rows no tensor fills stay zero."""
    from safetensors import safe_open

    params = model.state_dict()
    with torch.no_grad():
        for tensor in params.values():
            tensor.zero_()
    seen: set[str] = set()
    for file in shard_files(directory):
        try:
            handle = safe_open(str(file), framework="pt", device="cpu")
        except Exception as error:  # safetensors raises its own types for corrupt headers
            raise SmdmError(f"{file}: corrupt or truncated safetensors file ({' '.join(str(error).split())})") from None
        with handle:
            for key in handle.keys():
                if key.endswith(IGNORED_SUFFIXES):
                    continue
                slot = names.get(key)
                if slot is None:
                    if key == "lm_head.weight" and model.config.tie_embeddings:
                        continue  # some exporters save the tied head too; the embedding is the head
                    raise SmdmError(f"{file.name}: unexpected tensor {key!r} for a {family} model of this config "
                                    "(another architecture, or config.json does not match the weights?)")
                target = params[slot.name][slot.start:slot.stop]
                shape = tuple(handle.get_slice(key).get_shape())
                expected = (target.shape[0] + slot.padding, *target.shape[1:])
                if shape != expected:
                    raise SmdmError(f"{file.name}: {key} has shape {shape} but config.json implies {expected}")
                with torch.no_grad():
                    source = handle.get_tensor(key)
                    target.copy_(source[: target.shape[0]] if slot.padding else source)
                    del source
                seen.add(key)
    missing = sorted(set(names) - seen)
    if missing:
        more = f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""
        raise SmdmError(f"{directory}: tensor {missing[0]!r}{more} is missing from the weights")


def gather(state: Mapping[str, torch.Tensor], names: NameMap) -> dict[str, torch.Tensor]:
    """Our state dict as foreign tensors (the inverse of `stream_into`), each contiguous, padding rows zero."""
    out: dict[str, torch.Tensor] = {}
    for key, slot in names.items():
        tensor = state[slot.name][slot.start:slot.stop]
        if slot.padding:
            tensor = torch.cat([tensor, tensor.new_zeros(slot.padding, *tensor.shape[1:])])
        out[key] = tensor.detach().to("cpu").contiguous().clone()
    return out
