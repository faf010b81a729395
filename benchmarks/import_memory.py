"""Peak resident memory while importing a large random Llama directory with smdm (issue 13: under 1.3x the weights).

1. Writes a random `LlamaForCausalLM`-layout directory (config.json, safetensors shards, index) one tensor at a time,
   never holding more than one shard, so the writer itself needs no second copy either.
2. Imports it in a fresh process with `smdm.interop.load_model_dir` (meta-device model, shards streamed tensor by
   tensor) and reports that process's peak RSS (VmHWM) against the size of the weights; the resident memory of the
   same process before loading (Python + torch + smdm) is reported too.
3. With --baseline, the same measurement for `transformers.LlamaForCausalLM.from_pretrained(dir, dtype=...)`.

    python benchmarks/import_memory.py --work-dir /tmp/llama-1b              # ~1.1B parameters (TinyLlama's shape)
    python benchmarks/import_memory.py --layers 4 --work-dir /tmp/llama-small # quick
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}

CHILD = r"""
import json, sys, time
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
import torch
loader, directory, dtype = sys.argv[1], sys.argv[2], sys.argv[3]
if loader == "smdm":
    from smdm.interop import load_model_dir
else:
    import transformers
before = rss("VmRSS:")
start = time.perf_counter()
if loader == "smdm":
    model = load_model_dir(directory, dtype=dtype).model
else:
    model = transformers.LlamaForCausalLM.from_pretrained(
        directory, dtype={"bf16": torch.bfloat16, "fp32": torch.float32}[dtype])
seconds = time.perf_counter() - start
params = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"before": before, "peak": rss("VmHWM:"), "seconds": seconds, "param_bytes": params}))
"""


def write_random_llama(directory: Path, layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int,
                       vocab: int, dtype: torch.dtype, shard_bytes: int) -> int:
    """A random Llama directory in HF's sharded layout; returns the bytes of weights written."""
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    head_dim = hidden // heads
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [(p + "input_layernorm.weight", (hidden,)),
                   (p + "self_attn.q_proj.weight", (heads * head_dim, hidden)),
                   (p + "self_attn.k_proj.weight", (kv_heads * head_dim, hidden)),
                   (p + "self_attn.v_proj.weight", (kv_heads * head_dim, hidden)),
                   (p + "self_attn.o_proj.weight", (hidden, heads * head_dim)),
                   (p + "post_attention_layernorm.weight", (hidden,)),
                   (p + "mlp.gate_proj.weight", (intermediate, hidden)),
                   (p + "mlp.up_proj.weight", (intermediate, hidden)),
                   (p + "mlp.down_proj.weight", (hidden, intermediate))]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    generator = torch.Generator().manual_seed(0)
    shards: list[dict[str, str]] = []
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = total = 0
    names: list[list[str]] = []

    def flush() -> None:
        nonlocal pending, pending_bytes
        if pending:
            name = f"model-{len(names) + 1:05d}.safetensors"
            save_file(pending, str(directory / name), metadata={"format": "pt"})
            names.append(list(pending))
            shards.append({key: name for key in pending})
            pending, pending_bytes = {}, 0

    for key, shape in shapes:
        tensor = (torch.randn(shape, generator=generator) * 0.02).to(dtype)
        size = tensor.numel() * tensor.element_size()
        if pending_bytes + size > shard_bytes:
            flush()
        pending[key] = tensor
        pending_bytes += size
        total += size
    flush()
    weight_map = {key: name for shard in shards for key, name in shard.items()}
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": hidden,
              "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv_heads, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
              "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu",
              "torch_dtype": {torch.bfloat16: "bfloat16", torch.float32: "float32"}[dtype]}
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return total


def measure(loader: str, directory: Path, dtype: str) -> dict:
    """Peak RSS of a fresh process importing the directory."""
    result = subprocess.run([sys.executable, "-c", CHILD, loader, str(directory), dtype], check=True,
                            capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", required=True, type=Path)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="stored and loaded dtype")
    parser.add_argument("--shard-mb", type=int, default=1000, help="shard size (HF's default max_shard_size is GBs)")
    parser.add_argument("--baseline", action="store_true", help="also measure transformers' from_pretrained")
    args = parser.parse_args()

    start = time.perf_counter()
    weights = write_random_llama(args.work_dir, args.layers, args.hidden, args.intermediate, args.heads,
                                 args.kv_heads, args.vocab, DTYPES[args.dtype], args.shard_mb << 20)
    shards = len(list(args.work_dir.glob("*.safetensors")))
    print(f"wrote {weights / 2**30:.2f} GiB ({weights // DTYPES[args.dtype].itemsize / 1e9:.2f}B parameters, "
          f"{args.dtype}) in {shards} shards in {time.perf_counter() - start:.0f} s")
    loaders = ["smdm"] + (["transformers"] if args.baseline else [])
    for loader in loaders:
        result = measure(loader, args.work_dir, args.dtype)
        print(f"{loader:>12}: peak RSS {result['peak'] / 2**30:.2f} GiB = {result['peak'] / weights:.3f}x the "
              f"weights (process before loading: {result['before'] / 2**30:.2f} GiB; peak minus that: "
              f"{(result['peak'] - result['before']) / weights:.3f}x), {result['seconds']:.1f} s")


if __name__ == "__main__":
    main()
