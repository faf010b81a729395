"""Write a prepared-token directory of uniformly random tokens, for throughput checks that need no corpus."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from smdm.data.prepare import FORMAT, MANIFEST, token_dtype


def write_random_tokens(out_dir: Path, vocab_size: int, train_tokens: int, val_tokens: int, seed: int = 0) -> None:
    """Shards + manifest in the `smdm prepare` format; token id 0 plays EOS."""
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(vocab_size)
    rng = np.random.default_rng(seed)
    splits = {}
    for split, count in (("train", train_tokens), ("val", val_tokens)):
        name = f"{split}-00000.bin"
        rng.integers(0, vocab_size, size=count, dtype=np.int64).astype(dtype).tofile(out_dir / name)
        splits[split] = {"shards": [{"file": name, "tokens": count}], "tokens": count, "documents": 1}
    manifest = {"format": FORMAT, "dtype": np.dtype(dtype).name, "splits": splits, "sources": ["random"],
                "tokenizer": {"path": None, "fingerprint": f"random-{vocab_size}", "vocab_size": vocab_size,
                              "eos_id": 0}}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--train-tokens", type=int, default=20_000_000)
    parser.add_argument("--val-tokens", type=int, default=200_000)
    args = parser.parse_args()
    write_random_tokens(args.out, args.vocab_size, args.train_tokens, args.val_tokens)
    print(f"wrote {args.train_tokens:,} + {args.val_tokens:,} random tokens to {args.out}")


if __name__ == "__main__":
    main()
