"""Fixed-length blocks from prepared token shards, in a seeded order that resumes exactly and splits across ranks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from smdm.data.prepare import FORMAT, MANIFEST
from smdm.errors import SmdmError

_CHUNK = 1 << 24


def load_manifest(data_dir: str | Path) -> dict:
    """Read and sanity-check manifest.json, so a wrong directory fails with advice instead of a numpy error."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise SmdmError(f"{path}: not found; run `smdm prepare` first")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SmdmError(f"{path}: unreadable manifest ({exc}); run `smdm prepare` again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or "splits" not in manifest:
        raise SmdmError(f"{path}: not a {FORMAT} manifest; run `smdm prepare` first")
    return manifest


def _open_shards(data_dir: Path, manifest: dict, split: str) -> tuple[list[np.ndarray], np.ndarray]:
    """Memory-map a split's shards (checking sizes against the manifest) and return them with cumulative end offsets."""
    if split not in manifest["splits"]:
        raise SmdmError(f"{data_dir}: no split {split!r} (have {', '.join(manifest['splits'])})")
    dtype = np.dtype(manifest["dtype"])
    arrays: list[np.ndarray] = []
    for shard in manifest["splits"][split]["shards"]:
        f = data_dir / shard["file"]
        n = int(shard["tokens"])
        if not f.is_file():
            raise SmdmError(f"{f}: shard missing; run `smdm prepare` again")
        if f.stat().st_size != n * dtype.itemsize:
            raise SmdmError(f"{f}: {f.stat().st_size} bytes but the manifest says {n} tokens; run `smdm prepare` again")
        if n > 0:
            arrays.append(np.memmap(f, dtype=dtype, mode="r", shape=(n,)))
    ends = np.cumsum([len(a) for a in arrays], dtype=np.int64)
    return arrays, ends


