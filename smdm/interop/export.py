"""Export an smdm checkpoint (or any model smdm loads) as a Hugging Face directory.

ARM -> `LlamaForCausalLM` (`Qwen2ForCausalLM` with q/k/v biases): `transformers.AutoModelForCausalLM.from_pretrained`
loads it with no remote code. MDM -> LLaDA's layout and config.json (`LLaDAModelLM`, what LLaDA's and Fast-dLLM's
code load); a shifted MDM -> Dream's layout (`DreamModel`). Beside the weights: the tokenizer file, a
tokenizer_config.json with the chat template, generation_config.json with the token ids and sampler defaults, and
under "smdm" in config.json our own config, so the directory loads back into smdm bit-exactly (rows a foreign layout
has no place for, an ARM's [MASK] embedding row, go to smdm_extra.safetensors, which other loaders ignore).
Written into a temporary sibling directory and renamed into place: an error leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from smdm.errors import SmdmError
from smdm.interop.loader import EXTRA_FILE
from smdm.interop.shards import NameMap, gather

FORMATS = ("hf",)
# Sampler defaults written to generation_config.json of an MDM export (LLaDA's README settings for chat).
MDM_SAMPLER_DEFAULTS = {"steps": 128, "gen_length": 128, "block_length": 32, "temperature": 0.0,
                        "remasking": "low_confidence"}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _layout(checkpoint: Any) -> tuple[dict[str, Any], NameMap]:
    """(config.json record, names) of the foreign layout this model exports to."""
    from smdm.interop.dream import dream_record
    from smdm.interop.hf import hf_names, hf_record
    from smdm.interop.llada import llada_export_names, llada_record

    config, objective = checkpoint.config, checkpoint.meta.get("objective")
    if objective == "arm":
        return hf_record(config), hf_names(config)
    if objective != "mdm":
        raise SmdmError(f"cannot export a {objective!r} model to HF: only ARMs (Llama/Qwen2) and MDMs (LLaDA/Dream)")
    if config.shifted:
        if not config.qkv_bias or config.mask_token_id is None:
            raise SmdmError("a shifted MDM exports in Dream's layout, which needs q/k/v biases and a [MASK] id "
                            "inside the vocabulary; this model has neither")
        return dream_record(config), hf_names(config)
    return llada_record(config), llada_export_names(config)


def _token_ids(tokenizer: Any) -> dict[str, Any]:
    ids: dict[str, Any] = {"eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    if tokenizer.bos_id is not None:
        ids["bos_token_id"] = tokenizer.bos_id
    return ids


def _write_tokenizer(tokenizer: Any, directory: Path, block_size: int) -> None:
    """The tokenizer file(s) and a tokenizer_config.json carrying the chat template (the tokenizer's own, if any)."""
    source_dir = tokenizer.path if tokenizer.path.is_dir() else tokenizer.path.parent
    for file in tokenizer.files:
        shutil.copyfile(file, directory / file.name)
    config_path = source_dir / "tokenizer_config.json"
    record: dict[str, Any] = {}
    if config_path.is_file():
        record = json.loads(config_path.read_text())
    record.setdefault("tokenizer_class", "LlamaTokenizer" if tokenizer.backend == "sentencepiece"
                      else "PreTrainedTokenizerFast")
    record.setdefault("model_max_length", block_size)
    record.setdefault("eos_token", tokenizer.token_text(tokenizer.eos_id))
    if tokenizer.bos_id is not None:
        record.setdefault("bos_token", tokenizer.token_text(tokenizer.bos_id))
    record.setdefault("pad_token", tokenizer.token_text(tokenizer.pad_id))
    record["chat_template"] = tokenizer.chat_template_source()
    (directory / "tokenizer_config.json").write_text(json.dumps(record, indent=2, ensure_ascii=False))
    special = source_dir / "special_tokens_map.json"
    if special.is_file():
        shutil.copyfile(special, directory / special.name)


def export_hf(checkpoint_path: str | Path, out: str | Path, tokenizer_path: str | Path | None = None) -> Path:
    """Write the model at `checkpoint_path` (smdm checkpoint or HF directory) to `out` in its HF layout."""
    from smdm.checkpoint import load_for_inference

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SmdmError(f"{out} already exists and is not empty; choose a new --out")
    # "auto": a bf16 Hugging Face directory stays bf16 (smdm checkpoints load in the dtype they were saved in)
    checkpoint, tokenizer = load_for_inference(checkpoint_path, tokenizer_path, "cpu", dtype="auto")
    record, names = _layout(checkpoint)
    state = checkpoint.model.state_dict()
    tensors = gather(state, names)
    dtype = next(iter(tensors.values())).dtype
    objective = checkpoint.meta["objective"]
    record.update(_token_ids(tokenizer), torch_dtype=_DTYPE_NAMES.get(dtype, "float32"),
                  smdm={"model": checkpoint.config.to_dict(), "objective": objective})
    generation = {**_token_ids(tokenizer)}
    if objective == "mdm":
        generation.update(mask_token_id=checkpoint.config.mask_id, **MDM_SAMPLER_DEFAULTS)
    else:
        generation.update(do_sample=False, max_new_tokens=128)
    vocab = checkpoint.config.vocab_size
    extra_rows = state["embed.weight"][vocab:] if "model.embed_tokens.weight" in names else None

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        del tensors
        if extra_rows is not None and extra_rows.numel():
            save_file({"embed.weight.extra_rows": extra_rows.detach().cpu().contiguous()}, str(tmp / EXTRA_FILE))
        (tmp / "config.json").write_text(json.dumps(record, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
        _write_tokenizer(tokenizer, tmp, checkpoint.config.block_size)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(error, OSError):
            raise SmdmError(f"could not write {out}: {error.strerror or error}; nothing was written") from None
        raise
    return out
