"""Re-estimate diffusion runs' (MDM or BDM) final validation ELBO with many independent sets of mask draws.

A study's validation number is one Monte-Carlo estimate: a fixed set of draws (seed 1234) over the run's validation
blocks, whose spread (about 0.04 nats/token for 4 draws over 128 blocks) is as large as the gaps the crossover study
reads. This scores each run's final checkpoint on the same blocks with SETS other seeds and prints the mean, its
standard error and every estimate; `--seed 1234 --sets 1` reproduces the run's own final number exactly.

    python benchmarks/reestimate_elbo.py runs/repeat/crossover/mdm-tiny-1m-U25000-e256 --sets 24
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from smdm.checkpoint import load_checkpoint
from smdm.data.packed import PackedDataset
from smdm.errors import SmdmError
from smdm.objectives import make_objective
from smdm.train import evaluate


def reestimate(run: Path, sets: int, first_seed: int) -> list[float]:
    """The run's validation ELBO under `sets` seeds (first_seed, first_seed + 1000, ...), as training computes it."""
    config = json.loads((run / "train_config.json").read_text())
    checkpoint = load_checkpoint(run / "checkpoint")
    blocks = PackedDataset(config["data_dir"], "val", seq_len=config["seq_len"], shuffle=False).blocks(
        config["eval_blocks"])
    objective = make_objective(checkpoint.meta["objective"], **checkpoint.meta.get("objective_options", {}))
    return [evaluate(checkpoint.model, blocks, objective, config["eval_mc_samples"],
                     batch_size=config["eval_batch_size"], seed=first_seed + 1000 * k) for k in range(sets)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories (train_config.json and checkpoint/)")
    parser.add_argument("--sets", type=int, default=24, help="independent sets of mask draws per run")
    parser.add_argument("--seed", type=int, default=1000, help="the first set's seed")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.sets < 1:
        parser.error("--sets must be at least 1")
    for run in map(Path, args.runs):
        try:
            values = reestimate(run, args.sets, args.seed)
        except (OSError, KeyError, json.JSONDecodeError, SmdmError) as error:
            sys.exit(f"reestimate_elbo: {run}: not a finished run ({error})")
        mean = statistics.mean(values)
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"{run.name}: {mean:.3f} ± {spread / len(values) ** 0.5:.3f} ({len(values)} sets; SD of one "
              f"{spread:.3f}): {' '.join(f'{v:.3f}' for v in values)}", flush=True)


if __name__ == "__main__":
    main()
