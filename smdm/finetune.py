"""Fine-tuning = prepare (prompt, response) rows + the one training loop; used by `smdm sft` and the paper's tasks."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from smdm.checkpoint import read_checkpoint_meta, resolve_checkpoint_dir
from smdm.config import ModelConfig
from smdm.data.sft import SFTConfig, is_sft_data, prepare_sft
from smdm.errors import SmdmError
from smdm.tokenizer import Tokenizer
from smdm.train import TrainConfig, train

SFT_SETTINGS = "sft_config.json"  # beside train_config.json: what `smdm sft --config` needs besides it


def resolve_tokenizer(tokenizer: str | Path | None, init_from: str | Path | None) -> Tokenizer:
    """The tokenizer given, else the copy stored with the starting checkpoint."""
    if tokenizer is not None:
        return Tokenizer.from_file(tokenizer)
    if init_from is not None:  # metadata only: the weights are loaded once, by the training loop
        name = read_checkpoint_meta(init_from).get("tokenizer", {}).get("file")
        path = resolve_checkpoint_dir(init_from) / name if name else None
        if path is not None and path.is_file():
            return Tokenizer.from_file(path)
        raise SmdmError(f"{init_from}: checkpoint carries no tokenizer; pass --tokenizer")
    raise SmdmError("pass --tokenizer (or --init-from a checkpoint that carries one)")


def finetune(files: list[str | Path], train_config: TrainConfig, sft_config: SFTConfig | None = None,
             tokenizer: str | Path | None = None) -> dict[str, Any]:
    """Tokenize `files` into OUT/data (kept on resume so the data order replays exactly), then train on them."""
    sft_config = sft_config or SFTConfig()
    out_dir = Path(train_config.out_dir)
    data_dir = out_dir / "data"
    train_config.validate()
    if not (train_config.resume and is_sft_data(data_dir)):
        tok = resolve_tokenizer(tokenizer, train_config.init_from)
        if sft_config.max_len is None:
            block = _block_size(train_config)
            sft_config = replace(sft_config, max_len=block)
        manifest = prepare_sft(files, tok, data_dir, sft_config)
        skipped = manifest["skipped"]
        if skipped["too_long"] or skipped["malformed"]:
            print(f"sft: skipped {skipped['too_long']} examples longer than the context and "
                  f"{skipped['malformed']} malformed lines")
        out_dir.mkdir(parents=True, exist_ok=True)
        record = {"files": [str(Path(f).resolve()) for f in files],
                  "tokenizer": str(Path(tokenizer).resolve()) if tokenizer else None, **asdict(sft_config)}
        (out_dir / SFT_SETTINGS).write_text(json.dumps(record, indent=2))
    return train(replace(train_config, data_dir=str(data_dir)))


def read_sft_settings(run_dir: str | Path) -> dict[str, Any]:
    """The SFT settings a run recorded (files, tokenizer, SFTConfig fields), so `smdm sft --config` re-runs it."""
    path = Path(run_dir) / SFT_SETTINGS
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise SmdmError(f"{path}: unreadable SFT settings ({error})") from None


def _block_size(config: TrainConfig) -> int:
    if config.init_from:
        return int(read_checkpoint_meta(config.init_from)["model"]["block_size"])
    return ModelConfig.from_name(config.model, vocab_size=2).block_size
