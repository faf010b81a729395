"""Forward passes an MDM needs to score a continuation to a standard error of 0.05 nats, per estimator.

For each held-out (prefix, target) pair, the per-draw variance s² of each Monte-Carlo estimator is measured from
many draws; the number of forward passes (one draw = one sequence through the model) to reach standard error e
is s²/e² for the target's total NLL (and s²/(L·e)² for its per-token NLL). Estimators: the reference of ML-GSAI/SMDM (Bernoulli masks at rate p(t), low-discrepancy t, weight 1/p)
and ours (exactly k ~ U{1..L} masked tokens, stratified, weight L/k), each also with i.i.d. draws.

    python benchmarks/likelihood.py --checkpoint runs/demo/mdm     # after `make demo`
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

ESTIMATORS = {
    "reference: Bernoulli, 1/p, low-discrepancy t": {"estimator": "bernoulli", "low_discrepancy": True},
    "Bernoulli, 1/p, i.i.d. t": {"estimator": "bernoulli", "low_discrepancy": False},
    "ours: exact count k, L/k, stratified k": {"estimator": "count", "low_discrepancy": True},
    "exact count k, L/k, i.i.d. k": {"estimator": "count", "low_discrepancy": False},
}


def per_draw_variance(model, prefix: list[int], target: list[int], draws: int, options: dict, seed: int) -> float:
    """s² of single draws: with a batch of `draws` the reported standard error is s/√draws."""
    result = mc_score(model, prefix, target, mc_samples=draws, batch_size=64, seed=seed, **options)
    return (result.stderr ** 2) * draws


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="runs/demo/mdm", help="an MDM checkpoint (default: the demo's)")
    parser.add_argument("--data", default=None, help="prepared data dir (default: the checkpoint run's ../tokens)")
    parser.add_argument("--pairs", type=int, default=20, help="held-out continuations scored")
    parser.add_argument("--prefix-len", type=int, default=32)
    parser.add_argument("--target-len", type=int, default=32)
    parser.add_argument("--draws", type=int, default=512, help="draws per pair to measure the variance")
    parser.add_argument("--stderr", type=float, default=0.05, help="target standard error in nats")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    checkpoint_dir = Path(args.checkpoint)
    data_dir = Path(args.data) if args.data else checkpoint_dir.parent / "tokens"
    if not (data_dir / "manifest.json").exists():
        sys.exit(f"likelihood benchmark: no prepared data at {data_dir}; run `make demo` or pass --data")
    model = load_checkpoint(checkpoint_dir).model
    length = args.prefix_len + args.target_len
    blocks = PackedDataset(data_dir, "val", seq_len=length, shuffle=False).blocks(args.pairs)
    print("command: " + shlex.join(["python", "benchmarks/likelihood.py", *(argv or sys.argv[1:])]))
    print(f"{blocks.size(0)} held-out pairs, prefix {args.prefix_len} + target {args.target_len} tokens, "
          f"{args.draws} draws each; passes to reach a standard error of {args.stderr} nats = s² / {args.stderr}²")
    rows = []
    for name, options in ESTIMATORS.items():
        passes = []
        for index, block in enumerate(blocks.tolist()):
            variance = per_draw_variance(model, block[:args.prefix_len], block[args.prefix_len:], args.draws,
                                         options, seed=index)
            passes.append(variance / args.stderr ** 2)
        rows.append((name, statistics.mean(passes), statistics.median(passes)))
    reference = rows[0][1]
    per_token = args.target_len ** 2  # a per-token standard error e needs (1/L)² of the passes
    print(f"\n| estimator | passes for SE {args.stderr} nats on the target's total NLL (mean / median) "
          f"| passes for SE {args.stderr} nats/token (mean) | fewer passes than the reference |")
    print("|---|---:|---:|---:|")
    for name, mean, median in rows:
        print(f"| {name} | {mean:,.0f} / {median:,.0f} | {mean / per_token:,.0f} | {reference / mean:.1f}x |")


if __name__ == "__main__":
    main()
