"""Does stratifying t (low-discrepancy draws) lower the variance of mc_score? Measured across seeds.

The variance that matters is that of the estimate itself, the mean over one call's `mc_samples` draws, so it is
measured as the variance of mc_score(...).nll over many seeds. (The spread of single draws inside one stratified
batch is the i.i.d. spread whatever the stratification, so a per-draw s² cannot show a reduction.) Each call draws
all its samples in one batch, so one call is one stratified set.

    python benchmarks/low_discrepancy.py --checkpoint runs/ld/mdm --data runs/ld/tokens
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
from pathlib import Path

import torch

from smdm.checkpoint import load_checkpoint
from smdm.data.packed import PackedDataset
from smdm.likelihood import mc_score


def estimate_variance(model, prefix: list[int], target: list[int], draws: int, seeds: int, estimator: str,
                      low_discrepancy: bool) -> float:
    """Variance across seeds of the Monte-Carlo estimate from `draws` samples (one stratified batch per call)."""
    values = [mc_score(model, prefix, target, mc_samples=draws, batch_size=draws, estimator=estimator,
                       low_discrepancy=low_discrepancy, seed=seed).nll for seed in range(seeds)]
    return statistics.variance(values)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="an MDM checkpoint")
    parser.add_argument("--data", required=True, help="prepared data dir; held-out pairs come from its val split")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--prefix-len", type=int, default=16)
    parser.add_argument("--target-len", type=int, default=16)
    parser.add_argument("--draws", type=int, nargs="+", default=[8, 32], help="mc_samples per estimate")
    parser.add_argument("--seeds", type=int, default=300, help="independent estimates per setting")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_checkpoint(args.checkpoint).model
    if model.causal:
        sys.exit("low-discrepancy benchmark: needs an MDM checkpoint")
    length = args.prefix_len + args.target_len
    blocks = PackedDataset(Path(args.data), "val", seq_len=length, shuffle=False).blocks(args.pairs).tolist()
    print("command: " + shlex.join(["python", "benchmarks/low_discrepancy.py", *(argv or sys.argv[1:])]))
    print(f"{len(blocks)} held-out pairs, prefix {args.prefix_len} + target {args.target_len} tokens, "
          f"{args.seeds} seeds per setting\n")
    print("| estimator | draws | Var(estimate), stratified t | Var(estimate), i.i.d. t | ratio (sum over pairs) "
          "| pairs where stratified is lower |")
    print("|---|---:|---:|---:|---:|---:|")
    for estimator in ("count", "bernoulli"):
        for draws in args.draws:
            pairs = [(estimate_variance(model, b[:args.prefix_len], b[args.prefix_len:], draws, args.seeds,
                                        estimator, True),
                      estimate_variance(model, b[:args.prefix_len], b[args.prefix_len:], draws, args.seeds,
                                        estimator, False)) for b in blocks]
            ld, iid = sum(p[0] for p in pairs), sum(p[1] for p in pairs)
            lower = sum(p[0] < p[1] for p in pairs)
            print(f"| {estimator} | {draws} | {ld / len(pairs):.4f} | {iid / len(pairs):.4f} | {ld / iid:.3f} "
                  f"| {lower}/{len(pairs)} |", flush=True)


if __name__ == "__main__":
    main()
