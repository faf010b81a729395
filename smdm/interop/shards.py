"""Streaming safetensors shards tensor by tensor into a model built on the meta device.

A 7-8B checkpoint must load without a second full copy in memory: the model is first built on the meta device
(no storage), given uninitialised storage once (`to_empty`) in the requested dtype, and every tensor of every shard
is read alone and copied into its slice of our parameters (q/k/v into the fused qkv, gate/up into the fused gate_up).
Tensors are read with plain file reads, straight into the parameter's memory when the dtypes agree, not through a
memory map: mapped pages of a shard would count in the process's resident memory until the shard is closed (a
5 GB shard of an 8B model would add 5 GB). Peak memory is the model plus, when converting dtypes, its largest
single tensor (the embedding).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from smdm.config import ModelConfig
from smdm.errors import SmdmError
from smdm.model import Transformer, build_rope_cache

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# safetensors dtype names (https://github.com/huggingface/safetensors, format spec) -> torch
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}
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


# Our per-layer tensors in the order `layer_slots` takes the foreign names of: q, k, v (slices of the fused qkv),
# the attention output, gate and up (slices of the fused gate_up), down, and the two norms.
LAYER_PARTS = ("q", "k", "v", "o", "gate", "up", "down", "attn_norm", "mlp_norm")


def layer_slots(config: ModelConfig, layer: int, prefix: str, names: dict[str, str]) -> dict[str, Slot]:
    """One layer's foreign tensor names (`prefix` + names[part] + ".weight"/".bias") -> slots of our fused state dict;
    every Llama-style layout (HF Llama/Qwen2/Dream, LLaDA) differs only in these names."""
    hs, hidden = config.head_size, config.intermediate_size
    nq, nkv = config.n_head * hs, config.n_query_groups * hs
    dst = f"blocks.{layer}."
    slots = {}
    for kind in ("weight", "bias") if config.qkv_bias else ("weight",):
        slots[f"{prefix}{names['q']}.{kind}"] = Slot(dst + f"attn.qkv.{kind}", 0, nq)
        slots[f"{prefix}{names['k']}.{kind}"] = Slot(dst + f"attn.qkv.{kind}", nq, nq + nkv)
        slots[f"{prefix}{names['v']}.{kind}"] = Slot(dst + f"attn.qkv.{kind}", nq + nkv, nq + 2 * nkv)
    slots[f"{prefix}{names['o']}.weight"] = Slot(dst + "attn.proj.weight")
    slots[f"{prefix}{names['gate']}.weight"] = Slot(dst + "mlp.gate_up.weight", 0, hidden)
    slots[f"{prefix}{names['up']}.weight"] = Slot(dst + "mlp.gate_up.weight", hidden, 2 * hidden)
    slots[f"{prefix}{names['down']}.weight"] = Slot(dst + "mlp.down.weight")
    slots[f"{prefix}{names['attn_norm']}.weight"] = Slot(dst + "attn_norm.weight")
    slots[f"{prefix}{names['mlp_norm']}.weight"] = Slot(dst + "mlp_norm.weight")
    return slots


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


def read_header(handle, path: Path) -> tuple[dict[str, dict], int]:
    """(tensor entries, offset of the data) of a safetensors file: 8-byte little-endian header size, JSON header."""
    size = path.stat().st_size
    prefix = handle.read(8)
    if len(prefix) < 8:
        raise SmdmError(f"{path}: corrupt or truncated safetensors file (no header)")
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len > size - 8:
        raise SmdmError(f"{path}: corrupt or truncated safetensors file (header of {header_len} bytes)")
    try:
        header = json.loads(handle.read(header_len))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SmdmError(f"{path}: corrupt safetensors header ({error})") from None
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    for key, entry in header.items():
        if entry.get("dtype") not in SAFETENSORS_DTYPES:
            raise SmdmError(f"{path}: tensor {key!r} has unsupported dtype {entry.get('dtype')!r}")
        if data_start + entry["data_offsets"][1] > size:
            raise SmdmError(f"{path}: truncated (tensor {key!r} runs past the end of the file)")
    return header, data_start


def _read_into(handle, buffer: torch.Tensor, offset: int) -> None:
    """Fill a contiguous CPU tensor with the bytes at `offset` (plain reads: no mapped pages stay resident)."""
    view = buffer.view(-1).view(torch.uint8).numpy()
    handle.seek(offset)
    filled = 0
    while filled < view.size:
        count = handle.readinto(memoryview(view)[filled:])
        if not count:
            raise SmdmError(f"{handle.name}: truncated while reading a tensor")
        filled += count


def stream_into(model: Transformer, directory: Path, names: NameMap, family: str) -> None:
    """Copy every shard tensor into its slot, checking names and shapes; rows no tensor fills stay zero."""
    params = model.state_dict()
    with torch.no_grad():
        for tensor in params.values():
            tensor.zero_()
    seen: set[str] = set()
    for file in shard_files(directory):
        with open(file, "rb") as handle:
            header, data_start = read_header(handle, file)
            for key, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
                if key.endswith(IGNORED_SUFFIXES):
                    continue
                slot = names.get(key)
                if slot is None:
                    if key == "lm_head.weight" and model.config.tie_embeddings:
                        continue  # some exporters save the tied head too; the embedding is the head
                    raise SmdmError(f"{file.name}: unexpected tensor {key!r} for a {family} model of this config "
                                    "(another architecture, or config.json does not match the weights?)")
                target = params[slot.name][slot.start:slot.stop]
                shape = tuple(entry["shape"])
                expected = (target.shape[0] + slot.padding, *target.shape[1:])
                if shape != expected:
                    raise SmdmError(f"{file.name}: {key} has shape {shape} but config.json implies {expected}")
                dtype = SAFETENSORS_DTYPES[entry["dtype"]]
                offset = data_start + entry["data_offsets"][0]
                with torch.no_grad():
                    if dtype == target.dtype and not slot.padding and target.is_contiguous() \
                            and target.device.type == "cpu":
                        _read_into(handle, target, offset)  # straight into the parameter: no copy at all
                    else:
                        source = torch.empty(shape, dtype=dtype)
                        _read_into(handle, source, offset)
                        target.copy_(source[: target.shape[0]])
                        del source
                seen.add(key)
    missing = sorted(set(names) - seen)
    if missing:
        more = f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""
        raise SmdmError(f"{directory}: tensor {missing[0]!r}{more} is missing from the weights")


def scatter(foreign: Mapping[str, torch.Tensor], names: NameMap) -> dict[str, torch.Tensor]:
    """Foreign tensors (in memory) as our state dict: the inverse of `gather`; sliced slots must tile their tensor."""
    parts: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for key, slot in names.items():
        tensor = foreign[key]
        rows = tensor.shape[0] - slot.padding
        parts.setdefault(slot.name, []).append((slot.start, tensor[:rows] if slot.padding else tensor))
    return {name: torch.cat([t for _, t in sorted(pieces, key=lambda p: p[0])]).contiguous() if len(pieces) > 1
            else pieces[0][1] for name, pieces in parts.items()}


def gather(state: Mapping[str, torch.Tensor], names: NameMap) -> dict[str, torch.Tensor]:
    """Our state dict as foreign tensors (the inverse of `stream_into`), each contiguous, padding rows zero."""
    out: dict[str, torch.Tensor] = {}
    for key, slot in names.items():
        tensor = state[slot.name][slot.start:slot.stop]
        if slot.padding:
            tensor = torch.cat([tensor, tensor.new_zeros(slot.padding, *tensor.shape[1:])])
        out[key] = tensor.detach().to("cpu").contiguous().clone()
    return out
