"""Foreign model formats: Hugging Face directories of Llama / Qwen2 (ARMs), LLaDA and Dream (MDMs), import and export.

One module per format maps names and shapes onto ModelConfig + our state dict (`hf.py`, `llada.py`, `dream.py`);
`shards.py` streams the safetensors shards into a model built on the meta device; `loader.py` detects the family and
imports (`load_model_dir`); `export.py` writes our models back out; `cli.py` is `smdm export`.
The names below are loaded on first use, so `smdm --help` does not import torch.
"""

from __future__ import annotations

from typing import Any

_LOADER_NAMES = ("load_model_dir", "is_model_dir", "model_dir_config", "detect_family", "import_spec", "read_record",
                 "resolve_dtype", "EXTRA_FILE")
__all__ = list(_LOADER_NAMES)


def __getattr__(name: str) -> Any:
    if name in _LOADER_NAMES:
        from smdm.interop import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'smdm.interop' has no attribute {name!r}")
