"""Supervised fine-tuning data: (prompt, response) pairs tokenized once into fixed-length rows padded with EOS.

Each row stores the prompt length, so the objective can keep the prompt clean (never masked, never in the loss)
and learn to end the response: the EOS padding belongs to the response, as in LLaDA/SMDM, so a model that has
said all it wants predicts EOS for every remaining position and variable-length answers fall out of fixed-length
generation. `mode="text"` instead keeps the whole prompt+response as one text with loss everywhere — the paper's
recipe for the reversal curse, where the model must learn both directions of every fact.

Rows are stored padded to the longest example. `padding="batch"` (LLaDA's choice) trims each training batch to its
own longest example instead, which skips the columns of EOS that no row in the batch needs: less compute for the
same examples, and fewer EOS targets per row.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from smdm.checkpoint import atomic_replace_dir
from smdm.data.jsonl import read_records
from smdm.data.prepare import token_dtype, tokenizer_record
from smdm.errors import SmdmError
from smdm.tokenizer import Tokenizer

SFT_FORMAT = "smdm-sft-v1"
MANIFEST = "manifest.json"
# Field pairs recognised without configuration, in order of preference.
FIELD_PAIRS = (("prompt", "completion"), ("prompt", "response"), ("question", "answer"), ("instruction", "output"))
CHAT_SYSTEM, CHAT_USER, CHAT_ASSISTANT = "<|system|>\n", "<|user|>\n", "<|assistant|>\n"
CHAT_TAGS = {"system": CHAT_SYSTEM, "user": CHAT_USER, "assistant": CHAT_ASSISTANT}


@dataclass
class SFTConfig:
    """How jsonl examples become token rows; recorded in the manifest."""

    template: Literal["plain", "chat"] = "plain"  # plain: prompt text + response text; chat: role-tagged turns
    mode: Literal["response", "text"] = "response"  # text: prompt+response as one text, loss on every token
    prompt_field: str | None = None  # default: detected from FIELD_PAIRS or a "messages" list
    response_field: str | None = None
    seq_len: int | None = None  # row length; default: the longest example (at most max_len)
    max_len: int | None = None  # examples longer than this are counted and skipped (the model's context)
    val_fraction: float = 0.0
    seed: int = 0
    bos: bool = False  # prepend the tokenizer's BOS to every prompt
    skip_bad_lines: bool = False  # malformed lines: skip and count (True) or fail with file:line (False)
    padding: Literal["longest", "batch"] = "longest"  # training batches: every row at full width, or trimmed


PADDINGS = ("longest", "batch")


@dataclass
class Example:
    prompt: str
    response: str


def chat_text(messages: Sequence[dict], tokenizer: Tokenizer | None = None) -> str:
    """Messages followed by the assistant's cue: the tokenizer's own Jinja chat template when it has one (an imported
    model's tokenizer_config.json), else smdm's role-tagged one (`smdm.tokenizer.BUILTIN_CHAT_TEMPLATE`), where
    system messages are system turns."""
    if tokenizer is not None and tokenizer.chat_template is not None:
        return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True)
    body = "".join(CHAT_TAGS.get(str(m.get("role")), CHAT_USER) + m["content"] + "\n" for m in messages)
    return body + CHAT_ASSISTANT


def render_chat(messages: list[dict], where: str, tokenizer: Tokenizer | None = None) -> Example:
    """A conversation as (everything up to the last assistant turn, that turn) in the chat template."""
    if not messages or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
        raise SmdmError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    if messages[-1].get("role") != "assistant":
        raise SmdmError(f"{where}: the last message must be the assistant's (the response to learn)")
    for m in messages:
        if m.get("role") not in CHAT_TAGS:
            raise SmdmError(f"{where}: unknown role {m.get('role')!r}; use system, user or assistant")
    return Example(chat_text(messages[:-1], tokenizer), messages[-1]["content"])


def chat_prompt(turns: Sequence[tuple[str, str | None]], tokenizer: Tokenizer | None = None,
                system: str | None = None) -> str:
    """The chat template of a prompt: (user, assistant) turns, the last assistant turn None (to be generated),
    after an optional system message, exactly as `render_chat` renders training conversations."""
    messages: list[dict] = [] if system is None else [{"role": "system", "content": system}]
    for user, assistant in turns:
        messages.append({"role": "user", "content": user})
        if assistant is not None:
            messages.append({"role": "assistant", "content": assistant})
    return chat_text(messages, tokenizer)


def _example_from(obj: object, config: SFTConfig, where: str, tokenizer: Tokenizer | None = None) -> Example:
    if not isinstance(obj, dict):
        raise SmdmError(f"{where}: expected a JSON object")
    if "messages" in obj and config.prompt_field is None:
        return render_chat(obj["messages"], where, tokenizer)
    if config.prompt_field is not None:
        pair = (config.prompt_field, config.response_field or "response")
    else:
        pair = next((p for p in FIELD_PAIRS if p[0] in obj and p[1] in obj), None)
        if pair is None:
            known = ", ".join(f"{a}/{b}" for a, b in FIELD_PAIRS)
            raise SmdmError(f"{where}: no prompt/response fields (expected one of {known}, or messages)")
    missing = [k for k in pair if k not in obj]
    if missing:
        raise SmdmError(f"{where}: missing field {missing[0]!r}")
    prompt, response = obj[pair[0]], obj[pair[1]]
    if not isinstance(prompt, str) or not isinstance(response, str):
        raise SmdmError(f"{where}: fields {pair[0]!r} and {pair[1]!r} must be strings")
    if config.template == "chat":
        return Example(chat_prompt([(prompt, None)], tokenizer), response)
    return Example(prompt, response)


def read_examples(path: str | Path, config: SFTConfig | None = None,
                  tokenizer: Tokenizer | None = None) -> tuple[list[Example], list[str]]:
    """Examples of a jsonl file and the problems of the lines skipped (only with skip_bad_lines); chats use the
    tokenizer's chat template when given one that has it."""
    config = config or SFTConfig()

    def parse(obj: dict, where: str) -> Example:
        example = _example_from(obj, config, where, tokenizer)
        if not example.response.strip():
            raise SmdmError(f"{where}: empty response")
        return example

    return read_records(path, parse, skip_bad_lines=config.skip_bad_lines)


def encode_example(example: Example, tokenizer: Tokenizer, config: SFTConfig) -> tuple[list[int], int]:
    """(ids, prompt length) with one EOS after the response; in text mode the prompt length is 0."""
    prompt = tokenizer.encode(example.prompt, bos=config.bos) if example.prompt else (
        [tokenizer.bos_id] if config.bos and tokenizer.bos_id is not None else [])
    response = tokenizer.encode(example.response, eos=True)
    return prompt + response, 0 if config.mode == "text" else len(prompt)


def prepare_sft(paths: Sequence[str | Path], tokenizer: Tokenizer, out_dir: str | Path,
                config: SFTConfig | None = None) -> dict:
    """Tokenize jsonl examples into train/val rows (tokens.npy, prompt_lengths.npy) and a manifest, atomically."""
    config = config or SFTConfig()
    if config.padding not in PADDINGS:
        raise SmdmError(f"unknown padding {config.padding!r}; use longest or batch")
    if not 0.0 <= config.val_fraction < 1.0:
        raise SmdmError(f"val_fraction must be in [0, 1), got {config.val_fraction}")
    if not paths:
        raise SmdmError("no SFT files given")
    examples: list[Example] = []
    problems: list[str] = []
    for path in paths:
        found, bad = read_examples(path, config, tokenizer)
        examples += found
        problems += bad
    encoded = [encode_example(e, tokenizer, config) for e in examples]
    limit = config.max_len
    if config.seq_len is not None:
        limit = config.seq_len if limit is None else min(limit, config.seq_len)
    kept = [(ids, n) for ids, n in encoded if limit is None or len(ids) <= limit]
    too_long = len(encoded) - len(kept)
    # A prompt that fills the row leaves nothing to learn.
    kept = [(ids, n) for ids, n in kept if n < len(ids)]
    if not kept:
        raise SmdmError(f"all {len(encoded)} examples are longer than {limit} tokens; raise --seq-len or shorten them")
    seq_len = config.seq_len or max(len(ids) for ids, _ in kept)

    order = np.random.default_rng(config.seed).permutation(len(kept))
    n_val = 0 if config.val_fraction == 0 else min(len(kept) - 1, max(1, round(len(kept) * config.val_fraction)))
    splits = {"val": order[:n_val], "train": order[n_val:]}
    dtype = token_dtype(tokenizer.vocab_size)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        manifest_splits = {}
        for split, index in splits.items():
            rows = np.full((len(index), seq_len), tokenizer.eos_id, dtype=dtype)
            prompt_lengths = np.zeros(len(index), dtype=np.int64)
            lengths = np.zeros(len(index), dtype=np.int64)
            for row, i in enumerate(index):
                ids, n = kept[int(i)]
                rows[row, :len(ids)] = ids
                prompt_lengths[row], lengths[row] = n, len(ids)
            np.save(tmp / f"{split}-tokens.npy", rows)
            np.save(tmp / f"{split}-prompt_lengths.npy", prompt_lengths)
            np.save(tmp / f"{split}-lengths.npy", lengths)
            manifest_splits[split] = {"examples": len(index)}
        manifest = {
            "format": SFT_FORMAT,
            "seq_len": seq_len,
            "tokenizer": tokenizer_record(tokenizer),
            "splits": manifest_splits,
            "skipped": {"too_long": too_long, "malformed": len(problems)},
            "problems": problems[:20],
            "config": asdict(config),
            "sources": [str(Path(p).resolve()) for p in paths],
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if out_dir.exists() and not (out_dir / MANIFEST).is_file():
            raise SmdmError(f"{out_dir}: exists and is not a prepared dataset; choose another directory")
        atomic_replace_dir(tmp, out_dir)  # the previous data stays whole until the new data is complete
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def read_sft_manifest(data_dir: str | Path) -> dict | None:
    """The manifest of a directory written by prepare_sft, or None for any other directory (e.g. `smdm prepare`'s)."""
    path = Path(data_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == SFT_FORMAT else None


def is_sft_data(data_dir: str | Path) -> bool:
    """Whether a data directory was written by prepare_sft (rather than `smdm prepare`)."""
    return read_sft_manifest(data_dir) is not None


class SFTDataset:
    """Rows of one split in a seeded per-epoch order; same resumable, rank-aware contract as PackedDataset."""

    def __init__(self, data_dir: str | Path, split: str = "train", seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True) -> None:
        self.data_dir = Path(data_dir)
        manifest = read_sft_manifest(self.data_dir)
        if manifest is None:
            raise SmdmError(f"{self.data_dir}: not an SFT dataset (run `smdm sft`, which prepares one)")
        self.manifest = manifest
        if split not in self.manifest["splits"]:
            raise SmdmError(f"{self.data_dir}: no split {split!r}")
        self.split, self.seed, self.rank, self.world_size, self.shuffle = split, seed, rank, world_size, shuffle
        self.seq_len = int(self.manifest["seq_len"])
        self.tokens = np.load(self.data_dir / f"{split}-tokens.npy", mmap_mode="r")
        self.prompt_lengths = np.load(self.data_dir / f"{split}-prompt_lengths.npy")
        self.n_rows = len(self.prompt_lengths)
        lengths = self.data_dir / f"{split}-lengths.npy"  # absent in data prepared before batch padding existed
        trim = self.manifest.get("config", {}).get("padding", "longest") == "batch" and lengths.is_file()
        self.lengths = np.load(lengths) if trim else None
        self.epoch, self.position = 0, 0
        self._orders: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.n_rows

    def _row_at(self, offset: int) -> int:
        absolute = self.position + offset
        epoch, index = self.epoch + absolute // self.n_rows, absolute % self.n_rows
        if not self.shuffle:
            return index
        if epoch not in self._orders:
            if len(self._orders) >= 2:
                self._orders.pop(min(self._orders))
            self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n_rows)
        return int(self._orders[epoch][index])

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (tokens (B, width), prompt lengths (B,)) of the next batch_size*world_size rows.

        width is seq_len, or with batch padding the longest example among these rows (EOS included).
        """
        if self.n_rows == 0:
            raise SmdmError(f"{self.data_dir}: split {self.split!r} is empty")
        rows = [self._row_at(self.rank * batch_size + k) for k in range(batch_size)]
        advanced = self.position + batch_size * self.world_size
        self.epoch += advanced // self.n_rows
        self.position = advanced % self.n_rows
        width = self.seq_len if self.lengths is None else int(self.lengths[rows].max())
        return (torch.from_numpy(np.asarray(self.tokens[rows, :width], dtype=np.int64)),
                torch.from_numpy(self.prompt_lengths[rows].astype(np.int64)))

    def rows(self, max_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The first rows in stored order, for a deterministic validation set."""
        n = self.n_rows if max_rows is None else min(max_rows, self.n_rows)
        return (torch.from_numpy(np.asarray(self.tokens[:n], dtype=np.int64)),
                torch.from_numpy(self.prompt_lengths[:n].astype(np.int64)))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "n_rows": self.n_rows}

    def load_state_dict(self, state: dict) -> None:
        if state.get("n_rows") != self.n_rows or state.get("seed") != self.seed:
            raise SmdmError("data state mismatch: resume with the same SFT data and seed")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
