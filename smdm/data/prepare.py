"""Turn raw text files into token shards once, so training only memory-maps integers and never re-tokenizes."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from smdm.errors import SmdmError
from smdm.tokenizer import Tokenizer

FORMAT = "smdm-tokens-v1"
MANIFEST = "manifest.json"
_BATCH_DOCS = 512
_BATCH_CHARS = 4_000_000


@dataclass
class PrepareConfig:
    """Knobs of `prepare_corpus`, kept together so they can be recorded in the manifest."""

    val_fraction: float = 0.01
    seed: int = 0
    text_field: str = "text"
    shard_tokens: int = 50_000_000  # max tokens per shard file


def _decode_utf8(data: bytes, path: Path, base_offset: int = 0) -> str:
    """Decode strictly so mojibake never silently enters the training data."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SmdmError(f"{path}: not UTF-8 text (byte offset {base_offset + exc.start})") from None


def _expand(paths: Sequence[Path]) -> list[Path]:
    """Input files in a stable order (directories expand recursively, sorted, hidden files skipped)."""
    files: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = (f for f in p.rglob("*") if f.is_file())
            files.extend(sorted(f for f in found if not any(part.startswith(".") for part in f.relative_to(p).parts)))
        elif p.is_file():
            files.append(p)
        else:
            raise SmdmError(f"{p}: no such file or directory")
    return files


def _read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    """One document per line; streamed so multi-GB jsonl files do not need to fit in memory."""
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = _decode_utf8(raw, path, offset).strip()
            offset += len(raw)
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SmdmError(f"{path}:{lineno}: bad JSON ({exc.msg})") from None
            if isinstance(obj, str):
                yield obj
                continue
            if not isinstance(obj, dict) or text_field not in obj:
                raise SmdmError(f"{path}:{lineno}: no {text_field!r} field; pass text_field= the key holding the text")
            value = obj[text_field]
            if not isinstance(value, str):
                raise SmdmError(f"{path}:{lineno}: field {text_field!r} is not a string")
            yield value


def _read_json(path: Path, text_field: str) -> Iterator[str]:
    """A list of strings / list of records / a title -> {"extract": ...} mapping (the embedded Wikipedia corpus)."""
    text = _decode_utf8(path.read_bytes(), path)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SmdmError(f"{path}:{exc.lineno}: bad JSON ({exc.msg})") from None
    if isinstance(obj, list):
        for i, item in enumerate(obj):
            if isinstance(item, str):
                yield item
            elif isinstance(item, dict) and isinstance(item.get(text_field), str):
                yield item[text_field]
            else:
                raise SmdmError(f"{path}: item {i} is neither a string nor a record with a string {text_field!r} field")
    elif isinstance(obj, dict):
        for key, value in obj.items():
            if isinstance(value, str):
                yield value
            elif isinstance(value, dict) and isinstance(value.get("extract"), str):
                yield value["extract"]
            elif isinstance(value, dict) and isinstance(value.get(text_field), str):
                yield value[text_field]
            else:
                raise SmdmError(f"{path}: entry {key!r} has no string 'extract' or {text_field!r} field")
    else:
        raise SmdmError(f"{path}: JSON must be a list of documents or a mapping of title -> {{'extract': text}}")


def read_documents(paths: Sequence[Path], text_field: str = "text") -> Iterator[str]:
    """Yield non-empty documents from txt/md/jsonl/json files or directories, one uniform stream for tokenization."""
    for path in _expand(paths):
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            docs: Iterator[str] = _read_jsonl(path, text_field)
        elif suffix == ".json":
            docs = _read_json(path, text_field)
        else:
            docs = iter([_decode_utf8(path.read_bytes(), path)])
        for doc in docs:
            if doc.strip():
                yield doc


