"""`smdm scale repeat plan|run|fit`: the data-constrained study's commands; parse arguments, call smdm.repeat."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from smdm.cli_types import positive_int


def cmd_repeat(args: argparse.Namespace) -> None:
    from smdm import repeat, sweep
    from smdm.data.packed import load_manifest

    if args.repeat_command == "plan":
        spec = repeat.RepeatSpec.from_file(args.spec)
        available = None
        if (Path(spec.data_dir) / "manifest.json").is_file():
            available = int(load_manifest(spec.data_dir)["splits"]["train"]["tokens"])
        runs = repeat.plan_repeat(spec, available)
        print(sweep.describe_plan(runs))
        print(f"manifest -> {repeat.write_repeat_manifest(spec, runs, args.out)}")
        return
    spec, runs = repeat.read_repeat_manifest(args.manifest)
    runs = sweep.select_runs(runs, getattr(args, "only", None), args.manifest)
    if args.repeat_command == "run":
        report = sweep.run_sweep(runs, args.data or spec.data_dir, jobs=args.jobs, threads=args.threads,
                                 stop_after_steps=args.stop_after_steps, progress=not args.no_progress)
        print(report.describe())
        report.raise_for_failures(len(runs))
        return
    points, missing = repeat.collect_points(runs)
    for name, reason in missing.items():
        print(f"left out {name}: {reason}", file=sys.stderr)
    report = repeat.fit_repeat(points)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "repeat.json").write_text(json.dumps({"points": [vars(p) for p in points], **report}, indent=1) + "\n")
    for line in repeat.describe_repeat(report):
        print(line)
    for path in repeat.plot_repeat(points, report, out):
        print(f"wrote {path}")


def add_repeat_parser(scale: argparse._SubParsersAction) -> None:
    """`smdm scale repeat ...`, under the `smdm scale` subcommands."""
    p = scale.add_parser("repeat", help="data-constrained study: U unique tokens x epochs x sizes x families")
    sub = p.add_subparsers(dest="repeat_command", required=True)
    s = sub.add_parser("plan", help="turn a repeat spec (JSON) into a manifest of training runs")
    s.add_argument("spec", help="e.g. configs/repeat-cpu.json")
    s.add_argument("--out", required=True, help="manifest to write")
    s = sub.add_parser("run", help="train the manifest's unfinished runs (resumes killed ones)")
    s.add_argument("manifest")
    s.add_argument("--jobs", type=positive_int, default=1, help="training processes at once")
    s.add_argument("--threads", type=positive_int, default=None, help="torch threads per process")
    s.add_argument("--only", nargs="+", help="run names to train (default: all)")
    s.add_argument("--data", help="override the spec's data directory")
    s.add_argument("--stop-after-steps", type=positive_int, help="end each run early with a checkpoint")
    s.add_argument("--no-progress", action="store_true")
    s = sub.add_parser("fit", help="frontiers, crossovers vs the closed form, data-reuse half-lives, plots")
    s.add_argument("manifest")
    s.add_argument("--out", required=True, help="directory for repeat.json, loss_vs_compute.png, reuse.png")
    p.set_defaults(func=cmd_repeat)
