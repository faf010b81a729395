"""Training throughput of block diffusion (BD3-LM) against the MDM, per token, side by side on CPU.

One timed step is a full training step (zero_grad, loss, backward, AdamW). The MDM runs `mdm_step_loss` over
L tokens; block diffusion runs `bdm_step_loss`, one vectorised pass over 2L tokens (noisy and clean copies) under
the block mask. Both are credited with batch x L tokens, so the ratio is the cost of block diffusion's extra copy.
The models are timed in interleaved rounds whose order reverses every round (as in train_throughput.py); the
ratio is the median of per-round ratios, each from back-to-back blocks. Both wall time and this process's CPU
time are reported: on a machine shared with other jobs (one thread here), CPU time excludes the time the process
waits for a core, so its ratio is the steadier of the two.

    python benchmarks/bdm_throughput.py --threads 1                 # tiny-6m, batch 8 x 256, B in {4, 16}
    python benchmarks/bdm_throughput.py --block-sizes 4 --steps 3 --rounds 3 --threads 1
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_throughput import Runner, n_params, warm_up

from smdm.block_diffusion import bdm_step_loss
from smdm.config import ModelConfig
from smdm.diffusion import mdm_step_loss
from smdm.model import Transformer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="tiny-6m")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print("command:", shlex.join(["python", "benchmarks/bdm_throughput.py", *(argv or sys.argv[1:])]))
    cfg = ModelConfig.from_name(args.config, vocab_size=args.vocab_size, block_size=max(args.seq_len, 1))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; config {cfg.name} ({cfg.n_layer} layers, "
          f"width {cfg.n_embd}), batch {args.batch_size} x {args.seq_len}, {args.dtype}")

    torch.manual_seed(0)
    mdm = Transformer(cfg).train()
    generator = torch.Generator().manual_seed(0)
    runners = [Runner("MDM", mdm, lambda x: mdm_step_loss(mdm, x, generator), n_params(mdm), args.dtype)]
    for block_size in args.block_sizes:
        torch.manual_seed(0)
        model = Transformer(cfg).train()
        runners.append(Runner(f"BDM B={block_size}", model,
                              lambda x, m=model, b=block_size: bdm_step_loss(m, x, b, generator),
                              n_params(model), args.dtype))
    data = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len), generator=data) for _ in range(2)]
    runners = warm_up(runners, batches, args.warmup)
    wall: dict[str, list[float]] = {r.name: [] for r in runners}
    cpu: dict[str, list[float]] = {r.name: [] for r in runners}
    for round_index in range(args.rounds):
        for runner in runners if round_index % 2 == 0 else runners[::-1]:
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            for i in range(args.steps):
                runner.step(batches[i % len(batches)])
            wall[runner.name].append(time.perf_counter() - wall_start)
            cpu[runner.name].append(time.process_time() - cpu_start)
        print(f"  round {round_index + 1}/{args.rounds}: " + " | ".join(
            f"{name} {wall[name][-1]:.2f} s wall, {cpu[name][-1]:.2f} s cpu" for name in wall), flush=True)
    tokens = args.steps * args.batch_size * args.seq_len
    base = runners[0].name
    print("\n| model | tokens/s (wall, median) | time vs MDM, wall (median, min-max) "
          "| time vs MDM, CPU (median, min-max) |")
    print("|---|---:|---:|---:|")
    for name, times in wall.items():
        wall_ratios = [t / b for t, b in zip(times, wall[base], strict=True)]
        cpu_ratios = [t / b for t, b in zip(cpu[name], cpu[base], strict=True)]
        print(f"| {name} | {tokens / statistics.median(times):,.0f} | "
              f"{statistics.median(wall_ratios):.2f}x ({min(wall_ratios):.2f}-{max(wall_ratios):.2f}) | "
              f"{statistics.median(cpu_ratios):.2f}x ({min(cpu_ratios):.2f}-{max(cpu_ratios):.2f}) |")


if __name__ == "__main__":
    main()