class _ShardWriter:
    """Append tokens of one split into fixed-capacity shard files and count them for the manifest."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.out_dir, self.split, self.dtype, self.cap = out_dir, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self.tokens = 0
        self.documents = 0
        self._fh = None
        self._in_shard = 0

    def _open_next(self) -> None:
        if self._fh is not None:
            self._fh.close()
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self._fh = open(self.out_dir / name, "wb")  # noqa: SIM115 -- kept open across write() calls, closed in close()
        self.shards.append({"file": name, "tokens": 0})
        self._in_shard = 0

    def write(self, ids: np.ndarray) -> None:
        start = 0
        while start < len(ids):
            if self._fh is None or self._in_shard >= self.cap:
                self._open_next()
            n = min(self.cap - self._in_shard, len(ids) - start)
            self._fh.write(ids[start : start + n].tobytes())
            self._in_shard += n
            self.shards[-1]["tokens"] += n
            self.tokens += n
            start += n

    def abort(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def close(self) -> dict:
        if self._fh is None:  # keep the invariant "every split has >= 1 shard file", even an empty one
            self._open_next()
        self._fh.close()
        self._fh = None
        return {"shards": self.shards, "tokens": self.tokens, "documents": self.documents}


def tokenizer_record(tokenizer: Tokenizer) -> dict:
    """The manifest's tokenizer entry; the path is absolute, so training from any directory finds the file."""
    return {"path": str(tokenizer.path.resolve()), "fingerprint": tokenizer.fingerprint,
            "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id}


def tokenizer_file(manifest: dict, data_dir: str | Path) -> Path | None:
    """The tokenizer file a data manifest was tokenized with, checked to exist and to be that same tokenizer.

    Training copies it into every checkpoint (a checkpoint without its tokenizer cannot sample), so a missing file
    is an error before training starts, never a checkpoint silently saved without it. A relative path is read
    relative to the manifest's directory (then, for manifests written before paths were made absolute, the current
    directory); the fingerprint check rules out picking up another file of the same name. None only when the
    manifest records no tokenizer file at all (synthetic tokens, e.g. benchmarks/synthetic_tokens.py).
    """
    entry = manifest.get("tokenizer", {})
    recorded = entry.get("path")
    if recorded is None:
        return None
    path = Path(recorded)
    candidates = [path] if path.is_absolute() else [Path(data_dir) / path, path]
    found = next((c for c in candidates if c.exists()), None)
    where = Path(data_dir) / MANIFEST
    if found is None:
        raise SmdmError(f"{where}: tokenizer file {recorded} not found (checkpoints need a copy of it); "
                        "run `smdm prepare` again with the tokenizer's current path")
    if not found.is_file():
        raise SmdmError(f"{where}: tokenizer {found} is a directory, and a checkpoint stores one tokenizer file; "
                        "prepare with its tokenizer.json or .model file")
    fingerprint = Tokenizer.from_file(found).fingerprint
    if entry.get("fingerprint") is not None and fingerprint != entry["fingerprint"]:
        raise SmdmError(f"{where}: {found} is not the tokenizer the data was prepared with (fingerprint differs); "
                        "run `smdm prepare` again")
    return found.resolve()


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest dtype that also holds the mask id (= vocab_size), halving disk and page-cache use for <64k vocabs."""
    return np.dtype(np.uint16) if vocab_size + 1 <= 65536 else np.dtype(np.uint32)


def _batches(docs: Iterator[str]) -> Iterator[list[str]]:
    """Group documents so encode_batch gets enough work without unbounded memory."""
    batch: list[str] = []
    chars = 0
    for d in docs:
        batch.append(d)
        chars += len(d)
        if len(batch) >= _BATCH_DOCS or chars >= _BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _check_out_dir(out_dir: Path) -> None:
    """Refuse to replace a directory that is not a previous prepare output, so a typo cannot delete user files."""
    if out_dir.exists():
        if not out_dir.is_dir():
            raise SmdmError(f"{out_dir}: exists and is not a directory; choose another output directory")
        if any(out_dir.iterdir()) and not (out_dir / MANIFEST).is_file():
            raise SmdmError(
                f"{out_dir}: exists, is not empty and has no {MANIFEST}; choose a new or empty output directory"
            )


def _commit_dir(tmp: Path, out_dir: Path) -> None:
    """Swap the finished temporary directory into place; an old dataset is removed only after the swap."""
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", suffix=".tmp", dir=out_dir.parent))
        old.rmdir()
        os.replace(out_dir, old)
        try:
            os.replace(tmp, out_dir)
        except BaseException:
            os.replace(old, out_dir)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def prepare_corpus(
    paths: Sequence[Path],
    tokenizer: Tokenizer,
    out_dir: Path,
    config: PrepareConfig | None = None,
    progress: bool = True,
) -> dict:
    """Tokenize documents, EOS-terminate each, split train/val by document, write shards + manifest atomically."""
    config = config or PrepareConfig()
    if not 0.0 <= config.val_fraction < 1.0:
        raise SmdmError(f"val_fraction must be in [0, 1), got {config.val_fraction}")
    if config.shard_tokens < 1:
        raise SmdmError(f"shard_tokens must be positive, got {config.shard_tokens}")
    out_dir = Path(out_dir)
    files = _expand(paths)
    if not files:
        raise SmdmError("empty corpus: no input files given; pass .txt/.jsonl/.json files or a directory of them")
    _check_out_dir(out_dir)

    # Pass 1 (cheap, no tokenization): count documents so the val choice is an exact, seeded subset.
    n_docs = sum(1 for _ in read_documents(files, config.text_field))
    if n_docs == 0:
        shown = ", ".join(str(f) for f in files[:3]) + (" ..." if len(files) > 3 else "")
        raise SmdmError(f"empty corpus: no non-empty documents in {shown}")
    single = n_docs == 1
    val_docs: set[int] = set()
    if not single and config.val_fraction > 0:
        n_val = min(n_docs - 1, max(1, round(n_docs * config.val_fraction)))
        rng = np.random.default_rng(config.seed)
        val_docs = {int(i) for i in rng.choice(n_docs, size=n_val, replace=False)}

    dtype = token_dtype(tokenizer.vocab_size)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the dataset should get normal directory permissions
    writers = {s: _ShardWriter(tmp, s, dtype, config.shard_tokens) for s in ("train", "val")}
    try:
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=n_docs, unit="doc", desc="tokenizing", dynamic_ncols=True)
        index = 0
        for batch in _batches(read_documents(files, config.text_field)):
            for ids in tokenizer.encode_batch(batch):
                ids.append(tokenizer.eos_id)
                arr = np.asarray(ids, dtype=dtype)
                if single:
                    n_val_tok = 0
                    if config.val_fraction > 0 and len(arr) >= 2:
                        n_val_tok = min(len(arr) - 1, max(1, round(len(arr) * config.val_fraction)))
                    writers["train"].write(arr[: len(arr) - n_val_tok])
                    writers["val"].write(arr[len(arr) - n_val_tok :])
                    writers["train"].documents += 1
                else:
                    w = writers["val" if index in val_docs else "train"]
                    w.write(arr)
                    w.documents += 1
                index += 1
            if bar is not None:
                bar.update(len(batch))
        if bar is not None:
            bar.close()
        if index != n_docs:
            raise SmdmError(f"input files changed while preparing ({n_docs} then {index} documents); run prepare again")

        manifest = {
            "format": FORMAT,
            "dtype": dtype.name,
            "tokenizer": tokenizer_record(tokenizer),
            "splits": {s: w.close() for s, w in writers.items()},
            "split_by": "tokens" if single else "document",
            "config": asdict(config),
            "sources": [{"path": str(f.resolve()), "bytes": f.stat().st_size} for f in files],
        }
        with open(tmp / MANIFEST, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2)
            f.write("\n")
        _commit_dir(tmp, out_dir)
    except BaseException:
        for w in writers.values():
            w.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
