"""`smdm scale plan|run|status|fit|launch`: parse arguments and call smdm.scaling / smdm.sweep; nothing else."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from smdm.cli_types import add_study_parsers, non_negative_int, positive_int
from smdm.repeat_cli import add_repeat_parser


def cmd_scale(args: argparse.Namespace) -> None:
    from smdm import sweep
    from smdm.scaling import SweepSpec, plan_sweep, read_manifest, write_manifest

    if args.scale_command == "plan":
        spec = SweepSpec.from_file(args.spec)
        runs = plan_sweep(spec)
        print(sweep.describe_plan(runs))
        print(f"manifest -> {write_manifest(spec, runs, args.out)}")
        return
    spec, runs = read_manifest(args.manifest)
    runs = sweep.select_runs(runs, getattr(args, "only", None), args.manifest)
    if args.scale_command == "status":
        print(sweep.describe_status(runs))
        return
    data = args.data or spec.data_dir
    if args.scale_command == "run":
        report = sweep.run_sweep(runs, data, jobs=args.jobs, threads=args.threads,
                                 stop_after_steps=args.stop_after_steps, progress=not args.no_progress)
        print(report.describe())
        report.raise_for_failures(len(runs))
    elif args.scale_command == "fit":
        for line in sweep.fit_report(spec, runs, args.out, args.data, args.irreducible, args.bootstrap, args.seed,
                                     warn=lambda text: print(text, file=sys.stderr)):
            print(line)
    else:
        text = (sweep.slurm_script(runs, data, args.nproc_per_node, args.nnodes, args.max_parallel, args.time,
                                   args.partition, job_name=spec.name) if args.format == "slurm"
                else "\n".join(sweep.launch_commands(runs, data, args.nproc_per_node, args.nnodes)) + "\n")
        if args.out:
            Path(args.out).write_text(text)
            print(f"{len(runs)} runs -> {args.out}")
        else:
            print(text, end="")


def add_scale_parser(sub: argparse._SubParsersAction) -> None:
    """The `smdm scale` subcommands."""
    p = sub.add_parser("scale", help="scaling laws: plan, run, fit and launch IsoFLOP sweeps of MDMs and ARMs")
    scale = p.add_subparsers(dest="scale_command", required=True)
    s = add_study_parsers(scale, "sweep", "configs/scaling-cpu.json",
                          "IsoFLOP parabolas, power laws with bootstrap intervals, compute gap, plots",
                          "scaling.json, isoflop.png, frontier.png")
    s.add_argument("--irreducible", action="store_true", help="also fit L = E + A C^-alpha (needs 4 budgets)")
    s.add_argument("--bootstrap", type=positive_int, default=1000, help="bootstrap replicates for the intervals")
    s.add_argument("--seed", type=non_negative_int, default=0)
    s.add_argument("--data", help="data directory for the unigram-entropy reference line (default: the spec's)")
    s = scale.add_parser("launch", help="print one torchrun command per run, or a SLURM array script")
    s.add_argument("manifest")
    s.add_argument("--format", choices=["shell", "slurm"], default="shell")
    s.add_argument("--nproc-per-node", type=positive_int, default=8)
    s.add_argument("--nnodes", type=positive_int, default=1)
    s.add_argument("--max-parallel", type=positive_int, default=None, help="SLURM: array tasks running at once")
    s.add_argument("--time", default="24:00:00", help="SLURM time limit per run")
    s.add_argument("--partition", default=None)
    s.add_argument("--data", help="data directory on the cluster (default: the spec's)")
    s.add_argument("--out", help="write here instead of printing")
    p.set_defaults(func=cmd_scale)
    add_repeat_parser(scale)
