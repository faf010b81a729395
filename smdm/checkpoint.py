"""Checkpoints: safetensors weights + JSON metadata + training state, written atomically.

A checkpoint is a directory:
  model.safetensors   weights (our parameter names)
  config.json         format tag, model config, objective, tokenizer fingerprint, sha256 of the weights
  state.pt            optional: optimizer, RNG and data-position state for an exact resume
  tokenizer.*         a copy of the tokenizer file, so a checkpoint is usable on its own
Writes go to a temporary sibling directory that replaces the old one only once complete, so a crash or a full
disk mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from smdm.config import ModelConfig
from smdm.errors import SmdmError
from smdm.model import Transformer

FORMAT = "smdm-checkpoint-v1"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "state.pt"
RUN_LOCK_FILE = ".smdm.lock"


@dataclass
class Checkpoint:
    """What a checkpoint directory holds, loaded."""

    model: Transformer
    config: ModelConfig
    meta: dict[str, Any]
    path: Path
    train_state: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def tokenizer_path(self) -> Path | None:
        """The tokenizer copy stored beside the weights, if any."""
        name = self.meta.get("tokenizer", {}).get("file")
        return self.path / name if name else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_replace_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Move a fully written tmp_dir to final_dir, replacing any previous one with no window of loss.

    Two renames (a directory cannot replace a non-empty one in one step): if the second fails the previous directory
    is put back; if the process dies between them, `resolve_checkpoint_dir` finds it under its `.old-PID` name.
    """
    old = final_dir.with_name(f".{final_dir.name}.old-{os.getpid()}")
    if final_dir.exists():
        os.replace(final_dir, old)
    try:
        os.replace(tmp_dir, final_dir)
    except BaseException:
        if old.exists() and not final_dir.exists():
            os.replace(old, final_dir)
        raise
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def _try_lock(path: Path) -> int | None:
    """An fd holding an exclusive flock on path (the file that is at path now), or None if another process holds it."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:  # read-only directory, another user's lock file, ...
            raise SmdmError(f"cannot lock {path}: {error.strerror or error}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:  # the holder we waited on may have removed the file: a lock on that unlinked inode would guard nothing
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _lock_holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        pid = ""
    return f"pid {pid}" if pid.isdigit() else "another process"


@contextmanager
def lock_run_dir(path: str | Path) -> Iterator[Path]:
    """Hold an exclusive lock on a run directory (created if needed) for the life of the block.

    Two trainings writing one directory would interleave metrics rows and overwrite each other's checkpoints, so the
    second one must stop before it touches anything. flock (not a pid file) is released by the kernel whenever the
    holder dies, even by SIGKILL, so a crash never leaves a stale lock. The lock file records the holder's pid for the
    error message. A directory this call created is removed again if the block fails before writing anything into it.
    """
    path = Path(path)
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SmdmError(f"cannot create run directory {path}: {error.strerror or error}") from None
    lock_file = path / RUN_LOCK_FILE
    fd = _try_lock(lock_file)
    if fd is None:
        raise SmdmError(f"{path} is in use by {_lock_holder(lock_file)} (another training holds {lock_file}); "
                        "wait for it to finish or choose another --out")
    ok = False
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield path
        ok = True
    finally:
        if not ok and created and [p.name for p in path.iterdir()] == [RUN_LOCK_FILE]:
            lock_file.unlink()  # unlinked while still held: a process waiting on the old file retries (_try_lock)
            try:
                path.rmdir()
            except OSError as error:
                if error.errno not in (errno.ENOTEMPTY, errno.ENOENT):
                    raise
        os.close(fd)


def save_checkpoint(directory: str | Path, model: torch.nn.Module | Mapping[str, torch.Tensor], config: ModelConfig,
                    meta: dict[str, Any], train_state: dict[str, Any] | None = None,
                    tokenizer_file: str | Path | None = None) -> Path:
    """Write a checkpoint atomically; `model` is a module or its (gathered) state dict; `meta` names the objective."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        state = model.state_dict() if isinstance(model, torch.nn.Module) else model
        weights = {name: tensor.detach().to("cpu").contiguous() for name, tensor in state.items()}
        save_file(weights, str(tmp / WEIGHTS_FILE))
        meta = dict(meta)
        if tokenizer_file is not None:
            tokenizer_file = Path(tokenizer_file)
            shutil.copyfile(tokenizer_file, tmp / tokenizer_file.name)
            meta["tokenizer"] = {**meta.get("tokenizer", {}), "file": tokenizer_file.name}
        record = {"format": FORMAT, "model": config.to_dict(), "weights_sha256": _sha256(tmp / WEIGHTS_FILE), **meta}
        (tmp / CONFIG_FILE).write_text(json.dumps(record, indent=2))
        if train_state is not None:
            torch.save(train_state, tmp / STATE_FILE)
        atomic_replace_dir(tmp, directory)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        # A full disk surfaces as OSError from Python's writes, RuntimeError from torch.save's zip writer
        # ("PytorchStreamWriter failed writing file ...") and SafetensorError from save_file.
        if isinstance(error, (OSError, RuntimeError, SafetensorError)):
            reason = error.strerror if isinstance(error, OSError) and error.strerror else _one_line(error)
            try:
                reason += f" ({shutil.disk_usage(directory.parent).free / 2**20:.1f} MiB free there)"
            except OSError:
                pass
            raise SmdmError(f"could not save checkpoint to {directory}: {reason}; "
                            "the previous checkpoint is intact") from error
        raise
    return directory


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """Accept a checkpoint directory or a run directory (its `checkpoint/`), recovering from an interrupted swap."""
    path = Path(path)
    for candidate in (path, path / "checkpoint"):
        if (candidate / CONFIG_FILE).is_file():
            return candidate
        leftovers = sorted(candidate.parent.glob(f".{candidate.name}.old-*"))
        if not candidate.exists() and leftovers and (leftovers[-1] / CONFIG_FILE).is_file():
            os.replace(leftovers[-1], candidate)  # killed between the two renames of atomic_replace_dir
            return candidate
    raise SmdmError(f"{path}: no smdm checkpoint or Hugging Face model here (expected {CONFIG_FILE} and weights)")