class PackedDataset:
    """The shards of one split as one token stream, cut into seq_len blocks and served in a per-epoch permutation."""

    def __init__(
        self,
        data_dir: str | Path,
        split: str = "train",
        seq_len: int = 256,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        max_tokens: int | None = None,
    ) -> None:
        """`max_tokens` keeps only the split's first tokens (the unique data U of a data-constrained run, repeated
        epoch after epoch); whole blocks only, so U = n_blocks x seq_len tokens are ever read."""
        if seq_len < 1:
            raise SmdmError(f"seq_len must be positive, got {seq_len}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise SmdmError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.data_dir = Path(data_dir)
        self.split, self.seq_len, self.seed = split, int(seq_len), int(seed)
        self.rank, self.world_size, self.shuffle = int(rank), int(world_size), bool(shuffle)
        self.manifest = load_manifest(self.data_dir)
        tok = self.manifest.get("tokenizer", {})
        self.vocab_size = int(tok["vocab_size"])
        self.eos_id = int(tok["eos_id"])
        self._arrays, self._ends = _open_shards(self.data_dir, self.manifest, split)
        self.total_tokens = int(self._ends[-1]) if len(self._ends) else 0
        if max_tokens is not None:
            if not 1 <= max_tokens <= self.total_tokens:
                raise SmdmError(f"{self.data_dir}: cannot keep {max_tokens} unique tokens of split {split!r}, which "
                                f"has {self.total_tokens}")
            self.total_tokens = int(max_tokens)
        self.n_blocks = self.total_tokens // self.seq_len
        if self.n_blocks == 0:
            raise SmdmError(
                f"{self.data_dir}: split {split!r} has {self.total_tokens} tokens, fewer than one block of "
                f"seq_len={self.seq_len}; use a shorter seq_len or more data"
            )
        self.epoch = 0
        self.position = 0
        self._orders: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.n_blocks

    def _read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start+length) of the concatenated stream, crossing shard boundaries as needed."""
        out = np.empty(length, dtype=np.int64)
        k = int(np.searchsorted(self._ends, start, side="right"))
        filled = 0
        while filled < length:
            shard_start = int(self._ends[k - 1]) if k > 0 else 0
            lo = start + filled - shard_start
            n = min(length - filled, len(self._arrays[k]) - lo)
            out[filled : filled + n] = self._arrays[k][lo : lo + n]
            filled += n
            k += 1
        return out

    def _order(self, epoch: int) -> np.ndarray:
        """Block order of an epoch: a permutation seeded by (seed, epoch), so any position is reproducible."""
        if epoch not in self._orders:
            if len(self._orders) >= 2:
                self._orders.pop(min(self._orders))
            if self.shuffle:
                self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n_blocks)
            else:
                self._orders[epoch] = np.arange(self.n_blocks)
        return self._orders[epoch]

    def _block_at(self, offset: int) -> int:
        """Block index at `offset` global positions past the current (epoch, position)."""
        absolute = self.position + offset
        return int(self._order(self.epoch + absolute // self.n_blocks)[absolute % self.n_blocks])

    def next_batch(self, batch_size: int) -> torch.Tensor:
        """This rank's (batch_size, seq_len) int64 slice of the next batch_size*world_size global blocks."""
        if batch_size < 1:
            raise SmdmError(f"batch_size must be positive, got {batch_size}")
        first = self.rank * batch_size
        idx = [self._block_at(first + k) for k in range(batch_size)]
        batch = np.stack([self._read(i * self.seq_len, self.seq_len) for i in idx])
        advanced = self.position + batch_size * self.world_size
        self.epoch += advanced // self.n_blocks
        self.position = advanced % self.n_blocks
        return torch.from_numpy(batch)

    def state_dict(self) -> dict:
        """JSON-serialisable position in the global stream, saved in checkpoints for exact resume."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "world_size": self.world_size,
            "shuffle": self.shuffle,
            "n_blocks": self.n_blocks,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at the saved global position; refuse if data or block layout differ (the order would not match)."""
        for key in ("seed", "seq_len", "shuffle", "n_blocks"):
            if key in state and state[key] != getattr(self, key):
                raise SmdmError(
                    f"data state mismatch: checkpoint has {key}={state[key]!r}, dataset has {getattr(self, key)!r}; "
                    "resume with the same data and settings"
                )
        position = int(state["position"])
        if not 0 <= position < self.n_blocks:
            raise SmdmError(f"data state position {position} out of range for {self.n_blocks} blocks")
        self.epoch = int(state["epoch"])
        self.position = position
        # world_size may differ: positions are global, so a resumed run with more/fewer ranks continues the same stream.

    def blocks(self, max_blocks: int | None = None) -> torch.Tensor:
        """The first blocks in stream order (unshuffled), for a deterministic validation set."""
        n = self.n_blocks if max_blocks is None else max(0, min(int(max_blocks), self.n_blocks))
        return torch.from_numpy(self._read(0, n * self.seq_len).reshape(n, self.seq_len))


def corpus_unigram_entropy(data_dir: str | Path, split: str = "train") -> float:
    """Entropy (nats/token) of a split's unigram distribution: the loss a model that ignores context would reach."""
    data_dir = Path(data_dir)
    manifest = load_manifest(data_dir)
    arrays, _ = _open_shards(data_dir, manifest, split)
    size = int(manifest["tokenizer"]["vocab_size"]) + 1
    counts = np.zeros(size, dtype=np.int64)
    for arr in arrays:
        for lo in range(0, len(arr), _CHUNK):
            c = np.bincount(arr[lo : lo + _CHUNK], minlength=size)
            if len(c) > size:
                raise SmdmError(f"{data_dir}: split {split!r} holds token ids >= {size}; run `smdm prepare` again")
            counts += c
    total = int(counts.sum())
    if total == 0:
        raise SmdmError(f"{data_dir}: split {split!r} is empty")
    p = counts[counts > 0] / total
    return max(0.0, float(-(p * np.log(p)).sum()))