def read_checkpoint_meta(path: str | Path) -> dict[str, Any]:
    """The config.json of a checkpoint, validated as ours."""
    directory = resolve_checkpoint_dir(path)
    try:
        record = json.loads((directory / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SmdmError(f"{directory / CONFIG_FILE}: corrupted checkpoint metadata ({error})") from error
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise SmdmError(f"{directory}: not an {FORMAT} checkpoint (another architecture or tool?); "
                        "for ML-GSAI/SMDM weights use `smdm import-smdm`")
    return record


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", with_train_state: bool = False,
                    verify: bool = True, dtype: str | torch.dtype | None = None) -> Checkpoint:
    """Load a checkpoint (directory or run directory) into a ready model in eval mode.

    A Hugging Face model directory (Llama, Qwen2, LLaDA, Dream) is imported instead (`smdm.interop.load_model_dir`),
    so every command taking a checkpoint takes one; `dtype` applies to those ("auto" keeps the stored dtype).
    """
    from smdm.interop import is_model_dir, load_model_dir

    if is_model_dir(path):
        return load_model_dir(path, dtype=dtype, device=device)
    directory = resolve_checkpoint_dir(path)
    record = read_checkpoint_meta(directory)
    config = ModelConfig.from_dict(record["model"])
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise SmdmError(f"{directory}: {WEIGHTS_FILE} is missing")
    if verify and record.get("weights_sha256") and _sha256(weights_path) != record["weights_sha256"]:
        raise SmdmError(f"{weights_path}: checksum mismatch, the checkpoint is corrupted or truncated")
    try:
        weights = load_file(str(weights_path), device=str(device))
    except (SafetensorError, OSError, ValueError) as error:
        raise SmdmError(f"{weights_path}: corrupted or truncated checkpoint ({error})") from error
    block = (record.get("objective_options") or {}).get("diffusion_block_size")
    if record.get("objective") == "bdm":  # block diffusion: samplers and scorers dispatch on this
        if not isinstance(block, int) or block < 1 or config.block_size % block:
            raise SmdmError(f"{directory}: a bdm checkpoint must record a diffusion block size dividing the "
                            f"context {config.block_size}, found {block!r}")
    else:
        block = None
    model = Transformer(config, causal=record.get("objective") == "arm", diffusion_block_size=block)
    load_weights(model, weights, source=str(weights_path))
    model.to(device).eval()
    train_state = None
    if with_train_state and (directory / STATE_FILE).is_file():
        try:
            train_state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises many types for a damaged pickle
            raise SmdmError(f"{directory / STATE_FILE}: corrupted training state ({error})") from error
    meta = {k: v for k, v in record.items() if k not in ("model", "format")}
    return Checkpoint(model=model, config=config, meta=meta, path=directory, train_state=train_state)


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    """Strictly load weights, turning a key or shape mismatch into one readable error."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise SmdmError(f"{source}: weights do not match the model architecture ({detail})")
    for name, tensor in weights.items():
        if tensor.shape != expected[name].shape:
            raise SmdmError(f"{source}: {name} has shape {tuple(tensor.shape)}, "
                            f"the model expects {tuple(expected[name].shape)}")
    model.load_state_dict(weights)


def load_for_inference(path: str | Path, tokenizer_path: str | Path | None = None, device: str = "auto",
                       dtype: str | torch.dtype | None = None):
    """A checkpoint on its device and its tokenizer, checked against each other: what every inference command needs.

    `path` is an smdm checkpoint or a Hugging Face model directory (its tokenizer read from the directory).
    """
    from smdm.distributed import resolve_device
    from smdm.tokenizer import Tokenizer

    checkpoint = load_checkpoint(path, device=resolve_device(device), dtype=dtype)
    source = tokenizer_path or checkpoint.tokenizer_path
    if source is None:
        raise SmdmError(f"{path}: no tokenizer stored with the checkpoint; pass --tokenizer")
    tokenizer = Tokenizer.from_file(source)
    if "source" in checkpoint.meta:  # imported: embeddings are often padded past the tokenizer (LLaDA: 126464 rows)
        if tokenizer.vocab_size > checkpoint.config.vocab_size:
            raise SmdmError(f"tokenizer {source} has {tokenizer.vocab_size} tokens, more than the model's "
                            f"{checkpoint.config.vocab_size} embedding rows")
        return checkpoint, tokenizer
    if tokenizer.vocab_size != checkpoint.config.vocab_size:
        raise SmdmError(f"tokenizer {source} has {tokenizer.vocab_size} tokens but the model expects "
                        f"{checkpoint.config.vocab_size}")
    return checkpoint, tokenizer
